"""qcowdisk.ops.readahead: jobs run in worker threads, everything taken back in submission order.

convert relies on it to keep every action on the target in guest order (the layout of the
output, and progress that never goes back) while reads run ahead, and to stop cleanly: a
job's error is raised in the caller's thread at the job's turn, and no worker outlives the
`with` block.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from qcowdisk.ops.readahead import ReadAhead


def test_results_and_actions_in_submission_order() -> None:
    rng = random.Random(7)
    delays = [rng.random() / 500 for _ in range(40)]
    seen: list[object] = []

    def job(i: int, buf: bytearray) -> tuple[int, int]:
        time.sleep(delays[i])  # finish out of order
        buf[:4] = i.to_bytes(4, "little")
        return i, int.from_bytes(buf[:4], "little")

    with ReadAhead[tuple[int, int]](4, 3, 16) as ahead:
        for i in range(40):
            if i % 5 == 0:
                ahead.later(lambda i=i: seen.append(f"action {i}"))
            ahead.submit(lambda buf, i=i: job(i, buf), seen.append)
        ahead.drain()
    expected: list[object] = []
    for i in range(40):
        expected += [f"action {i}"] if i % 5 == 0 else []
        expected.append((i, i))  # each job's buffer was its own while it ran
    assert seen == expected


def test_an_action_with_nothing_pending_runs_at_once() -> None:
    seen: list[int] = []
    with ReadAhead[None](2, 1, 8) as ahead:
        ahead.later(lambda: seen.append(1))
        assert seen == [1]


def test_a_jobs_error_is_raised_at_its_turn_and_the_workers_stop() -> None:
    threads = threading.active_count()
    seen: list[int] = []

    def job(i: int) -> int:
        if i == 3:
            raise OSError(5, "Input/output error")
        return i

    def run() -> None:
        with ReadAhead[int](2, 2, 8) as ahead:
            for i in range(6):
                ahead.submit(lambda buf, i=i: job(i), seen.append)
            ahead.drain()

    with pytest.raises(OSError, match="Input/output error"):
        run()
    assert seen == [0, 1, 2]  # what came before the failing job, and nothing after it
    assert threading.active_count() == threads


def test_at_most_depth_jobs_in_flight() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def job(buf: bytearray) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.001)
        with lock:
            running -= 1

    with ReadAhead[None](3, 8, 8) as ahead:
        for _ in range(30):
            ahead.submit(job, lambda _: None)
        ahead.drain()
    assert most <= 3
