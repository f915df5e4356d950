"""Header rewrites torn by a power cut: every operation that rewrites the qcow2 header leaves,
at any cut, an image that QEMU and qcowdisk open, that `qemu-img check` finds free of corruption
(leaks allowed), and that shows the old state or the new one (header fields and guest view
together), even when the header write spans several 512-byte sectors and lands in part.

Long backing names (450-950 bytes, in nested directories) and the feature-name table make the
header span two to four sectors. The simulator (tests/crashsim.py) rebuilds the files at every
cut point with all / none / a random torn subset of the unsynced writes, plus every tear pattern
of the pending header write (`crashsim.HEADER_TEARS`: each changed sector old or new).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import crashsim as cs
import qcowdisk
from crashsim import CrashLog
from qcowdisk import QcowFile
from qemutools import create, qemu_img, qemu_io
from test_snapshot_crash import judge_check

MiB = 1 << 20
TOP = "top.qcow2"


def long_name(tag: str, length: int) -> str:
    """A relative file name of about `length` bytes: 200-byte directories named after `tag`'s
    first letter, then `tag`."""
    return "/".join([tag[0] * 200] * max(0, (length - len(tag)) // 201) + [tag])


def make_file(d: Path, name: str, *, options: str = "cluster_size=4096", io: tuple[str, ...] = (),
              backing: str | None = None, backing_fmt: str | None = None, fmt: str = "qcow2") -> str:
    """Create `name` (relative to `d`, directories made), write `io` into it; returns its path."""
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    create(str(path), 2 * MiB, fmt=fmt, options=options if fmt == "qcow2" else None, backing=backing,
           backing_fmt=backing_fmt)
    if io:
        qemu_io(str(path), *io, fmt=fmt)
    return str(path)


N1 = long_name("base1-" + "1" * 50 + ".qcow2", 470)    # 464 bytes
N2 = long_name("base2-" + "2" * 140 + ".qcow2", 1000)  # 956 bytes
N3 = long_name("base3-" + "3" * 60 + ".qcow2", 760)    # 675 bytes


def two_bases(d: Path, top_options: str = "cluster_size=4096", top_name: str = N1,
              top_fmt: str = "qcow2") -> None:
    """Two bases with different data under long names, and top.qcow2 over the one `top_name`
    names (with a format extension), with data of its own."""
    make_file(d, N1, io=("write -P 0x11 0 512k", "write -P 0x12 1M 300k"))
    make_file(d, N2, io=("write -P 0x21 0 200k", "write -P 0x22 900k 300k"))
    make_file(d, N3, io=("write -P 0x23 0 100k",))
    make_file(d, TOP, options=top_options, io=("write -P 0x31 4k 70k", "write -z 256k 64k"),
              backing=top_name, backing_fmt=top_fmt)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], None]
    run: Callable[[Path, CrashLog], None]
    logged: tuple[str, ...] = (TOP,)          # files whose host ops are recorded
    fields: tuple[str, ...] = ()              # extra format-specific keys of the state
    extra: tuple[dict[str, Any], ...] = field(default=())  # allowed states besides old and new


def _open(d: Path, log: CrashLog, **kw: Any) -> QcowFile:
    return QcowFile.open(str(d / TOP), host_factory=log.factory(), **kw)


def _set_backing(name: str | None, fmt: str | None) -> Callable[[Path, CrashLog], None]:
    def run(d: Path, log: CrashLog) -> None:
        qcowdisk.rebase(d / TOP, name or "", backing_format=fmt, unsafe=True, host_factory=log.factory())
    return run


def _rebase_safe(name: str) -> Callable[[Path, CrashLog], None]:
    def run(d: Path, log: CrashLog) -> None:
        qcowdisk.rebase(d / TOP, name, backing_format="qcow2" if name else None, host_factory=log.factory())
    return run


def _amend(**options: Any) -> Callable[[Path, CrashLog], None]:
    def run(d: Path, log: CrashLog) -> None:
        with QcowFile.open_keeping_bitmaps(str(d / TOP), host_factory=log.factory()) as disk:
            disk.amend(**options)
    return run


def _bitmaps(add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> Callable[[Path, CrashLog], None]:
    def run(d: Path, log: CrashLog) -> None:
        with QcowFile.open_for_bitmaps(str(d / TOP), host_factory=log.factory()) as disk:
            editor = disk.edit_bitmaps()
            for b in add:
                editor.add(b)
            for b in remove:
                editor.remove(b)
            editor.commit()
    return run


def _with_bitmap(d: Path, *names: str) -> None:
    two_bases(d)
    for n in names:
        qemu_img("bitmap", "--add", str(d / TOP), n)


def _featured(d: Path, *bitmaps: str) -> None:
    """two_bases with a top whose header has the feature-name table (qcowdisk's upgrade writes
    it, as QEMU's amend does) ahead of the backing name: the bitmaps extension then lies past
    the first sector; with `bitmaps` added."""
    two_bases(d, "cluster_size=4096,compat=0.10")
    with QcowFile.open(str(d / TOP)) as disk:
        disk.amend(compat="1.1")
    for n in bitmaps:
        qemu_img("bitmap", "--add", str(d / TOP), n)


def _resize(d: Path, log: CrashLog) -> None:
    with QcowFile.open_keeping_bitmaps(str(d / TOP), host_factory=log.factory()) as disk:
        disk.resize(4 * MiB)


def _snapshot_create(d: Path, log: CrashLog) -> None:
    with _open(d, log) as disk:
        disk.create_snapshot("s1")


def _snapshot_delete(d: Path, log: CrashLog) -> None:
    with _open(d, log) as disk:
        disk.delete_snapshot("s1")


def _with_snapshot(d: Path) -> None:
    two_bases(d)
    qemu_img("snapshot", "-c", "s1", str(d / TOP))
    qemu_io(str(d / TOP), "write -P 0x41 8k 4k")


def _commit(d: Path, log: CrashLog) -> None:
    qcowdisk.commit(d / TOP, host_factory=log.factory())


def _lazy_writes(d: Path, log: CrashLog) -> None:
    """Guest writes to a lazy-refcount image (of what the guest reads there already, so the
    view stays): the dirty bit is set, then cleared at close."""
    with _open(d, log) as disk:
        for offset, length in ((1200 * 1024, 9000), (64 * 1024, 5000)):
            disk.write_at(offset, disk.read_at(offset, length))
            disk.flush()


CASES = [
    Case("rebase-u-longer", two_bases, _set_backing(N2, "qcow2")),
    Case("rebase-u-shorter", lambda d: two_bases(d, top_name=N2), _set_backing(N1, "qcow2")),
    Case("rebase-u-2k-clusters", lambda d: two_bases(d, "cluster_size=2048"), _set_backing(N2, "qcow2")),
    Case("rebase-u-2k-back", lambda d: two_bases(d, "cluster_size=2048", top_name=N2), _set_backing(N1, "qcow2")),
    Case("rebase-u-none", two_bases, _set_backing(None, None)),
    Case("rebase-u-format", two_bases, _set_backing(N1, None)),
    Case("rebase-safe", two_bases, _rebase_safe(N2)),
    Case("rebase-safe-none", two_bases, _rebase_safe("")),
    Case("amend-compat-up", lambda d: two_bases(d, "cluster_size=4096,compat=0.10"), _amend(compat="1.1"),
         fields=("compat",)),
    Case("amend-compat-down", two_bases, _amend(compat="0.10"), fields=("compat",)),
    Case("amend-lazy-on", two_bases, _amend(lazy_refcounts=True), fields=("lazy-refcounts",)),
    Case("amend-refcount-bits", two_bases, _amend(refcount_bits=64), fields=("refcount-bits",)),
    Case("bitmap-add", two_bases, _bitmaps(add=("b0",))),
    Case("bitmap-add-second", lambda d: _with_bitmap(d, "b0"), _bitmaps(add=("b1",))),
    Case("bitmap-remove", lambda d: _with_bitmap(d, "b0"), _bitmaps(remove=("b0",))),
    Case("bitmap-add-past-sector-0", _featured, _bitmaps(add=("b0",))),
    Case("bitmap-remove-past-sector-0", lambda d: _featured(d, "b0"), _bitmaps(remove=("b0",))),
    Case("amend-compat-down-feature-table", _featured, _amend(compat="0.10"), fields=("compat",)),
    Case("resize-with-bitmaps", lambda d: _with_bitmap(d, "b0"), _resize),
    Case("snapshot-create", two_bases, _snapshot_create),
    Case("snapshot-delete", _with_snapshot, _snapshot_delete),
    Case("commit", two_bases, _commit, logged=(TOP, N1)),
    Case("lazy-dirty-bit", lambda d: two_bases(d, "cluster_size=4096,lazy_refcounts=on"), _lazy_writes,
         fields=("lazy-refcounts",)),
]


def state_of(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """What the header says, as qemu-img info reports it: the backing name and format, the
    virtual size, bitmaps and snapshots by name, and `fields` of the format-specific data."""
    info = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    spec = info["format-specific"]["data"]
    return {"backing": info.get("backing-filename"), "backing-format": info.get("backing-filename-format"),
            "size": info["virtual-size"], "bitmaps": [b["name"] for b in spec.get("bitmaps", [])],
            "snapshots": [s["name"] for s in info.get("snapshots", [])], **{k: spec.get(k) for k in fields}}


def guest_view(path: Path, out: Path) -> bytes:
    qemu_img("convert", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def qcowdisk_backing(path: Path) -> str | None:
    """The backing name qcowdisk reads (None: none); raises if qcowdisk cannot open the image."""
    with QcowFile.open(str(path), readonly=True, backing=False) as disk:
        return disk.header.backing_file


def dirty(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(80)
    return head[4:8] == b"\0\0\0\3" and bool(head[79] & 1)


@dataclass
class Swept:
    """A case recorded and judged: the tally and the figures for the report."""

    tally: cs.Tally
    ops: int
    header_writes: int
    tear_states: int


def sweep(case: Case, tmp_path: Path, subsets: Callable[[int], list[cs.Subset]]) -> Swept:
    live, scratch = tmp_path / "live", tmp_path / "cut"
    live.mkdir()
    case.build(live)
    before = state_of(live / TOP, case.fields)
    views = [(before, guest_view(live / TOP, tmp_path / "v.raw"))]
    log = CrashLog()
    for name in case.logged:
        log.snapshot_initial(str(live / name))
    case.run(live, log)
    after = state_of(live / TOP, case.fields)
    views.append((after, guest_view(live / TOP, tmp_path / "v.raw")))
    n = len(log.ops)
    for name in case.logged:  # the log reproduces the live files
        assert cs.materialise(log.initial[str(live / name)], log.ops, str(live / name), n, "all") == \
            (live / name).read_bytes(), name
    shutil.copytree(live, scratch)
    allowed = [s for s, _ in views] + list(case.extra)

    def examine(st: cs.CrashState) -> list[str]:
        for path, data in st.files.items():
            (scratch / os.path.relpath(path, live)).write_bytes(data)
        top = scratch / TOP
        found: list[str] = []
        try:
            named = qcowdisk_backing(top)
        except Exception as e:  # noqa: BLE001 - any failure to open a crash state is a finding
            found.append(f"QCOWDISK-OPEN {type(e).__name__}: {e}")
            named = None
        if dirty(top):  # lazy refcounts: a read-write open repairs, then all must be clean
            found += [f"{f.category} {f.detail}" for f in cs.repair_on_open(str(top))]
            found += [f"{f.category} {f.detail}" for f in cs.check_findings(cs.qemu_check(str(top)), repaired=True)]
        else:
            found += judge_check(str(top))[0]  # the snapshot tests' verdict (a known COPIED window)
        if found and "error" in cs.qemu_check(str(top)):
            return found  # QEMU cannot even open it
        state = state_of(top, case.fields)
        if state not in allowed:
            found.append(f"STATE neither old nor new: {state}")
        elif named != state["backing"]:
            found.append(f"NAME qcowdisk reads backing {named!r}, QEMU {state['backing']!r}")
        view = guest_view(top, tmp_path / "cut.raw")
        if view not in ([v for s, v in views if s == state] or [v for _, v in views]):
            found.append(f"VIEW the guest view is not the one that goes with the header's state {state}")
        return found

    torn = Counter[str]()

    def note(st: cs.CrashState) -> cs.CrashState:
        torn["states"] += isinstance(st.subset, tuple) and st.subset[0] == "tear"
        return st
    states = (note(st) for st in cs.crash_states(log, [str(live / name) for name in case.logged], range(n + 1),
                                                 subsets, skip_unchanged=True))
    t = cs.judge_states(states, {}, examine, lambda found, st: [f[:300] for f in found],
                        lambda st: f"{case.name} {cs.describe_cut(log, st.cut)} subset={st.subset}", TOTALS)
    header_writes = sum(1 for op in log.ops if op.kind == "write" and op.offset < 4096)
    assert header_writes, "the operation did not rewrite the header"
    TOTALS.update(cases=1, tear_states=torn["states"], header_writes=header_writes)
    t.summary = (f"[header tears {case.name}] log={n} ops, header writes={header_writes}, "
                 f"tear states={torn['states']}: {t.counts()}")
    print(t.summary)
    return Swept(t, n, header_writes, torn["states"])


TOTALS: Counter[str] = Counter()
print_totals = cs.totals_fixture(TOTALS, lambda c: (
    f"[header tears] {c['cases']} operations: cut points={c['cuts']} states={c['states']} "
    f"(tear patterns {c['tear_states']}) distinct images={c['images']} header writes={c['header_writes']}"))


def subsets_every_tear(cut: int) -> list[cs.Subset]:
    return ["all", "none", ("torn", cut), *cs.HEADER_TEARS]


def test_tear_patterns_cover_every_sector_mix_of_a_header_write() -> None:
    """The model: a pending write into cluster 0 lands as any mix of its changed sectors (every
    mix up to 4 sectors; beyond, the prefixes and suffixes and a seeded sample, 16 in all), the
    unchanged sectors and the other pending ops as issued; other writes are not torn this way."""
    old = bytearray(b"QFI\xfb" + bytes(16) + (16).to_bytes(4, "big")).ljust(65536, b"o")  # 64 KiB clusters
    data = bytes(old[:512]) + b"N" * 1536 + bytes(old[2048:2560]) + b"M" * 100  # sectors 1-3, 5 change
    ops = [cs.Op("write", "/x", 0, data), cs.Op("write", "/x", 70000, b"D" * 8)]
    states = {cs.tear_state(old, ops, i) for i in range(cs.TEAR_PATTERNS)} - {None}
    assert len(states) == 15  # 4 changed sectors: every mix but the whole write
    for st in states:
        assert st is not None and st[70000:70008] == b"D" * 8  # the later write landed
        assert st[:512] == old[:512] and st[2048:2560] == old[2048:2560]
        assert all(st[a:a + 512] in (old[a:a + 512], data[a:a + 512]) for a in range(512, 2048, 512))
    assert cs.tear_state(old, [cs.Op("write", "/x", 65536, b"x" * 4096)], 0) is None  # past cluster 0
    masks = cs.tear_patterns(6)
    assert len(masks) == 16 and len(set(masks)) == 16 and 63 not in masks
    assert {0, 1, 3, 7, 15, 31, 62, 60, 56, 48, 32} <= set(masks)  # every prefix and suffix


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_power_cut_tears_header_write(tmp_path: Path, case: Case) -> None:
    swept = sweep(case, tmp_path, subsets_every_tear)
    swept.tally.assert_none(examples=8)


def test_no_room_for_both_names_leaves_one_torn_write(tmp_path: Path) -> None:
    """The one window left (qcow2/headerswitch.py): 1 KiB clusters, a 464-byte name replaced by
    a 675-byte one. A name is contiguous, so the new one must lie where the old header reads
    nothing beyond sector 0: past the old name (ending at 136 + 464 = 600, leaving 424 bytes of
    the cluster) or inside sector 0 (376 bytes past the extensions): neither holds 675 bytes, and
    moving the old name first gains nothing (it cannot be shorter). So the switch is one write
    of the two sectors where both headers read different bytes (what only the new one reads
    goes first), and a tear of that write is the only crash state that may mix them."""
    case = Case("rebase-u-1k", lambda d: two_bases(d, "cluster_size=1024"), _set_backing(N3, "qcow2"))
    swept = sweep(case, tmp_path, subsets_every_tear)
    assert swept.header_writes == 2  # the part only the new header reads, then the clashing write
    bad = swept.tally.findings
    assert bad, "no torn state mixes the headers any more: update headerswitch.py's and README's text"
    assert all("after write(top.qcow2, off=0x0, len=600)" in f and ("'tear'" in f or "'torn'" in f)
               for f in bad), "\n".join(bad[:5])
