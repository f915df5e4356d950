"""Read and patch qcow2 metadata of a (qemu-made) image by byte offset, for bad-input tests.

Deliberately independent of qcowdisk: every offset here is derived by parsing the image with
`struct` directly, so a bug in the engine's parser cannot hide a bug in the test's corruption.
All integers are big-endian, as on disk. Functions re-read the file on every call (images in
tests are small), so patches compose without stale state.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

QCOW_MAGIC = b"QFI\xfb"

# name -> (byte offset, struct format) of every fixed header field (v2: up to 72, v3: up to 105).
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, "4s"),
    "version": (4, "I"),
    "backing_file_offset": (8, "Q"),
    "backing_file_size": (16, "I"),
    "cluster_bits": (20, "I"),
    "size": (24, "Q"),
    "crypt_method": (32, "I"),
    "l1_size": (36, "I"),
    "l1_table_offset": (40, "Q"),
    "refcount_table_offset": (48, "Q"),
    "refcount_table_clusters": (56, "I"),
    "nb_snapshots": (60, "I"),
    "snapshots_offset": (64, "Q"),
    "incompatible_features": (72, "Q"),
    "compatible_features": (80, "Q"),
    "autoclear_features": (88, "Q"),
    "refcount_order": (96, "I"),
    "header_length": (100, "I"),
    "compression_type": (104, "B"),
}

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00

# Byte offsets of the fields inside one snapshot table entry.
SNAPSHOT_ENTRY_FIELDS: dict[str, tuple[int, str]] = {
    "l1_table_offset": (0, "Q"),
    "l1_size": (8, "I"),
    "id_str_size": (12, "H"),
    "name_size": (14, "H"),
    "date_sec": (16, "I"),
    "date_nsec": (20, "I"),
    "vm_clock_nsec": (24, "Q"),
    "vm_state_size": (32, "I"),
    "extra_data_size": (36, "I"),
}
SNAPSHOT_ENTRY_HEADER = 40


# ---------------------------------------------------------------- raw byte access

def read_bytes(path: str, offset: int, length: int) -> bytes:
    """Read up to `length` bytes at `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def patch_bytes(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes at `offset` (extends the file if past its end)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _read_fmt(path: str, offset: int, fmt: str) -> int:
    s = struct.Struct(">" + fmt)
    data = read_bytes(path, offset, s.size)
    if len(data) < s.size:
        raise ValueError(f"{path}: {s.size} bytes at {offset} lie past the end of the file")
    return s.unpack(data)[0]


def read_u8(path: str, offset: int) -> int:
    """Read one byte."""
    return _read_fmt(path, offset, "B")


def read_u16(path: str, offset: int) -> int:
    """Read a big-endian u16."""
    return _read_fmt(path, offset, "H")


def read_u32(path: str, offset: int) -> int:
    """Read a big-endian u32."""
    return _read_fmt(path, offset, "I")


def read_u64(path: str, offset: int) -> int:
    """Read a big-endian u64."""
    return _read_fmt(path, offset, "Q")


def patch_u8(path: str, offset: int, value: int) -> None:
    """Write one byte."""
    patch_bytes(path, offset, struct.pack(">B", value))


def patch_u16(path: str, offset: int, value: int) -> None:
    """Write a big-endian u16."""
    patch_bytes(path, offset, struct.pack(">H", value))


def patch_u32(path: str, offset: int, value: int) -> None:
    """Write a big-endian u32."""
    patch_bytes(path, offset, struct.pack(">I", value))


def patch_u64(path: str, offset: int, value: int) -> None:
    """Write a big-endian u64."""
    patch_bytes(path, offset, struct.pack(">Q", value))


def file_size(path: str) -> int:
    """Length of the file in bytes."""
    return os.path.getsize(path)


def append_aligned(path: str, data: bytes, alignment: int) -> int:
    """Pad the file to `alignment`, append `data`; return the offset where `data` starts."""
    offset = -(-file_size(path) // alignment) * alignment
    patch_bytes(path, offset, data)
    return offset


# ---------------------------------------------------------------- header

@dataclass
class Extension:
    """One header extension as found on disk."""

    ext_type: int
    header_offset: int  # where its {u32 type, u32 length} starts
    length: int
    data: bytes

    @property
    def length_offset(self) -> int:
        """Byte offset of the extension's length field."""
        return self.header_offset + 4

    @property
    def data_offset(self) -> int:
        """Byte offset of the extension's data."""
        return self.header_offset + 8


@dataclass
class ImageHeader:
    """The header fields of an image, parsed with struct (fields absent in v2 get v2 defaults)."""

    fields: dict[str, int | bytes]
    file_size: int
    extensions: list[Extension] = field(default_factory=list)
    backing_file: bytes | None = None

    def __getattr__(self, name: str) -> int:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def cluster_size(self) -> int:
        """Cluster size in bytes."""
        return 1 << self.fields["cluster_bits"]

    @property
    def extended_l2(self) -> bool:
        """Whether the extended-L2 incompatible bit is set."""
        return bool(self.fields["incompatible_features"] & (1 << 4))

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry (16 with extended L2)."""
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table."""
        return self.cluster_size // self.l2_entry_size

    @property
    def extensions_start(self) -> int:
        """Where header extensions begin."""
        return 72 if self.fields["version"] == 2 else self.fields["header_length"]


def read_header(path: str) -> ImageHeader:
    """Parse the fixed header and the extension list (stops quietly at anything malformed)."""
    head = read_bytes(path, 0, 1 << 21)
    fields: dict[str, int | bytes] = {}
    for name, (offset, fmt) in HEADER_FIELDS.items():
        s = struct.Struct(">" + fmt)
        if offset + s.size <= len(head):
            fields[name] = s.unpack_from(head, offset)[0]
    if fields.get("version") == 2:
        fields.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                      refcount_order=4, header_length=72, compression_type=0)
    h = ImageHeader(fields, file_size(path))
    cs = h.cluster_size
    end = min(fields["backing_file_offset"] or cs, cs, len(head))
    pos = h.extensions_start
    while pos + 8 <= end:
        ext_type, length = struct.unpack_from(">II", head, pos)
        if ext_type == EXT_END:
            break
        h.extensions.append(Extension(ext_type, pos, length, head[pos + 8:pos + 8 + length]))
        pos += 8 + -(-length // 8) * 8
    if fields["backing_file_offset"]:
        bo, bs = fields["backing_file_offset"], fields["backing_file_size"]
        h.backing_file = head[bo:bo + bs]
    return h


def header_field_offset(name: str) -> int:
    """Byte offset of a fixed header field."""
    return HEADER_FIELDS[name][0]


def patch_header_field(path: str, name: str, value: int | bytes) -> None:
    """Overwrite one fixed header field with `value` (width taken from the field)."""
    offset, fmt = HEADER_FIELDS[name]
    patch_bytes(path, offset, struct.pack(">" + fmt, value))


def read_header_field(path: str, name: str) -> int | bytes:
    """Read one fixed header field."""
    offset, fmt = HEADER_FIELDS[name]
    s = struct.Struct(">" + fmt)
    return s.unpack(read_bytes(path, offset, s.size))[0]


def set_header_bits(path: str, name: str, bits: int) -> int:
    """OR `bits` into a header bitfield; returns the new value."""
    value = read_header_field(path, name) | bits
    patch_header_field(path, name, value)
    return value


def clear_header_bits(path: str, name: str, bits: int) -> int:
    """Clear `bits` in a header bitfield; returns the new value."""
    value = read_header_field(path, name) & ~bits
    patch_header_field(path, name, value)
    return value


def find_extension(path: str, ext_type: int) -> Extension:
    """The extension of `ext_type` (KeyError if the image has none)."""
    for ext in read_header(path).extensions:
        if ext.ext_type == ext_type:
            return ext
    raise KeyError(f"{path}: no header extension 0x{ext_type:08x}")


def rewrite_extensions(path: str, extensions: list[tuple[int, bytes]]) -> None:
    """Replace the extension area with `extensions` (+ end marker); moves the backing name after it.

    The caller is responsible for the result fitting in cluster 0.
    """
    h = read_header(path)
    out = b""
    for ext_type, data in extensions:
        out += struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
    out += struct.pack(">II", EXT_END, 0)
    start = h.extensions_start
    old_end = h.fields["backing_file_offset"] + h.fields["backing_file_size"] if h.backing_file else start
    if h.backing_file is not None:
        patch_header_field(path, "backing_file_offset", start + len(out))
        out += h.backing_file
    # Clear whatever the old area held so no stale extension survives past the new end marker.
    old_area_end = max(old_end, start + sum(8 + e.length + -e.length % 8 for e in h.extensions) + 8)
    patch_bytes(path, start, out + bytes(max(0, old_area_end - start - len(out))))


def feature_table_entry(kind: int, bit: int, name: str) -> bytes:
    """One 48-byte feature-name table entry."""
    return struct.pack(">BB46s", kind, bit, name.encode())


# ---------------------------------------------------------------- L1 / L2

def l1_entry_offset(path: str, l1_index: int) -> int:
    """Byte offset of active L1 entry `l1_index`."""
    h = read_header(path)
    if not 0 <= l1_index < h.l1_size:
        raise IndexError(f"L1 index {l1_index} outside l1_size {h.l1_size}")
    return h.l1_table_offset + 8 * l1_index


def l1_index_of(path: str, guest_offset: int) -> int:
    """The L1 index that maps `guest_offset`."""
    h = read_header(path)
    return (guest_offset // h.cluster_size) // h.l2_entries


def l2_table_offset(path: str, guest_offset: int) -> int:
    """Host offset of the L2 table that maps `guest_offset` (LookupError if none is allocated)."""
    entry = read_u64(path, l1_entry_offset(path, l1_index_of(path, guest_offset)))
    table = entry & OFFSET_MASK
    if not table:
        raise LookupError(f"guest offset 0x{guest_offset:x} has no L2 table")
    return table


def l2_entry_offset(path: str, guest_offset: int) -> int:
    """Byte offset of the L2 entry mapping `guest_offset` (its first u64)."""
    h = read_header(path)
    l2_index = (guest_offset // h.cluster_size) % h.l2_entries
    return l2_table_offset(path, guest_offset) + l2_index * h.l2_entry_size


def l2_bitmap_offset(path: str, guest_offset: int) -> int:
    """Byte offset of the extended-L2 subcluster bitmap for `guest_offset` (second u64)."""
    if not read_header(path).extended_l2:
        raise ValueError(f"{path} has no extended L2 entries")
    return l2_entry_offset(path, guest_offset) + 8


def compressed_offset_bits(cluster_bits: int) -> int:
    """x: bits 0..x-1 of a compressed L2 entry hold the host byte offset."""
    return 62 - (cluster_bits - 8)


def decode_compressed_entry(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, additional sector count) of a compressed L2 entry."""
    x = compressed_offset_bits(cluster_bits)
    return entry & ((1 << x) - 1), (entry >> x) & ((1 << (62 - x)) - 1)


def make_compressed_entry(host_offset: int, extra_sectors: int, cluster_bits: int) -> int:
    """A compressed L2 entry descriptor (COPIED clear)."""
    x = compressed_offset_bits(cluster_bits)
    if host_offset >> x or extra_sectors >> (62 - x):
        raise ValueError("host offset or sector count does not fit the descriptor")
    return OFLAG_COMPRESSED | extra_sectors << x | host_offset


# ---------------------------------------------------------------- refcounts

def refcount_table_entry_offset(path: str, reftable_index: int) -> int:
    """Byte offset of refcount table entry `reftable_index`."""
    h = read_header(path)
    if not 0 <= reftable_index < h.refcount_table_clusters * h.cluster_size // 8:
        raise IndexError(f"refcount table index {reftable_index} out of range")
    return h.refcount_table_offset + 8 * reftable_index


# ---------------------------------------------------------------- snapshots

@dataclass
class SnapshotEntry:
    """Location and fixed fields of one snapshot table entry."""

    offset: int
    length: int  # padded length
    fields: dict[str, int]

    def field_offset(self, name: str) -> int:
        """Byte offset of one field of this entry."""
        return self.offset + SNAPSHOT_ENTRY_FIELDS[name][0]


def snapshot_entries(path: str) -> list[SnapshotEntry]:
    """Parse the snapshot table (positions and fixed fields of each entry)."""
    h = read_header(path)
    pos = h.snapshots_offset
    out = []
    for _ in range(h.nb_snapshots):
        raw = read_bytes(path, pos, SNAPSHOT_ENTRY_HEADER)
        values = struct.unpack(">QIHHIIQII", raw)
        fields = dict(zip(SNAPSHOT_ENTRY_FIELDS, values, strict=True))
        length = SNAPSHOT_ENTRY_HEADER + fields["extra_data_size"] + fields["id_str_size"] + fields["name_size"]
        length += -length % 8
        out.append(SnapshotEntry(pos, length, fields))
        pos += length
    return out


# ---------------------------------------------------------------- whole-image map

def metadata_regions(path: str) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges (offset, length) of each kind of metadata, for targeted mutation.

    Kinds: header (fixed header + extensions + backing name), l1, l2, reftable, refblock,
    snapshot_table, snapshot_l1, compressed (payloads). Ranges are clipped to the file.
    """
    h = read_header(path)
    cs = h.cluster_size
    size = h.file_size
    regions: dict[str, list[tuple[int, int]]] = {k: [] for k in (
        "header", "l1", "l2", "reftable", "refblock", "snapshot_table", "snapshot_l1", "compressed")}

    def add(kind: str, offset: int, length: int) -> None:
        length = min(length, size - offset)
        if offset >= 0 and length > 0:
            regions[kind].append((offset, length))

    ext_end = h.extensions_start + sum(8 + e.length + -e.length % 8 for e in h.extensions) + 8
    if h.backing_file is not None:
        ext_end = max(ext_end, h.backing_file_offset + h.backing_file_size)
    add("header", 0, ext_end)
    add("reftable", h.refcount_table_offset, h.refcount_table_clusters * cs)
    for i in range(h.refcount_table_clusters * cs // 8):
        off = h.refcount_table_offset + 8 * i
        if off + 8 > size:
            break
        block = read_u64(path, off) & ~0x1FF
        if block:
            add("refblock", block, cs)

    def add_l1(kind: str, offset: int, count: int) -> None:
        add(kind, offset, count * 8)
        table = read_bytes(path, offset, count * 8)
        for i in range(len(table) // 8):
            l2 = struct.unpack_from(">Q", table, 8 * i)[0] & OFFSET_MASK
            if l2 and (l2, cs) not in regions["l2"]:
                add("l2", l2, cs)
                add_compressed(l2)

    def add_compressed(l2: int) -> None:
        table = read_bytes(path, l2, cs)
        for i in range(0, len(table) - 7, h.l2_entry_size):
            entry = struct.unpack_from(">Q", table, i)[0]
            if entry & OFLAG_COMPRESSED:
                host, sectors = decode_compressed_entry(entry, h.cluster_bits)
                add("compressed", host, (sectors + 1) * 512 - (host & 511))

    add_l1("l1", h.l1_table_offset, h.l1_size)
    if h.nb_snapshots:
        entries = snapshot_entries(path)
        add("snapshot_table", h.snapshots_offset, sum(e.length for e in entries))
        for e in entries:
            add_l1("snapshot_l1", e.fields["l1_table_offset"], e.fields["l1_size"])
    return regions


