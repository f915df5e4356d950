"""The snapshot table as `qemu-img check` reads and repairs it (QEMU 7.2's
qcow2_check_read_snapshot_table and qcow2_check_fix_snapshot_table).

Reading: entries QEMU's open would refuse (v3 entries without the 16 bytes of extra data) are
corruptions; a table that cannot be read ends the check. With `-r all`, as QEMU's
qcow2_do_read_snapshots in repair mode: snapshots past QEMU's count limit, or past the entry that
makes the table too big, are dropped at once (one header write of `nb_snapshots`; what they
referenced is leaked and the refcount repair drops it), and extra data past 1024 bytes is cut.

Fixing, after the refcounts were checked and repaired (the new table needs clusters the counts
say are free): when the table had corruptions, every entry is written again as
qcow2_write_snapshots writes it (`snapshot.as_rewritten`: ids and names as C strings, at least 24
bytes of extra data) to new clusters, guarded by the overlap check, then one header switch names
it and the old table is dropped (a deferred free, as any other). A crash before the switch
leaves the old table and a leaked new one; after it, the new table and a leaked old one.
"""

from __future__ import annotations

import errno
import os

from . import ordering
from .checkresult import FIX_ERRORS, CheckTally, Report, StepFailed
from .diskrefs import metadata_overlap, signal_corruption
from .format import (
    BDRV_MAX_LENGTH,
    MAX_SNAPSHOT_EXTRA,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    SNAPSHOT_HEADER_STRUCT,
    SnapshotEntry,
    snapshot_table_ends_past_int64,
)
from .refwalk import SnapshotRef
from .snapshot import as_rewritten, write_table
from .state import Qcow2State

INT_MAX = (1 << 31) - 1
SNAPSHOT_READ_AHEAD = 1 << 16  # bytes of a snapshot table read at once when its length is unknown
V3_MIN_EXTRA = 16              # vm_state_size_large and disk_size: what every v3 entry must have


def _c_string(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def read_snapshot_table(s: Qcow2State, report: Report, res: CheckTally, fix: int) -> tuple[list[SnapshotRef], int, int]:
    """qcow2_check_read_snapshot_table: the entries, the table's offset and its size as QEMU
    computes them (see the module docstring for what `-r all` repairs here at once)."""
    h, cs = s.header, s.cluster_size
    count, offset = h.nb_snapshots, h.snapshots_offset
    repair = bool(fix & FIX_ERRORS)
    reduced = dropped = 0
    if count > MAX_SNAPSHOTS and repair:
        report(f"Discarding {count - MAX_SNAPSHOTS} overhanging snapshots")
        reduced, count = count - MAX_SNAPSHOTS, MAX_SNAPSHOTS
    if count > MAX_SNAPSHOTS:
        res.check_errors += 1
        report("qcowdisk: ERROR snapshot table too large")
        report(f"You can force-remove all {count - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all")
        raise StepFailed(errno.EFBIG)
    if snapshot_table_ends_past_int64(count, offset) or offset & (cs - 1):
        res.check_errors += 1
        report("qcowdisk: ERROR snapshot table offset invalid")
        raise StepFailed(errno.EINVAL)
    if not count:
        return [], offset, 0
    file_len = s.host.size()
    want = s.snapshot_table_length if s.snapshot_error is None and s.snapshot_table_length else SNAPSHOT_READ_AHEAD
    # A window of the table, moved on as the entries are read (extra data a repair skips is not read).
    window_start = 0
    window = s.host.pread(max(0, min(file_len - offset, want)), offset)

    def take(pos: int, length: int) -> bytes:
        nonlocal window, window_start
        end = pos + length
        if length and offset + end > BDRV_MAX_LENGTH:  # QEMU's block layer refuses the read (EIO)
            res.check_errors += 1
            report("qcowdisk: ERROR failed to read the snapshot table: Failed to read snapshot table: "
                   "Input/output error")
            raise StepFailed(errno.EIO)
        if pos < window_start or end > window_start + len(window):
            window_start = pos
            window = s.host.pread(max(0, min(file_len - offset - pos, max(length, SNAPSHOT_READ_AHEAD))), offset + pos)
        return window[pos - window_start:end - window_start].ljust(length, b"\0")

    def fail(message: str, hint: str) -> StepFailed:
        res.check_errors += 1
        report(f"qcowdisk: ERROR failed to read the snapshot table: {message}")
        report(hint)
        return StepFailed(errno.EFBIG)

    snaps: list[SnapshotRef] = []
    pos = table_length = 0
    for i in range(count):
        entry_start = pos
        table_length = -(-table_length // 8) * 8
        pos = -(-pos // 8) * 8
        head = take(pos, 40)
        l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state, extra_size = \
            SNAPSHOT_HEADER_STRUCT.unpack(head)
        pos += 40
        kept_extra = extra_size
        if extra_size > MAX_SNAPSHOT_EXTRA:
            if not repair:
                raise fail(f"Too much extra metadata in snapshot table entry {i}",
                           "You can force-remove this extra metadata with qemu-img check -r all")
            report(f"Discarding too much extra metadata in snapshot table entry {i} "
                   f"({extra_size} > {MAX_SNAPSHOT_EXTRA})")
            dropped += 1
            kept_extra = MAX_SNAPSHOT_EXTRA
        extra = take(pos, kept_extra) if repair else b""  # only a rewrite needs it
        pos += extra_size
        sid = _c_string(take(pos, id_len))
        pos += id_len
        name = _c_string(take(pos, name_len))
        pos += name_len
        table_length += 40 + kept_extra + id_len + name_len
        if table_length > MAX_SNAPSHOT_TABLE_BYTES or pos > INT_MAX:
            if not repair:
                raise fail("Snapshot table is too big",
                           f"You can force-remove all {count - i} overhanging snapshots with qemu-img check -r all")
            report(f"Discarding {count - i} overhanging snapshots (snapshot table is too big)")
            reduced += count - i
            pos = entry_start
            break
        entry = SnapshotEntry(l1_offset, l1_size, sid, name, date_sec, date_nsec, vm_clock, vm_state, extra) \
            if repair else None
        snaps.append(SnapshotRef(sid.decode("utf-8", "replace"), name.decode("utf-8", "replace"), l1_offset, l1_size,
                                 kept_extra, entry))
    res.corruptions += reduced + dropped
    if reduced:
        # The header must say how many entries the refcount check walks (it leaks what the
        # dropped ones referenced; the leak repair drops that).
        try:
            ordering.switch_header(s, nb_snapshots=len(snaps))
        except OSError as e:
            res.check_errors += 1
            report(f"ERROR failed to update the snapshot count in the image header: {e.strerror}")
            raise StepFailed(e.errno or errno.EIO) from None
        res.corruptions_fixed += reduced
        res.corruptions -= reduced
    if h.version >= 3:
        for i, sn in enumerate(snaps):
            if sn.extra_data_size < V3_MIN_EXTRA:
                res.corruptions += 1
                report(f"{'Repairing' if repair else 'ERROR'} snapshot table entry {i} is incomplete")
    return snaps, offset, pos


def fix_snapshot_table(s: Qcow2State, report: Report, res: CheckTally, fix: int,
                       table: tuple[list[SnapshotRef], int, int]) -> None:
    """qcow2_check_fix_snapshot_table: with `-r all`, a table that had corruptions is written
    again (see the module docstring); `table` is what `read_snapshot_table` returned."""
    if not (res.corruptions and fix & FIX_ERRORS):
        return
    snaps, old_offset, old_size = table
    entries = []
    for sn in snaps:
        assert sn.entry is not None, "read in repair mode"
        entries.append(as_rewritten(sn.entry, s.virtual_size))

    def guard(offset: int, length: int) -> None:
        # qcow2_write_snapshots: the new clusters' counts durable (a crash leaks them), then
        # qcow2_pre_write_overlap_check on them (the old table may reach anywhere)
        assert s.refcounts is not None
        s.refcounts.make_durable()
        s.snapshot_table_length = old_size
        overlap = None if s.corrupt else metadata_overlap(s, offset, length)
        if overlap is not None:
            signal_corruption(s, report, f"Preventing invalid write on metadata (overlaps with {overlap})")
        if s.corrupt:
            raise StepFailed(errno.EIO)

    try:
        write_table(s, entries, guard=guard, free_old=False)
    except StepFailed as e:
        res.check_errors += 1
        report(f"ERROR failed to update snapshot table: {e}")
        raise
    except OSError as e:
        res.check_errors += 1
        report(f"ERROR failed to update snapshot table: {e.strerror}")
        raise StepFailed(e.errno or errno.EIO) from None
    s.snapshot_error = None
    free_old_table(s, report, old_offset, old_size)
    res.corruptions_fixed += res.corruptions
    res.corruptions = 0


def free_old_table(s: Qcow2State, report: Report, offset: int, size: int) -> None:
    """qcow2_free_clusters of the table just replaced: all its clusters or none. QEMU fails
    (and says so, the check goes on) where a cluster has no refcount block (EAGAIN) or a count
    of 0 already (EINVAL); the clusters then stay as they are."""
    rc = s.refcounts
    assert rc is not None
    if size <= 0:
        return
    cb = s.cluster_bits
    clusters = range(offset >> cb, ((offset + size - 1) >> cb) + 1)
    if not all(map(rc.has_block, clusters)):
        report(f"qcow2_free_clusters failed: {os.strerror(errno.EAGAIN)}")
    elif not all(map(rc.get, clusters)):
        report(f"qcow2_free_clusters failed: {os.strerror(errno.EINVAL)}")
    else:
        rc.defer_free(clusters.start, len(clusters))
