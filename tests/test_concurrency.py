"""Thread safety and image locking.

Eight writer threads share one QcowFile, each owning a region of the disk (regions do not start
on cluster boundaries, so neighbours share clusters, L2 tables and refcount blocks) and keeping its
own mirror; reader threads read across everything at the same time. Afterwards QEMU checks the
image and compares it with the combined mirror.

Locking: a second read-write open of a held image (same process, another process, qemu-io) is
refused; after close it works.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qcowdisk import ImageLockedError, QcowFile
from qemutools import assert_clean, compare, create, qemu_io, run, to_raw, write_raw

KiB = 1024
MiB = 1024 * KiB

WRITERS = 8
READERS = 2


def _writer(disk: QcowFile, mirror: bytearray, start: int, end: int, cs: int, seed: int, ops: int,
            barrier: threading.Barrier, errors: list[BaseException]) -> None:
    """Random writes/zeroes/holes/reads inside [start, end); checks its own reads."""
    rng = random.Random(seed)
    try:
        barrier.wait()
        for i in range(ops):
            offset = rng.randrange(start, end)
            if rng.random() < 0.3:
                offset = max(start, offset // cs * cs)
            length = min(rng.choice([1, rng.randint(1, 900), cs, rng.randint(1, 3 * cs)]), end - offset)
            r = rng.random()
            if r < 0.5:
                data = rng.randbytes(length)
                assert disk.write_at(offset, data) == length
                mirror[offset:offset + length] = data
            elif r < 0.62:
                disk.write_zeroes(offset, length)
                mirror[offset:offset + length] = bytes(length)
            elif r < 0.74:
                disk.punch_hole(offset, length)
                mirror[offset:offset + length] = bytes(length)
            elif r < 0.97:
                got = disk.read_at(offset, length)
                if got != mirror[offset:offset + length]:
                    raise AssertionError(f"writer {seed}: op {i} read {offset:#x}+{length} differs from its mirror")
            else:
                disk.flush()
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        errors.append(e)


def _reader(disk: QcowFile, size: int, seed: int, stop: threading.Event, barrier: threading.Barrier,
            errors: list[BaseException], counter: list[int]) -> None:
    """Overlapping read-only traffic: reads anywhere while the writers work."""
    rng = random.Random(seed)
    try:
        barrier.wait()
        while not stop.is_set():
            offset = rng.randrange(size)
            length = rng.randint(1, 256 * KiB)
            got = disk.read_at(offset, length)
            if len(got) != min(length, size - offset):
                raise AssertionError(f"reader: read_at({offset:#x}, {length}) returned {len(got)} bytes")
            counter[0] += 1
    except BaseException as e:  # noqa: BLE001
        errors.append(e)


@pytest.mark.parametrize("cluster_size,backing", [(65536, False), (4096, True), (512, False)],
                         ids=["c64k", "c4k-rawbacking", "c512"])
def test_threads_on_disjoint_regions(tmp_path: Path, cluster_size: int, backing: bool) -> None:
    """8 writers on disjoint (unaligned) regions + 2 readers; then check clean and compare."""
    _threads_case(tmp_path, cluster_size, backing, 150 if cluster_size >= 4096 else 80, 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("cluster_size,backing", [(65536, False), (4096, True), (512, False), (16384, True)],
                         ids=["c64k", "c4k-rawbacking", "c512", "c16k-rawbacking"])
def test_threads_on_disjoint_regions_soak(tmp_path: Path, cluster_size: int, backing: bool, seed: int) -> None:
    """The same, longer and with more seeds."""
    _threads_case(tmp_path, cluster_size, backing, 1500, 100 * (seed + 1))


def _threads_case(tmp_path: Path, cluster_size: int, backing: bool, ops: int, seed_base: int) -> None:
    region = 2 * MiB + 4608  # not a multiple of any cluster size: neighbours share a cluster
    size = WRITERS * region + 512
    img = tmp_path / "t.qcow2"
    mirror = bytearray(size)
    if backing:
        base = bytes(random.Random(99).randbytes(size))
        write_raw(str(tmp_path / "base.raw"), base)
        mirror[:] = base
        disk = QcowFile.create(str(img), size, cluster_size=cluster_size, backing_file=str(tmp_path / "base.raw"),
                               backing_format="raw")
    else:
        disk = QcowFile.create(str(img), size, cluster_size=cluster_size)
    errors: list[BaseException] = []
    barrier = threading.Barrier(WRITERS + READERS)
    stop = threading.Event()
    reads = [0]
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so requests really interleave inside the engine
    try:
        _run_threads(disk, mirror, size, region, cluster_size, ops, seed_base, errors, barrier, stop, reads)
    finally:
        sys.setswitchinterval(old_interval)
    assert reads[0] > 0, "reader threads never ran"
    assert_clean(str(img))
    write_raw(str(tmp_path / "mirror.raw"), bytes(mirror))
    compare(str(img), str(tmp_path / "mirror.raw"), fmt_a="qcow2", fmt_b="raw")


def _run_threads(disk: QcowFile, mirror: bytearray, size: int, region: int, cluster_size: int, ops: int,
                 seed_base: int, errors: list[BaseException], barrier: threading.Barrier, stop: threading.Event,
                 reads: list[int]) -> None:
    """Start writers and readers on `disk`, wait, re-raise the first error, verify, close."""
    with disk:
        writers = [threading.Thread(target=_writer, args=(disk, mirror, i * region, (i + 1) * region, cluster_size,
                                                          seed_base + 1000 + i, ops, barrier, errors))
                   for i in range(WRITERS)]
        readers = [threading.Thread(target=_reader,
                                    args=(disk, size, seed_base + 2000 + i, stop, barrier, errors, reads))
                   for i in range(READERS)]
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join(timeout=300)
        stop.set()
        for t in readers:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in writers + readers), "a thread hung"
        if errors:
            raise errors[0]
        assert disk.read_at(0, size) == bytes(mirror), "combined image differs from the per-region mirrors"


# --------------------------------------------------------------------------- locking

_OPEN_IN_CHILD = r"""
import sys
from qcowdisk import ImageLockedError, QcowFile
try:
    QcowFile.open(sys.argv[1]).close()
except ImageLockedError as e:
    print("LOCKED:", e)
    sys.exit(3)
print("OPENED")
"""


def test_second_rw_open_same_process_refused(tmp_path: Path) -> None:
    """A second read-write QcowFile on a held image raises ImageLockedError saying 'locked'."""
    img = tmp_path / "l.qcow2"
    create(str(img), "1M")
    with QcowFile.open(str(img)) as disk:
        with pytest.raises(ImageLockedError) as ei:
            QcowFile.open(str(img))
        assert "locked" in str(ei.value).lower()
        disk.write_at(0, b"still mine")  # the refused open did not disturb the holder
    with QcowFile.open(str(img)) as disk:  # released on close
        assert disk.read_at(0, 10) == b"still mine"


def test_second_rw_open_from_subprocess_refused(tmp_path: Path) -> None:
    """Another process cannot open a held image read-write; after close it can."""
    img = tmp_path / "l.qcow2"
    create(str(img), "1M")
    with QcowFile.open(str(img)):
        p = subprocess.run([sys.executable, "-c", _OPEN_IN_CHILD, str(img)], capture_output=True, text=True, check=False)
        assert p.returncode == 3, f"child was not refused: rc={p.returncode} {p.stdout}{p.stderr}"
        assert "locked" in p.stdout.lower()
    p = subprocess.run([sys.executable, "-c", _OPEN_IN_CHILD, str(img)], capture_output=True, text=True, check=False)
    assert p.returncode == 0 and "OPENED" in p.stdout, p.stdout + p.stderr


def test_qemu_io_refused_while_held(tmp_path: Path) -> None:
    """qemu-io cannot write an image qcowdisk holds read-write; after close it can."""
    img = tmp_path / "q.qcow2"
    create(str(img), "1M")
    with QcowFile.open(str(img)) as disk:
        disk.write_at(0, b"\x01" * 512)
        p = run("qemu-io", "-f", "qcow2", "-c", "write -q -P 7 4096 512", str(img), check=False)
        out = (p.stdout + p.stderr).lower()
        assert p.returncode != 0 or "lock" in out, f"qemu-io wrote to an image qcowdisk holds: {out}"
        assert "lock" in out, out
    qemu_io(str(img), "write -q -P 7 4096 512")
    assert_clean(str(img))
    data = to_raw(str(img), str(tmp_path / "o.raw"))
    assert data[:512] == b"\x01" * 512 and data[4096:4608] == b"\x07" * 512
