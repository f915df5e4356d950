"""QcowFile: open, close, flush and the public methods over one `Qcow2State`.

Only the public methods here take the image lock; the functions of mapping, reading, writing,
refcount and ordering expect it held. This module also owns the image's health:

- **Failed state.** A host write, fsync, truncate or punch that fails during a write or flush
  leaves the disk behind the metadata in memory, and after a failed fsync Linux may already have
  dropped the unsynced pages. So the first such `OSError` reaches the caller unchanged (its
  errno intact) and is kept in `failure`; from then on every write, zeroing, punch and flush
  raises `ImageFailedError` naming it, nothing more is written, reads keep working, and `close()`
  releases the descriptors and the lock and raises `ImageFailedError` instead of claiming a
  clean close. Because nothing is written after the failure, the image on disk is exactly what
  the crash-ordering rules left at that moment: free of corruption (leaks allowed), with every
  byte of the last successful flush, even if the failed write landed only in part, provided the
  part stops between two 8-byte table entries (QEMU is not proof against a tear inside an
  entry either).
- **fork().** A child inherits the parent's descriptors, and with them its OFD locks. In a
  child, `close()` (explicit, at the end of a `with` block, or at exit) only closes descriptors:
  no flush, no metadata write, no unlock; writes are refused.
- **close() racing reads.** The lock-free read path of read-only images checks after its
  `pread` that the image was not closed meanwhile, so a descriptor number reused by another
  open can never hand another file's bytes back as guest data.
"""

from __future__ import annotations

import functools
import mmap
import operator
import os
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from .. import formats
from ..blockstatus import block_status, locked
from ..errors import (
    BitmapError,
    CorruptImageError,
    ImageFailedError,
    InvalidImageError,
    QcowError,
    ReadOnlyError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)
from ..hostio import Buffer, HostFactory, HostFile
from ..image import Extent, LayerExtent, as_index, fill_zeros
from ..locking import ImageLock, lock_image
from ..qcow1 import Qcow1File
from . import bitmapedit, chain, compressed, makeempty, ordering, reading, status, writing
from . import bitmaps as bitmapping
from . import zeroize as zeroizing
from .cache import CachedTable, TableCache
from .chain import ChainMap
from .create import create_image, preallocate
from .entries import (
    L1E_OFFSET_MASK,
    L1E_RESERVED_MASK,
    L2E_OFFSET_MASK,
    REFT_OFFSET_MASK,
    SUBCLUSTER_ALL,
    decode_u64_table,
    fast_read_reject_mask,
)
from .format import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_KNOWN,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    Bitmap,
    Header,
    Snapshot,
    parse_header,
    parse_snapshot_table,
    validate_snapshot_fields,
)
from .l1 import L1Table
from .mapping import plain_host
from .overlap import collect_metadata
from .refcount import Refcounts
from .state import DEFAULT_REFBLOCK_CACHE_BYTES, Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:  # the rarer operations' modules are imported where used (start-up time)
    from typing import Any, Literal, TypeVar, overload

    from ..image import Image
    from .check import CheckResult, Repair

    _T = TypeVar("_T")

# Bytes of cluster 0 read first at open (see `_read_header`).
HEADER_PREFIX_BYTES = 4096

# The fast read path's constants: cluster_bits, l1 shift, index mask of an entry in its L2
# slice, cluster mask, virtual size, L1 entries, the L2 (slice) cache's tables, entry bits that
# reject, file length, pread, preadv, entry index shift (1 with extended L2 entries: entry and
# bitmap), subcluster bits, and a, b, c giving the slice's byte offset in its table as
# ((offset >> a) & b) << c (0 without slices: b is 0), and the backing chain's map (chain.py;
# None without a backing file).
_FastPath = tuple[int, int, int, int, int, "array[int]", "OrderedDict[int, CachedTable]", int, int,
                  Callable[[int, int], bytes], Callable[[list[Buffer], int], int], int, int, int, int, int,
                  "ChainMap | None", dict[int, int]]
# The fast path's memo (the tuple's last item): guest cluster number -> host offset of the plain
# data clusters it found, so a repeated 4 KiB read skips the L1/L2 walk (a dict lookup where the
# walk is ~25 bytecodes and a call). It lives and dies with the tuple, which every change of the
# mapping replaces (see read_at), so it is never stale; this many entries (~100 bytes each) at most.
FAST_MEMO_ENTRIES = 8192

# Every open state, so a forked child can disown them (see the module docstring).
_OPEN_STATES: weakref.WeakSet[Qcow2State] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for s in list(_OPEN_STATES):
        s.inherited = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _in_forked_child(s: Qcow2State) -> bool:
    return s.inherited


def _fast_lookup(fast: _FastPath, offset: int, length: int) -> int:
    """The host offset of guest [offset, +length) when it lies in one plain data cluster (or in
    allocated subclusters) whose L2 table (or slice) is cached; -1 for anything else (the checked path).
    A plain data cluster found (without subclusters) is remembered in the tuple's memo."""
    cbits, l1shift, l2mask, cmask, vsize, l1, tables, bad, limit, _, _, ext, sbits, sa, sb, sc, _, memo = fast
    inc = offset & cmask
    if inc + length <= cmask + 1 and offset + length <= vsize:
        l1e = l1[offset >> l1shift]
        t = tables.get((l1e & L1E_OFFSET_MASK) + (((offset >> sa) & sb) << sc))
        if t is not None and not l1e & L1E_RESERVED_MASK:
            i = ((offset >> cbits) & l2mask) << ext
            e = t.entries[i]
            host = e & L2E_OFFSET_MASK
            if host and not e & bad and host < limit:
                if not ext:
                    if len(memo) < FAST_MEMO_ENTRIES:
                        memo[offset >> cbits] = host
                    else:
                        memo.clear()  # a working set larger than the memo: start over
                    return host + inc
                if t.entries[i + 1] == SUBCLUSTER_ALL or reading.subclusters_allocated(
                        t.entries[i + 1], inc >> sbits, (inc + length - 1) >> sbits):
                    return host + inc
    return -1


class _LegacyQcow(UnsupportedFeatureError):
    """The file is a qcow version 1 image: QcowFile.open hands it to the qcow v1 reader; where an
    image is opened as qcow2 by name (qemu-img -f qcow2, a check) it fails as QEMU's qcow2 driver
    fails it."""


class QcowFile:
    """A qcow2 image opened for reading (and writing): the guest disk as byte ranges.

    Thread-safe: every public method takes the image's lock. Reads hold it only to resolve the
    mapping: their host reads and decoding run without it, so threads read at once, and a read
    racing a write of the same bytes returns, byte by byte, what was there before or after it,
    never bytes of a cluster freed meanwhile (see qcowdisk.qcow2.reading.ReadPlan).
    Implements `qcowdisk.image.Image`.
    """

    format_name = "qcow2"
    """The format's name as qemu-img reports it (the `Image` protocol's `format_name`)."""

    def __init__(self, state: Qcow2State, image_lock: ImageLock | None) -> None:
        """Wrap an opened state (use `open`, `create` or `create_from_backing`)."""
        self._state = state
        self._image_lock = image_lock
        self._snapshot: Snapshot | None = None
        self._editor: bitmapedit.BitmapEditor | None = None
        self._bitmaps_readonly = False  # read-only for guest writes only because of its bitmaps
        # Records each guest write in the enabled persistent bitmaps (bitmapedit.BitmapEditor.marker);
        # None without any: the write path's one test. `_writes_guest`: opened for guest writes,
        # so tracking starts again after a bitmap commit; `_storing`: a final store (close).
        self._dirty: bitmapedit.Marker | None = None
        self._writes_guest = False
        self._storing = False
        # The fast read path's constants in one tuple (every bytecode counts on a 4 KiB read);
        # None once closed, and on a read-write image from the moment a write-side method
        # takes the lock until the next read rebuilds it (see `read_at`).
        self._fast_ok = not state.has_data_file
        self._fast = self._fast_path()
        _OPEN_STATES.add(state)

    def _fast_path(self) -> _FastPath | None:
        s = self._state
        if not self._fast_ok or s.closed:
            return None
        pread: Callable[[int, int], bytes] = s.host.pread
        preadv: Callable[[list[Buffer], int], int] = s.host.preadv
        if type(s.host) is HostFile:  # no test seam to honour: call the OS directly
            pread = functools.partial(os.pread, s.host.fd)
            preadv = functools.partial(os.preadv, s.host.fd)
        # Slices exist only on read-only opens (cachesize.py), so the write side's invalidation
        # of `_fast` (see read_at) never has to cover them.
        sbits = s.l2_slice_entries.bit_length() - 1
        cache = s.l2_cache if s.l2_slices is None else s.l2_slices
        # A new chain map with every new tuple: what replaces the tuple invalidates the map (chain.py).
        return (s.cluster_bits, s.cluster_bits + s.l2_entries.bit_length() - 1, s.l2_slice_entries - 1,
                s.cluster_mask, s.virtual_size, s.l1.entries, cache.tables,
                fast_read_reject_mask(s.cluster_size), s.alloc_limit, pread, preadv, int(s.extended_l2),
                s.subcluster_bits, s.cluster_bits + sbits, (s.l2_entries - 1) >> sbits,
                sbits + 3 + int(s.extended_l2), chain.new_map(s), {})

    # ------------------------------------------------------------------ opening
    if TYPE_CHECKING:  # (typing's overload: for the type checker only)
        @overload
        @classmethod
        def open(cls, path: str | os.PathLike[str], *, readonly: Literal[False] = False, backing: bool = True,
                 confine_to: str | os.PathLike[str] | None = None, force_share: bool = False,
                 max_nesting_depth: int = formats.DEFAULT_MAX_NESTING_DEPTH,
                 host_factory: HostFactory | None = None, snapshot: None = None,
                 l2_cache_size: int | None = None, l2_cache_entry_size: int | None = None) -> QcowFile: ...

        @overload
        @classmethod
        def open(cls, path: str | os.PathLike[str], *, readonly: Literal[True], backing: bool = True,
                 confine_to: str | os.PathLike[str] | None = None, force_share: bool = False,
                 max_nesting_depth: int = formats.DEFAULT_MAX_NESTING_DEPTH,
                 host_factory: HostFactory | None = None, snapshot: str | Snapshot,
                 l2_cache_size: int | None = None, l2_cache_entry_size: int | None = None) -> QcowFile: ...

        @overload
        @classmethod
        def open(cls, path: str | os.PathLike[str], *, readonly: bool, backing: bool = True,
                 confine_to: str | os.PathLike[str] | None = None, force_share: bool = False,
                 max_nesting_depth: int = formats.DEFAULT_MAX_NESTING_DEPTH,
                 host_factory: HostFactory | None = None, snapshot: None = None,
                 l2_cache_size: int | None = None, l2_cache_entry_size: int | None = None) -> QcowFile | Qcow1File: ...

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False, backing: bool = True,
             confine_to: str | os.PathLike[str] | None = None, force_share: bool = False,
             max_nesting_depth: int = formats.DEFAULT_MAX_NESTING_DEPTH,
             host_factory: HostFactory | None = None,
             snapshot: str | Snapshot | None = None, l2_cache_size: int | None = None,
             l2_cache_entry_size: int | None = None) -> QcowFile | Qcow1File:
        """Open a qcow2 image. Read-write opens take QEMU's write lock and repair a dirty image first.

        Persistent dirty bitmaps are kept as QEMU 7.2 keeps them: a read-write open marks every
        consistent bitmap in use on disk (one crash-safe directory switch) and loads the
        enabled ones; every write, write_zeroes, discard, zeroize, allocate and compressed write
        sets the bits of the granules it touches in them (`make_empty` none, as QEMU's
        bdrv_make_empty); `close` stores them and clears the marks (a flush does not, as QEMU's
        does not). A crash in between leaves them in use, inconsistent, as QEMU leaves them;
        such a bitmap is left as it is. A broken directory or table of a consistent bitmap
        refuses the read-write open (InvalidImageError/CorruptImageError), as QEMU refuses it.

        A read-only open also opens a legacy qcow version 1 image, returning a
        `qcowdisk.qcow1.Qcow1File` with the same reading API (read_at, readinto_at, block_status,
        backing, snapshots: none); writing one raises ReadOnlyError, as does opening one
        read-write.

        An image is untrusted input and so are the files it names. By default its backing chain
        and external data file are followed as QEMU follows them; `backing=False` opens the image
        alone (unallocated ranges read as zeros), and `confine_to=DIR` refuses every backing or
        data file that resolves (after symlinks) outside DIR. Whatever the options, a named file
        that is not a regular file or block device is refused without blocking.
        `force_share=True` (read-only only) neither takes nor honours the image lock, like
        `qemu-img -U`: it can inspect an image a VM is running on, and may see it inconsistent.
        `host_factory(path, writable) -> HostFile` is the host I/O seam (tests inject faults there).

        `snapshot=ID_OR_NAME` (read-only opens only; a `Snapshot` from `snapshots` works too)
        shows that internal snapshot's disk instead of the active one, with the same reading
        API and block status: what `qemu-img convert -l snapshot.name=NAME` exports, except
        that the disk has the snapshot's size (QEMU's export keeps the active disk's size).
        The id is tried first, then the name. A snapshot whose L1 table is bad is refused with
        an InvalidImageError naming the field and value.

        `l2_cache_size` and `l2_cache_entry_size` (bytes) are QEMU's `l2-cache-size` and
        `l2-cache-entry-size` options, with QEMU's defaults, limits and messages (ValueError);
        they size the image's own L2 cache, not its backing files' (see
        qcowdisk.qcow2.cachesize). Read-only opens read L2 tables in slices of the entry size.
        """
        path = os.fspath(path)
        if force_share and not readonly:
            raise ValueError("force_share=True can only be used with readonly=True")
        if snapshot is not None and not readonly:
            raise ValueError("snapshot= can only be used with readonly=True (apply_snapshot reverts the disk)")
        options = formats.OpenOptions(readonly=readonly, max_nesting_depth=max_nesting_depth,
                                      host_factory=host_factory or HostFile, backing=backing,
            confine_to=None if confine_to is None else os.fspath(confine_to),
            force_share=force_share, l2_cache_size=l2_cache_size,
                                      l2_cache_entry_size=l2_cache_entry_size)
        if snapshot is not None:
            return cls.open_snapshot(path, snapshot, options)
        return cls._open_any(path, options, (os.path.realpath(path),))

    @classmethod
    def open_snapshot(cls, path: str | os.PathLike[str], snapshot: str | Snapshot,
                      options: formats.OpenOptions) -> QcowFile:
        """`open(path, readonly=True, snapshot=snapshot)` with every other choice from `options`
        (an --image-opts string's caches, backing node, data file, host I/O): qemu-img convert -l."""
        path = os.fspath(path)
        img = cls._open_any(path, options.replace(readonly=True), (os.path.realpath(path),))
        try:
            if not isinstance(img, QcowFile):
                raise SnapshotNotFoundError(f"{path!r} is a qcow version 1 image: it has no internal snapshots")
            img._show_snapshot(snapshot)
        except BaseException:
            img.close()
            raise
        return img

    def _show_snapshot(self, ref: str | Snapshot) -> None:
        s = self._state
        with s.lock:
            self._fast = None
            from . import snapshot
            s.remap_epoch += 1
            self._snapshot = snapshot.load_for_reading(s, ref)
            self._fast = self._fast_path()

    @classmethod
    def _open_any(cls, path: str, options: formats.OpenOptions, chain: tuple[str, ...]) -> QcowFile | Qcow1File:
        """`_open`, or a qcow v1 reader when the file turns out to be one (read-only opens)."""
        try:
            return cls._open(path, options, chain)
        except _LegacyQcow:
            return Qcow1File._open(path, options, chain)

    @classmethod
    def _open(cls, path: str, options: formats.OpenOptions, chain: tuple[str, ...], *,
              for_check: bool = False, for_bitmaps: bool = False) -> QcowFile:
        if len(chain) > 1:  # a backing file: named by the image above, so confined
            host = formats.open_named_file(path, not options.readonly, options, "backing file", chain[-2])
        else:
            host = options.host_factory(path, not options.readonly)
        image_lock: ImageLock | None = None
        state: Qcow2State | None = None
        try:
            # QEMU's lock bytes: writers exclude everyone, readers exclude writers (both ways).
            if host.pread(8, 0) == b"QFI\xfb\0\0\0\1":
                if not options.readonly:  # (worded as QEMU's qcow2 driver refuses it, then why)
                    raise ReadOnlyError(f"Unsupported qcow2 version 1 ({path!r} is a legacy qcow image: "
                                        "qcow v1 images are supported read-only)")
                raise _LegacyQcow(f"Unsupported qcow2 version 1 ({path!r} is a legacy qcow image: "
                                  "open it as format qcow)")
            if not options.force_share:
                image_lock = lock_image(host.fd, path, write=not options.readonly)
            state = _load_state(path, host, options, for_check)
            if state.header.backing_file and options.backing:
                state.backing = formats.open_backing(path, state.header.backing_file, state.header.backing_format,
                                                     options, chain)
            if not options.readonly:
                _prepare_for_writing(state, for_check)
        except BaseException:
            if state is not None:
                if state.backing is not None:
                    state.backing.close()
                _close_files(state)
            else:
                host.close()
            if image_lock is not None:
                image_lock.release()
            raise
        img = cls(state, image_lock)
        if not options.readonly and not for_check and not for_bitmaps:
            try:
                img._track_guest_writes()
            except BaseException:
                img._release()  # (nothing of the guest's written yet: the bitmaps stay as they were)
                raise
        return img

    def _track_guest_writes(self) -> None:
        """Opened for guest writes: with persistent bitmaps, QEMU's open (qcow2_load_dirty_bitmaps):
        the consistent ones marked in use on disk, the enabled ones loaded to record every write
        (`_dirty`), stored at close. Without bitmaps nothing happens (an `add_bitmaps` later starts it)."""
        self._writes_guest = True
        s = self._state
        if s.header.autoclear_features & AUTOCLEAR_BITMAPS and any(
                e.ext_type == EXT_BITMAPS for e in s.header.extensions):
            self.edit_bitmaps().track_writes()

    def _retrack(self, offset: int, length: int) -> None:
        """The marker after a bitmap commit on an image open for guest writes: at its first
        write, mark the bitmaps in use again (tracking), then record the write. Holds the lock."""
        self._dirty = None
        assert self._editor is not None
        self._editor.track_writes()  # sets _dirty (None: no enabled consistent bitmap left)
        if self._dirty is not None:
            self._dirty(offset, length)

    def _store_bitmaps(self) -> None:
        """QEMU's store at close: the tracked bitmaps written with the recorded bits, their in-use
        marks cleared; tracking does not start again. Holds the lock."""
        editor = self._editor
        if editor is not None and editor.tracking:
            self._storing = True
            try:
                editor.commit()
            finally:
                self._storing = False
        self._dirty = None

    @property
    def tracks_writes(self) -> bool:
        """Whether guest writes are recorded in persistent bitmaps (enabled ones, or tracking
        restarts at the next write after a bitmap commit)."""
        return self._dirty is not None

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record guest bytes [offset, offset+length) as written in the enabled persistent
        bitmaps without writing them: for a writer that writes less than QEMU's would (commit
        marks the whole chunks qemu-img's mirror writes). Writes mark what they write by themselves."""
        offset = self._check_range(offset, length)
        with self._state.lock:
            self._check_writable()
            dirty = self._dirty
            if dirty is not None and length:
                self._guarded(lambda: dirty(offset, length), remaps=False)

    # ------------------------------------------------------------------ create
    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, cluster_size: int = 65536, refcount_bits: int = 16,
               compat: str = "1.1", lazy_refcounts: bool = False, extended_l2: bool = False,
               compression_type: str = "zlib", preallocation: str = "off",
               data_file: str | os.PathLike[str] | None = None, data_file_raw: bool = False,
               backing_file: str | os.PathLike[str] | None = None, backing_format: str | None = None,
               host_factory: HostFactory | None = None) -> QcowFile:
        """Create a new image (never overwriting an existing file) and return it open read-write.

        Options mean what the same-named `qemu-img create -o` options mean; invalid combinations
        raise ValueError as qemu-img refuses them. With `data_file_raw`, metadata is
        preallocated (unless more is asked), as qemu-img does, so the tables map the data file
        1:1.
        """
        path = os.fspath(path)
        data_file = None if data_file is None else os.fspath(data_file)
        backing_file = None if backing_file is None else os.fspath(backing_file)
        create_image(path, size, cluster_size=cluster_size, refcount_bits=refcount_bits,
                     compat=compat, lazy_refcounts=lazy_refcounts, extended_l2=extended_l2,
                     compression_type=compression_type, preallocation=preallocation, data_file=data_file,
                     data_file_raw=data_file_raw, backing_file=backing_file, backing_format=backing_format,
                     host_factory=host_factory)
        if data_file_raw and preallocation == "off":
            # qcow2_co_create: the tables must map the raw data file 1:1, so metadata is preallocated
            preallocation = "metadata"
        img = cls._open(path, formats.OpenOptions(host_factory=host_factory or HostFile), (os.path.realpath(path),))
        if preallocation != "off":
            try:
                with img._state.lock:
                    img._guarded(lambda: preallocate(img._state, preallocation))
            except BaseException:
                img.close()
                raise
        return img

    @classmethod
    def create_from_backing(cls, path: str | os.PathLike[str], backing_file: str | os.PathLike[str], *,
                            backing_format: str | None = None, size: int | None = None,
                            **create_options: Any) -> QcowFile:
        """Create an overlay on `backing_file` (size from the backing file unless given).

        The backing name is stored as given (relative names resolve against the overlay's
        directory) and the backing format is always recorded, probed when not given.
        """
        path = os.fspath(path)
        backing_file = os.fspath(backing_file)
        host_factory = create_options.get("host_factory") or HostFile
        bpath = formats.resolve_backing_path(path, backing_file)
        if not os.path.exists(bpath):
            raise FileNotFoundError(f"backing file {bpath!r} (named {backing_file!r}) does not exist")
        fmt = backing_format or formats.probe_format(bpath, host_factory)
        if size is None:
            options = formats.OpenOptions(readonly=True, host_factory=host_factory)
            backing = formats.open_backing(path, backing_file, fmt, options, (os.path.realpath(path),))
            try:
                size = backing.virtual_size
            finally:
                backing.close()
        return cls.create(path, size, backing_file=backing_file, backing_format=fmt, **create_options)

    # ------------------------------------------------------------------ properties
    @property
    def filename(self) -> str:
        """The path the image was opened by."""
        return self._state.filename

    @property
    def readonly(self) -> bool:
        """Whether the image was opened read-only."""
        return self._state.readonly

    @property
    def closed(self) -> bool:
        """Whether `close()` has run."""
        return self._state.closed

    @property
    def header(self) -> Header:
        """The decoded header (fields as on disk)."""
        return self._state.header

    @property
    def virtual_size(self) -> int:
        """The guest disk's size in bytes."""
        return self._state.virtual_size

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return self._state.cluster_size

    @property
    def cluster_bits(self) -> int:
        """log2 of the cluster size."""
        return self._state.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """Whether L2 entries carry subcluster bitmaps."""
        return self._state.extended_l2

    @property
    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, in table order.

        Raises the InvalidImageError that describes a broken snapshot table (an image whose
        snapshot table is broken opens read-only for its active layer only).
        """
        if self._state.snapshot_error is not None:
            raise self._state.snapshot_error
        return list(self._state.snapshots)

    @property
    def bitmaps(self) -> list[Bitmap]:
        """The persistent dirty bitmaps, in directory order ([] without the bitmaps extension, or
        when its autoclear bit is clear: QEMU then considers them stale and ignores them).

        Raises InvalidImageError naming the field and value of a broken extension or directory.
        """
        s = self._state
        with s.lock:
            self._check_open()
            return bitmapping.load_directory(s)

    def read_bitmap(self, name: str) -> Iterator[bytes]:
        """The contents of the persistent bitmap `name`: its serialized bits (one bit per
        `granularity` bytes of guest disk, bit i in byte i // 8 at bit i % 8), one cluster's
        worth per chunk, `bitmaps.bitmap_bytes(virtual_size, granularity)` bytes in all.

        Raises BitmapError when there is no such bitmap or it is inconsistent (in use: a program
        that had it open did not store it), InvalidImageError/CorruptImageError naming the field
        and value of a table that does not fit the disk or an entry out of bounds (the whole
        table is checked before the first chunk is returned). See qcowdisk.qcow2.bitmaps.
        """
        s = self._state
        with s.lock:
            self._check_open()
            bm = next((b for b in bitmapping.load_directory(s) if b.name == name), None)
            if bm is None:
                raise BitmapError(f"Dirty bitmap '{name}' not found")
            table = bitmapping.load_table(s, bm)

        def chunks() -> Iterator[bytes]:
            for i in range(len(table)):
                with s.lock:
                    self._check_open()
                    data = bitmapping.read_chunk(s, bm, table, i)
                yield data
        return chunks()

    def add_bitmaps(self, new: Iterable[bitmapping.NewBitmap]) -> None:
        """Add persistent dirty bitmaps (`NewBitmap`: name, granularity, enabled, contents) after
        the image's own, as QEMU stores new ones; durable on return, and a power cut leaves either
        none of them or all (see qcowdisk.qcow2.bitmaps for the order of writes).

        What QEMU refuses (a name in use, a granularity out of range, a version 2 image, ...)
        raises BitmapError with QEMU's message, and nothing is written. Contents of the wrong
        length raise ValueError, leaving only leaked clusters behind. An image open for guest
        writes stays so: from the next write on, the bitmaps are marked in use again and the
        enabled ones record every write until the close stores them (see `open`).
        """
        new = list(new)
        editor = self.edit_bitmaps()
        try:
            for b in new:  # (every check before anything is written: the commit writes)
                editor.add(b.name, b.granularity, enabled=b.enabled, data=b.data)
            editor.commit()
        except BaseException:
            if not editor.tracking and not self._state.closed and self._state.failure is None:
                editor.reset()  # what was not stored is forgotten
            raise

    @classmethod
    def open_for_bitmaps(cls, path: str | os.PathLike[str], *, track_writes: bool = False, backing: bool = False,
                         confine_to: str | os.PathLike[str] | None = None,
                         host_factory: HostFactory | None = None,
                         tuning: formats.OpenOptions | None = None) -> QcowFile:
        """Open an image to edit its persistent bitmaps (`edit_bitmaps`), as `qemu-img bitmap`
        opens it: read-write under the write lock, even when it has bitmaps (which `open`
        refuses read-write), without its backing chain unless `backing`. `tuning` gives the
        cache sizes and the backing file's options (`backing_node`).

        Guest writes are refused (ReadOnlyError), so the bitmaps are not marked in use. With
        `track_writes` the image is open for guest writes as `open` opens it: every consistent
        bitmap is marked in use on disk first, each write is recorded in the enabled ones, and
        `edit_bitmaps().commit()` (or the close) stores them with the marks cleared.
        """
        path = os.fspath(path)
        options = (tuning or formats.OpenOptions()).replace(
            readonly=False, host_factory=host_factory or HostFile, backing=backing,
            confine_to=None if confine_to is None else os.fspath(confine_to),
            force_share=False, raw_offset=0, raw_size=None)
        img = cls._open(path, options, (os.path.realpath(path),), for_bitmaps=True)
        try:
            img.edit_bitmaps()
            if track_writes:
                img._track_guest_writes()
            else:
                img._state.readonly = True  # guest writes refused; the editor writes metadata only
                img._bitmaps_readonly = True
        except BaseException:
            img.close()
            raise
        return img

    @classmethod
    def open_keeping_bitmaps(cls, path: str | os.PathLike[str], *,
                             confine_to: str | os.PathLike[str] | None = None,
                             host_factory: HostFactory | None = None,
                             tuning: formats.OpenOptions | None = None) -> QcowFile:
        """Open read-write for the operations that keep persistent bitmaps true (`resize`,
        `create_snapshot`, `delete_snapshot`, `amend`), as qemu-img opens an image for them.
        Without bitmaps this is `open`; with bitmaps, as `open_for_bitmaps` (with the backing
        chain): guest writes and `apply_snapshot` are refused, those operations allowed.
        `tuning` gives the cache sizes and the backing file's options (`backing`, `backing_node`)."""
        path = os.fspath(path)
        options = (tuning or formats.OpenOptions()).replace(
            readonly=False, host_factory=host_factory or HostFile, force_share=False,
            confine_to=None if confine_to is None else os.fspath(confine_to),
            raw_offset=0, raw_size=None)
        img = cls._open(path, options, (os.path.realpath(path),), for_bitmaps=True)
        s = img._state
        if s.header.autoclear_features & AUTOCLEAR_BITMAPS and any(
                e.ext_type == EXT_BITMAPS for e in s.header.extensions):
            s.readonly = img._bitmaps_readonly = True
        return img

    def _check_metadata_writable(self) -> None:
        """`_check_writable` for `_metadata_change`'s operations (before their own checks)."""
        if not (self._state.readonly and self._bitmaps_readonly):
            self._check_writable()
        self._check_open()

    def _metadata_change(self, operation: Callable[[], _T]) -> _T:
        """Run an operation that changes no guest data and keeps the bitmaps true (resize,
        snapshot create/delete, amend): allowed on an image read-only only because of its bitmaps
        (made durable and clean at the end, as its close writes nothing). Holds the lock."""
        s = self._state
        lifted = s.readonly and self._bitmaps_readonly and not s.closed
        if self._editor is not None and self._editor.tracking:
            # the bitmaps stored first (these operations keep stored bitmaps true); tracking
            # starts again at the next write
            self._check_writable()
            self._guarded(self._editor.commit)
        elif self._editor is not None and self._editor.pending:
            raise ReadOnlyError(f"image {s.filename!r}: commit the bitmap edits first")
        if lifted:
            s.readonly = False
        try:
            self._check_writable()
            out = self._guarded(operation)
            if lifted:
                self._guarded(self._close_cleanly)
        finally:
            if lifted:
                s.readonly = True
            if self._editor is not None and s.failure is None and not s.closed:
                self._editor.reset()  # the directory may have moved
        return out

    def edit_bitmaps(self) -> bitmapedit.BitmapEditor:
        """The `BitmapEditor` of this image's persistent bitmaps: add, remove, clear, enable,
        disable, merge as `qemu-img bitmap` does, then `commit()` (crash-safe: the old bitmaps
        or the new ones), on any read-write image. On one open for guest writes (`open`), the
        commit also stores the bits recorded so far and clears the in-use marks; tracking starts
        again at the next write. An image from `open_for_bitmaps` (guest writes refused) turns
        read-only once a commit has stored bitmaps. The same editor every call. See
        qcowdisk.qcow2.bitmapedit."""
        s = self._state
        with s.lock:
            if self._editor is None:
                if s.readonly:
                    raise ReadOnlyError(f"image {s.filename!r} is open read-only")

                def check() -> None:
                    self._check_open()
                    self._check_healthy()
                    if s.corrupt:
                        raise CorruptImageError(f"image {s.filename!r} was marked corrupt; writes are refused")

                def after_commit() -> None:
                    if self._writes_guest:
                        if not self._storing:
                            self._dirty = self._retrack  # guest writes go on recorded (see the docstring)
                    else:
                        s.readonly = True  # see the docstring
                        self._bitmaps_readonly = True

                def on_marker(marker: bitmapedit.Marker | None) -> None:
                    self._dirty = marker

                self._editor = bitmapedit.BitmapEditor(s, check, after_commit, on_marker)
            return self._editor

    @property
    def backing(self) -> Image | None:
        """The opened backing image, or None."""
        return self._state.backing

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the image."""
        return self._state.header.backing_file

    def __len__(self) -> int:
        """The virtual size: `len(disk)` bytes of guest disk."""
        return self._state.virtual_size

    @property
    def failure(self) -> BaseException | None:
        """The host error that put the image in the failed state, or None while healthy."""
        return self._state.failure

    # ------------------------------------------------------------------ internal snapshots (snapshot.py)
    def create_snapshot(self, name: str) -> Snapshot:
        """Take an internal snapshot of the disk as it is now, as `qemu-img snapshot -c NAME` does
        (same id, date, disk size and extra data), and return it. Durable when it returns.

        A name already in use raises SnapshotExistsError (qemu-img would add a duplicate); a
        name over 255 bytes or with a NUL raises ValueError (qemu-img would cut it). Images with
        an external data file raise UnsupportedFeatureError, as QEMU refuses them.
        """
        s = self._state
        with s.lock:
            from . import snapshot
            return self._metadata_change(lambda: snapshot.create(s, name))

    def apply_snapshot(self, ref: str | Snapshot) -> Snapshot:
        """Revert the disk to a snapshot (`qemu-img snapshot -a`), its size included; `ref` is an
        id or else a name (as qemu-img resolves it), or a `Snapshot` from `snapshots`. The
        snapshot stays. Returns it. Raises SnapshotNotFoundError, and on an image with persistent
        bitmaps BitmapError (QEMU's "Device has active dirty bitmaps"). Durable when it returns."""
        s = self._state
        with s.lock:
            self._check_open()
            if bitmapping.load_directory(s):
                raise BitmapError("Device has active dirty bitmaps")
            self._check_writable()
            from . import snapshot
            return self._guarded(lambda: snapshot.apply(s, ref))

    def delete_snapshot(self, ref: str | Snapshot) -> Snapshot:
        """Delete a snapshot (`qemu-img snapshot -d`), freeing every cluster only it used;
        `ref` as for `apply_snapshot` (note that `qemu-img snapshot -d` itself matches names
        only). Returns the deleted snapshot. Durable when it returns."""
        s = self._state
        with s.lock:
            from . import snapshot
            return self._metadata_change(lambda: snapshot.delete(s, ref))

    def find_snapshot(self, ref: str) -> Snapshot:
        """The snapshot `ref` names: an id, else a name. Raises SnapshotNotFoundError."""
        s = self._state
        with s.lock:
            self._check_open()
            from . import snapshot
            return s.snapshots[snapshot.find(s, ref)]

    @property
    def opened_snapshot(self) -> Snapshot | None:
        """The snapshot this object shows (`open(..., snapshot=...)`), or None for the active disk."""
        return self._snapshot


    # ------------------------------------------------------------------ reading
    def read_at(self, offset: int, length: int) -> bytes:
        """Read `length` bytes of the guest disk at `offset`, clipped at virtual_size."""
        # Fast path: a read inside one plain data cluster (or allocated subclusters) whose L2
        # table is cached is a single pread, without the lock. `_fast` is the tuple the lookup
        # used; it is replaced (set to None first) by close() before it closes the descriptor
        # and by every write-side method before it changes any table entry or data (they all
        # pass `_check_writable` or `_guarded` under the lock). So when `_fast` is still the
        # same tuple after the pread, nothing changed the mapping or the data between lookup
        # and read, and no descriptor number was reused; otherwise the read is done again under
        # the lock (where a closed image raises).
        fast = self._fast
        if fast is not None and type(offset) is int and type(length) is int and offset >= 0 and length > 0:
            host = fast[17].get(offset >> fast[0])  # (the memo: see FAST_MEMO_ENTRIES)
            if host is not None and (offset & fast[3]) + length <= fast[3] + 1 and offset + length <= fast[4]:
                pos = host + (offset & fast[3])
            else:
                pos = _fast_lookup(fast, offset, length)
            if pos >= 0:
                try:
                    data: bytes = fast[9](length, pos)
                except OSError:
                    data = b""
                if self._fast is fast and len(data) == length:
                    return data
            elif fast[16] is not None:  # a backing chain: the layer that owns the range, directly
                hit = chain.chain_lookup(fast[16], self._state, offset, length)
                if hit is not None:
                    try:
                        data = hit[2][9](length, offset + hit[0])
                    except OSError:
                        data = b""
                    if self._fast is fast and hit[1]._fast is hit[2] and len(data) == length:
                        return data
        if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
            offset = as_index(offset, "offset")
            length = as_index(length, "length")
        s = self._state
        n = max(0, min(length, s.virtual_size - offset))
        with s.lock:
            self._check_open()
            if self._fast is None and self._fast_ok:
                self._fast = self._fast_path()  # (under the lock: no writer is halfway through)
            if not n:
                return b""
            # A read inside one cluster of plain data (an L2 miss, say) needs no plan: its host
            # offset, then one pread outside the lock, checked against the epoch as a plan is.
            found = plain_host(s, offset) if (offset & s.cluster_mask) + n <= s.cluster_size else reading.NOT_LOOKED_UP
            host = -1 if found is None else found
            if host >= 0:
                self._remember(offset, host)
            epoch = s.remap_epoch
            plan = None if host >= 0 else reading.plan_bytes(s, offset, n, found)
        # The host reads and decoding run without the lock (see reading.ReadPlan).
        got: bytes | None = None
        if plan is None:
            try:
                got = s.data_host.pread(n, host)
            except OSError:
                if s.remap_epoch == epoch:
                    raise
            if got is not None and len(got) == n and s.remap_epoch == epoch:
                return got
            got = None
        else:
            got = reading.bytes_outside_lock(plan)
        if got is None:
            buf = bytearray(n)
            self._read_locked(memoryview(buf), offset)
            got = bytes(buf)
        return got

    def readinto_at(self, buffer: Buffer, offset: int) -> int:
        """Read into `buffer` (any writable buffer) from guest `offset`; returns bytes read."""
        # Fast path: as read_at's, one preadv into the caller's buffer (a bytearray, an mmap or
        # a contiguous writable memoryview, whose byte length is known without a memoryview).
        fast = self._fast
        if fast is not None and type(offset) is int and offset >= 0:
            cls = type(buffer)
            if cls is bytearray or cls is mmap.mmap:
                length = len(buffer)
            elif cls is memoryview and buffer.c_contiguous and not buffer.readonly:
                length = buffer.nbytes
            else:
                length = 0
            host = fast[17].get(offset >> fast[0])  # (the memo: see FAST_MEMO_ENTRIES)
            if host is not None and (offset & fast[3]) + length <= fast[3] + 1 and offset + length <= fast[4]:
                pos = host + (offset & fast[3]) if length else -1
            else:
                pos = _fast_lookup(fast, offset, length) if length else -1
            if pos >= 0:
                try:
                    got = fast[10]([buffer], pos)
                except (OSError, BufferError):  # (BufferError: a read-only mmap, refused below)
                    got = -1
                if self._fast is fast:
                    if got == length:
                        return length
                elif self._state.closed:  # never leave another file's bytes behind
                    fill_zeros(memoryview(buffer).cast("B"), 0, length)
            elif length and fast[16] is not None:  # a backing chain, as in read_at
                hit = chain.chain_lookup(fast[16], self._state, offset, length)
                if hit is not None:
                    try:
                        got = hit[2][10]([buffer], offset + hit[0])
                    except (OSError, BufferError):
                        got = -1
                    if self._fast is fast and hit[1]._fast is hit[2]:
                        if got == length:
                            return length
                    elif self._state.closed or hit[1].closed:  # never leave another file's bytes behind
                        fill_zeros(memoryview(buffer).cast("B"), 0, length)
        offset = as_index(offset, "offset")
        mv = memoryview(buffer)
        if mv.readonly:
            raise TypeError("readinto_at() needs a writable buffer, not a read-only one")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        s = self._state
        n = max(0, min(len(mv), s.virtual_size - offset))
        with s.lock:
            self._check_open()
            if self._fast is None and self._fast_ok:
                self._fast = self._fast_path()  # (under the lock: no writer is halfway through)
            if not n:
                return 0
            found = plain_host(s, offset) if (offset & s.cluster_mask) + n <= s.cluster_size else reading.NOT_LOOKED_UP
            if found is not None and found >= 0:
                self._remember(offset, found)
            plan = reading.plan_read(s, mv[:n], offset, found)
        # The host reads and decoding run without the lock (see reading.ReadPlan).
        if not reading.serve_outside_lock(plan):
            self._read_locked(plan.mv, offset)
        return n

    def _remember(self, offset: int, host: int) -> None:
        """Put the plain data cluster the slow path found (`host`: the host offset of guest
        `offset`) in the fast path's memo, so the next read of it skips the lookup and the lock
        (an L2 miss read one entry, not the slice: the memo is then all that remembers it).
        The caller holds the lock, so the tuple is current: a writer replaces it first."""
        fast = self._fast
        if fast is not None:
            memo = fast[17]
            if len(memo) < FAST_MEMO_ENTRIES:
                memo[offset >> fast[0]] = host - (offset & fast[3])
            else:
                memo.clear()  # a working set larger than the memo: start over

    def _read_locked(self, mv: memoryview, offset: int) -> None:
        """Read again under the lock after the mapping moved under a read done outside it; a
        closed image leaves zeros behind (never another file's bytes) and raises."""
        s = self._state
        with s.lock:
            if s.closed:
                fill_zeros(mv, 0, len(mv))
                self._check_open()
            reading.readinto(s, mv, offset)

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents covering [offset, offset + length) of the guest disk and its backing
        chain, merged as `qemu-img map` merges them (see `qcowdisk.Extent`).

        Lazy: memory stays bounded whatever the disk's size. Takes the image lock around each
        batch of extents, never across a yield.
        """
        s = self._state
        offset = as_index(offset, "offset")
        if length is not None:
            length = as_index(length, "length")
        with s.lock:
            self._check_open()
            s.metadata_preallocated = None  # detected afresh for each query, as a new open would
            extents = block_status(self, offset, length)
        return locked(extents, s.lock, self._check_open)

    def layer_status(self, guest_offset: int, length: int) -> list[LayerExtent]:
        """What this image alone says about [guest_offset, +length) (see qcowdisk.qcow2.status)."""
        with self._state.lock:
            self._check_open()
            return status.layer_status(self._state, guest_offset, length)

    # ------------------------------------------------------------------ resize (resize.py)
    def resize(self, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Change the virtual size to `new_size` bytes, as `qemu-img resize` does; durable on return.

        Shrinking needs `shrink=True` (qemu-img's --shrink) and discards everything past the new
        end. The new area of a grown disk reads as zeros (also over a backing file that is
        longer). `preallocation` ("off", "metadata", "falloc", "full": qemu-img's
        --preallocation) gives every new cluster a host cluster, left sparse, allocated or
        written with zeros. Sizes are not rounded: what qemu-img refuses (not a multiple of 512, not
        positive, too large, a v2 image with snapshots, ...) raises `ResizeError` with
        qemu-img's message, and nothing is written. A power cut during the resize leaves the
        old or the new image. See `qcowdisk.qcow2.resize`.
        """
        s = self._state
        try:
            new_size = operator.index(new_size)
        except TypeError:
            raise TypeError(f"new_size must be an integer, not {type(new_size).__name__}") from None
        from . import resize as resizing
        with s.lock:
            self._check_metadata_writable()
            resizing.check(s, new_size, shrink, preallocation)
            self._metadata_change(lambda: resizing.resize(s, new_size, preallocation))

    # ------------------------------------------------------------------ amend (amend.py)
    def amend(self, *, compat: str | None = None, lazy_refcounts: bool | None = None,
              backing_file: str | None = None, backing_fmt: str | None = None, refcount_bits: int | None = None,
              size: int | None = None, data_file: str | None = None, data_file_raw: bool | None = None,
              encrypt: bool = False, progress: Callable[[int, int], None] | None = None) -> None:
        """Change image options in place as `qemu-img amend -o ...` does; durable on return.

        Options not given (None) are left alone. `compat` is "0.10"/"v2" or "1.1"/"v3";
        `size` resizes to exactly that size (shrinking too); `encrypt` says some encrypt.*
        option was given. What qemu-img amend refuses raises `AmendError` with its message, and
        nothing is written (except, as QEMU, an upgrade that came before a refcount width that
        does not fit); so does what qcowdisk does not implement (amending LUKS options). See `qcowdisk.qcow2.amend`.
        """
        from . import amend as amending
        from . import resize as resizing
        s = self._state
        options = amending.AmendOptions(compat=compat, lazy_refcounts=lazy_refcounts, backing_file=backing_file,
                                        backing_fmt=backing_fmt, refcount_bits=refcount_bits, size=size,
                                        data_file=data_file, data_file_raw=data_file_raw, encrypt=encrypt)
        with s.lock:
            self._check_metadata_writable()
            new_version = amending.check(s, options)
            if size:
                resizing.check(s, size, True)
            self._metadata_change(lambda: amending.amend(s, options, new_version, progress))

    # ------------------------------------------------------------------ writing
    def write_at(self, offset: int, data: Buffer) -> int:
        """Write `data` (any bytes-like object) at guest `offset`; returns len(data)."""
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        s = self._state
        if not (type(offset) is int and offset >= 0 and offset + n <= s.virtual_size):
            offset = self._check_range(offset, n)
        with s.lock:
            # _check_writable, inline: this is the per-request path
            self._fast = None  # (see read_at)
            if s.closed or s.readonly or s.corrupt or s.failure is not None or s.inherited:
                self._check_writable()
            if n:
                try:  # what _guarded does, inline
                    if self._dirty is not None:  # persistent bitmaps record the write
                        self._dirty(offset, n)
                    ordering.mark_dirty_before_lazy_update(s)
                    writing.write(s, offset, mv)
                    if s.refcounts is not None and s.refcounts.deferred_frees:  # usually empty
                        ordering.release_frees_if_piling(s)
                except OSError as e:
                    if s.failure is None:
                        s.failure = e
                    raise
        return n

    @property
    def zeroes_in_metadata(self) -> bool:
        """Whether `write_zeroes`/`punch_hole` change only table entries (plus at most the partial
        subclusters at either end) rather than writing zero bytes over the range: false for a
        version 2 image with a backing file and for an image with an external data file."""
        return not writing.zeroing_writes_data(self._state)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (also over a backing file)."""
        self._zero(offset, length, punch=False)

    def punch_hole(self, offset: int, length: int) -> None:
        """Like write_zeroes, and hand the host space of whole clusters back."""
        self._zero(offset, length, punch=True)

    def zeroize(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros the way QEMU's write_zeroes with
        MAY_UNMAP leaves it (`qemu-img convert -n` does this to zero ranges): whole clusters
        become zero clusters present in this image, their host space freed, even where they
        were unallocated (see qcowdisk.qcow2.zeroize)."""
        self._update_range(offset, length, zeroizing.zeroize)

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        self._update_range(offset, length, lambda s, at, n: writing.zero(s, at, n, punch))

    def _update_range(self, offset: int, length: int, update: Callable[[Qcow2State, int, int], None],
                      mark: bool = True) -> None:
        """Run a metadata update of [offset, +length) (zeroing, discard, allocation) the one
        guarded way: recorded in the persistent bitmaps (unless not `mark`), dirty bit first for
        lazy refcounts, the failed state on error, and a flush once the frees it queued pile up
        (copy-on-write and discards both queue them)."""
        s = self._state
        offset = self._check_range(offset, length)
        length = as_index(length, "length")
        with s.lock:
            self._check_writable()
            if length:
                def run() -> None:
                    if mark and self._dirty is not None:
                        self._dirty(offset, length)
                    ordering.mark_dirty_before_lazy_update(s)
                    update(s, offset, length)
                    ordering.release_frees_if_piling(s)
                self._guarded(run)

    def discard(self, offset: int, length: int) -> None:
        """Make the whole clusters of [offset, offset+length) unallocated, so they read through
        to the backing file again (zeros without one) and their host clusters are freed; a range
        ending at the end of the disk covers its partial last cluster (see writing.discard)."""
        self._update_range(offset, length, writing.discard)

    def make_empty(self) -> None:
        """Unmap every cluster, as QEMU 7.2's `bdrv_make_empty` does to an overlay `qemu-img
        commit` has committed: where QEMU rebuilds the image as small as a fresh one
        (`make_completely_empty`: version 3, no snapshots, no external data file), so does this,
        through states that are each consistent on disk (see qcowdisk.qcow2.makeempty);
        elsewhere every cluster is discarded, as QEMU's fallback does (an L2 table for every L1
        entry included; an external data file gets holes where the clusters were, punched
        once the tables no longer name them, as QEMU passes the discards down). When rebuilt,
        unflushed writes are dropped and the truncation becomes durable at the next flush or
        close."""
        s = self._state
        with s.lock:
            self._check_writable()
            if not makeempty.can_empty_completely(s):
                # (QEMU's bdrv_make_empty calls the driver directly: its bitmaps record nothing)
                self._update_range(0, s.virtual_size, makeempty.discard_with_tables, mark=False)
                return

            def run() -> None:
                s.remap_epoch += 1  # every mapping goes: reads in flight outside the lock start over
                makeempty.make_completely_empty(s)
                s.l1 = L1Table(s.host, s.header.l1_table_offset, array("Q", [0]) * s.header.l1_size)
                s.l2_cache = TableCache(s.host, s.l2_cache.codec, s.l2_cache.capacity)
                s.compressed_cache.clear()
                s.metadata_preallocated = None
                s.metadata.clear()
                _attach_refcounts(s)
            self._guarded(run)

    def set_backing_file(self, name: str | None, backing_format: str | None = None, *,
                         open_backing: bool = True) -> None:
        """Store a new backing file name and format in the header (None or "": no backing file)
        with one header switch, after everything written before is durable; nothing is copied
        (`qcowdisk.rebase` copies first), so what unallocated ranges read changes with it.

        The new backing file is opened as the image's backing when `open_backing`. When it is
        not (`open_backing=False`, or it cannot be opened: an unsafe rebase may name a missing
        file), the image is left consistent on disk (dirty bit cleared) and read-only from then
        on, with unallocated ranges reading as zeros: writes would need the backing file, so
        reopen the image to go on.
        """
        s = self._state
        name = name or None
        if name is None:
            backing_format = None
        if name is not None and len(name.encode("utf-8", "surrogateescape")) > 1023:
            raise ValueError(f"backing file name {name!r} is too long")
        with s.lock:
            self._check_writable()
            new_backing: Image | None = None
            if name is not None and open_backing:
                try:
                    new_backing = formats.open_backing(s.filename, name, backing_format, formats.OpenOptions(
                        readonly=True, host_factory=s.host_factory), (os.path.realpath(s.filename),))
                except (OSError, QcowError):
                    new_backing = None
            detached = name is not None and new_backing is None
            try:
                def run() -> None:
                    if detached:
                        self._store_bitmaps()  # read-only from here: stored now, as at close
                    ordering.flush(s, final=detached)
                    fields: dict[str, Any] = {"backing_file": name, "backing_format": backing_format}
                    if detached:
                        fields["incompatible_features"] = s.header.incompatible_features & ~INCOMPAT_DIRTY
                    ordering.switch_header(s, **fields)
                self._guarded(run)
            except BaseException:
                if new_backing is not None:
                    new_backing.close()
                raise
            old, s.backing = s.backing, new_backing
            if detached:
                s.readonly = True  # closing writes nothing more
            if old is not None:
                old.close()

    def allocate(self, offset: int, length: int) -> None:
        """Allocate host space for [offset, offset+length) without changing what it reads.

        Every cluster touching the range gets its own uncompressed host cluster (the data it
        showed, from the backing file, zeros, a compressed or shared cluster, is written into
        it), so later writes there land in place without allocating, and `qemu-img map` shows
        the range as data (crosvm's `FileAllocate`, QEMU's `write -z` without unmap).
        """
        self._update_range(offset, length, writing.allocate)

    def flush(self) -> None:
        """Make everything written so far durable (and the image consistent on disk)."""
        s = self._state
        with s.lock:
            self._check_open()
            if s.readonly:
                return
            self._check_healthy()
            self._guarded(lambda: ordering.flush(s), remaps=False)  # (it raises the epoch when it frees)

    def start_writeback(self) -> None:
        """Start writing the guest data written so far back to the disk, without waiting (see
        `HostFile.start_writeback`): a hint for a bulk writer that flushes at its end, as
        commit, rebase and a synced convert do every few MiB, so the final flush() has less
        left to wait for. It makes nothing durable and orders nothing: only flush() does. A
        host error puts the image in the failed state, as a failed write does."""
        s = self._state
        with s.lock:
            self._check_writable()
            host = s.data_host
        try:  # (outside the lock: the writers go on while the kernel queues the writeback)
            host.start_writeback()
        except OSError as e:
            with s.lock:
                if s.failure is None:
                    s.failure = e
            raise

    def check(self, repair: Repair = None, *, report: Callable[[str], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> CheckResult:
        """Check the image's refcounts and tables as `qemu-img check` does; with `repair="leaks"`
        fix leaked clusters, with `repair="all"` corruptions too (see qcowdisk.qcow2.check).

        Returns qemu-img check's figures (after a repair that fixed something, those of the
        image checked again, with the fixed counts). `report` receives each line qemu-img prints
        on stderr while checking. A repair needs a read-write image; an image with the corrupt or
        dirty bit opens read-write for it with `QcowFile.open_for_check(path, repair=True)`.
        Raises `CheckFailedError` where qemu-img says `Check failed`.

        `progress(done, total)` is called as the check goes (steps: L1 entries walked, refcount
        blocks compared; see qcowdisk.qcow2.checkresult.CheckProgress). An exception raised by
        it stops the check and propagates; a repair stopped so is left between two of its
        ordered steps (what a crash there would leave: leaks at worst), never half-way through
        one. Memory follows the image's metadata (4 bytes per cluster of the file, plus one
        table at a time), never a size field the check has not validated.
        """
        s = self._state
        with s.lock:
            self._check_open()
            if repair is not None:
                self._check_writable()
            else:
                self._check_healthy()
            from .check import check_image
            return self._guarded(lambda: check_image(s, repair, report, progress))

    @classmethod
    def open_for_check(cls, path: str | os.PathLike[str], *, repair: bool = False, backing: bool = True,
                       confine_to: str | os.PathLike[str] | None = None, force_share: bool = False,
                       host_factory: HostFactory | None = None, l2_cache_size: int | None = None,
                       l2_cache_entry_size: int | None = None,
                       tuning: formats.OpenOptions | None = None) -> QcowFile:
        """Open an image to check it, as qemu-img check opens it (BDRV_O_CHECK); `tuning`
        gives the other cache sizes and the backing file's options (`backing_node`).

        With `repair`, the image opens read-write even with the corrupt bit set, and a dirty
        image is not rebuilt at open (the check reports and repairs it); a repair that leaves no
        corruption clears both bits. Without, this is a read-only `open`.
        """
        path = os.fspath(path)
        if force_share and repair:
            raise ValueError("force_share=True cannot be used to repair an image")
        options = (tuning or formats.OpenOptions()).replace(
            readonly=not repair, host_factory=host_factory or HostFile, backing=backing,
            confine_to=None if confine_to is None else os.fspath(confine_to),
            force_share=force_share, l2_cache_size=l2_cache_size,
            l2_cache_entry_size=l2_cache_entry_size, raw_offset=0, raw_size=None)
        return cls._open(path, options, (os.path.realpath(path),), for_check=True)

    # ------------------------------------------------------------------ compressed writes (compressed.py)
    def write_compressed(self, offset: int, data: Buffer) -> int:
        """Write whole clusters of `data` compressed at the cluster-aligned guest `offset`; returns len(data).

        `len(data)` must be a multiple of the cluster size, except for a write that ends at the
        end of the disk (its last cluster is zero-padded before compressing, as QEMU pads it).
        A cluster that compression does not make smaller is stored uncompressed. Unlike QEMU,
        which refuses, an allocated cluster is replaced: the new payload and its refcounts
        before the L2 entry, the old cluster released after a flush. Raises ValueError for a
        misaligned or partial request, UnsupportedFeatureError on an image with an external
        data file (see qcowdisk.qcow2.compressed).
        """
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        offset = self._check_range(offset, n)
        cs = self._state.cluster_size
        step = max(cs, compressed.CHUNK_BYTES // cs * cs)
        for pos in range(0, max(n, 1), step):
            self.write_compressed_clusters(self.compress_clusters(offset + pos, mv[pos:pos + step]))
        return n

    def compress_clusters(self, offset: int, data: Buffer) -> compressed.CompressedClusters:
        """Compress whole clusters of `data` for guest `offset`, as `write_compressed` would,
        without holding the image lock while compressing: threads may compress at once (zlib
        and zstandard release the GIL); `write_compressed_clusters` writes the result. The
        request is checked as `write_compressed` checks it."""
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        s = self._state
        offset = self._check_range(offset, len(mv))
        with s.lock:
            self._check_writable()
            compressed.check_request(s, offset, len(mv))
            compression_type = s.header.compression_type
        payloads = compressed.compress_clusters(mv, s.cluster_size, compression_type)
        return compressed.CompressedClusters(offset, mv, payloads, s.cluster_size, compression_type)

    def write_compressed_clusters(self, clusters: compressed.CompressedClusters) -> None:
        """Write clusters `compress_clusters` compressed (see `write_compressed`)."""
        s = self._state
        offset = self._check_range(clusters.offset, len(clusters.data))
        with s.lock:
            self._check_writable()
            compressed.check_prepared(s, clusters)
            if not clusters.payloads:
                return

            def run() -> None:
                if self._dirty is not None:
                    self._dirty(offset, len(clusters.data))
                ordering.mark_dirty_before_lazy_update(s)
                compressed.write_compressed(s, offset, clusters.data, clusters.payloads)
            self._guarded(run)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Flush, clear the dirty bit on a clean close, release locks and files. Idempotent.

        In the failed state nothing is written: descriptors and the lock are released and
        `ImageFailedError` is raised, since the close cannot be a clean one.
        """
        s = self._state
        with s.lock:
            if s.closed:
                return
            self._fast = None
            s.remap_epoch += 1  # reads in flight outside the lock start over (and find it closed)
            if _in_forked_child(s):  # the parent's image: only our descriptors are ours
                self._release(abandon=True)
                return
            try:
                if not s.readonly and not s.corrupt and s.failure is None:
                    self._guarded(self._close_cleanly)
            finally:
                self._release()
            if s.failure is not None:
                raise self._failed_error()

    def _close_cleanly(self) -> None:
        s = self._state
        self._store_bitmaps()
        ordering.flush(s, final=True)
        if s.header.incompatible_features & INCOMPAT_DIRTY:
            ordering.switch_header(s, incompatible_features=s.header.incompatible_features & ~INCOMPAT_DIRTY)

    def _release(self, abandon: bool = False) -> None:
        s = self._state
        s.closed = True
        _OPEN_STATES.discard(s)
        try:
            if s.backing is not None:
                backing, s.backing = s.backing, None
                if abandon and isinstance(backing, QcowFile):
                    backing._release(abandon=True)
                else:
                    backing.close()
        finally:
            if self._image_lock is not None:
                self._image_lock.release()  # a forked child's release only closes its descriptor
                self._image_lock = None
            _close_files(s)

    def __enter__(self) -> QcowFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except ImageFailedError:
            if exc is None:
                raise  # leaving the block by an exception: keep that one

    def __del__(self) -> None:  # pragma: no cover - best effort for forgotten closes
        try:
            if not self._state.closed:
                self._fast = None
                self._release(abandon=_in_forked_child(self._state))
        except Exception:  # noqa: BLE001 - a finalizer must not raise, even at interpreter shutdown
            pass

    def __repr__(self) -> str:
        s = self._state
        return f"<QcowFile {s.filename!r} size={s.virtual_size} {'ro' if s.readonly else 'rw'}>"

    # ------------------------------------------------------------------ checks and the failed state
    def _check_open(self) -> None:
        if self._state.closed:
            raise ValueError("I/O operation on closed QcowFile")

    def _check_range(self, offset: int, length: int) -> int:
        """The offset as an int after checking the range lies inside the disk."""
        if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
            offset = as_index(offset, "offset")
            length = as_index(length, "length")
        if offset + length > self._state.virtual_size:
            raise ValueError(
                f"write of {length} bytes at offset {offset} goes past the virtual size {self._state.virtual_size}")
        return offset

    def _check_writable(self) -> None:
        self._fast = None  # what a fast read looked up may be about to change (see read_at)
        s = self._state
        if s.closed or s.readonly or s.corrupt or s.failure is not None or s.inherited:  # one test per request
            self._check_open()
            if s.readonly:
                raise ReadOnlyError(f"image {s.filename!r} is open read-only")
            if s.corrupt:
                raise CorruptImageError(f"image {s.filename!r} was marked corrupt; writes are refused")
            self._check_healthy()
            raise ReadOnlyError(f"image {s.filename!r} was opened by the parent process; a forked child may not write it")

    def _check_healthy(self) -> None:
        if self._state.failure is not None:
            raise self._failed_error()

    def _failed_error(self) -> ImageFailedError:
        s = self._state
        first = s.failure
        err = ImageFailedError(
            f"image {s.filename!r} is in the failed state after a host I/O error ({first}); "
            f"writes and flushes are refused and data written since the last successful flush may be lost",
            first)
        err.__cause__ = first
        return err

    def _guarded(self, operation: Callable[[], _T], remaps: bool = True) -> _T:
        """Run a write-side operation; a host error puts the image in the failed state.
        `remaps`: it may free, punch or truncate host ranges some mapping names (see reading.ReadPlan)."""
        self._fast = None  # it may change the mapping (see read_at)
        if remaps:  # reads in flight outside the lock will start over
            self._state.remap_epoch += 1
        try:
            return operation()
        except OSError as e:
            if self._state.failure is None:
                self._state.failure = e
            raise


# ---------------------------------------------------------------------- opening helpers
def _load_state(path: str, host: HostFile, options: formats.OpenOptions, for_check: bool = False) -> Qcow2State:
    """Read and validate the header and tables; the state of an image opened without its chain."""
    file_length = host.size()
    h = _read_header(host, file_length, check_snapshots=not for_check)
    if not options.readonly and h.incompatible_features & INCOMPAT_CORRUPT and not for_check:
        raise CorruptImageError(
            f"image {path!r} has the corrupt bit set (incompatible_features 0x{h.incompatible_features:x}); "
            f"it can only be opened read-only until repaired")
    raw = host.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
    if len(raw) < h.l1_size * 8:
        raise InvalidImageError(f"Active L1 table offset invalid: l1_table_offset 0x{h.l1_table_offset:x} runs past end of file")
    s = Qcow2State(path, options.readonly, host, options.host_factory, h, file_length, decode_u64_table(raw),
                   l2_cache_size=options.l2_cache_size, l2_cache_entry_size=options.l2_cache_entry_size,
                   cache_size=options.cache_size, refcount_cache_size=options.refcount_cache_size)
    if h.nb_snapshots:
        try:
            if for_check:
                validate_snapshot_fields(h)
            buf = host.pread(min(64 << 20, max(0, file_length - h.snapshots_offset)), h.snapshots_offset)
            s.snapshots, s.snapshot_table_length = parse_snapshot_table(
                buf, h.nb_snapshots, h.version, s.cluster_size, file_length, h.snapshots_offset)
        except InvalidImageError as e:
            if not options.readonly and not for_check:
                raise
            # As QEMU: a broken snapshot table does not hide an intact active layer from a
            # reader. `snapshots` raises this error; a writer is refused above.
            s.snapshot_error = e
    _check_l1_tables_vs_refblocks(s)
    if h.has_data_file:
        if options.data_file is not None:
            dpath = options.data_file  # (QEMU's data-file.* options: another file)
        else:
            assert h.data_file is not None
            dpath = formats.resolve_backing_path(path, h.data_file)
        try:
            s.data_host = formats.open_named_file(dpath, not options.readonly, options, "data file", path)
        except OSError as e:
            raise InvalidImageError(f"data file {dpath!r} named by {path!r} cannot be opened: {e.strerror}") from None
        # read-only: an entry past the data file's end is corrupt; read-write: writes extend it
        s.data_file_limit = s.data_host.size() if options.readonly else 1 << 62
    return s


def _read_header(host: HostFile, file_length: int, *, check_snapshots: bool = True) -> Header:
    """The validated header, reading only the start of cluster 0 when that holds all of it.

    The header, its extensions and the backing file name normally fit in the first 4 KiB; a
    chain of 20 images with 2 MiB clusters should not read 40 MiB to open. Parsing a prefix
    either succeeds with exactly what parsing the whole cluster gives (the extension walk and
    the name both stop inside the prefix) or fails, and then the whole cluster is read and
    parsed again, so what is refused, and the message, are as before. Never past cluster 0:
    reading guest data would pull it into the page cache, which changes what SEEK_DATA says
    of unwritten extents (block status).
    """
    head = host.pread(min(file_length, HEADER_PREFIX_BYTES), 0)
    cluster_bits = int.from_bytes(head[20:24], "big") if len(head) >= 24 else 0
    whole = min(file_length, 1 << cluster_bits) if 9 < cluster_bits <= 21 else len(head)
    if whole > len(head):
        try:
            return parse_header(head, file_length, check_snapshots=check_snapshots)
        except InvalidImageError:
            head = host.pread(whole, 0)
    return parse_header(head, file_length, check_snapshots=check_snapshots)


def _check_l1_tables_vs_refblocks(s: Qcow2State) -> None:
    """The active and snapshot L1 tables must not sit on a refcount block (cheap, at open)."""
    h, cs = s.header, s.cluster_size
    raw = s.host.pread(h.refcount_table_clusters * cs, h.refcount_table_offset)
    blocks = {e & REFT_OFFSET_MASK for e in decode_u64_table(raw[:len(raw) // 8 * 8])
              if e and not e & (cs - 1) & REFT_OFFSET_MASK}
    if not blocks:
        return
    tables = [("l1_table_offset", h.l1_table_offset, h.l1_size)]
    tables += [(f"snapshot {snap.id} l1_table_offset", snap.l1_table_offset, snap.l1_size) for snap in s.snapshots]
    for name, offset, size in tables:
        for c in range(offset, offset + size * 8, cs):
            if c // cs * cs in blocks:
                raise InvalidImageError(
                    f"{'Active' if name == 'l1_table_offset' else 'Snapshot'} L1 table offset invalid: "
                    f"{name} 0x{offset:x} overlaps the refcount block at 0x{c // cs * cs:x}")


def _prepare_for_writing(s: Qcow2State, for_check: bool = False) -> None:
    """Set up allocation and ordering; clear unknown autoclear bits; repair a dirty image (unless
    opened `for_check`: the check reports and repairs it)."""
    h = s.header
    rc = _attach_refcounts(s)
    if h.incompatible_features & INCOMPAT_DIRTY and not for_check:
        from .repair import rebuild_refcounts
        rebuild_refcounts(s, rc)
        ordering.flush(s, final=True)
        ordering.switch_header(s, incompatible_features=h.incompatible_features & ~INCOMPAT_DIRTY,
                               autoclear_features=h.autoclear_features & AUTOCLEAR_KNOWN)
    elif h.autoclear_features & ~AUTOCLEAR_KNOWN:
        ordering.switch_header(s, autoclear_features=h.autoclear_features & AUTOCLEAR_KNOWN)


def _attach_refcounts(s: Qcow2State) -> Refcounts:
    """Load the refcount table the header names, find the metadata clusters, and declare the
    write order over the current tables."""
    h = s.header
    collect_metadata(s)

    def switch_reftable(offset: int, clusters: int) -> None:
        ordering.switch_header(s, refcount_table_offset=offset, refcount_table_clusters=clusters)

    rc = Refcounts(s.host, s.cluster_bits, h.refcount_bits, h.refcount_table_offset, h.refcount_table_clusters,
                   lambda: s.alloc_limit, DEFAULT_REFBLOCK_CACHE_BYTES, switch_reftable, s.metadata)
    s.refcounts = rc
    ordering.declare_write_order(s, rc)
    return rc


def _close_files(s: Qcow2State) -> None:
    if s.data_host is not s.host:
        s.data_host.close()
    s.host.close()


def _probe_score(head: bytes) -> int:
    return 2 if head[:4] == b"QFI\xfb" and len(head) >= 8 and int.from_bytes(head[4:8], "big") != 1 else 0


def _open_qcow2(path: str, options: formats.OpenOptions, chain: tuple[str, ...]) -> QcowFile:
    return QcowFile._open(path, options, chain)


formats.register(formats.FormatDriver("qcow2", _probe_score, _open_qcow2))

__all__ = ["QcowFile"]
