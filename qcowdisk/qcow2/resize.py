"""Resizing an image: what `qemu-img resize` does (QEMU 7.2's `qcow2_co_truncate`), made crash-safe.

**Semantics.** Sizes are not rounded: a new size must be positive, at most 2^63 - 2^30 (QEMU's
BDRV_MAX_LENGTH) and a multiple of 512; growing past what an L1 table of 32 MiB maps, a v2
image with internal snapshots, shrinking without `shrink=True`, and a v2 overlay whose backing
file reaches past the old end (QEMU cannot zero its new area) are refused as qemu-img refuses
them, with its messages (`ResizeError`), before anything is written. A v3 image with snapshots
and images with an external data file are resized (the data file follows the new size; with
data_file_raw the new area is mapped onto it, as QEMU preallocates its metadata).

- Growing: the L1 table grows to exactly the entries the new size needs (l1.py says how). The
  new area reads as zeros. Where the backing file reaches past the old end, QEMU (since 5.0)
  zeroes the new area so the backing data does not show through: explicit zeros up to the next
  subcluster boundary, zero clusters after that; so does this. Without such a backing file
  QEMU leaves the new area alone, so the stale bytes that its own shrink kept in the last
  cluster past the end reappear (`qemu-img resize --shrink` to 960 KiB, then back to 1 MiB,
  reads the old data again); qcowdisk instead zeroes that cluster past the old end and
  discards anything still mapped past it, so the new area always reads as zeros.
- Shrinking: like QEMU, everything from the first whole cluster past the new end is discarded
  (entries cleared, clusters freed), L2 tables past the new end are freed and their L1
  entries cleared (l1_size stays, as QEMU keeps it), and the file is cut after its last used
  cluster. Beyond QEMU, the bytes of the last cluster past the new end are zeroed, so that a
  later grow by any tool reads zeros there.

**Order.** After a power cut at any point the image is the old one or the new one (size and
contents), with leaks at most. Every header change is one `switch_header` (sync, one header
write, fsync) that changes a single 8-byte word of the header, so a header write torn at any
8-byte boundary leaves the old or the new value of that word, and every intermediate header
is valid. (That holds as long as the header on disk is what `serialize_header` writes for it,
as it is for every header QEMU 7.2 or qcowdisk wrote; a refcount table that must grow on the
way is switched as refcount.py switches it, torn-safe in its own way.)

- grow: flush (the old image durable); external data file cut to the old size then extended
  to the new one; if the L1 must grow: new table written and synced, switch l1_table_offset
  (old l1_size), switch l1_size, old table freed (deferred); then the new area's zeroing (or
  data_file_raw mapping) is written and flushed; last, switch size. Before that switch the
  image has its old size, and everything written lies past its end.
- shrink: flush; switch size first (from then on the image is the new one, and what lies
  past its end is unreachable but still counted: no leak, no corruption); then the tail
  cluster zeroed, entries past the end discarded and L2 tables dropped, flushed (the freed
  clusters are released once the tables that dropped them are durable); then the data file
  and the image file are cut. QEMU discards first and switches the size last, so a cut in
  between leaves the old size with part of its data gone: neither image.

Persistent bitmaps (bitmapresize.py) are resized with the disk: their new tables and directory
are written and synced before the size switch, and that same header write names them; the old
ones are freed after it. Where the header fits in its first sector the write cannot tear; see
bitmaps.py for a longer one.

Every function here expects the caller to hold the image lock; `check` before `resize`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from itertools import compress

from ..errors import ResizeError
from ..hostio import zero_block
from ..resizecheck import check_new_size
from . import bitmapresize
from .cache import CachedTable
from .entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    SUBCLUSTER_ALL,
)
from .format import BDRV_MAX_LENGTH, MAX_L1_BYTES, min_l1_size
from .mapping import l2_table_offset
from .ordering import flush, mark_dirty_before_lazy_update, switch_header
from .overlap import check_not_metadata
from .reading import read_copy
from .refcount import Refcounts
from .state import Qcow2State
from .writing import free_entry, l2_for_write, write, zero, zero_in_table

SECTOR = 512


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _refcounts(s: Qcow2State) -> Refcounts:
    rc = s.refcounts
    assert rc is not None, "resize on an image opened read-only"
    return rc


# --- checks ----------------------------------------------------------------------------------
def check(s: Qcow2State, new_size: int, shrink: bool, preallocation: str = "off") -> None:
    """Refuse what qemu-img resize refuses, in its order and words (ResizeError); writes nothing."""
    old = s.virtual_size
    check_new_size(old, new_size, shrink=shrink, preallocation=preallocation)  # qemu-img's own refusals
    if new_size > BDRV_MAX_LENGTH:
        raise ResizeError(f"offset({new_size}) exceeds maximum({BDRV_MAX_LENGTH})")
    if new_size % SECTOR:
        raise ResizeError(f"The new size must be a multiple of {SECTOR}")
    if s.header.nb_snapshots and s.v2:
        raise ResizeError("Can't resize a v2 image which has snapshots")
    if new_size <= old:
        return
    need = min_l1_size(new_size, s.cluster_bits, s.l2_entries)
    if need > len(s.l1) and need * 8 > MAX_L1_BYTES:
        raise ResizeError("Failed to grow the L1 table: File too large")
    if _backing_reaches_past(s, old) and s.v2 and new_size > _align_up(old, 1 << s.subcluster_bits):
        # QEMU grows the L1 table, then fails to zero the new clusters (v2 has no zero flag).
        raise ResizeError("Failed to zero out new clusters: Operation not supported")


def _backing_reaches_past(s: Qcow2State, old_size: int) -> bool:
    """Whether the backing file has data for guest bytes past `old_size` (QEMU then zeroes the
    new area: its bdrv_co_truncate adds BDRV_REQ_ZERO_WRITE). A backing file the image was opened
    without is the caller's business, as in QEMU."""
    return s.backing is not None and s.backing.virtual_size > old_size


# --- resizing --------------------------------------------------------------------------------
def resize(s: Qcow2State, new_size: int, preallocation: str = "off") -> None:
    """Give the image the (checked) size `new_size`, durably; see the module docstring."""
    old = s.virtual_size
    plan = bitmapresize.prepare(s, new_size) if new_size != old else None  # refusals before any write
    mark_dirty_before_lazy_update(s)
    flush(s)  # the old image durable: a cut from here on leaves it, or the new one
    if new_size >= old:
        _grow(s, old, new_size, plan, preallocation)
    else:
        _shrink(s, old, new_size, plan)
    s.metadata_preallocated = None


def _switch_size(s: Qcow2State, new_size: int, plan: bitmapresize.Plan | None) -> None:
    """The header's size field (bytes 24..31, one 8-byte word) to `new_size`; with persistent
    bitmaps, their resized copies are written first and the same header write names them."""
    if s.header.size != new_size:
        fields = bitmapresize.store(s, plan) if plan is not None else {}
        switch_header(s, size=new_size, **fields)
        if plan is not None:
            bitmapresize.release(s, plan)
            mark_dirty_before_lazy_update(s)  # the switch cleared it; a shrink goes on freeing
    s.virtual_size = new_size


def _grow(s: Qcow2State, old: int, new: int, plan: bitmapresize.Plan | None, preallocation: str) -> None:
    if s.has_data_file:
        # What lies past the old end of the data file is stale (a cut shrink, a foreign tool):
        # cut it off, then extend with zeros (QEMU truncates the data file to the new size).
        dh = s.data_host
        if dh.size() > old:
            dh.truncate(old)
        dh.truncate(new)
    need = min_l1_size(new, s.cluster_bits, s.l2_entries)
    if need > len(s.l1):
        _grow_l1(s, need)
    if _backing_reaches_past(s, old):
        _zero_new_area(s, old, new)
    elif s.header.data_file_raw:
        _map_raw_data_file(s, old, new)
    elif not s.has_data_file:
        _scrub_past_end(s, old)
    if preallocation != "off":
        _preallocate(s, old, new, preallocation, zeroed=_backing_reaches_past(s, old))
    flush(s)  # the new area reads as zeros before the size says it exists
    _switch_size(s, new, plan)


def _grow_l1(s: Qcow2State, entry_count: int) -> None:
    """QEMU's qcow2_grow_l1_table (exact size), with the header switched in two torn-safe steps."""
    rc = _refcounts(s)
    cbits = s.cluster_bits

    def allocate(count: int) -> int:
        if count == 1:
            (first, _), = rc.alloc_clusters(1)
        else:  # the table must be contiguous: append rather than fill free runs
            saved, rc.append_only = rc.append_only, True
            try:
                (first, _), = rc.alloc_clusters(count)
            finally:
                rc.append_only = saved
        check_not_metadata(s, first << cbits, count << cbits)
        s.metadata.update(range(first, first + count))
        s.grow_alloc_limit((first << cbits) + entry_count * 8)
        return first

    def switch_offset(table_offset: int) -> None:
        rc.make_durable()  # the new table's refcounts before the header names it
        switch_header(s, l1_table_offset=table_offset)

    def switch_size(count: int) -> None:
        switch_header(s, l1_size=count)

    s.l1.grow(entry_count, cbits, allocate=allocate, switch_offset=switch_offset, switch_size=switch_size,
              free=rc.defer_free)


def _zero_new_area(s: Qcow2State, old: int, new: int) -> None:
    """QEMU's BDRV_REQ_ZERO_WRITE growth: explicit zeros up to the next subcluster boundary,
    zero clusters (zero subclusters) from there to the end (a partial last one included)."""
    g = 1 << s.subcluster_bits
    zero_start = _align_up(old, g)
    head_end = min(new, zero_start)
    if head_end > old:
        write(s, old, memoryview(bytes(head_end - old)))
    pos, end = zero_start, _align_up(new, g)
    while pos < end:
        l1i = (pos >> s.cluster_bits) // s.l2_entries
        chunk_end = min(end, (l1i + 1) * s.l2_span)
        zero_in_table(s, l2_for_write(s, l1i), pos, chunk_end)
        pos = chunk_end


def _tables_over(s: Qcow2State, old: int, new: int) -> Iterator[tuple[int, int, int, CachedTable]]:
    """(L1 index, first entry, end entry, the L2 table made writable) for each table the
    clusters of [old, new) lie in, in order."""
    gc, end_gc = old >> s.cluster_bits, -(-new >> s.cluster_bits)
    while gc < end_gc:
        l1i, first = divmod(gc, s.l2_entries)
        last = min(s.l2_entries, first + end_gc - gc)
        yield l1i, first, last, l2_for_write(s, l1i)
        gc += last - first


def _map_raw_data_file(s: Qcow2State, old: int, new: int) -> None:
    """data_file_raw: map every new cluster onto the same offset of the data file (QEMU
    preallocates the metadata of the new area, so the image and its raw data file agree)."""
    cbits, step = s.cluster_bits, 2 if s.extended_l2 else 1
    for l1i, first, last, table in _tables_over(s, old, new):
        e = table.entries
        base = (l1i * s.l2_entries) << cbits
        mapped = range(base + (first << cbits), base + (last << cbits), 1 << cbits)
        if not any(e[first * step:last * step:step]):  # the usual case: all new, one slice assignment
            e[first * step:last * step:step] = array(e.typecode, (h | OFLAG_COPIED for h in mapped))
        else:
            for i, host in zip(range(first * step, last * step, step), mapped, strict=True):
                if not e[i] & (L2E_OFFSET_MASK | OFLAG_COPIED):
                    e[i] = host | OFLAG_COPIED
        table.mark(first * step, last * step)  # the subcluster bitmaps stay, as QEMU's do


def _preallocate(s: Qcow2State, old: int, new: int, mode: str, zeroed: bool) -> None:
    """`qemu-img resize --preallocation=MODE` (QEMU's qcow2_co_truncate): every cluster of the new
    area without a host cluster gets one (in an external data file, the cluster at its guest
    offset), reading as zeros: a hole for metadata (space handed back where a freed cluster is
    reused), allocated for falloc, zeros written for full. The entries are what QEMU leaves
    (checked with `qemu-img map`): plain data clusters, except after metadata preallocation of
    an area `zeroed` over a longer backing file, which QEMU then zeroes (zero flag kept with the
    host cluster); extended L2 entries have no subcluster allocated, or over such a backing
    file all of them zero (metadata) or data; and the head of a partial first cluster gets the
    zeros QEMU's copy-on-write writes.
    It all lies past the old end until the size switch, so a cut before it leaves the old image
    with allocated clusters past its end (no leak, no corruption)."""
    target = s.data_host
    if s.header.data_file_raw:  # mapped already (_map_raw_data_file): only the data file's new bytes
        if mode == "full" or (mode == "falloc" and not target.zero_alloc(old, new - old)):
            target.write_zeros(old, new - old)
        return
    rc = _refcounts(s)
    cbits, step = s.cluster_bits, 2 if s.extended_l2 else 1
    file_end = target.size()  # (clusters reused below it may hold stale bytes: zeroed first)
    cs = s.cluster_size
    flag = OFLAG_COPIED | (OFLAG_ZERO if zeroed and mode == "metadata" and not s.extended_l2 else 0)
    # extended L2: no subcluster allocated (zeros: nothing shows through), or over a longer
    # backing file all zero (metadata) / all data (the host cluster reads as zeros)
    bits = 0 if not zeroed else SUBCLUSTER_ALL << 32 if mode == "metadata" else SUBCLUSTER_ALL
    runs: list[tuple[int, int]] = []  # the host ranges the new entries point at, merged

    def add_run(host: int, length: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == host:
            runs[-1] = (runs[-1][0], runs[-1][1] + length)
        else:
            runs.append((host, length))

    head_host: int | None = None
    for l1i, first, last, table in _tables_over(s, old, new):
        e = table.entries
        need: range | list[int] = range(first, last)
        if any(e[first * step:last * step:step]):  # (usually every entry is new: no scan)
            need = [i for i in need if not e[i * step] & (L2E_OFFSET_MASK | OFLAG_COMPRESSED)]
        if not need:
            continue
        if s.has_data_file:  # the cluster at the guest offset
            base = (l1i * s.l2_entries) << cbits
            hosts = [base + (i << cbits) for i in need]
            if isinstance(need, range):
                add_run(hosts[0], len(need) << cbits)
            else:
                for h in hosts:
                    add_run(h, cs)
        else:
            allocated = rc.alloc_clusters(len(need))
            hosts = [h for c, n in allocated for h in range(c << cbits, (c + n) << cbits, cs)]
            for c, n in allocated:
                add_run(c << cbits, n << cbits)
        if old & (cs - 1) and l1i * s.l2_entries + need[0] == old >> cbits:
            head_host = hosts[0]  # the partial first cluster, preallocated here
        new_entries = array(e.typecode, [h | flag for h in hosts])
        if isinstance(need, range):  # one slice assignment per table
            e[first * step:last * step:step] = new_entries
            if s.extended_l2:
                e[first * 2 + 1:last * 2:2] = array(e.typecode, [bits]) * len(need)
        else:
            for i, entry in zip(need, new_entries, strict=True):
                e[i * step] = entry
                if s.extended_l2:
                    e[i * 2 + 1] = bits
        table.mark(first * step, last * step)
    end = file_end
    for host, length in runs:
        if not s.has_data_file:
            check_not_metadata(s, host, length)
        end = max(end, host + length)
        if mode == "full" or (mode == "falloc" and not target.zero_alloc(host, length)):
            target.write_zeros(host, length)
        elif mode == "metadata" and host < file_end and not s.extended_l2:
            target.zero_range(host, min(length, file_end - host))  # a reused cluster's stale bytes: a hole
    if not s.has_data_file:
        s.grow_alloc_limit(end)
    if target.size() < end:
        target.truncate(end)
    head = old & (cs - 1)
    if mode == "metadata" and head_host is not None and not s.extended_l2 and not zeroed:
        target.pwrite(zero_block(head), head_host)  # (the part of the old disk in that cluster)


def _scrub_past_end(s: Qcow2State, old: int) -> None:
    """Make everything past `old` read as zeros (no backing file reaches there): the rest of the
    last cluster if this image maps it, and any cluster still mapped after it."""
    tail = _align_up(old, s.cluster_size)
    if old < tail and _stale(s, old, tail):
        zero(s, old, tail - old, punch=False)
    _discard(s, tail, len(s.l1) * s.l2_span)


def _shrink(s: Qcow2State, old: int, new: int, plan: bitmapresize.Plan | None) -> None:
    _switch_size(s, new, plan)  # first: from here on a cut leaves the new image
    tail = _align_up(new, s.cluster_size)
    if not s.has_data_file and new < tail and _stale(s, new, tail):
        zero(s, new, tail - new, punch=False)  # past the end: invisible, but a later grow shows it
    keep = min_l1_size(new, s.cluster_bits, s.l2_entries)
    _discard(s, tail, min(len(s.l1), keep) * s.l2_span)
    _drop_l2_tables(s, keep)
    s.compressed_cache.clear()
    flush(s)  # cleared entries durable, then the frees released
    if s.has_data_file:
        s.data_host.truncate(new)  # QEMU truncates the data file to the exact new size
        s.data_host.sync()
    _truncate_image_file(s)


# --- helpers ---------------------------------------------------------------------------------
def _stale(s: Qcow2State, start: int, end: int) -> bool:
    """Whether [start, end), inside one cluster, holds bytes of this image other than zeros.

    Only then is it worth zeroing: a cluster this image does not map reads from below (and a
    backing file that reaches there gets the new area zeroed at the next grow anyway), and one
    that already reads as zeros keeps its status (a zero cluster stays one, as in QEMU's image).
    """
    l1i, l2i = divmod(start >> s.cluster_bits, s.l2_entries)
    if l1i >= len(s.l1):
        return False
    off = l2_table_offset(s, l1i)
    if not off:
        return False
    e = s.l2_cache.get(off).entries
    if not (e[2 * l2i] or e[2 * l2i + 1] if s.extended_l2 else e[l2i]):
        return False
    data = read_copy(s, start, end - start)
    return data.count(0) != len(data)


def _discard(s: Qcow2State, start: int, end: int) -> None:
    """QEMU's full discard of the whole clusters in [start, end) (start cluster-aligned): entries
    cleared, the clusters they named freed (deferred). L2 tables with nothing to clear are not
    touched; a shared one is copied first, as for any write."""
    cbits, step, per_table = s.cluster_bits, 2 if s.extended_l2 else 1, s.l2_entries
    start_gc, end_gc = start >> cbits, -(-end >> cbits)
    if start_gc >= end_gc:
        return
    lo, hi = start_gc // per_table, min(len(s.l1), -(-end_gc // per_table))
    for l1i in compress(range(lo, hi), s.l1.entries[lo:hi]):  # tables only, found at C speed
        first = max(start_gc - l1i * per_table, 0)
        last = min(end_gc - l1i * per_table, per_table)
        off = l2_table_offset(s, l1i)
        if not off or not any(s.l2_cache.get(off).entries[first * step:last * step]):
            continue
        table = l2_for_write(s, l1i)
        e = table.entries
        for i in compress(range(first * step, last * step, step), e[first * step:last * step:step]):
            free_entry(s, e[i], 0)
        e[first * step:last * step] = array(e.typecode, bytes((last - first) * step * e.itemsize))
        table.mark(first * step, last * step)


def _drop_l2_tables(s: Qcow2State, l1_index: int) -> None:
    """Clear the L1 entries from `l1_index` on and drop the references their L2 tables held:
    one on the table, one on each cluster it maps (a table shared with a snapshot keeps the
    snapshot's). QEMU discards the entries first and frees the tables after; the counts end the
    same, without copying shared tables just to empty them."""
    rc = _refcounts(s)
    step = 2 if s.extended_l2 else 1
    for l1i in compress(range(l1_index, len(s.l1)), s.l1.entries[l1_index:]):
        l2_table_offset(s, l1i)  # refuse a corrupt entry before anything changes
    for _l1i, entry in s.l1.clear_from(l1_index):
        off = entry & L1E_OFFSET_MASK
        entries = s.l2_cache.get(off).entries
        for i in compress(range(0, len(entries), step), entries[::step]):
            free_entry(s, entries[i], 0)
        rc.defer_free(off >> s.cluster_bits)


def _truncate_image_file(s: Qcow2State) -> None:
    """Cut the image file after its last used cluster (QEMU's qcow2_get_last_cluster), once the
    frees that emptied the tail are durable. Not with lazy refcounts: the counts on disk may
    still name clusters past that point until the image is closed."""
    rc = _refcounts(s)
    if s.lazy:
        return
    per_block, cbits = rc.block_entries, s.cluster_bits
    c = rc.end_cluster - 1
    while c >= 0:
        ri, idx = divmod(c, per_block)
        block = rc.reftable[ri] & REFT_OFFSET_MASK if ri < len(rc.reftable) else 0
        if block:
            counts = rc.cache.get(block).entries[:idx + 1]
            used = counts.tobytes().rstrip(b"\0")
            if used:
                c = ri * per_block + (len(used) - 1) // counts.itemsize
                break
        c = ri * per_block - 1
    end = (c + 1) << cbits
    if end < s.host.size():
        s.host.truncate(end)
        s.host.sync()
        rc.end_cluster = c + 1
        rc.free_hint = min(rc.free_hint, rc.end_cluster)
        s.alloc_limit = end

