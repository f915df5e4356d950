"""The active L1 table: its entries in memory, which of them changed, and their write-back.

An L1 entry may reach the disk only after the L2 table it names is durable (a new or
copied-on-write L2 table is written and synced first): `depend_on(l2_cache)` declares it, and
`write_dirty` satisfies it. Growing and shrinking the table (a new table, sync, header switch,
free the old one) belongs here too. The caller holds the image lock.
"""

from __future__ import annotations

from array import array

from ..hostio import HostFile
from .cache import Durable
from .entries import TableCodec


class L1Table:
    """The active L1 table of one image."""

    def __init__(self, host: HostFile, table_offset: int, entries: array[int]) -> None:
        """The table at `table_offset` with its decoded `entries`."""
        self.host = host
        self.table_offset = table_offset
        self.entries = entries
        self.dirty: set[int] = set()   # l1 indices changed in memory only
        self.dependencies: list[Durable] = []

    def __len__(self) -> int:
        return len(self.entries)

    def depend_on(self, dependency: Durable) -> None:
        """`dependency` must be durable before a changed entry is written."""
        self.dependencies.append(dependency)

    def set(self, l1_index: int, entry: int) -> None:
        """Change one entry in memory; it reaches the disk at the next write-back."""
        self.entries[l1_index] = entry
        self.dirty.add(l1_index)

    def write_dirty(self) -> None:
        """Write the changed entries (whole 512-byte sectors of the table), dependencies first."""
        if not self.dirty:
            return
        for dependency in self.dependencies:
            dependency.make_durable()
        codec = TableCodec(64, len(self.entries) * 8)
        done: set[int] = set()
        for l1_index in sorted(self.dirty):
            lo, hi = codec.sector_range(l1_index, l1_index + 1)
            if lo in done:
                continue
            done.add(lo)
            self.host.pwrite(codec.encode(self.entries, lo, hi), self.table_offset + lo * 8)
        self.dirty.clear()

    def make_durable(self) -> None:
        """Write the changed entries and sync."""
        self.write_dirty()
        self.host.sync()
