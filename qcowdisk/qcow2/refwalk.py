"""The reference walk of the package (QEMU's calculate_refcounts): `RefcountWalk` counts every
reference the image holds into an in-memory refcount table (QEMU's IMRT) in QEMU's order
(header, active L1 and its L2 tables, snapshot L1 tables, snapshot table, refcount table,
bitmaps, refcount blocks), checking each entry on the way. `repair.count_references` (the
dirty-image rebuild at a read-write open) is the same walk in strict mode.

What QEMU does per entry is done per whole L2 table where the table is clean (arrays and C-speed
maps); any table with something unusual in it is walked entry by entry exactly as QEMU's loop
does. `fragmented` counts a data cluster of the active L2 walk whose host offset does not follow
the previous data cluster of the same table, and every compressed cluster.
"""

from __future__ import annotations

import errno
import operator
import sys
from array import array
from functools import cache, reduce
from itertools import compress

from ..errors import CorruptImageError
from ..record import FrozenRecord
from .checkresult import FIX_ERRORS, CheckProgress, CheckTally, Report, StepFailed, hx, no_report
from .diskrefs import read_reftable, snapshot_table_size
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
    decode_u64_table,
)
from .format import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    MAX_L1_BYTES,
    SnapshotEntry,
)
from .state import Qcow2State

L2E_STD_RESERVED_MASK = 0x3F000000000001FE  # QEMU's check tests these bits (bit 0 is the zero flag)
BME_RESERVED_MASK = 0xFF000000000001FE      # bitmap table entries
_IMRT_LIMIT = 0xFFFFFFFF  # the in-memory table holds 32-bit counts
_ONES = array("I", [1]) * 65536
_TOP_BYTE = 0xFF << 56


class RefcountWalk:
    """Counts every reference of the image into `imrt` (QEMU's in-memory refcount table).

    `strict` is the dirty-image rebuild's mode (repair.py): a reference past the end of the file
    or a malformed compressed descriptor raises CorruptImageError at once instead of being
    counted as a corruption, and no messages are produced.
    """

    def __init__(self, s: Qcow2State, res: CheckTally, report: Report = no_report, fix: int = 0,
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
        self.progress: CheckProgress | None = None
        # active L2 table offset -> its first entry, for tables the walk found to be one
        # host-contiguous run (check_oflag_copied judges those without reading them again)
        self.contiguous_l2: dict[int, int] = {}
        self.rebuild = False
        self.last_run = 0  # the first entry of the table `_contiguous_fast` accepted last (0: none)
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
                raise StepFailed(errno.EFBIG)
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
                self.report(f"ERROR snapshot {sn.id} ({sn.name}) l1_offset={hx(sn.l1_table_offset)}: L1 table is not "
                            "cluster aligned; snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            if sn.l1_size > MAX_L1_BYTES // 8:
                self.report(f"ERROR snapshot {sn.id} ({sn.name}) l1_size={hx(sn.l1_size)}: L1 table is too large; "
                            "snapshot table entry corrupted")
                self.res.corruptions += 1
                continue
            self.l1(f"snapshot {sn.id} L1", sn.l1_table_offset, sn.l1_size, frag=False, active=False)
        self.inc("snapshot table", self.snapshots_offset, self.snapshots_size)
        self.inc("refcount table", h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        self.bitmaps()
        self.refblocks()

    def l1(self, name: str, l1_offset: int, l1_size: int, frag: bool, active: bool) -> None:
        """check_refcounts_l1: the table, its L2 tables and what they reference.

        L2 tables that lie host-contiguously are read together (one pread per group); a group
        whose data clusters are one host-contiguous run is counted at once."""
        if not l1_size:
            return
        self.inc(name, l1_offset, l1_size * 8)
        mine = self.s.l1
        if active and mine.table_offset == l1_offset and len(mine.entries) == l1_size and not mine.dirty:
            l1 = mine.entries  # the same bytes as on disk (a read-write image was flushed first)
        else:
            # what the file holds of the table (QEMU reads the rest as zeros: no references)
            raw = self.pread_in_file(l1_size * 8, l1_offset)
            l1 = decode_u64_table(raw[:len(raw) // 8 * 8])
        used = list(compress(range(len(l1)), l1))
        self.tick(l1_size - len(used))
        words_per_table = self.cs // 8
        k = 0
        while k < len(used):
            group = table_group(l1, used, k, self.cs, self.nb)
            words = self.read_tables(l1[used[k]] & L1E_OFFSET_MASK, group)
            if group > 1 and not self.exact and self._contiguous_fast(words, frag):
                first_l2 = l1[used[k]] & L1E_OFFSET_MASK
                self._count_run(first_l2 >> self.cb, group)  # the L2 tables
                if active:
                    span = words_per_table * self.cs
                    for t in range(group):
                        self.contiguous_l2[first_l2 + t * self.cs] = self.last_run + t * span
            else:
                for t in range(group):
                    table = words[t * words_per_table:(t + 1) * words_per_table] if group > 1 else words
                    self.l1_entry(name, l1[used[k + t]], used[k + t], table, frag, active)
            k += group
            self.tick(group)

    def l1_entry(self, name: str, e: int, i: int, words: array[int], frag: bool, active: bool) -> None:
        """One L1 entry and the L2 table it names (`words`, read already)."""
        if e & L1E_RESERVED_MASK:
            self.report(f"ERROR found L1 entry with reserved bits set: {e:x}")
            self.res.corruptions += 1
        l2_offset = e & L1E_OFFSET_MASK
        cluster = l2_offset >> self.cb
        if l2_offset & (self.cs - 1) or cluster >= self.nb or self.imrt[cluster] >= self.refcount_max:
            self.inc(f"L2 table ({name} index {i})", l2_offset, self.cs)
        else:
            self.imrt[cluster] += 1  # what `inc` does for one aligned cluster inside the file
        if l2_offset & (self.cs - 1):
            self.report(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            self.res.corruptions += 1
        if not self.exact and self._l2_fast(words, frag):
            if active and self.last_run:
                self.contiguous_l2[l2_offset] = self.last_run
            return
        self._l2_exact(words, l2_offset, i, frag, active)

    def read_tables(self, host_offset: int, count: int) -> array[int]:
        """`count` host-contiguous tables of one cluster each as u64 words (zeros past the end of
        the file, as QEMU reads them)."""
        length = count * self.cs
        return decode_u64_table(self.s.host.pread(length, host_offset).ljust(length, b"\0"))

    def pread_in_file(self, length: int, host_offset: int) -> bytes:
        """What the file holds of [host_offset, host_offset + length): a length from an
        unchecked field never sizes a buffer beyond the file."""
        return self.s.host.pread(max(0, min(length, self.file_len - host_offset)), host_offset)

    def tick(self, count: int) -> None:
        """`count` more L1 entries walked (progress; see checkresult.CheckProgress)."""
        if self.progress is not None:
            self.progress.advance(count)

    def steps(self) -> int:
        """The progress steps of `calculate`: the entries of every L1 table it walks."""
        tables = [sn.l1_size for sn in self.snapshots
                  if not sn.l1_table_offset & (self.cs - 1) and sn.l1_size <= MAX_L1_BYTES // 8]
        return self.s.header.l1_size + sum(tables)

    def _contiguous_fast(self, words: array[int], frag: bool) -> bool:
        """Count standard L2 entries that are all one host-contiguous run of plain data clusters
        inside the file (the commonest table there is); False: not such a run."""
        self.last_run = 0
        if self.step != 1:
            return False
        run = contiguous_run(words, self.cs)
        if run is None or run & self.fast_reject or not run & L2E_OFFSET_MASK:
            return False
        lo, n = (run & L2E_OFFSET_MASK) >> self.cb, len(words)
        if not self.s.has_data_file:
            if lo + n > self.nb:
                return False
            self._count_run(lo, n)
        if frag:
            self.res.allocated_clusters += n
        self.last_run = run
        return True

    def _l2_fast(self, words: array[int], frag: bool) -> bool:
        """Count a table whose nonzero entries are all plain data (or preallocated zeros) at aligned,
        nonzero offsets inside the file with consistent bitmaps; False leaves it to `_l2_exact`."""
        if self._contiguous_fast(words, frag):
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
        raw = self.pread_in_file(dir_size, dir_offset)
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
            raw_table = self.pread_in_file(table_size * 8, table_offset)
            table = decode_u64_table(raw_table[:len(raw_table) // 8 * 8])  # the rest: zeros, no references
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


GROUP_BYTES = 1 << 21  # L2 tables read (and counted) at once when they lie host-contiguously


def table_group(l1: array[int], used: list[int], k: int, cluster_size: int, cluster_count: int) -> int:
    """How many of the L1 entries used[k:] name host-contiguous, aligned tables inside the first
    `cluster_count` clusters with no reserved bits, from used[k] on (at least 1, at most
    GROUP_BYTES of tables)."""
    first = l1[used[k]]
    offset = first & L1E_OFFSET_MASK
    if k + 1 == len(used) or l1[used[k + 1]] & L1E_OFFSET_MASK != offset + cluster_size:
        return 1  # the common answer for tables spread among data clusters, found early
    if first & L1E_RESERVED_MASK or offset & (cluster_size - 1) or not offset:
        return 1
    limit = min(len(used) - k, GROUP_BYTES // cluster_size, cluster_count - offset // cluster_size)
    group = 1
    while group < limit:
        e = l1[used[k + group]]
        if e & L1E_RESERVED_MASK or e & L1E_OFFSET_MASK != offset + group * cluster_size:
            break
        group += 1
    return group


def contiguous_run(entries: array[int], cluster_size: int) -> int | None:
    """The first entry when every entry is the one before it plus one cluster (a fully allocated,
    host-contiguous table, the commonest there is), compared at C speed; else None.

    The table read as one integer (u64 digits, native order) is compared with the progression's:
    first * sum(2^64i) + cluster_size * sum(i * 2^64i). Every term of an increasing progression
    that ends at a u64 is a u64, so no digit carries and the integers are equal exactly when
    every entry is."""
    n = len(entries)
    first = entries[0]
    if not first or entries[-1] != first + (n - 1) * cluster_size:
        return None
    if first & ~L2E_OFFSET_MASK & ~_TOP_BYTE:
        return None  # flags in the low bits (zero flag, reserved): the general path judges them
    ones, ramp = _progression_digits(n)
    return first if int.from_bytes(entries, sys.byteorder) == first * ones + cluster_size * ramp else None


@cache
def _progression_digits(n: int) -> tuple[int, int]:
    """sum(2^64i) and sum(i * 2^64i) for i < n, laid out as `contiguous_run` reads a table."""
    return (int.from_bytes(array("Q", [1]) * n, sys.byteorder),
            int.from_bytes(array("Q", range(n)), sys.byteorder))


class SnapshotRef(FrozenRecord):
    """What the check needs of one snapshot table entry (read as QEMU reads it in check mode)."""

    __slots__ = ("entry", "extra_data_size", "id", "l1_size", "l1_table_offset", "name")
    _hidden = ("entry",)
    _uncompared = ("entry",)
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    extra_data_size: int
    entry: SnapshotEntry | None  # as a rewrite needs it

    def __init__(self, id: str, name: str, l1_table_offset: int, l1_size: int, extra_data_size: int,
                 entry: SnapshotEntry | None = None) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "l1_table_offset", l1_table_offset)
        object.__setattr__(self, "l1_size", l1_size)
        object.__setattr__(self, "extra_data_size", extra_data_size)
        object.__setattr__(self, "entry", entry)
