"""Writeback hints for bulk copies that flush at their end (commit, rebase, a synced convert).

Without them the copy's data sits dirty in the page cache until the final fsync, which then
writes it all while nothing else happens. Asking the kernel every few MiB to start writing
(`start_writeback`, sync_file_range without waiting) lets the disk write the first MiBs while
the rest is copied: on the 1 GiB commit benchmark the commit takes 0.60 s instead of 0.80 s.
A hint orders nothing and makes nothing durable; only the flush does.
"""

from __future__ import annotations

from collections.abc import Callable

WRITEBACK_EVERY = 16 << 20  # data bytes written between two hints


class WritebackPacer:
    """Calls `start()` once every `every` bytes that `wrote` counts. Threads may count at once:
    a lost count or a hint given twice changes only when the disk starts writing."""

    def __init__(self, start: Callable[[], None], every: int = WRITEBACK_EVERY) -> None:
        """Hint through `start` (a target's start_writeback) every `every` bytes."""
        self._start = start
        self._every = every
        self._pending = 0

    def wrote(self, n: int) -> None:
        """Count `n` bytes of data written; start the writeback when enough have piled up."""
        self._pending += n
        if self._pending >= self._every:
            self._pending = 0
            self._start()


__all__ = ["WRITEBACK_EVERY", "WritebackPacer"]
