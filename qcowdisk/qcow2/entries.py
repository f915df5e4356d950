"""Table entries: every bit of an L1, L2 or refcount-table entry, the compressed-cluster
descriptor, subcluster bitmaps, and the codec between a table's bytes and its entries.

This is the only module that spells a mask; everything else asks it. No I/O.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

# --- L1 and L2 entries (docs/interop/qcow2.txt, "Cluster mapping") ---------------------------
OFLAG_COPIED = 1 << 63       # refcount of the cluster is exactly 1: writable in place
OFLAG_COMPRESSED = 1 << 62   # L2 only: a compressed cluster descriptor
OFLAG_ZERO = 1 << 0          # L2 only (v3, standard entries): reads as zeros
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_RESERVED_MASK = 0x3F000000000001FE
# With extended L2 entries the zero flag is replaced by the bitmap, so bit 0 is reserved too.
L2E_RESERVED_MASK_EXTL2 = L2E_RESERVED_MASK | OFLAG_ZERO
# Entry bits that take a cluster off the plain-data fast paths (the aligned-offset check is added
# per image, see `fast_read_reject_mask`).
L2E_NOT_PLAIN_DATA = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_RESERVED_MASK

# --- refcount table entries -------------------------------------------------------------------
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# --- subcluster bitmaps (extended L2: the entry's second u64) ---------------------------------
SUBCLUSTERS_PER_CLUSTER = 32
SUBCLUSTER_ALL = 0xFFFFFFFF  # all 32 subclusters


def bitmap_allocated(bitmap: int) -> int:
    """The 32 "allocated" bits of an extended L2 bitmap."""
    return bitmap & SUBCLUSTER_ALL


def bitmap_zero(bitmap: int) -> int:
    """The 32 "reads as zeros" bits of an extended L2 bitmap."""
    return bitmap >> 32


def make_bitmap(allocated: int, zero: int) -> int:
    """An extended L2 bitmap from its two halves."""
    return (allocated & SUBCLUSTER_ALL) | ((zero & SUBCLUSTER_ALL) << 32)


def subcluster_range_mask(first: int, end: int) -> int:
    """Bits for subclusters [first, end) of one cluster."""
    return ((1 << (end - first)) - 1) << first


def fast_read_reject_mask(cluster_size: int) -> int:
    """Entry bits that send a read off the one-pread fast path: anything but plain, aligned data."""
    return L2E_NOT_PLAIN_DATA | ((cluster_size - 1) & L2E_OFFSET_MASK)


class CompressedDescriptor:
    """Encode and decode compressed-cluster L2 entries for one cluster size.

    With ``x = 62 - (cluster_bits - 8)``, bits 0..x-1 are the host byte offset of the payload and
    bits x..61 the number of additional 512-byte sectors it touches.
    """

    __slots__ = ("offset_bits", "offset_mask", "sector_mask")

    def __init__(self, cluster_bits: int) -> None:
        """Descriptors of an image with `cluster_bits`."""
        self.offset_bits = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.offset_bits) - 1
        self.sector_mask = (1 << (cluster_bits - 8)) - 1

    def decode(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte count to read) of a compressed entry."""
        host_offset = entry & self.offset_mask
        sectors = (entry >> self.offset_bits) & self.sector_mask
        return host_offset, (sectors + 1) * 512 - (host_offset & 511)

    def encode(self, host_offset: int, length: int) -> int:
        """The entry for a payload of `length` bytes at `host_offset` (as QEMU writes it)."""
        extra_sectors = ((host_offset + length - 1) >> 9) - (host_offset >> 9)
        return OFLAG_COMPRESSED | (extra_sectors << self.offset_bits) | host_offset


# --- tables ------------------------------------------------------------------------------------
_SECTOR = 512
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_TYPECODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


class TableCodec:
    """Turns the bytes of a table into a native array of entries and back.

    `entry_bits` is 8/16/32/64 for arrays of big-endian integers, or 1/2/4 for sub-byte refcounts
    packed from the least significant bit (one array item per entry after decoding).
    """

    def __init__(self, entry_bits: int, table_bytes: int) -> None:
        """A codec for tables of `table_bytes` bytes with `entry_bits`-bit entries."""
        self.entry_bits = entry_bits
        self.table_bytes = table_bytes
        self.entry_count = table_bytes * 8 // entry_bits
        self._expand: list[bytes] = []
        self._swap = not _BIG_ENDIAN_HOST and entry_bits > 8  # entries are big-endian on disk
        if entry_bits >= 8:
            self.typecode = _TYPECODES[entry_bits]
            assert array(self.typecode).itemsize * 8 == entry_bits
        else:
            self.typecode = "B"
            per = 8 // entry_bits
            mask = (1 << entry_bits) - 1
            # byte value -> its `per` entries, as bytes, for a C-speed expand via join/map
            self._expand = [bytes((b >> (i * entry_bits)) & mask for i in range(per)) for b in range(256)]

    def decode(self, raw: bytes) -> array[int]:
        """Bytes of a whole table -> array of entries."""
        if self.entry_bits >= 8:
            a = array(self.typecode, raw)
            if self._swap:
                a.byteswap()
            return a
        return array("B", b"".join(map(self._expand.__getitem__, raw)))

    def encode(self, entries: array[int], lo: int, hi: int) -> bytes:
        """Entries [lo, hi) -> their bytes (lo, hi aligned so they start and end on a byte)."""
        if self.entry_bits >= 8:
            part = entries[lo:hi]
            if not _BIG_ENDIAN_HOST and self.entry_bits > 8:
                part.byteswap()
            return part.tobytes()
        per = 8 // self.entry_bits
        bits = self.entry_bits
        out = bytearray((hi - lo) // per)
        for j in range(len(out)):
            base = lo + j * per
            v = 0
            for i in range(per):
                v |= entries[base + i] << (i * bits)
            out[j] = v
        return bytes(out)

    def new(self) -> array[int]:
        """An all-zero table."""
        return array(self.typecode, bytes(self.entry_count * array(self.typecode).itemsize))

    def sector_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Entry range -> (entry_lo, entry_hi) widened to whole 512-byte sectors of the table.

        Writing whole sectors means a torn write can only tear between sectors, never inside an
        entry, and a changed entry never costs a whole-table write.
        """
        per_sector = max(1, _SECTOR * 8 // self.entry_bits)
        lo = lo // per_sector * per_sector
        hi = min(self.entry_count, -(-hi // per_sector) * per_sector)
        return lo, hi


def decode_u64_table(raw: bytes) -> array[int]:
    """A table of big-endian u64 entries (L1, L2, refcount table), `raw` a multiple of 8 bytes."""
    a = array("Q")
    a.frombytes(raw)
    if not _BIG_ENDIAN_HOST:
        a.byteswap()
    return a


def encode_u64_entries(entries: array[int], lo: int, hi: int) -> bytes:
    """Entries [lo, hi) of a u64 table as bytes."""
    return TableCodec(64, (hi - lo) * 8).encode(entries, lo, hi)


# Entries scanned per step by `nonzero_entries`: an all-zero step costs one memcmp.
_SCAN_ENTRIES = 4096
_ZEROS = bytes(8 * _SCAN_ENTRIES)


def nonzero_entries(table: array[int]) -> Iterator[int]:
    """The nonzero entries of a table, skipping all-zero stretches at C speed.

    A sparse table (a fresh 1 TiB image with 4 KiB clusters has an L1 table of 524288 entries,
    nearly all zero) then costs a few hundred memcmp calls instead of a Python step per entry.
    """
    raw = table.tobytes()
    width = table.itemsize * _SCAN_ENTRIES
    zeros = _ZEROS[:width]
    for start in range(0, len(table), _SCAN_ENTRIES):
        lo = start * table.itemsize
        if not raw.startswith(zeros if lo + width <= len(raw) else zeros[:len(raw) - lo], lo):
            yield from filter(None, table[start:start + _SCAN_ENTRIES])
