"""pytest-benchmark write cases: small (64 MiB) versions of run_benchmarks.py cases d) to f).

Every round gets its own image, made in the (untimed) setup; the timed part is all the 64 KiB
write_at calls plus flush() and close(). References in the same group: the same writes with
os.pwrite on a raw file (+ fsync + close), and the whole `qemu-img bench -w` process (its wall time,
which includes process start, image open and qemu's final flush at close).

    pytest benchmarks/ --benchmark-enable --benchmark-group-by=group

Without --benchmark-enable (the project's addopts disable benchmarks) each case runs once.
Set QCOWDISK_BENCH_SIZE (e.g. 256M) for bigger images.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from run_benchmarks import (
    CLUSTER,
    CREATE_SIZE,
    WRITE_CHUNK,
    WRITE_PATTERN,
    KiB,
    MiB,
    parse_size,
    qemu_img,
    qemu_img_bench,
    write_all_qcow,
    write_all_raw,
    write_random_raw,
)

SIZE = parse_size(os.environ.get("QCOWDISK_BENCH_SIZE", "64M"))
ROUNDS = 3
BUF = bytes([WRITE_PATTERN]) * WRITE_CHUNK
COUNT = SIZE // WRITE_CHUNK


def _engine() -> Any:
    from qcowdisk import QcowFile
    return QcowFile


def _assert_check_clean(image: str) -> None:
    p = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"qemu-img check {image}: exit {p.returncode}\n{p.stdout}{p.stderr}"


def _assert_pattern(image: str) -> None:
    """First and last 64 KiB hold the written pattern, as QEMU reads them."""
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {WRITE_PATTERN} 0 {WRITE_CHUNK}",
                        "-c", f"read -P {WRITE_PATTERN} {SIZE - WRITE_CHUNK} {WRITE_CHUNK}", image],
                       capture_output=True, text=True, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "fail" not in out.lower(), out


@pytest.fixture(scope="module")
def full_qcow2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fully allocated qcow2 (64 KiB clusters) of random data, shared by the overwrite cases."""
    d = tmp_path_factory.mktemp("bench-full")
    raw = str(d / "src.raw")
    img = str(d / "full.qcow2")
    write_random_raw(raw, SIZE)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, img)
    os.unlink(raw)
    return img


@pytest.fixture(scope="module")
def full_raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A raw file with every block written, for the overwrite reference."""
    path = str(tmp_path_factory.mktemp("bench-full-raw") / "full.raw")
    write_random_raw(path, SIZE)
    return path


# d) allocating 64 KiB writes on a fresh image

@pytest.mark.benchmark(group="write d) 64K alloc")
def test_alloc_write_qcowdisk(benchmark: Any, tmp_path: Path) -> None:
    QcowFile = _engine()
    n = itertools.count()
    paths: list[str] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        for p in paths:  # keep at most one image on disk
            os.unlink(p)
        paths[:] = [str(tmp_path / f"alloc{next(n)}.qcow2")]
        disk = QcowFile.create(paths[0], SIZE)
        os.sync()  # earlier rounds' dirty pages are not this round's cost
        return (disk, SIZE, BUF), {}

    benchmark.extra_info.update(size=SIZE, requests=COUNT)
    benchmark.pedantic(write_all_qcow, setup=setup, rounds=ROUNDS)
    _assert_check_clean(paths[0])
    _assert_pattern(paths[0])


@pytest.mark.benchmark(group="write d) 64K alloc")
def test_alloc_write_raw(benchmark: Any, tmp_path: Path) -> None:
    n = itertools.count()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        path = tmp_path / f"alloc{next(n)}.raw"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.sync()
        return (fd, SIZE, BUF), {}

    benchmark.extra_info.update(size=SIZE, requests=COUNT)
    benchmark.pedantic(write_all_raw, setup=setup, rounds=ROUNDS)


@pytest.mark.benchmark(group="write d) 64K alloc")
def test_alloc_write_qemu_img_bench_process(benchmark: Any, tmp_path: Path) -> None:
    n = itertools.count()
    reported: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        path = str(tmp_path / f"alloc{next(n)}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, str(SIZE))
        os.sync()
        return (path,), {}

    def run(path: str) -> None:
        reported.append(qemu_img_bench(path, count=COUNT, bufsize=WRITE_CHUNK, write=True)[0])

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    benchmark.extra_info.update(size=SIZE, requests=COUNT, qemu_img_reported_best_s=min(reported))


# e) 64 KiB overwrites of allocated clusters

@pytest.mark.benchmark(group="write e) 64K overwrite")
def test_overwrite_qcowdisk(benchmark: Any, full_qcow2: str) -> None:
    QcowFile = _engine()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        disk = QcowFile.open(full_qcow2)
        os.sync()
        return (disk, SIZE, BUF), {}

    benchmark.extra_info.update(size=SIZE, requests=COUNT)
    benchmark.pedantic(write_all_qcow, setup=setup, rounds=ROUNDS)
    _assert_check_clean(full_qcow2)
    _assert_pattern(full_qcow2)


@pytest.mark.benchmark(group="write e) 64K overwrite")
def test_overwrite_raw(benchmark: Any, full_raw: str) -> None:
    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        fd = os.open(full_raw, os.O_RDWR)
        os.sync()
        return (fd, SIZE, BUF), {}

    benchmark.extra_info.update(size=SIZE, requests=COUNT)
    benchmark.pedantic(write_all_raw, setup=setup, rounds=ROUNDS)


@pytest.mark.benchmark(group="write e) 64K overwrite")
def test_overwrite_qemu_img_bench_process(benchmark: Any, full_qcow2: str) -> None:
    reported: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        os.sync()
        return (), {}

    def run() -> None:
        reported.append(qemu_img_bench(full_qcow2, count=COUNT, bufsize=WRITE_CHUNK, write=True)[0])

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    benchmark.extra_info.update(size=SIZE, requests=COUNT, qemu_img_reported_best_s=min(reported))


# f) creating a 4 TiB sparse image (target < 50 ms, file < 1 MiB)

@pytest.mark.benchmark(group="create f) 4 TiB sparse")
def test_create_4t_qcowdisk(benchmark: Any, tmp_path: Path) -> None:
    QcowFile = _engine()
    n = itertools.count()
    paths: list[str] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        for p in paths:
            os.unlink(p)
        paths[:] = [str(tmp_path / f"c{next(n)}.qcow2")]
        return (paths[0],), {}

    def create(path: str) -> None:
        QcowFile.create(path, CREATE_SIZE).close()

    benchmark.pedantic(create, setup=setup, rounds=10, warmup_rounds=1)
    size = os.stat(paths[0]).st_size
    benchmark.extra_info.update(virtual_size=CREATE_SIZE, file_size=size, file_size_kib=size / KiB)
    _assert_check_clean(paths[0])
    assert size < 16 * MiB, f"a sparse 4 TiB image should be small, got {size} bytes"  # target is < 1 MiB


@pytest.mark.benchmark(group="create f) 4 TiB sparse")
def test_create_4t_qemu_img_process(benchmark: Any, tmp_path: Path) -> None:
    n = itertools.count()

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (str(tmp_path / f"c{next(n)}.qcow2"),), {}

    def create(path: str) -> None:
        qemu_img("create", "-q", "-f", "qcow2", path, str(CREATE_SIZE))

    benchmark.pedantic(create, setup=setup, rounds=10, warmup_rounds=1)
