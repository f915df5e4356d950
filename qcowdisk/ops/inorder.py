"""Copy steps prepared in parallel and applied in order: how a plain convert overlaps its I/O.

qemu-img convert keeps several requests in flight (coroutines over a thread pool) but writes
in guest order unless -W. Here `workers` threads, the caller's included, each take the next
step with a free buffer (of `buffers`) and prepare it (read the source and scan it for zeros:
the read releases the GIL, so one thread's read overlaps the other's scan or write). Prepared
steps are applied (written to the target) strictly in step order, by whichever worker finds
the next one ready and nobody applying: the target sees its writes in guest order, as a
sequential copy makes them (the same layout, the same allocation), and a worker that could
prepare goes on preparing while another writes. Applying is not tied to the worker that
prepared a step: with steps of uneven weight (data, then a hole, then zeros...) a fixed
alternation would leave one thread all the heavy steps.

The caller's thread runs `between()` after each step it took (convert reports progress there,
so a progress callback runs in the caller's thread and an exception from it stops the copy).
The first error of any worker stops every worker before its next write and is re-raised here
once all have stopped: no thread touches an image after `run` returns.
Plain threads, not concurrent.futures, whose import (with logging) costs start-up time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from ..generic import Generic

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    S = TypeVar("S")
    P = TypeVar("P")
else:
    S = P = None  # (Generic[S, P] ignores its parameters at run time)


class InOrder(Generic[S, P]):
    """`prepare(step, buffer)` for each step of `steps` in `workers` threads (this one
    included; one worker: no thread at all) on `buffers` buffers of `buffer_size` bytes, and
    `apply(prepared)` one at a time in step order; `between()` runs in this thread after each
    step it took."""

    def __init__(self, steps: Iterator[S], prepare: Callable[[S, bytearray], P], apply: Callable[[P], object],
                 between: Callable[[], object], workers: int, buffers: int, buffer_size: int) -> None:
        """Make the buffers; nothing runs before `run`."""
        self._steps = steps
        self._prepare = prepare
        self._apply = apply
        self._between = between
        self._workers = max(1, workers)
        self._free = [bytearray(buffer_size) for _ in range(max(buffers, self._workers))]
        self._ready: dict[int, tuple[P, bytearray]] = {}  # prepared steps by ticket, not yet applied
        self._cv = threading.Condition()
        self._taken = 0  # tickets handed out with the steps
        self._turn = 0  # the ticket whose step is applied next
        self._applying = False  # a worker is applying ready steps
        self._failed = False
        self._error: BaseException | None = None

    def run(self) -> None:
        """Run every step; re-raise the first error of any worker once every worker stopped."""
        others = [threading.Thread(target=self._other, name=f"qcowdisk-copy-{i}", daemon=True)
                  for i in range(1, self._workers)]
        try:
            for t in others:
                t.start()
            self._work(mine=True)
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            for t in others:
                t.join()
        if self._error is not None:
            raise self._error

    def _other(self) -> None:
        try:
            self._work(mine=False)
        except BaseException as e:  # noqa: BLE001  (re-raised by run in the caller's thread)
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        with self._cv:
            if not self._failed:
                self._failed, self._error = True, error
            self._cv.notify_all()

    def _work(self, mine: bool) -> None:
        cv = self._cv
        while True:
            with cv:
                while not self._free and not self._failed:
                    cv.wait()
                if self._failed:
                    return
                step = next(self._steps, None)  # (under the lock: one generator for all workers)
                if step is None:
                    return
                ticket = self._taken
                self._taken += 1
                buf = self._free.pop()
            prepared = self._prepare(step, buf)
            with cv:
                self._ready[ticket] = (prepared, buf)
                apply = not (self._applying or self._failed)  # else the worker applying takes it in turn
                self._applying = self._applying or apply
            if apply:
                self._apply_ready()
            if mine:
                self._between()

    def _apply_ready(self) -> None:
        """Apply ready steps in ticket order while the next one is ready (this worker holds
        `_applying`, so nobody else applies meanwhile)."""
        cv = self._cv
        while True:
            with cv:
                item = self._ready.pop(self._turn, None)
                if item is None or self._failed:
                    self._applying = False
                    return
            prepared, buf = item
            try:
                self._apply(prepared)
            except BaseException as e:
                self._fail(e)
                raise
            finally:
                with cv:
                    self._turn += 1
                    self._free.append(buf)
                    cv.notify_all()


__all__ = ["InOrder"]
