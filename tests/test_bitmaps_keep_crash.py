"""Crash safety of the operations that keep persistent bitmaps (resize grow and shrink, snapshot
create and delete, amend): a power cut at any point leaves an image that qemu-img check finds
free of corruption, which is the old image (size, guest view, bitmap list and contents as
qemu-nbd -B exports them) or the new one; never a bitmap marked consistent whose contents do
not belong with the disk's size and data. (The simulator and sweep: test_bitmaps_crash.py.)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import crashsim as cs
from crashsim import CrashLog
from qcowdisk import QcowFile
from qemutools import create, qemu_img, qemu_io
from test_bitmaps import bitmap_map, bitmaps_of
from test_bitmaps_crash import _view
from test_snapshot_crash import judge_check

MiB = 1 << 20
SIZE = 4 * MiB + 1536


def _state(path: str, raw: str) -> tuple[int, bytes, str, dict[str, str]]:
    """Size, guest view, bitmap list and contents: what must be the old or the new image's."""
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    listed = bitmaps_of(path)
    return (info["virtual-size"], _view(path, raw), json.dumps(listed),
            {b["name"]: bitmap_map(path, b["name"]) for b in listed if "in-use" not in b["flags"]})


OPERATIONS: dict[str, Callable[[QcowFile], None]] = {
    "grow": lambda d: d.resize(SIZE + 3 * MiB + 512),
    "shrink": lambda d: d.resize(2 * MiB + 512, shrink=True),
    "snapshots": lambda d: (d.create_snapshot("s2"), d.delete_snapshot("s1"), None)[2],
    "refcount-bits": lambda d: d.amend(refcount_bits=8),
    "downgrade": lambda d: d.amend(compat="0.10"),
    "amend-size": lambda d: d.amend(size=SIZE - 2 * MiB),
}


@pytest.mark.parametrize("options", ["cluster_size=4k", "cluster_size=512,lazy_refcounts=on"])
@pytest.mark.parametrize("op", list(OPERATIONS))
def test_power_cut_keeping_bitmaps(tmp_path: Path, op: str, options: str) -> None:
    image = str(tmp_path / "img.qcow2")
    create(image, SIZE, options=options)
    qemu_io(image, "write -P 1 0 100k", "write -z 3M 64k")
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "512", image, "fine"], check=True)
    qemu_img("snapshot", "-c", "s1", image)
    qemu_io(image, "write -P 2 1M 8k", f"write -P 3 {SIZE - 1024} 1024", "write -P 4 2M 9000")
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "64k", "--disable", image, "off"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--merge", "fine", image, "off"], check=True)
    before = _state(image, str(tmp_path / "b.raw"))
    log = CrashLog()
    log.snapshot_initial(image)
    with QcowFile.open_keeping_bitmaps(image, host_factory=log.factory()) as disk:
        OPERATIONS[op](disk)
    after = _state(image, str(tmp_path / "a.raw"))
    if op in ("grow", "shrink", "amend-size", "downgrade"):
        assert after[0] != before[0] or op == "downgrade"
        assert after[2:] != before[2:]  # bits past the new end dropped, or (downgrade) the bitmaps gone
    else:
        assert after == before

    def judge(cut_image: str) -> list[str]:
        got = _state(cut_image, str(tmp_path / "c.raw"))
        if got in (before, after):
            return []
        return [f"NEITHER size {got[0]} (old {before[0]}, new {after[0]}), view "
                f"{'old' if got[1] == before[1] else 'new' if got[1] == after[1] else 'other'}, bitmaps {got[2]}, "
                f"contents {'old' if got[3] == before[3] else 'new' if got[3] == after[3] else 'other'}"]

    cut_image = str(tmp_path / "cut.qcow2")

    def examine(st: cs.CrashState) -> list[str]:
        Path(cut_image).write_bytes(st.data)
        found = [f.detail for f in cs.repair_on_open(cut_image)] if st.data[79] & 1 else []
        # (snapshot creation's window where L2 entries still say COPIED with refcount 2 is
        # QEMU's too, harmless; test_snapshot_crash.judge_check accepts exactly that)
        found += judge_check(cut_image)[0]
        return found or judge(cut_image)

    t = cs.judge_states(cs.crash_states(log, [image], range(len(log.ops) + 1),
                                        ["all", "none", ("random", 1), ("torn", 2), ("torn", 3), *cs.HEADER_TEARS]),
                        {}, examine, lambda problems, st: problems,
                        lambda st: f"cut {st.cut}/{len(log.ops)} subset={st.subset}")
    t.assert_none(f"[keep bitmaps {op} {options}]", examples=8)
