"""Crash safety of adding persistent bitmaps (`QcowFile.add_bitmaps`, what convert --bitmaps
uses): a power cut at any point leaves an image that `qemu-img check` finds free of
corruption (leaks allowed), whose guest view is unchanged, and that has either none of the new
bitmaps or all of them, each with its full contents as QEMU reads them.

The simulator is tests/crashsim.py's: every host op is recorded at the HostFile seam, and at
each cut point the image is rebuilt as the disk would hold it (last fsync, plus all / none / a
random subset / a random subset torn into 512-byte sectors of the writes issued since).
A lazy-refcount workload writes guest data in the same session first (the dirty bit is set
when the bitmaps are added): a state with the dirty bit is repaired by a read-write qcowdisk
open, as QEMU would, and must then be entirely clean.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import crashsim as cs
from crashsim import CrashLog
from qcowdisk import NewBitmap, QcowFile
from qcowdisk.qcow2.bitmaps import bitmap_bytes
from qemutools import create, qemu_io
from test_bitmaps import bitmap_map, bitmaps_of

SIZE = 4 * 1024 * 1024 + 1536


@dataclass(frozen=True)
class Workload:
    name: str
    options: str
    lazy_writes: bool = False


WORKLOADS = [Workload("c64k", "cluster_size=64k"), Workload("c512", "cluster_size=512"),
             Workload("c4k-lazy", "cluster_size=4k,lazy_refcounts=on", lazy_writes=True)]


def _contents(granularity: int, seed: int) -> bytes:
    """Serialized bits with clear, set and mixed stretches."""
    n = bitmap_bytes(SIZE, granularity)
    out = bytearray(n)
    for i in range(0, n, 97):
        out[i] = (i * seed) & 0xFF
    out[n // 3:n // 3 + n // 4] = b"\xff" * (n // 4)
    return bytes(out)


def _view(path: str, out: str) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out], check=True, capture_output=True)
    return Path(out).read_bytes()


def sweep(log: CrashLog, image: str, work: Path, label: str, judge: Callable[[str], list[str]], *,
          start: int = 0, subsets: Sequence[cs.Subset] = ("all", "none", ("random", 1), ("torn", 2),
                                                                *cs.HEADER_TEARS)) -> int:
    """Rebuild every crash state of `image` from cut `start` on into WORK/cut.qcow2, find what
    qemu-img check finds (a dirty lazy-refcount state repaired by a read-write open first, then
    entirely clean), then `judge(path)`'s problems; fail with them. Returns the distinct images."""
    cut_image = str(work / "cut.qcow2")

    def examine(st: cs.CrashState) -> list[str]:
        Path(cut_image).write_bytes(st.data)
        dirty = int.from_bytes(st.data[72:80], "big") & 1
        found = cs.repair_on_open(cut_image) if dirty else []
        found += cs.check_findings(cs.qemu_check(cut_image), repaired=bool(dirty))
        return [f.detail for f in found] if found else judge(cut_image)

    judged: dict[str, list[str]] = {}
    t = cs.judge_states(cs.crash_states(log, [image], range(start, len(log.ops) + 1), list(subsets)),
                        judged, examine, lambda problems, st: problems,
                        lambda st: f"cut {st.cut}/{len(log.ops)} subset={st.subset}")
    print(f"[{label}] log={len(log.ops)} from={start} images={len(judged)}")
    t.assert_none(f"[{label}]", examples=8)
    os.remove(cut_image)
    return len(judged)


@pytest.mark.parametrize("wl", WORKLOADS, ids=[w.name for w in WORKLOADS])
def test_power_cut_while_adding_bitmaps(tmp_path: Path, wl: Workload) -> None:
    image = str(tmp_path / "img.qcow2")
    create(image, SIZE, options=wl.options)
    qemu_io(image, "write -P 1 0 100k", "write -P 2 2M 64k")
    lazy_data = b"\x07" * 70000
    log = CrashLog()
    log.snapshot_initial(image)
    new = [NewBitmap("a", 512, True, [_contents(512, 3)]), NewBitmap("b", 65536, False),
           NewBitmap("c", 4096, True, [_contents(4096, 5)])]
    with QcowFile.open(image, host_factory=log.factory()) as disk:
        if wl.lazy_writes:
            disk.write_at(3 * 1024 * 1024, lazy_data)
            disk.flush()
        start = log.mark("adding")
        disk.add_bitmaps(new)
    expected_list = bitmaps_of(image)
    assert [b["name"] for b in expected_list] == ["a", "b", "c"]
    expected_maps = {b["name"]: bitmap_map(image, b["name"]) for b in expected_list}
    after_view = _view(image, str(tmp_path / "after.raw"))

    def judge(cut_image: str) -> list[str]:
        problems: list[str] = []
        if _view(cut_image, str(tmp_path / "cut.raw")) != after_view:
            problems.append("VIEW guest view changed")
        listed = bitmaps_of(cut_image)
        if listed == expected_list:
            for name, want in expected_maps.items():
                if bitmap_map(cut_image, name) != want:
                    problems.append(f"CONTENTS bitmap {name!r} differs")
        elif listed:
            problems.append(f"PARTIAL bitmaps {listed}")
        return problems

    images = sweep(log, image, tmp_path, f"bitmaps crash {wl.name}", judge, start=start,
                   subsets=["all", "none", ("random", 1), ("random", 2), ("torn", 2), ("torn", 3), *cs.HEADER_TEARS])
    assert images >= 3  # the old image, the new one, and states between


@pytest.mark.parametrize("options", ["cluster_size=4k", "cluster_size=64k,lazy_refcounts=on"])
def test_power_cut_while_writing_with_tracked_bitmaps(tmp_path: Path, options: str) -> None:
    """A write session on an image with bitmaps (`QcowFile.open`, writes, zero writes and
    discards, a flush, close): at every cut `qemu-img check` finds no corruption, and each
    bitmap is in use (inconsistent: what QEMU leaves after a crash, and what `qemu-img check`
    says nothing about), or consistent with the contents from before the session while the
    guest view is the old one, or consistent with the new contents once the view is the new
    one; never stale and marked consistent. The disabled bitmap's contents never change."""
    image = str(tmp_path / "img.qcow2")
    create(image, SIZE, options=options)
    qemu_io(image, "write -P 1 0 100k")
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "4k", image, "on"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "--disable", image, "off"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "512", image, "fine"], check=True)
    qemu_io(image, "write -P 2 1M 8k")
    names = ("on", "off", "fine")
    before_maps = {n: bitmap_map(image, n) for n in names}
    before_view = _view(image, str(tmp_path / "before.raw"))
    log = CrashLog()
    log.snapshot_initial(image)
    with QcowFile.open(image, host_factory=log.factory()) as disk:
        disk.write_at(0, bytes([7]) * 5000)
        disk.write_at(2 * 1024 * 1024 + 100, bytes([7]) * 70000)
        disk.flush()
        disk.write_zeroes(1024 * 1024 + 512, 1024)
        disk.discard(64 * 1024, 40 * 1024)
        disk.write_at(SIZE - 512, bytes([7]) * 512)
    after_maps = {n: bitmap_map(image, n) for n in names}
    assert after_maps["on"] != before_maps["on"] and after_maps["off"] == before_maps["off"]
    assert [b["flags"] for b in bitmaps_of(image)] == [["auto"], [], ["auto"]]
    after_view = _view(image, str(tmp_path / "after.raw"))

    in_use_states = []

    def judge(cut_image: str) -> list[str]:
        view = _view(cut_image, str(tmp_path / "cut.raw"))
        problems = []
        for b in bitmaps_of(cut_image):
            if "in-use" in b["flags"]:
                in_use_states.append(cut_image)  # (qemu-img check found it clean: sweep checked)
                continue
            got = bitmap_map(cut_image, b["name"])
            if not ((got == before_maps[b["name"]] and (view == before_view or b["name"] == "off"))
                    or (got == after_maps[b["name"]] and view == after_view)):
                problems.append(f"STALE bitmap {b['name']!r} consistent but neither before nor after")
        return problems

    sweep(log, image, tmp_path, f"tracked writes crash {options}", judge)
    assert in_use_states  # cuts inside the session leave the bitmaps in use, and check clean
