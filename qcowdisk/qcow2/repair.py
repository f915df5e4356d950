"""Rebuilding refcounts of an image left dirty (lazy refcounts, crashed writer).

The references are counted by refwalk.py's walker (`RefcountWalk`, the one walk of every
reference the image holds, as `qemu-img check` does: header, refcount table and blocks, active
and snapshot L1 tables, the L2 tables they reach and the data clusters those reach, the snapshot
table, bitmaps) in its strict mode, and each cluster's count is set to what it should be. While
fixing, new refcount blocks are only appended (`append_only`), because the on-disk counts that
would tell us which clusters are free are exactly what is being repaired.

The tables are untrusted: every reference must lie inside the file (QEMU tolerates up to one
cluster past its end), or the rebuild refuses at once with CorruptImageError (a pointer near
2^48 would otherwise make it count that far). Its cost follows the metadata and the file's
length, never the virtual size. The caller holds the lock.
"""

from __future__ import annotations

from array import array
from collections import Counter
from itertools import compress

from .checkresult import CheckTally
from .entries import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED
from .mapping import l2_table_offset
from .refcount import Refcounts
from .refwalk import RefcountWalk
from .state import Qcow2State


def count_references(s: Qcow2State, rc: Refcounts) -> array[int]:
    """How many references each host cluster has, from the image's own structures (index = cluster)."""
    del rc  # the walk reads the refcount table the header names, as `rc` was loaded from
    walk = RefcountWalk(s, CheckTally(), strict=True)
    walk.calculate()
    return walk.imrt


def rebuild_refcounts(s: Qcow2State, rc: Refcounts) -> int:
    """Make every refcount equal its references; returns how many counts were changed."""
    counts = count_references(s, rc)
    end = max(rc.end_cluster, len(counts))
    rc.end_cluster = end
    rc.append_only = True
    changed = 0
    try:
        # Raise first, then lower: a lowered count never frees something still referenced.
        for c in compress(range(len(counts)), counts):
            want = counts[c]
            have = rc.get(c)
            if want > have:
                rc.update(c, want - have)
                changed += 1
        for c in range(end):
            if c >= rc.end_cluster:
                break
            have = rc.get(c)
            want = counts[c] if c < len(counts) else 0
            # (a cluster the rebuild itself appended, a new refcount block, is metadata nobody counted)
            if want < have and (want > 0 or c not in rc.metadata):
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
