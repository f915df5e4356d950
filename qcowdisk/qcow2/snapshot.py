"""Internal snapshots: create, apply (revert to), delete, and load one for reading.

What each operation does is what `qemu-img snapshot -c/-a/-d` and `qemu-img convert -l` do
(QEMU 7.2, block/qcow2-snapshot.c), with three deliberate differences, each stricter:
a name already in use, a name QEMU would truncate (over 255 bytes) or cut (a NUL) is refused;
every table the operation follows is validated before anything changes (QEMU may fail half-way
and leak); and apply writes the new active L1 to new clusters and switches to it in the header
(QEMU overwrites the active L1 in place, which a torn write can leave half old, half new).

Crash ordering (the edges are declared in ordering.py; nothing here calls fsync itself):

- **create**: flush; copy the active L1 to new clusters (COPIED cleared); +1 on every L2
  table and data cluster the active tree reaches (each host cluster a compressed payload
  touches); COPIED recomputed in the active tables; flush, so the refcount blocks reach the
  disk before the L2 tables whose COPIED flags they clear, and those before the active L1;
  a new snapshot table in new clusters, its refcount written; one header switch
  (nb_snapshots + snapshots_offset, `switch_header`: sync, header write, sync); the old table
  is a deferred free, released by the closing flush.
- **delete**: flush; the table without the entry, written and switched to as above; the
  snapshot's L1 clusters and one reference per L2 table and data cluster its tree reaches go
  to the deferred-free queue; COPIED is set where the count will be 1 once they are applied;
  the closing flush writes the L2 tables and L1 first and only then decrements the refcounts.
- **apply**: flush; +1 on the snapshot's tree; COPIED cleared in its L2 tables (they become
  active and shared); flush; the new active L1 (the snapshot's entries, padded to the L1 size
  the disk size needs) in new clusters; one header switch (l1_table_offset + l1_size + size);
  the old active tree and its L1 clusters are deferred frees released by the closing flush.

So at every cut the header names either the old or the new state, and what it names is
complete on disk. Refcounts may run ahead of references (leaks) in between. One more window
cannot be closed with refcounts updated in place: a refcount and the COPIED flag of the entry
that points at the cluster live in different clusters, and `qemu-img check` reports a
mismatch either way as a corruption. The order above keeps the harmless side: between the
refcount increment (create) or the flag setting (delete) and the other write, an entry may
carry COPIED while its count is 2 and its references 1, a leak that `qemu-img check -r leaks`
(or a lazy-refcount rebuild) turns into a fully consistent image. QEMU has the same window.

Every function expects the caller to hold the image lock and to have checked that the image
is writable (or, for `load_for_reading`, opened read-only).
"""

from __future__ import annotations

import re
import time
from array import array
from collections import Counter
from collections.abc import Callable
from itertools import compress

from ..errors import (
    CorruptImageError,
    InvalidImageError,
    QcowError,
    RefcountOverflowError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)
from . import ordering
from .entries import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFT_OFFSET_MASK,
    decode_u64_table,
    encode_u64_entries,
)
from .format import (
    MAX_L1_BYTES,
    MAX_SNAPSHOT_TABLE_BYTES,
    MAX_SNAPSHOTS,
    SNAPSHOT_EXTRA_STRUCT,
    Snapshot,
    SnapshotEntry,
    min_l1_size,
    parse_snapshot_table,
)
from .l1 import L1Table
from .mapping import compressed_location, data_offset
from .refcount import Refcounts
from .repair import set_copied_flags
from .state import Qcow2State

MAX_NAME_BYTES = 255     # QEMU keeps a name in char[256] (QEMUSnapshotInfo.name)
ICOUNT_UNKNOWN = (1 << 64) - 1
_ULONG = 1 << 64
_STRTOUL = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]*)")


# --- finding a snapshot -------------------------------------------------------------------------
def _key(ref: str) -> bytes:
    # a str from the command line carries undecodable bytes as surrogates: give them back
    return ref.encode("utf-8", "surrogateescape")


def find(s: Qcow2State, ref: str | Snapshot) -> int:
    """Index of the snapshot `ref` names: a `Snapshot` from the list, else an id, else a name
    (the first match, as QEMU's find_snapshot_by_id_or_name). Raises SnapshotNotFoundError."""
    if s.snapshot_error is not None:
        raise s.snapshot_error
    if isinstance(ref, Snapshot):
        for i, sn in enumerate(s.snapshots):
            if sn == ref:
                return i
        raise SnapshotNotFoundError(f"snapshot id {ref.id!r} name {ref.name!r} is not in {s.filename!r}")
    if not isinstance(ref, str):
        raise TypeError(f"a snapshot is named by a str (id or name) or a Snapshot, not {type(ref).__name__}")
    key = _key(ref)
    for i, sn in enumerate(s.snapshots):
        if _entry(sn).id_c == key:
            return i
    for i, sn in enumerate(s.snapshots):
        if _entry(sn).name_c == key:
            return i
    raise SnapshotNotFoundError(f"no snapshot with id or name {ref!r} in {s.filename!r}")


def _entry(sn: Snapshot) -> SnapshotEntry:
    assert sn.entry is not None, "snapshots of an open image come from its table"
    return sn.entry


def _describe(sn: Snapshot) -> str:
    return f"snapshot {sn.id} ({sn.name!r})"


# --- validation ---------------------------------------------------------------------------------
def _refuse_data_file(s: Qcow2State, what: str) -> None:
    if s.has_data_file:
        raise UnsupportedFeatureError(
            f"cannot {what} internal snapshots of {s.filename!r}: it has an external data file "
            f"(data_file {s.header.data_file!r}), and QEMU refuses snapshots of such images (ENOTSUP)")


def read_snapshot_l1(s: Qcow2State, sn: Snapshot) -> array[int]:
    """The snapshot's L1 table, after checking where it lies (QEMU's qcow2_validate_table) and
    every entry it holds (reserved bits, alignment, inside the file, not the header)."""
    cs = s.cluster_size
    what = _describe(sn)
    if sn.l1_size * 8 > MAX_L1_BYTES:
        raise InvalidImageError(f"Snapshot L1 table too large: {what} l1_size {sn.l1_size} > {MAX_L1_BYTES // 8}")
    if not sn.l1_size:
        return array("Q")
    off = sn.l1_table_offset
    file_length = s.host.size()
    if off % cs or off < cs or off + sn.l1_size * 8 > max(file_length, s.alloc_limit):
        raise InvalidImageError(
            f"Snapshot L1 table offset invalid: {what} l1_table_offset 0x{off:x} (l1_size {sn.l1_size}, "
            f"cluster size {cs}, file {file_length} bytes)")
    raw = s.host.pread(sn.l1_size * 8, off)
    if len(raw) < sn.l1_size * 8:
        raise InvalidImageError(f"Snapshot L1 table of {what} at 0x{off:x} runs past the end of the file")
    entries = decode_u64_table(raw)
    for i in compress(range(len(entries)), entries):
        _l2_offset(s, entries[i], f"{what} L1 entry {i}")
    return entries


def _l2_offset(s: Qcow2State, e: int, where: str) -> int:
    """The validated L2 table offset of an L1 entry of any table (0 = none)."""
    if e & L1E_RESERVED_MASK:
        raise CorruptImageError(f"{where} = 0x{e:x} has reserved bits set (mask 0x{L1E_RESERVED_MASK:x})")
    off = e & L1E_OFFSET_MASK
    if not off:
        return 0
    if off & s.cluster_mask:
        raise CorruptImageError(f"{where} = 0x{e:x}: L2 table offset 0x{off:x} unaligned (cluster size {s.cluster_size})")
    if off < s.cluster_size:
        raise CorruptImageError(f"{where} = 0x{e:x}: L2 table offset 0x{off:x} overlaps the header")
    if off + s.cluster_size > s.alloc_limit:
        raise CorruptImageError(
            f"{where} = 0x{e:x}: L2 table offset 0x{off:x} lies past the end of the file ({s.alloc_limit} bytes)")
    return off


def _not_l2_tables(s: Qcow2State) -> set[int]:
    """Host clusters no L2 table may be: the refcount table and blocks, every L1 table, the
    snapshot table (a snapshot's L2 tables are written when it is applied, so an entry of an
    untrusted table pointing there must be refused, not followed)."""
    cs, cbits = s.cluster_size, s.cluster_bits
    out: set[int] = set()

    def add(offset: int, length: int) -> None:
        if length:
            out.update(range(offset >> cbits, ((offset + length - 1) >> cbits) + 1))

    rc = s.refcounts
    if rc is not None:
        add(rc.reftable_offset, rc.reftable_clusters * cs)
        out.update((e & REFT_OFFSET_MASK) >> cbits for e in rc.reftable if e)
    add(s.header.l1_table_offset, s.header.l1_size * 8)
    add(s.l1.table_offset, len(s.l1.entries) * 8)
    if s.header.nb_snapshots:
        add(s.header.snapshots_offset, max(1, s.snapshot_table_length))
    for sn in s.snapshots:
        add(sn.l1_table_offset, sn.l1_size * 8)
    return out


def tree_references(s: Qcow2State, l1: array[int], what: str) -> Counter[int]:
    """Host cluster -> references the tree under `l1` holds (as `qemu-img check` counts them:
    each L2 table once per L1 entry, each data or preallocated-zero cluster once per L2 entry,
    each host cluster a compressed payload touches once per entry). Validates every entry."""
    refs: Counter[int] = Counter()
    cbits = s.cluster_bits
    step = 2 if s.extended_l2 else 1
    forbidden = _not_l2_tables(s)
    for l1i in compress(range(len(l1)), l1):
        l2off = _l2_offset(s, l1[l1i], f"{what} L1 entry {l1i}")
        if not l2off:
            continue
        if l2off >> cbits in forbidden:
            raise CorruptImageError(f"{what} L1 entry {l1i} = 0x{l1[l1i]:x}: L2 table offset 0x{l2off:x} "
                                    f"overlaps other metadata (a refcount structure, an L1 or the snapshot table)")
        refs[l2off >> cbits] += 1
        entries = s.l2_cache.get(l2off).entries
        base = l1i * s.l2_entries
        for i in compress(range(0, len(entries), step), entries[::step]):
            e = entries[i]
            gc = base + i // step
            if e & OFLAG_COMPRESSED:
                off, length = compressed_location(s, e, gc)
                for c in range(off >> cbits, ((off + length - 1) >> cbits) + 1):
                    refs[c] += 1
            else:
                host = data_offset(s, e, gc)
                if host:
                    refs[host >> cbits] += 1
    return refs


def _check_increments(rc: Refcounts, refs: Counter[int]) -> None:
    for c, n in refs.items():
        have = rc.get(c)
        if have == 0:
            raise CorruptImageError(
                f"host cluster {c} (offset 0x{c << rc.cluster_bits:x}) is referenced but its refcount is 0")
        if have + n > rc.max_refcount:
            raise RefcountOverflowError(
                f"refcount of host cluster {c} (offset 0x{c << rc.cluster_bits:x}) would overflow: {have} + {n} > "
                f"{rc.max_refcount} (refcount_bits {rc.refcount_bits}); nothing was changed")


def _check_decrements(rc: Refcounts, refs: Counter[int], what: str) -> None:
    for c, n in refs.items():
        have = rc.get(c)
        if have < n:
            raise CorruptImageError(
                f"{what} references host cluster {c} (offset 0x{c << rc.cluster_bits:x}) {n} time(s) but its "
                f"refcount is {have}; nothing was changed")


def _defer_frees(rc: Refcounts, refs: Counter[int]) -> None:
    for c, n in refs.items():
        for _ in range(n):
            rc.defer_free(c)


def _refcounts(s: Qcow2State) -> Refcounts:
    rc = s.refcounts
    assert rc is not None, "snapshot changes need an image opened read-write"
    return rc


# --- the snapshot table -----------------------------------------------------------------------
def _strtoul(text: bytes) -> int:
    """C's strtoul(text, NULL, 10) with a 64-bit unsigned long."""
    m = _STRTOUL.match(text)
    assert m is not None
    sign, digits = m.groups()
    if not digits:
        return 0
    value = int(digits)
    if value >= _ULONG:
        return _ULONG - 1
    return (-value) % _ULONG if sign == b"-" else value


def _new_id(s: Qcow2State) -> bytes:
    """QEMU's find_new_snapshot_id: one more than the largest id read as a number."""
    top = max((_strtoul(_entry(sn).id_c) for sn in s.snapshots), default=0)
    return str((top + 1) % _ULONG).encode()


def as_rewritten(e: SnapshotEntry, disk_size: int) -> SnapshotEntry:
    """The entry as QEMU's qcow2_write_snapshots rewrites one it read: at least 24 bytes of extra
    data (the 32-bit VM state size, the current disk size and an unknown icount fill what an old
    entry lacks); unknown extra data, ids, names and dates stay as they were."""
    n = len(e.extra)
    vm_state = int.from_bytes(e.extra[0:8], "big") if n >= 8 else e.vm_state_size
    disk = int.from_bytes(e.extra[8:16], "big") if n >= 16 else disk_size
    icount = int.from_bytes(e.extra[16:24], "big") if n >= 24 else ICOUNT_UNKNOWN
    extra = SNAPSHOT_EXTRA_STRUCT.pack(vm_state, disk, icount) + e.extra[24:]
    return SnapshotEntry(e.l1_table_offset, e.l1_size, e.id_raw, e.name_raw, e.date_sec, e.date_nsec,
                         e.vm_clock_ns, vm_state if vm_state <= 0xFFFFFFFF else 0, extra)


def write_table(s: Qcow2State, entries: list[SnapshotEntry], *, guard: Callable[[int, int], None] | None = None,
                free_old: bool = True) -> None:
    """Write a new snapshot table to new clusters and switch the header to it (one write of
    nb_snapshots + snapshots_offset); the old table becomes a deferred free (unless not
    `free_old`: the caller frees it). `guard(offset, length)` may refuse the new clusters
    (by raising) before anything is written to them."""
    rc = _refcounts(s)
    h = s.header
    cs, cbits = s.cluster_size, s.cluster_bits
    data = b"".join(e.encode() for e in entries)
    if len(data) > MAX_SNAPSHOT_TABLE_BYTES:
        raise QcowError(f"snapshot table would grow to {len(data)} bytes, over QEMU's limit of "
                        f"{MAX_SNAPSHOT_TABLE_BYTES}; nothing was changed")
    old_offset, old_length, old_count = h.snapshots_offset, s.snapshot_table_length, h.nb_snapshots
    offset = 0
    if entries:
        clusters = -(-len(data) // cs)
        first = rc.alloc_contiguous(clusters)
        offset = first << cbits
        s.metadata.update(range(first, first + clusters))
        s.grow_alloc_limit(offset + clusters * cs)
        if guard is not None:
            guard(offset, len(data))
        s.host.pwrite(data, offset)
    if not s.lazy:
        rc.make_durable()  # the table's own refcount before the header names it
    ordering.switch_header(s, nb_snapshots=len(entries), snapshots_offset=offset)
    if entries:
        s.snapshots, s.snapshot_table_length = parse_snapshot_table(
            data, len(entries), h.version, cs, max(s.alloc_limit, s.host.size()), offset)
    else:
        s.snapshots, s.snapshot_table_length = [], 0
    if old_count and free_old:
        rc.defer_free(old_offset >> cbits, max(1, -(-old_length // cs)))


def rewritten_entries(s: Qcow2State) -> list[SnapshotEntry]:
    """Every snapshot's entry as QEMU's qcow2_write_snapshots rewrites it (see `as_rewritten`)."""
    return [as_rewritten(_entry(sn), s.virtual_size) for sn in s.snapshots]


def _alloc_table(s: Qcow2State, rc: Refcounts, entries: array[int]) -> int:
    """Write a u64 table (an L1) to new contiguous clusters; returns its offset (0 if empty)."""
    if not len(entries):
        return 0
    cs = s.cluster_size
    clusters = -(-len(entries) * 8 // cs)
    first = rc.alloc_contiguous(clusters)
    offset = first << s.cluster_bits
    s.metadata.update(range(first, first + clusters))
    s.grow_alloc_limit(offset + clusters * cs)
    s.host.pwrite(encode_u64_entries(entries, 0, len(entries)), offset)
    return offset


# --- the operations ---------------------------------------------------------------------------
def create(s: Qcow2State, name: str) -> Snapshot:
    """`qemu-img snapshot -c NAME`: a snapshot of the active disk as it is now (see the module
    docstring for the order of writes). Returns the new entry of `snapshots`."""
    if not isinstance(name, str):
        raise TypeError(f"a snapshot name is a str, not {type(name).__name__}")
    _refuse_data_file(s, "create")
    if s.snapshot_error is not None:
        raise s.snapshot_error
    name_raw = _key(name)
    if b"\0" in name_raw:
        raise ValueError(f"snapshot name {name!r} contains a NUL byte (QEMU reads names as C strings)")
    if len(name_raw) > MAX_NAME_BYTES:
        raise ValueError(f"snapshot name of {len(name_raw)} bytes is too long: QEMU keeps at most "
                         f"{MAX_NAME_BYTES} bytes of a name")
    for sn in s.snapshots:
        if _entry(sn).name_c == name_raw:
            raise SnapshotExistsError(f"a snapshot named {name!r} exists already in {s.filename!r} (id {sn.id})")
    if len(s.snapshots) >= MAX_SNAPSHOTS:
        raise QcowError(f"{s.filename!r} has {len(s.snapshots)} snapshots, QEMU's limit ({MAX_SNAPSHOTS})")
    rc = _refcounts(s)
    ordering.flush(s)
    l1 = s.l1.entries
    refs = tree_references(s, l1, "active")
    _check_increments(rc, refs)
    ordering.mark_dirty_before_lazy_update(s)
    # The copy of the active L1 (COPIED is meaningless outside the active table: left clear).
    l1_offset = _alloc_table(s, rc, array("Q", [e & ~OFLAG_COPIED for e in l1]))
    for c, n in refs.items():
        rc.update(c, n)
    set_copied_flags(s, rc)
    ordering.flush(s)  # refcounts -> L2 tables -> active L1, each synced before the next
    us = time.time_ns() // 1000  # g_get_real_time(): microseconds
    entry = SnapshotEntry(l1_offset, len(l1), _new_id(s), name_raw, (us // 1_000_000) & 0xFFFFFFFF,
                          us % 1_000_000 * 1000, 0, 0, SNAPSHOT_EXTRA_STRUCT.pack(0, s.virtual_size, 0))
    write_table(s, [*rewritten_entries(s), entry])
    ordering.flush(s)  # frees the old table
    return s.snapshots[-1]


def delete(s: Qcow2State, ref: str | Snapshot) -> Snapshot:
    """`qemu-img snapshot -d`: drop the entry, then every reference the snapshot held; returns
    the snapshot that was deleted."""
    _refuse_data_file(s, "delete")
    index = find(s, ref)
    sn = s.snapshots[index]
    rc = _refcounts(s)
    ordering.flush(s)
    refs = tree_references(s, read_snapshot_l1(s, sn), _describe(sn))
    l1_clusters = -(-sn.l1_size * 8 // s.cluster_size)
    first_l1 = sn.l1_table_offset >> s.cluster_bits
    for c in range(first_l1, first_l1 + l1_clusters):
        refs[c] += 1
    _check_decrements(rc, refs, _describe(sn))
    ordering.mark_dirty_before_lazy_update(s)
    entries = rewritten_entries(s)
    del entries[index]
    write_table(s, entries)
    _defer_frees(rc, refs)
    set_copied_flags(s, rc, Counter(rc.deferred_frees))
    ordering.flush(s)  # the flags reach the disk first, then the refcounts drop
    return sn


def apply(s: Qcow2State, ref: str | Snapshot) -> Snapshot:
    """`qemu-img snapshot -a`: the active disk becomes the snapshot's (its size too); returns
    the snapshot applied."""
    _refuse_data_file(s, "apply")
    index = find(s, ref)
    sn = s.snapshots[index]
    rc = _refcounts(s)
    h = s.header
    size = sn.disk_size if sn.disk_size is not None else s.virtual_size
    if size % 512:
        raise InvalidImageError(f"{_describe(sn)} has disk_size {size}, not a multiple of 512: it cannot be applied")
    need = min_l1_size(size, s.cluster_bits, s.l2_entries)
    if need * 8 > MAX_L1_BYTES:
        raise InvalidImageError(f"{_describe(sn)} has disk_size {size}: it needs {need} L1 entries, "
                                f"over the limit of {MAX_L1_BYTES // 8}")
    if size != s.virtual_size and s.v2:
        raise UnsupportedFeatureError(
            f"{_describe(sn)} has disk_size {size} but the disk has {s.virtual_size} bytes, and QEMU "
            f"cannot resize a version 2 image that has snapshots")
    ordering.flush(s)
    snap_l1 = read_snapshot_l1(s, sn)
    new_refs = tree_references(s, snap_l1, _describe(sn))
    old_refs = tree_references(s, s.l1.entries, "active")
    first_old = h.l1_table_offset >> s.cluster_bits
    for c in range(first_old, first_old + -(-h.l1_size * 8 // s.cluster_size)):
        old_refs[c] += 1
    _check_increments(rc, new_refs)
    _check_decrements(rc, old_refs, "the active L1 table")
    ordering.mark_dirty_before_lazy_update(s)
    for c, n in new_refs.items():
        rc.update(c, n)
    # The snapshot's L2 tables become active and stay the snapshot's: everything they reach is
    # shared from now on, so no entry of theirs may keep COPIED.
    step = 2 if s.extended_l2 else 1
    for l1i in compress(range(len(snap_l1)), snap_l1):
        table = s.l2_cache.get(snap_l1[l1i] & L1E_OFFSET_MASK)
        entries = table.entries
        for i in compress(range(0, len(entries), step), entries[::step]):
            if entries[i] & OFLAG_COPIED:
                entries[i] &= ~OFLAG_COPIED
                table.mark(i)
    ordering.flush(s)  # the new tree's refcounts, then its L2 tables
    l1_size = max(len(s.l1.entries), sn.l1_size, need)
    new_l1 = array("Q", [e & ~OFLAG_COPIED for e in snap_l1]) + array("Q", bytes(8 * (l1_size - sn.l1_size)))
    l1_offset = _alloc_table(s, rc, new_l1)
    if not s.lazy:
        rc.make_durable()  # the new L1's own refcount before the header names it
    ordering.switch_header(s, l1_table_offset=l1_offset, l1_size=l1_size, size=size)
    active: L1Table = s.l1  # the same object: the ordering edges declared at open stay
    active.table_offset = l1_offset
    active.entries = new_l1
    active.dirty.clear()
    s.virtual_size = size
    _defer_frees(rc, old_refs)
    set_copied_flags(s, rc, Counter(rc.deferred_frees))
    ordering.flush(s)  # the old tree is released
    return sn


def load_for_reading(s: Qcow2State, ref: str | Snapshot) -> Snapshot:
    """Make a read-only state show the snapshot's disk instead of the active one (QEMU's
    qcow2_snapshot_load_tmp). The disk's size is the snapshot's (`qemu-img convert -l` keeps
    the active size; see `QcowFile.open`)."""
    assert s.readonly
    _refuse_data_file(s, "read")
    sn = s.snapshots[find(s, ref)]
    entries = read_snapshot_l1(s, sn)
    s.l1 = L1Table(s.host, sn.l1_table_offset, entries)
    if sn.disk_size is not None:
        s.virtual_size = sn.disk_size - sn.disk_size % 512
    s.l2_cache.clear()
    s.compressed_cache.clear()
    return sn
