"""Checking and repairing an image's refcounts, as `qemu-img check [-r leaks|all]` (QEMU 7.2) does.

The one reference walker of the package lives here: `RefcountWalk` counts every reference the
image holds into an in-memory refcount table (QEMU's IMRT) in QEMU's order (header, active L1
and its L2 tables, snapshot L1 tables, snapshot table, refcount table, bitmaps, refcount
blocks), checking each entry on the way. `repair.count_references` (the dirty-image rebuild at
a read-write open) is the same walk in strict mode. Then, as `qcow2_check_refcounts`:
`compare_refcounts` against the on-disk counts, an optional repair, `check_oflag_copied`.

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

Where qcowdisk differs from qemu-img check: a snapshot table that must be rewritten (`-r all` on
incomplete entries, too much extra data, too many snapshots) is not repaired (`Check failed:
Operation not supported`); encrypted images are refused at open; images whose header or tables
qcowdisk refuses to open fail with qcowdisk's reason where qemu-img may open them; the metadata
overlap check of `fix_l2_entry_by_zero` is not made; the messages of a malformed bitmap
directory are not QEMU's (only its corruption count is).
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import compress
from typing import Literal

from ..errors import CorruptImageError, QcowError
from . import ordering
from .entries import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    REFT_RESERVED_MASK,
    SUBCLUSTER_ALL,
    TableCodec,
    decode_u64_table,
)
from .format import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAX_L1_BYTES,
    MAX_SNAPSHOT_EXTRA,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    SNAPSHOT_HEADER_STRUCT,
)
from .state import Qcow2State

FIX_LEAKS = 1   # BDRV_FIX_LEAKS
FIX_ERRORS = 2  # BDRV_FIX_ERRORS
Repair = Literal["leaks", "all"] | None
REPAIR_MODES: dict[Repair, int] = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}

L2E_STD_RESERVED_MASK = 0x3F000000000001FE  # QEMU's check tests these bits (bit 0 is the zero flag)
BME_RESERVED_MASK = 0xFF000000000001FE      # bitmap table entries
INT_MAX = (1 << 31) - 1
_IMRT_LIMIT = 0xFFFFFFFF  # the in-memory table holds 32-bit counts

Report = Callable[[str], None]
_ONES = array("I", [1]) * 65536
SNAPSHOT_READ_AHEAD = 1 << 16  # bytes of a snapshot table read at once when its length is unknown
_TOP_BYTE = 0xFF << 56
_TOP_LANE = 7 if sys.byteorder == "little" else 0  # where a native u64's top byte lies


class CheckFailedError(QcowError):
    """The check could not complete (QEMU: `Check failed: <strerror>`); `strerror` says why."""

    def __init__(self, strerror: str) -> None:
        super().__init__(f"Check failed: {strerror}")
        self.strerror = strerror


@dataclass(frozen=True)
class CheckResult:
    """What `qemu-img check --output=json` reports, field for field (QAPI ImageCheck).

    `corruptions_fixed` and `leaks_fixed` are what a repair fixed; the other counts describe the
    image after it (qemu-img checks a repaired image again and reports that second check).
    """

    check_errors: int
    corruptions: int
    leaks: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int
    filename: str
    format: str = "qcow2"

    @property
    def exit_status(self) -> int:
        """qemu-img check's exit status: 1 internal errors, 2 corruptions, 3 leaks, else 0."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def qapi(self) -> dict[str, int | str]:
        """The ImageCheck object as QEMU serialises it: optional members only when nonzero, in
        the order QEMU's QDict iterates them (its hash buckets; see `_QDICT_ORDER`)."""
        values: dict[str, int | str] = {
            "filename": self.filename, "format": self.format, "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset, "corruptions": self.corruptions, "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed, "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters, "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters, "compressed-clusters": self.compressed_clusters}
        always = ("filename", "format", "check-errors")
        return {k: values[k] for k in _QDICT_ORDER if k in always or values[k]}

    def to_json(self) -> str:
        """`qemu-img check --output=json`'s text (without the final newline)."""
        items = [f"    {_qjson_string(k)}: {_qjson_string(v) if isinstance(v, str) else v}"
                 for k, v in self.qapi().items()]
        return "{\n" + ",\n".join(items) + "\n}"

    def to_human(self) -> str:
        """`qemu-img check`'s human-readable summary (dump_human_image_check), lines ending in newlines."""
        out = []
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            if self.corruptions:
                out.append(f"\n{self.corruptions} errors were found on the image.\n"
                           "Data may be corrupted, or further writes to the image may corrupt it.\n")
            if self.leaks:
                out.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                           "This means waste of disk space, but no harm to data.\n")
            if self.check_errors:
                out.append(f"\n{self.check_errors} internal errors have occurred during the check.\n")
        if self.total_clusters and self.allocated_clusters:
            out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n" % (
                self.allocated_clusters, self.total_clusters, self.allocated_clusters * 100.0 / self.total_clusters,
                self.fragmented_clusters * 100.0 / self.allocated_clusters,
                self.compressed_clusters * 100.0 / self.allocated_clusters))
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)

    def repaired_banner(self) -> str:
        """What qemu-img prints (human output) before checking a repaired image again."""
        return ("The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n")


# QEMU 7.2 prints a QDict in bucket order: tdb_hash(key) % 512 (qobject/qdict.c); no two of
# these keys share a bucket, so this order is fixed.
def _tdb_hash(name: str) -> int:
    data = name.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, ch in enumerate(data):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


_QDICT_ORDER = sorted(("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
                       "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
                       "fragmented-clusters", "compressed-clusters"), key=lambda k: _tdb_hash(k) % 512)


def _qjson_string(text: str) -> str:
    """A JSON string as QEMU's qjson writes it: ASCII printable as is, the rest as \\uXXXX (upper case)."""
    out = ['"']
    for ch in os.fsencode(text).decode("utf-8", "replace"):
        cp = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            out.append("\\u%04X\\u%04X" % (0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _hx(value: int) -> str:
    """C's %#x: 0x-prefixed, but a bare 0."""
    return f"{value:#x}" if value else "0"


class CheckTally:
    """QEMU's BdrvCheckResult (mutable while checking)."""

    __slots__ = ("allocated_clusters", "check_errors", "compressed_clusters", "corruptions", "corruptions_fixed",
                 "fragmented_clusters", "image_end_offset", "leaks", "leaks_fixed", "total_clusters")

    def __init__(self) -> None:
        self.corruptions = self.leaks = self.check_errors = 0
        self.corruptions_fixed = self.leaks_fixed = 0
        self.image_end_offset = 0
        self.total_clusters = self.allocated_clusters = self.fragmented_clusters = self.compressed_clusters = 0

    def copy(self) -> CheckTally:
        r = CheckTally()
        for name in self.__slots__:
            setattr(r, name, getattr(self, name))
        return r

    def result(self, filename: str) -> CheckResult:
        return CheckResult(self.check_errors, self.corruptions, self.leaks, self.corruptions_fixed, self.leaks_fixed,
                           self.image_end_offset, self.total_clusters, self.allocated_clusters,
                           self.fragmented_clusters, self.compressed_clusters, filename)


class _Failed(Exception):
    """A check step failed as QEMU's returns -errno: the check stops (`Check failed: ...`)."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.err = err


def _no_report(line: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------
# The reference walk (calculate_refcounts)

class RefcountWalk:
    """Counts every reference of the image into `imrt` (QEMU's in-memory refcount table).

    `strict` is the dirty-image rebuild's mode (repair.py): a reference past the end of the file
    or a malformed compressed descriptor raises CorruptImageError at once instead of being
    counted as a corruption, and no messages are produced.
    """

    def __init__(self, s: Qcow2State, res: CheckTally, report: Report = _no_report, fix: int = 0,
                 strict: bool = False) -> None:
        self.s = s
        self.res = res
        self.report = report
        self.fix = fix
        self.strict = strict
        self.cs = s.cluster_size
        self.cb = s.cluster_bits
        self.refcount_max = (1 << s.header.refcount_bits) - 1
        self.file_len = s.host.size()
        self.nb = -(-self.file_len // self.cs)       # clusters the in-memory table covers
        self.imrt = array("I", bytes(4 * self.nb))
        self.exact = False                           # walk every table entry by entry
        self.rebuild = False
        self.step = 2 if s.extended_l2 else 1
        self.align_mask = (self.cs - 1) & L2E_OFFSET_MASK
        self.fast_reject = OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | self.align_mask
        self.snapshots_offset = s.header.snapshots_offset if s.snapshot_error is None else 0
        self.snapshots: list[SnapshotRef] = [] if s.snapshot_error is not None else [
            SnapshotRef(sn.id, sn.name, sn.l1_table_offset, sn.l1_size, 16) for sn in s.snapshots]
        self.snapshots_size = snapshot_table_size(s) if self.snapshots else 0

    # --- counting (qcow2_inc_refcounts_imrt) ---------------------------------------------
    def grow(self, clusters: int) -> None:
        """Let the in-memory table cover `clusters` clusters."""
        if clusters > self.nb:
            self.imrt.extend(array("I", bytes(4 * (clusters - self.nb))))
            self.nb = clusters

    def inc(self, what: str, offset: int, size: int) -> None:
        """Count one reference to every cluster of [offset, offset + size)."""
        if size <= 0:
            return
        cs = self.cs
        if offset + size - self.file_len >= cs + self.strict:  # strict: the rebuild's tolerance (see repair.py)
            if self.strict:
                raise CorruptImageError(
                    f"{what} at host offset 0x{offset:x} ({size} bytes) lies past the end of the file "
                    f"({self.file_len} bytes); refusing to rebuild the refcounts of {self.s.filename!r}")
            self.report("ERROR: counting reference for region exceeding the end of the file by one cluster or "
                        f"more: offset 0x{offset:x} size 0x{size:x}")
            self.res.corruptions += 1
            return
        imrt = self.imrt
        for k in range(offset >> self.cb, ((offset + size - 1) >> self.cb) + 1):
            if k >= self.nb:
                self.grow(k + 1)
            count = imrt[k]
            if count == self.refcount_max:
                self.report(f"ERROR: overflow cluster offset=0x{k << self.cb:x}")
                self.report("Use qemu-img amend to increase the refcount entry width or qemu-img convert to "
                            "create a clean copy if the image cannot be opened for writing")
                self.res.corruptions += 1
                continue
            if count == _IMRT_LIMIT:
                raise _Failed(errno.EFBIG)
            imrt[k] = count + 1

    # --- the walk ------------------------------------------------------------------------
    def calculate(self) -> None:
        """calculate_refcounts: the whole walk, then the refcount blocks (check_refblocks)."""
        s, h = self.s, self.s.header
        self.inc("header", 0, self.cs)
        self.l1("active L1", h.l1_table_offset, h.l1_size, frag=True, active=True)
        if s.has_data_file and self.snapshots:
            self.report(f"ERROR {len(self.snapshots)} snapshots in image with data file")
            self.res.corruptions += 1
        for sn in self.snapshots:
            if sn.l1_table_offset & (self.cs - 1):
                self.report(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={_hx(sn.l1_table_offset)}: L1 table is not "
                            "cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_BYTES // 8:
                self.report(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={_hx(sn.l1_size)}: L1 table is too large; "
                            "snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            self.l1(f"snapshot {sn.id} L1", sn.l1_table_offset, sn.l1_size, frag=False, active=False)
        self.inc("snapshot table", self.snapshots_offset, self.snapshots_size)
        self.inc("refcount table", h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        self.bitmaps()
        self.refblocks()

    def l1(self, name: str, l1_offset: int, l1_size: int, frag: bool, active: bool) -> None:
        """check_refcounts_l1: the table, its L2 tables and what they reference."""
        if not l1_size:
            return
        self.inc(name, l1_offset, l1_size * 8)
        mine = self.s.l1
        if active and mine.table_offset == l1_offset and len(mine.entries) == l1_size and not mine.dirty:
            l1 = mine.entries  # the same bytes as on disk (a read-write image was flushed first)
        else:
            raw = self.s.host.pread(l1_size * 8, l1_offset)
            l1 = decode_u64_table(raw.ljust(l1_size * 8, b"\0"))
        for i in compress(range(l1_size), l1):
            e = l1[i]
            if e & L1E_RESERVED_MASK:
                self.report(f"ERROR found L1 entry with reserved bits set: {e:x}")
                self.res.corruptions += 1
            l2_offset = e & L1E_OFFSET_MASK
            self.inc(f"L2 table ({name} index {i})", l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.report(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
                self.res.corruptions += 1
            self.l2(l2_offset, i, frag, active)

    def read_l2(self, l2_offset: int) -> array[int]:
        """An L2 table as u64 words (entries, and bitmaps between them with extended L2)."""
        raw = self.s.host.pread(self.cs, l2_offset)
        return decode_u64_table(raw.ljust(self.cs, b"\0"))

    def l2(self, l2_offset: int, l1_index: int, frag: bool, active: bool) -> None:
        """check_refcounts_l2: one L2 table (a whole-table fast path where it is clean)."""
        words = self.read_l2(l2_offset)
        if not self.exact and self._l2_fast(words, frag):
            return
        self._l2_exact(words, l2_offset, l1_index, frag, active)

    def _l2_fast(self, words: array[int], frag: bool) -> bool:
        """Count a table whose nonzero entries are all plain data (or preallocated zeros) at aligned,
        nonzero offsets inside the file with consistent bitmaps; False leaves it to `_l2_exact`."""
        if self.step == 1:
            run = contiguous_run(words, self.cs)
            if run is not None and not run & self.fast_reject and run & L2E_OFFSET_MASK:
                lo, n = (run & L2E_OFFSET_MASK) >> self.cb, len(words)
                if self.s.has_data_file or lo + n <= self.nb:
                    if not self.s.has_data_file:
                        self._count_run(lo, n)
                    if frag:
                        self.res.allocated_clusters += n
                    return True
        entries = words[::2] if self.step == 2 else words
        nz = list(compress(entries, entries))
        if self.step == 2:
            bitmaps = words[1::2]
            if any(map(operator.and_, map((32).__rrshift__, bitmaps), bitmaps)):
                return False  # allocated and zero bits overlap somewhere
            if nz and len(nz) != len(entries) and any(
                    b & SUBCLUSTER_ALL for b in compress(bitmaps, map(operator.not_, entries))):
                return False  # an unallocated cluster with allocated subclusters
            if not nz and any(b & SUBCLUSTER_ALL for b in bitmaps):
                return False
        if not nz:
            return True
        if reduce(operator.or_, nz) & self.fast_reject:
            return False
        offsets = list(map(L2E_OFFSET_MASK.__and__, nz))
        if 0 in offsets:
            return False  # entries without an offset but with flags: their type needs a closer look
        clusters = list(map(self.cb.__rrshift__, offsets))
        steps = list(map(operator.sub, clusters[1:], clusters[:-1]))
        if not self.s.has_data_file:
            if max(clusters) >= self.nb:
                return False  # something past the end of the file
            self._count_runs(clusters, steps)
        if frag:
            res = self.res
            res.allocated_clusters += len(clusters)
            res.fragmented_clusters += len(steps) - steps.count(1)
        return True

    def _count_runs(self, clusters: list[int], steps: list[int]) -> None:
        """One reference to each of `clusters` (in table order; `steps` between neighbours):
        host-contiguous runs over clusters not yet counted become one slice assignment."""
        imrt = self.imrt
        breaks = bytes(map((1).__ne__, steps))  # 1 where the next cluster does not follow
        start = 0
        while start < len(clusters):
            stop = breaks.find(1, start) + 1 or len(clusters)  # the run is clusters[start:stop]
            lo, n = clusters[start], stop - start
            if n > 8:
                self._count_run(lo, n)
            else:
                for c in clusters[start:stop]:
                    imrt[c] += 1
            start = stop

    def _count_run(self, lo: int, n: int) -> None:
        """One more reference to each of clusters [lo, lo + n): one slice assignment where they
        all have the same count so far (not yet counted, or all shared alike with a snapshot)."""
        imrt = self.imrt
        seg = imrt[lo:lo + n]
        v = seg[0]
        if seg.count(v) == n:
            imrt[lo:lo + n] = _ONES[:n] if v == 0 and n <= len(_ONES) else array("I", [v + 1]) * n
        else:
            for c in range(lo, lo + n):
                imrt[c] += 1

    def _l2_exact(self, words: array[int], l2_offset: int, l1_index: int, frag: bool, active: bool) -> None:
        """QEMU's per-entry loop over one L2 table."""
        s, res, cs, step = self.s, self.res, self.cs, self.step
        next_contiguous = 0
        for i in range(s.l2_entries):
            e = words[i * step]
            bitmap = words[i * step + 1] if step == 2 else 0
            compressed = bool(e & OFLAG_COMPRESSED)
            if not compressed and e & L2E_STD_RESERVED_MASK:
                self.report(f"ERROR found l2 entry with reserved bits set: {e:x}")
                res.corruptions += 1
            if compressed:
                if e & OFLAG_COPIED:
                    if self.strict:
                        raise CorruptImageError(
                            f"L2 entry for guest cluster {l1_index * s.l2_entries + i} = 0x{e:x}: copied flag must "
                            f"never be set for compressed clusters")
                    self.report(f"ERROR: coffset=0x{e & s.descriptor.offset_mask:x}: copied flag must never be set "
                                "for compressed clusters")
                    e &= ~OFLAG_COPIED
                    res.corruptions += 1
                if s.has_data_file:
                    self.report(f"ERROR compressed cluster {i} with data file, entry=0x{e:x}")
                    res.corruptions += 1
                    continue
                if bitmap:
                    self.report(f"ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, "
                                f"entry=0x{e:x}")
                    res.corruptions += 1
                    continue
                coffset, csize = s.descriptor.decode(e)
                self.inc("compressed cluster", coffset, csize)
                if frag:
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            offset = e & L2E_OFFSET_MASK
            zero = bool(e & OFLAG_ZERO) and step == 1
            if zero and not offset:
                continue  # QCOW2_CLUSTER_ZERO_PLAIN
            if not offset and not (s.has_data_file and e & OFLAG_COPIED):
                if bitmap & SUBCLUSTER_ALL:
                    res.corruptions += 1
                    self.report("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                continue  # QCOW2_CLUSTER_UNALLOCATED
            # QCOW2_CLUSTER_NORMAL or QCOW2_CLUSTER_ZERO_ALLOC
            if (bitmap >> 32) & bitmap:
                res.corruptions += 1
                self.report(f"ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap")
            if offset & (cs - 1):
                res.corruptions += 1
                contains_data = bool(bitmap & SUBCLUSTER_ALL) if step == 2 else not e & OFLAG_ZERO
                if not contains_data:
                    fixing = bool(self.fix & FIX_ERRORS)
                    self.report(f"{'Repairing' if fixing else 'ERROR'} offset={offset:x}: Preallocated cluster is not "
                                "properly aligned; L2 entry corrupted.")
                    if fixing:
                        self.fix_l2_entry_by_zero(l2_offset, words, i)
                        continue
                else:
                    self.report(f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.")
            if frag:
                res.allocated_clusters += 1
                if next_contiguous and offset != next_contiguous:
                    res.fragmented_clusters += 1
                next_contiguous = offset + cs
            if not s.has_data_file:
                self.inc(f"data cluster (L2 at 0x{l2_offset:x} index {i})", offset, cs)

    def fix_l2_entry_by_zero(self, l2_offset: int, words: array[int], l2_index: int) -> None:
        """Make an unaligned preallocated zero cluster a plain zero cluster (no reference)."""
        s = self.s
        step = self.step
        table = s.l2_cache.get(l2_offset)
        if step == 2:
            bitmap = words[l2_index * 2 + 1]
            bitmap = (bitmap | (bitmap << 32)) & (SUBCLUSTER_ALL << 32)
            table.entries[l2_index * 2] = words[l2_index * 2] = 0
            table.entries[l2_index * 2 + 1] = words[l2_index * 2 + 1] = bitmap
            table.mark(l2_index * 2, l2_index * 2 + 2)
        else:
            table.entries[l2_index] = words[l2_index] = OFLAG_ZERO
            table.mark(l2_index)
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1

    def bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts: the bitmap directory, bitmap tables and their clusters."""
        h, cs = self.s.header, self.cs
        if not h.autoclear_features & AUTOCLEAR_BITMAPS:
            return
        ext = next((x for x in h.extensions if x.ext_type == EXT_BITMAPS), None)
        if ext is None or len(ext.data) < 24:
            return
        count = int.from_bytes(ext.data[0:4], "big")
        dir_size, dir_offset = int.from_bytes(ext.data[8:16], "big"), int.from_bytes(ext.data[16:24], "big")
        if not count:
            return
        self.inc("bitmap directory", dir_offset, dir_size)
        raw = self.s.host.pread(dir_size, dir_offset)
        pos = 0
        for _ in range(count):
            if pos + 24 > len(raw):
                self.res.corruptions += 1
                return
            table_offset = int.from_bytes(raw[pos:pos + 8], "big")
            table_size = int.from_bytes(raw[pos + 8:pos + 12], "big")
            name_size = int.from_bytes(raw[pos + 18:pos + 20], "big")
            extra_size = int.from_bytes(raw[pos + 20:pos + 24], "big")
            pos += -(-(24 + extra_size + name_size) // 8) * 8
            self.inc("bitmap table", table_offset, table_size * 8)
            table = decode_u64_table(self.s.host.pread(table_size * 8, table_offset).ljust(table_size * 8, b"\0"))
            for e in compress(table, table):
                offset = e & L2E_OFFSET_MASK
                if e & BME_RESERVED_MASK or offset & (cs - 1):
                    self.res.corruptions += 1
                    continue
                if offset:
                    self.inc("bitmap data", offset, cs)

    def refblocks(self) -> None:
        """check_refblocks: every refcount-table entry and the block it names."""
        s, cs, res = self.s, self.cs, self.res
        reftable = read_reftable(s)
        for i in compress(range(len(reftable)), reftable):
            e = reftable[i]
            offset = e & REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if e & REFT_RESERVED_MASK:
                self.report(f"ERROR refcount table entry {i} has reserved bits set")
                res.corruptions += 1
                self.rebuild = True
                continue
            if offset & (cs - 1):
                self.report(f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                self.rebuild = True
                continue
            if cluster >= self.nb:
                if self.strict:
                    raise CorruptImageError(
                        f"refcount block (reftable index {i}) at host offset 0x{offset:x} lies past the end of the "
                        f"file ({self.file_len} bytes); refusing to rebuild the refcounts of {s.filename!r}")
                res.corruptions += 1
                fixing = bool(self.fix & FIX_ERRORS)
                self.report(f"{'Repairing' if fixing else 'ERROR'} refcount block {i} is outside image")
                if fixing:
                    s.host.truncate(offset + cs)
                    self.file_len = s.host.size()
                    s.grow_alloc_limit(self.file_len)
                    self.grow(-(-self.file_len // cs))
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
                    self.inc("refcount block", offset, cs)
                continue
            self.inc("refcount block", offset, cs)
            if self.imrt[cluster] != 1:
                self.report(f"ERROR refcount block {i} refcount={self.imrt[cluster]}")
                res.corruptions += 1
                self.rebuild = True


def contiguous_run(entries: array[int], cluster_size: int) -> int | None:
    """The first entry when every entry is the one before it plus one cluster (a fully allocated,
    host-contiguous table, the commonest there is), compared at C speed; else None."""
    n = len(entries)
    first = entries[0]
    if not first or entries[-1] != first + (n - 1) * cluster_size:
        return None
    flags, offset = first & ~L2E_OFFSET_MASK, first & L2E_OFFSET_MASK
    if flags & ~_TOP_BYTE:
        return None  # flags in the low bits (zero flag, reserved): the general path judges them
    got = entries.tobytes()
    want = array("Q", range(offset, offset + n * cluster_size, cluster_size)).tobytes()  # < 2^56: C ints
    top = _TOP_LANE
    if got[top::8] != bytes([flags >> 56]) * n:
        return None
    return first if all(got[lane::8] == want[lane::8] for lane in range(8) if lane != top) else None


@dataclass(frozen=True)
class SnapshotRef:
    """What the check needs of one snapshot table entry (read as QEMU reads it in check mode)."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    extra_data_size: int


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
        raise _Failed(errno.EFBIG)
    if (1 << 63) - 1 - count * 40 < offset or offset & (cs - 1):
        res.check_errors += 1
        report("qcowdisk: ERROR snapshot table offset invalid")
        raise _Failed(errno.EINVAL)
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

    def fail(message: str, hint: str) -> _Failed:
        res.check_errors += 1
        report(f"qcowdisk: ERROR failed to read the snapshot table: {message}")
        report(hint)
        return _Failed(errno.EFBIG)

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


def read_reftable(s: Qcow2State) -> array[int]:
    """The refcount table as on disk (what the header points at now)."""
    h = s.header
    length = h.refcount_table_clusters * s.cluster_size
    return decode_u64_table(s.host.pread(length, h.refcount_table_offset).ljust(length, b"\0"))


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


# ------------------------------------------------------------------------------------------------
# The on-disk counts

class DiskRefcounts:
    """The refcounts as the image's refcount structures say (read from disk, decoded per block)."""

    def __init__(self, s: Qcow2State, report: Report = _no_report) -> None:
        self.s = s
        self.report = report
        self.reftable = read_reftable(s)
        self.codec = TableCodec(s.header.refcount_bits, s.cluster_size)
        self.epb = self.codec.entry_count
        self.blocks: dict[int, array[int] | None] = {}

    def block(self, ri: int) -> array[int] | None:
        """Refcount block `ri`'s counts (None: no block, all zero). Raises _Failed(EIO) when unaligned."""
        if ri >= len(self.reftable):
            return None
        if ri in self.blocks:
            return self.blocks[ri]
        offset = self.reftable[ri] & REFT_OFFSET_MASK
        if not offset:
            self.blocks[ri] = None
            return None
        if offset & (self.s.cluster_size - 1):
            signal_corruption(self.s, self.report, f"Refblock offset {_hx(offset)} unaligned (reftable index: {_hx(ri)})")
            raise _Failed(errno.EIO)
        cs = self.s.cluster_size
        counts = self.codec.decode(self.s.host.pread(cs, offset).ljust(cs, b"\0"))
        self.blocks[ri] = counts
        return counts

    def flat(self, count: int) -> array[int] | None:
        """The counts of clusters [0, count) in one array (None if a block cannot be read)."""
        out = array("Q")
        try:
            for ri in range(-(-count // self.epb)):
                block = self.block(ri)
                out.extend(array("Q", bytes(8 * self.epb)) if block is None else array("Q", block))
        except _Failed:
            return None
        return out

    def get(self, cluster: int) -> int:
        """One cluster's count (qcow2_get_refcount)."""
        ri, idx = divmod(cluster, self.epb)
        block = self.block(ri)
        return 0 if block is None else block[idx]


# ------------------------------------------------------------------------------------------------
# qcow2_check_refcounts

class _Check:
    """One run of qcow2_co_check_locked over an open image."""

    def __init__(self, s: Qcow2State, fix: int, report: Report) -> None:
        self.s = s
        self.fix = fix
        self.report = report
        self.cs = s.cluster_size
        self.cb = s.cluster_bits
        # OFLAG_COPIED flags cleared ahead of a refcount increase (see `preclear_copied`), with
        # the entries as they were: check_oflag_copied judges those, as QEMU's would.
        self.precleared_l1: dict[int, int] = {}
        self.precleared_l2: dict[tuple[int, int], int] = {}
        self.snapshots: tuple[list[SnapshotRef], int, int] = ([], 0, 0)  # entries, offset, size

    def run(self) -> CheckTally:
        s = self.s
        snapshot_res = CheckTally()
        self.snapshots = read_snapshot_table(s, self.report, snapshot_res, self.fix)
        res = CheckTally()
        self.check_refcounts(res)
        if snapshot_res.corruptions and self.fix & FIX_ERRORS:
            # qcow2_check_fix_snapshot_table rewrites the table; qcowdisk does not write
            # snapshot tables (yet), so this repair fails as QEMU's would on a write error.
            res.check_errors += 1
            self.report("ERROR failed to update snapshot table: Operation not supported")
            raise _Failed(errno.ENOTSUP)
        for name in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed"):
            setattr(res, name, getattr(res, name) + getattr(snapshot_res, name))
        if self.fix and not res.check_errors and not res.corruptions:
            self.mark_clean_and_consistent()
        return res

    def new_walk(self, res: CheckTally, fix: int) -> RefcountWalk:
        walk = RefcountWalk(self.s, res, self.report, fix)
        walk.snapshots, walk.snapshots_offset, walk.snapshots_size = self.snapshots
        return walk

    def check_refcounts(self, res: CheckTally) -> None:
        s, fix = self.s, self.fix
        walk = self.new_walk(res, fix)
        if walk.nb > INT_MAX:
            res.check_errors += 1
            raise _Failed(errno.EFBIG)
        res.total_clusters = -(-(-(-s.virtual_size // 512) * 512) // self.cs)
        self.calculate(walk)
        pre_compare = res.copy()
        highest = self.compare(walk, res, 0)
        if walk.rebuild and fix & FIX_ERRORS:
            old = res.copy()
            fresh_leaks = 0
            self.report("Rebuilding refcount structure")
            try:
                self.preclear_copied(walk)
                self.rebuild_refcount_structure(walk)
            except _Failed:
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
                raise _Failed(errno.EIO)
            if res.leaks or res.corruptions:
                self._assign(res, pre_compare)
                highest = self.compare(walk, res, fix)
        self.check_oflag_copied(res)
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
        walk.calculate()
        if not walk.exact and max(walk.imrt, default=0) > walk.refcount_max:
            self._assign(walk.res, start)
            walk.exact = True
            walk.rebuild = False
            walk.nb, walk.file_len = nb, file_len
            walk.imrt = array("I", bytes(4 * nb))
            walk.calculate()

    # --- compare_refcounts ---------------------------------------------------------------
    def compare(self, walk: RefcountWalk, res: CheckTally, fix: int) -> int:
        """compare_refcounts; applies the fixes `fix` allows. Returns the highest used cluster."""
        disk = DiskRefcounts(self.s, self.report)
        epb = disk.epb
        imrt = walk.imrt
        wide = "I" if self.s.header.refcount_bits <= 32 else "Q"
        highest = 0
        increments: list[tuple[int, int]] = []
        decrements: list[tuple[int, int]] = []
        for ri in range(-(-walk.nb // epb)):
            lo = ri * epb
            hi = min(walk.nb, lo + epb)
            want = imrt[lo:hi]
            try:
                block = disk.block(ri)
            except _Failed:
                for i in range(lo, hi):
                    self.report(f"Can't get refcount for cluster {i}: Input/output error")
                    res.check_errors += 1
                continue
            if block is None:
                if want.count(0) == len(want):
                    continue
                have = array("I", bytes(4 * len(want)))
            else:
                have = array(wide, block[:hi - lo])
                if have == want:
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
            self.preclear_copied(walk)
        if increments or decrements:
            self.apply_refcount_fixes(increments, decrements)
        return highest

    def preclear_copied(self, walk: RefcountWalk) -> None:
        """Before any count goes up: clear OFLAG_COPIED, durably, on every active entry whose
        cluster will not have refcount 1. A clear flag is always safe (a writer copies the
        cluster); a set one on a cluster that is now counted twice would tell a writer to write
        a shared cluster in place, and a crash between the increase and the flag's correction
        would leave exactly that. check_oflag_copied still judges the entries as they were."""
        s, cb, cs = self.s, self.cb, self.cs
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
                self.precleared_l1.setdefault(i, l1e)
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
                self.precleared_l2.setdefault((l2_offset, j), entries[j])
                table.entries[j * step] = entries[j] & ~OFLAG_COPIED
                table.mark(j * step)
            changed = True
        if changed:
            ordering.flush(s, final=True)

    def apply_refcount_fixes(self, increments: Sequence[tuple[int, int]], decrements: Sequence[tuple[int, int]]) -> None:
        """Raise the counts that are too low and make that durable; then drop the leaked ones
        through the deferred-free queue (released, and made durable, by the flush)."""
        s = self.s
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
    def rebuild_refcount_structure(self, walk: RefcountWalk) -> None:
        """Write new refcount blocks and a new table (into clusters nothing references, found
        in the in-memory table as QEMU's alloc_clusters_imrt finds them) and switch to them."""
        s, cs, cb = self.s, self.cs, self.cb
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
                    run = zeros // imrt.itemsize
                    if run == end - cluster:
                        contiguous += run
                        cluster = end
                    else:
                        contiguous = 0
                        cluster += run
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
                    signal_corruption(s, self.report, f"Preventing invalid write on metadata (overlaps with {overlap})")
            if s.corrupt:
                self.report(f"qcowdisk: ERROR writing {what}: Input/output error")
                raise _Failed(errno.EIO)
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
            self.report(f"qcowdisk: ERROR writing refblock: {e.strerror}")
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

    # --- check_oflag_copied --------------------------------------------------------------
    def check_oflag_copied(self, res: CheckTally) -> None:
        """OFLAG_COPIED of every active L1 and L2 entry against the on-disk refcount."""
        s, fix, cb = self.s, self.fix, self.cb
        if fix & FIX_ERRORS:
            repair = True
        elif fix & FIX_LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        disk = DiskRefcounts(s, self.report)
        flat = disk.flat(-(-s.host.size() // self.cs))
        step = 2 if s.extended_l2 else 1
        clean_reject = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_STD_RESERVED_MASK
        l1 = s.l1.entries
        changed = False
        for i in compress(range(len(l1)), l1):
            l1e = self.precleared_l1.get(i, l1[i])
            l2_offset = l1e & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = disk.get(l2_offset >> cb)
            except _Failed:
                continue
            if (refcount == 1) != bool(l1e & OFLAG_COPIED):
                res.corruptions += 1
                self.report(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED L2 cluster: l1_index={i} "
                            f"l1_entry={l1e:x} refcount={refcount}")
                if repair:
                    s.l1.set(i, l1e | OFLAG_COPIED if refcount == 1 else l1e & ~OFLAG_COPIED)
                    changed = True
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            if i in self.precleared_l1:  # cleared ahead: the flag follows the count now, fixed or not
                want = l1e | OFLAG_COPIED if refcount == 1 else l1e & ~OFLAG_COPIED
                if s.l1.entries[i] != want:
                    s.l1.set(i, want)
                    changed = True
            raw = s.host.pread(self.cs, l2_offset)
            words = decode_u64_table(raw.ljust(self.cs, b"\0"))
            entries = words[::2] if step == 2 else words
            on_disk = entries[:]
            pre = {j: e for (off, j), e in self.precleared_l2.items() if off == l2_offset}
            for j, e in pre.items():
                entries[j] = e
            if not pre and not s.has_data_file and step == 1 and flat is not None:
                run = contiguous_run(entries, self.cs)
                if run is not None and not run & clean_reject and run & L2E_OFFSET_MASK:
                    lo, n = (run & L2E_OFFSET_MASK) >> cb, len(entries)
                    ones = flat[lo:lo + n].count(1)
                    if lo + n <= len(flat) and ones == (n if run & OFLAG_COPIED else 0):
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
                        with contextlib.suppress(_Failed):
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
                    except _Failed:
                        continue
                if (refcount == 1) != bool(e & OFLAG_COPIED):
                    res.corruptions += 1
                    self.report(f"{'Repairing' if repair else 'ERROR'} OFLAG_COPIED data cluster: l2_entry={e:x} "
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
                overlap = metadata_overlap(s, l2_offset, self.cs, ignore_active_l2=True)
                if overlap is not None or s.corrupt:
                    if overlap is not None:
                        signal_corruption(s, self.report, f"Preventing invalid write on metadata (overlaps with {overlap})")
                    self.report("ERROR: Could not write L2 table; metadata overlap check failed: Input/output error")
                    res.check_errors += 1
                    raise _Failed(errno.EIO)
                table = s.l2_cache.get(l2_offset)
                for j, e in dirty:
                    table.entries[j * step] = e
                    table.mark(j * step)
                changed = True
                res.corruptions -= len(dirty)
                res.corruptions_fixed += len(dirty)
        if changed:
            ordering.flush(s, final=True)

    def mark_clean_and_consistent(self) -> None:
        """After a repair that left no errors: clear the dirty and corrupt bits (flushed first)."""
        s = self.s
        bits = s.header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
        ordering.flush(s, final=True)
        if bits:
            ordering.switch_header(s, incompatible_features=s.header.incompatible_features & ~bits)
        s.corrupt = False


def check_image(s: Qcow2State, repair: Repair = None, report: Report | None = None) -> CheckResult:
    """Check (and with `repair`, repair) an open image as `qemu-img check [-r ...]` does.

    When the repair fixed anything, the image is checked again, as qemu-img does, and that
    second check is returned with the first one's fixed counts. Raises CheckFailedError where
    qemu-img says `Check failed: <reason>`. The caller holds the lock; a repair needs a
    read-write image.
    """
    if repair not in REPAIR_MODES:
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    fix = REPAIR_MODES[repair]
    report = report or _no_report
    if not s.readonly:
        ordering.flush(s, final=True)  # the check reads the tables from disk
    try:
        res = _Check(s, fix, report).run()
        if fix and (res.corruptions_fixed or res.leaks_fixed):
            fixed = res
            res = _Check(s, 0, report).run()
            res.corruptions_fixed, res.leaks_fixed = fixed.corruptions_fixed, fixed.leaks_fixed
    except _Failed as e:
        raise CheckFailedError(os.strerror(e.err)) from None
    return res.result(s.filename)


__all__ = ["CheckFailedError", "CheckResult", "DiskRefcounts", "RefcountWalk", "check_image", "FIX_LEAKS",
           "FIX_ERRORS", "Repair"]
