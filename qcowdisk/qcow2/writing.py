"""The write path: allocation with copy-on-write, zeroing, freeing.

A write is planned per L2 table: each guest cluster becomes a `ClusterWrite` that is either
written in place (allocated, COPIED, not compressed) or given a new host cluster. New clusters
of one request are allocated together and every host-contiguous run is written with one
`pwritev` of [COW head, caller's data, COW tail]. Copy-on-write reads go through the ordinary
read path, so they take whatever the cluster showed before: backing file, zeros, compressed or
shared data; and they read only the bytes the write does not cover (nothing for whole-cluster
or whole-subcluster writes). Where the copy-on-write parts read as zeros (nothing beneath), the
region is allocated as zeros with one fallocate and only the caller's bytes are written, as
QEMU's handle_alloc_space does: the same bytes and the same allocated blocks as QEMU's file.

Ordering (declared in ordering.py, not placed here): the data and refcount increments reach the
disk before the L2 entries that point at them, and dropped references go to the allocator's
deferred-free queue. Everything here expects the caller to hold the image lock.
"""

from __future__ import annotations

from array import array

from ..hostio import Buffer
from ..image import ZERO_BLOCK_LENGTH, zero_block
from ..record import Record
from .cache import CachedTable
from .entries import (
    L2E_OFFSET_MASK,
    L2E_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    SUBCLUSTER_ALL,
    bitmap_allocated,
    bitmap_zero,
    make_bitmap,
    subcluster_range_mask,
)
from .mapping import bitmap_check, compressed_location, data_offset, l2_table_offset
from .ordering import punch_discarded_data
from .overlap import check_not_metadata
from .reading import read_copy
from .refcount import Refcounts
from .state import Qcow2State

# entry bits that keep a cluster off the in-place fast path (COPIED itself must be set)
_FAST_WRITE_BAD = OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED_MASK


class ClusterWrite(Record):
    """How one guest cluster of a request is written.

    The caller's bytes cover [start, end) of the cluster; [region_start, region_end) is what is
    written to the host cluster (the data plus copy-on-write head and tail). `host` is the host
    cluster's offset, or None until a new cluster is allocated.
    """

    __slots__ = ("bitmap", "end", "host", "l2_index", "region_end", "region_start", "source", "start",
                 "zero_beneath")
    l2_index: int
    start: int
    end: int
    region_start: int
    region_end: int
    host: int | None
    bitmap: int       # the new subcluster bitmap (extended L2)
    source: int       # offset of the caller's bytes for this cluster in the request
    zero_beneath: bool  # a new cluster whose copy-on-write parts read as zeros

    def __init__(self, l2_index: int, start: int, end: int, region_start: int, region_end: int, host: int | None,
                 bitmap: int = 0, source: int = 0, zero_beneath: bool = False) -> None:
        self.l2_index = l2_index
        self.start = start
        self.end = end
        self.region_start = region_start
        self.region_end = region_end
        self.host = host
        self.bitmap = bitmap
        self.source = source
        self.zero_beneath = zero_beneath


def _refcounts(s: Qcow2State) -> Refcounts:
    rc = s.refcounts
    assert rc is not None, "write path on an image opened read-only"
    return rc


# --- L2 tables for writing -------------------------------------------------------------------
def l2_for_write(s: Qcow2State, l1_index: int) -> CachedTable:
    """The L2 table for `l1_index`, allocated or copied so it may be modified in place."""
    rc = _refcounts(s)
    off = l2_table_offset(s, l1_index)
    e = s.l1.entries[l1_index]
    if off and e & OFLAG_COPIED:
        return s.l2_cache.get(off)
    if off:
        if rc.get(off >> s.cluster_bits) == 1:  # COPIED flag was just missing: fix the flag
            s.l1.set(l1_index, off | OFLAG_COPIED)
            return s.l2_cache.get(off)
        old = s.l2_cache.get(off).entries
    else:
        old = None
    (c, _), = rc.alloc_clusters(1)
    new_off = c << s.cluster_bits
    check_not_metadata(s, new_off, s.cluster_size)
    s.metadata.add(c)
    s.grow_alloc_limit(new_off + s.cluster_size)
    table = s.l2_cache.install(new_off, None if old is None else old[:])
    if old is not None:
        rc.defer_free(off >> s.cluster_bits)
    s.l1.set(l1_index, new_off | OFLAG_COPIED)
    return table


# --- writing ---------------------------------------------------------------------------------
def write(s: Qcow2State, guest_offset: int, mv: memoryview) -> None:
    """Write all of `mv` at `guest_offset` (bounds already checked)."""
    if _write_fast(s, guest_offset, mv):
        return
    n = len(mv)
    pos = 0
    while pos < n:
        g = guest_offset + pos
        l1i = (g >> s.cluster_bits) // s.l2_entries
        chunk = min(n - pos, (l1i + 1) * s.l2_span - g)
        table = l2_for_write(s, l1i)
        _write_in_table(s, table, g, mv[pos:pos + chunk])
        pos += chunk


def _write_fast(s: Qcow2State, guest_offset: int, mv: memoryview) -> bool:
    """The two common writes without planning; False when the general path is needed.

    Both stay inside one cached, exclusively owned standard L2 table: (a) an overwrite of
    host-contiguous allocated clusters, written in place with one pwritev; (b) a write over
    clusters without a host cluster whose copy-on-write parts read as zeros (none for whole
    clusters; the partial first and last cluster need a zero flag, or no backing file), which
    needs no read at all: the new clusters are allocated as zeros (`HostFile.zero_alloc`, QEMU's
    handle_alloc_space) and get the data alone, or the data with zero padding (see `_padded`).
    """
    if s.extended_l2 or s.has_data_file:
        return False
    n = len(mv)
    cbits = s.cluster_bits
    cs = s.cluster_size
    first = guest_offset >> cbits
    last = (guest_offset + n - 1) >> cbits
    l1i, l2i = divmod(first, s.l2_entries)
    if (last // s.l2_entries) != l1i:
        return False
    l1e = s.l1.entries[l1i]
    if not l1e & OFLAG_COPIED:
        return False
    table = s.l2_cache.tables.get(l1e & L2E_OFFSET_MASK)
    if table is None:
        return False
    entries = table.entries
    count = last - first + 1
    e = entries[l2i]
    if e & _FAST_WRITE_BAD == OFLAG_COPIED and e & L2E_OFFSET_MASK:  # (a) in place
        expect = e
        if count > 1:
            for k in range(l2i + 1, l2i + count):
                expect += cs
                if entries[k] != expect:
                    return False
        host = (e & L2E_OFFSET_MASK) + (guest_offset & s.cluster_mask)
        if (expect & L2E_OFFSET_MASK) + cs > s.alloc_limit:
            return False
        check_not_metadata(s, host, n)
        s.data_host.pwritev([mv], host)  # (inside the allocated clusters: no limit grows)
        return True
    # (b) no host clusters: entries 0, or zero flags (v3) without a host offset
    no_host = 0 if s.v2 else OFLAG_ZERO
    if count == 1:
        if e | no_host != no_host:
            return False
    else:
        for k in range(l2i, l2i + count):
            if entries[k] | no_host != no_host:
                return False
    head = guest_offset & s.cluster_mask
    tail = -(guest_offset + n) & s.cluster_mask
    if s.backing is not None and ((head and not entries[l2i]) or (tail and not entries[l2i + count - 1])):
        return False  # the copy-on-write parts would show the backing file
    pos = -head  # request bytes before the current extent's first cluster (negative: padding)
    k = l2i
    rc = s.refcounts
    assert rc is not None, "write path on an image opened read-only"
    for c, m in rc.alloc_clusters(count):
        host = c << cbits
        span = m << cbits
        check_not_metadata(s, host, span)
        lo = pos if pos > 0 else 0
        hi = pos + span if pos + span < n else n
        if hi - lo == span:  # whole clusters
            s.data_host.pwritev([mv[lo:hi] if hi - lo < n else mv], host)
        elif s.data_host.zero_alloc(host, span):  # the clusters allocated as zeros: the data alone
            s.data_host.pwritev([mv[lo:hi] if hi - lo < n else mv], host + lo - pos)
        else:  # with zero padding from the shared zero block (see the note at _padded)
            s.data_host.pwritev(_padded(mv[lo:hi], lo - pos, pos + span - hi), host)
        if host + span > s.alloc_limit:  # entries may name all of the new clusters
            s.alloc_limit = host + span
        if m == 1:
            entries[k] = host | OFLAG_COPIED
        else:
            for i in range(m):
                entries[k + i] = (host + (i << cbits)) | OFLAG_COPIED
        k += m
        pos += span
    table.mark(l2i, l2i + count)
    return True


def _padded(data: memoryview, head: int, tail: int) -> list[Buffer]:
    """`data` with `head` and `tail` zero bytes around it (each at most one cluster).

    Only where the host cannot allocate a range as zeros (`HostFile.zero_alloc`). Whichever
    way, the whole new cluster ends up allocated, as QEMU's handle_alloc_space leaves it: a
    cluster left with holes would change the file's allocated size, which QEMU's metadata
    preallocation heuristic compares with the referenced clusters (what qemu-img map shows)."""
    bufs: list[Buffer] = [data]
    if head:
        bufs.insert(0, zero_block(head))
    if tail:
        bufs.append(zero_block(tail))
    return bufs


def _write_in_table(s: Qcow2State, table: CachedTable, guest_offset: int, mv: memoryview) -> None:
    cs = s.cluster_size
    cbits = s.cluster_bits
    ext = s.extended_l2
    entries = table.entries
    end = guest_offset + len(mv)
    plans: list[ClusterWrite] = []
    to_alloc = 0
    pos = guest_offset
    src = 0
    while pos < end:
        gc = pos >> cbits
        l2i = gc % s.l2_entries
        a = pos & s.cluster_mask
        b = min(cs, a + end - pos)
        if ext:
            e, bitmap = entries[2 * l2i], entries[2 * l2i + 1]
        else:
            e, bitmap = entries[l2i], 0
        plan = _plan_cluster(s, e, bitmap, gc, l2i, a, b)
        plan.source = src
        if plan.host is None:
            to_alloc += 1
            plan.zero_beneath = _reads_zeros(s, e, bitmap, plan, gc << cbits)
        plans.append(plan)
        src += b - a
        pos += b - a
    # Copy-on-write pieces are read before any entry of this request changes; where they
    # read as zeros (nothing beneath a new cluster) they are not read at all.
    table_base = guest_offset - guest_offset % s.l2_span
    pieces: list[list[Buffer]] = []
    for p in plans:
        gbase = table_base + p.l2_index * cs
        data = mv[p.source:p.source + (p.end - p.start)]
        if p.zero_beneath:
            pieces.append(_padded(data, p.start - p.region_start, p.region_end - p.end))
            continue
        bufs: list[Buffer] = []
        if p.region_start < p.start:
            bufs.append(read_copy(s, gbase + p.region_start, p.start - p.region_start))
        bufs.append(data)
        if p.end < p.region_end:
            bufs.append(read_copy(s, gbase + p.end, p.region_end - p.end))
        pieces.append(bufs)
    hosts = iter(_alloc_data_clusters(s, [p for p in plans if p.host is None], guest_offset) if to_alloc else ())
    for p, bufs in zip(plans, pieces, strict=True):
        if p.host is None:
            p.host = next(hosts)
        # nothing beneath: allocate the region as zeros and write the data alone (QEMU's
        # handle_alloc_space); the entry may name all of the region
        if p.zero_beneath and s.data_host.zero_alloc(p.host + p.region_start, p.region_end - p.region_start):
            _grow_limit(s, p.host + p.region_end)
            p.region_start, p.region_end = p.start, p.end
            bufs[:] = [mv[p.source:p.source + (p.end - p.start)]]
    # Write host-contiguous runs with one pwritev each.
    run_bufs: list[Buffer] = []
    run_start = -1
    run_end = -1
    for p, bufs in zip(plans, pieces, strict=True):
        assert p.host is not None
        h = p.host + p.region_start
        check_not_metadata(s, h, p.region_end - p.region_start)
        if run_bufs and h == run_end:
            run_bufs.extend(bufs)
            run_end = h + (p.region_end - p.region_start)
        else:
            if run_bufs:
                _write_data(s, run_bufs, run_start, run_end)
            run_bufs = list(bufs)
            run_start, run_end = h, h + (p.region_end - p.region_start)
    if run_bufs:
        _write_data(s, run_bufs, run_start, run_end)
    # Then the entries (the cache writes them after the data is durable).
    for p in plans:
        assert p.host is not None
        l2i = p.l2_index
        new_e = p.host | OFLAG_COPIED
        if ext:
            old_e = entries[2 * l2i]
            entries[2 * l2i] = new_e
            entries[2 * l2i + 1] = p.bitmap
            table.mark(2 * l2i, 2 * l2i + 2)
        else:
            old_e = entries[l2i]
            entries[l2i] = new_e
            table.mark(l2i)
        if (old_e & ~OFLAG_ZERO) != (new_e & ~OFLAG_ZERO) or (old_e & OFLAG_COMPRESSED):
            free_entry(s, old_e, p.host)


def _write_data(s: Qcow2State, bufs: list[Buffer], host_start: int, host_end: int) -> None:
    s.data_host.pwritev(bufs, host_start)
    _grow_limit(s, host_end)


def _grow_limit(s: Qcow2State, host_end: int) -> None:
    """Data now reaches `host_end` of the data host: entries may name clusters up to it."""
    if s.has_data_file:
        if host_end > s.data_file_limit:
            s.data_file_limit = host_end
    elif host_end > s.alloc_limit:
        s.alloc_limit = host_end


def _plan_cluster(s: Qcow2State, e: int, bitmap: int, gc: int, l2i: int, a: int, b: int) -> ClusterWrite:
    """Decide how to write [a, b) of guest cluster gc (entry `e`, extended-L2 `bitmap`)."""
    cs = s.cluster_size
    compressed = bool(e & OFLAG_COMPRESSED)
    host = 0 if compressed else data_offset(s, e, gc)
    allocated = not compressed and bool(host or (s.has_data_file and e & OFLAG_COPIED))
    in_place = allocated and _cluster_exclusive(s, e, host)
    if not s.extended_l2:
        if in_place:
            if e & OFLAG_ZERO:  # preallocated zero cluster: the rest must read as zeros
                return ClusterWrite(l2i, a, b, 0, cs, host)
            return ClusterWrite(l2i, a, b, a, b, host)
        return ClusterWrite(l2i, a, b, 0, cs, None)
    if not compressed:
        bitmap_check(s, e, bitmap, gc)
    ssize = 1 << s.subcluster_bits
    s0, s1 = a // ssize, -(-b // ssize)
    mask = subcluster_range_mask(s0, s1)
    alloc = bitmap_allocated(bitmap)
    zero = bitmap_zero(bitmap)
    if in_place:
        ra = a if alloc >> s0 & 1 else s0 * ssize
        rb = b if alloc >> (s1 - 1) & 1 else s1 * ssize
        w = ClusterWrite(l2i, a, b, ra, rb, host, make_bitmap(alloc | mask, zero & ~mask))
        # subclusters not allocated yet whose padding reads as zeros: allocated as zeros in place
        # (only when none of them holds data: zeroing one before the write lands could show)
        w.zero_beneath = (ra < a or rb > b) and not alloc & mask and (
            s.backing is None or zero & mask == mask
            or (not zero & mask and _backing_unallocated(s, gc << s.cluster_bits, w)))
        return w
    if allocated or compressed:  # shared or compressed: copy the whole cluster
        return ClusterWrite(l2i, a, b, 0, cs, None, SUBCLUSTER_ALL)
    return ClusterWrite(l2i, a, b, s0 * ssize, s1 * ssize, None, make_bitmap(mask, zero & ~mask))


def _reads_zeros(s: Qcow2State, e: int, bitmap: int, plan: ClusterWrite, gbase: int) -> bool:
    """Whether the copy-on-write parts of a new cluster's `plan` (guest cluster at `gbase`)
    read as zeros now: nothing beneath the cluster (no host data, no compressed data, nothing
    allocated in the backing chain) or a zero flag."""
    if plan.region_start == plan.start and plan.region_end == plan.end:
        return False  # nothing to copy anyway
    if e & OFLAG_COMPRESSED or e & L2E_OFFSET_MASK:
        return False  # compressed or shared data beneath (copied whole)
    if s.extended_l2:
        ssize = 1 << s.subcluster_bits
        cow = subcluster_range_mask(plan.region_start // ssize, -(-plan.region_end // ssize))
        zero = bitmap_zero(bitmap) & cow
        return s.backing is None or zero == cow or (not zero and _backing_unallocated(s, gbase, plan))
    if e & OFLAG_ZERO:
        return not s.v2  # (the read path refuses a zero flag in a version 2 image)
    return not e and (s.backing is None or _backing_unallocated(s, gbase, plan))


def _backing_unallocated(s: Qcow2State, gbase: int, plan: ClusterWrite) -> bool:
    """Whether no layer of the backing chain allocates the copy-on-write parts of `plan`
    (QEMU's is_zero_cow: bdrv_is_allocated_above to the bottom of the chain). A raw backing
    file allocates everything; past a layer's end counts as allocated (its bytes are read)."""
    ranges = [(gbase + plan.region_start, plan.start - plan.region_start), (gbase + plan.end, plan.region_end - plan.end)]
    image = s.backing
    while image is not None:
        for off, n in ranges:
            if n and (off + n > image.virtual_size or any(x.allocated for x in image.layer_status(off, n))):
                return False
        image = image.backing
    return True


def _cluster_exclusive(s: Qcow2State, e: int, host: int) -> bool:
    """Whether an allocated cluster may be written in place (refcount 1)."""
    if e & OFLAG_COPIED or s.has_data_file:
        return True
    return _refcounts(s).get(host >> s.cluster_bits) == 1


def _alloc_data_clusters(s: Qcow2State, plans: list[ClusterWrite], guest_offset: int) -> list[int]:
    """Host offsets for the clusters of `plans` that need new clusters, in order."""
    cbits = s.cluster_bits
    if s.has_data_file:  # an external data file maps guest offset == host offset
        if s.data_punches:  # (a discarded run here is punched before it is written again)
            punch_discarded_data(s)
        base = (guest_offset >> cbits) // s.l2_entries * s.l2_entries
        return [(base + p.l2_index) << cbits for p in plans]
    out: list[int] = []
    for first, count in _refcounts(s).alloc_clusters(len(plans)):
        out.extend((first + i) << cbits for i in range(count))
    return out


def free_entry(s: Qcow2State, e: int, new_host: int) -> None:
    """Queue the clusters an overwritten entry referenced for a deferred refcount decrement."""
    if s.has_data_file:
        return
    cbits = s.cluster_bits
    rc = _refcounts(s)
    if e & OFLAG_COMPRESSED:
        off, length = compressed_location(s, e, -1)
        first = off >> cbits
        rc.defer_free(first, ((off + length - 1) >> cbits) - first + 1)
        return
    host = e & L2E_OFFSET_MASK
    if host and host != new_host:
        rc.defer_free(host >> cbits)


# --- zeroing ---------------------------------------------------------------------------------
def zeroing_writes_data(s: Qcow2State) -> bool:
    """Whether zeroing whole subclusters writes zero bytes rather than only table entries: with
    an external data file (it must keep reading as zeros: the raw view), and on a version 2
    image with a backing file (no zero flag to hide the backing data with)."""
    return s.has_data_file or (s.v2 and s.backing is not None)


def zero(s: Qcow2State, guest_offset: int, length: int, punch: bool) -> None:
    """Make [guest_offset, +length) read as zeros, freeing whole clusters where possible."""
    end = guest_offset + length
    g = 1 << s.subcluster_bits
    head_end = min(end, -(-guest_offset // g) * g)
    tail_start = max(head_end, end // g * g)
    _write_zero_bytes(s, guest_offset, head_end - guest_offset)
    _write_zero_bytes(s, tail_start, end - tail_start)
    mid, mid_end = head_end, tail_start
    if mid >= mid_end:
        return
    if zeroing_writes_data(s):
        _write_zero_bytes(s, mid, mid_end - mid)
        if s.has_data_file and punch:
            cs = s.cluster_size
            a, b = -(-mid // cs) * cs, mid_end // cs * cs
            if b > a:
                s.data_host.punch_hole(a, b - a)
        return
    pos = mid
    while pos < mid_end:
        l1i = (pos >> s.cluster_bits) // s.l2_entries
        chunk_end = min(mid_end, (l1i + 1) * s.l2_span)
        if s.backing is None and (l1i >= len(s.l1.entries) or not s.l1.entries[l1i]):
            pos = chunk_end  # no table, no backing: already reads as zeros
            continue
        table = l2_for_write(s, l1i)
        zero_in_table(s, table, pos, chunk_end)
        pos = chunk_end


def zero_in_table(s: Qcow2State, table: CachedTable, start: int, end: int) -> None:
    """Make [start, end) (inside one L2 table, whole subclusters) read as zeros, freeing clusters."""
    cs = s.cluster_size
    cbits = s.cluster_bits
    entries = table.entries
    has_backing = s.backing is not None
    zero_flag = OFLAG_ZERO if (has_backing and not s.v2) else 0
    pos = start
    while pos < end:
        gc = pos >> cbits
        l2i = gc % s.l2_entries
        a = pos & s.cluster_mask
        b = min(cs, a + end - pos)
        if not s.extended_l2:
            old = entries[l2i]
            entries[l2i] = zero_flag
            table.mark(l2i)
            free_entry(s, old, 0)
        else:
            old, bitmap = entries[2 * l2i], entries[2 * l2i + 1]
            ssize = 1 << s.subcluster_bits
            mask = subcluster_range_mask(a // ssize, b // ssize)
            if a == 0 and b == cs:
                entries[2 * l2i] = 0
                entries[2 * l2i + 1] = make_bitmap(0, SUBCLUSTER_ALL) if has_backing else 0
                free_entry(s, old, 0)
            elif old & OFLAG_COMPRESSED or (
                    (old & L2E_OFFSET_MASK) and not _cluster_exclusive(s, old, old & L2E_OFFSET_MASK)):
                _write_zero_bytes(s, pos, b - a)  # shared/compressed: copy-on-write zeros
                pos += b - a
                continue
            else:
                data_offset(s, old, gc)
                bitmap_check(s, old, bitmap, gc)
                alloc = bitmap_allocated(bitmap) & ~mask
                zeros = (bitmap_zero(bitmap) | mask) if has_backing else (bitmap_zero(bitmap) & ~mask)
                if not alloc and old & L2E_OFFSET_MASK:
                    entries[2 * l2i] = 0
                    free_entry(s, old, 0)
                entries[2 * l2i + 1] = make_bitmap(alloc, zeros)
            table.mark(2 * l2i, 2 * l2i + 2)
        pos += b - a


def discard(s: Qcow2State, guest_offset: int, length: int) -> None:
    """Make the whole clusters of [guest_offset, +length) unallocated (QEMU's full discard, what
    `bdrv_make_empty` does to a committed overlay): they read through to the backing file again
    (zeros without one), their clusters are freed. A range ending at the end of the disk covers
    its last, partial cluster; other partial clusters at the edges are left alone."""
    cs = s.cluster_size
    end = guest_offset + length
    first = -(-guest_offset // cs)
    last = -(-end // cs) if end >= s.virtual_size else end // cs  # guest clusters [first, last)
    gc = first
    while gc < last:
        l1i = gc // s.l2_entries
        chunk_last = min(last, (l1i + 1) * s.l2_entries)
        if l1i >= len(s.l1.entries) or not s.l1.entries[l1i]:
            gc = chunk_last  # no table: nothing allocated here
            continue
        table = l2_for_write(s, l1i)
        entries = table.entries
        for c in range(gc, chunk_last):
            l2i = c % s.l2_entries
            if s.extended_l2:
                old = entries[2 * l2i]
                if old or entries[2 * l2i + 1]:
                    entries[2 * l2i] = entries[2 * l2i + 1] = 0
                    table.mark(2 * l2i, 2 * l2i + 2)
                    free_entry(s, old, 0)
            else:
                old = entries[l2i]
                if old:
                    entries[l2i] = 0
                    table.mark(l2i)
                    free_entry(s, old, 0)
            if s.has_data_file and _data_mapped(s, old):
                _queue_data_punch(s, old & L2E_OFFSET_MASK)
        gc = chunk_last


def _data_mapped(s: Qcow2State, e: int) -> bool:
    """Whether a data-file image's entry maps a data cluster (QEMU's NORMAL or ZERO_ALLOC): an
    offset, or offset 0 marked copied (0 is a valid data file offset); a zero flag without an
    offset maps none."""
    if e & OFLAG_ZERO and not s.extended_l2:
        return bool(e & L2E_OFFSET_MASK)
    return bool(e & (L2E_OFFSET_MASK | OFLAG_COPIED))


def _queue_data_punch(s: Qcow2State, host: int) -> None:
    """QEMU's qcow2_free_any_cluster with a data file: a discarded cluster (normal, or zero
    with an allocation) is discarded in the data file too. Queued, as runs, until the tables
    that unmapped it are durable: punched before, a crash could leave them naming zeros."""
    runs = s.data_punches
    if runs and runs[-1][1] == host:
        runs[-1][1] = host + s.cluster_size
    else:
        runs.append([host, host + s.cluster_size])


def _write_zero_bytes(s: Qcow2State, guest_offset: int, length: int) -> None:
    pos = 0
    while pos < length:
        n = min(length - pos, ZERO_BLOCK_LENGTH)
        write(s, guest_offset + pos, zero_block(n))
        pos += n


# --- allocating without changing contents ----------------------------------------------------
ALLOCATE_CHUNK = 1 << 20


def _is_plain_owned(s: Qcow2State, entries: array[int], l2i: int) -> bool:
    """Whether a guest cluster is already stored uncompressed in a cluster it alone owns."""
    if s.extended_l2:
        e, bitmap = entries[2 * l2i], entries[2 * l2i + 1]
        if bitmap_allocated(bitmap) != SUBCLUSTER_ALL:
            return False
    else:
        e = entries[l2i]
    if e & (OFLAG_COMPRESSED | OFLAG_ZERO) or not e & OFLAG_COPIED:
        return False
    return bool(e & L2E_OFFSET_MASK) or s.has_data_file


def allocate(s: Qcow2State, guest_offset: int, length: int) -> None:
    """Give every cluster touching [guest_offset, +length) its own uncompressed host cluster,
    keeping what it reads (backing data, zeros, compressed or shared contents are written in).

    Afterwards writes there land in place without allocating, and block status shows data.
    """
    cs, cbits = s.cluster_size, s.cluster_bits
    pos = guest_offset // cs * cs
    end = min(s.virtual_size, -(-(guest_offset + length) // cs) * cs)
    while pos < end:
        l1i = (pos >> cbits) // s.l2_entries
        table_end = min(end, (l1i + 1) * s.l2_span)
        l2off = l2_table_offset(s, l1i) if l1i < len(s.l1.entries) else 0
        entries = s.l2_cache.get(l2off).entries if l2off else None
        while pos < table_end:
            # the next run of clusters that need allocating, at most ALLOCATE_CHUNK long
            l2i = (pos >> cbits) % s.l2_entries
            if entries is not None and _is_plain_owned(s, entries, l2i):
                pos += cs
                continue
            run_end = pos + cs
            while run_end < table_end and run_end - pos < ALLOCATE_CHUNK and (
                    entries is None or not _is_plain_owned(s, entries, (run_end >> cbits) % s.l2_entries)):
                run_end += cs
            run_end = min(run_end, s.virtual_size)
            write(s, pos, memoryview(read_copy(s, pos, run_end - pos)))
            # the table may have been allocated or copied on write: look it up again
            entries = s.l2_cache.get(l2_table_offset(s, l1i)).entries
            pos = run_end
