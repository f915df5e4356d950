"""pytest-benchmark read cases: small (64 MiB) versions of run_benchmarks.py cases a) to c).

Each qcowdisk case has a plain host-I/O reference on the identical data (the raw file the qcow2
image was converted from) in the same benchmark group, so

    pytest benchmarks/ --benchmark-enable --benchmark-group-by=group

prints them side by side. The project's addopts carry --benchmark-disable (so the test suite
never spends time here); without --benchmark-enable every case just runs once, as a smoke test.
Set QCOWDISK_BENCH_SIZE (e.g. 256M) for a bigger image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from run_benchmarks import (
    SEQ_CHUNK,
    MiB,
    aligned_buffer,
    make_read_images,
    parse_size,
    seq_pread_raw,
    seq_preadv_raw,
    seq_read_qcow,
    seq_readinto_qcow,
    stride_offsets,
    stride_pread_raw,
    stride_read_qcow,
)

SIZE = parse_size(os.environ.get("QCOWDISK_BENCH_SIZE", "64M"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(qcow2, raw): a fully allocated 64 KiB-cluster qcow2 and the raw file it was converted from."""
    return make_read_images(str(tmp_path_factory.mktemp("bench-read")), SIZE)


@pytest.fixture(scope="module")
def raw_fd(images: tuple[str, str]) -> Iterator[int]:
    """Read-only descriptor on the raw reference file."""
    fd = os.open(images[1], os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.fixture(scope="module")
def disk(images: tuple[str, str], raw_fd: int) -> Iterator[Any]:
    """The qcow2 image opened read-only by qcowdisk, checked to read the same bytes as the raw file."""
    from qcowdisk import QcowFile

    d = QcowFile.open(images[0], readonly=True)
    try:
        # Timing a wrong answer is pointless: spot-check the data first.
        for off in (0, SIZE // 2, SIZE - MiB):
            assert d.read_at(off, MiB) == os.pread(raw_fd, MiB, off), f"qcowdisk data differs at {off}"
        yield d
    finally:
        d.close()


def _info(benchmark: Any, **kw: Any) -> None:
    benchmark.extra_info.update(size=SIZE, **kw)


# a) sequential 1 MiB readinto_at vs os.preadv into the same page-aligned buffer

@pytest.mark.benchmark(group="read a) seq 1M readinto")
def test_seq_readinto_qcowdisk(benchmark: Any, disk: Any) -> None:
    buf = aligned_buffer(SEQ_CHUNK)
    _info(benchmark, requests=SIZE // SEQ_CHUNK)
    benchmark(seq_readinto_qcow, disk, SIZE, buf)


@pytest.mark.benchmark(group="read a) seq 1M readinto")
def test_seq_preadv_raw(benchmark: Any, raw_fd: int) -> None:
    buf = aligned_buffer(SEQ_CHUNK)
    _info(benchmark, requests=SIZE // SEQ_CHUNK)
    benchmark(seq_preadv_raw, raw_fd, SIZE, buf)


# b) sequential 1 MiB read_at vs os.pread (both return new bytes objects)

@pytest.mark.benchmark(group="read b) seq 1M read")
def test_seq_read_at_qcowdisk(benchmark: Any, disk: Any) -> None:
    _info(benchmark, requests=SIZE // SEQ_CHUNK)
    benchmark(seq_read_qcow, disk, SIZE, SEQ_CHUNK)


@pytest.mark.benchmark(group="read b) seq 1M read")
def test_seq_pread_raw(benchmark: Any, raw_fd: int) -> None:
    _info(benchmark, requests=SIZE // SEQ_CHUNK)
    benchmark(seq_pread_raw, raw_fd, SIZE, SEQ_CHUNK)


# c) 4 KiB reads at a 1 MiB + 4 KiB stride

@pytest.mark.benchmark(group="read c) 4K stride")
def test_stride_read_at_qcowdisk(benchmark: Any, disk: Any) -> None:
    offsets = stride_offsets(SIZE)
    _info(benchmark, requests=len(offsets))
    benchmark(stride_read_qcow, disk, offsets)


@pytest.mark.benchmark(group="read c) 4K stride")
def test_stride_pread_raw(benchmark: Any, raw_fd: int) -> None:
    offsets = stride_offsets(SIZE)
    _info(benchmark, requests=len(offsets))
    benchmark(stride_pread_raw, raw_fd, offsets)
