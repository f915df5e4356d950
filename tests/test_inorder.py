"""qcowdisk.ops.inorder: steps prepared in parallel, applied strictly in order, errors stop all."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcowdisk
from qcowdisk.ops.inorder import InOrder
from qemutools import compare, qemu_img


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("qcowdisk-copy")}


@pytest.mark.parametrize("workers,buffers", [(1, 1), (2, 2), (2, 6), (3, 4), (4, 8)])
def test_applied_in_step_order_on_bounded_buffers(workers: int, buffers: int) -> None:
    rnd = random.Random(workers * 10 + buffers)
    delays = [rnd.choice([0, 0, 0.0005, 0.002]) for _ in range(200)]
    applied: list[int] = []
    prepared_by: set[str] = set()
    in_use: set[int] = set()
    most = 0
    between: list[str] = []
    lock = threading.Lock()

    def prepare(step: int, buf: bytearray) -> tuple[int, bytearray]:
        nonlocal most
        with lock:
            assert id(buf) not in in_use  # a buffer is never handed out twice at once
            in_use.add(id(buf))
            most = max(most, len(in_use))
            prepared_by.add(threading.current_thread().name)
        time.sleep(delays[step])  # uneven steps: later ones often finish first
        buf[:4] = step.to_bytes(4, "little")
        return step, buf

    def apply(p: tuple[int, bytearray]) -> None:
        step, buf = p
        assert int.from_bytes(buf[:4], "little") == step  # its buffer was not reused meanwhile
        time.sleep(delays[-1 - step] / 2)
        applied.append(step)
        with lock:
            in_use.discard(id(buf))

    InOrder(iter(range(200)), prepare, apply, lambda: between.append(threading.current_thread().name),
            workers, buffers, 16).run()
    assert applied == list(range(200))
    assert most <= max(buffers, workers)
    assert set(between) == {threading.main_thread().name}  # progress only in the caller's thread
    if workers > 1:
        assert len(prepared_by) > 1  # the work was shared
    assert not _threads()


@pytest.mark.parametrize("where", ["prepare", "apply"])
@pytest.mark.parametrize("worker_thread", [False, True])
def test_first_error_stops_every_worker_and_is_raised(where: str, worker_thread: bool) -> None:
    """The first step from 37 on that the chosen thread prepares (or applies) fails."""
    applied: list[int] = []
    failed: list[int] = []

    def fail_here(step: int) -> None:
        if step >= 37 and not failed and (threading.current_thread() is not threading.main_thread()) == worker_thread:
            failed.append(step)
            raise OSError(5, "boom", f"step {step}")

    def prepare(step: int, buf: bytearray) -> int:
        time.sleep(0.0002 * (step % 3))
        if where == "prepare":
            fail_here(step)
        return step

    def apply(step: int) -> None:
        if where == "apply":
            fail_here(step)
        applied.append(step)

    with pytest.raises(OSError, match="boom") as e:
        InOrder(iter(range(500)), prepare, apply, lambda: None, 2, 4, 8).run()
    assert e.value.filename == f"step {failed[0]}"
    assert applied == list(range(len(applied)))  # nothing out of order, nothing after a gap
    assert len(applied) <= failed[0] + 4
    if where == "apply":
        assert applied[-1] == failed[0] - 1  # no step applied after the failed one
    assert not _threads()


def test_error_from_between_stops_the_copy() -> None:
    applied: list[int] = []
    calls = 0

    def between() -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt

    def prepare(step: int, buf: bytearray) -> int:
        time.sleep(0.0002)  # (as a read does: lets the other thread in)
        return step

    with pytest.raises(KeyboardInterrupt):
        InOrder(iter(range(1000)), prepare, applied.append, between, 2, 4, 8).run()
    assert applied == list(range(len(applied))) and len(applied) < 1000
    assert not _threads()


def test_error_of_the_step_source_is_raised() -> None:
    def steps() -> Iterator[int]:
        yield from range(10)
        raise OSError(5, "block status failed")

    applied: list[int] = []
    with pytest.raises(OSError, match="block status failed"):
        InOrder(steps(), lambda s, b: s, applied.append, lambda: None, 2, 4, 8).run()
    assert applied == list(range(len(applied)))
    assert not _threads()


@pytest.mark.parametrize("threads", [1, 2])
def test_plain_convert_layout_matches_a_sequential_copy(tmp_path: Path, threads: int) -> None:
    """Two threads copying write the target in guest order: the qcow2 it makes is byte for byte
    the one a single thread makes, and QEMU finds it clean and identical to the source."""
    src = tmp_path / "src.raw"
    rnd = random.Random(7)
    with open(src, "wb") as f:
        f.truncate(48 << 20)
        for _ in range(60):
            f.seek(rnd.randrange(0, 47 << 20) & ~511)
            f.write(rnd.randbytes(rnd.choice([512, 4096, 70000, 1 << 20])))
    qcowdisk.convert(src, tmp_path / "one.qcow2", threads=1)
    qcowdisk.convert(src, tmp_path / "two.qcow2", threads=threads)
    assert (tmp_path / "one.qcow2").read_bytes() == (tmp_path / "two.qcow2").read_bytes()
    qemu_img("check", str(tmp_path / "two.qcow2"))
    compare(str(src), str(tmp_path / "two.qcow2"), "raw", "qcow2")
    qcowdisk.convert(tmp_path / "two.qcow2", tmp_path / "back.raw", out_format="raw", threads=threads)
    assert (tmp_path / "back.raw").read_bytes() == src.read_bytes()
