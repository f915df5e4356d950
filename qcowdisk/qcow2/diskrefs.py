"""The image's refcounts as its on-disk structures say (`DiskRefcounts`, `read_reftable`), and the
guard on every write a repair makes to them: `metadata_overlap` (qcow2_check_metadata_overlap)
and `signal_corruption` (qcow2_signal_corruption).
"""

from __future__ import annotations

import errno
import sys
from array import array
from itertools import compress

from . import ordering
from .checkresult import Report, StepFailed, hx, no_report
from .entries import (
    L1E_OFFSET_MASK,
    REFT_OFFSET_MASK,
    TableCodec,
    decode_u64_table,
)
from .format import (
    INCOMPAT_CORRUPT,
)
from .state import Qcow2State


def read_reftable(s: Qcow2State) -> array[int]:
    """The refcount table as on disk (what the header points at now)."""
    h = s.header
    length = h.refcount_table_clusters * s.cluster_size
    return decode_u64_table(s.host.pread(length, h.refcount_table_offset).ljust(length, b"\0"))


def snapshot_table_size(s: Qcow2State) -> int:
    """QEMU's snapshots_size: the table's bytes up to the end of the last entry (no padding after it)."""
    h = s.header
    if not h.nb_snapshots:
        return 0
    raw = s.host.pread(s.snapshot_table_length, h.snapshots_offset)
    pos = end = 0
    for _ in range(h.nb_snapshots):
        pos = -(-pos // 8) * 8
        if pos + 40 > len(raw):
            return s.snapshot_table_length
        id_len = int.from_bytes(raw[pos + 12:pos + 14], "big")
        name_len = int.from_bytes(raw[pos + 14:pos + 16], "big")
        extra = int.from_bytes(raw[pos + 36:pos + 40], "big")
        pos += 40 + extra + id_len + name_len
        end = pos
    return end


def signal_corruption(s: Qcow2State, report: Report, message: str) -> None:
    """qcow2_signal_corruption: say so once per open image; on a writable image also set the
    corrupt bit, after which nothing more is written (QEMU makes the image unusable)."""
    fatal = not s.readonly
    if s.signaled_corruption and (not fatal or s.header.incompatible_features & INCOMPAT_CORRUPT):
        return
    if fatal:
        report(f"qcow2: Marking image as corrupt: {message}; further corruption events will be suppressed")
        s.corrupt = True
        ordering.switch_header(s, incompatible_features=s.header.incompatible_features | INCOMPAT_CORRUPT)
    else:
        report(f"qcow2: Image is corrupt: {message}; further non-fatal corruption events will be suppressed")
    s.signaled_corruption = True


def metadata_overlap(s: Qcow2State, offset: int, size: int, ignore_active_l2: bool = False) -> str | None:
    """What metadata [offset, offset + size) would overwrite, named and ordered as
    qcow2_check_metadata_overlap names them, with QEMU's default `overlap-check=cached` (snapshot
    L1 and L2 tables are not looked at); None: nothing."""
    cs, h = s.cluster_size, s.header
    if offset < cs:
        return "qcow2_header"
    start = offset // cs * cs
    end = -(-(offset + size) // cs) * cs

    def hits(off: int, length: int) -> bool:
        return length > 0 and off < end and start < off + length

    if h.l1_size and hits(h.l1_table_offset, h.l1_size * 8):
        return "active L1 table"
    if hits(h.refcount_table_offset, h.refcount_table_clusters * cs):
        return "refcount table"
    if h.nb_snapshots and hits(h.snapshots_offset, snapshot_table_size(s)):
        return "snapshot table"
    l1 = s.l1.entries
    if not ignore_active_l2 and any(hits(e & L1E_OFFSET_MASK, cs) for e in compress(l1, l1) if e & L1E_OFFSET_MASK):
        return "active L2 table"
    reftable = read_reftable(s)
    if any(hits(e & REFT_OFFSET_MASK, cs) for e in compress(reftable, reftable) if e & REFT_OFFSET_MASK):
        return "refcount block"
    return None


class DiskRefcounts:
    """The refcounts as the image's refcount structures say (read from disk, decoded per block)."""

    def __init__(self, s: Qcow2State, report: Report = no_report) -> None:
        self.s = s
        self.report = report
        self.reftable = read_reftable(s)
        self.codec = TableCodec(s.header.refcount_bits, s.cluster_size)
        self.epb = self.codec.entry_count
        self.blocks: dict[int, array[int] | None] = {}

    def block(self, ri: int) -> array[int] | None:
        """Refcount block `ri`'s counts (None: no block, all zero). Raises StepFailed(EIO) when unaligned."""
        if ri >= len(self.reftable):
            return None
        if ri in self.blocks:
            return self.blocks[ri]
        offset = self.reftable[ri] & REFT_OFFSET_MASK
        if not offset:
            self.blocks[ri] = None
            return None
        if offset & (self.s.cluster_size - 1):
            signal_corruption(self.s, self.report, f"Refblock offset {hx(offset)} unaligned (reftable index: {hx(ri)})")
            raise StepFailed(errno.EIO)
        cs = self.s.cluster_size
        counts = self.codec.decode(self.s.host.pread(cs, offset).ljust(cs, b"\0"))
        self.blocks[ri] = counts
        return counts

    def aligned_blocks(self, count: int) -> bool:
        """Whether the first `count` refcount table entries name cluster-aligned blocks (or none),
        so that reading them cannot fail."""
        mask = (self.s.cluster_size - 1) & REFT_OFFSET_MASK
        return not any(map(mask.__and__, self.reftable[:count]))

    def flat(self, count: int) -> array[int] | None:
        """The counts of clusters [0, count) in one array of the blocks' own type (None if a
        block cannot be read); whole blocks are copied, never entry by entry."""
        out = array(self.codec.typecode)
        zeros = self.codec.new()
        try:
            for ri in range(-(-count // self.epb)):
                block = self.block(ri)
                out.extend(zeros if block is None else block)
        except StepFailed:
            return None
        return out

    def get(self, cluster: int) -> int:
        """One cluster's count (qcow2_get_refcount)."""
        ri, idx = divmod(cluster, self.epb)
        block = self.block(ri)
        return 0 if block is None else block[idx]


def same_counts(have: array[int], want: array[int]) -> bool:
    """Whether two arrays of unsigned counts (any item sizes) hold the same values: the narrower
    one is widened byte lane by byte lane, then the bytes are compared (all at C speed)."""
    if have.itemsize == want.itemsize:
        return have.tobytes() == want.tobytes()
    narrow, wide = (have, want) if have.itemsize < want.itemsize else (want, have)
    k, size = narrow.itemsize, wide.itemsize
    src = narrow.tobytes()
    widened = bytearray(len(narrow) * size)
    low = 0 if sys.byteorder == "little" else size - k  # where the value's bytes lie in a wide item
    for lane in range(k):
        widened[low + lane::size] = src[lane::k]
    return widened == wide.tobytes()


def counts_exceed(counts: array[int], limit: int) -> bool:
    """Whether any of `counts` (an array of 32-bit counts) is above `limit` (2^bits - 1 for a
    refcount width of 1 to 64 bits), looking at byte lanes at C speed."""
    if limit >= 0xFFFFFFFF:
        return False
    assert counts.itemsize == 4
    raw = counts.tobytes()
    width = (limit.bit_length() + 7) // 8  # bytes a count within the limit may use
    lanes = [raw[i::4] for i in range(4)]
    if sys.byteorder == "big":
        lanes.reverse()  # lanes[0]: the least significant byte of every count
    if any(lane.count(0) != len(lane) for lane in lanes[width:]):
        return True
    return limit < 0xFF and bool(lanes[0].translate(None, bytes(range(limit + 1))))
