"""The host misbehaves: write/fsync errors, full disks, torn writes, zero-byte writes, fork, close
racing reads (docs/bad-inputs.md, "The host misbehaves"), plus three bad-input fixes (dirty images
with far pointers, names with NUL bytes, a virtual size that is not a multiple of 512).

The failed state these tests pin (API):
- a host write, fsync, truncate or punch failing with OSError inside write_at / write_zeroes /
  punch_hole / flush / close reaches the caller with its errno;
- the image then keeps `disk.failure` (that first exception; None while healthy) and every later
  write_at / write_zeroes / punch_hole / flush raises `ImageFailedError` (a QcowError) whose
  message contains the first failure's strerror and whose `first_error` is it;
- reads keep working and return flushed data;
- close() issues no further host write/fsync/truncate/punch, releases descriptors and QEMU's lock
  and raises ImageFailedError; a second close() is a silent no-op; leaving a `with` block by an
  exception does not replace that exception.

Faults are injected at the HostFile seam (tests/faulthost.py), on a real small tmpfs (ENOSPC), by
patching os.pwritev in a child process (a write that returns 0), and with real fork()s and threads.
QEMU (qemu-img check / convert, qemu-io) is the oracle for what is on disk afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import imagepatch as ip
import qcowdisk
from faulthost import FaultPlan, Mirror, fds_open_on, half_at_8
from qcowdisk import CorruptImageError, QcowError, QcowFile
from qcowdisk.errors import ImageFailedError
from qemutools import check, create, info, qemu_img, qemu_io, run, to_raw

REPO = Path(__file__).resolve().parent.parent
TESTS_DIR = Path(__file__).resolve().parent
MiB = 1 << 20


# --------------------------------------------------------------------------------------------
# Shared checks

def child_env() -> dict[str, str]:
    """Environment for child Python processes: import qcowdisk from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS_DIR)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def expect_image_failed(name: str, call, first: OSError) -> ImageFailedError:
    """`call()` must raise ImageFailedError naming `first` (strerror in the message, first_error)."""
    try:
        call()
    except ImageFailedError as e:
        got = e
    except BaseException as e:  # noqa: BLE001 - report what came instead
        pytest.fail(f"{name} after the failure {first!r} raised {type(e).__name__}: {e} -- expected ImageFailedError")
    else:
        pytest.fail(f"{name} returned normally after the host failure {first!r}; expected ImageFailedError")
    assert got.first_error is first, f"{name}: ImageFailedError.first_error is {got.first_error!r}, not {first!r}"
    assert first.strerror and first.strerror in str(got), (
        f"{name}: ImageFailedError message {str(got)!r} does not name the first failure ({first.strerror!r})")
    return got


def qemu_io_can_write(path: str) -> subprocess.CompletedProcess[str]:
    """`qemu-io -c 'write 0 512'` (succeeds only if nobody holds the image's write lock)."""
    return run("qemu-io", "-f", "qcow2", "-c", "write 0 512", path, check=False)


def assert_no_corruption_json(path: str) -> dict:
    """qemu-img check --output=json: no corruption, no check errors (leaks allowed)."""
    r = check(path)
    assert r["returncode"] in (0, 3) and r.get("corruptions", 0) == 0 and r.get("check-errors", 0) == 0, (
        f"qemu-img check {path} after the failure: {r}")
    return r


def assert_failed_state(disk: QcowFile, plan: FaultPlan, first: OSError, mirror: Mirror, path: str,
                        tmp_path: Path, promised: tuple[int, int], before_lock_probe=None) -> None:
    """Everything the failed state promises, in order; `promised` = (offset, length) of flushed data
    untouched since the flush. `before_lock_probe` runs before qemu-io writes to the image."""
    off, n = promised
    # Every later modification and flush is refused, naming the first failure, without host I/O.
    mark = plan.mark()
    expect_image_failed("flush()", disk.flush, first)
    expect_image_failed("write_at()", lambda: disk.write_at(off, b"\x99" * 512), first)
    expect_image_failed("write_zeroes()", lambda: disk.write_zeroes(off, 512), first)
    expect_image_failed("punch_hole()", lambda: disk.punch_hole(off, 65536), first)
    expect_image_failed("flush() (again)", disk.flush, first)
    done = plan.mutations_since(mark)
    assert not done, f"refused calls still issued host ops: {[o.describe() for o in done]}"
    assert disk.failure is first, f"disk.failure is {getattr(disk, 'failure', '<missing>')!r}, not {first!r}"
    # Reads keep working and return what was flushed.
    assert disk.read_at(off, n) == bytes(mirror.flushed[off:off + n]), "read_at after the failure: not the flushed data"
    buf = bytearray(n)
    assert disk.readinto_at(buf, off) == n and buf == mirror.flushed[off:off + n], "readinto_at after the failure"
    # close(): no host mutation, raises ImageFailedError, releases descriptors and the lock.
    mark = plan.mark()
    expect_image_failed("close()", disk.close, first)
    done = plan.mutations_since(mark)
    assert not done, f"close() after the failure issued host ops: {[o.describe() for o in done]}"
    assert not plan.open_hosts(), f"close() left host files open: {[h.path for h in plan.open_hosts()]}"
    assert not fds_open_on(path), f"close() left descriptors open on the image: {fds_open_on(path)}"
    disk.close()  # a second close is a silent no-op
    # On disk: no corruption, and everything the last returned flush covered reads back.
    assert_no_corruption_json(path)
    bad = mirror.mismatches(to_raw(path, str(tmp_path / "after.raw")))
    assert not bad, "after the failure, flushed data is lost:\n" + "\n".join(bad)
    if before_lock_probe is not None:
        before_lock_probe()
    # QEMU's lock was released.
    p = qemu_io_can_write(path)
    assert p.returncode == 0, f"qemu-io cannot write after close(): {p.stdout}{p.stderr}"


def new_image(tmp_path: Path, plan: FaultPlan, size: int = 64 * MiB, **kw) -> tuple[str, QcowFile]:
    path = str(tmp_path / "disk.qcow2")
    return path, QcowFile.create(path, size, host_factory=plan.factory(), **kw)


def write(disk: QcowFile, mirror: Mirror, offset: int, data: bytes) -> None:
    mirror.write(offset, data)
    disk.write_at(offset, data)


def flush(disk: QcowFile, mirror: Mirror) -> None:
    disk.flush()
    mirror.flush_returned()


def seeded(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def strerror_re(err: int) -> str:
    """`match=` pattern for an OSError(err): its strerror (what faulthost and the kernel put in it)."""
    return re.escape(os.strerror(err))


EIO_RE = strerror_re(errno.EIO)
ENOSPC_RE = strerror_re(errno.ENOSPC)


def call_then_flush(disk: QcowFile, call: Callable[[], object]) -> None:
    """`call()`, then `disk.flush()`: a host error planned for either reaches the caller."""
    call()
    disk.flush()


# --------------------------------------------------------------------------------------------
# The API: the error class is exported

def test_image_failed_error_is_exported() -> None:
    """`qcowdisk.ImageFailedError` is the QcowError subclass of qcowdisk.errors (not exported today)."""
    assert getattr(qcowdisk, "ImageFailedError", None) is ImageFailedError, "qcowdisk does not export ImageFailedError"
    assert "ImageFailedError" in qcowdisk.__all__
    assert issubclass(ImageFailedError, QcowError)


def test_healthy_image_has_no_failure(tmp_path: Path) -> None:
    """`disk.failure` is None while the image is healthy (the attribute does not exist today)."""
    plan = FaultPlan()
    _path, disk = new_image(tmp_path, plan)
    with disk:
        disk.write_at(0, b"a" * 4096)
        disk.flush()
        assert disk.failure is None


# --------------------------------------------------------------------------------------------
# 1. fsync / write / punch errors: the error reaches the caller once, then the image refuses

def _setup_flushed(tmp_path: Path, plan: FaultPlan, **kw) -> tuple[str, QcowFile, Mirror]:
    """An image with 256 KiB of flushed data at 0 and 64 KiB at 8 MiB."""
    path, disk = new_image(tmp_path, plan, **kw)
    mirror = Mirror(disk.virtual_size)
    write(disk, mirror, 0, seeded(256 * 1024, 1))
    write(disk, mirror, 8 * MiB, seeded(65536, 2))
    flush(disk, mirror)
    return path, disk, mirror


def test_fsync_eio_in_flush_is_not_forgotten(tmp_path: Path) -> None:
    """Bug: after flush() raised EIO from fsync, the next flush() returned success (Linux reports an
    fsync error once and may have dropped the dirty pages, so that success was a lie).
    Now the EIO reaches the caller and every later flush/write raises ImageFailedError."""
    plan = FaultPlan()
    path, disk, mirror = _setup_flushed(tmp_path, plan)
    write(disk, mirror, 16 * MiB, seeded(200_000, 3))
    fault = plan.arm("fsync", errno.EIO)  # once: a later fsync would "succeed", as on Linux
    with pytest.raises(OSError, match=EIO_RE) as ei:
        disk.flush()
    assert ei.value.errno == errno.EIO and not isinstance(ei.value, QcowError), repr(ei.value)
    assert fault.fired
    assert_failed_state(disk, plan, ei.value, mirror, path, tmp_path, (0, 256 * 1024))


def test_data_write_eio(tmp_path: Path) -> None:
    """Bug: a guest-data write that failed with EIO left the image writable; the next write_at and
    flush() succeeded as if nothing happened. Now: EIO to the caller, then the failed state."""
    plan = FaultPlan()
    path, disk, mirror = _setup_flushed(tmp_path, plan)
    data = seeded(131072, 4)
    fault = plan.arm("write", errno.EIO, matches=lambda op: op.data[:64] in data)  # the guest data itself
    mirror.write(4 * MiB, data)
    with pytest.raises(OSError, match=EIO_RE) as ei:
        disk.write_at(4 * MiB, data)
    assert ei.value.errno == errno.EIO and fault.fired, repr(ei.value)
    assert_failed_state(disk, plan, ei.value, mirror, path, tmp_path, (0, 256 * 1024))


def test_zero_alloc_eio_in_an_allocating_write(tmp_path: Path) -> None:
    """The fallocate(ZERO_RANGE) that allocates a new cluster's copy-on-write parts (QEMU's
    handle_alloc_space) fails with EIO: the caller gets it, then the failed state, as for any
    host write."""
    plan = FaultPlan()
    path, disk, mirror = _setup_flushed(tmp_path, plan)
    fault = plan.arm("zero", errno.EIO)
    data = seeded(4096, 6)
    mirror.write(12 * MiB + 8192, data)
    with pytest.raises(OSError, match=EIO_RE) as ei:
        disk.write_at(12 * MiB + 8192, data)  # 4 KiB into a new 64 KiB cluster
    assert ei.value.errno == errno.EIO and fault.fired, repr(ei.value)
    assert_failed_state(disk, plan, ei.value, mirror, path, tmp_path, (0, 256 * 1024))


def test_metadata_write_eio(tmp_path: Path) -> None:
    """Bug: a metadata write (refcount block / L2 table, issued by flush) that failed with EIO was
    retried by the next flush() as if the host were fine. Now: EIO, then the failed state."""
    plan = FaultPlan()
    path, disk, mirror = _setup_flushed(tmp_path, plan)
    data = seeded(300_000, 5)
    fault = plan.arm("write", errno.EIO, matches=lambda op: op.data[:64] not in data)
    # allocating: new refcounts and an L2 entry to write (today they are written by the flush)
    with pytest.raises(OSError, match=EIO_RE) as ei:
        call_then_flush(disk, lambda: write(disk, mirror, 20 * MiB, data))
    assert ei.value.errno == errno.EIO and fault.fired, repr(ei.value)
    assert_failed_state(disk, plan, ei.value, mirror, path, tmp_path, (0, 256 * 1024))


def test_punch_error_in_flush(tmp_path: Path) -> None:
    """Bug: handing freed space back (fallocate PUNCH_HOLE, done by flush() after a punch_hole)
    failing with EIO was not remembered; the next flush() succeeded. Now: EIO, then the failed
    state. (Assumes freed clusters are still handed back to the host.)"""
    plan = FaultPlan()
    path, disk, mirror = _setup_flushed(tmp_path, plan)
    fault = plan.arm("punch", errno.EIO)
    mirror.zero(8 * MiB, 65536)
    # frees a cluster: its space is handed back (today that happens in the flush)
    with pytest.raises(OSError, match=EIO_RE) as ei:
        call_then_flush(disk, lambda: disk.punch_hole(8 * MiB, 65536))
    assert ei.value.errno == errno.EIO and fault.fired, repr(ei.value)
    assert_failed_state(disk, plan, ei.value, mirror, path, tmp_path, (0, 256 * 1024))


@pytest.mark.parametrize("call", ["write_zeroes", "punch_hole"])
def test_zeroing_write_eio(tmp_path: Path, call: str) -> None:
    """Bug: write_zeroes / punch_hole of part of a cluster (which writes zero bytes to the host)
    failing with EIO left the image writable. Now: EIO from that call, then the failed state."""
    plan = FaultPlan()
    path, disk, mirror = _setup_flushed(tmp_path, plan)
    fault = plan.arm("write", errno.EIO)
    mirror.zero(8 * MiB + 1000, 3000)
    with pytest.raises(OSError, match=EIO_RE) as ei:
        call_then_flush(disk, lambda: getattr(disk, call)(8 * MiB + 1000, 3000))
    assert ei.value.errno == errno.EIO and fault.fired, repr(ei.value)
    assert_failed_state(disk, plan, ei.value, mirror, path, tmp_path, (0, 256 * 1024))


def test_fsync_eio_in_close(tmp_path: Path) -> None:
    """close() whose final fsync fails: EIO reaches the caller, `failure` is set, descriptors and the
    lock are released anyway, and a second close() is a silent no-op."""
    plan = FaultPlan()
    path, disk, mirror = _setup_flushed(tmp_path, plan)
    write(disk, mirror, 12 * MiB, seeded(70_000, 6))
    plan.arm("fsync", errno.EIO)
    with pytest.raises(OSError, match=EIO_RE) as ei:
        disk.close()
    assert ei.value.errno == errno.EIO and not isinstance(ei.value, QcowError), repr(ei.value)
    assert getattr(disk, "failure", None) is ei.value, "disk.failure is not the error close() raised"
    assert not plan.open_hosts() and not fds_open_on(path), "close() that failed left descriptors open"
    mark = plan.mark()
    disk.close()
    assert not plan.mutations_since(mark), "second close() touched the host"
    assert_no_corruption_json(path)
    bad = mirror.mismatches(to_raw(path, str(tmp_path / "after.raw")))
    assert not bad, "\n".join(bad)
    assert qemu_io_can_write(path).returncode == 0, "lock not released by a close() that failed"


def test_with_block_keeps_the_host_error(tmp_path: Path) -> None:
    """Bug: on a disk that keeps failing, leaving `with` by the write's OSError ran close(), whose
    flush failed again and replaced the original exception. The caller must see the first one."""
    plan = FaultPlan()
    path, disk, _mirror = _setup_flushed(tmp_path, plan)
    disk.close()
    fault = plan.arm("write", errno.EIO, persistent=True)
    with pytest.raises(OSError, match=EIO_RE) as ei:
        with QcowFile.open(path, host_factory=plan.factory()) as disk:
            disk.write_at(30 * MiB, seeded(65536, 7))
    assert ei.value is fault.raised[0], (
        f"the with block raised {ei.value!r} (from close()), not the write's own error {fault.raised[0]!r}")
    assert not plan.open_hosts() and not fds_open_on(path)


def test_with_block_keeps_the_callers_exception(tmp_path: Path) -> None:
    """Bug: a caller's own exception leaving `with` after a host failure was replaced by the error
    from close(). close() must not mask it (it still releases everything)."""
    plan = FaultPlan()
    path, disk, _mirror = _setup_flushed(tmp_path, plan)
    disk.close()
    plan.arm("write", errno.EIO, persistent=True)

    class Mine(Exception):
        pass

    def fail_then_raise_mine() -> None:
        with QcowFile.open(path, host_factory=plan.factory()) as disk:
            with pytest.raises(OSError, match=EIO_RE):
                disk.write_at(30 * MiB, seeded(65536, 8))
            raise Mine()

    with pytest.raises(Mine):
        fail_then_raise_mine()
    assert not plan.open_hosts() and not fds_open_on(path)


# --------------------------------------------------------------------------------------------
# 2. A full file system: ENOSPC, then keep writing, flushing, closing

def fill_until_error(disk: QcowFile, mirror: Mirror, seed: int, max_ops: int = 5000) -> tuple[OSError, str]:
    """Seeded writes (allocating, unaligned, in-place), a few zeroings, a flush every 3 ops, all
    above 1 MiB, until a host error reaches us. Returns (error, the call that raised it)."""
    rng = random.Random(seed)
    cs = disk.cluster_size
    size = disk.virtual_size
    written: list[tuple[int, int]] = []
    for i in range(max_ops):
        r = rng.random()
        call = "write_at"
        try:
            if r < 0.55:
                n = rng.choice([cs, 2 * cs, 5 * cs, 64 * 1024, 200 * 1024])
                off = rng.randrange(MiB // cs, (size - n) // cs) * cs
                write(disk, mirror, off, seeded(n, rng.random()))
                written.append((off, n))
            elif r < 0.8:
                n = rng.randrange(1, 9000)
                off = rng.randrange(MiB, size - n)
                write(disk, mirror, off, seeded(n, rng.random()))
            elif r < 0.9 and written:
                off, n = rng.choice(written)  # in place: needs no new space
                write(disk, mirror, off, seeded(n, rng.random()))
            else:
                call = "write_zeroes"
                n = rng.randrange(1, 3 * cs)
                off = rng.randrange(MiB, size - n)
                mirror.zero(off, n)
                disk.write_zeroes(off, n)
            if i % 3 == 2:
                call = "flush"
                flush(disk, mirror)
        except OSError as e:
            return e, call
    pytest.fail(f"no host error after {max_ops} operations: the file system never filled up")


def _after_enospc(disk: QcowFile, plan: FaultPlan, first: OSError, mirror: Mirror, path: str,
                  tmp_path: Path, before_lock_probe=None) -> None:
    assert first.errno == errno.ENOSPC and not isinstance(first, QcowError), repr(first)
    # An overwrite in place needs no new space: today it "succeeds" after the ENOSPC.
    mark = plan.mark()
    expect_image_failed("write_at() in place", lambda: disk.write_at(0, b"\x77" * 4096), first)
    expect_image_failed("write_at() allocating", lambda: disk.write_at(disk.virtual_size - MiB, b"\x78" * 65536), first)
    assert not plan.mutations_since(mark), "refused writes still reached the host"
    assert_failed_state(disk, plan, first, mirror, path, tmp_path, (0, 65536), before_lock_probe)


@pytest.mark.parametrize("cluster_size", [65536, 4096])
def test_enospc_on_a_full_tmpfs(small_tmpfs, tmp_path: Path, cluster_size: int) -> None:
    """Bug: after ENOSPC on a real (full) file system, in-place writes and flushes went on
    "succeeding" and close() tried to write metadata again. Now the ENOSPC reaches the caller, every
    later write/zeroing/flush raises ImageFailedError, close() writes nothing and raises, the image
    checks free of corruption, and all data covered by a returned flush reads back via qemu-img."""
    mnt, grow = small_tmpfs
    plan = FaultPlan()  # records only: the failures are the file system's own
    path = str(mnt / "disk.qcow2")
    disk = QcowFile.create(path, 64 * MiB, cluster_size=cluster_size, host_factory=plan.factory())
    mirror = Mirror(disk.virtual_size)
    write(disk, mirror, 0, seeded(65536, 10))
    flush(disk, mirror)
    first, _call = fill_until_error(disk, mirror, seed=cluster_size)
    _after_enospc(disk, plan, first, mirror, path, tmp_path, before_lock_probe=grow)


@pytest.mark.parametrize("budget", [0, 4096 + 100, 150_000, 700_000, 1_500_000])
def test_enospc_at_the_seam(tmp_path: Path, budget: int) -> None:
    """The same at the HostFile seam: the image file cannot grow past its size + `budget` (the part of
    a write that fits lands, then ENOSPC, for good), so the error hits at different points of the
    workload (guest data writes, copy-on-write zeroing). Same expectations as on the real tmpfs."""
    plan = FaultPlan()
    path, disk = new_image(tmp_path, plan, cluster_size=4096)
    mirror = Mirror(disk.virtual_size)
    write(disk, mirror, 0, seeded(65536, 11))
    flush(disk, mirror)
    plan.limit_size(path, os.path.getsize(path) + budget)
    first, _call = fill_until_error(disk, mirror, seed=budget)
    _after_enospc(disk, plan, first, mirror, path, tmp_path)


def test_enospc_in_flush_at_the_seam(tmp_path: Path) -> None:
    """ENOSPC on the metadata writes of a flush (thin storage running out while data had fit):
    flush() raises it, then the failed state as above."""
    plan = FaultPlan()
    path, disk = new_image(tmp_path, plan, cluster_size=4096)
    mirror = Mirror(disk.virtual_size)
    write(disk, mirror, 0, seeded(65536, 12))
    flush(disk, mirror)
    data = seeded(3 * MiB, 13)
    write(disk, mirror, 5 * MiB, data)
    plan.arm("write", errno.ENOSPC, persistent=True)
    with pytest.raises(OSError, match=ENOSPC_RE) as ei:
        disk.flush()
    _after_enospc(disk, plan, ei.value, mirror, path, tmp_path)


# --------------------------------------------------------------------------------------------
# 3. A short write followed by EIO, at every host write of a metadata-heavy workload

@dataclass(frozen=True)
class TornWorkload:
    """Guest ops on a 512-byte-cluster image whose first refcount table is nearly full, so that
    the workload allocates L2 tables and refcount blocks and moves the refcount table."""

    name: str
    seed: int
    count: int
    refcount_bits: int = 64
    lazy: bool = False
    virtual_size: int = 8 * MiB
    cluster_size: int = 512


TORN = [TornWorkload("c512-rb64", seed=2, count=40)]
TORN_SLOW = [TornWorkload("c512-rb64-long", seed=3, count=120),
             TornWorkload("c512-rb16", seed=4, count=80, refcount_bits=16),
             TornWorkload("c512-lazy", seed=5, count=60, lazy=True),
             TornWorkload("c4k-rb8", seed=6, count=80, refcount_bits=8, cluster_size=4096, virtual_size=32 * MiB)]


def torn_ops(wl: TornWorkload) -> list[tuple]:
    """Seeded writes (small and large, unaligned, across L2 tables), zeroings, punches, flushes;
    ends with flush and close."""
    rng = random.Random(wl.seed)
    vs = wl.virtual_size
    ops: list[tuple] = []
    for _ in range(wl.count):
        r = rng.random()
        if r < 0.5:
            n = rng.choice([512, 700, 1024, 4096, 8192, 40000, 65536])
            ops.append(("write", rng.randrange(0, vs - n), n, rng.randrange(1 << 30)))
        elif r < 0.65:
            n = rng.randrange(1, 20000)
            ops.append(("zero", rng.randrange(0, vs - n), n))
        elif r < 0.75:
            n = rng.randrange(1, 20000)
            ops.append(("punch", rng.randrange(0, vs - n), n))
        else:
            ops.append(("flush",))
    return [*ops, ("flush",), ("close",)]


def build_torn_base(wl: TornWorkload, path: str) -> bytes:
    """The starting image (closed, clean): data every other 16 KiB until the host file is 40 KiB
    short of what the first refcount table can describe. Returns its guest content."""
    guest = bytearray(wl.virtual_size)
    cs = wl.cluster_size
    reach = (cs // 8) * (cs * 8 // wl.refcount_bits) * cs  # reftable entries * clusters per block * cs
    rng = random.Random(wl.seed * 7919)
    with QcowFile.create(path, wl.virtual_size, cluster_size=cs, refcount_bits=wl.refcount_bits,
                         lazy_refcounts=wl.lazy) as disk:
        pos = 0
        while os.path.getsize(path) < min(reach, wl.virtual_size // 2) - 40 * 1024 and pos + 16384 <= wl.virtual_size:
            data = rng.randbytes(16384)
            disk.write_at(pos, data)
            guest[pos:pos + 16384] = data
            pos += 32768
            disk.flush()
    assert_no_corruption_json(path)
    return bytes(guest)


def run_guest_ops(disk: QcowFile, mirror: Mirror, ops: list[tuple]) -> tuple[OSError | None, bool]:
    """Run `ops` until the first OSError; returns (that error or None, whether close() was called)."""
    for op in ops:
        try:
            if op[0] == "write":
                write(disk, mirror, op[1], random.Random(op[3]).randbytes(op[2]))
            elif op[0] == "zero":
                mirror.zero(op[1], op[2])
                disk.write_zeroes(op[1], op[2])
            elif op[0] == "punch":
                mirror.zero(op[1], op[2])
                disk.punch_hole(op[1], op[2])
            elif op[0] == "flush":
                flush(disk, mirror)
            else:
                disk.close()
                mirror.flush_returned()
                return None, True
        except OSError as e:
            return e, op[0] == "close"
    return None, False


def count_host_writes(wl: TornWorkload, base: str, workdir: Path) -> int:
    path = str(workdir / "count.qcow2")
    shutil.copyfile(base, path)
    plan = FaultPlan()
    disk = QcowFile.open(path, host_factory=plan.factory())
    err, _ = run_guest_ops(disk, Mirror(wl.virtual_size), torn_ops(wl))
    assert err is None
    os.unlink(path)
    return plan.count("write")


def torn_write_case(wl: TornWorkload, base: str, guest: bytes, k: int, workdir: Path) -> list[str]:
    """Tear host write #k (a prefix cut at an 8-byte boundary lands, then EIO); problems found."""
    path = str(workdir / "torn.qcow2")
    shutil.copyfile(base, path)
    plan = FaultPlan()
    fault = plan.arm("write", errno.EIO, nth=k, prefix=half_at_8, kills_host=True)
    mirror = Mirror(wl.virtual_size)
    mirror.current[:] = guest
    mirror.flush_returned()
    disk = QcowFile.open(path, host_factory=plan.factory())
    err, closed = run_guest_ops(disk, mirror, torn_ops(wl))
    assert fault.fired, f"host write #{k} never happened"
    torn = next(op for op in plan.ops if op.error is not None)
    where = f"write #{k} {torn.describe()}"
    problems: list[str] = []
    if err is None:
        problems.append(f"{where}: the EIO never reached the caller")
    elif err.errno != errno.EIO:
        problems.append(f"{where}: the caller got {err!r}, not EIO")
    if not closed:
        mark = plan.mark()
        try:
            disk.close()
        except ImageFailedError:
            pass
        except BaseException as e:  # noqa: BLE001
            problems.append(f"{where}: close() raised {type(e).__name__}(errno {getattr(e, 'errno', None)}), "
                            f"expected ImageFailedError")
        else:
            problems.append(f"{where}: close() returned normally after the failure")
        later = plan.mutations_since(mark)
        if later:
            problems.append(f"{where}: close() issued {len(later)} host ops after the failure, "
                            f"e.g. {later[0].describe()}")
    if ip.read_header_field(path, "incompatible_features") & 1:
        if not wl.lazy:
            problems.append(f"{where}: the image was left dirty without lazy refcounts")
        # Lazy refcounts: a dirty image's counts are rebuilt by whoever opens it read-write next
        # (QEMU does so on open); only what survives that repair counts as corruption.
        qemu_img("check", "-q", "-r", "all", path, check=False)
    r = check(path)
    if r["returncode"] not in (0, 3) or r.get("corruptions", 0) or r.get("check-errors", 0):
        problems.append(f"{where}: qemu-img check: corruptions={r.get('corruptions')} "
                        f"check-errors={r.get('check-errors')} rc={r['returncode']}")
    else:
        bad = mirror.mismatches(to_raw(path, str(workdir / "torn.raw")), limit=2)
        problems += [f"{where}: {b}" for b in bad]
    return problems


def sweep_torn_writes(wl: TornWorkload, tmp_path: Path) -> None:
    base = str(tmp_path / "base.qcow2")
    guest = build_torn_base(wl, base)
    n = count_host_writes(wl, base, tmp_path)
    problems: list[str] = []
    failing = 0
    for k in range(n):
        found = torn_write_case(wl, base, guest, k, tmp_path)
        failing += bool(found)
        problems += found
    assert not problems, (f"{wl.name}: {failing} of {n} torn host writes broke the contract:\n"
                          + "\n".join(problems[:25]))


@pytest.mark.parametrize("wl", TORN, ids=[w.name for w in TORN])
def test_short_write_then_eio_at_every_write(tmp_path: Path, wl: TornWorkload) -> None:
    """Bug: after a short write + EIO in the middle of a metadata update, the engine went on (its
    close() flushed again), and a torn header/table write could leave the image corrupt. For every
    host write #k of the workload, the k-th lands only half (cut at an 8-byte boundary) and raises
    EIO: the caller gets EIO, close() raises ImageFailedError without touching the host, qemu-img
    check finds no corruption (leaks allowed) and everything a returned flush covered reads back."""
    sweep_torn_writes(wl, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("wl", TORN_SLOW, ids=[w.name for w in TORN_SLOW])
def test_short_write_then_eio_at_every_write_long(tmp_path: Path, wl: TornWorkload) -> None:
    """The torn-write sweep over longer workloads, other refcount widths, lazy refcounts, 4 KiB clusters."""
    sweep_torn_writes(wl, tmp_path)


# --------------------------------------------------------------------------------------------
# 4. A host write that returns 0 bytes

_ZERO_WRITE_CHILD = r"""
import errno, json, os, sys
from qcowdisk import QcowFile
path, where = sys.argv[1], sys.argv[2]
disk = QcowFile.open(path)
disk.write_at(0, b"a" * 65536)
disk.flush()
data = b"b" * 65536
if where == "flush":
    disk.write_at(1 << 20, data)  # allocating: flush() has refcounts and an L2 entry to write
calls = [0]
def zero(*args):
    calls[0] += 1
    return 0
real = os.pwritev, os.pwrite, os.write
os.pwritev = os.pwrite = os.write = zero  # os.pwritev is what qcowdisk.hostio calls today
result = {}
try:
    if where == "write_at":
        disk.write_at(2 << 20, data)
    else:
        disk.flush()
    result["outcome"] = "returned"
except OSError as e:
    result["outcome"] = "OSError"
    result["errno"] = e.errno
except BaseException as e:
    result["outcome"] = type(e).__name__ + ": " + str(e)
os.pwritev, os.pwrite, os.write = real
result["calls"] = calls[0]
try:  # the host works again, but the image must stay failed
    disk.flush()
    result["then"] = "flush returned"
except BaseException as e:
    result["then"] = type(e).__name__
print(json.dumps(result), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("where", ["write_at", "flush"])
def test_write_returning_zero_is_eio(tmp_path: Path, where: str) -> None:
    """Bug: HostFile.pwritev looped forever (holding the image lock) when the OS write returned 0.
    With os.pwritev patched to return 0 (in a child process, under a timeout, so a hang cannot stall
    the suite), write_at / flush must raise OSError(EIO) promptly, after a bounded number of tries."""
    path = str(tmp_path / "disk.qcow2")
    QcowFile.create(path, 64 * MiB).close()
    try:
        p = subprocess.run([sys.executable, "-c", _ZERO_WRITE_CHILD, path, where], capture_output=True,
                           text=True, timeout=10, env=child_env(), check=False)
    except subprocess.TimeoutExpired:
        p = None
    if p is None:
        pytest.fail(f"{where}: a host write returning 0 bytes made the call hang (child killed after 10 s)",
                    pytrace=False)
    assert p.returncode == 0, f"child failed: {p.stdout}{p.stderr}"
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "OSError" and result["errno"] == errno.EIO, (
        f"{where} with 0-byte host writes: {result}, expected OSError(EIO)")
    assert result["calls"] < 100, f"{where}: {result['calls']} write attempts before giving up"
    assert result["then"] == "ImageFailedError", f"flush() after the 0-byte write's EIO: {result['then']}"


# --------------------------------------------------------------------------------------------
# 5. fork(): the child's close must not flush, write metadata or unlock the parent's image

_FORK_SCENARIO = r"""
import json, os, random, sys
from qcowdisk import QcowFile
from qcowdisk.hostio import HostFile
path, variant, dirty_at_fork, logpath = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
PLAN = json.loads(sys.argv[5])
logfd = os.open(logpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

class LogHost(HostFile):
    # Logs every mutating host op with the pid that issued it.
    def _log(self, what):
        try:
            os.write(logfd, f"{os.getpid()} {what}\n".encode())
        except Exception:
            pass
    def pwrite(self, data, offset):
        self.pwritev([data], offset)
    def pwritev(self, buffers, offset):
        self._log(f"write {offset:#x}")
        HostFile.pwritev(self, buffers, offset)
    def fsync(self):
        self._log("fsync")
        HostFile.fsync(self)
    def truncate(self, length):
        self._log("truncate")
        HostFile.truncate(self, length)
    def punch_hole(self, offset, length):
        self._log("punch")
        return HostFile.punch_hole(self, offset, length)

def do(step):
    off, n, seed = step
    disk.write_at(off, random.Random(seed).randbytes(n))

disk = QcowFile.open(path, host_factory=LogHost)
for step in PLAN["before"]:
    do(step)
disk.flush()
if dirty_at_fork:
    for step in PLAN["dirty"]:
        do(step)
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(go_w)
    os.read(go_r, 1)  # the parent has written and flushed more by now
    if variant == "close":
        try:
            disk.close()
        except BaseException:
            pass
        os._exit(0)
    if variant == "with":
        try:
            with disk:
                pass
        except BaseException:
            pass
        os._exit(0)
    sys.exit(0)  # variant "exit": a real interpreter exit with the image object alive
os.close(go_r)
report = {"child": pid}
if not dirty_at_fork:
    for step in PLAN["dirty"]:
        do(step)
for step in PLAN["after_fork"]:
    do(step)
disk.flush()
os.write(go_w, b"g")
os.close(go_w)
_, status = os.waitpid(pid, 0)
report["child_status"] = status
for step in PLAN["after_child"]:
    do(step)
disk.flush()
import subprocess
p = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 512", path], capture_output=True, text=True)
report["probe_rc"] = p.returncode
report["probe_out"] = (p.stdout + p.stderr)[-400:]
disk.close()
print(json.dumps(report), flush=True)
"""

FORK_PLAN = {
    # (guest offset, length, seed); 64 KiB clusters: one L2 table maps all of this
    "before": [(1 * MiB, 256 * 1024, 1), (40 * MiB, 65536, 2)],
    "dirty": [(4 * MiB, 200 * 1024, 3)],                     # L2 entries 64..67, sector 1
    "after_fork": [(4 * MiB + 512 * 1024, 128 * 1024, 4),    # L2 entries 72..73, same sector
                   (20 * MiB, 65536, 5)],
    "after_child": [(30 * MiB, 65536, 6), (1 * MiB + 4096, 4096, 7)],
}


@pytest.mark.parametrize("dirty_at_fork", [False, True], ids=["clean-at-fork", "dirty-at-fork"])
@pytest.mark.parametrize("variant", ["close", "with", "exit"])
def test_fork_child_leaves_the_parents_image_alone(tmp_path: Path, variant: str, dirty_at_fork: bool) -> None:
    """Bug: a forked child that closed its copy of the image (close(), leaving `with`, or just
    exiting with the object alive) unlocked the parent's OFD lock bytes (shared across fork) and
    flushed its stale copy of the metadata over the parent's newer one. Now the child issues no
    host write/fsync/truncate/punch, the parent's lock holds (qemu-io cannot write while the parent
    has the image open), and everything the parent flushed reads back from a clean image."""
    path = str(tmp_path / "disk.qcow2")
    QcowFile.create(path, 64 * MiB).close()
    log = tmp_path / "ops.log"
    try:
        p = subprocess.run([sys.executable, "-c", _FORK_SCENARIO, path, variant, "1" if dirty_at_fork else "0",
                            str(log), json.dumps(FORK_PLAN)], capture_output=True, text=True, timeout=60,
                           env=child_env(), check=False)
    except subprocess.TimeoutExpired:
        p = None
    if p is None:
        pytest.fail("fork scenario hung (killed after 60 s)", pytrace=False)
    assert p.returncode == 0, f"fork scenario failed: {p.stdout}{p.stderr}"
    report = json.loads(p.stdout.strip().splitlines()[-1])
    problems = []
    child_ops = [line.split(" ", 1)[1] for line in log.read_text().splitlines()
                 if line.split(" ", 1)[0] == str(report["child"])]
    if child_ops:
        problems.append(f"the child issued {len(child_ops)} host ops on the parent's image: {child_ops[:6]}")
    if report["probe_rc"] == 0:
        problems.append("qemu-io could write while the parent still had the image open: the child "
                        "released the parent's lock")
    r = check(path)
    if r["returncode"] != 0 or r.get("corruptions", 0) or r.get("leaks", 0) or r.get("check-errors", 0):
        problems.append(f"qemu-img check: {r}")
    guest = bytearray(64 * MiB)
    for step in FORK_PLAN["before"] + FORK_PLAN["dirty"] + FORK_PLAN["after_fork"] + FORK_PLAN["after_child"]:
        off, n, seed = step
        guest[off:off + n] = random.Random(seed).randbytes(n)
    if report["probe_rc"] == 0:
        guest[0:512] = b"\xcd" * 512  # qemu-io's default write pattern
    raw = to_raw(path, str(tmp_path / "out.raw"))
    for step in FORK_PLAN["before"] + FORK_PLAN["dirty"] + FORK_PLAN["after_fork"] + FORK_PLAN["after_child"]:
        off, n, _ = step
        if raw[off:off + n] != guest[off:off + n]:
            problems.append(f"data the parent flushed at guest {off:#x}+{n:#x} does not read back")
    assert raw == bytes(guest) or any("read back" in x for x in problems), "guest view differs outside the written ranges"
    assert not problems, f"child {variant!r}:\n" + "\n".join(problems)


# --------------------------------------------------------------------------------------------
# 6. close() racing lock-free reads

READERS = 3


def _read_until_closed(disk: QcowFile, off: int, n: int, expected: bytes, stop: threading.Event,
                       running: threading.Event, seen: list[object]) -> None:
    """Reader thread: read_at until ValueError (closed) or `stop`; wrong bytes or other errors go to `seen`."""
    while True:
        running.set()
        try:
            data = disk.read_at(off, n)
        except ValueError:
            return
        except BaseException as e:  # noqa: BLE001
            seen.append(e)
            return
        if data != expected:
            seen.append(data)
            return
        if stop.is_set():
            return


def test_close_racing_reads_never_returns_foreign_bytes(tmp_path: Path) -> None:
    """Bug: read_at's lock-free fast path (read-only image, cached L2 table) kept using the image's
    descriptor number after close() in another thread; once that number was reused by a newly
    opened file, the reader returned that file's bytes (2,322 of 3,000 tries). Now a reader racing
    close() gets the image's bytes or ValueError -- never another file's bytes or EBADF."""
    raw = write_pattern(tmp_path / "src.raw", 2 * MiB, b"\x11")
    img = str(tmp_path / "ro.qcow2")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, img)  # every cluster allocated
    foreign = [write_pattern(tmp_path / f"other{i}.bin", 2 * MiB, b"\xee") for i in range(4)]
    off, n = 3 * 65536 + 100, 4096
    expected = b"\x11" * n
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    tries = 0
    foreign_reads = 0
    other: list[str] = []
    deadline = time.monotonic() + 10
    try:
        while tries < 3000 and time.monotonic() < deadline and foreign_reads + len(other) < 50:
            tries += 1
            disk = QcowFile.open(img, readonly=True)
            assert disk.read_at(off, n) == expected  # caches the L2 table: the fast path from now on
            stop = threading.Event()
            running = threading.Event()
            seen: list[object] = []

            threads = [threading.Thread(target=_read_until_closed, args=(disk, off, n, expected, stop, running, seen))
                       for _ in range(READERS)]
            for t in threads:
                t.start()
            running.wait()
            disk.close()
            fds = [os.open(f, os.O_RDONLY) for f in foreign]  # reuse the freed descriptor numbers
            stop.set()
            for t in threads:
                t.join(10)
            for fd in fds:
                os.close(fd)
            assert not any(t.is_alive() for t in threads), "reader thread stuck"
            for s in seen:
                if isinstance(s, bytes):
                    foreign_reads += 1
                else:
                    other.append(f"{type(s).__name__}: {s}")
    finally:
        sys.setswitchinterval(old_interval)
    assert not foreign_reads and not other, (
        f"{tries} tries: {foreign_reads} reads returned bytes that are not the image's "
        f"(another file reused the descriptor); other errors: {other[:5]}")


def write_pattern(path: Path, size: int, byte: bytes) -> str:
    path.write_bytes(byte * size)
    return str(path)


# --------------------------------------------------------------------------------------------
# 7. Dirty images whose tables point far past the end of the file (the refcount rebuild)

class _Hang(BaseException):
    pass


def open_rw_bounded(path: str, seconds: float = 5.0) -> BaseException | None:
    """Open read-write (and close) under a SIGALRM bound; returns the exception raised, if any."""
    import signal

    def on_alarm(signum, frame):
        raise _Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        QcowFile.open(path).close()
    except _Hang:
        pytest.fail(f"read-write open of {os.path.basename(path)} still running after {seconds} s", pytrace=False)
    except BaseException as e:  # noqa: BLE001
        return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return None


def dirty_lazy_image(tmp_path: Path, how: str) -> str:
    """A 64 MiB lazy-refcounts image (64 KiB clusters) with data at 0..1M and 10M..10M+64k, left
    dirty: by setting the dirty bit, or by SIGKILLing a qemu-io writer."""
    from imagefactory import kill_writer
    path = create(str(tmp_path / "dirty.qcow2"), "64M", options="lazy_refcounts=on")
    cmds = ("write -P 0x11 0 1M", "write -P 0x22 10M 64k")
    if how == "bit":
        qemu_io(path, *cmds)
        ip.set_header_bits(path, "incompatible_features", 1)
    else:
        kill_writer(path, *cmds)
    assert ip.read_header_field(path, "incompatible_features") & 1, "image is not dirty"
    return path


FAR = {
    # name: (where, value written, offending host offset)
    "l2-data-2^48": ("l2", (1 << 48) - 65536 | (1 << 63), (1 << 48) - 65536),
    "l2-data-2^56": ("l2", (1 << 56) - 65536 | (1 << 63), (1 << 56) - 65536),
    "l1-table-2^48": ("l1", (1 << 48) - 65536 | (1 << 63), (1 << 48) - 65536),
    "refblock-2^48": ("reftable", (1 << 48) - 65536, (1 << 48) - 65536),
    "refblock-2^63-": ("reftable", (1 << 63) - 65536, (1 << 63) - 65536),
    "refblock-2^63": ("reftable", 1 << 63, 1 << 63),
    "refblock-2^64-": ("reftable", (1 << 64) - 65536, (1 << 64) - 65536),
}


@pytest.mark.parametrize("how", ["bit", "killed"])
@pytest.mark.parametrize("case", list(FAR))
def test_dirty_image_with_far_pointer_refused_at_once(tmp_path: Path, case: str, how: str) -> None:
    """Bug: the refcount rebuild of a dirty image counted up to the largest cluster any table named,
    so an entry pointing near 2^48 or 2^56 made read-write open run for hours, and a refcount block
    pointer at or near 2^63 escaped as OverflowError / OSError(EINVAL). The rebuild is bounded by the
    file size: read-write open raises CorruptImageError at once, naming the offset."""
    path = dirty_lazy_image(tmp_path, how)
    where, value, offset = FAR[case]
    if where == "l2":
        ip.patch_u64(path, ip.l2_entry_offset(path, 10 * MiB), value)
    elif where == "l1":
        ip.patch_u64(path, ip.l1_entry_offset(path, 0), value)
    else:
        ip.patch_u64(path, ip.refcount_table_entry_offset(path, 1), value)
    err = open_rw_bounded(path)  # fails the test if still running after 5 s
    assert isinstance(err, CorruptImageError), f"read-write open of a dirty image with {case}: {err!r}"
    msg = str(err).lower()
    assert f"{offset:#x}" in msg or str(offset) in msg, f"message {str(err)!r} does not name the offset {offset:#x}"


def _open_cost(path: str) -> tuple[float, int]:
    """(best wall time of two read-write opens, tracemalloc peak of a third)."""
    times = []
    for _ in range(2):
        t = time.perf_counter()
        disk = QcowFile.open(path)
        times.append(time.perf_counter() - t)
        disk.close()
        ip.set_header_bits(path, "incompatible_features", dirty_bit_of[path])  # close() cleared it
    tracemalloc.start()
    try:
        disk = QcowFile.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    disk.close()
    return min(times), peak


dirty_bit_of: dict[str, int] = {}


def test_dirty_rebuild_cost_follows_metadata_not_virtual_size(tmp_path: Path) -> None:
    """Bug: rebuilding the refcounts of a dirty image copied the whole L1 table into a list and
    walked every entry in Python, so a nearly empty image claiming a huge virtual size (here 256 TiB,
    512 Ki L1 entries) paid per L1 entry (+4 MiB here; 2.8 s and 330 MiB reported for bigger ones).
    The rebuild must cost what its metadata costs: a read-write open of the dirty image may take at
    most a little more memory (tracemalloc peak) and time than a read-write open of it clean."""
    clean = create(str(tmp_path / "clean.qcow2"), str(1 << 48), options="lazy_refcounts=on")
    qemu_io(clean, "write -P 0x11 0 64k", "write -P 0x22 100G 64k", "write -P 0x33 200T 64k")
    dirty = str(tmp_path / "dirty.qcow2")
    shutil.copyfile(clean, dirty)
    dirty_bit_of.update({clean: 0, dirty: 1})
    ip.set_header_bits(dirty, "incompatible_features", 1)
    clean_time, clean_peak = _open_cost(clean)
    dirty_time, dirty_peak = _open_cost(dirty)
    assert dirty_peak <= clean_peak + MiB, (
        f"the rebuild raised the open's tracemalloc peak from {clean_peak / MiB:.1f} MiB (clean) "
        f"to {dirty_peak / MiB:.1f} MiB (dirty)")
    assert dirty_time <= 2 * clean_time + 0.25, f"dirty open took {dirty_time:.2f} s, clean open {clean_time:.2f} s"
    assert_no_corruption_json(dirty)
    with QcowFile.open(dirty, readonly=True) as disk:
        assert disk.read_at(200 << 40, 65536) == b"\x33" * 65536


# --------------------------------------------------------------------------------------------
# 8. Names with NUL bytes (data file, backing file): cut at the first NUL, as QEMU reads C strings

def _data_file_image(tmp_path: Path) -> tuple[str, str]:
    """An image with an external data file, named by its absolute path (QEMU 7.2 resolves a
    relative data-file name against its cwd, qcowdisk against the image's directory)."""
    data = str(tmp_path / "data.raw")
    path = create(str(tmp_path / "d.qcow2"), "1M", options=f"data_file={data}")
    qemu_io(path, "write -P 0x55 0 64k")
    return path, data


def _set_data_file_name(path: str, name: bytes) -> None:
    exts = [(e.ext_type, name if e.ext_type == ip.EXT_DATA_FILE else e.data) for e in ip.read_header(path).extensions]
    ip.rewrite_extensions(path, exts)


def _qemu_data_file(path: str) -> str | None:
    return info(path).get("format-specific", {}).get("data", {}).get("data-file")


@pytest.mark.parametrize("tail", [b"\0junk", b"\0\0\0"], ids=["nul-junk", "trailing-nuls"])
def test_data_file_name_with_nul_is_cut(tmp_path: Path, tail: bytes) -> None:
    """Bug: a data-file name (header extension 0x44415441) containing a NUL reached os.open and
    escaped as a bare ValueError ("embedded null byte"). QEMU reads it as a C string; so do we."""
    path, data = _data_file_image(tmp_path)
    _set_data_file_name(path, data.encode() + tail)
    assert _qemu_data_file(path) == data
    want = to_raw(path, str(tmp_path / "q.raw"))
    assert want[:65536] == b"\x55" * 65536
    for readonly in (True, False):
        with QcowFile.open(path, readonly=readonly) as disk:
            assert disk.header.data_file == data
            assert disk.read_at(0, len(want)) == want


def test_data_file_name_starting_with_nul_is_refused(tmp_path: Path) -> None:
    """A data-file name that is empty once cut at its NUL: QEMU cannot open the image ('file' driver
    requires a file name); we refuse with a QcowError, not a bare ValueError."""
    path, data = _data_file_image(tmp_path)
    _set_data_file_name(path, b"\0" + data.encode())
    assert qemu_img("convert", "-O", "raw", path, str(tmp_path / "q.raw"), check=False).returncode != 0
    with pytest.raises(QcowError):
        QcowFile.open(path, readonly=True).close()


def _overlay(tmp_path: Path) -> str:
    base = create(str(tmp_path / "base.qcow2"), "1M")
    qemu_io(base, "write -P 0x44 0 64k")
    return create(str(tmp_path / "top.qcow2"), "1M", backing="base.qcow2", backing_fmt="qcow2")


@pytest.mark.parametrize("tail", [b"\0\0\0\0", b"\0junk"], ids=["trailing-nuls", "nul-junk"])
def test_backing_name_with_nul_is_cut(tmp_path: Path, tail: bytes) -> None:
    """Bug: a backing file name whose stored length covers NUL bytes after the name was refused
    ("backing file 'base.qcow2\\x00\\x00...' does not exist"); QEMU cuts it at the first NUL and
    reads through the backing file."""
    top = _overlay(tmp_path)
    h = ip.read_header(top)
    ip.patch_bytes(top, h.backing_file_offset + h.backing_file_size, tail)
    ip.patch_header_field(top, "backing_file_size", h.backing_file_size + len(tail))
    assert info(top).get("backing-filename") == "base.qcow2"
    want = to_raw(top, str(tmp_path / "q.raw"))
    assert want[:65536] == b"\x44" * 65536
    with QcowFile.open(top, readonly=True) as disk:
        assert disk.backing_file == "base.qcow2"
        assert disk.read_at(0, len(want)) == want


def test_backing_name_starting_with_nul_means_no_backing(tmp_path: Path) -> None:
    """A backing name that is empty once cut: QEMU opens the image without a backing file (reads
    zeros); we do the same instead of looking for a file named '\\x00ase.qcow2'."""
    top = _overlay(tmp_path)
    h = ip.read_header(top)
    ip.patch_bytes(top, h.backing_file_offset, b"\0")
    assert info(top).get("backing-filename") is None
    want = to_raw(top, str(tmp_path / "q.raw"))
    assert want == bytes(len(want))
    with QcowFile.open(top, readonly=True) as disk:
        assert not disk.backing_file
        assert disk.read_at(0, len(want)) == want


# --------------------------------------------------------------------------------------------
# 9. A virtual size that is not a multiple of 512

@pytest.mark.parametrize("delta", [-100, -1, 300])
def test_virtual_size_rounded_down_to_a_sector(tmp_path: Path, delta: int) -> None:
    """Bug: a header size that is not a multiple of 512 was used as is; QEMU rounds it down to a
    sector (bs->total_sectors = size / 512), so qcowdisk showed up to 511 guest bytes QEMU does not."""
    path = create(str(tmp_path / "s.qcow2"), "1M")
    qemu_io(path, "write -P 0x66 0 1M")
    ip.patch_header_field(path, "size", MiB + delta)
    want_size = info(path)["virtual-size"]
    assert want_size == (MiB + delta) // 512 * 512
    want = to_raw(path, str(tmp_path / "q.raw"))
    assert len(want) == want_size
    with QcowFile.open(path, readonly=True) as disk:
        assert disk.virtual_size == want_size
        assert disk.read_at(0, 2 * MiB) == want
        buf = bytearray(2 * MiB)
        assert disk.readinto_at(buf, 0) == want_size
    with QcowFile.open(path) as disk:
        assert disk.virtual_size == want_size
        with pytest.raises(ValueError, match="goes past the virtual size"):
            disk.write_at(want_size, b"x")
