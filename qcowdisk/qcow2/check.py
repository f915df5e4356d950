"""Checking and repairing an image's refcounts, as `qemu-img check [-r leaks|all]` (QEMU 7.2) does.

This module drives the steps of qcow2_co_check_locked; each step lives in the module that owns it:

- `snapshotcheck`: the snapshot table as the check reads it (qcow2_check_read_snapshot_table);
- `refwalk`: the one reference walker of the package (calculate_refcounts into the in-memory
  refcount table; `repair.count_references`, the dirty-image rebuild, is the same walk);
- `diskrefs`: the on-disk counts, and the overlap guard on every write a repair makes;
- here: `compare_refcounts` of the two, then the order of the repairs;
- `refrepair`: fixing counts and rebuilding the refcount structure (rebuild_refcount_structure);
- `copiedcheck`: check_oflag_copied;
- `checkresult`: the tallies, `CheckResult` (qemu-img's JSON and human output), `CheckFailedError`.

Every figure is computed as QEMU computes it: which problems count as corruptions and which as
leaks, `fragmented` (a data cluster of the active L2 walk whose host offset does not follow the
previous data cluster of the same table; every compressed cluster), `image_end_offset` (one past
the highest cluster with a refcount or a reference among the clusters the file covers), the
messages (QEMU's fprintf lines, handed to `report`). What QEMU does per entry is done per whole
L2 table and refcount block where the table is clean (arrays and C-speed maps); any table with
something unusual in it is walked entry by entry exactly as QEMU's loop does.

Repair keeps the crash-ordering rules (ordering.py): refcount increments are made durable before
decrements, decrements go through the deferred-free queue, a rebuilt refcount structure is
written to clusters nothing references and switched to with `switch_header`, and OFLAG_COPIED is
cleared ahead of any count going up and set only after the counts it follows are durable. A repair cut by a crash therefore leaves
an image whose check is no worse than before, with one inherent exception: a leaked cluster whose
count drops to exactly 1 has COPIED clear until the flag is rewritten (QEMU's window too), which
`qemu-img check` reports as an OFLAG_COPIED corruption; that state is harmless (a writer copies
the cluster on write) and the next `check -r all` fixes it. The caller holds the image lock.

Where qcowdisk differs from qemu-img check: encrypted images are refused at open; images whose
header or tables qcowdisk refuses to open fail with qcowdisk's reason where qemu-img may open them;
the metadata overlap check of `fix_l2_entry_by_zero` is not made; the messages of a malformed
bitmap directory are not QEMU's (only its corruption count is); when a snapshot table rewrite
fails on the overlap check (the image is marked corrupt), the refcount fixes made before it stay
on disk (qemu-img's stay in its cache, unwritten).
"""

from __future__ import annotations

import errno
import os
from array import array

from . import ordering
from .checkresult import (
    FIX_ERRORS,
    FIX_LEAKS,
    REPAIR_MODES,
    CheckFailedError,
    CheckProgress,
    CheckResult,
    CheckRun,
    CheckTally,
    Progress,
    Report,
    StepFailed,
    add_counts,
    no_report,
)
from .copiedcheck import check_oflag_copied
from .diskrefs import DiskRefcounts, counts_exceed, same_counts
from .format import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
)
from .refrepair import apply_refcount_fixes, preclear_copied, rebuild_refcount_structure
from .refwalk import RefcountWalk, SnapshotRef
from .snapshotcheck import INT_MAX, fix_snapshot_table, read_snapshot_table
from .state import Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .checkresult import Repair

# ------------------------------------------------------------------------------------------------
# qcow2_check_refcounts

class _Check(CheckRun):
    """One run of qcow2_co_check_locked over an open image."""

    def __init__(self, s: Qcow2State, fix: int, report: Report, progress: CheckProgress | None = None) -> None:
        super().__init__(s, fix, report, progress)
        self.disk_counts: DiskRefcounts | None = None  # the on-disk counts, if the last compare changed none
        self.snapshots: tuple[list[SnapshotRef], int, int] = ([], 0, 0)  # entries, offset, size

    def run(self) -> CheckTally:
        s = self.s
        snapshot_res = CheckTally()
        self.snapshots = read_snapshot_table(s, self.report, snapshot_res, self.fix)
        res = CheckTally()
        self.check_refcounts(res)
        try:
            fix_snapshot_table(s, self.report, snapshot_res, self.fix, self.snapshots)
        finally:
            add_counts(res, snapshot_res)
        if self.fix and not res.check_errors and not res.corruptions:
            self.mark_clean_and_consistent()
        return res

    def new_walk(self, res: CheckTally, fix: int) -> RefcountWalk:
        walk = RefcountWalk(self.s, res, self.report, fix)
        walk.snapshots, walk.snapshots_offset, walk.snapshots_size = self.snapshots
        walk.progress = self.progress
        return walk

    def check_refcounts(self, res: CheckTally) -> None:
        s, fix = self.s, self.fix
        if -(-s.host.size() // self.cs) > INT_MAX:  # before the in-memory table is allocated
            res.check_errors += 1
            raise StepFailed(errno.EFBIG)
        walk = self.new_walk(res, fix)
        res.total_clusters = -(-(-(-s.virtual_size // 512) * 512) // self.cs)
        self.calculate(walk)
        pre_compare = res.copy()
        highest = self.compare(walk, res, 0)
        if walk.rebuild and fix & FIX_ERRORS:
            old = res.copy()
            fresh_leaks = 0
            self.report("Rebuilding refcount structure")
            try:
                preclear_copied(self, walk)
                rebuild_refcount_structure(self, walk)
            except StepFailed:
                res.check_errors += 1
                raise
            res.corruptions = res.leaks = 0
            walk.rebuild = False
            walk.res = res
            walk.fix = 0
            walk.imrt = array("I", bytes(4 * walk.nb))
            walk.file_len = s.host.size()
            self.calculate(walk)
            if fix & FIX_LEAKS:
                saved = res.copy()
                scratch = CheckTally()
                walk.res = scratch
                highest = self.compare(walk, scratch, FIX_LEAKS)
                if walk.rebuild:
                    self.report("ERROR rebuilt refcount structure is still broken")
                fresh_leaks = scratch.leaks
                res = self._assign(res, saved)
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if walk.rebuild:
                self.report("ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise StepFailed(errno.EIO)
            if res.leaks or res.corruptions:
                self._assign(res, pre_compare)
                highest = self.compare(walk, res, fix)
        check_oflag_copied(self, res, self.disk_counts)
        res.image_end_offset = (highest + 1) * self.cs

    @staticmethod
    def _assign(res: CheckTally, other: CheckTally) -> CheckTally:
        for name in CheckTally.__slots__:
            setattr(res, name, getattr(other, name))
        return res

    def calculate(self, walk: RefcountWalk) -> None:
        """The walk; redone entry by entry when a count went past what refcounts can hold (so
        QEMU's overflow messages come out where its walk meets them)."""
        start = walk.res.copy()
        nb, file_len = walk.nb, walk.file_len
        walk.contiguous_l2 = self.contiguous_l2 = {}
        self.expect(walk.steps())
        walk.calculate()
        if not walk.exact and counts_exceed(walk.imrt, walk.refcount_max):
            self._assign(walk.res, start)
            walk.exact = True
            walk.rebuild = False
            walk.nb, walk.file_len = nb, file_len
            walk.imrt = array("I", bytes(4 * nb))
            self.expect(walk.steps())
            walk.calculate()

    # --- compare_refcounts ---------------------------------------------------------------
    def compare(self, walk: RefcountWalk, res: CheckTally, fix: int) -> int:
        """compare_refcounts; applies the fixes `fix` allows. Returns the highest used cluster."""
        disk = DiskRefcounts(self.s, self.report)
        epb = disk.epb
        imrt = walk.imrt
        self.disk_counts = None
        blocks = -(-walk.nb // epb)
        self.expect(blocks)
        if disk.aligned_blocks(blocks):
            # the clean image: every count at once (a block that cannot be read, or any
            # difference, goes through QEMU's loop below, messages in its order)
            flat = disk.flat(walk.nb)
            if flat is not None and same_counts(flat[:walk.nb], imrt):
                self.disk_counts = disk  # check_oflag_copied reads the same counts
                self.advance(blocks)
                used = imrt.tobytes().rstrip(b"\0")
                return (len(used) - 1) // imrt.itemsize if used else 0
        highest = 0
        increments: list[tuple[int, int]] = []
        decrements: list[tuple[int, int]] = []
        for ri in range(blocks):
            self.advance(1)  # (before any count is fixed: stopping here writes nothing)
            lo = ri * epb
            hi = min(walk.nb, lo + epb)
            want = imrt[lo:hi]
            try:
                block = disk.block(ri)
            except StepFailed:
                for i in range(lo, hi):
                    self.report(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                continue
            if block is None:
                if want.count(0) == len(want):
                    continue
                have = array("I", bytes(4 * len(want)))
            else:
                have = block[:hi - lo]
                if same_counts(have, want):
                    used = want.tobytes().rstrip(b"\0")
                    if used:
                        highest = lo + (len(used) - 1) // want.itemsize
                    continue
            for j in range(hi - lo):
                r1, r2 = have[j], want[j]
                if r1 or r2:
                    highest = lo + j
                if r1 == r2:
                    continue
                fixed: str | None = None
                if r1 == 0:
                    walk.rebuild = True
                elif r1 > r2 and fix & FIX_LEAKS:
                    fixed = "leaks_fixed"
                elif r1 < r2 and fix & FIX_ERRORS:
                    fixed = "corruptions_fixed"
                kind = "Repairing" if fixed else "ERROR" if r1 < r2 else "Leaked"
                self.report(f"{kind} cluster {lo + j} refcount={r1} reference={r2}")
                if fixed is not None:
                    (decrements if r1 > r2 else increments).append((lo + j, r2 - r1))
                    setattr(res, fixed, getattr(res, fixed) + 1)
                elif r1 < r2:
                    res.corruptions += 1
                else:
                    res.leaks += 1
        if increments:
            preclear_copied(self, walk)
        if increments or decrements:
            apply_refcount_fixes(self, increments, decrements)
        return highest


    def mark_clean_and_consistent(self) -> None:
        """After a repair that left no errors: clear the dirty and corrupt bits (flushed first)."""
        s = self.s
        bits = s.header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        ordering.flush(s, final=True)
        if bits:
            ordering.switch_header(s, incompatible_features=s.header.incompatible_features & ~bits)
        s.corrupt = False


def check_image(s: Qcow2State, repair: Repair = None, report: Report | None = None,
                progress: Progress | None = None) -> CheckResult:
    """Check (and with `repair`, repair) an open image as `qemu-img check [-r ...]` does.

    When the repair fixed anything, the image is checked again, as qemu-img does, and that
    second check is returned with the first one's fixed counts. Raises CheckFailedError where
    qemu-img says `Check failed: <reason>`. The caller holds the lock; a repair needs a
    read-write image.

    `progress(done, total)` is called as the check goes (see `CheckProgress` for the steps; the
    second check after a repair adds its steps to the total). An exception it raises stops the
    check and propagates: it is only called between the repair's ordered steps (a count fixed,
    a refcount structure switched to, a table rewritten is complete on disk or not begun), so
    the image is left as consistent as a crash at that point would leave it.
    """
    if repair not in REPAIR_MODES:
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    fix = REPAIR_MODES[repair]
    report = report or no_report
    if not s.readonly:
        ordering.flush(s, final=True)  # the check reads the tables from disk
    try:
        tracker = CheckProgress(progress) if progress is not None else None
        res = _Check(s, fix, report, tracker).run()
        if fix and (res.corruptions_fixed or res.leaks_fixed):
            fixed = res
            res = _Check(s, 0, report, tracker).run()
            res.corruptions_fixed, res.leaks_fixed = fixed.corruptions_fixed, fixed.leaks_fixed
    except StepFailed as e:
        raise CheckFailedError(os.strerror(e.err)) from None
    return res.result(s.filename)


def __getattr__(name: str) -> object:
    """`Repair` on first use (see qcowdisk.qcow2.checkresult: it needs `typing`)."""
    if name == "Repair":
        from . import checkresult
        return checkresult.Repair
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CheckFailedError", "CheckResult", "DiskRefcounts", "RefcountWalk", "check_image", "FIX_LEAKS",
           "FIX_ERRORS", "Repair"]
