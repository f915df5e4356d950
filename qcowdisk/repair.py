"""Rebuilding refcounts of an image left dirty (lazy refcounts, crashed writer).

Walks every reference the image holds, as `qemu-img check` does (header, refcount table and
blocks, active and snapshot L1 tables, the L2 tables they reach and the data clusters those
reach, the snapshot table), and sets each cluster's count to what it should be. While fixing,
new refcount blocks are only appended (`append_only`), because the on-disk counts that would
tell us which clusters are free are exactly what is being repaired. Caller holds the lock.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .cache import TableCodec
from .format import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED


def count_references(img: Any) -> Counter[int]:
    """How many references each host cluster has, from the image's own structures."""
    cs, cbits = img.cluster_size, img.cluster_bits
    h = img.header
    rc = img.refcounts
    counts: Counter[int] = Counter()

    def ref_bytes(offset: int, length: int) -> None:
        for c in range(offset >> cbits, (offset + max(length, 1) - 1 >> cbits) + 1):
            counts[c] += 1

    counts[0] += 1
    ref_bytes(rc.reftable_offset, rc.reftable_clusters * cs)
    for i, e in enumerate(rc.reftable):
        if e:
            counts[rc._block_offset(i) >> cbits] += 1
    if h.nb_snapshots:
        ref_bytes(h.snapshots_offset, img._snapshot_table_length)
    l1_tables = [(list(img.l1), h.l1_table_offset, len(img.l1))]
    for s in img.snapshots:
        raw = img.host.pread(s.l1_size * 8, s.l1_table_offset)
        l1_tables.append((list(TableCodec(64, len(raw)).decode(raw)) if raw else [], s.l1_table_offset, s.l1_size))
    codec = TableCodec(64, cs)
    for entries, offset, size in l1_tables:
        if size:
            ref_bytes(offset, size * 8)
        for l1i, e in enumerate(entries):
            l2off = e & L1E_OFFSET_MASK
            if not l2off:
                continue
            counts[l2off >> cbits] += 1
            cached = img.l2_cache.peek(l2off)
            l2 = cached.entries if cached is not None else codec.decode(img.host.pread(cs, l2off).ljust(cs, b"\0"))
            step = 2 if img.extended_l2 else 1
            for i in range(0, len(l2), step):
                le = l2[i]
                if not le:
                    continue
                if le & OFLAG_COMPRESSED:
                    off, length = img._compressed_location(le, l1i * img.l2_entries + i // step)
                    ref_bytes(off, length)
                elif not img._has_data_file:
                    host = le & L2E_OFFSET_MASK
                    if host:  # data and preallocated zero clusters alike
                        counts[host >> cbits] += 1
    return counts


def rebuild_refcounts(img: Any) -> int:
    """Make every refcount equal its references; returns how many counts were changed."""
    rc = img.refcounts
    counts = count_references(img)
    end = max(rc.end_cluster, max(counts) + 1 if counts else 0)
    rc.end_cluster = end
    rc.append_only = True
    changed = 0
    try:
        # Raise first, then lower: a lowered count never frees something still referenced.
        for c in range(end):
            want = counts.get(c, 0)
            have = rc.get(c)
            if want > have:
                rc.update(c, want - have)
                changed += 1
        for c in range(end):
            if c >= rc.end_cluster:
                break
            want = counts.get(c, 0)
            have = rc.get(c)
            if want < have and c not in rc.metadata:
                rc.update(c, want - have)
                changed += 1
    finally:
        rc.append_only = False
    rc.free_hint = 0
    return changed
