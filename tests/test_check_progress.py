"""`QcowFile.check(progress=...)`: progress calls, stopping a check (and a repair) from the
callback, and memory bounded by the image's metadata rather than by unchecked size fields.

A repair stopped by its progress callback must leave what a power cut at that point would leave
(tests/test_check_crash.py): `qemu-img check` no worse than before, the same guest data, and a
later `check -r all` that completes and leaves the image clean.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import pytest

import imagepatch as ip
import test_check as tc
from qcowdisk import QcowFile
from qcowdisk.qcow2.check import CheckFailedError
from qemutools import check, compare, create


class Stop(Exception):
    """Raised by the test's progress callback."""


def recorder(stop_at: int | None = None) -> tuple[list[tuple[int, int]], object]:
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if stop_at is not None and len(calls) == stop_at:
            raise Stop(len(calls))
    return calls, progress


def test_progress_calls(tmp_path: Path) -> None:
    """Calls go from 0 to total/total, done never goes back nor past the total; the result is
    the one without progress."""
    p = tc.falloc_image(tmp_path)
    with QcowFile.open(p, readonly=True) as disk:
        calls, progress = recorder()
        r = disk.check(progress=progress)  # type: ignore[arg-type]
        assert r == disk.check()
    assert len(calls) > 3 and calls[0][0] == 0
    assert calls[-1][0] == calls[-1][1] > 0
    assert all(d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_progress_exception_stops_a_check(tmp_path: Path) -> None:
    p = tc.falloc_image(tmp_path)
    before = Path(p).read_bytes()
    with QcowFile.open(p, readonly=True) as disk:
        calls, progress = recorder(stop_at=3)
        with pytest.raises(Stop):
            disk.check(progress=progress)  # type: ignore[arg-type]
        assert len(calls) == 3
        assert disk.check().exit_status == 0  # the image object still works
    assert Path(p).read_bytes() == before


@pytest.mark.parametrize("case", ["leak-many", "refcount-too-low", "refcount-zero", "copied-clear-l2",
                                  "leak-after-snapshot-delete", "snapshot-incomplete"])
def test_repair_stopped_by_progress_is_consistent(case: str, tmp_path: Path) -> None:
    """Stop `check -r all` at every progress call in turn."""
    path = tc.BROKEN[case](tmp_path)
    original = str(tmp_path / "original.qcow2")
    shutil.copyfile(path, original)
    before = check(original)
    work = str(tmp_path / "work.qcow2")
    shutil.copyfile(original, work)
    with QcowFile.open_for_check(work, repair=True) as disk:
        calls, progress = recorder()
        assert disk.check("all", progress=progress).exit_status == 0  # type: ignore[arg-type]
    assert calls
    for stop_at in range(1, len(calls) + 1):
        shutil.copyfile(original, work)
        with QcowFile.open_for_check(work, repair=True) as disk:
            _, progress = recorder(stop_at)
            with pytest.raises(Stop):
                disk.check("all", progress=progress)  # type: ignore[arg-type]
        after = check(work)
        where = f"{case}, stopped at call {stop_at} of {len(calls)}: {after}"
        assert after["check-errors"] <= before["check-errors"], where
        assert after.get("corruptions", 0) <= before.get("corruptions", 0), where
        compare(original, work)
        with QcowFile.open_for_check(work, repair=True) as disk:
            disk.check("all")
        assert check(work)["returncode"] == 0, where


def _peak_during(fn: object) -> int:
    tracemalloc.start()
    try:
        fn()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_the_file_not_a_snapshot_l1_size(tmp_path: Path) -> None:
    """A snapshot whose L1 (l1_size 4194304: 32 MiB) lies past the end of the file is read as
    what the file holds of it (nothing), as qemu-img reads it (zeros)."""
    p = tc.two_snapshots(tmp_path)
    e = ip.snapshot_entries(p)[0]
    ip.patch_u64(p, e.field_offset("l1_table_offset"), 1 << 40)
    ip.patch_u32(p, e.field_offset("l1_size"), 4194304)
    tc.assert_same_all_outputs(tmp_path, os.path.basename(p))
    with QcowFile.open_for_check(p) as disk:
        disk.check()
        peak = _peak_during(disk.check)
    assert peak < 8 << 20, peak


def test_memory_refused_before_counting_a_huge_file(tmp_path: Path) -> None:
    """A file of more than INT_MAX clusters (sparse) fails as qemu-img's check fails, before
    the in-memory refcount table (4 bytes per cluster: 8 GiB here) is allocated."""
    p = str(tmp_path / "img.qcow2")
    create(p, "64M", options="cluster_size=512")
    os.truncate(p, (1 << 31) * 512 + 4096)
    q = tc.run_qemu(tmp_path, "img.qcow2")
    assert tc.run_ours(tmp_path, "img.qcow2") == q
    with QcowFile.open(p, readonly=True) as disk:
        with pytest.raises(CheckFailedError, match="File too large"):
            disk.check()

        def failing_check() -> None:
            with pytest.raises(CheckFailedError):
                disk.check()
        peak = _peak_during(failing_check)
    assert peak < 8 << 20, peak
