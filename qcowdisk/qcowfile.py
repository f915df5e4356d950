"""QcowFile: the public facade. One lock, the header, the caches, the backing chain.

Layers below (each importing only from lower ones): format (bytes <-> values), hostio (the
host file seam), cache (write-back table caches), refcount (counts and allocation), mapping
(read path), writing (write path). Only the public methods here take the lock; every `_..._locked`
or mixin method expects the caller to hold it.

Flush order (QEMU's crash-safe order, see shared docs): 1. refcount blocks written, then one
sync that also covers guest data; 2. L2 tables written and synced; 3. L1 entries written and
synced (only when new L2 tables were linked); 4. the deferred refcount decrements of dropped
references applied, written and synced, and freed host space handed back. A crash at any point
leaks clusters at worst.
"""

from __future__ import annotations

import functools
import os
import threading
from array import array
from collections.abc import Iterator
from typing import Any

from .cache import TableCache, TableCodec
from .errors import CorruptImageError, InvalidImageError, ReadOnlyError, UnsupportedFeatureError
from .format import (AUTOCLEAR_BITMAPS, AUTOCLEAR_KNOWN, COMPAT_LAZY_REFCOUNTS, EXT_BITMAPS, INCOMPAT_CORRUPT,
                     INCOMPAT_DIRTY, L1E_OFFSET_MASK, L2E_OFFSET_MASK, L2E_RESERVED_MASK,
                     OFLAG_COMPRESSED, OFLAG_ZERO, Snapshot,
                     parse_header, parse_snapshot_table, serialize_header)
from .hostio import HostFactory, HostFile
from .image import Extent
from .refcount import Refcounts
from .writing import WritingMixin

DEFAULT_L2_CACHE_BYTES = 32 << 20
DEFAULT_REFBLOCK_CACHE_BYTES = 4 << 20


class QcowFile(WritingMixin):
    """A qcow2 image opened for reading (and writing): the guest disk as byte ranges.

    Thread-safe: every public method takes the image's lock.
    """

    format_name = "qcow2"

    # ------------------------------------------------------------------ construction
    def __init__(self) -> None:  # use open() / create()
        self._lock = threading.RLock()
        self.closed = True
        self.backing: Any = None
        self._image_lock: Any = None
        self._fast: tuple[Any, ...] | None = None
        self.host: HostFile | None = None  # type: ignore[assignment]
        self.data_host: HostFile | None = None  # type: ignore[assignment]

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False, max_nesting_depth: int = 64,
             host_factory: HostFactory | None = None) -> "QcowFile":
        """Open a qcow2 image. Read-write opens take QEMU's write lock and repair a dirty image first.

        `host_factory(path, writable) -> HostFile` is the host I/O seam (tests inject faults there).
        """
        path = os.fspath(path)
        return cls._open_chain(path, readonly=readonly, max_nesting_depth=max_nesting_depth,
                               host_factory=host_factory, chain=(os.path.realpath(path),))

    @classmethod
    def _open_chain(cls, path: str, *, readonly: bool, max_nesting_depth: int,
                    host_factory: HostFactory | None, chain: tuple[str, ...]) -> "QcowFile":
        self = cls()
        self.filename = path
        self.readonly = readonly
        self._host_factory = host_factory or HostFile
        self.host = self._host_factory(path, not readonly)
        try:
            self._load(chain, max_nesting_depth)
        except BaseException:
            self._release()
            raise
        return self

    def _load(self, chain: tuple[str, ...], max_nesting_depth: int) -> None:
        host = self.host
        assert host is not None
        # QEMU's lock bytes: writers exclude everyone, readers exclude writers (both ways).
        from .locking import lock_image
        self._image_lock = lock_image(host.fd, self.filename, write=not self.readonly)
        file_length = host.size()
        # Cluster 0 only (its size is in the first bytes): reading guest data would pull it into
        # the page cache, which changes what SEEK_DATA says of unwritten extents (block status).
        head = host.pread(min(file_length, 512), 0)
        cluster_bits = int.from_bytes(head[20:24], "big") if len(head) >= 24 else 0
        if len(head) == 512 and 9 < cluster_bits <= 21:
            head = host.pread(min(file_length, 1 << cluster_bits), 0)
        h = parse_header(head, file_length)
        self.header = h
        if self.readonly is False and h.incompatible_features & INCOMPAT_CORRUPT:
            raise CorruptImageError(
                f"image {self.filename!r} has the corrupt bit set (incompatible_features 0x{h.incompatible_features:x}); "
                f"it can only be opened read-only until repaired")
        if not self.readonly and h.autoclear_features & AUTOCLEAR_BITMAPS:
            raise UnsupportedFeatureError(
                f"image {self.filename!r} has persistent dirty bitmaps (autoclear_features 0x{h.autoclear_features:x}); "
                f"qcowdisk does not maintain them, so it opens such images read-only only")
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.l2_entries = h.l2_entries
        self.extended_l2 = h.extended_l2
        self.virtual_size = h.size
        self._file_length = file_length
        self._alloc_limit = file_length
        # active L1
        raw = host.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
        if len(raw) < h.l1_size * 8:
            raise InvalidImageError(f"Active L1 table offset invalid: l1_table_offset 0x{h.l1_table_offset:x} runs past end of file")
        self.l1 = TableCodec(64, len(raw)).decode(raw) if raw else array("Q")
        self._l1_dirty: set[int] = set()
        # snapshots
        self.snapshots: list[Snapshot] = []
        self._snapshot_table_length = 0
        if h.nb_snapshots:
            avail = min(64 << 20, file_length - h.snapshots_offset)
            buf = host.pread(avail, h.snapshots_offset)
            self.snapshots, self._snapshot_table_length = parse_snapshot_table(
                buf, h.nb_snapshots, h.version, self.cluster_size, file_length, h.snapshots_offset)
        self._check_tables_vs_refblocks()
        # external data file
        self._data_file_limit = 0
        if h.has_data_file:
            assert h.data_file is not None
            from .backing import resolve_backing_path
            dpath = resolve_backing_path(self.filename, h.data_file)
            try:
                self.data_host = self._host_factory(dpath, not self.readonly)
            except OSError as e:
                raise InvalidImageError(f"data file {dpath!r} named by {self.filename!r} cannot be opened: {e.strerror}") from None
            # read-only: an entry past the data file's end is corrupt; read-write: writes extend it
            self._data_file_limit = self.data_host.size() if self.readonly else 1 << 62
        else:
            self.data_host = host
        self._init_mapping()
        self.l2_cache = TableCache(host, TableCodec(64, self.cluster_size),
                                   DEFAULT_L2_CACHE_BYTES // self.cluster_size,
                                   before_writeback=self._before_l2_writeback)
        self._l2_tables = self.l2_cache.tables
        self.l2_tables_get = self._l2_tables.get
        self._cmask = self.cluster_size - 1
        self._fast_bad = (OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED_MASK | (self._cmask & L2E_OFFSET_MASK))
        self._fast = None
        if self.readonly and not self.extended_l2 and not h.has_data_file:
            pread = self.host.pread
            if type(self.host) is HostFile:  # no test seam to honour: call the OS directly
                pread = functools.partial(os.pread, self.host.fd)
            self._fast = (self.cluster_bits, self.cluster_bits + self.l2_entries.bit_length() - 1,
                          self.l2_entries - 1, self._cmask, self.virtual_size, self.l1,
                          self._l2_tables, self._fast_bad, self._alloc_limit, pread)
        self.metadata: set[int] = set()
        self._pending_frees: list[int] = []
        self._data_unsynced = False
        self.refcounts: Refcounts | None = None  # type: ignore[assignment]
        self._corrupt = False
        # backing
        if h.backing_file:
            from .backing import open_backing
            self.backing = open_backing(self.filename, h.backing_file, h.backing_format, chain=chain,
                                        max_nesting_depth=max_nesting_depth, host_factory=self._host_factory)
        self.closed = False
        if not self.readonly:
            self._open_for_writing()

    def _check_tables_vs_refblocks(self) -> None:
        """The active and snapshot L1 tables must not sit on a refcount block (cheap, at open)."""
        h, cs = self.header, self.cluster_size
        raw = self.host.pread(h.refcount_table_clusters * cs, h.refcount_table_offset)
        blocks = {e & ~0x1FF for e in TableCodec(64, len(raw) // 8 * 8).decode(raw[:len(raw) // 8 * 8])
                  if e and not e & (cs - 1) & ~0x1FF}
        if not blocks:
            return
        tables = [("l1_table_offset", h.l1_table_offset, h.l1_size)]
        tables += [(f"snapshot {s.id} l1_table_offset", s.l1_table_offset, s.l1_size) for s in self.snapshots]
        for name, offset, size in tables:
            if not size:
                continue
            for c in range(offset, offset + size * 8, cs):
                if c // cs * cs in blocks:
                    raise InvalidImageError(
                        f"{'Active' if name == 'l1_table_offset' else 'Snapshot'} L1 table offset invalid: "
                        f"{name} 0x{offset:x} overlaps the refcount block at 0x{c // cs * cs:x}")

    def _open_for_writing(self) -> None:
        h = self.header
        self._collect_metadata()
        self.refcounts = Refcounts(self.host, self.cluster_bits, h.refcount_bits, h.refcount_table_offset,
                                   h.refcount_table_clusters, lambda: self._alloc_limit,
                                   DEFAULT_REFBLOCK_CACHE_BYTES, self._on_reftable_moved, self.metadata)
        header_changed = False
        if h.autoclear_features & ~AUTOCLEAR_KNOWN:
            h.autoclear_features &= AUTOCLEAR_KNOWN
            header_changed = True
        if h.incompatible_features & INCOMPAT_DIRTY:
            from .repair import rebuild_refcounts
            rebuild_refcounts(self)
            self._flush_locked()
            h.incompatible_features &= ~INCOMPAT_DIRTY
            header_changed = True
        if header_changed:
            self._write_header()
            self.host.fsync()

    def _collect_metadata(self) -> None:
        """Host clusters holding metadata, for the overlap check before guest data writes."""
        cbits, cs = self.cluster_bits, self.cluster_size
        h = self.header
        meta = self.metadata
        meta.add(0)
        first = h.l1_table_offset >> cbits
        meta.update(range(first, first + max(1, -(-h.l1_size * 8 // cs))) if h.l1_size else ())
        for e in self.l1:
            if e & L1E_OFFSET_MASK:
                meta.add((e & L1E_OFFSET_MASK) >> cbits)
        if h.nb_snapshots:
            first = h.snapshots_offset >> cbits
            meta.update(range(first, first + max(1, -(-self._snapshot_table_length // cs))))
        for s in self.snapshots:
            if s.l1_size:
                first = s.l1_table_offset >> cbits
                meta.update(range(first, first + -(-s.l1_size * 8 // cs)))
                raw = self.host.pread(s.l1_size * 8, s.l1_table_offset)
                for e in TableCodec(64, len(raw)).decode(raw):
                    if e & L1E_OFFSET_MASK:
                        meta.add((e & L1E_OFFSET_MASK) >> cbits)
        for ext in h.extensions:
            if ext.ext_type == EXT_BITMAPS and len(ext.data) >= 24:
                size, off = int.from_bytes(ext.data[8:16], "big"), int.from_bytes(ext.data[16:24], "big")
                meta.update(range(off >> cbits, (off + size + cs - 1) >> cbits))

    def _describe_metadata(self, host_cluster: int) -> str:
        h, cbits = self.header, self.cluster_bits
        off = host_cluster << cbits
        if host_cluster == 0:
            return "the header"
        if h.l1_table_offset <= off < h.l1_table_offset + max(h.l1_size * 8, 1):
            return "the active L1 table"
        if self.refcounts is not None:
            rt = self.refcounts
            if rt.reftable_offset <= off < rt.reftable_offset + rt.reftable_clusters * self.cluster_size:
                return "the refcount table"
            if any((e & ~0x1FF) == off for e in rt.reftable):
                return "a refcount block"
        if any((e & L1E_OFFSET_MASK) == off for e in self.l1):
            return "an active L2 table"
        if h.nb_snapshots and h.snapshots_offset <= off < h.snapshots_offset + max(self._snapshot_table_length, 1):
            return "the snapshot table"
        return "snapshot or other metadata"

    def _mark_corrupt(self, message: str) -> None:
        """Set the corrupt bit on disk, refuse further writes, raise CorruptImageError."""
        self._corrupt = True
        try:
            self.header.incompatible_features |= INCOMPAT_CORRUPT
            self._write_header()
            self.host.fsync()
        except OSError:
            pass
        raise CorruptImageError(f"{message}; image {self.filename!r} marked corrupt")

    def _on_reftable_moved(self, offset: int, clusters: int) -> None:
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters
        self._write_header()
        self.host.fsync()

    def _write_header(self) -> None:
        self.host.pwrite(serialize_header(self.header), 0)

    # ------------------------------------------------------------------ create
    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, cluster_size: int = 65536, refcount_bits: int = 16,
               compat: str = "1.1", lazy_refcounts: bool = False, extended_l2: bool = False,
               compression_type: str = "zlib", preallocation: str = "off", data_file: str | None = None,
               data_file_raw: bool = False, backing_file: str | None = None, backing_format: str | None = None,
               host_factory: HostFactory | None = None) -> "QcowFile":
        """Create a new image (never overwriting an existing file) and return it open read-write.

        Options mean what the same-named `qemu-img create -o` options mean; invalid combinations
        raise ValueError as qemu-img refuses them.
        """
        from .create import create_image
        return create_image(cls, os.fspath(path), size, cluster_size=cluster_size, refcount_bits=refcount_bits,
                            compat=compat, lazy_refcounts=lazy_refcounts, extended_l2=extended_l2,
                            compression_type=compression_type, preallocation=preallocation, data_file=data_file,
                            data_file_raw=data_file_raw, backing_file=backing_file, backing_format=backing_format,
                            host_factory=host_factory)

    @classmethod
    def create_from_backing(cls, path: str | os.PathLike[str], backing_file: str, *, backing_format: str | None = None,
                            size: int | None = None, **create_options: Any) -> "QcowFile":
        """Create an overlay on `backing_file` (size from the backing file unless given).

        The backing name is stored as given (relative names resolve against the overlay's
        directory) and the backing format is always recorded, probed when not given.
        """
        from .create import create_overlay
        return create_overlay(cls, os.fspath(path), backing_file, backing_format=backing_format, size=size,
                              **create_options)

    # ------------------------------------------------------------------ public I/O
    def read_at(self, offset: int, length: int) -> bytes:
        """Read `length` bytes of the guest disk at `offset`, clipped at virtual_size."""
        # Fast path: a read inside one plain data cluster whose L2 table is cached is a single
        # pread. The small random read is all per-request cost, so every bytecode counts: on a
        # read-only image nothing mutates the tables, so the path needs no lock and takes its
        # constants from one tuple.
        fast = self._fast
        if fast is not None and offset >= 0 and length > 0:
            cbits, l1shift, l2mask, cmask, vsize, l1, tables, bad, limit, pread = fast
            inc = offset & cmask
            if inc + length <= cmask + 1 and offset + length <= vsize:
                l1e = l1[offset >> l1shift]
                l2i = (offset >> cbits) & l2mask
                t = tables.get(l1e & 0x00FFFFFFFFFFFE00)
                if t is not None and not l1e & 0x7F000000000001FF:
                    e = t.entries[l2i]
                    host = e & 0x00FFFFFFFFFFFE00
                    if host and not e & bad and host < limit:
                        data = pread(length, host + inc)
                        if len(data) == length:
                            return data
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: offset={offset} length={length}")
        n = max(0, min(length, self.virtual_size - offset))
        if not n:
            return b""
        with self._lock:
            self._check_open()
            return self._read_bytes_locked(offset, n)

    def readinto_at(self, buffer: Any, offset: int) -> int:
        """Read into `buffer` (any writable buffer) from guest `offset`; returns bytes read."""
        if offset < 0:
            raise ValueError(f"negative offset: {offset}")
        mv = memoryview(buffer)
        if mv.readonly:
            raise ValueError("buffer is read-only")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = max(0, min(len(mv), self.virtual_size - offset))
        if n:
            with self._lock:
                self._check_open()
                self._readinto_locked(mv[:n], offset)
        return n

    def write_at(self, offset: int, data: Any) -> int:
        """Write `data` (any bytes-like object) at guest `offset`; returns len(data)."""
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        self._check_range(offset, n)
        with self._lock:
            self._check_writable()
            if n:
                self._before_modify()
                self._write_locked(offset, mv)
        return n

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (also over a backing file)."""
        self._zero(offset, length, punch=False)

    def punch_hole(self, offset: int, length: int) -> None:
        """Like write_zeroes, and hand the host space of whole clusters back."""
        self._zero(offset, length, punch=True)

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        self._check_range(offset, length)
        with self._lock:
            self._check_writable()
            if length:
                self._before_modify()
                self._zero_locked(offset, length, punch=punch)

    def flush(self) -> None:
        """Make everything written so far durable (and the image consistent on disk)."""
        with self._lock:
            self._check_open()
            if not self.readonly:
                self._flush_locked()

    def close(self) -> None:
        """Flush, clear the dirty bit on a clean close, release locks and files. Idempotent."""
        with self._lock:
            if self.closed:
                return
            try:
                if not self.readonly and not self._corrupt:
                    self._flush_locked(final=True)
                    if self.header.incompatible_features & INCOMPAT_DIRTY:
                        self.header.incompatible_features &= ~INCOMPAT_DIRTY
                        self._write_header()
                        self.host.fsync()
            finally:
                self._release()

    def _release(self) -> None:
        self.closed = True
        self._fast = None
        if self.backing is not None:
            try:
                self.backing.close()
            finally:
                self.backing = None
        if self._image_lock is not None:
            self._image_lock.release()
            self._image_lock = None
        if self.data_host is not None and self.data_host is not self.host:
            self.data_host.close()
        if self.host is not None:
            self.host.close()

    def __enter__(self) -> "QcowFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort for forgotten closes
        try:
            if not self.closed and self.host is not None:
                self._release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<QcowFile {self.filename!r} size={self.virtual_size} {'ro' if self.readonly else 'rw'}>"

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents of [offset, offset + length) of the guest disk, as `qemu-img map` reports them.

        Lazy and merged (see qcowdisk.blockstatus); takes the image lock around each batch of
        extents, never across a yield.
        """
        from .blockstatus import block_status, locked
        with self._lock:
            self._check_open()
            extents = block_status(self, offset, length)
        return locked(extents, self._lock, self._check_open)

    # ------------------------------------------------------------------ helpers
    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the image."""
        return self.header.backing_file

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed QcowFile")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: offset={offset} length={length}")
        if offset + length > self.virtual_size:
            raise ValueError(
                f"write of {length} bytes at offset {offset} goes past the virtual size {self.virtual_size}")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"image {self.filename!r} is open read-only")
        if self._corrupt:
            raise CorruptImageError(f"image {self.filename!r} was marked corrupt; writes are refused")

    def _before_modify(self) -> None:
        """With lazy refcounts, set and sync the dirty bit before the first deferred update."""
        h = self.header
        if h.compatible_features & COMPAT_LAZY_REFCOUNTS and not h.incompatible_features & INCOMPAT_DIRTY:
            h.incompatible_features |= INCOMPAT_DIRTY
            self._write_header()
            self.host.fsync()

    @property
    def _lazy(self) -> bool:
        return bool(self.header.incompatible_features & INCOMPAT_DIRTY)

    def _sync_data(self) -> None:
        if self.data_host is not self.host:
            self.data_host.fsync()
        self.host.fsync()
        self._data_unsynced = False
        if self.refcounts is not None:
            self.refcounts.dirty_since_sync = False

    def _before_l2_writeback(self) -> None:
        """An L2 table is about to reach the disk: its data and refcounts must be there first."""
        if self.refcounts is not None and not self._lazy and self.refcounts.has_dirty():
            self.refcounts.write_dirty()
            self._sync_data()
        elif self._data_unsynced or (self.refcounts is not None and self.refcounts.dirty_since_sync):
            self._sync_data()

    def _flush_locked(self, final: bool = False) -> None:
        """Write back everything in the crash-safe order; `final` also writes lazily kept refcounts."""
        rc = self.refcounts
        assert rc is not None
        lazy = self._lazy
        if not lazy and rc.has_dirty():
            rc.write_dirty()
        l2_dirty = self.l2_cache.has_dirty()
        if l2_dirty or self._l1_dirty:
            self._sync_data()
            if l2_dirty:
                self.l2_cache.write_dirty()
                if self._l1_dirty:
                    self.host.fsync()
            if self._l1_dirty:
                self._write_l1_entries()
            self.host.fsync()
        elif self._data_unsynced or rc.dirty_since_sync:
            self._sync_data()
        if self._pending_frees:
            self._apply_pending_frees()
            if not lazy:
                rc.write_dirty()
            self.host.fsync()
        if lazy and final and rc.has_dirty():
            rc.write_dirty()
            self.host.fsync()
        self._data_unsynced = False

    def _write_l1_entries(self) -> None:
        codec = TableCodec(64, len(self.l1) * 8)
        for i in sorted(self._l1_dirty):
            self.host.pwrite(codec.encode(self.l1, i, i + 1), self.header.l1_table_offset + i * 8)
        self._l1_dirty.clear()

    def _apply_pending_frees(self) -> None:
        """Decrement the refcounts of dropped references (their L1/L2 changes are durable now)."""
        rc = self.refcounts
        assert rc is not None
        cbits = self.cluster_bits
        freed: list[int] = []
        for c in self._pending_frees:
            if rc.update(c, -1) == 0:
                freed.append(c)
                off = c << cbits
                if c in self.metadata:
                    self.metadata.discard(c)
                    self.l2_cache.drop(off)
        self._pending_frees.clear()
        # Hand space back in host-contiguous runs (the file keeps its length).
        freed.sort()
        i = 0
        while i < len(freed):
            j = i
            while j + 1 < len(freed) and freed[j + 1] == freed[j] + 1:
                j += 1
            self.host.punch_hole(freed[i] << cbits, (freed[j] - freed[i] + 1) << cbits)
            i = j + 1

