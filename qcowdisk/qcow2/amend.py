"""Amending an image's options in place: what `qemu-img amend` does (QEMU 7.2's
`qcow2_amend_options`, `qcow2_downgrade`), with its refusals and their messages.

**What is amended.** `compat` up (0.10 -> 1.1: a version 3 header with QEMU's feature table)
and down (1.1 -> 0.10, as `qcow2_downgrade`: refcounts made consistent, zero clusters expanded,
compatible and autoclear bits dropped, zstd switched back to zlib when no cluster is compressed;
persistent bitmaps dropped by the version switch, as QEMU drops them, and their clusters freed
after it, where QEMU leaves the extension in the v2 header and leaks them);
`lazy_refcounts` on and off (off: the refcounts are flushed first); `size` (a resize to exactly
that size, shrinking included, as amend passes exact=true). `backing_file`/`backing_fmt`,
`data_file` and `data_file_raw` are accepted only with the values the image has, as QEMU 7.2
(it says to use `qemu-img rebase`). `refcount_bits` rewrites the refcount structure with the new
width (`qcow2_change_refcount_order`; refused as QEMU refuses it when a count does not fit).
Encryption options are refused as QEMU refuses them on images without LUKS (and, on LUKS
images, as not implemented).

**Order.** Every header change is one `ordering.switch_header` (sync, header write(s), fsync),
in QEMU's order: upgrade, refcount width, lazy refcounts, size, downgrade last. A new refcount
structure is written past the end of the file and synced before the one switch that names it.
A downgrade first makes the refcounts durable and the zero clusters plain, in the active layer
and in every snapshot (their data written and synced before the L2 entries that lose the zero
flag), so a power cut before the version switch leaves a valid v3
image with the same guest view, and after it the v2 one.

**Beyond QEMU**: a preallocated zero cluster whose data cluster is also referenced elsewhere
(a snapshot's own L2 table) is not zeroed in place, which would change the snapshot (QEMU 7.2
zeroes it); the entry drops its reference instead. **Not done**: amending LUKS encryption
options (refused with qcowdisk's message).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

from ..errors import AmendError
from ..record import Record
from . import bitmaps, ordering, snapshot
from . import resize as resizing
from .entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    REFT_OFFSET_MASK,
    TableCodec,
    decode_u64_table,
)
from .format import (
    AUTOCLEAR_BITMAPS,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    CRYPT_LUKS,
    CRYPT_NONE,
    EXT_BITMAPS,
    EXT_FEATURE_TABLE,
    HEADER_V2_LENGTH,
    HEADER_V3_LENGTH,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY,
    Snapshot,
    feature_table_extension,
)
from .mapping import l2_table_offset
from .refcount import Refcounts
from .state import DEFAULT_REFBLOCK_CACHE_BYTES, Qcow2State

Progress = Callable[[int, int], None]
SECTOR = 512  # the unit a header write may tear at


class AmendOptions(Record):
    """The options given (None: not given), already parsed to their QEMU types."""

    __slots__ = ("backing_file", "backing_fmt", "compat", "data_file", "data_file_raw", "encrypt", "lazy_refcounts",
                 "refcount_bits", "size")
    compat: str | None
    lazy_refcounts: bool | None
    backing_file: str | None
    backing_fmt: str | None
    refcount_bits: int | None
    size: int | None
    data_file: str | None
    data_file_raw: bool | None
    encrypt: bool  # some encrypt.* option was given

    def __init__(self, compat: str | None = None, lazy_refcounts: bool | None = None, backing_file: str | None = None,
                 backing_fmt: str | None = None, refcount_bits: int | None = None, size: int | None = None,
                 data_file: str | None = None, data_file_raw: bool | None = None, encrypt: bool = False) -> None:
        self.compat = compat
        self.lazy_refcounts = lazy_refcounts
        self.backing_file = backing_file
        self.backing_fmt = backing_fmt
        self.refcount_bits = refcount_bits
        self.size = size
        self.data_file = data_file
        self.data_file_raw = data_file_raw
        self.encrypt = encrypt


def check(s: Qcow2State, o: AmendOptions) -> int:
    """Refuse what qemu-img amend refuses (AmendError, QEMU's message); the target version."""
    h = s.header
    old_version = h.version
    new_version = old_version
    if o.compat is not None:
        if o.compat in ("0.10", "v2"):
            new_version = 2
        elif o.compat in ("1.1", "v3"):
            new_version = 3
        else:
            raise AmendError(f"Unknown compatibility level {o.compat}")
    if o.encrypt:
        if h.crypt_method == CRYPT_NONE:
            raise AmendError("Can't amend encryption options - encryption not present")
        if h.crypt_method != CRYPT_LUKS:
            raise AmendError("Only LUKS encryption options can be amended")
        raise AmendError("qcowdisk does not amend LUKS encryption options")
    if o.refcount_bits is not None:
        rb = o.refcount_bits
        if rb <= 0 or rb > 64 or rb & (rb - 1):
            raise AmendError("Refcount width must be a power of two and may not exceed 64 bits")
    if o.data_file is not None and not h.has_data_file:
        raise AmendError("data-file can only be set for images that use an external data file")
    if o.data_file_raw and not h.data_file_raw:
        raise AmendError("data-file-raw cannot be set on existing images")
    if (o.backing_file is not None or o.backing_fmt is not None) and (
            o.backing_file != h.backing_file or o.backing_fmt != h.backing_format):
        raise AmendError("Cannot amend the backing file", "You can use 'qemu-img rebase' instead.\n")
    if o.refcount_bits is not None and o.refcount_bits != h.refcount_bits and new_version < 3 and \
            o.refcount_bits != 16:
        raise AmendError("Refcount widths other than 16 bits require compatibility level 1.1 or above "
                             "(use compat=1.1 or greater)")
    if o.data_file is not None and o.data_file != h.data_file:
        raise AmendError("qcowdisk cannot change the external data file name")
    lazy = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
    if o.lazy_refcounts is not None and o.lazy_refcounts != lazy and o.lazy_refcounts and new_version < 3:
        raise AmendError("Lazy refcounts only supported with compatibility level 1.1 and above "
                         "(use compat=1.1 or greater)")
    if new_version < old_version:
        _check_downgrade(s, o)
    return new_version


def _host_clusters(s: Qcow2State) -> int:
    return -(-max(s.host.size(), s.alloc_limit) // s.cluster_size)


def _refcount_too_wide(s: Qcow2State, bits: int) -> tuple[int, str] | None:
    """qcow2_change_refcount_order's refusal: the first cluster whose refcount does not fit the
    new width, and QEMU's message for it (None: every count fits)."""
    rc = s.refcounts
    assert rc is not None
    if bits >= s.header.refcount_bits:
        return None
    limit = (1 << bits) - 1
    for c in range(_host_clusters(s)):
        count = rc.get(c)
        if count > limit:
            where = f"{c << s.cluster_bits:#x}" if c else "0"
            return c, (f"Cannot decrease refcount entry width to {bits} bits: Cluster at offset {where} "
                       f"has a refcount of {count}")
    return None


def _check_downgrade(s: Qcow2State, o: AmendOptions) -> None:
    """qcow2_downgrade's refusals, in its order (nothing written yet)."""
    h = s.header
    if (o.refcount_bits or h.refcount_bits) != 16:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if h.has_data_file:
        raise AmendError("Cannot downgrade an image with a data file")
    size = o.size if o.size else h.size
    for snap in s.snapshots:
        if snap.vm_state_size > 0xFFFFFFFF or snap.disk_size != size:
            raise AmendError("Internal snapshots prevent downgrade of image")
    rest = h.incompatible_features & ~INCOMPAT_DIRTY & ~INCOMPAT_COMPRESSION
    if rest:
        raise AmendError(f"Cannot downgrade an image with incompatible features 0x{rest:x} set")
    if h.incompatible_features & INCOMPAT_COMPRESSION and _has_compressed(s):
        raise AmendError("Cannot downgrade an image with zstd compression type and existing compressed clusters")


def _l2_tables(s: Qcow2State) -> list[tuple[int, int]]:
    """(l1 index, L2 offset) of every allocated L2 table of the active layer."""
    out = []
    for i in range(len(s.l1.entries)):
        off = l2_table_offset(s, i)
        if off:
            out.append((i, off))
    return out


def _has_compressed(s: Qcow2State) -> bool:
    return any(any(e & OFLAG_COMPRESSED for e in s.l2_cache.get(off).entries) for _, off in _l2_tables(s))


class _AmendProgress:
    """qcow2_amend_helper_cb: each operation's own progress, scaled to the whole amend with the
    operations not yet started projected from those done."""

    def __init__(self, progress: Progress | None, total_operations: int) -> None:
        self.progress = progress
        self.total = total_operations
        self.current = self.last = ""
        self.offset_completed = self.operations_completed = self.last_work_size = 0

    def __call__(self, offset: int, work_size: int) -> None:
        if self.progress is None or not self.total:
            return
        if self.current != self.last:
            if self.last:
                self.offset_completed += self.last_work_size
                self.operations_completed += 1
            self.last = self.current
        self.last_work_size = work_size
        current_work = self.offset_completed + work_size
        projected = current_work * (self.total - self.operations_completed - 1) // (self.operations_completed + 1)
        self.progress(self.offset_completed + offset, current_work + projected)


def amend(s: Qcow2State, o: AmendOptions, new_version: int, progress: Progress | None = None) -> None:
    """Apply checked options, in qcow2_amend_options' order."""
    h = s.header
    refcount_change = o.refcount_bits is not None and o.refcount_bits != h.refcount_bits
    status = _AmendProgress(progress, int(new_version != h.version) + int(refcount_change))
    if new_version > h.version:
        status.current = "upgrade"
        status(0, 2)
        if any(len(_snapshot_extra(sn)) < 16 for sn in s.snapshots):
            # v3 needs each snapshot's 64-bit VM state size and disk size (qcow2_upgrade)
            snapshot.write_table(s, snapshot.rewritten_entries(s))
            ordering.flush(s, final=True)
        status(1, 2)
        header_length = HEADER_V3_LENGTH
        exts = [e for e in h.extensions if e.ext_type != EXT_FEATURE_TABLE] + [feature_table_extension()]
        ordering.switch_header(s, version=3, header_length=header_length, refcount_order=4,
                               compression_type=COMPRESSION_ZLIB, extensions=exts)
        s.v2 = False
        status(2, 2)
    if o.refcount_bits is not None and o.refcount_bits != s.header.refcount_bits:
        status.current = "refcount order"
        bad = _refcount_too_wide(s, o.refcount_bits)
        if bad is not None:  # found by QEMU's first walk, at that refcount table index
            rc = s.refcounts
            assert rc is not None
            size = rc.reftable_clusters * s.cluster_size // 8
            for i in range(bad[0] // rc.block_entries + 1):
                status(i, 3 * size)
            raise AmendError(bad[1])
        _refcount_walk_progress(s, status, 0, 2)
        _change_refcount_width(s, o.refcount_bits)
        _refcount_walk_progress(s, status, 2, 3)
    if o.lazy_refcounts is not None:
        h = s.header
        lazy = bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)
        if o.lazy_refcounts and not lazy:
            ordering.switch_header(s, compatible_features=h.compatible_features | COMPAT_LAZY_REFCOUNTS)
        elif not o.lazy_refcounts and lazy:
            ordering.flush(s, final=True)
            ordering.switch_header(s, compatible_features=h.compatible_features & ~COMPAT_LAZY_REFCOUNTS,
                                   incompatible_features=h.incompatible_features & ~INCOMPAT_DIRTY)
    if o.size:
        resizing.check(s, o.size, True)
        resizing.resize(s, o.size)
    if new_version < s.header.version:
        status.current = "downgrade"
        _downgrade(s, status)


def _snapshot_extra(sn: Snapshot) -> bytes:
    return sn.entry.extra if sn.entry is not None else bytes(24)


def _downgrade(s: Qcow2State, status: Progress) -> None:
    """qcow2_downgrade after its checks: clean, expand zero clusters, switch to version 2.
    Progress is reported per L1 entry, the active table's and then each snapshot's."""
    ordering.flush(s, final=True)
    l1_tables = [list(s.l1.entries)]
    for snap in s.snapshots:
        raw = s.host.pread(snap.l1_size * 8, snap.l1_table_offset)
        l1_tables.append(list(decode_u64_table(raw[:len(raw) // 8 * 8])))
    total = sum(len(t) for t in l1_tables)
    visited = 0
    done: set[int] = set()
    for l1 in l1_tables:
        for e in l1:
            off = e & L1E_OFFSET_MASK
            if off and off not in done:
                done.add(off)
                _expand_zero_clusters(s, off)
            visited += 1
            status(visited, total)
    ordering.flush(s, final=True)
    h = s.header
    # Persistent bitmaps (v3 only): QEMU keeps the extension, ignored in v2, and leaks the
    # bitmaps' clusters; qcowdisk drops the extension in the version switch and frees them.
    freed = [c for bm in bitmaps.load_directory(s) for c in bitmaps.used_clusters(s, bm)]
    exts = [e for e in h.extensions if e.ext_type not in (EXT_FEATURE_TABLE, EXT_BITMAPS)]
    ordering.switch_header(s, version=2, header_length=HEADER_V2_LENGTH, incompatible_features=0,
                           compatible_features=0, autoclear_features=0, compression_type=COMPRESSION_ZLIB,
                           extra_header=b"", extensions=exts)
    s.v2 = True
    if h.autoclear_features & AUTOCLEAR_BITMAPS:
        bitmaps.free_after_switch(s, h, freed)


def _refcount_walk_progress(s: Qcow2State, status: Progress, first: int, end: int) -> None:
    """The progress qcow2_change_refcount_order reports: three walks over the old refcount table
    (allocate, check the allocation, write), each at every table index and at its end."""
    rc = s.refcounts
    assert rc is not None
    size = rc.reftable_clusters * s.cluster_size // 8
    for walk in range(first, end):
        for i in range(size):
            status(walk * size + i, 3 * size)
        status((walk + 1) * size, 3 * size)


def _change_refcount_width(s: Qcow2State, bits: int) -> None:
    """Rewrite the refcount structure with `bits`-bit entries (qcow2_change_refcount_order).

    The new blocks and table go past the end of the file, where nothing points, and are synced;
    one header switch (refcount_order, refcount table offset and size) makes them the image's;
    then the old table and blocks, which count 0 in the new structure, are punched. A power cut
    before the switch leaves the old image with unreferenced bytes past its end; after it, the
    new one.
    """
    rc = s.refcounts
    assert rc is not None
    ordering.flush(s, final=True)
    cb, cs = s.cluster_bits, s.cluster_size
    n = _host_clusters(s)
    counts = [rc.get(c) for c in range(n)]
    old_structure = set(range(rc.reftable_offset >> cb, (rc.reftable_offset >> cb) + rc.reftable_clusters))
    old_structure.update((e & REFT_OFFSET_MASK) >> cb for e in rc.reftable if e & REFT_OFFSET_MASK)
    for c in old_structure:
        if c < n:
            counts[c] = 0
    per_block = cs * 8 // bits
    blocks = table_clusters = 0
    while True:
        total = n + blocks + table_clusters
        new_blocks = -(-total // per_block)
        new_table = max(1, -(-new_blocks * 8 // cs))
        if (new_blocks, new_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = new_blocks, new_table
    counts.extend([1] * (blocks + table_clusters))
    codec = TableCodec(bits, cs)
    reftable = array("Q", [0] * (table_clusters * cs // 8))
    for i in range(blocks):
        block = codec.new()
        chunk = counts[i * per_block:(i + 1) * per_block]
        block[:len(chunk)] = array(block.typecode, chunk)
        s.host.pwrite(codec.encode(block, 0, per_block), (n + i) << cb)
        reftable[i] = (n + i) << cb
    table_offset = (n + blocks) << cb
    s.host.pwrite(TableCodec(64, table_clusters * cs).encode(reftable, 0, len(reftable)), table_offset)
    s.grow_alloc_limit(table_offset + table_clusters * cs)
    ordering.switch_header(s, refcount_order=bits.bit_length() - 1, refcount_table_offset=table_offset,
                           refcount_table_clusters=table_clusters)
    # The in-memory allocator follows: same object (the ordering edges name it), new structure.
    s.metadata.difference_update(old_structure)
    new = Refcounts(s.host, cb, bits, table_offset, table_clusters, lambda: s.alloc_limit, DEFAULT_REFBLOCK_CACHE_BYTES,
                    rc.on_table_moved, s.metadata)
    new.free_dependencies = rc.free_dependencies
    rc.__dict__.update(new.__dict__)
    for first, count in _runs(sorted(c for c in old_structure if c < n)):
        s.host.punch_hole(first << cb, count << cb)


def _runs(clusters: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in clusters:
        if out and out[-1][0] + out[-1][1] == c:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def _expand_zero_clusters(s: Qcow2State, off: int) -> None:
    """Make every zero cluster of the L2 table at `off` plain, in place (the table may be shared
    with snapshots; every sharer keeps its view), as QEMU's expand_zero_clusters_in_l1:
    unallocated without a backing file, else a new cluster of zeros counted once per reference
    to the table; a preallocated zero cluster only the table references is zeroed and kept."""
    rc = s.refcounts
    assert rc is not None
    cb, cs = s.cluster_bits, s.cluster_size
    table = s.l2_cache.get(off)
    l2_refcount = rc.get(off >> cb)
    for j, e in enumerate(table.entries):
        if not e & OFLAG_ZERO or e & OFLAG_COMPRESSED:
            continue
        host = e & L2E_OFFSET_MASK
        if host and rc.get(host >> cb) <= l2_refcount:
            s.data_host.pwrite(bytes(cs), host)
            new = e & ~OFLAG_ZERO
        else:
            if host:
                rc.defer_free(host >> cb)  # a cluster shared otherwise keeps its data for the others
            if s.backing is None:
                new = 0
            else:
                (c, _), = rc.alloc_clusters(1)
                if l2_refcount > 1:
                    rc.update(c, l2_refcount - 1)
                s.grow_alloc_limit((c + 1) << cb)
                s.data_host.pwrite(bytes(cs), c << cb)
                new = (c << cb) | (OFLAG_COPIED if l2_refcount == 1 else 0)
        table.entries[j] = new
        table.mark(j)
