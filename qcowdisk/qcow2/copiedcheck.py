"""check_oflag_copied: OFLAG_COPIED of every active L1 and L2 entry against the on-disk refcount,
repaired (with `-r all`, or `-r leaks` when nothing else is wrong) through the L1 and the L2 cache.
"""

from __future__ import annotations

import contextlib
import errno
import operator
from functools import reduce
from itertools import compress

from . import ordering
from .checkresult import (
    FIX_ERRORS,
    FIX_LEAKS,
    CheckRun,
    CheckTally,
    StepFailed,
)
from .diskrefs import DiskRefcounts, metadata_overlap, signal_corruption
from .entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    decode_u64_table,
)
from .refwalk import L2E_STD_RESERVED_MASK, contiguous_run


def check_oflag_copied(run: CheckRun, res: CheckTally) -> None:
    """OFLAG_COPIED of every active L1 and L2 entry against the on-disk refcount."""
    s, fix, cb = run.s, run.fix, run.cb
    if fix & FIX_ERRORS:
        repair = True
    elif fix & FIX_LEAKS:
        repair = not res.check_errors and not res.corruptions and not res.leaks
    else:
        repair = False
    disk = DiskRefcounts(s, run.report)
    flat = disk.flat(-(-s.host.size() // run.cs))
    step = 2 if s.extended_l2 else 1
    clean_reject = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_STD_RESERVED_MASK
    l1 = s.l1.entries
    changed = False
    for i in compress(range(len(l1)), l1):
        l1e = run.precleared_l1.get(i, l1[i])
        l2_offset = l1e & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        try:
            refcount = disk.get(l2_offset >> cb)
        except StepFailed:
            continue
        if (refcount == 1) != bool(l1e & OFLAG_COPIED):
            res.corruptions += 1
            run.report(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={i} "
                       f"l1_entry={l1e:x} refcount={refcount}")
            if repair:
                s.l1.set(i, l1e | OFLAG_COPIED if refcount == 1 else l1e & ~OFLAG_COPIED)
                changed = True
                res.corruptions -= 1
                res.corruptions_fixed += 1
        if i in run.precleared_l1:  # cleared ahead: the flag follows the count now, fixed or not
            want = l1e | OFLAG_COPIED if refcount == 1 else l1e & ~OFLAG_COPIED
            if s.l1.entries[i] != want:
                s.l1.set(i, want)
                changed = True
        raw = s.host.pread(run.cs, l2_offset)
        words = decode_u64_table(raw.ljust(run.cs, b"\0"))
        entries = words[::2] if step == 2 else words
        on_disk = entries[:]
        pre = {j: e for (off, j), e in run.precleared_l2.items() if off == l2_offset}
        for j, e in pre.items():
            entries[j] = e
        if not pre and not s.has_data_file and step == 1 and flat is not None:
            first = contiguous_run(entries, run.cs)
            if first is not None and not first & clean_reject and first & L2E_OFFSET_MASK:
                lo, n = (first & L2E_OFFSET_MASK) >> cb, len(entries)
                ones = flat[lo:lo + n].count(1)
                if lo + n <= len(flat) and ones == (n if first & OFLAG_COPIED else 0):
                    continue
        nz = list(compress(entries, entries))
        if not nz:
            continue
        if not pre and not s.has_data_file and not reduce(operator.or_, nz) & clean_reject:
            clusters = list(map(cb.__rrshift__, map(L2E_OFFSET_MASK.__and__, nz)))
            if 0 not in clusters:
                counts: list[int] | None = None
                if flat is not None and max(clusters) < len(flat):
                    counts = list(map(flat.__getitem__, clusters))
                else:
                    with contextlib.suppress(StepFailed):
                        counts = list(map(disk.get, clusters))
                if counts is not None and list(map((1).__eq__, counts)) == \
                        list(map(bool, map(OFLAG_COPIED.__and__, nz))):
                    continue
        dirty: list[tuple[int, int]] = []
        restore: list[tuple[int, int]] = []  # entries cleared ahead whose flag was right after all
        for j in compress(range(len(entries)), entries):
            e = entries[j]
            if e & OFLAG_COMPRESSED:
                continue
            offset = e & L2E_OFFSET_MASK
            if step == 1 and e & OFLAG_ZERO:
                if not offset:
                    continue
            elif not offset and not (s.has_data_file and e & OFLAG_COPIED):
                continue
            if s.has_data_file:
                refcount = 1
            else:
                try:
                    refcount = disk.get(offset >> cb)
                except StepFailed:
                    continue
            if (refcount == 1) != bool(e & OFLAG_COPIED):
                res.corruptions += 1
                run.report(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: l2_entry={e:x} "
                           f"refcount={refcount}")
                if repair:
                    dirty.append((j, e | OFLAG_COPIED if refcount == 1 else e & ~OFLAG_COPIED))
            elif j in pre:
                want = e | OFLAG_COPIED if refcount == 1 else e & ~OFLAG_COPIED
                if on_disk[j] != want:
                    restore.append((j, want))
        if restore:
            table = s.l2_cache.get(l2_offset)
            for j, e in restore:
                table.entries[j * step] = e
                table.mark(j * step)
            changed = True
        if dirty:
            overlap = metadata_overlap(s, l2_offset, run.cs, ignore_active_l2=True)
            if overlap is not None or s.corrupt:
                if overlap is not None:
                    signal_corruption(s, run.report, f"Preventing invalid write on metadata (overlaps with {overlap})")
                run.report("ERROR: Could not write L2 table; metadata overlap check failed: Input/output error")
                res.check_errors += 1
                raise StepFailed(errno.EIO)
            table = s.l2_cache.get(l2_offset)
            for j, e in dirty:
                table.entries[j * step] = e
                table.mark(j * step)
            changed = True
            res.corruptions -= len(dirty)
            res.corruptions_fixed += len(dirty)
    if changed:
        ordering.flush(s, final=True)
