"""Read-only reader for legacy QEMU qcow version 1 images (`qemu-img create -f qcow`).

Layout (QEMU block/qcow.c): a 48-byte big-endian header, the backing file name (optional),
one L1 table of u64 L2-table offsets, L2 tables of ``1 << l2_bits`` u64 entries. An L2 entry is

* 0: unallocated -> the backing file, or zeros without one;
* bit 63 clear: host offset of a whole data cluster;
* bit 63 set: a compressed cluster, raw deflate (wbits -12): bits 0..62-cluster_bits hold the
  host byte offset, the next cluster_bits bits the compressed length in bytes.

The file is untrusted: every header field QEMU's qcow_open validates is checked here (more
strictly where QEMU is lenient, e.g. tables past the end of the file), before anything is
allocated or followed on the strength of it. Table entries are checked when a read uses them.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator

from . import formats
from .blockstatus import block_status, locked
from .errors import CorruptImageError, InvalidImageError, ReadOnlyError, UnsupportedFeatureError
from .hostio import HostFile
from .image import Extent, LayerExtent, as_index, fill_zeros
from .locking import ImageLock, lock_image
from .qcow2.entries import TableCodec
from .qcow2.format import Snapshot
from .record import FrozenRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .hostio import Buffer
    from .image import Image

QCOW1_MAGIC = b"QFI\xfb"
QCOW1_VERSION = 1
HEADER_STRUCT = struct.Struct(">4sIQIIQBBHIQ")  # 48 bytes
HEADER_LENGTH = HEADER_STRUCT.size

MIN_CLUSTER_BITS = 9  # QEMU: "Cluster size must be between 512 and 64k"
MAX_CLUSTER_BITS = 16
MIN_L2_BITS = 6  # QEMU: "L2 table size must be between 512 and 64k" (8-byte entries)
MAX_L2_BITS = 13
MIN_SIZE = 2  # QEMU: "Image size is too small (must be at least 2 bytes)"
MAX_SIZE = (1 << 63) - 1  # QEMU keeps the length in an int64
MAX_BACKING_NAME_LENGTH = 1023
MAX_L1_BYTES = 32 * 1024 * 1024  # same bound as qcow2's active L1 table
SECTOR_SIZE = 512

CRYPT_NONE = 0
CRYPT_AES = 1

COMPRESSED_FLAG = 1 << 63
L2_CACHE_TABLES = 16  # QEMU's L2_CACHE_SIZE

# Run kinds for the read path.
_UNALLOCATED = 0
_DATA = 1


class Qcow1Header(FrozenRecord):
    """The parsed qcow v1 header (field names as in QEMU's QCowHeader)."""

    __slots__ = ("backing_file_offset", "backing_file_size", "cluster_bits", "crypt_method", "l1_table_offset",
                 "l2_bits", "mtime", "size", "version")
    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    crypt_method: int
    l1_table_offset: int

    def __init__(self, version: int, backing_file_offset: int, backing_file_size: int, mtime: int, size: int,
                 cluster_bits: int, l2_bits: int, crypt_method: int, l1_table_offset: int) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "version", version)
        setattr_(self, "backing_file_offset", backing_file_offset)
        setattr_(self, "backing_file_size", backing_file_size)
        setattr_(self, "mtime", mtime)
        setattr_(self, "size", size)
        setattr_(self, "cluster_bits", cluster_bits)
        setattr_(self, "l2_bits", l2_bits)
        setattr_(self, "crypt_method", crypt_method)
        setattr_(self, "l1_table_offset", l1_table_offset)


    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def l1_size(self) -> int:
        """Number of L1 entries needed to map `size` bytes."""
        shift = self.cluster_bits + self.l2_bits
        return (self.size + (1 << shift) - 1) >> shift


def parse_header(data: bytes, file_size: int, filename: str = "<image>") -> Qcow1Header:
    """Parse and validate a qcow v1 header against the host file's size.

    Raises InvalidImageError / CorruptImageError / UnsupportedFeatureError naming the field,
    its value and the limit. Nothing here allocates on the word of a field.
    """
    short = len(data) < HEADER_LENGTH or file_size < HEADER_LENGTH
    if short and data[:4] != QCOW1_MAGIC:  # (QEMU reads a short header as zero-padded: no magic)
        raise InvalidImageError(f"Image not in qcow format ({filename}: file size {file_size} is shorter "
                                f"than the {HEADER_LENGTH}-byte qcow header)")
    if short:
        raise InvalidImageError(
            f"{filename}: file size {file_size} is shorter than the {HEADER_LENGTH}-byte qcow header")
    (magic, version, backing_file_offset, backing_file_size, mtime, size, cluster_bits,
     l2_bits, _padding, crypt_method, l1_table_offset) = HEADER_STRUCT.unpack_from(data, 0)
    if magic != QCOW1_MAGIC:
        raise InvalidImageError(f"Image not in qcow format ({filename}: magic {magic!r}, expected {QCOW1_MAGIC!r})")
    if version != QCOW1_VERSION:
        raise InvalidImageError(f"qcow (v1) does not support qcow version {version} ({filename}: must be "
                                f"{QCOW1_VERSION}; try the qcow2 format)")
    if size < MIN_SIZE:
        raise InvalidImageError(f"{filename}: size {size} is too small (must be at least {MIN_SIZE} bytes)")
    if size > MAX_SIZE:
        raise InvalidImageError(f"{filename}: size {size} is too large (limit {MAX_SIZE})")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidImageError(
            f"{filename}: cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
            " (cluster size must be between 512 and 64k)")
    if not MIN_L2_BITS <= l2_bits <= MAX_L2_BITS:
        raise InvalidImageError(
            f"{filename}: l2_bits {l2_bits} out of range {MIN_L2_BITS}..{MAX_L2_BITS}"
            " (L2 table size must be between 512 and 64k)")
    if crypt_method != CRYPT_NONE:
        what = "AES encryption" if crypt_method == CRYPT_AES else "unknown encryption method"
        raise UnsupportedFeatureError(
            f"{filename}: crypt_method {crypt_method} ({what}) is not supported (only {CRYPT_NONE}, none)")
    header = Qcow1Header(version, backing_file_offset, backing_file_size, mtime, size,
                         cluster_bits, l2_bits, crypt_method, l1_table_offset)
    l1_bytes = header.l1_size * 8
    if l1_bytes > MAX_L1_BYTES:
        raise InvalidImageError(
            f"{filename}: L1 table of {header.l1_size} entries ({l1_bytes} bytes) for size {size}"
            f" exceeds the limit of {MAX_L1_BYTES} bytes")
    if l1_table_offset < HEADER_LENGTH:
        raise CorruptImageError(
            f"{filename}: l1_table_offset {l1_table_offset:#x} overlaps the {HEADER_LENGTH}-byte header")
    if l1_table_offset + l1_bytes > file_size:
        raise CorruptImageError(
            f"{filename}: l1_table_offset {l1_table_offset:#x} + {l1_bytes} bytes of L1 table"
            f" runs past the end of the file (size {file_size})")
    if backing_file_offset != 0:
        if backing_file_size > MAX_BACKING_NAME_LENGTH:
            raise InvalidImageError(
                f"{filename}: backing_file_size {backing_file_size} is too long"
                f" (limit {MAX_BACKING_NAME_LENGTH} bytes)")
        if backing_file_offset < HEADER_LENGTH:
            raise CorruptImageError(
                f"{filename}: backing_file_offset {backing_file_offset:#x} overlaps the"
                f" {HEADER_LENGTH}-byte header")
        if backing_file_offset + backing_file_size > file_size:
            raise CorruptImageError(
                f"{filename}: backing_file_offset {backing_file_offset:#x} + backing_file_size"
                f" {backing_file_size} runs past the end of the file (size {file_size})")
    return header


class Qcow1File:
    """A qcow version 1 image, opened read-only. Thread-safe (one lock per image)."""

    format_name = "qcow"
    readonly = True

    def __init__(self) -> None:  # use Qcow1File.open
        self.filename = ""
        self.header: Qcow1Header | None = None
        self.virtual_size = 0
        self.cluster_size = 0
        self.backing: Image | None = None
        self.backing_file: str | None = None
        self.backing_format: str | None = None  # qcow v1 never records one; it is probed
        self._host: HostFile | None = None
        self._file_size = 0
        self._l1: array[int] = array("Q")
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._zcache_entry = -1  # L2 entry whose decompressed cluster is in _zcache
        self._zcache = b""
        self._lock = threading.Lock()
        self._image_lock: ImageLock | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = True, backing: bool = True,
             confine_to: str | os.PathLike[str] | None = None, force_share: bool = False,
             max_nesting_depth: int = formats.DEFAULT_MAX_NESTING_DEPTH,
             host_factory: Callable[[str, bool], HostFile] | None = None) -> Qcow1File:
        """Open a qcow v1 image and its backing chain (options as `QcowFile.open`).

        `readonly=False` raises ReadOnlyError: qcow v1 images are read here, never written.
        """
        path = os.fspath(path)
        options = formats.OpenOptions(readonly=readonly, max_nesting_depth=max_nesting_depth,
                                      host_factory=host_factory or HostFile, backing=backing,
                                      confine_to=None if confine_to is None else os.fspath(confine_to),
                                      force_share=force_share)
        return cls._open(path, options, (os.path.realpath(path),))

    @classmethod
    def _open(cls, path: str, options: formats.OpenOptions, chain: tuple[str, ...]) -> Qcow1File:
        if not options.readonly:
            raise ReadOnlyError(f"qcow v1 image {path!r}: qcow v1 images are supported read-only")
        self = cls()
        self.filename = path
        if len(chain) > 1:  # a backing file: named by the image above, so confined
            self._host = formats.open_named_file(path, False, options, "backing file", chain[-2])
        else:
            self._host = options.host_factory(path, False)
        try:
            if not options.force_share:  # a reader's locks, as QEMU takes them for any image
                self._image_lock = lock_image(self._host.fd, path, write=options.write_lock)
            self._load(path, options, chain)
        except BaseException:
            self.close()
            raise
        return self

    def _load(self, path: str, options: formats.OpenOptions, chain: tuple[str, ...]) -> None:
        host = self._host
        assert host is not None
        self._file_size = host.size()
        header = parse_header(host.pread(HEADER_LENGTH, 0), self._file_size, path)
        self.header = header
        self.cluster_size = header.cluster_size
        # QEMU sees whole sectors only: total_sectors = size / 512.
        self.virtual_size = header.size // SECTOR_SIZE * SECTOR_SIZE
        self._cluster_bits = header.cluster_bits
        self._l2_bits = header.l2_bits
        self._l2_entries = 1 << header.l2_bits
        self._offset_mask = (1 << (63 - header.cluster_bits)) - 1
        l1_bytes = header.l1_size * 8
        data = host.pread(l1_bytes, header.l1_table_offset)
        if len(data) != l1_bytes:  # the file shrank under us
            raise CorruptImageError(f"{path}: L1 table at {header.l1_table_offset:#x}: short read"
                                    f" ({len(data)} of {l1_bytes} bytes)")
        self._l1 = TableCodec(64, len(data)).decode(data)

        if header.backing_file_offset != 0 and header.backing_file_size:
            raw = host.pread(header.backing_file_size, header.backing_file_offset)
            if len(raw) != header.backing_file_size:
                raise CorruptImageError(f"{path}: backing file name at {header.backing_file_offset:#x}:"
                                        f" short read ({len(raw)} of {header.backing_file_size} bytes)")
            raw = raw.split(b"\0", 1)[0]  # QEMU reads it as a C string
            if raw:
                self.backing_file = os.fsdecode(raw)
        if self.backing_file is not None and options.backing:
            self.backing = formats.open_backing(self.filename, self.backing_file, None, options, chain)

    # --- public read API -------------------------------------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at guest `offset`, clipped at virtual_size."""
        offset = as_index(offset, "offset")
        length = as_index(length, "length")
        n = max(0, min(length, self.virtual_size - offset))
        buf = bytearray(n)
        if n:
            self.readinto_at(buf, offset)
        return bytes(buf)

    def readinto_at(self, buffer: Buffer, offset: int) -> int:
        """Fill writable `buffer` from guest `offset`; returns bytes read (short only at the end)."""
        offset = as_index(offset, "offset")
        mv = memoryview(buffer)
        if mv.readonly:
            raise TypeError("readinto_at() needs a writable buffer, not a read-only one")
        mv = mv.cast("B")
        with self._lock:
            if self._host is None:
                raise ValueError(f"{self.filename}: I/O on a closed image")
            n = max(0, min(len(mv), self.virtual_size - offset))
            if n:
                self._read_into(mv[:n], offset)
            return n

    def write_at(self, offset: int, data: Buffer) -> int:
        """Refused: qcow v1 images are read-only here."""
        raise ReadOnlyError(f"qcow v1 image {self.filename!r}: qcow v1 images are supported read-only")

    def write_zeroes(self, offset: int, length: int) -> None:
        """Refused: qcow v1 images are read-only here."""
        self.write_at(offset, b"")

    def punch_hole(self, offset: int, length: int) -> None:
        """Refused: qcow v1 images are read-only here."""
        self.write_at(offset, b"")

    def flush(self) -> None:
        """Nothing to flush on a read-only image."""

    @property
    def closed(self) -> bool:
        """Whether `close()` has run."""
        return self._host is None

    @property
    def snapshots(self) -> list[Snapshot]:
        """Always empty: qcow v1 has no internal snapshots."""
        return []

    def __len__(self) -> int:
        """The virtual size."""
        return self.virtual_size

    def close(self) -> None:
        """Close the image and its backing chain (idempotent)."""
        backing, self.backing = self.backing, None
        host, self._host = self._host, None
        image_lock, self._image_lock = self._image_lock, None
        try:
            if backing is not None:
                backing.close()
        finally:
            if image_lock is not None:
                image_lock.release()
            if host is not None:
                host.close()
            self._l2_cache.clear()
            self._zcache = b""
            self._zcache_entry = -1

    def __enter__(self) -> Qcow1File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Qcow1File({self.filename!r}, virtual_size={self.virtual_size})"

    # --- internals -------------------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> array[int] | None:
        """The L2 table for one L1 entry (validated, LRU-cached), or None if unallocated."""
        l2_offset = self._l1[l1_index]
        if l2_offset == 0:
            return None
        table = self._l2_cache.get(l2_offset)
        if table is not None:
            self._l2_cache.move_to_end(l2_offset)
            return table
        l2_bytes = self._l2_entries * 8
        if l2_offset & (self.cluster_size - 1):
            raise CorruptImageError(
                f"{self.filename}: L2 table offset {l2_offset:#x} (L1 index {l1_index}) is not aligned"
                f" to the cluster size {self.cluster_size}")
        if l2_offset + l2_bytes > self._file_size:
            raise CorruptImageError(
                f"{self.filename}: L2 table offset {l2_offset:#x} (L1 index {l1_index}) + {l2_bytes} bytes"
                f" runs past the end of the file (size {self._file_size})")
        assert self._host is not None
        data = self._host.pread(l2_bytes, l2_offset)
        if len(data) != l2_bytes:
            raise CorruptImageError(f"{self.filename}: L2 table at {l2_offset:#x}: short read"
                                    f" ({len(data)} of {l2_bytes} bytes)")
        table = TableCodec(64, len(data)).decode(data)
        self._l2_cache[l2_offset] = table
        if len(self._l2_cache) > L2_CACHE_TABLES:
            self._l2_cache.popitem(last=False)
        return table

    def _read_into(self, mv: memoryview, offset: int) -> None:
        """Fill all of `mv` (already clipped to virtual_size) from guest `offset`.

        Adjacent clusters of the same kind are merged into runs: host-contiguous data clusters
        become one preadv, unallocated ones one backing read or zero fill.
        """
        cs = self.cluster_size
        cmask = cs - 1
        cbits = self._cluster_bits
        span_bits = cbits + self._l2_bits
        l2_mask = self._l2_entries - 1
        file_size = self._file_size
        n = len(mv)
        pos = 0
        run_kind = -1
        run_pos = run_len = run_host = 0
        while pos < n:
            guest = offset + pos
            l1_index = guest >> span_bits
            span_end = min(n, ((l1_index + 1) << span_bits) - offset)
            table = self._l2_table(l1_index)
            if table is None:
                if run_kind == _UNALLOCATED:
                    run_len += span_end - pos
                else:
                    self._flush(run_kind, mv, run_pos, run_len, run_host, offset)
                    run_kind, run_pos, run_len = _UNALLOCATED, pos, span_end - pos
                pos = span_end
                continue
            idx = (guest >> cbits) & l2_mask
            while pos < span_end:
                inc = (offset + pos) & cmask
                chunk = min(cs - inc, span_end - pos)
                entry = table[idx]
                idx += 1
                if entry == 0:
                    if run_kind == _UNALLOCATED:
                        run_len += chunk
                    else:
                        self._flush(run_kind, mv, run_pos, run_len, run_host, offset)
                        run_kind, run_pos, run_len = _UNALLOCATED, pos, chunk
                elif entry & COMPRESSED_FLAG:
                    self._flush(run_kind, mv, run_pos, run_len, run_host, offset)
                    run_kind = -1
                    data = self._decompress(entry, offset + pos)
                    mv[pos:pos + chunk] = data[inc:inc + chunk]
                else:
                    if entry & cmask:
                        raise CorruptImageError(
                            f"{self.filename}: data cluster offset {entry:#x} for guest offset"
                            f" {offset + pos - inc:#x} is not aligned to the cluster size {cs}")
                    if entry + cs > file_size:
                        raise CorruptImageError(
                            f"{self.filename}: data cluster offset {entry:#x} for guest offset"
                            f" {offset + pos - inc:#x} runs past the end of the file (size {file_size})")
                    host = entry + inc
                    if run_kind == _DATA and host == run_host + run_len:
                        run_len += chunk
                    else:
                        self._flush(run_kind, mv, run_pos, run_len, run_host, offset)
                        run_kind, run_pos, run_len, run_host = _DATA, pos, chunk, host
                pos += chunk
        self._flush(run_kind, mv, run_pos, run_len, run_host, offset)

    def _flush(self, kind: int, mv: memoryview, pos: int, length: int, host: int, offset: int) -> None:
        """Complete one run: mv[pos:pos+length] maps guest offset+pos."""
        if kind == _DATA:
            assert self._host is not None
            got = self._host.preadv([mv[pos:pos + length]], host)
            if got != length:
                raise CorruptImageError(f"{self.filename}: data at host offset {host:#x}: short read"
                                        f" ({got} of {length} bytes; file truncated?)")
        elif kind == _UNALLOCATED:
            guest = offset + pos
            done = 0
            backing = self.backing
            if backing is not None and guest < backing.virtual_size:
                want = min(length, backing.virtual_size - guest)
                done = backing.readinto_at(mv[pos:pos + want], guest)
            # zeros past the backing file's end (valid) or with no backing file
            fill_zeros(mv, pos + done, pos + length)

    def _decompress(self, entry: int, guest: int) -> bytes:
        """The cluster_size bytes of one compressed cluster (last one cached, as QEMU does)."""
        if entry == self._zcache_entry:
            return self._zcache
        cs = self.cluster_size
        coffset = entry & self._offset_mask
        csize = (entry >> (63 - self._cluster_bits)) & (cs - 1)
        where = f"{self.filename}: compressed cluster for guest offset {guest & ~(cs - 1):#x}"
        if csize == 0:
            raise CorruptImageError(f"{where}: compressed size 0 (entry {entry:#x})")
        if coffset + csize > self._file_size:
            raise CorruptImageError(f"{where}: offset {coffset:#x} + size {csize} runs past the end"
                                    f" of the file (size {self._file_size})")
        assert self._host is not None
        payload = self._host.pread(csize, coffset)
        if len(payload) != csize:
            raise CorruptImageError(f"{where}: short read ({len(payload)} of {csize} bytes)")
        d = zlib.decompressobj(-12)
        try:
            out = d.decompress(payload, cs)  # bounded: never more than one cluster
            # anything still to come means the stream inflates past one cluster
            extra = b"" if d.eof else d.decompress(d.unconsumed_tail, 1)
        except zlib.error as e:
            raise CorruptImageError(f"{where}: deflate payload at {coffset:#x} is invalid: {e}") from None
        if len(out) != cs or extra:
            size = f"more than {cs}" if extra else str(len(out))
            raise CorruptImageError(f"{where}: payload at {coffset:#x} inflates to {size} bytes,"
                                    f" not the cluster size {cs}")
        self._zcache_entry, self._zcache = entry, out
        return out

    # --- block status ----------------------------------------------------------------------

    def layer_status(self, guest_offset: int, length: int) -> list[LayerExtent]:
        """What this qcow layer alone says about [guest_offset, +length) (QEMU's qcow_co_block_status).

        Per cluster: an entry of 0 (or no L2 table) is unallocated; a compressed cluster is
        data without a host offset; any other entry is data at entry + offset in cluster, in
        this image's file. Host holes are never consulted. Adjacent runs of one kind (data
        host-contiguously) come as one. Expects the caller to hold the image lock.
        """
        cbits = self._cluster_bits
        cmask = self.cluster_size - 1
        span_bits = cbits + self._l2_bits
        l2_mask = self._l2_entries - 1
        out: list[LayerExtent] = []
        kind = -1  # of the last run: 0 unallocated, 1 data, 2 compressed
        run_len = run_host = 0
        pos, end = guest_offset, guest_offset + length
        while pos < end:
            table = self._l2_table(pos >> span_bits) if (pos >> span_bits) < len(self._l1) else None
            if table is None:
                k, n, host = 0, min(end, ((pos >> span_bits) + 1) << span_bits) - pos, 0
            else:
                n = min(cmask + 1 - (pos & cmask), end - pos)
                entry = table[(pos >> cbits) & l2_mask]
                k, host = (0, 0) if entry == 0 else (2, 0) if entry & COMPRESSED_FLAG else (1, entry + (pos & cmask))
            if k == kind and (k != 1 or run_host + run_len == host):
                run_len += n
            else:
                if kind >= 0:
                    out.append(self._layer_extent(kind, run_len, run_host))
                kind, run_len, run_host = k, n, host
            pos += n
        if kind >= 0:
            out.append(self._layer_extent(kind, run_len, run_host))
        return out

    def _layer_extent(self, kind: int, length: int, host: int) -> LayerExtent:
        if kind == 1:
            return LayerExtent(length, True, False, True, host, False, self.filename)
        return LayerExtent(length, kind == 2, False, kind == 2, None, kind == 2)

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents of [offset, offset + length), as `qemu-img map` reports them.

        Takes the image lock around each batch of extents, never across a yield.
        """

        def check_open() -> None:
            if self._host is None:
                raise ValueError(f"{self.filename}: I/O on a closed image")

        offset = as_index(offset, "offset")
        if length is not None:
            length = as_index(length, "length")
        with self._lock:
            check_open()
            extents = block_status(self, offset, length)
        return locked(extents, self._lock, check_open)


def probe(data: bytes) -> bool:
    """True when `data` (the first bytes of a file) starts with a qcow v1 header."""
    return len(data) >= HEADER_LENGTH and data[:4] == QCOW1_MAGIC and \
        struct.unpack_from(">I", data, 4)[0] == QCOW1_VERSION


def _probe_score(head: bytes) -> int:
    return 2 if probe(head) else 0


def _open_qcow1(path: str, options: formats.OpenOptions, chain: tuple[str, ...]) -> Qcow1File:
    return Qcow1File._open(path, options, chain)


formats.register(formats.FormatDriver("qcow", _probe_score, _open_qcow1))
