"""Rebuilding refcounts of an image left dirty (lazy refcounts, crashed writer).

The references are counted by check.py's walker (`RefcountWalk`, the one walk of every
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
from itertools import compress

from .check import RefcountWalk, _Res
from .refcount import Refcounts
from .state import Qcow2State


def count_references(s: Qcow2State, rc: Refcounts) -> array[int]:
    """How many references each host cluster has, from the image's own structures (index = cluster)."""
    del rc  # the walk reads the refcount table the header names, as `rc` was loaded from
    walk = RefcountWalk(s, _Res(), strict=True)
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
            if want < have and c not in rc.metadata:
                rc.update(c, want - have)
                changed += 1
    finally:
        rc.append_only = False
    rc.free_hint = 0
    return changed
