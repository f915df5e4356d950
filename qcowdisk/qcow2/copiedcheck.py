"""check_oflag_copied: OFLAG_COPIED of every active L1 and L2 entry against the on-disk refcount,
repaired (with `-r all`, or `-r leaks` when nothing else is wrong) through the L1 and the L2 cache.
"""

from __future__ import annotations

import contextlib
import errno
import operator
from array import array
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
from .refwalk import L2E_STD_RESERVED_MASK, contiguous_run, table_group


def check_oflag_copied(run: CheckRun, res: CheckTally, disk: DiskRefcounts | None = None) -> None:
    """OFLAG_COPIED of every active L1 and L2 entry against the on-disk refcount (`disk`: the
    counts as compare_refcounts read them, when it changed none)."""
    s, fix, cb = run.s, run.fix, run.cb
    if fix & FIX_ERRORS:
        repair = True
    elif fix & FIX_LEAKS:
        repair = not res.check_errors and not res.corruptions and not res.leaks
    else:
        repair = False
    disk = disk or DiskRefcounts(s, run.report)
    flat = disk.flat(-(-s.host.size() // run.cs))
    step = 2 if s.extended_l2 else 1
    clean_reject = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_STD_RESERVED_MASK
    l1 = s.l1.entries
    changed = False

    def check_l1_entry(i: int) -> None:
        """One active L1 entry, its L2 table and their flags (per entry: the general path)."""
        nonlocal changed
        l1e = run.precleared_l1.get(i, l1[i])
        l2_offset = l1e & L1E_OFFSET_MASK
        if not l2_offset:
            return
        if flat is not None and l2_offset >> cb < len(flat):
            refcount = flat[l2_offset >> cb]
        else:
            try:
                refcount = disk.get(l2_offset >> cb)
            except StepFailed:
                return
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
        walked = run.contiguous_l2.get(l2_offset, 0)
        if walked and flat is not None and not walked & clean_reject and not any(
                off == l2_offset for off, _ in run.precleared_l2):
            lo, n = (walked & L2E_OFFSET_MASK) >> cb, run.cs // 8
            if lo + n <= len(flat) and flat[lo:lo + n].count(1) == (n if walked & OFLAG_COPIED else 0):
                return  # the table as the walk read it, one run of data clusters, flags right
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
                    return
        nz = list(compress(entries, entries))
        if not nz:
            return
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
                    return
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

    grouping = not (run.precleared_l1 or run.precleared_l2 or s.has_data_file) and step == 1 and flat is not None
    used = list(compress(range(len(l1)), l1))
    # While repairing, progress is told only once the flags are right on disk: a count the
    # leak repair just dropped to 1 needs its flag set in the same step (else a stop here
    # would leave an OFLAG_COPIED corruption behind).
    told = not repair
    if told:
        run.expect(len(l1))
        run.advance(len(l1) - len(used))
    k = 0
    try:
        while k < len(used):
            group = table_group(l1, used, k, run.cs, len(flat)) if grouping and flat is not None else 1
            if not (group > 1 and flat is not None and _group_consistent(run, l1, used[k:k + group], flat)):
                for i in used[k:k + group]:
                    check_l1_entry(i)
            k += group
            if told:
                run.advance(group)
    except (StepFailed, OSError):
        raise  # the check failed: nothing more is written
    except BaseException:
        # stopped by the progress callback (only when not repairing) or interrupted: the flags
        # fixed so far are each right on their own, so they are written before it goes on
        if changed:
            ordering.flush(s, final=True)
        raise
    if changed:
        ordering.flush(s, final=True)
    if not told:
        run.expect(len(l1))
        run.advance(len(l1))


def _group_consistent(run: CheckRun, l1: array[int], indices: list[int], flat: array[int]) -> bool:
    """Whether the host-contiguous L2 tables of the active L1 entries `indices` (see
    `table_group`) and their data clusters, one host-contiguous run of plain data, all have
    OFLAG_COPIED exactly where the on-disk count is 1: two counts over slices of `flat`."""
    cb, cs, count = run.cb, run.cs, len(indices)
    first_table = (l1[indices[0]] & L1E_OFFSET_MASK) >> cb
    copied = sum(1 for i in indices if l1[i] & OFLAG_COPIED)
    ones = flat[first_table:first_table + count].count(1)
    if not (ones == copied and copied in (0, count)):
        return False
    words = decode_u64_table(run.s.host.pread(count * cs, first_table << cb).ljust(count * cs, b"\0"))
    first = contiguous_run(words, cs)
    if first is None or first & (OFLAG_COMPRESSED | OFLAG_ZERO | L2E_STD_RESERVED_MASK) or not first & L2E_OFFSET_MASK:
        return False
    lo, n = (first & L2E_OFFSET_MASK) >> cb, len(words)
    return lo + n <= len(flat) and flat[lo:lo + n].count(1) == (n if first & OFLAG_COPIED else 0)
