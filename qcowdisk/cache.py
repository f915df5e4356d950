"""Bounded LRU caches of metadata tables (L2 tables, refcount blocks) with write-back.

A table is decoded once per load into a native `array` and stays decoded while cached. Dirty
tables remember the range of entries changed, so a flush writes only the sectors that changed
(never a whole table for one entry). Write-back order between caches is the owner's business:
`before_writeback` is called before any dirty table of this cache reaches the disk, which is how
the L2 cache makes refcount blocks (and guest data) durable first.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from typing import Callable

from .hostio import HostFile

_SECTOR = 512
_BIG_ENDIAN_HOST = sys.byteorder == "big"


class CachedTable:
    """One decoded table plus its dirty entry range [dirty_lo, dirty_hi)."""

    __slots__ = ("host_offset", "entries", "dirty_lo", "dirty_hi")

    def __init__(self, host_offset: int, entries: array) -> None:
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
        else:
            self.dirty_lo = min(self.dirty_lo, lo)
            self.dirty_hi = max(self.dirty_hi, hi)


class TableCodec:
    """Turns the bytes of a table into a native array of entries and back.

    `entry_bits` is 8/16/32/64 for arrays of big-endian integers, or 1/2/4 for sub-byte refcounts
    packed from the least significant bit (one array item per entry after decoding).
    """

    _TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}

    def __init__(self, entry_bits: int, table_bytes: int) -> None:
        self.entry_bits = entry_bits
        self.table_bytes = table_bytes
        self.entry_count = table_bytes * 8 // entry_bits
        if entry_bits >= 8:
            self.typecode = self._TYPECODES[entry_bits]
            assert array(self.typecode).itemsize * 8 == entry_bits
        else:
            self.typecode = "B"
            per = 8 // entry_bits
            mask = (1 << entry_bits) - 1
            # byte value -> its `per` entries, as bytes, for a C-speed expand via join/map
            self._expand = [bytes((b >> (i * entry_bits)) & mask for i in range(per)) for b in range(256)]

    def decode(self, raw: bytes) -> array:
        """Bytes of a whole table -> array of entries."""
        if self.entry_bits >= 8:
            a = array(self.typecode)
            a.frombytes(raw)
            if not _BIG_ENDIAN_HOST and self.entry_bits > 8:
                a.byteswap()
            return a
        return array("B", b"".join(map(self._expand.__getitem__, raw)))

    def encode(self, entries: array, lo: int, hi: int) -> bytes:
        """Entries [lo, hi) -> their bytes (lo, hi aligned so they start and end on a byte)."""
        if self.entry_bits >= 8:
            part = entries[lo:hi]
            if not _BIG_ENDIAN_HOST and self.entry_bits > 8:
                part.byteswap()
            return part.tobytes()
        per = 8 // self.entry_bits
        bits = self.entry_bits
        out = bytearray((hi - lo) // per)
        for j in range(len(out)):
            base = lo + j * per
            v = 0
            for i in range(per):
                v |= entries[base + i] << (i * bits)
            out[j] = v
        return bytes(out)

    def new(self) -> array:
        """An all-zero table."""
        return array(self.typecode, bytes(self.entry_count * array(self.typecode).itemsize))

    def byte_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Entry range -> (entry_lo, entry_hi) widened to whole 512-byte sectors of the table."""
        per_sector = _SECTOR * 8 // self.entry_bits
        if per_sector == 0:
            per_sector = 1
        lo = lo // per_sector * per_sector
        hi = min(self.entry_count, -(-hi // per_sector) * per_sector)
        return lo, hi


class TableCache:
    """LRU cache of tables of one kind, keyed by host offset, with write-back.

    The caller holds the image lock for every call.
    """

    def __init__(self, host: HostFile, codec: TableCodec, capacity: int,
                 before_writeback: Callable[[], None] | None = None,
                 on_load: Callable[[int], None] | None = None) -> None:
        self.host = host
        self.codec = codec
        self.capacity = max(4, capacity)
        self.tables: OrderedDict[int, CachedTable] = OrderedDict()
        self.before_writeback = before_writeback
        self.on_load = on_load  # validates the offset before anything is read

    def get(self, host_offset: int) -> CachedTable:
        """The table at `host_offset`, loaded and decoded if not cached."""
        t = self.tables.get(host_offset)
        if t is not None:
            self.tables.move_to_end(host_offset)
            return t
        if self.on_load is not None:
            self.on_load(host_offset)
        raw = self.host.pread(self.codec.table_bytes, host_offset)
        if len(raw) < self.codec.table_bytes:
            raw += bytes(self.codec.table_bytes - len(raw))
        t = CachedTable(host_offset, self.codec.decode(raw))
        self._insert(t)
        return t

    def peek(self, host_offset: int) -> CachedTable | None:
        """The cached table at `host_offset`, or None (no load)."""
        return self.tables.get(host_offset)

    def install_new(self, host_offset: int) -> CachedTable:
        """Insert a fresh all-zero table for a just-allocated cluster; the whole table is dirty."""
        t = CachedTable(host_offset, self.codec.new())
        t.mark(0, self.codec.entry_count)
        self._insert(t)
        return t

    def install(self, host_offset: int, entries: array) -> CachedTable:
        """Insert a table with the given entries (a copy-on-write copy); the whole table is dirty."""
        t = CachedTable(host_offset, entries)
        t.mark(0, self.codec.entry_count)
        self._insert(t)
        return t

    def _insert(self, t: CachedTable) -> None:
        self.tables[t.host_offset] = t
        while len(self.tables) > self.capacity:
            victim_offset, victim = next(iter(self.tables.items()))
            if victim.dirty:
                if self.before_writeback is not None:
                    self.before_writeback()
                self.write_table(victim)
            del self.tables[victim_offset]

    def write_table(self, t: CachedTable) -> None:
        """Write a dirty table's changed sectors."""
        if not t.dirty:
            return
        lo, hi = self.codec.byte_range(t.dirty_lo, t.dirty_hi)
        data = self.codec.encode(t.entries, lo, hi)
        self.host.pwrite(data, t.host_offset + lo * self.codec.entry_bits // 8)
        t.dirty_lo = t.dirty_hi = -1

    def has_dirty(self) -> bool:
        """Whether any cached table has unwritten changes."""
        return any(t.dirty for t in self.tables.values())

    def write_dirty(self) -> bool:
        """Write every dirty table (no sync). Returns whether anything was written."""
        wrote = False
        for t in list(self.tables.values()):
            if t.dirty:
                self.write_table(t)
                wrote = True
        return wrote

    def drop(self, host_offset: int) -> None:
        """Forget a table without writing it (its cluster was freed)."""
        self.tables.pop(host_offset, None)

    def clear(self) -> None:
        """Forget every table (callers write dirty ones first)."""
        self.tables.clear()
