"""Bounded LRU caches of metadata tables (L2 tables, refcount blocks) with write-back.

A table is decoded once per load into a native `array` and stays decoded while cached. Dirty
tables remember the range of entries changed, so a write-back writes only the 512-byte sectors
that changed (never a whole table for one entry).

Ordering is declared, not placed by hand: `depend_on(x)` says that x must be durable before any
dirty table of this cache reaches the disk (QEMU's `qcow2_cache_set_dependency`, imago's
`depend_on`). Every write-back, whether a flush or an eviction, satisfies the dependencies
first. The caller holds the image lock for every call.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable

from ..hostio import HostFile
from .entries import TableCodec

TYPE_CHECKING = False
if TYPE_CHECKING:  # (a protocol for the type checker only: nothing tests it at run time)
    from typing import Protocol

    class Durable(Protocol):
        """Something whose pending writes can be made durable (a cache, the L1 table, guest data)."""

        def make_durable(self) -> None:
            """Write whatever is pending and sync it."""
            ...


class CachedTable:
    """One decoded table plus its dirty entry range [dirty_lo, dirty_hi)."""

    __slots__ = ("dirty_hi", "dirty_lo", "entries", "host_offset")

    def __init__(self, host_offset: int, entries: array[int]) -> None:
        """A clean table at `host_offset`."""
        self.host_offset = host_offset
        self.entries = entries
        self.dirty_lo = -1
        self.dirty_hi = -1

    @property
    def dirty(self) -> bool:
        """Whether the table has changes not yet written."""
        return self.dirty_lo >= 0

    def mark(self, lo: int, hi: int | None = None) -> None:
        """Record that entries [lo, hi) changed (hi defaults to lo + 1)."""
        hi = lo + 1 if hi is None else hi
        if self.dirty_lo < 0:
            self.dirty_lo, self.dirty_hi = lo, hi
        else:  # (comparisons, not min/max: this runs for every allocating write)
            if lo < self.dirty_lo:
                self.dirty_lo = lo
            if hi > self.dirty_hi:
                self.dirty_hi = hi


class TableCache:
    """LRU cache of tables of one kind, keyed by host offset, with ordered write-back."""

    def __init__(self, host: HostFile, codec: TableCodec, capacity: int,
                 on_load: Callable[[int], None] | None = None) -> None:
        """A cache of at most `capacity` tables read from and written to `host`."""
        self.host = host
        self.codec = codec
        self.capacity = max(4, capacity)
        self.tables: OrderedDict[int, CachedTable] = OrderedDict()
        self.on_load = on_load  # validates the offset before anything is read
        self.dependencies: list[Durable] = []

    def depend_on(self, dependency: Durable) -> None:
        """`dependency` must be durable before any dirty table of this cache is written."""
        self.dependencies.append(dependency)

    def get(self, host_offset: int) -> CachedTable:
        """The table at `host_offset`, loaded and decoded if not cached."""
        t = self.tables.get(host_offset)
        if t is not None:
            self.tables.move_to_end(host_offset)
            return t
        if self.on_load is not None:
            self.on_load(host_offset)
        codec = self.codec
        raw = self.host.pread(codec.table_bytes, host_offset)
        if len(raw) < codec.table_bytes:
            raw += bytes(codec.table_bytes - len(raw))
        t = CachedTable(host_offset, codec.decode(raw))
        tables = self.tables
        tables[host_offset] = t
        if len(tables) > self.capacity:
            self._evict()
        return t

    def peek(self, host_offset: int) -> CachedTable | None:
        """The cached table at `host_offset`, or None (no load)."""
        return self.tables.get(host_offset)

    def install(self, host_offset: int, entries: array[int] | None = None) -> CachedTable:
        """Insert a table for a just-allocated cluster (all zeros, or a copy-on-write copy of
        `entries`); the whole table is dirty."""
        t = CachedTable(host_offset, self.codec.new() if entries is None else entries)
        t.mark(0, self.codec.entry_count)
        self._insert(t)
        return t

    def _insert(self, t: CachedTable) -> None:
        self.tables[t.host_offset] = t
        self._evict()

    def _evict(self) -> None:
        tables = self.tables
        while len(tables) > self.capacity:  # the least recently used first
            offset, victim = tables.popitem(last=False)
            if victim.dirty_lo >= 0:  # written first: back in front until that succeeds
                tables[offset] = victim
                tables.move_to_end(offset, last=False)
                self.write_table(victim)
                del tables[offset]

    def satisfy_dependencies(self) -> None:
        """Make everything this cache's tables depend on durable."""
        for dependency in self.dependencies:
            dependency.make_durable()

    def write_table(self, t: CachedTable) -> None:
        """Write a dirty table's changed sectors (after its dependencies are durable)."""
        if not t.dirty:
            return
        self.satisfy_dependencies()
        lo, hi = self.codec.sector_range(t.dirty_lo, t.dirty_hi)
        data = self.codec.encode(t.entries, lo, hi)
        self.host.pwrite(data, t.host_offset + lo * self.codec.entry_bits // 8)
        t.dirty_lo = t.dirty_hi = -1

    def has_dirty(self) -> bool:
        """Whether any cached table has unwritten changes."""
        return any(t.dirty for t in self.tables.values())

    def write_dirty(self) -> bool:
        """Write every dirty table (no sync). Returns whether anything was written."""
        dirty = [t for t in self.tables.values() if t.dirty]
        if not dirty:
            return False
        self.satisfy_dependencies()
        for t in dirty:
            self.write_table(t)
        return True

    def make_durable(self) -> None:
        """Write every dirty table and sync the host file."""
        self.write_dirty()
        self.host.sync()

    def drop(self, host_offset: int) -> None:
        """Forget a table without writing it (its cluster was freed)."""
        self.tables.pop(host_offset, None)

    def clear(self) -> None:
        """Forget every table (callers write dirty ones first)."""
        self.tables.clear()
