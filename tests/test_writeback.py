"""Writeback hints: bulk copies that flush at their end start the disk writes as they go (and
falloc preallocation, the other host call that only reserves or schedules, through the seam).

`HostFile.start_writeback` is sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): it waits for
nothing and leaves writeback errors for the next fsync (no WAIT flag). commit, rebase and a
convert whose cache mode honours flushes call it every WRITEBACK_EVERY bytes of data through
`WritebackPacer`; cache=unsafe and O_DIRECT hosts never do. A failing hint puts the image in
the failed state like a failing write, and a commit it stops leaves the overlay as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

import qcowdisk
from faulthost import FaultPlan
from qcowdisk import hostio
from qcowdisk.errors import ImageFailedError, QcowError
from qcowdisk.hostio import SYNC_FILE_RANGE_WRITE, DirectHostFile, HostFile
from qcowdisk.ops.cachemode import NoFlushHostFile
from qcowdisk.ops.writeback import WRITEBACK_EVERY, WritebackPacer
from qemutools import assert_clean, assert_no_corruption, create, qemu_io, to_raw

MiB = 1 << 20
DATA = 40 * MiB  # enough data for a few hints (WRITEBACK_EVERY apart)


class SyncFileRange:
    """A stand-in for libc's sync_file_range: records (path, offset, nbytes, flags), answers
    with `errno_to_set` (0: success, then the real call is made too)."""

    def __init__(self, errno_to_set: int = 0) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.errno_to_set = errno_to_set
        real = hostio._libc_sync_file_range()
        assert real is not None, "this test needs Linux's sync_file_range"
        self.real: Callable[[int, int, int, int], int] = real

    def __call__(self, fd: int, offset: int, nbytes: int, flags: int) -> int:
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes, flags))
        if self.errno_to_set:
            ctypes.set_errno(self.errno_to_set)
            return -1
        return self.real(fd, offset, nbytes, flags)

    def on(self, path: Path) -> list[tuple[str, int, int, int]]:
        """The calls made on `path`."""
        return [c for c in self.calls if c[0] == str(path.resolve())]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> SyncFileRange:
    rec = SyncFileRange()
    monkeypatch.setattr(hostio, "_sync_file_range", [rec])
    return rec


def test_host_hint_is_sync_file_range_write_alone(tmp_path: Path, recorder: SyncFileRange) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    host = HostFile(str(path), True)
    try:
        host.start_writeback()  # nothing written: nothing to start
        assert recorder.calls == []
        host.pwrite(b"x" * 8192, 0)
        host.start_writeback()
        assert recorder.on(path) == [(str(path.resolve()), 0, 0, SYNC_FILE_RANGE_WRITE)]
        host.fsync()
        host.start_writeback()  # everything synced: nothing to start
        assert len(recorder.calls) == 1
    finally:
        host.close()
    assert path.read_bytes() == b"x" * 8192


def test_real_hint_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    host = HostFile(str(path), True)
    try:
        host.pwrite(b"\x5a" * MiB, 4096)
        host.start_writeback()  # the real sync_file_range
        assert host.can_start_writeback
        assert host.pread(MiB, 4096) == b"\x5a" * MiB
        host.fsync()
    finally:
        host.close()


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ESPIPE, errno.ENOSYS])
def test_host_that_cannot_hint_stops_asking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    rec = SyncFileRange(err)
    monkeypatch.setattr(hostio, "_sync_file_range", [rec])
    path = tmp_path / "f"
    path.write_bytes(b"")
    host = HostFile(str(path), True)
    try:
        host.pwrite(b"x", 0)
        host.start_writeback()  # refused: not an error, a host without the hint
        assert not host.can_start_writeback
        host.start_writeback()
        assert len(rec.calls) == 1
    finally:
        host.close()


def test_host_hint_io_error_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostio, "_sync_file_range", [SyncFileRange(errno.EIO)])
    path = tmp_path / "f"
    path.write_bytes(b"")
    host = HostFile(str(path), True)
    try:
        host.pwrite(b"x", 0)
        with pytest.raises(OSError, match="Input/output error") as e:
            host.start_writeback()
        assert e.value.errno == errno.EIO and e.value.filename == str(path)
    finally:
        host.close()


def test_unsafe_and_direct_hosts_never_hint(tmp_path: Path, recorder: SyncFileRange) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    hosts: list[HostFile] = [NoFlushHostFile(str(path), True)]
    with contextlib.suppress(OSError):  # (a file system without O_DIRECT)
        hosts.append(DirectHostFile(str(path), True))
    for host in hosts:
        try:
            host.pwrite(b"y" * 4096, 0)
            host.start_writeback()
        finally:
            host.close()
    assert recorder.calls == []


def test_pacer_hints_every_so_many_bytes() -> None:
    hints: list[int] = []
    pacer = WritebackPacer(lambda: hints.append(1), every=10)
    for n in (4, 4, 4, 9, 1, 30):
        pacer.wrote(n)
    assert len(hints) == 3  # at 12, at 10 more (9 + 1), at 30


def view(image: Path, fmt: str | None = None) -> bytes:
    """The guest view as qemu-img reads it."""
    return to_raw(str(image), f"{image}.view", fmt)


def data_chain(d: Path) -> tuple[Path, Path]:
    """base.qcow2 (48 MiB, a little data) <- top.qcow2 with DATA bytes of data over it."""
    base, top = d / "base.qcow2", d / "top.qcow2"
    create(str(base), 48 * MiB)
    qemu_io(str(base), "write -P 0x11 0 1M")
    create(str(top), 48 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(top), f"write -P 0x22 1M {DATA // MiB}M", "write -z 44M 1M")
    return base, top


def test_commit_hints_the_base_as_it_copies(tmp_path: Path) -> None:
    base, top = data_chain(tmp_path)
    want = view(top)
    plan = FaultPlan()
    qcowdisk.commit(top, host_factory=plan.factory())
    hints = [op for op in plan.ops if op.kind == "writeback" and op.path == str(base)]
    assert len(hints) >= DATA // WRITEBACK_EVERY - 1
    assert all(op.path != str(top) for op in plan.ops if op.kind == "writeback")  # only read
    assert view(base) == want
    assert_clean(str(base))
    assert_clean(str(top))


def test_commit_stopped_by_a_failed_hint_leaves_the_overlay(tmp_path: Path) -> None:
    base, top = data_chain(tmp_path)
    want = view(top)
    plan = FaultPlan()
    plan.arm("writeback", errno.EIO, matches=lambda op: op.path == str(base))
    with pytest.raises(ImageFailedError) as e:  # (the base's close reports its failed state)
        qcowdisk.commit(top, host_factory=plan.factory())
    cause = e.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.EIO
    assert view(top) == want  # not emptied: the guest view is unchanged
    assert_clean(str(top))
    assert_no_corruption(str(base))


def test_failed_hint_fails_the_image(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create(str(path), 4 * MiB)
    plan = FaultPlan()
    plan.arm("writeback", errno.EIO)
    disk = qcowdisk.QcowFile.open(path, host_factory=plan.factory())
    disk.write_at(0, b"\x33" * 65536)
    with pytest.raises(OSError, match="Input/output error"):
        disk.start_writeback()
    with pytest.raises(QcowError):  # refused from then on, as after a failed write
        disk.write_at(0, b"\x44")
    with pytest.raises(QcowError):
        disk.flush()
    with pytest.raises(ImageFailedError):
        disk.close()
    assert_no_corruption(str(path))


def test_rebase_hints_the_image_it_copies_into(tmp_path: Path) -> None:
    base, _ = data_chain(tmp_path)
    qemu_io(str(base), f"write -P 0x55 0 {DATA // MiB}M")  # what the overlay must keep
    create(str(tmp_path / "top2.qcow2"), 48 * MiB, backing="base.qcow2", backing_fmt="qcow2")
    top2 = tmp_path / "top2.qcow2"
    want = view(top2)
    plan = FaultPlan()
    qcowdisk.rebase(top2, "", host_factory=plan.factory())
    assert plan.count("writeback") >= DATA // WRITEBACK_EVERY - 1
    assert view(top2) == want
    assert_clean(str(top2))


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
def test_convert_hints_unless_cache_unsafe(tmp_path: Path, recorder: SyncFileRange, out_format: str) -> None:
    _, top = data_chain(tmp_path)
    want = view(top)
    synced, unsafe = tmp_path / f"synced.{out_format}", tmp_path / f"unsafe.{out_format}"
    qcowdisk.convert(top, synced, out_format=out_format)  # the library's default: cache=writeback
    qcowdisk.convert(top, unsafe, out_format=out_format, cache="unsafe")  # qemu-img's default
    assert len(recorder.on(synced)) >= DATA // WRITEBACK_EVERY - 1
    assert recorder.on(unsafe) == []
    for p in (synced, unsafe):
        assert view(p, out_format) == want
        if out_format == "qcow2":
            assert_clean(str(p))


def test_falloc_preallocation_goes_through_the_host_seam(tmp_path: Path) -> None:
    """create's falloc preallocation is a host op (`HostFile.allocate`), so fault injection
    reaches it: a file system without the space (ENOSPC) fails the create loudly, where the
    direct posix_fallocate it replaced was silently skipped."""
    plan = FaultPlan()
    path = tmp_path / "ok.qcow2"
    qcowdisk.QcowFile.create(path, 4 * MiB, preallocation="falloc", host_factory=plan.factory()).close()
    assert plan.count("allocate") == 1
    assert path.stat().st_blocks * 512 >= 4 * MiB
    assert_clean(str(path))
    assert view(path) == bytes(4 * MiB)
    plan = FaultPlan()
    plan.arm("allocate", errno.ENOSPC)
    with pytest.raises(ImageFailedError) as e:  # (the image fails, as after a failed write)
        qcowdisk.QcowFile.create(tmp_path / "full.qcow2", 4 * MiB, preallocation="falloc",
                                 host_factory=plan.factory()).close()
    cause = e.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
