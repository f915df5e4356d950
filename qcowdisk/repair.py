"""Rebuilding refcounts of an image left dirty (lazy refcounts, crashed writer).

Walks every reference the image holds, as `qemu-img check` does (header, refcount table and
blocks, active and snapshot L1 tables, the L2 tables they reach and the data clusters those
reach, the snapshot table), and sets each cluster's count to what it should be. While fixing,
new refcount blocks are only appended (`append_only`), because the on-disk counts that would
tell us which clusters are free are exactly what is being repaired. Caller holds the lock.
"""

from __future__ import annotations

from collections import Counter
from itertools import compress
from typing import Any

from .cache import TableCodec
from .errors import CorruptImageError
from .format import L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED


def count_references(img: Any) -> Counter[int]:
    """How many references each host cluster has, from the image's own structures.

    Every reference must lie inside the file, give or take the one cluster QEMU tolerates
    (`qcow2_inc_refcounts_imrt`): one further out (an entry pointing near 2^48, a refcount block
    at 2^63) raises CorruptImageError at once, so nothing here or in the rebuild ever counts up to
    a cluster number the file does not have. Only nonzero L1 entries are visited (at C speed), so
    an empty image with a huge virtual size costs nothing per entry.
    """
    cs, cbits = img.cluster_size, img.cluster_bits
    h = img.header
    rc = img.refcounts
    file_length = img.host.size()
    counts: Counter[int] = Counter()

    def check(offset: int, length: int, what: str) -> None:
        if offset + length - file_length > cs:
            raise CorruptImageError(
                f"{what} at host offset 0x{offset:x} ({length} bytes) lies past the end of the file "
                f"({file_length} bytes); cannot rebuild the refcounts of this dirty image")

    def ref_bytes(offset: int, length: int, what: str) -> None:
        check(offset, max(length, 1), what)
        for c in range(offset >> cbits, (offset + max(length, 1) - 1 >> cbits) + 1):
            counts[c] += 1

    def ref_cluster(offset: int, what: str) -> None:
        check(offset, cs, what)
        counts[offset >> cbits] += 1

    counts[0] += 1
    ref_bytes(rc.reftable_offset, rc.reftable_clusters * cs, "the refcount table")
    for i in compress(range(len(rc.reftable)), rc.reftable):
        ref_cluster(rc._block_offset(i), f"refcount block {i} (refcount table entry)")
    if h.nb_snapshots:
        ref_bytes(h.snapshots_offset, img._snapshot_table_length, "the snapshot table")
    l1_tables = [(img.l1, h.l1_table_offset, len(img.l1))]
    for s in img.snapshots:
        raw = img.host.pread(s.l1_size * 8, s.l1_table_offset)
        l1_tables.append((TableCodec(64, len(raw)).decode(raw) if raw else [], s.l1_table_offset, s.l1_size))
    codec = TableCodec(64, cs)
    for entries, offset, size in l1_tables:
        if size:
            ref_bytes(offset, size * 8, "an L1 table")
        for l1i in compress(range(len(entries)), entries):  # nonzero entries only
            l2off = entries[l1i] & L1E_OFFSET_MASK
            if not l2off:
                continue
            ref_cluster(l2off, f"the L2 table of L1 index {l1i}")
            cached = img.l2_cache.peek(l2off)
            l2 = cached.entries if cached is not None else codec.decode(img.host.pread(cs, l2off).ljust(cs, b"\0"))
            step = 2 if img.extended_l2 else 1
            for i in range(0, len(l2), step):
                le = l2[i]
                if not le:
                    continue
                if le & OFLAG_COMPRESSED:
                    off, length = img._compressed_location(le, l1i * img.l2_entries + i // step)
                    ref_bytes(off, length, f"compressed data of guest cluster {l1i * img.l2_entries + i // step}")
                elif not img._has_data_file:
                    host = le & L2E_OFFSET_MASK
                    if host:  # data and preallocated zero clusters alike
                        ref_cluster(host, f"data of guest cluster {l1i * img.l2_entries + i // step}")
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
