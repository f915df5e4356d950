"""Reference counts: read and update counts of every width, allocate and free clusters, grow the
table, and the deferred-free queue.

Crash-safe order (QEMU's): a new refcount block is written and synced before the table entry
that points at it; a grown refcount table is written and synced before the header switches to
it, and the old table is freed only after that. A dropped reference is never decremented on the
spot: `defer_free` queues the cluster, and `release_deferred` decrements only after the tables
that dropped the references (declared with `frees_depend_on`) are durable, so a freed cluster is
never reused while a table on disk still points at it. Every method expects the caller to hold
the image lock.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from ..errors import CorruptImageError, RefcountOverflowError
from ..hostio import HostFile
from .cache import CachedTable, TableCache
from .entries import REFT_OFFSET_MASK, REFT_RESERVED_MASK, TableCodec
from .format import MAX_REFTABLE_BYTES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .cache import Durable


class Refcounts:
    """The refcount table and a write-back cache of refcount blocks for one image."""

    def __init__(self, host: HostFile, cluster_bits: int, refcount_bits: int, reftable_offset: int,
                 reftable_clusters: int, file_length: Callable[[], int], cache_bytes: int,
                 on_table_moved: Callable[[int, int], None],
                 metadata: set[int]) -> None:
        self.host = host
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.refcount_bits = refcount_bits
        self.max_refcount = (1 << refcount_bits) - 1
        self.block_entries = self.cluster_size * 8 // refcount_bits
        self.codec = TableCodec(refcount_bits, self.cluster_size)
        self.file_length = file_length
        self.cache = TableCache(host, self.codec, cache_bytes // self.cluster_size,
                                on_load=self._check_block_offset)
        self.reftable_offset = reftable_offset
        self.reftable_clusters = reftable_clusters
        self.on_table_moved = on_table_moved  # writes the header after a table switch
        self.metadata = metadata  # host clusters holding metadata (overlap check), shared with owner
        raw = host.pread(reftable_clusters * self.cluster_size, reftable_offset)
        if len(raw) < reftable_clusters * self.cluster_size:
            raise CorruptImageError(
                f"refcount table at 0x{reftable_offset:x} ({reftable_clusters} clusters) runs past end of file")
        self.reftable = TableCodec(64, len(raw)).decode(raw)
        self.end_cluster = -(-file_length() // self.cluster_size)
        self.free_hint = 0
        self.append_only = False
        self.deferred_frees: list[int] = []  # host clusters whose reference is gone in memory only
        self.free_dependencies: list[Durable] = []
        # Byte allocator (alloc_bytes): where the next compressed payload may start, inside the
        # host cluster the last one ended in; 0 = none. Per open, as QEMU's s->free_byte_offset:
        # after a reopen the first payload starts a fresh cluster (nothing on disk records it).
        self.free_byte_offset = 0
        for c in range(reftable_offset >> cluster_bits, (reftable_offset >> cluster_bits) + reftable_clusters):
            metadata.add(c)
        for e in self.reftable:  # entries are validated where a block is used (`_block_offset`)
            if e & REFT_OFFSET_MASK:
                metadata.add((e & REFT_OFFSET_MASK) >> cluster_bits)

    # --- reading -------------------------------------------------------------------------
    def _block_offset(self, reftable_index: int) -> int:
        e = self.reftable[reftable_index]
        if e & REFT_RESERVED_MASK:
            raise CorruptImageError(
                f"refcount table entry {reftable_index} = 0x{e:x} has reserved bits set (mask 0x{REFT_RESERVED_MASK:x})")
        off = e & REFT_OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise CorruptImageError(
                f"Refblock offset 0x{off:x} unaligned (reftable index {reftable_index}, cluster size {self.cluster_size})")
        return off

    def _check_block_offset(self, host_offset: int) -> None:
        if host_offset + self.cluster_size > self.file_length() and host_offset >= self.end_cluster * self.cluster_size:
            raise CorruptImageError(
                f"refcount block at 0x{host_offset:x} lies past the end of the file ({self.file_length()} bytes)")
        if host_offset < self.cluster_size:
            raise CorruptImageError(f"refcount block offset 0x{host_offset:x} overlaps the header")

    def get(self, host_cluster: int) -> int:
        """The refcount of one host cluster (0 where no block exists)."""
        ri, idx = divmod(host_cluster, self.block_entries)
        if ri >= len(self.reftable):
            return 0
        off = self._block_offset(ri)
        if not off:
            return 0
        return self.cache.get(off).entries[idx]

    def has_block(self, host_cluster: int) -> bool:
        """Whether the refcount table names a block for this host cluster's count."""
        ri = host_cluster // self.block_entries
        return ri < len(self.reftable) and bool(self._block_offset(ri))

    # --- updating ------------------------------------------------------------------------
    def update(self, host_cluster: int, delta: int) -> int:
        """Add `delta` to a cluster's refcount; returns the new count. Refuses overflow/underflow."""
        ri, idx = divmod(host_cluster, self.block_entries)
        block = self._block_for_write(ri)
        old = block.entries[idx]
        new = old + delta
        if new > self.max_refcount:
            raise RefcountOverflowError(
                f"refcount of host cluster {host_cluster} (offset 0x{host_cluster << self.cluster_bits:x}) would "
                f"overflow: {old} + {delta} > {self.max_refcount} (refcount_bits {self.refcount_bits})")
        if new < 0:
            raise CorruptImageError(
                f"refcount of host cluster {host_cluster} (offset 0x{host_cluster << self.cluster_bits:x}) "
                f"would drop below zero: {old} {delta:+d}")
        block.entries[idx] = new
        block.mark(idx)
        if new == 0:
            if host_cluster < self.free_hint:
                self.free_hint = host_cluster
            if self.free_byte_offset and host_cluster == self.free_byte_offset >> self.cluster_bits:
                # The byte allocator's cluster is free now and may be handed out whole: packing
                # more payloads into its tail would write over whoever gets it (QEMU 7.2 does).
                self.free_byte_offset = 0
        return new

    def set_range(self, first_cluster: int, count: int, value: int) -> None:
        """Set the refcount of `count` clusters from `first_cluster` to `value` (used for fresh allocations)."""
        c = first_cluster
        end = first_cluster + count
        while c < end:
            ri, idx = divmod(c, self.block_entries)
            n = min(end - c, self.block_entries - idx)
            block = self._block_for_write(ri)
            if n == 1:  # (one new cluster: the common allocation)
                block.entries[idx] = value
            else:
                block.entries[idx:idx + n] = array(block.entries.typecode, [value]) * n
            block.mark(idx, idx + n)
            c += n

    def _block_for_write(self, ri: int) -> CachedTable:
        if ri >= len(self.reftable):
            self._grow_table(ri)
        off = self._block_offset(ri)
        if not off:
            off = self._alloc_block(ri)
        return self.cache.get(off)

    def _alloc_block(self, ri: int) -> int:
        """Append a new refcount block for table index `ri`; write and sync it before its table entry."""
        cluster = self.end_cluster
        self.end_cluster += 1
        off = cluster << self.cluster_bits
        self.metadata.add(cluster)
        block = self.cache.install(off)
        self_describing = cluster // self.block_entries == ri
        if self_describing:
            block.entries[cluster % self.block_entries] = 1
        else:
            # Counted in another block (allocated first if need be); that count must be on disk
            # before the table links this block, or a crash leaves a linked block with count 0.
            self.update(cluster, 1)
            self.cache.write_table(self.cache.get(self._block_offset(cluster // self.block_entries)))
        self.cache.write_table(block)
        self.host.sync()
        self.reftable[ri] = off
        self._write_reftable_entry(ri)
        return off

    def _write_reftable_entry(self, ri: int) -> None:
        lo, hi = TableCodec(64, len(self.reftable) * 8).sector_range(ri, ri + 1)
        data = TableCodec(64, 8).encode(self.reftable, lo, hi)
        self.host.pwrite(data, self.reftable_offset + lo * 8)

    def _grow_table(self, need_index: int) -> None:
        """Move the refcount table to a bigger, self-describing one at the end of the file."""
        cs, epb = self.cluster_size, self.block_entries
        old_entries = len(self.reftable)
        start = self.end_cluster
        n_entries = max(need_index + 1, old_entries * 2)
        new_blocks: list[int] = []  # reftable indices needing a new block
        while True:
            k = -(-n_entries * 8 // cs)
            total = k + len(new_blocks)
            first_ri = start // epb
            last_ri = (start + total - 1) // epb
            needed = [ri for ri in range(first_ri, last_ri + 1)
                      if ri >= old_entries or not self.reftable[ri]]
            if max([*needed, need_index]) >= n_entries:
                n_entries = max([*needed, need_index]) + 1
                continue
            if needed == new_blocks:
                break
            new_blocks = needed
        if k * cs > MAX_REFTABLE_BYTES:
            raise CorruptImageError(
                f"refcount table would grow to {k * cs} bytes, over the {MAX_REFTABLE_BYTES} byte limit")
        table_cluster = start
        block_clusters = {ri: start + k + i for i, ri in enumerate(new_blocks)}
        self.end_cluster = start + k + len(new_blocks)
        new_table = array("Q", bytes(k * cs))
        new_table[:old_entries] = self.reftable
        for ri, c in block_clusters.items():
            new_table[ri] = c << self.cluster_bits
            self.metadata.add(c)
        # Fill counts for the new table and blocks: new blocks in memory, old ones through the cache.
        new_block_tables = {ri: self.cache.install(c << self.cluster_bits) for ri, c in block_clusters.items()}
        for c in range(start, self.end_cluster):
            ri, idx = divmod(c, epb)
            if ri in new_block_tables:
                new_block_tables[ri].entries[idx] = 1
            else:
                b = self.cache.get(self._block_offset(ri))
                b.entries[idx] += 1
                b.mark(idx)
        for b in new_block_tables.values():
            self.cache.write_table(b)
        self.cache.write_dirty()
        raw = TableCodec(64, k * cs).encode(new_table, 0, len(new_table))
        self.host.pwrite(raw, table_cluster << self.cluster_bits)
        self.host.sync()
        old_offset, old_clusters = self.reftable_offset, self.reftable_clusters
        self.reftable = new_table
        self.reftable_offset = table_cluster << self.cluster_bits
        self.reftable_clusters = k
        for c in range(table_cluster, table_cluster + k):
            self.metadata.add(c)
        self.on_table_moved(self.reftable_offset, k)  # one header switch (ordering.switch_header)
        first_old = old_offset >> self.cluster_bits
        for c in range(first_old, first_old + old_clusters):
            self.metadata.discard(c)
            self.update(c, -1)

    def _keep_table_ahead(self, count: int) -> None:
        """Grow the refcount table before `count` appended clusters get near what it covers.

        The switch to a new table writes its offset (header bytes 48..55) and cluster count
        (56..59) in one header write. Were that write torn after the offset, the new table would
        be read with the old count; growing early, while the new table and its blocks still lie
        below what the old count covers, keeps that torn state as consistent as the other two.
        (Growth is by doubling; an image that arrives already too close grows late, as QEMU's do.)
        """
        epb = self.block_entries
        while True:
            covered = len(self.reftable) * epb
            growth = 2 * self.reftable_clusters + 2  # the doubled table and the blocks counting it
            if self.end_cluster + count + count // epb + 2 + growth <= covered:
                return
            if 2 * self.reftable_clusters * self.cluster_size > MAX_REFTABLE_BYTES:
                return  # no room to double: the late path grows exactly as far as needed
            self._grow_table(0)

    # --- allocation ----------------------------------------------------------------------
    def alloc_clusters(self, count: int) -> list[tuple[int, int]]:
        """Allocate `count` clusters with refcount 1; returns extents (first_cluster, n).

        Free clusters below the end of the file are reused first (lowest first, as runs),
        then the rest is appended as one contiguous extent.
        """
        extents: list[tuple[int, int]] = []
        remaining = count
        if not self.append_only:
            while remaining and self.free_hint < self.end_cluster:
                c = self._find_free(self.free_hint)
                if c is None:
                    self.free_hint = self.end_cluster
                    break
                n = 1
                limit = min(remaining, self.end_cluster - c)
                while n < limit and self.get(c + n) == 0:
                    n += 1
                self.set_range(c, n, 1)
                extents.append((c, n))
                remaining -= n
                self.free_hint = c + n
        if remaining:
            self._keep_table_ahead(remaining)
            c = self.end_cluster
            self.end_cluster += remaining
            self.set_range(c, remaining, 1)
            if self.free_hint >= c:  # nothing free below the old end, and the rest is taken now
                self.free_hint = self.end_cluster
            if extents and extents[-1][0] + extents[-1][1] == c:
                extents[-1] = (extents[-1][0], extents[-1][1] + remaining)
            else:
                extents.append((c, remaining))
        return extents

    def alloc_contiguous(self, count: int) -> int:
        """Allocate `count` adjacent clusters with refcount 1 (a table that must be contiguous:
        an L1 table, the snapshot table); returns the first. Reuses the lowest free run below the
        end of the file that is long enough, else appends."""
        if not self.append_only:
            c: int | None = self.free_hint
            while c is not None and c < self.end_cluster:
                c = self._find_free(c)
                if c is None:
                    break
                n = 1
                while n < count and c + n < self.end_cluster and self.get(c + n) == 0:
                    n += 1
                if n == count:
                    self.set_range(c, count, 1)
                    return c
                c += n + 1
        self._keep_table_ahead(count)
        first = self.end_cluster
        self.end_cluster += count
        self.set_range(first, count, 1)
        return first

    def _find_free(self, start: int) -> int | None:
        """Lowest cluster >= start, below end_cluster, with refcount 0."""
        epb = self.block_entries
        c = start
        while c < self.end_cluster:
            ri, idx = divmod(c, epb)
            if ri >= len(self.reftable):
                return c
            off = self._block_offset(ri)
            if not off:
                return c
            entries = self.cache.get(off).entries
            try:
                found = entries.index(0, idx)
            except ValueError:
                c = (ri + 1) * epb
                continue
            c = ri * epb + found
            return c if c < self.end_cluster else None
        return None

    def write_dirty(self) -> bool:
        """Write every dirty refcount block (no sync)."""
        return self.cache.write_dirty()

    def has_dirty(self) -> bool:
        """Whether refcount blocks have unwritten changes."""
        return self.cache.has_dirty()

    def make_durable(self) -> None:
        """Write every dirty refcount block and sync."""
        self.cache.make_durable()

    # --- deferred frees ------------------------------------------------------------------
    def frees_depend_on(self, dependency: Durable) -> None:
        """`dependency` (a table that drops references) must be durable before a deferred free."""
        self.free_dependencies.append(dependency)

    def defer_free(self, first_cluster: int, count: int = 1) -> None:
        """Queue a reference drop of `count` clusters from `first_cluster` (one each)."""
        if count == 1:
            self.deferred_frees.append(first_cluster)
        else:
            self.deferred_frees.extend(range(first_cluster, first_cluster + count))

    def release_deferred(self) -> list[int]:
        """Decrement the queued clusters once the tables that dropped them are durable.

        Returns the clusters whose count reached zero, sorted (free for reuse from now on).
        """
        if not self.deferred_frees:
            return []
        for dependency in self.free_dependencies:
            dependency.make_durable()
        freed = [c for c in self.deferred_frees if self.update(c, -1) == 0]
        self.deferred_frees.clear()
        freed.sort()
        return freed

    # --- byte allocation (compressed payloads) --------------------------------------------
    def alloc_bytes(self, length: int) -> int:
        """Host byte offset for a compressed payload of `length` bytes (QEMU's qcow2_alloc_bytes).

        Payloads are packed byte-contiguously: the next one starts at `free_byte_offset`, inside
        the host cluster the last one ended in. Every host cluster a payload touches gets one
        more reference. When the rest of the current cluster is too short, a new cluster is
        allocated; if it directly follows the current one, the payload crosses into it (the
        current cluster +1, the new one 1), else the payload starts at the new cluster. A
        cluster whose count is at the maximum takes no further payloads.

        Only the counts change here (in the refcount cache); the caller writes the payload and
        then the L2 entry, which the declared order keeps behind both.
        """
        cs, cbits = self.cluster_size, self.cluster_bits
        if not 0 < length < cs:
            raise ValueError(f"compressed payload of {length} bytes: must be 1 .. {cs - 1} (cluster size {cs})")
        offset = self.free_byte_offset
        if offset and self.get(offset >> cbits) in (0, self.max_refcount):
            offset = 0  # full count (or freed meanwhile, which update() already caught)
        if offset and cs - (offset & (cs - 1)) >= length:
            self.update(offset >> cbits, 1)
        else:
            (new_cluster, _), = self.alloc_clusters(1)
            if offset and (offset >> cbits) + 1 == new_cluster:
                self.update(offset >> cbits, 1)  # crosses into the new, contiguous cluster
            else:
                offset = new_cluster << cbits
        end = offset + length
        self.free_byte_offset = end if end & (cs - 1) else 0
        return offset
