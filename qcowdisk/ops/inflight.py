"""A few copy steps in flight at once, collected in order: how commit and rebase overlap I/O.

qemu-img's jobs keep several requests in flight. Here each step (read some guest range, maybe
write it elsewhere) runs in a worker thread with buffers of its own; the host calls release
the GIL, so reads, writes and the kernel's copies overlap. Steps are collected in the order
they were submitted, so whoever reports progress never sees it go back, and memory stays at
`count` sets of buffers. Leaving the `with` block, also on an exception (one raised from a
progress callback, or a step's own error re-raised here), waits for every step in flight: no
thread still touches an image once the caller goes on to close it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..generic import Generic

TYPE_CHECKING = False
if TYPE_CHECKING:  # (concurrent.futures, with logging, is imported when the threads start)
    from concurrent.futures import Future, ThreadPoolExecutor
    from typing import TypeVar

    T = TypeVar("T")
else:
    T = None  # (Generic[T] ignores its parameter at run time)


class InFlight(Generic[T]):
    """At most `count` steps at once, each given one of `count` buffer sets made by `make`;
    `done(key)` is called (in this thread, in submission order) as each step completes."""

    def __init__(self, count: int, make: Callable[[], T], done: Callable[[int], object]) -> None:
        """Make the buffer sets; the threads start with the `with` block."""
        self._free = [make() for _ in range(count)]
        self._count = count
        self._done = done
        self._queue: deque[tuple[Future[None], int, T]] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> InFlight[T]:
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(max_workers=self._count, thread_name_prefix="qcowdisk-copy")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)  # on an error too: nothing may run once images close
        self._pool = None

    def submit(self, step: Callable[[T], None], key: int) -> None:
        """Run `step(buffers)` in a worker, once a buffer set is free (collecting the oldest
        step first if none is); `key` is what `done` gets when it has been collected."""
        assert self._pool is not None
        if not self._free:
            self._collect_oldest()
        buffers = self._free.pop()
        self._queue.append((self._pool.submit(step, buffers), key, buffers))

    def drain(self) -> None:
        """Collect every step in flight (re-raising the first error of one, in order)."""
        while self._queue:
            self._collect_oldest()

    def _collect_oldest(self) -> None:
        future, key, buffers = self._queue.popleft()
        future.result()
        self._free.append(buffers)
        self._done(key)


__all__ = ["InFlight"]
