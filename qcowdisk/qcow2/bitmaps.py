"""Persistent dirty bitmaps: reading their contents, validated, and writing bitmaps.

The format (QEMU docs/interop/qcow2.txt, "Bitmaps extension"): the header extension names a
directory of entries (format.py parses and checks it); each entry names a bitmap table of u64
entries, one per cluster of the serialized bitmap: 0 all clear, 1 all set, else the offset of a
data cluster. The serialized bitmap has one bit per `granularity` bytes of guest disk, bit i in
byte i // 8 at bit i % 8 (QEMU's little-endian longs), zero-padded to whole clusters. Bitmaps are
valid only while autoclear bit 0 is set: a program that writes the image without updating them
must clear it. qcowdisk keeps them true as QEMU does: a read-write open marks them in use and
records every guest write in the enabled ones until the close stores them (bitmapedit.py,
`BitmapEditor.track_writes`); resize keeps them true itself (bitmapresize.py), snapshot
create/delete and amend leave them.

**Reading** (`load_table`, `read_chunk`): what QEMU's check_dir_entry, load_bitmap_data and
check_table_entry check, plus that each data cluster lies in the file past the header. The
table's size is compared with the size the disk needs before the table is read, so what is
allocated never rests on an unchecked field (at most BME_MAX_PHYS_SIZE / cluster_size entries).

**Writing** (`check_new`, `store`, `switch_directory`; bitmapedit.py drives them): QEMU's checks
and messages first (qcow2_co_can_store_new_dirty_bitmap, check_constraints_on_bitmap); nothing
is written when one fails. Then, in the order ordering.py describes (new structures written
and synced before the pointer to them):

1. the data clusters of each new or changed bitmap (those holding both set and clear bits; all
   clear and all set clusters are table entries 0 and 1), its table, then the new directory,
   all in new clusters nothing names yet;
2. a final flush: their refcounts (lazy ones too) written, guest data and the file synced;
3. one header switch (`ordering.switch_header`: sync, write, sync): the bitmaps extension naming
   the new directory, autoclear bit 0 set, the dirty bit clear (no extension and the bit clear
   when no bitmap is left). A header spanning several sectors (a long backing file name behind
   the feature table) is switched in steps that each end in one sector write (headerswitch.py),
   so a header write torn at a sector leaves the old header or the new one.

A cut before step 3 leaves the bitmaps as they were plus leaked clusters; after it, the new
ones. The old directory and dropped tables are freed after the switch.
The caller holds the image lock.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence

from ..errors import BitmapError, CorruptImageError, InvalidImageError
from ..hostio import Buffer
from ..record import FrozenRecord
from . import ordering
from .entries import decode_u64_table, encode_u64_entries
from .format import (
    AUTOCLEAR_BITMAPS,
    BITMAP_DIR_ENTRY_STRUCT,
    BITMAPS_EXT_STRUCT,
    BME_FLAG_IN_USE,
    BME_MAX_GRANULARITY_BITS,
    BME_MAX_NAME_SIZE,
    BME_MAX_TABLE_SIZE,
    BME_MIN_GRANULARITY_BITS,
    BT_DIRTY_TRACKING_BITMAP,
    EXT_BITMAPS,
    INCOMPAT_DIRTY,
    MAX_BITMAP_DIRECTORY_SIZE,
    MAX_BITMAPS,
    Bitmap,
    Header,
    HeaderExtension,
    align_up,
    parse_bitmap_directory,
    parse_bitmaps_extension,
    serialize_header,
)
from .state import Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

BME_MAX_PHYS_SIZE = 0x20000000  # QEMU's limit on a bitmap's serialized bytes (its RAM copy)
BME_TABLE_RESERVED_MASK = 0xFF000000000001FE
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_ALL_ONES = 1


def bitmap_bytes(virtual_size: int, granularity: int) -> int:
    """Bytes of the serialized bitmap of a disk of `virtual_size` bytes (one bit per granularity)."""
    bits = -(-virtual_size // granularity)
    return -(-bits // 8)


class NewBitmap(FrozenRecord):
    """A bitmap to add (`QcowFile.add_bitmaps`).

    `granularity` is the bytes of guest disk one bit covers (a power of two, 512 to 2 GiB);
    `enabled` is QEMU's `auto` flag (a VM records its writes in the bitmap; a disabled one is
    left alone). `data` is the contents, the serialized bits (see the module docstring) as
    chunks of any sizes adding up to `bitmap_bytes(virtual_size, granularity)`; None: all clear.
    """

    __slots__ = ("data", "enabled", "granularity", "name")
    name: str
    """The new bitmap's name (1 to 1023 bytes of UTF-8, not in use in the image)."""
    granularity: int
    """Bytes of guest disk one bit covers."""
    enabled: bool
    """QEMU's auto flag."""
    data: Iterable[Buffer] | None
    """The serialized bits as chunks, or None for a bitmap with every bit clear."""

    def __init__(self, name: str, granularity: int = 65536, enabled: bool = True,
                 data: Iterable[Buffer] | None = None) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "granularity", granularity)
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "data", data)


# --- reading ------------------------------------------------------------------------------------
def load_directory(s: Qcow2State) -> list[Bitmap]:
    """The bitmap directory, checked ([] without the extension or with autoclear bit 0 clear)."""
    h = s.header
    ext = next((e for e in h.extensions if e.ext_type == EXT_BITMAPS), None)
    if ext is None or not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return []
    file_length = max(s.host.size(), s.alloc_limit)
    fields = parse_bitmaps_extension(ext.data, s.cluster_size, file_length)
    raw = s.host.pread(fields.directory_size, fields.directory_offset)
    return parse_bitmap_directory(raw, fields, s.cluster_size, file_length)


def load_table(s: Qcow2State, bm: Bitmap) -> array[int]:
    """The bitmap table of a consistent bitmap, every entry checked. Raises BitmapError for an
    inconsistent (in-use) bitmap, InvalidImageError/CorruptImageError naming the field and value
    for a table the disk's size does not match or an entry that is out of bounds."""
    cs = s.cluster_size
    where = f"bitmap {bm.name!r}"
    if bm.flags & BME_FLAG_IN_USE:
        raise BitmapError(f"Bitmap '{bm.name}' is inconsistent and cannot be used")
    need = -(-bitmap_bytes(s.virtual_size, bm.granularity) // cs)
    if bm.table_size != need:
        raise InvalidImageError(
            f"{where}: bitmap_table_size {bm.table_size} does not match the {need} entries a disk of "
            f"{s.virtual_size} bytes needs at granularity {bm.granularity} with {cs}-byte clusters")
    if need * cs > BME_MAX_PHYS_SIZE or need > BME_MAX_TABLE_SIZE:
        raise InvalidImageError(f"{where}: bitmap_table_size {need} clusters exceeds {BME_MAX_PHYS_SIZE} bytes")
    if not need:
        return array("Q")
    if bm.table_offset < cs:
        raise InvalidImageError(f"{where}: bitmap_table_offset 0x{bm.table_offset:x} overlaps the header")
    raw = s.host.pread(need * 8, bm.table_offset)
    if len(raw) != need * 8:
        raise InvalidImageError(f"{where}: bitmap table at 0x{bm.table_offset:x} ({need} entries) runs past end of file")
    table = decode_u64_table(raw)
    limit = max(s.host.size(), s.alloc_limit)
    for i, e in enumerate(table):
        offset = e & BME_TABLE_OFFSET_MASK
        if e & BME_TABLE_RESERVED_MASK or (offset and (e & BME_TABLE_ALL_ONES or offset % cs)):
            raise CorruptImageError(f"{where}: bitmap table entry {i} = 0x{e:x} is invalid (reserved bits "
                                    f"0x{BME_TABLE_RESERVED_MASK:x}, or an unaligned or flagged data offset)")
        if offset and (offset < cs or offset + cs > limit):
            raise CorruptImageError(f"{where}: bitmap table entry {i} = 0x{e:x}: data cluster 0x{offset:x} "
                                    f"outside the file past the header ({limit} bytes)")
    return table


def read_chunk(s: Qcow2State, bm: Bitmap, table: array[int], index: int) -> bytes:
    """The serialized bits table entry `index` of `bm` holds: a cluster's worth, the last one cut
    to the bitmap's length, bits past the disk's end cleared."""
    cs = s.cluster_size
    total = bitmap_bytes(s.virtual_size, bm.granularity)
    n = min(cs, total - index * cs)
    e = table[index]
    offset = e & BME_TABLE_OFFSET_MASK
    if offset:
        data = s.host.pread(n, offset)
        if len(data) != n:
            raise CorruptImageError(f"bitmap {bm.name!r}: data cluster 0x{offset:x} runs past end of file")
    else:
        data = (b"\xff" if e & BME_TABLE_ALL_ONES else b"\0") * n
    if index == len(table) - 1:
        data = _clear_tail(data, s.virtual_size, bm.granularity)
    return data


def _clear_tail(last: bytes, virtual_size: int, granularity: int) -> bytes:
    """`last` (the final bytes of a serialized bitmap) with the bits past the disk's end cleared."""
    used = -(-virtual_size // granularity) % 8
    if not used or not last:
        return last
    return last[:-1] + bytes([last[-1] & ((1 << used) - 1)])


# --- adding -------------------------------------------------------------------------------------
def check_new(s: Qcow2State, existing: Sequence[Bitmap], new: Sequence[NewBitmap]) -> None:
    """Refuse what QEMU refuses before anything is written (BitmapError, QEMU's message)."""
    names = {b.name for b in existing}
    count = len(existing)
    dir_size = sum(_entry_size(b.name) for b in existing)
    for b in new:
        if not isinstance(b.name, str) or not b.name:
            raise BitmapError("Bitmap name cannot be empty")
        prefix = f"Can't make bitmap '{b.name}' persistent in '{s.filename}': "
        g = b.granularity
        if not isinstance(g, int) or g < 1 << BME_MIN_GRANULARITY_BITS or g & (g - 1):
            raise BitmapError("Granularity must be power of 2 and at least 512")
        if b.name in names:
            raise BitmapError(f"Bitmap already exists: {b.name}")
        if s.header.version < 3:
            raise BitmapError(prefix + "Cannot store dirty bitmaps in qcow2 v2 files")
        if g > 1 << BME_MAX_GRANULARITY_BITS:
            raise BitmapError(prefix + f"Granularity exceeds maximum ({1 << BME_MAX_GRANULARITY_BITS} bytes)")
        length = bitmap_bytes(s.virtual_size, g)
        if length > BME_MAX_PHYS_SIZE or length > BME_MAX_TABLE_SIZE * s.cluster_size:
            raise BitmapError(prefix + "Too much space will be occupied by the bitmap. Use larger granularity")
        if not length:
            raise BitmapError(prefix + "a disk of 0 bytes has no bitmap")
        if len(b.name.encode("utf-8", "surrogateescape")) > BME_MAX_NAME_SIZE:
            raise BitmapError(prefix + f"Name length exceeds maximum ({BME_MAX_NAME_SIZE} characters)")
        count += 1
        dir_size += _entry_size(b.name)
        if count > MAX_BITMAPS:
            raise BitmapError(prefix + "Maximum number of persistent bitmaps is already reached")
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
            raise BitmapError(prefix + "Not enough space in the bitmap directory")
        names.add(b.name)


def _entry_size(name: str) -> int:
    return align_up(BITMAP_DIR_ENTRY_STRUCT.size + len(name.encode("utf-8", "surrogateescape")), 8)


def encode_entry(name: str, flags: int, granularity_bits: int, table_offset: int, table_size: int) -> bytes:
    """One bitmap directory entry (no extra data), padded to 8 bytes."""
    raw = name.encode("utf-8", "surrogateescape")
    out = BITMAP_DIR_ENTRY_STRUCT.pack(table_offset, table_size, flags, BT_DIRTY_TRACKING_BITMAP,
                                       granularity_bits, len(raw), 0) + raw
    return out + bytes(align_up(len(out), 8) - len(out))


def rechunk(chunks: Iterable[Buffer] | None, size: int, total: int, name: str) -> Iterator[bytes]:
    """`total` bytes from `chunks` in pieces of `size` (the last one shorter); zeros for None."""
    if chunks is None:
        for pos in range(0, total, size):
            yield bytes(min(size, total - pos))
        return
    buf = bytearray()
    done = 0
    for chunk in chunks:
        buf += chunk
        if done + len(buf) > total:
            raise ValueError(f"bitmap {name!r}: data holds more than the {total} bytes the bitmap has")
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
            done += size
    if done + len(buf) != total:
        raise ValueError(f"bitmap {name!r}: data holds {done + len(buf)} bytes, the bitmap has {total}")
    if buf:
        yield bytes(buf)


def _alloc(s: Qcow2State, length: int) -> int:
    """New contiguous metadata clusters for `length` bytes; their host offset."""
    rc = s.refcounts
    assert rc is not None, "the image is open read-write"
    count = -(-length // s.cluster_size)
    first = rc.alloc_contiguous(count)
    s.metadata.update(range(first, first + count))
    offset = first << s.cluster_bits
    s.grow_alloc_limit(offset + count * s.cluster_size)
    return offset


def store(s: Qcow2State, name: str, granularity: int, data: Iterable[Buffer] | None,
          virtual_size: int | None = None) -> tuple[int, int]:
    """Write a bitmap's data clusters (those with both set and clear bits) and its table to new
    clusters; returns (table offset, table size). `data` as `NewBitmap.data`, for a disk of
    `virtual_size` bytes (default: the image's)."""
    cs = s.cluster_size
    size = s.virtual_size if virtual_size is None else virtual_size
    total = bitmap_bytes(size, granularity)
    table = array("Q", bytes(8 * -(-total // cs)))
    zeros, ones = bytes(cs), b"\xff" * cs
    last = len(table) - 1
    for i, chunk in enumerate(rechunk(data, cs, total, name)):
        piece = _clear_tail(chunk, size, granularity) if i == last else chunk
        if i == last:
            zeros = bytes(len(piece))
            ones = _clear_tail(b"\xff" * len(piece), size, granularity)
        if piece == zeros:
            continue
        if piece == ones:
            table[i] = BME_TABLE_ALL_ONES
            continue
        offset = _alloc(s, cs)
        s.host.pwrite(piece + bytes(cs - len(piece)), offset)
        table[i] = offset
    offset = _alloc(s, len(table) * 8)
    s.host.pwrite(encode_u64_entries(table, 0, len(table)), offset)
    return offset, len(table)


def used_clusters(s: Qcow2State, bm: Bitmap) -> list[int]:
    """The host clusters `bm`'s table and data clusters take (to free them), every entry checked
    as QEMU's bitmap_table_load checks it (also for an inconsistent bitmap)."""
    cs, cbits = s.cluster_size, s.cluster_bits
    if not bm.table_size:
        return []
    raw = s.host.pread(bm.table_size * 8, bm.table_offset)  # (format.py bounds the size by the file)
    if len(raw) != bm.table_size * 8:
        raise InvalidImageError(f"bitmap {bm.name!r}: bitmap table at 0x{bm.table_offset:x} runs past end of file")
    limit = max(s.host.size(), s.alloc_limit)
    out = list(range(bm.table_offset >> cbits, (bm.table_offset + len(raw) + cs - 1) >> cbits))
    for i, e in enumerate(decode_u64_table(raw)):
        offset = e & BME_TABLE_OFFSET_MASK
        if e & BME_TABLE_RESERVED_MASK or (offset and (e & BME_TABLE_ALL_ONES or offset % cs)) or \
                (offset and (offset < cs or offset + cs > limit)):
            raise CorruptImageError(f"bitmap {bm.name!r}: bitmap table entry {i} = 0x{e:x} is invalid")
        if offset:
            out.append(offset >> cbits)
    return out


def switch_directory(s: Qcow2State, entries: list[bytes], freed: Iterable[int] = ()) -> None:
    """Make `entries` the bitmap directory: written to new clusters, everything synced, then one
    header switch (no extension and autoclear bit 0 clear when `entries` is empty); afterwards
    the old directory and the host clusters `freed` are released. See the module docstring."""
    old_header = s.header
    fields = write_directory(s, entries)
    ordering.switch_header(s, **fields)
    free_after_switch(s, old_header, freed)


def write_directory(s: Qcow2State, entries: list[bytes]) -> dict[str, Any]:
    """Steps 1-2 of a directory switch: `entries` written to new clusters, everything synced.
    Returns the header fields the switch sets (the caller may add its own, e.g. `size`)."""
    placeholder = HeaderExtension(EXT_BITMAPS, bytes(BITMAPS_EXT_STRUCT.size))
    _header_fields(s, placeholder if entries else None)  # a header too big is refused before any write
    directory = b"".join(entries)
    dir_offset = 0
    if entries:
        dir_offset = _alloc(s, len(directory))
        s.host.pwrite(directory, dir_offset)
    ordering.flush(s, final=True)
    ext = HeaderExtension(EXT_BITMAPS, BITMAPS_EXT_STRUCT.pack(len(entries), 0, len(directory), dir_offset))
    fields, _ = _header_fields(s, ext if entries else None)
    return fields  # (switch_header writes a header spanning several sectors tear-safely)


def free_after_switch(s: Qcow2State, old_header: Header, freed: Iterable[int] = ()) -> None:
    """After the header switch: release the directory `old_header` named and the clusters
    `freed` (old tables and data), then flush."""
    old = next((e for e in old_header.extensions if e.ext_type == EXT_BITMAPS), None)
    rc = s.refcounts
    assert rc is not None
    if old is not None and old_header.autoclear_features & AUTOCLEAR_BITMAPS:
        old_fields = parse_bitmaps_extension(old.data, s.cluster_size, max(s.host.size(), s.alloc_limit))
        rc.defer_free(old_fields.directory_offset >> s.cluster_bits, -(-old_fields.directory_size // s.cluster_size))
    for c in freed:
        rc.defer_free(c)
    ordering.flush(s, final=True)


def _header_fields(s: Qcow2State, ext: HeaderExtension | None) -> tuple[dict[str, Any], bytes]:
    """The header fields naming the bitmaps extension `ext` (None: no bitmaps), and the new
    header's bytes."""
    h = s.header
    fields: dict[str, Any] = {
        "extensions": [e for e in h.extensions if e.ext_type != EXT_BITMAPS] + ([ext] if ext else []),
        "autoclear_features": h.autoclear_features | AUTOCLEAR_BITMAPS if ext else
        h.autoclear_features & ~AUTOCLEAR_BITMAPS,
        "incompatible_features": h.incompatible_features & ~INCOMPAT_DIRTY}
    new_bytes = serialize_header(h.replace(**fields))
    if len(new_bytes) > s.cluster_size:
        raise BitmapError(f"the header with the bitmaps extension would take {len(new_bytes)} bytes, "
                          f"more than cluster 0 ({s.cluster_size} bytes)")
    return fields, new_bytes


__all__ = ["NewBitmap", "bitmap_bytes", "load_directory", "load_table", "read_chunk", "check_new", "store", "rechunk",
           "encode_entry", "used_clusters", "switch_directory", "write_directory", "free_after_switch",
           "BME_MAX_PHYS_SIZE"]
