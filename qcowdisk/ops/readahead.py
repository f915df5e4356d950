"""Reads ahead in worker threads, results taken back in order: how convert overlaps its I/O.

qemu-img convert keeps several requests in flight (its coroutines over a thread pool), so the
source is read while the target is written. Here the main thread hands out jobs (read a guest
range into a buffer and scan it for zeros), worker threads run them (the reads release the
GIL), and the main thread takes the results back in submission order and acts on them: writes
stay in one thread and in guest order, so the target's layout is the one a sequential copy
makes. Actions that need no read (zeroing a range) queue behind the jobs before them, so
every action on the target happens in guest order. At most `depth` jobs are in flight, each
with a buffer of its own: memory stays bounded. Leaving the `with` block, on an error too,
stops the workers once the jobs they hold are done: no thread touches an image after it.

Plain threads and a `SimpleQueue` rather than concurrent.futures: that package (with logging)
costs a measurable part of a short command's start.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Generic, TypeVar, cast

T = TypeVar("T")


class _Job(Generic[T]):
    """One job: its function and buffer in, its result (or error) out, `done` set when run."""

    __slots__ = ("buf", "done", "error", "fn", "result", "then")

    def __init__(self, fn: Callable[[bytearray], T], buf: bytearray, then: Callable[[T], object]) -> None:
        self.fn, self.buf, self.then = fn, buf, then
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(self.buf)
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread when the job is taken back)
            self.error = e
        self.done.set()


class ReadAhead(Generic[T]):
    """Jobs `fn(buffer) -> result` run by `threads` workers, at most `depth` at once, each on a
    buffer of `buffer_size` bytes; `then(result)` runs in this thread, in submission order."""

    def __init__(self, depth: int, threads: int, buffer_size: int) -> None:
        """Make the buffers; the threads start with the `with` block."""
        self._free = [bytearray(buffer_size) for _ in range(depth)]
        self._threads = threads
        self._pending: deque[_Job[T] | Callable[[], object]] = deque()
        self._inbox: SimpleQueue[_Job[T] | None] = SimpleQueue()
        self._workers: list[threading.Thread] = []

    def __enter__(self) -> ReadAhead[T]:
        for i in range(self._threads):
            t = threading.Thread(target=self._work, name=f"qcowdisk-read-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        for _ in self._workers:
            self._inbox.put(None)  # after every job queued: the workers finish those first
        for t in self._workers:
            t.join()
        self._workers = []

    def _work(self) -> None:
        while (job := self._inbox.get()) is not None:
            job.run()

    def submit(self, fn: Callable[[bytearray], T], then: Callable[[T], object]) -> None:
        """Queue `fn` on a free buffer (taking the oldest results back first if none is free)."""
        while not self._free:
            self._retire()
        job = _Job(fn, self._free.pop(), then)
        self._pending.append(job)
        self._inbox.put(job)

    def later(self, action: Callable[[], object]) -> None:
        """Run `action` in this thread after the jobs queued before it (now, if there are none)."""
        if self._pending:
            self._pending.append(action)
        else:
            action()

    def drain(self) -> None:
        """Take every job back and run every action queued (re-raising a job's error, in order)."""
        while self._pending:
            self._retire()

    def _retire(self) -> None:
        item = self._pending.popleft()
        if not isinstance(item, _Job):
            item()
            return
        item.done.wait()
        try:
            if item.error is not None:
                raise item.error
            item.then(cast(T, item.result))  # (set: the job raised nothing)
        finally:
            self._free.append(item.buf)


__all__ = ["ReadAhead"]
