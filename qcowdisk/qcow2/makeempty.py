"""Emptying an image as QEMU 7.2's `qcow2_make_empty` does (what `qemu-img commit` does to the
committed overlay): rebuilt as small as a fresh image when it can be, else every cluster
discarded.

QEMU's `make_completely_empty` applies when the image is version 3, has no snapshots, no
bitmaps and no external data file, and its L1 table plus three clusters fit in one refcount
block. The result: the header in cluster 0 (extensions and backing name kept), a one-cluster
refcount table in cluster 1 whose one entry names the refcount block in cluster 2, which counts
clusters 0 .. 3 + L1 clusters; an all-zero L1 table of the same size from cluster 3; the file
truncated right after it. Otherwise QEMU discards the whole disk (QCOW2_DISCARD_SNAPSHOT, a full
discard: entries become unallocated, freed clusters are punched, L2 tables stay, and every L1
entry gets a table: `discard_with_tables`).

QEMU rewrites the image in place under the dirty bit, so a crash half-way leaves refcounts that
`qemu-img check` calls corrupt until a repair. Here no state on disk is ever inconsistent: the
new layout overlaps the old tables (cluster 1..3 are where every fresh image keeps them), so it
is reached through a temporary one, each switched to with one header write (the three fields,
l1_table_offset, refcount_table_offset and refcount_table_clusters, share the header's first
sector, written atomically):

1. A zero L1 table, refcount blocks and a refcount table counting exactly cluster 0 and
   themselves are written past the end of the file; `switch_header` syncs them, points the
   header at them and syncs. From here every old cluster is unreferenced with refcount 0.
2. The final tables are written into clusters 1 .. 3 + L1 clusters (free now), and a second
   `switch_header` moves the header to them (clearing the dirty bit: the counts are exact).
3. The file is truncated after them (durable at the next flush or close; a cut before leaves
   a longer file whose tail nothing references).

The guest view changes at step 1's switch, from the image's data to its backing file's; a
commit makes the base durable before it starts, so both read the same. Expects the image lock.
"""

from __future__ import annotations

from array import array

from .entries import TableCodec
from .format import AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_DIRTY
from .ordering import release_frees_if_piling, switch_header
from .state import Qcow2State
from .writing import discard, l2_for_write


def l1_clusters(s: Qcow2State) -> int:
    """Clusters the active L1 table spans (QEMU's DIV_ROUND_UP(l1_size, cluster_size / 8))."""
    return -(-s.header.l1_size * 8 // s.cluster_size)


def can_empty_completely(s: Qcow2State) -> bool:
    """Whether QEMU 7.2 would rebuild the image (`make_completely_empty`) rather than discard."""
    h = s.header
    refblock_entries = s.cluster_size * 8 // h.refcount_bits
    return (not s.v2 and not h.nb_snapshots and not s.has_data_file
            and not h.autoclear_features & AUTOCLEAR_BITMAPS  # QEMU's nb_bitmaps: bitmaps in use
            and h.crypt_method == 0 and 3 + l1_clusters(s) <= refblock_entries)


def discard_with_tables(s: Qcow2State, guest_offset: int, length: int) -> None:
    """QEMU's fallback, `qcow2_cluster_discard` (full discard) of [guest_offset, +length): its
    `discard_in_l2_slice` takes each L2 table with `get_cluster_table`, which allocates one
    where the L1 entry names none (and copies one a snapshot shares), so afterwards every L1
    entry of the range names a table of its own, all unallocated entries."""
    end = guest_offset + length
    while guest_offset < end:
        step = min(end, (guest_offset // s.l2_span + 1) * s.l2_span) - guest_offset
        l2_for_write(s, guest_offset // s.l2_span)
        discard(s, guest_offset, step)
        release_frees_if_piling(s)
        guest_offset += step


def make_completely_empty(s: Qcow2State) -> None:
    """Rebuild the image's tables as a fresh image's, with no cluster mapped (module docstring).

    Changes the header and the file; the caller replaces the in-memory tables (L1, L2 cache,
    refcounts) with the new ones afterwards. Nothing written before and not yet flushed is kept.
    """
    cs, cbits = s.cluster_size, s.cluster_bits
    h = s.header
    l1c = l1_clusters(s)
    epb = cs * 8 // h.refcount_bits
    codec = TableCodec(h.refcount_bits, cs)
    # Nothing cached may reach the disk from now on: it describes the tables being dropped.
    s.l1.dirty.clear()
    s.l2_cache.clear()
    assert s.refcounts is not None
    s.refcounts.cache.clear()
    s.refcounts.deferred_frees.clear()
    features = h.incompatible_features & ~INCOMPAT_DIRTY
    # Step 1: the temporary tables past the end of the file (and past where step 2 writes).
    start = max(-(-s.host.size() // cs), 3 + l1c)
    l1_at, blocks, table_at, table_clusters = _temporary_layout(start, l1c, epb, cs)
    end = table_at + table_clusters
    if l1c:
        s.host.pwrite(bytes(l1c * cs), l1_at << cbits)
    reftable = array("Q", [0]) * (table_clusters * cs // 8)
    for ri, block_cluster in sorted(blocks.items()):
        counts = codec.new()
        first = ri * epb
        if ri == 0:
            counts[0] = 1
        lo, hi = max(start, first), min(end, first + epb)
        if lo < hi:
            counts[lo - first:hi - first] = array(counts.typecode, [1]) * (hi - lo)
        s.host.pwrite(codec.encode(counts, 0, epb), block_cluster << cbits)
        reftable[ri] = block_cluster << cbits
    s.host.pwrite(TableCodec(64, len(reftable) * 8).encode(reftable, 0, len(reftable)), table_at << cbits)
    switch_header(s, l1_table_offset=l1_at << cbits, refcount_table_offset=table_at << cbits,
                  refcount_table_clusters=table_clusters, incompatible_features=features)
    # Step 2: the final tables, where a fresh image has them.
    final_end = 3 + l1c
    rt = array("Q", [0]) * (cs // 8)
    rt[0] = 2 << cbits
    counts = codec.new()
    counts[0:final_end] = array(counts.typecode, [1]) * final_end
    s.host.pwrite(TableCodec(64, cs).encode(rt, 0, cs // 8) + codec.encode(counts, 0, epb) + bytes(l1c * cs),
                  1 << cbits)
    extensions = [e for e in h.extensions if e.ext_type != EXT_BITMAPS]  # QEMU rewrites the header without them
    switch_header(s, l1_table_offset=3 << cbits, refcount_table_offset=1 << cbits, refcount_table_clusters=1,
                  extensions=extensions)
    # Step 3: nothing past the final tables is referenced any more.
    s.host.truncate(final_end << cbits)
    s.alloc_limit = final_end << cbits


def _temporary_layout(start: int, l1c: int, epb: int, cs: int) -> tuple[int, dict[int, int], int, int]:
    """(L1 cluster, {reftable index: block cluster}, table cluster, table clusters) of tables
    laid out from cluster `start`: L1, then the refcount blocks counting cluster 0 and every
    cluster of the layout, then the refcount table naming them."""
    indices = {0}
    while True:
        table_clusters = -(-(max(indices) + 1) * 8 // cs)
        end = start + l1c + len(indices) + table_clusters
        needed = {0} | set(range(start // epb, (end - 1) // epb + 1))
        if needed <= indices:
            break
        indices |= needed  # (only grows, so this ends)
    blocks = {ri: start + l1c + i for i, ri in enumerate(sorted(indices))}
    return start, blocks, start + l1c + len(indices), table_clusters


__all__ = ["can_empty_completely", "discard_with_tables", "make_completely_empty", "l1_clusters"]
