"""The active L1 table: its entries in memory, which of them changed, and their write-back.

An L1 entry may reach the disk only after the L2 table it names is durable (a new or
copied-on-write L2 table is written and synced first): `depend_on(l2_cache)` declares it, and
`write_dirty` satisfies it. Growing and shrinking the table (a new table, sync, header switch,
free the old one) belongs here too. The caller holds the image lock.

Growing (QEMU's `qcow2_grow_l1_table` with an exact size) writes the table, extended with zero
entries, to newly allocated clusters, syncs, and then switches the header in TWO writes, each
changing one 8-byte word of it, so a header write torn at any 8-byte boundary still leaves a
consistent image:

1. `l1_table_offset` (bytes 40..47) to the new table, `l1_size` (36..39) still the old count:
   the new table starts with exactly the old entries, so the image maps the same; the old
   table and the new table's extra clusters are leaks, nothing worse.
2. `l1_size` to the new count: the entries past the old count are zero.

Only then is the old table freed (deferred: its clusters are reused only after the switch is
durable). QEMU writes both fields at once (12 bytes at offset 36); torn at byte 40, that write
pairs the new count with the old table, whose would-be entries past its end are whatever the
following clusters hold. The two steps never create that state.

Shrinking the table is what QEMU does too: `l1_size` stays, the entries past the new end are
cleared (`clear_from`) and the caller frees what they named.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from itertools import compress

from ..hostio import HostFile
from .entries import TableCodec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .cache import Durable


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

    # --- growing and shrinking ----------------------------------------------------------
    def grow(self, entry_count: int, cluster_bits: int, *, allocate: Callable[[int], int],
             switch_offset: Callable[[int], None], switch_size: Callable[[int], None],
             free: Callable[[int, int], None]) -> None:
        """Move the table to a new place holding `entry_count` entries (see the module docstring).

        `allocate(n)` returns the first of n contiguous new host clusters (counted, not yet
        durable); `switch_offset(offset)` and `switch_size(count)` each make everything written
        so far durable (the refcounts of the new clusters included) and then switch that one
        header field; `free(first_cluster, n)` queues a deferred free.
        """
        old_count = len(self.entries)
        if entry_count <= old_count:
            return
        self.write_dirty()  # the copy below must not carry entries whose L2 tables are not durable
        old_offset = self.table_offset
        table_bytes = entry_count * 8
        clusters = -(-table_bytes >> cluster_bits)
        new_offset = allocate(clusters) << cluster_bits
        grown = array(self.entries.typecode, self.entries)
        grown.extend(bytes(entry_count - old_count))  # zeros; an array extends from any iterable of ints
        self.host.pwrite(TableCodec(64, table_bytes).encode(grown, 0, entry_count), new_offset)
        switch_offset(new_offset)  # step 1: new table, old count
        self.table_offset = new_offset
        switch_size(entry_count)   # step 2: the new count
        self.entries.extend(bytes(entry_count - old_count))
        if old_count:
            free(old_offset >> cluster_bits, -(-(old_count * 8) >> cluster_bits))

    def clear_from(self, l1_index: int) -> list[tuple[int, int]]:
        """Clear every entry from `l1_index` on (in memory; written back like any change).

        Returns (l1_index, old entry) for each entry that named an L2 table: the caller drops
        the references those tables held. The table keeps its size, as QEMU's does.
        """
        cleared = [(i, self.entries[i]) for i in compress(range(l1_index, len(self.entries)), self.entries[l1_index:])]
        for i, _ in cleared:
            self.set(i, 0)
        return cleared
