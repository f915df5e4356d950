"""The write path: allocation with copy-on-write, zeroing, freeing (a layer of QcowFile).

A write is planned per L2 table: each guest cluster is either written in place (allocated,
COPIED, not compressed) or given a new host cluster. New clusters of one request are allocated
together and every host-contiguous run is written with one `pwritev` of [COW head, caller's
data, COW tail]. Copy-on-write reads go through the ordinary read path, so they take whatever
the cluster showed before: backing file, zeros, compressed or shared data; and they read only
the bytes the write does not cover (nothing for whole-cluster / whole-subcluster writes).

Ordering: guest data and refcount increments are written before the L2 entries that point at
them reach the disk (the L2 cache's write-back hook syncs first); dropped references are
queued in `_pending_frees` and their refcounts decremented only after the L2/L1 change is on
disk (see QcowFile._flush_locked). Everything here expects the caller to hold the image lock.
"""

from __future__ import annotations

from typing import Any

from .errors import CorruptImageError
from .format import (L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTER_ALL)
from .mapping import _ZEROS, MappingMixin

# entry bits that keep a cluster off the in-place fast path (COPIED itself must be set)
_FAST_WRITE_BAD = OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO | 0x3F000000000001FE


class WritingMixin(MappingMixin):
    """Allocating writes, zeroing and hole punching (a layer of QcowFile)."""

    refcounts: Any
    metadata: set[int]
    _pending_frees: list[int]
    _l1_dirty: set[int]

    # --- metadata overlap check ---------------------------------------------------------
    def _check_not_metadata(self, host_offset: int, length: int) -> None:
        """Refuse to write guest data over metadata; marks the image corrupt if it would."""
        if self._has_data_file:
            return
        cbits = self.cluster_bits
        first = host_offset >> cbits
        last = (host_offset + length - 1) >> cbits
        meta = self.metadata
        for c in range(first, last + 1):
            if c in meta or c == 0:
                self._mark_corrupt(
                    f"Preventing invalid write on metadata: guest data write to host offset 0x{c << cbits:x} "
                    f"overlaps {self._describe_metadata(c)}")

    def _describe_metadata(self, host_cluster: int) -> str:  # refined by the facade
        return "metadata"

    def _mark_corrupt(self, message: str) -> None:  # provided by the facade
        raise CorruptImageError(message)

    # --- L2 tables for writing ----------------------------------------------------------
    def _l2_for_write(self, l1_index: int) -> Any:
        """The L2 table for `l1_index`, allocated or copied so it may be modified in place."""
        off = self._l2_table_offset(l1_index)
        e = self.l1[l1_index]
        if off and e & OFLAG_COPIED:
            return self.l2_cache.get(off)
        if off:
            rc = self.refcounts.get(off >> self.cluster_bits)
            if rc == 1:  # COPIED flag was just missing: fix the flag
                self.l1[l1_index] = off | OFLAG_COPIED
                self._l1_dirty.add(l1_index)
                return self.l2_cache.get(off)
            old = self.l2_cache.get(off).entries
        else:
            old = None
        (c, _), = self.refcounts.alloc_clusters(1)
        new_off = c << self.cluster_bits
        self._check_not_metadata(new_off, self.cluster_size)
        self.metadata.add(c)
        self._grow_limit(new_off + self.cluster_size)
        if old is None:
            table = self.l2_cache.install_new(new_off)
        else:
            table = self.l2_cache.install(new_off, type(old)(old.typecode, old))
            self._pending_frees.append(off >> self.cluster_bits)
        self.l1[l1_index] = new_off | OFLAG_COPIED
        self._l1_dirty.add(l1_index)
        return table

    def _grow_limit(self, end: int) -> None:
        if end > self._alloc_limit:
            self._alloc_limit = end

    # --- writing ------------------------------------------------------------------------
    def _write_locked(self, guest_offset: int, mv: memoryview) -> None:
        """Write all of `mv` at `guest_offset` (bounds already checked)."""
        if self._write_fast(guest_offset, mv):
            return
        n = len(mv)
        span = self.cluster_size * self.l2_entries
        pos = 0
        while pos < n:
            g = guest_offset + pos
            l1i = (g >> self.cluster_bits) // self.l2_entries
            chunk = min(n - pos, (l1i + 1) * span - g)
            table = self._l2_for_write(l1i)
            self._write_in_table(table, g, mv[pos:pos + chunk])
            pos += chunk

    def _write_fast(self, guest_offset: int, mv: memoryview) -> bool:
        """The two common writes without planning; False when the general path is needed.

        Both stay inside one cached, exclusively owned standard L2 table: (a) an overwrite of
        host-contiguous allocated clusters, written in place with one pwritev; (b) a
        cluster-aligned write over unallocated clusters, which needs no copy-on-write at all.
        """
        if self.extended_l2 or self._has_data_file:
            return False
        n = len(mv)
        cbits = self.cluster_bits
        cs = self.cluster_size
        first = guest_offset >> cbits
        last = (guest_offset + n - 1) >> cbits
        l1i, l2i = divmod(first, self.l2_entries)
        if (last // self.l2_entries) != l1i:
            return False
        l1e = self.l1[l1i]
        if not l1e & OFLAG_COPIED:
            return False
        table = self.l2_tables_get(l1e & L2E_OFFSET_MASK)
        if table is None:
            return False
        entries = table.entries
        count = last - first + 1
        e = entries[l2i]
        if e & _FAST_WRITE_BAD == OFLAG_COPIED and e & L2E_OFFSET_MASK:  # (a) in place
            expect = e
            for k in range(l2i + 1, l2i + count):
                expect += cs
                if entries[k] != expect:
                    return False
            host = (e & L2E_OFFSET_MASK) + (guest_offset & (cs - 1))
            if (expect & L2E_OFFSET_MASK) + cs > self._alloc_limit:
                return False
            self._check_not_metadata(host, n)
            self._pwritev_data([mv], host, host + n)
            return True
        if guest_offset & (cs - 1) or n & (cs - 1):
            return False
        for k in range(l2i, l2i + count):  # (b) all unallocated, whole clusters
            if entries[k]:
                return False
        pos = 0
        k = l2i
        for c, m in self.refcounts.alloc_clusters(count):
            host = c << cbits
            self._check_not_metadata(host, m << cbits)
            self._pwritev_data([mv[pos:pos + (m << cbits)]], host, host + (m << cbits))
            for i in range(m):
                entries[k + i] = (host + (i << cbits)) | OFLAG_COPIED
            k += m
            pos += m << cbits
        table.mark(l2i, l2i + count)
        return True

    def _write_in_table(self, table: Any, guest_offset: int, mv: memoryview) -> None:
        cs = self.cluster_size
        cbits = self.cluster_bits
        ext = self.extended_l2
        entries = table.entries
        end = guest_offset + len(mv)
        # plan: [l2_index, a, b, region_start, region_end, host_or_None, new_entry_flags, new_bitmap, src_pos]
        plans: list[list[Any]] = []
        to_alloc = 0
        pos = guest_offset
        src = 0
        while pos < end:
            gc = pos >> cbits
            l2i = gc % self.l2_entries
            a = pos & (cs - 1)
            b = min(cs, a + end - pos)
            if ext:
                e, bitmap = entries[2 * l2i], entries[2 * l2i + 1]
            else:
                e, bitmap = entries[l2i], 0
            plan = self._plan_cluster(e, bitmap, gc, a, b)
            plan[0] = l2i
            plan.append(src)
            if plan[5] is None:
                to_alloc += 1
            plans.append(plan)
            src += b - a
            pos += b - a
        # Copy-on-write pieces are read before any entry of this request changes.
        pieces: list[list[Any]] = []
        for p in plans:
            l2i, a, b, ra, rb = p[0], p[1], p[2], p[3], p[4]
            gbase = (guest_offset & ~((cs * self.l2_entries) - 1)) + l2i * cs
            bufs: list[Any] = []
            if ra < a:
                bufs.append(self._cow_read(gbase + ra, a - ra))
            bufs.append(mv[p[8]:p[8] + (b - a)])
            if b < rb:
                bufs.append(self._cow_read(gbase + b, rb - b))
            pieces.append(bufs)
        if to_alloc:
            hosts = iter(self._alloc_data_clusters([p for p in plans if p[5] is None], guest_offset))
            for p in plans:
                if p[5] is None:
                    p[5] = next(hosts)
        # Write host-contiguous runs with one pwritev each.
        run_bufs: list[Any] = []
        run_start = -1
        run_end = -1
        for p, bufs in zip(plans, pieces):
            h = p[5] + p[3]
            if not self._has_data_file:
                self._check_not_metadata(h, p[4] - p[3])
            if run_bufs and h == run_end:
                run_bufs.extend(bufs)
                run_end = h + (p[4] - p[3])
            else:
                if run_bufs:
                    self._pwritev_data(run_bufs, run_start, run_end)
                run_bufs = list(bufs)
                run_start, run_end = h, h + (p[4] - p[3])
        if run_bufs:
            self._pwritev_data(run_bufs, run_start, run_end)
        # Then the entries (the cache writes them after the data is durable).
        for p in plans:
            l2i = p[0]
            new_e = p[5] | OFLAG_COPIED | p[6]
            if ext:
                old_e = entries[2 * l2i]
                entries[2 * l2i] = new_e
                entries[2 * l2i + 1] = p[7]
                table.mark(2 * l2i, 2 * l2i + 2)
            else:
                old_e = entries[l2i]
                entries[l2i] = new_e
                table.mark(l2i)
            if (old_e & ~OFLAG_ZERO) != (new_e & ~OFLAG_ZERO) or (old_e & OFLAG_COMPRESSED):
                self._queue_free_entry(old_e, p[5])

    def _pwritev_data(self, bufs: list[Any], host_start: int, host_end: int) -> None:
        self.data_host.pwritev(bufs, host_start)
        self._data_unsynced = True
        if self._has_data_file:
            if host_end > self._data_file_limit:
                self._data_file_limit = host_end
        else:
            self._grow_limit(host_end)

    def _cow_read(self, guest_offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self._readinto_locked(memoryview(buf), guest_offset)
        return bytes(buf)

    def _plan_cluster(self, e: int, bitmap: int, gc: int, a: int, b: int) -> list[Any]:
        """Decide how to write [a, b) of guest cluster gc.

        Returns [_, a, b, region_start, region_end, host_offset_or_None, entry_flags, new_bitmap].
        region is the part of the host cluster written (data plus COW head/tail).
        """
        cs = self.cluster_size
        compressed = bool(e & OFLAG_COMPRESSED)
        host = 0 if compressed else self._data_offset(e, gc)
        allocated = not compressed and (host or (self._has_data_file and e & OFLAG_COPIED))
        writable_in_place = bool(allocated) and self._cluster_exclusive(e, host)
        if not self.extended_l2:
            if writable_in_place:
                if e & OFLAG_ZERO:  # preallocated zero cluster: the rest must read as zeros
                    return [0, a, b, 0, cs, host, 0, 0]
                return [0, a, b, a, b, host, 0, 0]
            return [0, a, b, 0, cs, None, 0, 0]
        if not compressed:
            self._bitmap_check(e, bitmap, gc)
        ssize = 1 << self._sub_bits
        s0, s1 = a // ssize, -(-b // ssize)
        mask = ((1 << (s1 - s0)) - 1) << s0
        alloc = bitmap & SUBCLUSTER_ALL
        zero = bitmap >> 32
        if writable_in_place:
            ra = a if alloc >> s0 & 1 else s0 * ssize
            rb = b if alloc >> (s1 - 1) & 1 else s1 * ssize
            return [0, a, b, ra, rb, host, 0, (alloc | mask) | ((zero & ~mask) << 32)]
        if allocated or compressed:  # shared or compressed: copy the whole cluster
            return [0, a, b, 0, cs, None, 0, SUBCLUSTER_ALL]
        return [0, a, b, s0 * ssize, s1 * ssize, None, 0, mask | ((zero & ~mask) << 32)]

    def _cluster_exclusive(self, e: int, host: int) -> bool:
        """Whether an allocated cluster may be written in place (refcount 1)."""
        if e & OFLAG_COPIED:
            return True
        if self._has_data_file:
            return True
        return self.refcounts.get(host >> self.cluster_bits) == 1

    def _alloc_data_clusters(self, plans: list[list[Any]], guest_offset: int) -> list[int]:
        """Host offsets for the clusters of `plans` that need new clusters, in order."""
        cbits = self.cluster_bits
        if self._has_data_file:  # an external data file maps guest offset == host offset
            base = (guest_offset >> cbits) // self.l2_entries * self.l2_entries
            return [(base + p[0]) << cbits for p in plans]
        out: list[int] = []
        for first, count in self.refcounts.alloc_clusters(len(plans)):
            out.extend((first + i) << cbits for i in range(count))
        return out

    def _queue_free_entry(self, e: int, new_host: int) -> None:
        """Queue the clusters an overwritten entry referenced for a deferred refcount decrement."""
        if self._has_data_file:
            return
        cbits = self.cluster_bits
        if e & OFLAG_COMPRESSED:
            off, length = self._compressed_location(e, -1)
            first = off >> cbits
            last = (off + length - 1) >> cbits
            self._pending_frees.extend(range(first, last + 1))
            return
        host = e & L2E_OFFSET_MASK
        if host and host != new_host:
            self._pending_frees.append(host >> cbits)

    # --- zeroing ------------------------------------------------------------------------
    def _zero_locked(self, guest_offset: int, length: int, punch: bool) -> None:
        """Make [guest_offset, +length) read as zeros, freeing whole clusters where possible."""
        end = guest_offset + length
        g = 1 << self._sub_bits
        head_end = min(end, -(-guest_offset // g) * g)
        tail_start = max(head_end, end // g * g)
        self._write_zero_bytes(guest_offset, head_end - guest_offset)
        self._write_zero_bytes(tail_start, end - tail_start)
        mid, mid_end = head_end, tail_start
        if mid >= mid_end:
            return
        if self._has_data_file or (self._v2 and self.backing is not None):
            # The data file must keep reading as zeros (raw view); v2 has no zero flag.
            self._write_zero_bytes(mid, mid_end - mid)
            if self._has_data_file and punch:
                cs = self.cluster_size
                a, b = -(-mid // cs) * cs, mid_end // cs * cs
                if b > a:
                    self.data_host.punch_hole(a, b - a)
            return
        span = self.cluster_size * self.l2_entries
        pos = mid
        while pos < mid_end:
            l1i = (pos >> self.cluster_bits) // self.l2_entries
            chunk_end = min(mid_end, (l1i + 1) * span)
            if self.backing is None and (l1i >= len(self.l1) or not self.l1[l1i]):
                pos = chunk_end  # no table, no backing: already reads as zeros
                continue
            table = self._l2_for_write(l1i)
            self._zero_in_table(table, pos, chunk_end)
            pos = chunk_end

    def _zero_in_table(self, table: Any, start: int, end: int) -> None:
        cs = self.cluster_size
        cbits = self.cluster_bits
        entries = table.entries
        ext = self.extended_l2
        zero_flag = OFLAG_ZERO if (self.backing is not None and not self._v2) else 0
        pos = start
        while pos < end:
            gc = pos >> cbits
            l2i = gc % self.l2_entries
            a = pos & (cs - 1)
            b = min(cs, a + end - pos)
            if not ext:
                old = entries[l2i]
                entries[l2i] = zero_flag
                table.mark(l2i)
                self._queue_free_entry(old, 0)
            else:
                old, bitmap = entries[2 * l2i], entries[2 * l2i + 1]
                ssize = 1 << self._sub_bits
                s0, s1 = a // ssize, b // ssize
                mask = ((1 << (s1 - s0)) - 1) << s0
                if a == 0 and b == cs:
                    entries[2 * l2i] = 0
                    entries[2 * l2i + 1] = (SUBCLUSTER_ALL << 32) if self.backing is not None else 0
                    self._queue_free_entry(old, 0)
                elif old & OFLAG_COMPRESSED or ((old & L2E_OFFSET_MASK) and not self._cluster_exclusive(old, old & L2E_OFFSET_MASK)):
                    self._write_zero_bytes(pos, b - a)  # shared/compressed: copy-on-write zeros
                    pos += b - a
                    continue
                else:
                    self._data_offset(old, gc)
                    self._bitmap_check(old, bitmap, gc)
                    alloc = (bitmap & SUBCLUSTER_ALL) & ~mask
                    zero = ((bitmap >> 32) | mask) if self.backing is not None else ((bitmap >> 32) & ~mask)
                    if not alloc and old & L2E_OFFSET_MASK:
                        entries[2 * l2i] = 0
                        self._queue_free_entry(old, 0)
                    entries[2 * l2i + 1] = alloc | (zero << 32)
                table.mark(2 * l2i, 2 * l2i + 2)
            pos += b - a

    def _write_zero_bytes(self, guest_offset: int, length: int) -> None:
        pos = 0
        while pos < length:
            n = min(length - pos, len(_ZEROS))
            self._write_locked(guest_offset + pos, memoryview(_ZEROS)[:n])
            pos += n
