"""Mapping: guest ranges -> runs of host data, zeros, backing reads and compressed clusters.

`MappingMixin` is one layer of `QcowFile` (the facade inherits it). It owns the active L1 table,
the L2 cache, entry validation and the read path. A request is first translated into runs,
merging host-contiguous clusters, and each data run is then served with one `preadv` straight
into the caller's buffer; zero runs are filled without reading. Everything here expects the
caller to hold the image lock.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Any

from .cache import TableCache
from .compress import decompress_cluster
from .errors import CorruptImageError
from .format import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_RESERVED_MASK, OFLAG_COMPRESSED,
                     OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTER_ALL, Header)
from .hostio import HostFile
from .image import LayerExtent

RUN_DATA = 0
RUN_ZERO = 1
RUN_BACKING = 2
RUN_COMPRESSED = 3
# Host slot of a zero or backing run whose cluster has no host offset. Those runs carry the host
# offset when there is one (a preallocated zero cluster, an unallocated subcluster of an allocated
# cluster): QEMU reports it, and `qemu-img map` shows it.
NO_HOST = -1

_ZEROS = bytes(1 << 21)
_L2E_RESERVED_EXTL2 = L2E_RESERVED_MASK | OFLAG_ZERO


def fill_zeros(mv: memoryview, start: int, end: int) -> None:
    """Zero mv[start:end] at C speed from a shared zero block."""
    while start < end:
        n = min(end - start, len(_ZEROS))
        mv[start:start + n] = _ZEROS[:n]
        start += n


def _add_run(runs: list[list[int]], last: list[int] | None, kind: int, length: int, host: int,
             guest_cluster: int) -> list[int]:
    """Append a run, or extend the last one when it is the same kind and continues it.

    Runs with a host offset extend only host-contiguously; runs without one (NO_HOST) only runs
    without one.
    """
    if last is not None and last[0] == kind and kind != RUN_COMPRESSED and (
            last[2] + last[1] == host if host != NO_HOST and last[2] != NO_HOST else last[2] == host):
        last[1] += length
        return last
    last = [kind, length, host, guest_cluster]
    runs.append(last)
    return last


class MappingMixin:
    """Address translation and the read path (a layer of QcowFile)."""

    header: Header
    filename: str
    host: HostFile
    data_host: HostFile
    backing: Any
    l1: array
    l2_cache: TableCache
    cluster_bits: int
    cluster_size: int
    l2_entries: int
    extended_l2: bool
    virtual_size: int
    _alloc_limit: int

    def _init_mapping(self) -> None:
        self._compressed_cache: OrderedDict[int, bytes] = OrderedDict()
        self._sub_bits = self.cluster_bits - 5 if self.extended_l2 else self.cluster_bits
        self._has_data_file = self.header.has_data_file
        self._v2 = self.header.version < 3
        cb = self.cluster_bits
        self._comp_x = 62 - (cb - 8)
        self._comp_off_mask = (1 << self._comp_x) - 1
        self._comp_sec_mask = (1 << (cb - 8)) - 1

    # --- entries ------------------------------------------------------------------------
    def _l2_table_offset(self, l1_index: int) -> int:
        """Validated L2 table offset for an L1 index (0 = no table)."""
        e = self.l1[l1_index]
        if not e:
            return 0
        if e & L1E_RESERVED_MASK:
            raise CorruptImageError(
                f"L1 entry {l1_index} = 0x{e:x} has reserved bits set (mask 0x{L1E_RESERVED_MASK:x})")
        off = e & L1E_OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise CorruptImageError(f"L2 table offset 0x{off:x} unaligned (L1 index: {l1_index})")
        if off + self.cluster_size > self._alloc_limit:
            raise CorruptImageError(
                f"L2 table offset 0x{off:x} (L1 index: {l1_index}) lies past the end of the file ({self._alloc_limit} bytes)")
        if off < self.cluster_size:
            raise CorruptImageError(f"L2 table offset 0x{off:x} (L1 index: {l1_index}) overlaps the header")
        return off

    def _data_offset(self, e: int, guest_cluster: int) -> int:
        """Validated host offset of a standard (non-compressed) L2 entry; 0 when unallocated."""
        if e & (_L2E_RESERVED_EXTL2 if self.extended_l2 else L2E_RESERVED_MASK):
            raise CorruptImageError(
                f"L2 entry for guest cluster {guest_cluster} = 0x{e:x} has reserved bits set")
        off = e & L2E_OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise CorruptImageError(
                f"Cluster allocation offset 0x{off:x} unaligned (guest cluster {guest_cluster}, cluster size {self.cluster_size})")
        if off and off >= self._data_limit():
            raise CorruptImageError(
                f"Cluster allocation offset 0x{off:x} (guest cluster {guest_cluster}) lies past the end of the "
                f"{'data file' if self._has_data_file else 'file'} ({self._data_limit()} bytes)")
        return off

    def _data_limit(self) -> int:
        return self._data_file_limit if self._has_data_file else self._alloc_limit

    def _compressed_location(self, e: int, guest_cluster: int) -> tuple[int, int]:
        """(host byte offset, byte count to read) of a compressed cluster descriptor."""
        if e & OFLAG_COPIED:
            raise CorruptImageError(
                f"L2 entry for guest cluster {guest_cluster} = 0x{e:x}: copied flag must never be set for compressed clusters")
        off = e & self._comp_off_mask
        sectors = (e >> self._comp_x) & self._comp_sec_mask
        length = (sectors + 1) * 512 - (off & 511)
        if off < self.cluster_size or off >= self._alloc_limit:
            raise CorruptImageError(
                f"compressed cluster offset 0x{off:x} (guest cluster {guest_cluster}) lies outside the file "
                f"(header cluster .. {self._alloc_limit} bytes)")
        return off, length

    def _decompressed(self, e: int, guest_cluster: int) -> bytes:
        """The decoded contents of a compressed cluster (small LRU keyed by descriptor)."""
        data = self._compressed_cache.get(e)
        if data is not None:
            self._compressed_cache.move_to_end(e)
            return data
        off, length = self._compressed_location(e, guest_cluster)
        payload = self.host.pread(length, off)
        data = decompress_cluster(payload, self.cluster_size, self.header.compression_type,
                                  f"guest cluster {guest_cluster}, host offset 0x{off:x}")
        self._compressed_cache[e] = data
        if len(self._compressed_cache) > 16:
            self._compressed_cache.popitem(last=False)
        return data

    def _bitmap_check(self, e: int, bitmap: int, guest_cluster: int) -> None:
        alloc = bitmap & SUBCLUSTER_ALL
        if alloc & (bitmap >> 32):
            raise CorruptImageError(
                f"Invalid cluster entry found: guest cluster {guest_cluster} subcluster bitmap 0x{bitmap:016x} "
                f"marks subclusters both allocated and zero")
        if alloc and not (e & L2E_OFFSET_MASK) and not (self._has_data_file and e & OFLAG_COPIED):
            raise CorruptImageError(
                f"Invalid cluster entry found: guest cluster {guest_cluster} has allocated subclusters "
                f"(bitmap 0x{bitmap:016x}) but no host offset")

    # --- runs ---------------------------------------------------------------------------
    def _get_host_runs(self, guest_offset: int, length: int) -> list[list[int]]:
        """Translate [guest_offset, +length) into runs [kind, length, host_offset_or_entry, guest_cluster].

        The host slot: data runs, the host offset; compressed runs, the L2 entry; zero and
        backing runs, the host offset of a cluster that has one, else NO_HOST. Runs with a host
        offset are merged while host-contiguous, the others while adjacent.
        """
        runs: list[list[int]] = []
        cbits = self.cluster_bits
        cs = self.cluster_size
        l2n = self.l2_entries
        span = cs * l2n
        end = guest_offset + length
        pos = guest_offset
        ext = self.extended_l2
        last: list[int] | None = None
        while pos < end:
            gc = pos >> cbits
            l1i, l2i = divmod(gc, l2n)
            table_end = min(end, (l1i + 1) * span)
            l2off = self._l2_table_offset(l1i) if l1i < len(self.l1) else 0
            if not l2off:
                n = table_end - pos
                if last is not None and last[0] == RUN_BACKING and last[2] == NO_HOST:
                    last[1] += n
                else:
                    last = [RUN_BACKING, n, NO_HOST, gc]
                    runs.append(last)
                pos = table_end
                continue
            entries = self.l2_cache.get(l2off).entries
            if not ext:
                last = self._standard_runs(runs, last, entries, pos, table_end, l2i)
                pos = table_end
                continue
            while pos < table_end:
                inc = pos & (cs - 1)
                n = min(cs - inc, table_end - pos)
                e = entries[2 * l2i]
                bitmap = entries[2 * l2i + 1]
                gc = pos >> cbits
                if e & OFLAG_COMPRESSED:
                    if bitmap:
                        raise CorruptImageError(
                            f"Invalid cluster entry found: compressed guest cluster {gc} has subcluster bitmap 0x{bitmap:x}")
                    last = [RUN_COMPRESSED, n, e, gc]
                    runs.append(last)
                    pos += n
                    l2i += 1
                    continue
                host = self._data_offset(e, gc)
                self._bitmap_check(e, bitmap, gc)
                if bitmap & SUBCLUSTER_ALL != SUBCLUSTER_ALL:
                    if not host and not (self._has_data_file and e & OFLAG_COPIED):
                        host = NO_HOST  # an unallocated cluster (offset 0 is real in a data file)
                    last = self._subcluster_runs(runs, last, pos, n, host, bitmap, gc)
                else:
                    last = _add_run(runs, last, RUN_DATA, n, host + inc, gc)
                pos += n
                l2i += 1
        return runs

    def _standard_runs(self, runs: list[list[int]], last: list[int] | None, entries: array, pos: int,
                       end: int, l2i: int) -> list[int] | None:
        """Runs for [pos, end) within one standard L2 table starting at entry l2i.

        Runs of identical-kind entries are swallowed in a tight loop (a host-contiguous data run
        is a run of entries each one cluster above the last), so the per-cluster cost is one
        comparison; only the first and last entry of a run are decoded and validated.
        """
        cs = self.cluster_size
        cbits = self.cluster_bits
        data_file = self._has_data_file
        while pos < end:
            inc = pos & (cs - 1)
            gc = pos >> cbits
            stop = l2i + ((end - pos + inc + cs - 1) >> cbits)  # entries this table still serves
            e = entries[l2i]
            k = l2i + 1
            if e & OFLAG_COMPRESSED:
                n = min(cs - inc, end - pos)
                last = [RUN_COMPRESSED, n, e, gc]
                runs.append(last)
                pos += n
                l2i = k
                continue
            host = self._data_offset(e, gc)
            if e & OFLAG_ZERO:
                if self._v2:
                    raise CorruptImageError(f"L2 entry for guest cluster {gc} = 0x{e:x}: zero flag in a version 2 image")
                kind = RUN_ZERO
                if host:  # preallocated zero clusters keep their host offset: host-contiguous only
                    expect = e + cs
                    while k < stop and entries[k] == expect:
                        expect += cs
                        k += 1
                    if k - l2i > 1:
                        self._data_offset(expect - cs, gc + k - l2i - 1)
                else:
                    zero_mask = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED_MASK | L2E_OFFSET_MASK
                    while k < stop and entries[k] & zero_mask == OFLAG_ZERO:
                        k += 1
            elif host or (data_file and e & OFLAG_COPIED):
                kind = RUN_DATA
                expect = e + cs
                while k < stop and entries[k] == expect:
                    expect += cs
                    k += 1
                if k - l2i > 1:
                    self._data_offset(expect - cs, gc + k - l2i - 1)
            else:
                kind = RUN_BACKING
                while k < stop and not entries[k]:
                    k += 1
            n = min(((k - l2i) << cbits) - inc, end - pos)
            has_host = kind == RUN_DATA or (kind == RUN_ZERO and host)
            last = _add_run(runs, last, kind, n, host + inc if has_host else NO_HOST, gc)
            pos += n
            l2i = k
        return last

    def _subcluster_runs(self, runs: list[list[int]], last: list[int] | None, pos: int, n: int, host: int,
                         bitmap: int, gc: int) -> list[int] | None:
        """Runs for [pos, pos+n) within one extended-L2 cluster (`host` NO_HOST if unallocated)."""
        sbits = self._sub_bits
        ssize = 1 << sbits
        cmask = self.cluster_size - 1
        end = pos + n
        while pos < end:
            inc = pos & cmask
            sc = inc >> sbits
            m = min(ssize - (inc & (ssize - 1)), end - pos)
            h = NO_HOST if host == NO_HOST else host + inc
            if bitmap >> sc & 1:
                kind = RUN_DATA
            elif bitmap >> (32 + sc) & 1:
                kind = RUN_ZERO
            else:
                kind = RUN_BACKING
            last = _add_run(runs, last, kind, m, h, gc)
            pos += m
        return last

    # --- reading ------------------------------------------------------------------------
    def _readinto_locked(self, mv: memoryview, guest_offset: int) -> None:
        """Fill all of `mv` (already clipped to the disk) with guest data from `guest_offset`."""
        n = len(mv)
        if n == 0:
            return
        cs = self.cluster_size
        # Fast path: one cluster of plain data (the common small random read).
        if (guest_offset & (cs - 1)) + n <= cs and not self.extended_l2:
            l1i, l2i = divmod(guest_offset >> self.cluster_bits, self.l2_entries)
            if l1i < len(self.l1):
                l1e = self.l1[l1i]
                if l1e and not (l1e & L1E_RESERVED_MASK):
                    table = self.l2_cache.peek(l1e & L1E_OFFSET_MASK)
                    if table is not None:
                        e = table.entries[l2i]
                        if not (e & (OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED_MASK)) and e & L2E_OFFSET_MASK:
                            host = self._data_offset(e, guest_offset >> self.cluster_bits)
                            got = self.data_host.preadv([mv], host + (guest_offset & (cs - 1)))
                            if got < n:
                                fill_zeros(mv, got, n)
                            return
        self._execute_runs(mv, guest_offset, self._get_host_runs(guest_offset, n))

    def _execute_runs(self, mv: memoryview, guest_offset: int, runs: list[list[int]]) -> None:
        """Serve runs into mv: one preadv per data run, zero fills, backing reads, decompression."""
        cs = self.cluster_size
        pos = 0
        goff = guest_offset
        for kind, length, host, gc in runs:
            if kind == RUN_DATA:
                got = self.data_host.preadv([mv[pos:pos + length]], host)
                if got < length:  # a cluster cut short by the end of the file reads as zeros
                    fill_zeros(mv, pos + got, pos + length)
            elif kind == RUN_ZERO:
                fill_zeros(mv, pos, pos + length)
            elif kind == RUN_BACKING:
                got = 0
                if self.backing is not None:
                    got = self.backing.readinto_at(mv[pos:pos + length], goff)
                if got < length:
                    fill_zeros(mv, pos + got, pos + length)
            else:
                data = self._decompressed(host, gc)
                inc = goff & (cs - 1)
                mv[pos:pos + length] = data[inc:inc + length]
            pos += length
            goff += length

    def _read_bytes_locked(self, guest_offset: int, n: int) -> bytes:
        """Guest bytes as a new bytes object; a single data run is one os.pread (no extra copy)."""
        runs = self._get_host_runs(guest_offset, n)
        if len(runs) == 1 and runs[0][0] == RUN_DATA:
            data = self.data_host.pread(n, runs[0][2])
            if len(data) == n:
                return data
        buf = bytearray(n)
        self._execute_runs(memoryview(buf), guest_offset, runs)
        return bytes(buf)

    # --- block status -------------------------------------------------------------------
    def layer_status(self, guest_offset: int, length: int) -> list[LayerExtent]:
        """What this qcow2 layer alone says about [guest_offset, +length) (QEMU's qcow2_co_block_status).

        One LayerExtent per run, covering the range exactly, by QEMU's (sub)cluster types:
        data (NORMAL): allocated, data, host offset, probe_holes; a zero cluster or subcluster:
        allocated, zero, with its host offset when it has one (ZERO_ALLOC: a preallocated zero
        cluster, or a zero subcluster of an allocated cluster), without it (ZERO_PLAIN);
        compressed: allocated, data, compressed, no host offset; unallocated: not allocated, with
        the host offset of its cluster when that is allocated (UNALLOCATED_ALLOC: extended L2)
        or none. The host file is the external data file (named as stored) when there is one.
        Expects the caller to hold the image lock.
        """
        path = self.header.data_file if self._has_data_file else self.filename
        out: list[LayerExtent] = []
        for kind, n, host, _gc in self._get_host_runs(guest_offset, length):
            if kind == RUN_DATA:
                out.append(LayerExtent(n, True, False, True, host, False, path, True))
            elif kind == RUN_COMPRESSED:
                out.append(LayerExtent(n, True, False, True, None, True))
            elif host == NO_HOST:
                out.append(LayerExtent(n, kind == RUN_ZERO, kind == RUN_ZERO, False))
            else:
                out.append(LayerExtent(n, kind == RUN_ZERO, kind == RUN_ZERO, False, host, False, path))
        return out
