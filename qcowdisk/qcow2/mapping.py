"""Mapping: guest ranges -> runs of host data, zeros, backing reads and compressed clusters.

A request is translated into `Run`s first, merging host-contiguous data clusters and adjacent
zero or unallocated ones, so the read path serves each data run with one `preadv` and the
block status reports each run once. Every entry is validated here before it is followed (the
table entries come from an untrusted file). Everything here expects the caller to hold the
image lock.
"""

from __future__ import annotations

from array import array

from ..errors import CorruptImageError
from ..record import Record
from .entries import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_NOT_PLAIN_DATA,
    L2E_OFFSET_MASK,
    L2E_RESERVED_MASK,
    L2E_RESERVED_MASK_EXTL2,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTER_ALL,
    bitmap_allocated,
    bitmap_zero,
)
from .state import Qcow2State

RUN_DATA = 0        # stored uncompressed at `host` (host byte offset of the run's first byte)
RUN_ZERO = 1        # reads as zeros (zero flag or subcluster zero bits)
RUN_BACKING = 2     # unallocated here: the backing file's bytes, zeros without one
RUN_COMPRESSED = 3  # part of one compressed cluster; `host` is the L2 entry (the descriptor)
# `host` of a zero or backing run whose cluster has no host offset. Those runs carry the host
# offset when there is one (a preallocated zero cluster, an unallocated or zero subcluster of an
# allocated cluster): QEMU reports it, and `qemu-img map` shows it. (0 is a real offset in an
# external data file, so it cannot mean "none".)
NO_HOST = -1


class Run(Record):
    """A guest range with one way of being read. Runs of a request are contiguous in guest space."""

    __slots__ = ("guest_cluster", "host", "kind", "length")
    kind: int
    length: int
    host: int           # see the RUN_* kinds
    guest_cluster: int  # of the run's first byte (for messages and compressed decoding)

    def __init__(self, kind: int, length: int, host: int, guest_cluster: int) -> None:
        self.kind = kind
        self.length = length
        self.host = host
        self.guest_cluster = guest_cluster


def _add_run(runs: list[Run], last: Run | None, kind: int, length: int, host: int, guest_cluster: int) -> Run:
    """Append a run, or extend the last one when it is the same kind and continues it.

    Runs with a host offset extend only host-contiguously; runs without one (NO_HOST) only runs
    without one.
    """
    if last is not None and last.kind == kind and kind != RUN_COMPRESSED and (
            last.host + last.length == host if host != NO_HOST and last.host != NO_HOST else last.host == host):
        last.length += length
        return last
    last = Run(kind, length, host, guest_cluster)
    runs.append(last)
    return last


# --- entries -------------------------------------------------------------------------------
def l2_table_offset(s: Qcow2State, l1_index: int) -> int:
    """Validated L2 table offset for an L1 index (0 = no table)."""
    e = s.l1.entries[l1_index]
    if not e:
        return 0
    if e & L1E_RESERVED_MASK:
        raise CorruptImageError(
            f"L1 entry {l1_index} = 0x{e:x} has reserved bits set (mask 0x{L1E_RESERVED_MASK:x})")
    off = e & L1E_OFFSET_MASK
    if off & s.cluster_mask:
        raise CorruptImageError(f"L2 table offset 0x{off:x} unaligned (L1 index: {l1_index})")
    if off + s.cluster_size > s.alloc_limit:
        raise CorruptImageError(
            f"L2 table offset 0x{off:x} (L1 index: {l1_index}) lies past the end of the file ({s.alloc_limit} bytes)")
    if off < s.cluster_size:
        raise CorruptImageError(f"L2 table offset 0x{off:x} (L1 index: {l1_index}) overlaps the header")
    return off


def data_offset(s: Qcow2State, e: int, guest_cluster: int) -> int:
    """Validated host offset of a standard (non-compressed) L2 entry; 0 when unallocated."""
    if e & (L2E_RESERVED_MASK_EXTL2 if s.extended_l2 else L2E_RESERVED_MASK):
        raise CorruptImageError(f"L2 entry for guest cluster {guest_cluster} = 0x{e:x} has reserved bits set")
    off = e & L2E_OFFSET_MASK
    if off & s.cluster_mask:
        raise CorruptImageError(
            f"Cluster allocation offset 0x{off:x} unaligned (guest cluster {guest_cluster}, cluster size {s.cluster_size})")
    if off and off >= s.data_limit():
        raise CorruptImageError(
            f"Cluster allocation offset 0x{off:x} (guest cluster {guest_cluster}) lies past the end of the "
            f"{'data file' if s.has_data_file else 'file'} ({s.data_limit()} bytes)")
    return off


def compressed_location(s: Qcow2State, e: int, guest_cluster: int) -> tuple[int, int]:
    """(host byte offset, byte count to read) of a compressed cluster descriptor, validated."""
    if e & OFLAG_COPIED:
        raise CorruptImageError(
            f"L2 entry for guest cluster {guest_cluster} = 0x{e:x}: copied flag must never be set for compressed clusters")
    off, length = s.descriptor.decode(e)
    if off < s.cluster_size or off >= s.alloc_limit:
        raise CorruptImageError(
            f"compressed cluster offset 0x{off:x} (guest cluster {guest_cluster}) lies outside the file "
            f"(header cluster .. {s.alloc_limit} bytes)")
    return off, length


def bitmap_check(s: Qcow2State, e: int, bitmap: int, guest_cluster: int) -> None:
    """Refuse an extended L2 bitmap that is inconsistent with itself or its entry."""
    alloc = bitmap_allocated(bitmap)
    if alloc & bitmap_zero(bitmap):
        raise CorruptImageError(
            f"Invalid cluster entry found: guest cluster {guest_cluster} subcluster bitmap 0x{bitmap:016x} "
            f"marks subclusters both allocated and zero")
    if alloc and not (e & L2E_OFFSET_MASK) and not (s.has_data_file and e & OFLAG_COPIED):
        raise CorruptImageError(
            f"Invalid cluster entry found: guest cluster {guest_cluster} has allocated subclusters "
            f"(bitmap 0x{bitmap:016x}) but no host offset")


def l2_slice(s: Qcow2State, l2_offset: int, l2_index: int) -> tuple[array[int], int]:
    """(entries, index of its first entry in the table) of the cached part of the L2 table at
    `l2_offset` (validated) that holds entry `l2_index`: the whole table, or on read-only
    opens with a sliced cache only the slice (see cachesize.py)."""
    if s.l2_slices is None:
        return s.l2_cache.get(l2_offset).entries, 0
    first = l2_index - l2_index % s.l2_slice_entries
    return s.l2_slices.get(l2_offset + (first << (4 if s.extended_l2 else 3))).entries, first


def plain_host(s: Qcow2State, guest_offset: int) -> int | None:
    """What this image alone says about the cluster holding `guest_offset`, for the small-read
    paths: -1 when unallocated (read from the backing file), the host offset of `guest_offset`
    when the cluster is plain data (every subcluster allocated), None for anything else, broken
    entries included (the run translation handles them, and reports what is wrong). On a miss,
    after validating the L1 entry, loads the L2 slice, or reads the one entry when the slice is
    not admitted yet (see cachesize.py)."""
    gc = guest_offset >> s.cluster_bits
    l1i, l2i = divmod(gc, s.l2_entries)
    l1 = s.l1.entries
    if l1i >= len(l1) or not l1[l1i]:
        return -1
    l1e = l1[l1i]
    l2off = l1e & L1E_OFFSET_MASK
    if l1e & L1E_RESERVED_MASK or l2off & s.cluster_mask or not s.cluster_size <= l2off <= s.alloc_limit - s.cluster_size:
        l2off = l2_table_offset(s, l1i)  # (raises what is wrong with it)
    first = l2i - l2i % s.l2_slice_entries
    ext = s.extended_l2
    cache = s.l2_cache if s.l2_slices is None else s.l2_slices
    key = l2off + (first << (4 if ext else 3))
    i = l2i - first
    recent = s.l2_recent
    if recent is not None and key not in cache.tables and key not in recent:
        recent[key] = None  # its first miss: remembered, not loaded
        if len(recent) > cache.capacity:
            del recent[next(iter(recent))]
        raw = s.host.pread(16 if ext else 8, key + (i << (4 if ext else 3)))
        if ext:
            e, bitmap = int.from_bytes(raw[:8].ljust(8, b"\0"), "big"), int.from_bytes(raw[8:].ljust(8, b"\0"), "big")
        else:
            e, bitmap = int.from_bytes(raw.ljust(8, b"\0"), "big"), 0
    else:
        if recent is not None:
            recent.pop(key, None)
        entries = cache.get(key).entries
        if ext:
            e, bitmap = entries[2 * i], entries[2 * i + 1]
        else:
            e, bitmap = entries[i], 0
    if ext:
        if not e and not bitmap:
            return -1
        if bitmap != SUBCLUSTER_ALL:
            return None
    elif not e:
        return -1
    # (L2E_NOT_PLAIN_DATA holds the reserved bits of both entry widths)
    if e & (L2E_NOT_PLAIN_DATA | (s.cluster_mask & L2E_OFFSET_MASK)):
        return None
    host = e & L2E_OFFSET_MASK
    if not host or host >= (s.data_file_limit if s.has_data_file else s.alloc_limit):
        return None
    return host + (guest_offset & s.cluster_mask)


# --- runs -------------------------------------------------------------------------------------
def get_host_runs(s: Qcow2State, guest_offset: int, length: int) -> list[Run]:
    """Translate [guest_offset, +length) (inside the disk) into runs, merged as described above."""
    runs: list[Run] = []
    cbits = s.cluster_bits
    cs = s.cluster_size
    l2n = s.l2_entries
    span = s.l2_span
    end = guest_offset + length
    pos = guest_offset
    l1_count = len(s.l1.entries)
    last: Run | None = None
    while pos < end:
        gc = pos >> cbits
        l1i, l2i = divmod(gc, l2n)
        table_end = min(end, (l1i + 1) * span)
        l2off = l2_table_offset(s, l1i) if l1i < l1_count else 0
        if not l2off:
            last = _add_run(runs, last, RUN_BACKING, table_end - pos, NO_HOST, gc)
            pos = table_end
            continue
        entries, first = l2_slice(s, l2off, l2i)
        if s.l2_slices is not None:  # a slice: serve what it maps
            table_end = min(table_end, (l1i * l2n + first + s.l2_slice_entries) << cbits)
            l2i -= first
        if not s.extended_l2:
            last = _standard_runs(s, runs, last, entries, pos, table_end, l2i)
            pos = table_end
            continue
        while pos < table_end:
            inc = pos & s.cluster_mask
            n = min(cs - inc, table_end - pos)
            e = entries[2 * l2i]
            bitmap = entries[2 * l2i + 1]
            gc = pos >> cbits
            if e & OFLAG_COMPRESSED:
                if bitmap:
                    raise CorruptImageError(
                        f"Invalid cluster entry found: compressed guest cluster {gc} has subcluster bitmap 0x{bitmap:x}")
                last = _add_run(runs, last, RUN_COMPRESSED, n, e, gc)
            else:
                host = data_offset(s, e, gc)
                bitmap_check(s, e, bitmap, gc)
                if bitmap_allocated(bitmap) != SUBCLUSTER_ALL:
                    if not host and not (s.has_data_file and e & OFLAG_COPIED):
                        host = NO_HOST  # an unallocated cluster
                    last = _subcluster_runs(s, runs, last, pos, n, host, bitmap, gc)
                else:
                    last = _add_run(runs, last, RUN_DATA, n, host + inc, gc)
            pos += n
            l2i += 1
    return runs


def _standard_runs(s: Qcow2State, runs: list[Run], last: Run | None, entries: array[int], pos: int,
                   end: int, l2i: int) -> Run | None:
    """Runs for [pos, end) within one standard L2 table starting at entry l2i.

    Runs of identical-kind entries are swallowed in a tight loop (a host-contiguous data run is a
    run of entries each one cluster above the last), so the per-cluster cost is one comparison;
    only the first and last entry of a run are decoded and validated.
    """
    cs = s.cluster_size
    cbits = s.cluster_bits
    data_file = s.has_data_file
    while pos < end:
        inc = pos & s.cluster_mask
        gc = pos >> cbits
        stop = l2i + ((end - pos + inc + cs - 1) >> cbits)  # entries this table still serves
        e = entries[l2i]
        k = l2i + 1
        if e & OFLAG_COMPRESSED:
            n = min(cs - inc, end - pos)
            last = _add_run(runs, last, RUN_COMPRESSED, n, e, gc)
            pos += n
            l2i = k
            continue
        host = data_offset(s, e, gc)
        if e & OFLAG_ZERO:
            if s.v2:
                raise CorruptImageError(f"L2 entry for guest cluster {gc} = 0x{e:x}: zero flag in a version 2 image")
            kind = RUN_ZERO
            if host:  # preallocated zero clusters: a run while host-contiguous
                expect = e + cs
                while k < stop and entries[k] == expect:
                    expect += cs
                    k += 1
                if k - l2i > 1:
                    data_offset(s, expect - cs, gc + k - l2i - 1)
            else:
                while k < stop and entries[k] & (L2E_NOT_PLAIN_DATA | L2E_OFFSET_MASK) == OFLAG_ZERO:
                    k += 1
        elif host or (data_file and e & OFLAG_COPIED):
            kind = RUN_DATA
            expect = e + cs
            while k < stop and entries[k] == expect:
                expect += cs
                k += 1
            if k - l2i > 1:
                data_offset(s, expect - cs, gc + k - l2i - 1)
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


def _subcluster_runs(s: Qcow2State, runs: list[Run], last: Run | None, pos: int, n: int, host: int,
                     bitmap: int, gc: int) -> Run | None:
    """Runs for [pos, pos+n) within one extended-L2 cluster (`host` NO_HOST if unallocated)."""
    sbits = s.subcluster_bits
    ssize = 1 << sbits
    end = pos + n
    while pos < end:
        inc = pos & s.cluster_mask
        sc = inc >> sbits
        m = min(ssize - (inc & (ssize - 1)), end - pos)
        h = NO_HOST if host == NO_HOST else host + inc
        if bitmap >> sc & 1:
            last = _add_run(runs, last, RUN_DATA, m, h, gc)
        elif bitmap >> (32 + sc) & 1:
            last = _add_run(runs, last, RUN_ZERO, m, h, gc)
        else:
            last = _add_run(runs, last, RUN_BACKING, m, h, gc)
        pos += m
    return last
