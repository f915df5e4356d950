"""The snapshot table as `qemu-img check` reads it (qcow2_check_read_snapshot_table): entries QEMU's
open would refuse are counted as corruptions here, a table that cannot be read ends the check.
"""

from __future__ import annotations

import errno

from .checkresult import FIX_ERRORS, CheckTally, Report, StepFailed
from .format import (
    MAX_SNAPSHOT_EXTRA,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    SNAPSHOT_HEADER_STRUCT,
)
from .refwalk import SnapshotRef
from .state import Qcow2State

INT_MAX = (1 << 31) - 1
SNAPSHOT_READ_AHEAD = 1 << 16  # bytes of a snapshot table read at once when its length is unknown


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def read_snapshot_table(s: Qcow2State, report: Report, res: CheckTally, fix: int) -> tuple[list[SnapshotRef], int, int]:
    """qcow2_check_read_snapshot_table (without repairs): the entries, the table's offset and its
    size as QEMU computes them. Entries QEMU's open would refuse (v3 entries without the 16 bytes
    of extra data) are corruptions here; a table that cannot be read at all ends the check."""
    h, cs = s.header, s.cluster_size
    count, offset = h.nb_snapshots, h.snapshots_offset
    if count > MAX_SNAPSHOTS:
        res.check_errors += 1
        report("qcowdisk: ERROR snapshot table too large")
        report(f"You can force-remove all {count - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all")
        raise StepFailed(errno.EFBIG)
    if (1 << 63) - 1 - count * 40 < offset or offset & (cs - 1):
        res.check_errors += 1
        report("qcowdisk: ERROR snapshot table offset invalid")
        raise StepFailed(errno.EINVAL)
    if not count:
        return [], offset, 0
    file_len = s.host.size()
    want = s.snapshot_table_length if s.snapshot_error is None and s.snapshot_table_length else SNAPSHOT_READ_AHEAD
    buf = s.host.pread(max(0, min(file_len - offset, want)), offset)  # `take` reads on past it if need be

    def take(pos: int, length: int) -> bytes:
        if pos + length > len(buf):
            return (buf[pos:] + s.host.pread(pos + length - max(pos, len(buf)), offset + max(pos, len(buf)))).ljust(
                length, b"\0")
        return buf[pos:pos + length]

    def fail(message: str, hint: str) -> StepFailed:
        res.check_errors += 1
        report(f"qcowdisk: ERROR failed to read the snapshot table: {message}")
        report(hint)
        return StepFailed(errno.EFBIG)

    snaps: list[SnapshotRef] = []
    pos = table_length = 0
    for i in range(count):
        table_length = -(-table_length // 8) * 8
        pos = -(-pos // 8) * 8
        l1_offset, l1_size, id_len, name_len, _, _, _, _, extra = SNAPSHOT_HEADER_STRUCT.unpack(take(pos, 40))
        pos += 40
        if extra > MAX_SNAPSHOT_EXTRA:
            raise fail(f"Too much extra metadata in snapshot table entry {i}",
                       "You can force-remove this extra metadata with qemu-img check -r all")
        pos += extra
        sid = _c_string(take(pos, id_len))
        pos += id_len
        name = _c_string(take(pos, name_len))
        pos += name_len
        table_length += 40 + extra + id_len + name_len
        if table_length > MAX_SNAPSHOT_TABLE_BYTES or pos > INT_MAX:
            raise fail("Snapshot table is too big",
                       f"You can force-remove all {count - i} overhanging snapshots with qemu-img check -r all")
        snaps.append(SnapshotRef(sid, name, l1_offset, l1_size, extra))
    if h.version >= 3:
        for i, sn in enumerate(snaps):
            if sn.extra_data_size < 16:
                res.corruptions += 1
                report(f"{'Repairing' if fix & FIX_ERRORS else 'ERROR'} snapshot table entry {i} is incomplete")
    return snaps, offset, pos

