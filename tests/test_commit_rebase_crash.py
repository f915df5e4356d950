"""Crash safety of commit and rebase: a power cut at any point leaves every image free of
corruption (leaks at most) and the committed or rebased image showing the guest view it had
before (commit writes into the base only what the image overrides, and empties the image only
once the base is durable; a safe rebase copies and syncs before the one header switch).

The simulator is tests/crashsim.py's: every host op is recorded at the HostFile seam, and at
sampled cut points the files are rebuilt as the disk would hold them (last fsync, plus all /
none / a random subset / a torn subset of the writes since). Each rebuilt set of files is
checked with `qemu-img check` and read with `qemu-img convert` in a scratch directory.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import crashsim as cs
import qcowdisk
from crashsim import CrashLog
from qemutools import check, create, qemu_img, qemu_io

MiB = 1 << 20
FILES = ("base.qcow2", "top.qcow2", "new.qcow2")


def build(d: Path) -> None:
    create(str(d / "base.qcow2"), 2 * MiB, options="cluster_size=4096")
    qemu_io(str(d / "base.qcow2"), "write -P 0x11 0 512k", "write -P 0x12 1M 300k")
    create(str(d / "top.qcow2"), 2 * MiB, options="cluster_size=4096", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 4k 70k", "write -z 256k 64k", "write -P 0x32 1200k 100k")
    create(str(d / "new.qcow2"), 1 * MiB, options="cluster_size=4096")
    qemu_io(str(d / "new.qcow2"), "write -P 0x11 0 100k", "write -P 0x41 600k 200k")


def build_raw(d: Path) -> None:
    """base.raw (shorter than the overlay, with data and a hole) <- top.qcow2: data over the hole
    and over data, zeros over data, data past the base's end (the base grows)."""
    create(str(d / "base.raw"), 1536 * 1024, fmt="raw")
    qemu_io(str(d / "base.raw"), "write -P 0x11 0 512k", "write -P 0x12 1M 300k", fmt="raw")
    create(str(d / "top.qcow2"), 2 * MiB, options="cluster_size=4096", backing="base.raw", backing_fmt="raw")
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 4k 70k", "write -z 256k 64k", "write -P 0x32 600k 100k",
            "write -z 1100k 40k", "write -P 0x33 1700k 100k")


def build_qcow_v1(d: Path) -> None:
    """base.qcow (data, a compressed cluster) <- top.qcow2: partial clusters, zeros, data."""
    create(str(d / "base.qcow"), 2 * MiB, fmt="qcow")
    qemu_io(str(d / "base.qcow"), "write -P 0x11 0 512k", "write -c -P 0x15 1M 4k", fmt="qcow")
    create(str(d / "top.qcow2"), 2 * MiB, options="cluster_size=4096", backing="base.qcow", backing_fmt="qcow")
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 4k 70k", "write -z 256k 64k", "write -P 0x32 1M 1k",
            "write -P 0x33 1500k 3k")


def guest_view(path: Path, out: Path) -> bytes:
    with contextlib.chdir(path.parent):  # (QEMU 7.2 opens a relative data file name from there)
        qemu_img("convert", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def sectors_from(view: bytes, old: bytes, new: bytes) -> bool:
    """Whether every 512-byte sector of `view` is the old one or the new one (zeros past an end)."""
    n = max(len(view), len(old), len(new))
    view, old, new = (x + bytes(n - len(x)) for x in (view, old, new))
    return all(view[i:i + 512] in (old[i:i + 512], new[i:i + 512]) for i in range(0, n, 512))


def run_crash(tmp_path: Path, operation: Callable[[Path, CrashLog], None], max_cuts: int = 40,
              make: Callable[[Path], None] = build, files: tuple[str, ...] = FILES, base: str | None = None,
              subsets: tuple[str, ...] = ("all", "none", "torn"), min_ops: int = 8,
              judge: Callable[[Path], list[str]] | None = None) -> None:
    """With `base` (a commit's target), that image must also read, sector by sector, as before
    or as the committed image: early data is allowed, anything else is not. The workload must
    leave at least `min_ops` host ops at the seam. `judge(dir)`: more problems of the files there."""
    live = tmp_path / "live"
    live.mkdir()
    make(live)
    expected = guest_view(live / "top.qcow2", tmp_path / "expected.raw")
    old_base = guest_view(live / base, tmp_path / "old-base.raw") if base else b""
    log = CrashLog()
    for name in files:
        log.snapshot_initial(str(live / name))
    operation(live, log)
    assert guest_view(live / "top.qcow2", tmp_path / "after.raw") == expected
    n = len(log.ops)
    assert sum(op.kind == "fsync" for op in log.ops) >= 2 and n >= min_ops, "the workload went past the seam"
    for name in files:  # the log reproduces the live files
        assert cs.materialise(log.initial[str(live / name)], log.ops, str(live / name), n, "all") == \
            (live / name).read_bytes(), name
    rng = random.Random(7)
    fsyncs = {i for i, op in enumerate(log.ops) if op.kind == "fsync"}
    cuts = sorted({*rng.sample(sorted(fsyncs | {i + 1 for i in fsyncs}), min(len(fsyncs), max_cuts // 2)),
                   *rng.sample(range(n + 1), min(n + 1, max_cuts // 2)), n})
    scratch = tmp_path / "cut"

    def examine(st: cs.CrashState) -> list[str]:
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir()
        st.write_to(str(scratch))
        # qemu-img checks only qcow2: for the others the guest view below is what counts
        with contextlib.chdir(scratch):
            found = [f"{name}: {f.detail}" for name in files if name.endswith(".qcow2")
                     for f in cs.check_findings(check(str(scratch / name)))]
        if guest_view(scratch / "top.qcow2", tmp_path / "cut.raw") != expected:
            found.append("the guest view of top.qcow2 changed")
        if base and not sectors_from(guest_view(scratch / base, tmp_path / "cut.raw"), old_base, expected):
            found.append(f"{base} reads neither as before nor as the committed data")
        return found or (judge(scratch) if judge is not None else [])
    states = cs.crash_states(log, [str(live / name) for name in files], cuts,
                             lambda cut: [*(x if x in ("all", "none") else (x, cut) for x in subsets), *cs.HEADER_TEARS],
                             skip_unchanged=False)
    t = cs.judge_states(states, {}, examine, lambda found, st: found, lambda st: f"cut {st.cut}/{n} {st.subset}")
    t.assert_none(f"{t.states} crash states, bad ones:", examples=5)


def test_commit_power_cut(tmp_path: Path) -> None:
    def op(d: Path, log: CrashLog) -> None:
        qcowdisk.commit(d / "top.qcow2", host_factory=log.factory())
    run_crash(tmp_path, op, base="base.qcow2")


def test_commit_into_raw_base_power_cut(tmp_path: Path) -> None:
    """The raw base grows, takes data and holes (punched zeros), is synced; only then the overlay
    is emptied: at every cut the overlay reads as before and checks clean."""
    def op(d: Path, log: CrashLog) -> None:
        qcowdisk.commit(d / "top.qcow2", host_factory=log.factory())
    run_crash(tmp_path, op, make=build_raw, files=("base.raw", "top.qcow2"), base="base.raw")
    assert (tmp_path / "live" / "base.raw").stat().st_size == 2 * MiB


def test_commit_into_qcow_v1_base_power_cut(tmp_path: Path) -> None:
    """New clusters and L2 tables are appended and synced before the entries naming them."""
    def op(d: Path, log: CrashLog) -> None:
        qcowdisk.commit(d / "top.qcow2", host_factory=log.factory())
    run_crash(tmp_path, op, make=build_qcow_v1, files=("base.qcow", "top.qcow2"), base="base.qcow", max_cuts=200,
              subsets=("all", "none", "torn", "random"))


@pytest.mark.parametrize("target", ["new.qcow2", ""])
def test_rebase_power_cut(tmp_path: Path, target: str) -> None:
    def op(d: Path, log: CrashLog) -> None:
        qcowdisk.rebase(d / "top.qcow2", target, backing_format="qcow2" if target else None,
                        host_factory=log.factory())
    run_crash(tmp_path, op)



def _bitmap_bits(path: Path) -> dict[str, bytes | None]:
    """Each bitmap's serialized bits (None: in use, inconsistent)."""
    with qcowdisk.QcowFile.open(path, readonly=True, backing=False) as disk:
        return {b.name: None if b.flags & 1 else b"".join(disk.read_bitmap(b.name)) for b in disk.bitmaps}


@pytest.mark.parametrize("operation", ["commit", "rebase"])
def test_power_cut_with_bitmaps(tmp_path: Path, operation: str) -> None:
    """Base and overlay with bitmaps (an enabled and a disabled one each): at every cut each
    image checks clean and each bitmap is in use (inconsistent, as QEMU leaves it after a crash),
    or consistent with its bits from before while the image reads as before, or with its bits
    from after while it reads as after; never stale and marked consistent."""
    before: dict[str, tuple[dict[str, bytes | None], bytes]] = {}
    after: dict[str, tuple[dict[str, bytes | None], bytes]] = {}

    def make(d: Path) -> None:
        build(d)
        for name in ("base.qcow2", "top.qcow2"):
            qemu_img("bitmap", "--add", "-g", "4k", str(d / name), "on")
            qemu_img("bitmap", "--add", "--disable", str(d / name), "off")
            before[name] = (_bitmap_bits(d / name), guest_view(d / name, tmp_path / "b.raw"))

    def op(d: Path, log: CrashLog) -> None:
        if operation == "commit":
            qcowdisk.commit(d / "top.qcow2", host_factory=log.factory())
        else:
            qcowdisk.rebase(d / "top.qcow2", "new.qcow2", backing_format="qcow2", host_factory=log.factory())
        for name in ("base.qcow2", "top.qcow2"):
            after[name] = (_bitmap_bits(d / name), guest_view(d / name, tmp_path / "a.raw"))

    def judge(d: Path) -> list[str]:
        problems = []
        for name in ("base.qcow2", "top.qcow2"):
            got = _bitmap_bits(d / name)
            view = guest_view(d / name, tmp_path / "j.raw")
            for bm, bits in got.items():
                if bits is None:
                    continue
                ok = [when for when, (maps, was) in (("before", before[name]), ("after", after[name]))
                      if maps.get(bm) == bits and (view == was or bm == "off")]
                if not ok:
                    problems.append(f"{name}: bitmap {bm!r} consistent but stale")
        return problems

    run_crash(tmp_path, op, make=make, base="base.qcow2" if operation == "commit" else None, judge=judge,
              max_cuts=60)
    assert after["base.qcow2" if operation == "commit" else "top.qcow2"][0]["on"] != \
        before["base.qcow2" if operation == "commit" else "top.qcow2"][0]["on"]


def committed(make: Callable[[Path], None]) -> Callable[[Path], None]:
    """`make`, then its top.qcow2 committed with `-d`: the base holds everything, durably."""
    def build_committed(d: Path) -> None:
        make(d)
        qcowdisk.commit(d / "top.qcow2", drop=True)
    return build_committed


def build_tiny_refblocks(d: Path) -> None:
    """512-byte clusters, 64-bit refcounts: a refcount block counts 64 clusters (32 KiB), so the
    top's refcount table names many blocks and the temporary tables need several."""
    opts = "cluster_size=512,refcount_bits=64"
    create(str(d / "base.qcow2"), 2 * MiB, options=opts)
    qemu_io(str(d / "base.qcow2"), "write -P 0x11 0 300k")
    create(str(d / "top.qcow2"), 2 * MiB, options=opts, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 4k 70k", "write -z 256k 64k", "write -P 0x32 1200k 100k")


def build_v2(d: Path) -> None:
    """Version 2 images: QEMU discards rather than rebuilds (no dirty bit to lean on); four L2
    tables, and one allocated for the L1 entry that has none."""
    opts = "cluster_size=4096,compat=0.10"
    create(str(d / "base.qcow2"), 10 * MiB, options=opts)
    qemu_io(str(d / "base.qcow2"), "write -P 0x11 0 512k")
    create(str(d / "top.qcow2"), 10 * MiB, options=opts, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 4k 70k", "write -P 0x32 2M 100k", "write -P 0x33 5M 8k",
            "write -P 0x34 7M 4k")


def build_snapshot(d: Path) -> None:
    """An overlay with an internal snapshot: discarded, the snapshot's clusters kept."""
    build(d)
    qemu_img("snapshot", "-c", "s1", str(d / "top.qcow2"))
    qemu_io(str(d / "top.qcow2"), "write -P 0x51 64k 64k", "write -P 0x52 1500k 8k")


def build_lazy(d: Path) -> None:
    create(str(d / "base.qcow2"), 2 * MiB, options="cluster_size=4096")
    create(str(d / "top.qcow2"), 2 * MiB, options="cluster_size=4096,lazy_refcounts=on", backing="base.qcow2",
           backing_fmt="qcow2")
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 4k 70k", "write -P 0x32 1200k 100k")


def build_data_file(d: Path) -> None:
    """An overlay with an external data file (top.data): emptied by discards, its data clusters
    punched in top.data once the tables no longer name them."""
    create(str(d / "base.qcow2"), 2 * MiB, options="cluster_size=4096")
    qemu_io(str(d / "base.qcow2"), "write -P 0x11 0 512k")
    with contextlib.chdir(d):  # (QEMU 7.2 creates and opens a relative data file name from the working directory)
        create("top.qcow2", 2 * MiB, options="cluster_size=4096,data_file=top.data", backing="base.qcow2",
               backing_fmt="qcow2")
        qemu_io("top.qcow2", "write -P 0x31 0 70k", "write -z 256k 64k", "write -P 0x32 1200k 100k")


@pytest.mark.parametrize("make", [build, build_tiny_refblocks, build_v2, build_snapshot, build_lazy, build_data_file],
                         ids=["default", "tiny-refblocks", "compat-0.10", "snapshot", "lazy-dirty", "data-file"])
def test_make_empty_power_cut_at_every_point(tmp_path: Path, make: Callable[[Path], None]) -> None:
    """Emptying a committed overlay (QEMU's make_completely_empty, rebuilt here through a
    temporary set of tables and two header switches; or the discard fallback): a cut after any
    host op, with all, none, a random subset or a torn subset of the unsynced writes surviving,
    leaves an image that checks free of corruption and reads as before (the base holds it all).
    The lazy-refcount overlay is dirty when emptied (a write just before)."""
    def op(d: Path, log: CrashLog) -> None:
        with qcowdisk.QcowFile.open(d / "top.qcow2", host_factory=log.factory()) as top:
            if make is build_lazy:
                top.write_at(8192, top.read_at(8192, 4096))  # same bytes: the view stays; dirty now
                assert top.header.incompatible_features & 1
            top.make_empty()
    files = ("base.qcow2", "top.qcow2", *(["top.data"] if make is build_data_file else []))
    run_crash(tmp_path, op, make=committed(make), files=files, max_cuts=2000,
              subsets=("all", "none", "torn", "random"), min_ops=5)
    with contextlib.chdir(tmp_path / "live"):
        assert not any(e["depth"] == 0 and e["present"] for e in json.loads(
            qemu_img("map", "--output=json", "top.qcow2").stdout))
