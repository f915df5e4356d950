"""Rebuilding refcounts of an image left dirty (lazy refcounts, crashed writer).

Walks every reference the image holds, as `qemu-img check` does (header, refcount table and
blocks, active and snapshot L1 tables, the L2 tables they reach and the data clusters those
reach, the snapshot table), and sets each cluster's count to what it should be. While fixing,
new refcount blocks are only appended (`append_only`), because the on-disk counts that would
tell us which clusters are free are exactly what is being repaired.

The tables are untrusted: every reference must lie inside the file, or the rebuild refuses at
once with CorruptImageError (a pointer near 2^48 would otherwise make it count that far). Its
cost follows the metadata (nonzero L1 entries are found at C speed) and the file's length,
never the virtual size. The caller holds the lock.
"""

from __future__ import annotations

from collections import Counter
from itertools import compress

from ..errors import CorruptImageError
from .entries import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, REFT_OFFSET_MASK, decode_u64_table
from .mapping import compressed_location, l2_table_offset
from .refcount import Refcounts
from .state import Qcow2State


def count_references(s: Qcow2State, rc: Refcounts) -> Counter[int]:
    """How many references each host cluster has, from the image's own structures."""
    cs, cbits = s.cluster_size, s.cluster_bits
    h = s.header
    file_length = s.host.size()
    counts: Counter[int] = Counter()

    def ref(what: str, host_offset: int, length: int = 1) -> None:
        # QEMU's tolerance (qcow2_inc_refcounts_imrt): up to one cluster past the end of the file
        if host_offset + max(length, 1) - file_length > cs:
            raise CorruptImageError(
                f"{what} at host offset 0x{host_offset:x} ({max(length, 1)} bytes) lies past the end of the file "
                f"({file_length} bytes); refusing to rebuild the refcounts of {s.filename!r}")
        for c in range(host_offset >> cbits, ((host_offset + max(length, 1) - 1) >> cbits) + 1):
            counts[c] += 1

    ref("header", 0, cs)
    ref("refcount table", rc.reftable_offset, rc.reftable_clusters * cs)
    for ri in compress(range(len(rc.reftable)), rc.reftable):
        ref(f"refcount block (reftable index {ri})", rc.reftable[ri] & REFT_OFFSET_MASK, cs)
    if h.nb_snapshots:
        ref("snapshot table", h.snapshots_offset, s.snapshot_table_length)
    l1_tables = [("active L1", s.l1.entries, h.l1_table_offset)]
    for snap in s.snapshots:
        raw = s.host.pread(snap.l1_size * 8, snap.l1_table_offset)
        l1_tables.append((f"snapshot {snap.id} L1", decode_u64_table(raw[:len(raw) // 8 * 8]), snap.l1_table_offset))
    step = 2 if s.extended_l2 else 1
    for name, l1, l1_offset in l1_tables:
        if len(l1):
            ref(name, l1_offset, len(l1) * 8)
        for l1i in compress(range(len(l1)), l1):
            l2off = l1[l1i] & L1E_OFFSET_MASK
            if not l2off:
                continue
            ref(f"L2 table ({name} index {l1i})", l2off, cs)
            cached = s.l2_cache.peek(l2off)
            l2 = cached.entries if cached is not None else decode_u64_table(s.host.pread(cs, l2off).ljust(cs, b"\0"))
            for i in compress(range(0, len(l2), step), l2[::step]):
                le = l2[i]
                if le & OFLAG_COMPRESSED:
                    off, length = compressed_location(s, le, l1i * s.l2_entries + i // step)
                    ref("compressed cluster", off, length)
                elif not s.has_data_file and le & L2E_OFFSET_MASK:  # data and preallocated zero
                    ref(f"data cluster (L2 at 0x{l2off:x} index {i // step})", le & L2E_OFFSET_MASK, cs)
    return counts


def rebuild_refcounts(s: Qcow2State, rc: Refcounts) -> int:
    """Make every refcount equal its references; returns how many counts were changed."""
    counts = count_references(s, rc)
    end = max(rc.end_cluster, max(counts) + 1 if counts else 0)
    rc.end_cluster = end
    rc.append_only = True
    changed = 0
    try:
        # Raise first, then lower: a lowered count never frees something still referenced.
        for c, want in sorted(counts.items()):
            have = rc.get(c)
            if want > have:
                rc.update(c, want - have)
                changed += 1
        for c in range(end):
            if c >= rc.end_cluster:
                break
            have = rc.get(c)
            want = counts.get(c, 0)
            # (a cluster the rebuild itself appended, a new refcount block, is metadata nobody counted)
            if want < have and (c in counts or c not in rc.metadata):
                rc.update(c, want - have)
                changed += 1
    finally:
        rc.append_only = False
    rc.free_hint = 0
    if not s.has_data_file:
        changed += set_copied_flags(s, rc)
    return changed


def set_copied_flags(s: Qcow2State, rc: Refcounts, pending: Counter[int] | None = None) -> int:
    """Make COPIED in the active L1 and L2 entries say exactly whether the refcount is 1.

    QEMU's `qemu-img check` counts a mismatch either way as a corruption, so this runs after
    every change of sharing (snapshot create, apply, delete) and after a refcount rebuild.
    `pending` holds reference drops queued but not applied yet (deferred frees): the count that
    decides is the one after them. Changed entries go back through the L2 cache and the L1's
    dirty set, so the declared ordering edges hold (an L2 table reaches the disk after the
    refcount blocks, unless refcounts are lazy). Images with an external data file keep their
    flags (their data clusters have no refcounts). Returns how many entries changed.
    """
    if s.has_data_file:
        return 0
    cbits = s.cluster_bits
    step = 2 if s.extended_l2 else 1

    def exclusive(host_offset: int) -> bool:
        c = host_offset >> cbits
        return rc.get(c) - (pending.get(c, 0) if pending else 0) == 1

    changed = 0
    l1 = s.l1.entries
    for l1i in compress(range(len(l1)), l1):
        l2off = l2_table_offset(s, l1i)
        if not l2off:
            continue
        table = s.l2_cache.get(l2off)
        entries = table.entries
        for i in compress(range(0, len(entries), step), entries[::step]):
            e = entries[i]
            if e & OFLAG_COMPRESSED:
                continue  # never COPIED (mapping refuses one that is)
            off = e & L2E_OFFSET_MASK
            want = OFLAG_COPIED if off and exclusive(off) else 0
            if e & OFLAG_COPIED != want:
                entries[i] = e & ~OFLAG_COPIED | want
                table.mark(i)
                changed += 1
        e = l1[l1i]
        want = OFLAG_COPIED if exclusive(l2off) else 0
        if e & OFLAG_COPIED != want:
            s.l1.set(l1i, e & ~OFLAG_COPIED | want)
            changed += 1
    return changed
