"""Repairing refcounts during `check -r` (compare_refcounts' fixes and rebuild_refcount_structure).

The crash-ordering rules (ordering.py) hold: OFLAG_COPIED is cleared, durably, ahead of any count
going up (`preclear_copied`); refcount increments are made durable before decrements, decrements
go through the deferred-free queue (`apply_refcount_fixes`); a rebuilt refcount structure is
written to clusters nothing references and switched to with `switch_header`
(`rebuild_refcount_structure`). repair.py is the other repair: the rebuild at a read-write open
of a dirty image.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence
from itertools import compress

from . import ordering
from .checkresult import CheckRun, StepFailed
from .diskrefs import metadata_overlap, signal_corruption
from .entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFT_OFFSET_MASK,
    TableCodec,
    decode_u64_table,
)
from .refwalk import RefcountWalk


def preclear_copied(run: CheckRun, walk: RefcountWalk) -> None:
    """Before any count goes up: clear OFLAG_COPIED, durably, on every active entry whose
    cluster will not have refcount 1. A clear flag is always safe (a writer copies the
    cluster); a set one on a cluster that is now counted twice would tell a writer to write
    a shared cluster in place, and a crash between the increase and the flag's correction
    would leave exactly that. check_oflag_copied still judges the entries as they were."""
    s, cb, cs = run.s, run.cb, run.cs
    imrt, nb = walk.imrt, walk.nb
    step = 2 if s.extended_l2 else 1
    l1 = s.l1.entries
    changed = False
    for i in compress(range(len(l1)), l1):
        l1e = l1[i]
        l2_offset = l1e & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        if l1e & OFLAG_COPIED and (l2_offset >> cb) < nb and imrt[l2_offset >> cb] != 1:
            run.precleared_l1.setdefault(i, l1e)
            s.l1.set(i, l1e & ~OFLAG_COPIED)
            changed = True
        if s.has_data_file:
            continue
        words = decode_u64_table(s.host.pread(cs, l2_offset).ljust(cs, b"\0"))
        entries = words[::2] if step == 2 else words
        copied = [j for j in compress(range(len(entries)), map(OFLAG_COPIED.__and__, entries))
                  if not entries[j] & OFLAG_COMPRESSED]
        doomed = [j for j in copied if (entries[j] & L2E_OFFSET_MASK) >> cb < nb
                  and imrt[(entries[j] & L2E_OFFSET_MASK) >> cb] != 1 and entries[j] & L2E_OFFSET_MASK]
        if not doomed:
            continue
        table = s.l2_cache.get(l2_offset)
        for j in doomed:
            run.precleared_l2.setdefault((l2_offset, j), entries[j])
            table.entries[j * step] = entries[j] & ~OFLAG_COPIED
            table.mark(j * step)
        changed = True
    if changed:
        ordering.flush(s, final=True)

def apply_refcount_fixes(run: CheckRun, increments: Sequence[tuple[int, int]], decrements: Sequence[tuple[int, int]]) -> None:
    """Raise the counts that are too low and make that durable; then drop the leaked ones
    through the deferred-free queue (released, and made durable, by the flush)."""
    s = run.s
    rc = s.refcounts
    assert rc is not None
    for cluster, delta in increments:
        rc.update(cluster, delta)
    ordering.flush(s, final=True)
    for cluster, delta in decrements:
        for _ in range(-delta):
            rc.defer_free(cluster)
    ordering.flush(s, final=True)

# --- rebuild_refcount_structure ------------------------------------------------------
def rebuild_refcount_structure(run: CheckRun, walk: RefcountWalk) -> None:
    """Write new refcount blocks and a new table (into clusters nothing references, found
    in the in-memory table as QEMU's alloc_clusters_imrt finds them) and switch to them."""
    s, cs, cb = run.s, run.cs, run.cb
    rc = s.refcounts
    assert rc is not None
    codec = TableCodec(s.header.refcount_bits, cs)
    epb = codec.entry_count
    typecode = codec.typecode
    reftable: list[int] = []

    def alloc(count: int, first_free: int) -> tuple[int, int]:
        imrt = walk.imrt
        cluster, contiguous, first_gap = first_free, 0, True
        while cluster < walk.nb and contiguous < count:
            if imrt[cluster] == 0:
                if first_gap:
                    first_free, first_gap = cluster, False
                end = min(walk.nb, cluster + count - contiguous)
                seg = imrt[cluster:end].tobytes()
                zeros = len(seg) - len(seg.lstrip(b"\0"))
                zero_run = zeros // imrt.itemsize
                if zero_run == end - cluster:
                    contiguous += zero_run
                    cluster = end
                else:
                    contiguous = 0
                    cluster += zero_run
            else:
                contiguous = 0
                try:
                    cluster = imrt.index(0, cluster)
                except ValueError:
                    cluster = walk.nb
        if contiguous < count:
            walk.grow(cluster + count - contiguous)
        cluster -= contiguous
        walk.imrt[cluster:cluster + count] = array("I", [1]) * count
        return cluster << cb, first_free

    def checked_write(what: str, data: bytes, offset: int) -> None:
        # qcow2_pre_write_overlap_check: never onto live metadata (the old structure stays
        # intact until the header switches), and nothing once the image was marked corrupt.
        if not s.corrupt:
            overlap = metadata_overlap(s, offset, len(data))
            if overlap is not None:
                signal_corruption(s, run.report, f"Preventing invalid write on metadata (overlaps with {overlap})")
        if s.corrupt:
            run.report(f"qcowdisk: ERROR writing {what}: Input/output error")
            raise StepFailed(errno.EIO)
        s.host.pwrite(data, offset)

    def write_refblocks(first_cluster: int, end_cluster: int) -> bool:
        grown = False
        first_free = 0
        cluster = first_cluster
        while cluster < end_cluster:
            ri = cluster // epb
            start = ri * epb
            seg_end = min(end_cluster, start + epb)
            used_end = min(seg_end, walk.nb)
            if cluster >= used_end or walk.imrt[cluster:used_end].count(0) == used_end - cluster:
                cluster = seg_end  # nothing counted here: no block needed
                continue
            if ri < len(reftable) and reftable[ri]:
                offset = reftable[ri]
            else:
                first_free = max(first_free, start)
                offset, first_free = alloc(1, first_free)
                end_cluster = max(end_cluster, (offset >> cb) + 1)
                if len(reftable) <= ri:
                    entries = -(-(ri + 1) * 8 // cs) * cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[ri] = offset
            block = array(typecode, walk.imrt[start:start + epb])
            if len(block) < epb:
                block.extend(array(typecode, bytes(block.itemsize * (epb - len(block)))))
            checked_write("refblock", codec.encode(block, 0, epb), offset)
            cluster = start + epb
        return grown

    try:
        write_refblocks(0, walk.nb)
        while True:
            length = len(reftable) * 8
            clusters = -(-length // cs)
            table_offset, _ = alloc(clusters, 0)
            first = table_offset >> cb
            if not write_refblocks(first, first + clusters):
                break
        table = array("Q", reftable)
        checked_write("reftable", TableCodec(64, length).encode(table, 0, len(table)), table_offset)
    except OSError as e:
        run.report(f"qcowdisk: ERROR writing refblock: {e.strerror}")
        raise
    old_offset, old_clusters = rc.reftable_offset, rc.reftable_clusters
    old_blocks = [e & REFT_OFFSET_MASK for e in rc.reftable if e & REFT_OFFSET_MASK]
    ordering.switch_header(s, refcount_table_offset=table_offset, refcount_table_clusters=clusters)
    # The allocator now works on the new structure (the old one is leaked until the leak
    # repair below drops it).
    rc.cache.clear()
    rc.reftable = array("Q", table)
    rc.reftable_offset, rc.reftable_clusters = table_offset, clusters
    first_old = old_offset >> cb
    for c in range(first_old, first_old + old_clusters):
        rc.metadata.discard(c)
    for off in old_blocks:
        rc.metadata.discard(off >> cb)
    rc.metadata.update(range(table_offset >> cb, (table_offset >> cb) + clusters))
    rc.metadata.update(off >> cb for off in reftable if off)
    s.grow_alloc_limit(s.host.size())
    rc.end_cluster = max(rc.end_cluster, walk.nb, -(-s.host.size() // cs))
    rc.free_hint = 0

