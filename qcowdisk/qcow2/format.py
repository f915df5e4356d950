"""qcow2 on-disk format: constants, the header and its extensions, entry masks, snapshot entries.

Bytes in, plain values out, and back. No file I/O here: callers read the bytes and hand them
over, so every check on an untrusted field happens in one place before anything follows it.
Names follow QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import struct

from ..errors import InvalidImageError, UnsupportedFeatureError
from ..record import FrozenRecord, Record

TYPE_CHECKING = False
if TYPE_CHECKING:  # (datetime is imported where a snapshot's date is decoded)
    from datetime import datetime

QCOW_MAGIC = b"QFI\xfb"

HEADER_V2_STRUCT = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3_STRUCT = struct.Struct(">QQQII")  # bytes 72..103
HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104
HEADER_V3_LENGTH = 112  # what QEMU 7.2 writes: one compression_type byte + 7 padding

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_BACKING_NAME_LENGTH = 1023
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA = 1024
MAX_HOST_OFFSET = 1 << 56
INT64_MAX = (1 << 63) - 1
BDRV_MAX_LENGTH = INT64_MAX & ~((1 << 30) - 1)  # QEMU's limit on any image length and request end
MAX_BACKING_FORMAT_LENGTH = 15

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXT_STRUCT = struct.Struct(">II")

SNAPSHOT_HEADER_STRUCT = struct.Struct(">QIHHIIQII")  # 40 bytes
SNAPSHOT_EXTRA_STRUCT = struct.Struct(">QQQ")  # vm_state_size_large, disk_size, icount
BITMAPS_EXT_STRUCT = struct.Struct(">IIQQ")
CRYPTO_EXT_STRUCT = struct.Struct(">QQ")
FEATURE_ENTRY_STRUCT = struct.Struct(">BB46s")

_FEATURE_KIND_NAMES = {0: "incompatible", 1: "compatible", 2: "autoclear"}
_KNOWN_FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
    (1, 0): "lazy refcounts",
    (2, 0): "bitmaps",
    (2, 1): "raw external data",
}


def align_up(value: int, alignment: int) -> int:
    """Round value up to a multiple of alignment (a power of two or any positive int)."""
    return (value + alignment - 1) // alignment * alignment


def _pad8(length: int) -> int:
    return align_up(length, 8)


class HeaderExtension(Record):
    """One header extension record, kept verbatim so unknown ones survive a rewrite."""

    __slots__ = ("data", "ext_type")
    ext_type: int
    data: bytes

    def __init__(self, ext_type: int, data: bytes) -> None:
        self.ext_type = ext_type
        self.data = data


class Header(Record):
    """The decoded qcow2 header plus its extensions. Every field has been range-checked."""

    __slots__ = (
        "autoclear_features",
        "backing_file",
        "backing_file_offset",
        "backing_file_size",
        "backing_format",
        "cluster_bits",
        "compatible_features",
        "compression_type",
        "crypt_method",
        "data_file",
        "extensions",
        "extra_header",
        "feature_names",
        "header_length",
        "incompatible_features",
        "l1_size",
        "l1_table_offset",
        "nb_snapshots",
        "refcount_order",
        "refcount_table_clusters",
        "refcount_table_offset",
        "size",
        "snapshots_offset",
        "version",
    )
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    extra_header: bytes  # header fields beyond those known (bytes 112..header_length)
    extensions: list[HeaderExtension]
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    feature_names: dict[tuple[int, int], str]

    def __init__(self, version: int, backing_file_offset: int, backing_file_size: int, cluster_bits: int,
                 size: int, crypt_method: int, l1_size: int, l1_table_offset: int, refcount_table_offset: int,
                 refcount_table_clusters: int, nb_snapshots: int, snapshots_offset: int,
                 incompatible_features: int = 0, compatible_features: int = 0, autoclear_features: int = 0,
                 refcount_order: int = 4, header_length: int = HEADER_V3_LENGTH,
                 compression_type: int = COMPRESSION_ZLIB, extra_header: bytes = b"",
                 extensions: list[HeaderExtension] | None = None, backing_file: str | None = None,
                 backing_format: str | None = None, data_file: str | None = None,
                 feature_names: dict[tuple[int, int], str] | None = None) -> None:
        self.version = version
        self.backing_file_offset = backing_file_offset
        self.backing_file_size = backing_file_size
        self.cluster_bits = cluster_bits
        self.size = size
        self.crypt_method = crypt_method
        self.l1_size = l1_size
        self.l1_table_offset = l1_table_offset
        self.refcount_table_offset = refcount_table_offset
        self.refcount_table_clusters = refcount_table_clusters
        self.nb_snapshots = nb_snapshots
        self.snapshots_offset = snapshots_offset
        self.incompatible_features = incompatible_features
        self.compatible_features = compatible_features
        self.autoclear_features = autoclear_features
        self.refcount_order = refcount_order
        self.header_length = header_length
        self.compression_type = compression_type
        self.extra_header = extra_header
        self.extensions = [] if extensions is None else extensions
        self.backing_file = backing_file
        self.backing_format = backing_format
        self.data_file = data_file
        self.feature_names = {} if feature_names is None else feature_names

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """Whether L2 entries are 128-bit with subcluster bitmaps."""
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry: 8, or 16 with extended L2."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries in one L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self) -> int:
        """Width of one refcount entry in bits."""
        return 1 << self.refcount_order

    @property
    def has_data_file(self) -> bool:
        """Whether guest data lives in an external data file."""
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        """Whether the external data file is a valid raw image of the guest disk."""
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    def feature_name(self, kind: int, bit: int) -> str:
        """Human name of a feature bit: from the image's feature table, else QEMU's, else hex."""
        name = self.feature_names.get((kind, bit)) or _KNOWN_FEATURE_NAMES.get((kind, bit))
        if name:
            return name
        return f"Unknown {_FEATURE_KIND_NAMES[kind]} feature: {1 << bit:016x}"


def min_l1_size(size: int, cluster_bits: int, l2_entries: int) -> int:
    """L1 entries needed to map `size` bytes."""
    span = (1 << cluster_bits) * l2_entries
    return (size + span - 1) // span


def parse_header(buf: bytes, file_length: int, *, check_snapshots: bool = True) -> Header:
    """Decode and validate a qcow2 header.

    `buf` holds the start of the file, at least one cluster of it or the whole file if shorter;
    `file_length` is the host file's length. Raises InvalidImageError/UnsupportedFeatureError
    naming the field, value and limit for anything out of range. Without `check_snapshots`
    the snapshot table fields are left to `validate_snapshot_fields`.
    """
    if len(buf) < HEADER_V2_LENGTH:
        if buf[:4] != QCOW_MAGIC:
            raise InvalidImageError("Image is not in qcow2 format (magic missing)")
        raise InvalidImageError(f"qcow2 header truncated: file holds {len(buf)} bytes, header needs {HEADER_V2_LENGTH}")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
     l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
     snapshots_offset) = HEADER_V2_STRUCT.unpack_from(buf, 0)
    if magic != QCOW_MAGIC:
        raise InvalidImageError(f"Image is not in qcow2 format (magic {magic!r}, expected {QCOW_MAGIC!r})")
    if version == 1:
        raise UnsupportedFeatureError(
            "Unsupported qcow2 version 1 (supported: 2, 3): version 1 is the legacy qcow format; "
            "open it read-only with qcowdisk.qcow1.Qcow1File")
    if version not in (2, 3):
        raise UnsupportedFeatureError(f"Unsupported qcow2 version {version} (supported: 2, 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InvalidImageError(
            f"Unsupported cluster size: cluster_bits {cluster_bits} (2^{cluster_bits}); "
            f"must be {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits
    h = Header(version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
               l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters,
               nb_snapshots, snapshots_offset)
    if version == 2:
        h.header_length = HEADER_V2_LENGTH
        h.refcount_order = 4
    else:
        if len(buf) < HEADER_V3_MIN_LENGTH:
            raise InvalidImageError(
                f"qcow2 header truncated: file holds {len(buf)} bytes, v3 header needs {HEADER_V3_MIN_LENGTH}")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = HEADER_V3_STRUCT.unpack_from(buf, HEADER_V2_LENGTH)
        if h.header_length < HEADER_V3_MIN_LENGTH:
            raise InvalidImageError(f"qcow2 header too short: header_length {h.header_length} < {HEADER_V3_MIN_LENGTH}")
        if h.header_length % 8:
            raise InvalidImageError(f"qcow2 header_length {h.header_length} is not a multiple of 8")
        if h.header_length > cluster_size:
            raise InvalidImageError(
                f"qcow2 header exceeds cluster size: header_length {h.header_length} > cluster size {cluster_size}")
        if h.header_length > len(buf):
            raise InvalidImageError(
                f"qcow2 header truncated: header_length {h.header_length}, file holds {len(buf)} bytes")
        if h.header_length > 104:
            h.compression_type = buf[104]
        if h.header_length > HEADER_V3_LENGTH:
            h.extra_header = bytes(buf[HEADER_V3_LENGTH:h.header_length])
    if h.refcount_order > 6:
        raise InvalidImageError(
            f"Reference count entry width too large: refcount_order {h.refcount_order}; may not exceed 6 (64 bits)")

    # Extensions come first: the feature-name table makes the unknown-feature error readable.
    _parse_extensions(h, buf, file_length)

    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = [h.feature_name(0, bit) for bit in range(64) if unknown >> bit & 1]
        raise UnsupportedFeatureError(
            f"Unsupported qcow2 feature(s): incompatible_features 0x{h.incompatible_features:x}: " + ", ".join(names))
    if crypt_method in (CRYPT_AES, CRYPT_LUKS):
        kind = "AES" if crypt_method == CRYPT_AES else "LUKS"
        raise UnsupportedFeatureError(f"Unsupported encryption: crypt_method {crypt_method} ({kind}) is not supported")
    if crypt_method != CRYPT_NONE:
        raise UnsupportedFeatureError(f"Unsupported encryption method {crypt_method} (known: 0 none, 1 AES, 2 LUKS)")
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(f"unknown compression type: compression_type {h.compression_type} (known: 0 zlib, 1 zstd)")
    has_bit = bool(h.incompatible_features & INCOMPAT_COMPRESSION)
    if has_bit != (h.compression_type != COMPRESSION_ZLIB):
        raise InvalidImageError(
            f"Compression type incompatible feature bit must be set exactly when compression_type != 0 "
            f"(compression_type {h.compression_type}, bit {'set' if has_bit else 'clear'})")
    if h.extended_l2 and cluster_bits < 14:
        raise InvalidImageError(
            f"Unsupported subcluster size: extended L2 needs cluster_bits >= 14, image has {cluster_bits}")
    if h.has_data_file and h.data_file is None:
        raise InvalidImageError(
            "'data-file' is required for this image: external data file bit set without a data file name extension")
    if h.data_file_raw and not h.has_data_file:
        raise InvalidImageError("data-file-raw autoclear bit set without the external data file bit")
    if size >= 1 << 63:
        raise InvalidImageError(f"virtual size {size} too large (limit 2^63)")

    # Backing file name
    if backing_file_offset:
        if backing_file_size > MAX_BACKING_NAME_LENGTH:
            raise InvalidImageError(
                f"Backing file name too long: backing_file_size {backing_file_size} > {MAX_BACKING_NAME_LENGTH}")
        if backing_file_offset + backing_file_size > cluster_size:
            raise InvalidImageError(
                f"Invalid backing file offset: backing_file_offset {backing_file_offset} + size "
                f"{backing_file_size} lies outside cluster 0 ({cluster_size} bytes)")
        if backing_file_offset + backing_file_size > len(buf):
            raise InvalidImageError(
                f"Invalid backing file offset: backing_file_offset {backing_file_offset} past end of file ({len(buf)})")
        raw = bytes(buf[backing_file_offset:backing_file_offset + backing_file_size])
        # QEMU reads the name as a C string: it ends at the first NUL (empty: no backing file).
        h.backing_file = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") or None

    _check_table_fields(h, file_length, check_snapshots)
    # QEMU sees whole sectors only (bs->total_sectors = size / BDRV_SECTOR_SIZE).
    h.size -= h.size % 512
    return h


def _parse_extensions(h: Header, buf: bytes, file_length: int) -> None:
    start = HEADER_V2_LENGTH if h.version == 2 else h.header_length
    end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    end = min(end, h.cluster_size)
    if h.backing_file_offset and h.backing_file_offset < start:
        raise InvalidImageError(
            f"Invalid backing file offset: backing_file_offset {h.backing_file_offset} lies inside the header (< {start})")
    pos = start
    seen: set[int] = set()
    while pos < end:
        if pos + EXT_STRUCT.size > end:
            raise InvalidImageError(f"Header extension too large: extension header at {pos} runs past {end}")
        if pos + EXT_STRUCT.size > len(buf):
            raise InvalidImageError(
                f"Header extension area truncated: extension header at {pos} but the file ends at {len(buf)}")
        ext_type, length = EXT_STRUCT.unpack_from(buf, pos)
        pos += EXT_STRUCT.size
        if ext_type == EXT_END:
            break
        if pos + length > end:
            raise InvalidImageError(
                f"Header extension too large: extension 0x{ext_type:08x} length {length} at {pos} runs past "
                f"cluster 0 / the backing file name (limit {end})")
        if pos + length > len(buf):
            raise InvalidImageError(
                f"Header extension truncated: extension 0x{ext_type:08x} length {length} at {pos} but the file "
                f"ends at {len(buf)}")
        data = bytes(buf[pos:pos + length])
        pos += _pad8(length)
        if ext_type in seen:
            raise InvalidImageError(f"Header extension 0x{ext_type:08x} appears more than once")
        seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT_LENGTH:
                raise InvalidImageError(
                    f"ext_backing_format: len={length} too large (limit {MAX_BACKING_FORMAT_LENGTH})")
            h.backing_format = data.decode("ascii", "replace")
        elif ext_type == EXT_DATA_FILE:
            if length == 0 or length > MAX_BACKING_NAME_LENGTH:
                raise InvalidImageError(f"data file name extension: length {length} out of range 1..{MAX_BACKING_NAME_LENGTH}")
            # A C string to QEMU (g_strndup): cut at the first NUL; empty means no name.
            h.data_file = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") or None
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(length // FEATURE_ENTRY_STRUCT.size):
                kind, bit, name = FEATURE_ENTRY_STRUCT.unpack_from(data, i * FEATURE_ENTRY_STRUCT.size)
                if kind in _FEATURE_KIND_NAMES and bit < 64:
                    h.feature_names[(kind, bit)] = name.rstrip(b"\0").decode("ascii", "replace")
        h.extensions.append(HeaderExtension(ext_type, data))


def _check_table_fields(h: Header, file_length: int, check_snapshots: bool) -> None:
    cs = h.cluster_size
    # refcount table
    if h.refcount_table_clusters == 0:
        raise InvalidImageError("Image does not contain a reference count table (refcount_table_clusters 0)")
    if h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise InvalidImageError(
            f"Reference count table too large: refcount_table_clusters {h.refcount_table_clusters} "
            f"({h.refcount_table_clusters * cs} bytes > {MAX_REFTABLE_BYTES})")
    _check_region("refcount_table_offset", h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_length)
    # L1
    need = min_l1_size(h.size, h.cluster_bits, h.l2_entries)
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise InvalidImageError(f"Active L1 table too large: l1_size {h.l1_size} entries > {MAX_L1_BYTES // 8}")
    if need * 8 > MAX_L1_BYTES:
        raise InvalidImageError(
            f"virtual size {h.size} too large: needs {need} L1 entries, limit {MAX_L1_BYTES // 8}")
    if h.l1_size < need:
        raise InvalidImageError(f"L1 table is too small: l1_size {h.l1_size} < {need} needed for size {h.size}")
    if h.l1_size:
        _check_region("l1_table_offset", h.l1_table_offset, h.l1_size * 8, cs, file_length)
        if _overlaps(h.l1_table_offset, h.l1_size * 8, 0, cs):
            raise InvalidImageError(
                f"Active L1 table offset invalid: l1_table_offset 0x{h.l1_table_offset:x} overlaps the header")
        if _overlaps(h.l1_table_offset, h.l1_size * 8, h.refcount_table_offset, h.refcount_table_clusters * cs):
            raise InvalidImageError(
                f"Active L1 table offset invalid: l1_table_offset 0x{h.l1_table_offset:x} overlaps the refcount table")
    if h.refcount_table_offset < cs:
        raise InvalidImageError(
            f"Reference count table offset invalid: refcount_table_offset 0x{h.refcount_table_offset:x} overlaps the header")
    if check_snapshots:
        validate_snapshot_fields(h)


def snapshot_table_ends_past_int64(count: int, offset: int) -> bool:
    """QEMU's qcow2_validate_table test: a table of `count` 40-byte entries at `offset` would end
    past INT64_MAX (an offset no pread could even take)."""
    return INT64_MAX - count * SNAPSHOT_HEADER_STRUCT.size < offset


def validate_snapshot_fields(h: Header) -> None:
    """The header's snapshot table fields (count, offset) within QEMU's limits.

    An open for `qemu-img check` skips this at header parse time (QEMU's check-mode open ignores
    the snapshot table; the check reads it itself and may repair it) and records the error instead.
    """
    cs = h.cluster_size
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise InvalidImageError(f"Snapshot table too large: nb_snapshots {h.nb_snapshots} > {MAX_SNAPSHOTS}")
    if h.nb_snapshots:
        # QEMU's qcow2_validate_table: the table must end below INT64_MAX (a larger offset would
        # not even fit pread's off_t).
        if snapshot_table_ends_past_int64(h.nb_snapshots, h.snapshots_offset):
            raise InvalidImageError(
                f"Snapshot table offset invalid: snapshots_offset 0x{h.snapshots_offset:x} + "
                f"{h.nb_snapshots} entries of {SNAPSHOT_HEADER_STRUCT.size} bytes ends past 0x7fffffffffffffff")
        if h.snapshots_offset % cs:
            raise InvalidImageError(
                f"Snapshot table offset invalid: snapshots_offset 0x{h.snapshots_offset:x} not cluster aligned")
        if h.snapshots_offset < cs:
            raise InvalidImageError(
                f"Snapshot table offset invalid: snapshots_offset 0x{h.snapshots_offset:x} overlaps the header")
        # A table past the end of the file is found when the table is read (parse_snapshot_table):
        # as in QEMU, it does not hide an intact active layer from a reader.


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


def _check_region(name: str, offset: int, length: int, cluster_size: int, file_length: int) -> None:
    if offset % cluster_size:
        raise InvalidImageError(f"{name} 0x{offset:x} invalid: not aligned to cluster size {cluster_size}")
    if offset + length > file_length or offset >= MAX_HOST_OFFSET:
        raise InvalidImageError(
            f"{name} 0x{offset:x} invalid: table of {length} bytes runs past end of file ({file_length})")


def serialize_header(h: Header) -> bytes:
    """Encode the header, its extensions (unknown ones verbatim, QEMU's order) and the backing name.

    Sets h.backing_file_offset/size and h.header_length to what was written. Like QEMU, the
    feature-name table (informational only) is left out when it would not fit in cluster 0;
    raises ValueError when the rest does not fit.
    """
    out = _serialize_header(h)
    if len(out) > h.cluster_size and any(e.ext_type == EXT_FEATURE_TABLE for e in h.extensions):
        h.extensions = [e for e in h.extensions if e.ext_type != EXT_FEATURE_TABLE]
        out = _serialize_header(h)
    if len(out) > h.cluster_size:
        raise ValueError(f"header of {len(out)} bytes does not fit in cluster 0 ({h.cluster_size} bytes)")
    return out


def _serialize_header(h: Header) -> bytes:
    parts = [HEADER_V2_STRUCT.pack(
        QCOW_MAGIC, h.version, 0, 0, h.cluster_bits, h.size, h.crypt_method, h.l1_size,
        h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots,
        h.snapshots_offset)]
    if h.version >= 3:
        header_length = max(HEADER_V3_LENGTH, HEADER_V3_LENGTH + len(h.extra_header))
        h.header_length = header_length
        parts.append(HEADER_V3_STRUCT.pack(h.incompatible_features, h.compatible_features,
                                           h.autoclear_features, h.refcount_order, header_length))
        parts.append(bytes([h.compression_type]) + bytes(7))
        parts.append(h.extra_header)
    # Extensions: known ones regenerated from fields, unknown ones verbatim, QEMU's order.
    exts: list[tuple[int, bytes]] = []
    if h.backing_format:
        exts.append((EXT_BACKING_FORMAT, h.backing_format.encode("ascii")))
    if h.data_file:
        exts.append((EXT_DATA_FILE, h.data_file.encode("utf-8", "surrogateescape")))
    for kind in (EXT_CRYPTO, EXT_FEATURE_TABLE, EXT_BITMAPS):
        for e in h.extensions:
            if e.ext_type == kind:
                exts.append((e.ext_type, e.data))
    known = {EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_CRYPTO, EXT_FEATURE_TABLE, EXT_BITMAPS}
    for e in h.extensions:
        if e.ext_type not in known:
            exts.append((e.ext_type, e.data))
    for ext_type, data in exts:
        parts.append(EXT_STRUCT.pack(ext_type, len(data)))
        parts.append(data + bytes(_pad8(len(data)) - len(data)))
    parts.append(EXT_STRUCT.pack(EXT_END, 0))
    out = b"".join(parts)
    if h.backing_file:
        name = h.backing_file.encode("utf-8", "surrogateescape")
        if len(name) > MAX_BACKING_NAME_LENGTH:
            raise ValueError(f"backing file name of {len(name)} bytes > {MAX_BACKING_NAME_LENGTH}")
        h.backing_file_offset = len(out)
        h.backing_file_size = len(name)
        out += name
        out = out[:8] + struct.pack(">QI", h.backing_file_offset, h.backing_file_size) + out[20:]
    else:
        h.backing_file_offset = 0
        h.backing_file_size = 0
    return out


def feature_table_extension() -> HeaderExtension:
    """The feature-name table QEMU writes into every v3 image it creates."""
    entries = [(0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
               (0, 3, b"compression type"), (0, 4, b"extended L2 entries"), (1, 0, b"lazy refcounts"),
               (2, 0, b"bitmaps"), (2, 1, b"raw external data")]
    data = b"".join(FEATURE_ENTRY_STRUCT.pack(k, b, n) for k, b, n in entries)
    return HeaderExtension(EXT_FEATURE_TABLE, data)


class SnapshotEntry(FrozenRecord):
    """One snapshot table entry exactly as stored, so that rewriting the table keeps every byte
    of the entries it does not change (ids and names are bytes, dates keep their nanoseconds,
    unknown extra data stays).
    """

    __slots__ = ("date_nsec", "date_sec", "extra", "id_raw", "l1_size", "l1_table_offset", "name_raw",
                 "vm_clock_ns", "vm_state_size")
    l1_table_offset: int
    l1_size: int
    id_raw: bytes
    name_raw: bytes
    date_sec: int
    date_nsec: int
    vm_clock_ns: int
    vm_state_size: int  # the header's 32-bit field (the extra data may hold a larger one)
    extra: bytes        # extra data verbatim: vm_state_size_large, disk_size, icount, unknown

    def __init__(self, l1_table_offset: int, l1_size: int, id_raw: bytes, name_raw: bytes, date_sec: int,
                 date_nsec: int, vm_clock_ns: int, vm_state_size: int, extra: bytes) -> None:
        object.__setattr__(self, "l1_table_offset", l1_table_offset)
        object.__setattr__(self, "l1_size", l1_size)
        object.__setattr__(self, "id_raw", id_raw)
        object.__setattr__(self, "name_raw", name_raw)
        object.__setattr__(self, "date_sec", date_sec)
        object.__setattr__(self, "date_nsec", date_nsec)
        object.__setattr__(self, "vm_clock_ns", vm_clock_ns)
        object.__setattr__(self, "vm_state_size", vm_state_size)
        object.__setattr__(self, "extra", extra)

    def encode(self) -> bytes:
        """The entry's bytes, padded to 8."""
        head = SNAPSHOT_HEADER_STRUCT.pack(
            self.l1_table_offset, self.l1_size, len(self.id_raw), len(self.name_raw), self.date_sec,
            self.date_nsec, self.vm_clock_ns, self.vm_state_size, len(self.extra))
        out = head + self.extra + self.id_raw + self.name_raw
        return out + bytes(_pad8(len(out)) - len(out))

    @property
    def id_c(self) -> bytes:
        """The id as QEMU compares it (a C string: up to the first NUL)."""
        return self.id_raw.split(b"\0", 1)[0]

    @property
    def name_c(self) -> bytes:
        """The name as QEMU compares it (a C string: up to the first NUL)."""
        return self.name_raw.split(b"\0", 1)[0]


class Snapshot(FrozenRecord):
    """One internal snapshot, as listed in the snapshot table (table order)."""

    __slots__ = ("date", "disk_size", "entry", "icount", "id", "l1_size", "l1_table_offset", "name",
                 "vm_clock_ns", "vm_state_size")
    _hidden = ("l1_table_offset", "l1_size", "entry")  # (left out of repr)
    _uncompared = ("entry",)  # (ignored by == and hash)
    id: str
    """The snapshot's id (`qemu-img snapshot -l`'s ID column), unique in the table."""
    name: str
    """The snapshot's name (its TAG column)."""
    date: datetime
    """When the snapshot was taken: an aware datetime in UTC (microsecond precision)."""
    vm_clock_ns: int
    """The guest clock at the snapshot, in nanoseconds (0 for a disk-only snapshot)."""
    vm_state_size: int
    """Bytes of saved VM state (0 for a disk-only snapshot)."""
    disk_size: int | None
    """The virtual disk size at the snapshot, None when the entry's extra data does not record it."""
    icount: int | None
    """The guest's instruction count at the snapshot, None when the entry does not record it."""
    l1_table_offset: int
    """Host offset of the snapshot's L1 table."""
    l1_size: int
    """Entries in the snapshot's L1 table."""
    entry: SnapshotEntry | None  # as stored
    """The table entry as stored (raw fields and extra data, so a rewrite preserves them)."""

    def __init__(self, id: str, name: str, date: datetime, vm_clock_ns: int, vm_state_size: int,
                 disk_size: int | None, icount: int | None, l1_table_offset: int = 0, l1_size: int = 0,
                 entry: SnapshotEntry | None = None) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "date", date)
        object.__setattr__(self, "vm_clock_ns", vm_clock_ns)
        object.__setattr__(self, "vm_state_size", vm_state_size)
        object.__setattr__(self, "disk_size", disk_size)
        object.__setattr__(self, "icount", icount)
        object.__setattr__(self, "l1_table_offset", l1_table_offset)
        object.__setattr__(self, "l1_size", l1_size)
        object.__setattr__(self, "entry", entry)


def parse_snapshot_table(buf: bytes, count: int, version: int, cluster_size: int,
                         file_length: int, table_offset: int = 0) -> tuple[list[Snapshot], int]:
    """Decode `count` snapshot entries from `buf`; return them and the table's byte length.

    Each entry's L1 table is range-checked; every length comes from `buf` itself, never past it.
    """
    from datetime import UTC, datetime  # (here: only an image with snapshots needs it)
    snaps: list[Snapshot] = []
    pos = 0
    def incomplete(i: int, need: int) -> InvalidImageError:
        if pos + need > MAX_SNAPSHOT_TABLE_BYTES:
            return InvalidImageError(
                f"Snapshot table too large: entry {i} ends past {MAX_SNAPSHOT_TABLE_BYTES} bytes "
                f"(nb_snapshots {count})")
        return InvalidImageError(
            f"snapshot table entry {i} is incomplete: snapshots_offset 0x{table_offset:x} + {pos + need} bytes "
            f"runs past the end of the file ({file_length} bytes)")

    for i in range(count):
        start = pos
        if pos + SNAPSHOT_HEADER_STRUCT.size > len(buf):
            raise incomplete(i, SNAPSHOT_HEADER_STRUCT.size)
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state_size,
         extra_size) = SNAPSHOT_HEADER_STRUCT.unpack_from(buf, pos)
        pos += SNAPSHOT_HEADER_STRUCT.size
        if extra_size > MAX_SNAPSHOT_EXTRA:
            raise InvalidImageError(f"snapshot {i}: extra_size {extra_size} too large (limit {MAX_SNAPSHOT_EXTRA})")
        if version >= 3 and extra_size < 16:
            raise InvalidImageError(f"snapshot {i}: extra_size {extra_size} too small for a v3 image (need 16)")
        if pos + extra_size + id_len + name_len > len(buf):
            pos -= SNAPSHOT_HEADER_STRUCT.size
            raise incomplete(i, SNAPSHOT_HEADER_STRUCT.size + extra_size + id_len + name_len)
        extra = bytes(buf[pos:pos + extra_size]) + bytes(max(0, SNAPSHOT_EXTRA_STRUCT.size - extra_size))
        vm_state_large, disk_size, icount = SNAPSHOT_EXTRA_STRUCT.unpack_from(extra, 0)
        if extra_size >= 8:
            vm_state_size = vm_state_large
        pos += extra_size
        sid = bytes(buf[pos:pos + id_len]).decode("utf-8", "replace")
        pos += id_len
        name = bytes(buf[pos:pos + name_len]).decode("utf-8", "replace")
        pos += name_len
        raw_extra = bytes(buf[start + SNAPSHOT_HEADER_STRUCT.size:start + SNAPSHOT_HEADER_STRUCT.size + extra_size])
        raw_id_at = start + SNAPSHOT_HEADER_STRUCT.size + extra_size
        entry = SnapshotEntry(l1_offset, l1_size, bytes(buf[raw_id_at:raw_id_at + id_len]),
                              bytes(buf[raw_id_at + id_len:pos]), date_sec, date_nsec, vm_clock,
                              SNAPSHOT_HEADER_STRUCT.unpack_from(buf, start)[7], raw_extra)
        pos = _pad8(pos)
        if l1_size * 8 > MAX_L1_BYTES:
            raise InvalidImageError(f"Snapshot L1 table too large: snapshot {i} l1_size {l1_size} > {MAX_L1_BYTES // 8}")
        if l1_size and (l1_offset % cluster_size or l1_offset + l1_size * 8 > file_length or l1_offset < cluster_size):
            raise InvalidImageError(
                f"Snapshot L1 table offset invalid: snapshot {i} l1_table_offset 0x{l1_offset:x} "
                f"(size {l1_size}, file {file_length})")
        if date_nsec >= 1_000_000_000:
            date_nsec = 0
        date = datetime.fromtimestamp(date_sec, tz=UTC).replace(microsecond=date_nsec // 1000)
        snaps.append(Snapshot(sid, name, date, vm_clock, vm_state_size,
                              disk_size if extra_size >= 16 else None,
                              icount if extra_size >= 24 else None,
                              l1_offset, l1_size, entry))
    return snaps, pos


def serialize_snapshot(s: Snapshot, extra_size: int = 24) -> bytes:
    """Encode one snapshot table entry (8-byte padded)."""
    sid = s.id.encode()
    name = s.name.encode()
    ts = s.date.timestamp()
    sec = int(ts)
    nsec = s.date.microsecond * 1000
    head = SNAPSHOT_HEADER_STRUCT.pack(s.l1_table_offset, s.l1_size, len(sid), len(name), sec, nsec,
                                       s.vm_clock_ns, min(s.vm_state_size, 0xFFFFFFFF), extra_size)
    extra = SNAPSHOT_EXTRA_STRUCT.pack(s.vm_state_size, s.disk_size or 0,
                                       s.icount if s.icount is not None else 0xFFFFFFFFFFFFFFFF)[:extra_size]
    out = head + extra + sid + name
    return out + bytes(_pad8(len(out)) - len(out))


# --- persistent dirty bitmaps (docs/interop/qcow2.txt, "Bitmaps extension") ----------------------
BITMAP_DIR_ENTRY_STRUCT = struct.Struct(">QIIBBHI")  # table offset/size, flags, type, granularity, name, extra
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_RESERVED_FLAGS = ~(BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE) & 0xFFFFFFFF
BT_DIRTY_TRACKING_BITMAP = 1
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
BME_MAX_TABLE_SIZE = 0x8000000
BME_MAX_GRANULARITY_BITS = 31
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_NAME_SIZE = 1023


class BitmapsExtension(FrozenRecord):
    """The bitmaps header extension: how many bitmaps, where the directory is."""

    __slots__ = ("directory_offset", "directory_size", "nb_bitmaps")
    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    def __init__(self, nb_bitmaps: int, directory_size: int, directory_offset: int) -> None:
        object.__setattr__(self, "nb_bitmaps", nb_bitmaps)
        object.__setattr__(self, "directory_size", directory_size)
        object.__setattr__(self, "directory_offset", directory_offset)


class Bitmap(FrozenRecord):
    """One entry of the bitmap directory."""

    __slots__ = ("flags", "granularity_bits", "name", "table_offset", "table_size")
    name: str
    """The bitmap's name, unique in the image."""
    flags: int
    """BME_FLAG_* bits: 1 in use (inconsistent), 2 auto (enabled: a VM records writes in it)."""
    granularity_bits: int
    """log2 of the bytes of guest disk one bit covers."""
    table_offset: int
    """Host offset of the bitmap table."""
    table_size: int
    """Entries in the bitmap table (one per cluster of serialized bits)."""

    def __init__(self, name: str, flags: int, granularity_bits: int, table_offset: int, table_size: int) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "granularity_bits", granularity_bits)
        object.__setattr__(self, "table_offset", table_offset)
        object.__setattr__(self, "table_size", table_size)

    @property
    def granularity(self) -> int:
        """Bytes of guest disk one bit covers."""
        return 1 << self.granularity_bits


def parse_bitmaps_extension(data: bytes, cluster_size: int, file_length: int) -> BitmapsExtension:
    """The bitmaps extension's fields, checked as QEMU checks them (qcow2_read_extensions)."""
    if len(data) != BITMAPS_EXT_STRUCT.size:
        raise InvalidImageError(
            f"bitmaps_ext: Invalid extension length: {len(data)} bytes (expected {BITMAPS_EXT_STRUCT.size})")
    nb, reserved, size, offset = BITMAPS_EXT_STRUCT.unpack(data)
    if reserved:
        raise InvalidImageError(f"bitmaps_ext: Reserved field is not zero: reserved32 0x{reserved:x}")
    if nb > MAX_BITMAPS:
        raise InvalidImageError(
            f"bitmaps_ext: nb_bitmaps {nb} exceeds the supported maximum of {MAX_BITMAPS}")
    if nb == 0:
        raise InvalidImageError("bitmaps_ext: found bitmaps extension with zero bitmaps (nb_bitmaps 0)")
    if offset % cluster_size:
        raise InvalidImageError(f"bitmaps_ext: invalid bitmap directory offset: bitmap_directory_offset 0x{offset:x}")
    if size > MAX_BITMAP_DIRECTORY_SIZE:
        raise InvalidImageError(
            f"bitmaps_ext: bitmap_directory_size {size} exceeds the maximum supported size "
            f"({MAX_BITMAP_DIRECTORY_SIZE})")
    if offset + size > file_length:
        raise InvalidImageError(
            f"bitmaps_ext: bitmap directory at 0x{offset:x} ({size} bytes) runs past end of file ({file_length})")
    return BitmapsExtension(nb, size, offset)


def parse_bitmap_directory(buf: bytes, ext: BitmapsExtension, cluster_size: int, file_length: int) -> list[Bitmap]:
    """The directory's entries, each checked (QEMU's bitmap_list_load and check_dir_entry)."""
    bitmaps: list[Bitmap] = []
    names: set[str] = set()
    pos = 0
    for i in range(ext.nb_bitmaps):
        if pos + BITMAP_DIR_ENTRY_STRUCT.size > len(buf):
            raise InvalidImageError(
                f"Broken bitmap directory: entry {i} at offset {pos} runs past bitmap_directory_size {len(buf)}")
        table_offset, table_size, flags, btype, gbits, name_size, extra = BITMAP_DIR_ENTRY_STRUCT.unpack_from(buf, pos)
        entry_size = _pad8(BITMAP_DIR_ENTRY_STRUCT.size + extra + name_size)
        if pos + entry_size > len(buf):
            raise InvalidImageError(
                f"Broken bitmap directory: entry {i} ({entry_size} bytes at offset {pos}) runs past "
                f"bitmap_directory_size {len(buf)}")
        where = f"bitmap directory entry {i}"
        if table_size > BME_MAX_TABLE_SIZE:
            raise InvalidImageError(f"{where}: bitmap_table_size {table_size} exceeds {BME_MAX_TABLE_SIZE}")
        if table_offset % cluster_size or (table_size and table_offset == 0):
            raise InvalidImageError(f"{where}: bitmap_table_offset 0x{table_offset:x} invalid")
        if table_offset + table_size * 8 > file_length:
            raise InvalidImageError(
                f"{where}: bitmap table at 0x{table_offset:x} ({table_size} entries) runs past end of file")
        if flags & BME_RESERVED_FLAGS:
            raise InvalidImageError(f"{where}: reserved flags set: flags 0x{flags:x}")
        if btype != BT_DIRTY_TRACKING_BITMAP:
            raise InvalidImageError(f"{where}: unknown bitmap type {btype}")
        if not BME_MIN_GRANULARITY_BITS <= gbits <= BME_MAX_GRANULARITY_BITS:
            raise InvalidImageError(
                f"{where}: granularity_bits {gbits} out of range {BME_MIN_GRANULARITY_BITS}.."
                f"{BME_MAX_GRANULARITY_BITS}")
        if extra and not flags & BME_FLAG_EXTRA_DATA_COMPATIBLE:
            raise InvalidImageError(f"{where}: extra_data_size {extra} with unknown extra data")
        if name_size == 0 or name_size > BME_MAX_NAME_SIZE:
            raise InvalidImageError(f"{where}: name_size {name_size} out of range 1..{BME_MAX_NAME_SIZE}")
        start = pos + BITMAP_DIR_ENTRY_STRUCT.size + extra
        raw_name = buf[start:start + name_size]
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidImageError(f"{where}: name {raw_name!r} is not valid UTF-8") from None
        if "\0" in name:
            raise InvalidImageError(f"{where}: name {raw_name!r} contains a NUL byte")
        if name in names:
            raise InvalidImageError(f"{where}: duplicate bitmap name {name!r}")
        names.add(name)
        bitmaps.append(Bitmap(name, flags, gbits, table_offset, table_size))
        pos += entry_size
    if pos != len(buf):
        raise InvalidImageError(
            f"Broken bitmap directory: bitmap_directory_size {len(buf)} but the {ext.nb_bitmaps} entries take {pos}")
    return bitmaps
