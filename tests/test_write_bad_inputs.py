"""The "Writes (read-write open)" rows of shared/docs/bad-inputs.md, one test (family) per row.

- An L2 entry mapping guest data onto metadata (the header, the L1 table, an L2 table, the
  refcount table, a refcount block, the snapshot table): the write is refused with
  CorruptImageError, the metadata bytes stay as they were, the corrupt bit is set in the file,
  further writes are refused, a read-write reopen is refused and a read-only one works.
- Corrupt bit set: read-write open refused, read-only works.
- Dirty bit set: read-only open works; read-write open rebuilds the refcounts first.
- Refcount overflow: refused with an error naming the cluster. The honest path found: the refcount
  rebuild of a dirty (lazy-refcounts) image with refcount_bits=1 in which two guest clusters share
  one host cluster, so the rebuilt count (2) does not fit in the width. Writes themselves never
  increment an existing refcount (copy-on-write only decrements), and qemu-img refuses to create
  the snapshots that would push a count past the width.

Images are made by qemu-img/qemu-io and patched at byte level; nothing else is adjusted.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from qcowdisk import CorruptImageError, QcowError, QcowFile, RefcountOverflowError
from qemutools import assert_clean, create, qemu_img, qemu_io, to_raw

CS = 65536
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
HDR_INCOMPAT = 72


class Layout:
    """Offsets of a qcow2 image's metadata, read from its bytes."""

    def __init__(self, path: Path) -> None:
        d = path.read_bytes()
        self.cluster_size = 1 << struct.unpack_from(">I", d, 20)[0]
        self.l1_offset = struct.unpack_from(">Q", d, 40)[0]
        self.reftable_offset = struct.unpack_from(">Q", d, 48)[0]
        self.nb_snapshots = struct.unpack_from(">I", d, 60)[0]
        self.snapshots_offset = struct.unpack_from(">Q", d, 64)[0]
        self.incompat = struct.unpack_from(">Q", d, HDR_INCOMPAT)[0]
        self.extended_l2 = bool(self.incompat & (1 << 4))
        self.l1_entry0 = struct.unpack_from(">Q", d, self.l1_offset)[0]
        self.l2_offset = self.l1_entry0 & OFFSET_MASK
        self.refblock_offset = struct.unpack_from(">Q", d, self.reftable_offset)[0] & ~0x1FF
        self.entry_size = 16 if self.extended_l2 else 8

    def l2_entry_offset(self, guest_cluster: int) -> int:
        """File offset of guest_cluster's L2 entry (guest_cluster < entries per table)."""
        return self.l2_offset + guest_cluster * self.entry_size


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def set_incompat(path: Path, bits: int) -> None:
    write_u64(path, HDR_INCOMPAT, read_u64(path, HDR_INCOMPAT) | bits)


# --------------------------------------------------------------------------- data over metadata

# The header is not in this list: it occupies cluster 0, and an L2 entry naming host offset 0 means
# "unallocated" (see test_l2_entry_naming_the_header_offset below), so no L2 entry can map onto it.
TARGETS = ["l1_table", "l2_table", "refcount_table", "refcount_block", "snapshot_table"]


def _image_with_target(tmp_path: Path, target: str, extended_l2: bool) -> tuple[Path, int, int]:
    """A qemu image whose guest cluster 1 maps (COPIED, in place) onto the target metadata.

    Returns (image, host offset of the target, guest offset of the patched cluster)."""
    img = tmp_path / "bad.qcow2"
    create(str(img), "8M", options="extended_l2=on" if extended_l2 else None)
    qemu_io(str(img), "write -q -P 0x11 0 128k")
    if target == "snapshot_table":
        qemu_img("snapshot", "-c", "s1", str(img))
        qemu_io(str(img), "write -q -P 0x22 64k 64k")  # cluster 1 and its L2 table are copied: COPIED again
    lay = Layout(img)
    host = {"l1_table": lay.l1_offset, "l2_table": lay.l2_offset,
            "refcount_table": lay.reftable_offset, "refcount_block": lay.refblock_offset,
            "snapshot_table": lay.snapshots_offset}[target]
    assert host % CS == 0 and (target != "snapshot_table" or lay.nb_snapshots == 1)
    entry_at = lay.l2_entry_offset(1)
    entry = read_u64(img, entry_at)
    assert entry & COPIED and entry & OFFSET_MASK, f"test premise: cluster 1 allocated and COPIED ({entry:#x})"
    write_u64(img, entry_at, COPIED | host)  # extended L2: the bitmap (next 8 bytes) stays: all allocated
    return img, host, CS


def _write_and_flush(disk: QcowFile, offset: int, data: bytes) -> None:
    """Write, then flush: a refusal may come from either, as a write that only reached the cache
    must still be caught before it lands."""
    disk.write_at(offset, data)
    disk.flush()


@pytest.mark.parametrize("how", ["partial", "whole"])
@pytest.mark.parametrize("extended_l2", [False, True], ids=["l2", "extl2"])
@pytest.mark.parametrize("target", TARGETS)
def test_write_onto_metadata_is_refused(tmp_path: Path, target: str, extended_l2: bool, how: str) -> None:
    """The write is refused with CorruptImageError; metadata untouched; corrupt bit set; later rw refused."""
    img, host, guest = _image_with_target(tmp_path, target, extended_l2)
    target_before = bytearray(read_range(img, host, CS))
    disk = QcowFile.open(str(img))
    try:
        offset, data = (guest + 100, b"\xde\xad" * 1000) if how == "partial" else (guest, b"\xde\xad" * (CS // 2))
        with pytest.raises(CorruptImageError):
            _write_and_flush(disk, offset, data)
        with pytest.raises(QcowError):
            disk.write_at(5 * CS, b"more")  # the image is now marked corrupt: no further writes
    finally:
        disk.close()
    after = img.read_bytes()
    target_after = bytearray(after[host:host + CS])
    assert target_after == target_before, f"{target} bytes changed on disk"
    assert b"\xde\xad\xde\xad" not in after, "the refused data reached the file"
    assert read_u64(img, HDR_INCOMPAT) & INCOMPAT_CORRUPT, "corrupt bit not set in the file header"
    with pytest.raises(QcowError):
        QcowFile.open(str(img))
    with QcowFile.open(str(img), readonly=True) as disk:
        assert disk.read_at(0, 4) == b"\x11" * 4


def test_refused_write_names_metadata(tmp_path: Path) -> None:
    """The error says what was about to be overwritten (as QEMU's 'overlaps with active L1 table')."""
    img, host, guest = _image_with_target(tmp_path, "l1_table", False)
    with QcowFile.open(str(img)) as disk:
        with pytest.raises(CorruptImageError) as ei:
            _write_and_flush(disk, guest, b"x" * 512)
    msg = str(ei.value).lower()
    assert "l1" in msg, msg
    assert hex(host) in msg or str(host) in msg, f"message does not name the host offset {host:#x}: {msg}"


@pytest.mark.parametrize("how", ["partial", "whole"])
def test_l2_entry_naming_the_header_offset(tmp_path: Path, how: str) -> None:
    """The header row: an L2 entry with host offset 0 (and COPIED) is an unallocated cluster, as QEMU
    reads it, so a write allocates a fresh cluster and the header stays as it was."""
    img = tmp_path / "h.qcow2"
    create(str(img), "8M")
    qemu_io(str(img), "write -q -P 0x11 0 128k")
    lay = Layout(img)
    write_u64(img, lay.l2_entry_offset(1), COPIED)
    header_before = read_range(img, 0, CS)
    payload = b"\xde\xad" * 1000 if how == "partial" else b"\xde\xad" * (CS // 2)
    offset = CS + 100 if how == "partial" else CS
    with QcowFile.open(str(img)) as disk:
        disk.write_at(offset, payload)
        assert disk.read_at(offset, len(payload)) == payload
    assert read_range(img, 0, CS) == header_before, "the header changed"
    raw = to_raw(str(img), str(tmp_path / "o.raw"))
    assert raw[offset:offset + len(payload)] == payload
    assert raw[:CS] == b"\x11" * CS


@pytest.mark.parametrize("how", ["partial", "whole"])
def test_extended_l2_entry_offset_zero_with_allocated_bits(tmp_path: Path, how: str) -> None:
    """Extended L2: offset 0 with allocation bits set is an invalid entry. QEMU refuses both partial
    and whole-cluster writes to it ("Invalid cluster entry found") and marks the image corrupt;
    qcowdisk must refuse with CorruptImageError and leave the header alone."""
    img = tmp_path / "h.qcow2"
    create(str(img), "8M", options="extended_l2=on")
    qemu_io(str(img), "write -q -P 0x11 0 128k")
    lay = Layout(img)
    write_u64(img, lay.l2_entry_offset(1), COPIED)  # the bitmap word after it still says "all allocated"
    header_before = bytearray(read_range(img, 0, CS))
    payload = b"\xde\xad" * 1000 if how == "partial" else b"\xde\xad" * (CS // 2)
    with QcowFile.open(str(img)) as disk:
        with pytest.raises(CorruptImageError):
            _write_and_flush(disk, CS + 100 if how == "partial" else CS, payload)
    header_after = bytearray(read_range(img, 0, CS))
    header_before[HDR_INCOMPAT:HDR_INCOMPAT + 8] = header_after[HDR_INCOMPAT:HDR_INCOMPAT + 8] = bytes(8)
    assert header_after == header_before, "the header changed"
    assert b"\xde\xad\xde\xad" not in img.read_bytes()


# --------------------------------------------------------------------------- corrupt bit

def test_corrupt_bit_opens_read_only_only(tmp_path: Path) -> None:
    """An image with the corrupt bit: read-write open refused (QcowError), read-only works, file untouched."""
    img = tmp_path / "c.qcow2"
    create(str(img), "4M")
    qemu_io(str(img), "write -q -P 0x33 0 64k")
    set_incompat(img, INCOMPAT_CORRUPT)
    before = img.read_bytes()
    with pytest.raises(QcowError) as ei:
        QcowFile.open(str(img))
    assert "corrupt" in str(ei.value).lower(), str(ei.value)
    with QcowFile.open(str(img), readonly=True) as disk:
        assert disk.read_at(0, 64 * 1024) == b"\x33" * 65536
    assert img.read_bytes() == before


# --------------------------------------------------------------------------- dirty bit

def _stale_refcount_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A lazy-refcounts image whose refcount block is stale (data clusters' counts zeroed), dirty bit set."""
    img = tmp_path / "d.qcow2"
    create(str(img), "8M", options="lazy_refcounts=on")
    qemu_io(str(img), "write -q -P 0x44 0 192k", "write -q -P 0x55 1M 64k")
    raw = to_raw(str(img), str(tmp_path / "before.raw"))
    lay = Layout(img)
    # zero the refcounts of the data clusters: a writer that trusted them would reuse live clusters
    with open(img, "r+b") as f:
        for guest in (0, CS, 2 * CS, 16 * CS):
            f.seek(lay.l2_entry_offset(guest // CS))
            host = struct.unpack(">Q", f.read(8))[0] & OFFSET_MASK
            assert host
            f.seek(lay.refblock_offset + 2 * (host // CS))
            f.write(b"\0\0")
    set_incompat(img, INCOMPAT_DIRTY)
    return img, raw


def test_dirty_bit_read_only_open_works(tmp_path: Path) -> None:
    """Read-only open of a dirty image reads the data and changes nothing."""
    img, raw = _stale_refcount_image(tmp_path)
    before = img.read_bytes()
    with QcowFile.open(str(img), readonly=True) as disk:
        assert disk.read_at(0, len(raw)) == raw
    assert img.read_bytes() == before


def test_dirty_bit_read_write_open_rebuilds_refcounts(tmp_path: Path) -> None:
    """Read-write open rebuilds the refcounts: new writes do not land on live clusters; check clean."""
    img, raw = _stale_refcount_image(tmp_path)
    expected = bytearray(raw)
    with QcowFile.open(str(img)) as disk:
        for i in range(6):  # new clusters: with stale counts these would reuse the live ones
            offset = (3 + i) * 1024 * 1024 // 2
            disk.write_at(offset, bytes([0x60 + i]) * CS)
            expected[offset:offset + CS] = bytes([0x60 + i]) * CS
        assert disk.read_at(0, len(expected)) == bytes(expected)
    assert not read_u64(img, HDR_INCOMPAT) & INCOMPAT_DIRTY, "dirty bit still set after close"
    assert_clean(str(img))
    assert to_raw(str(img), str(tmp_path / "after.raw")) == bytes(expected)


# --------------------------------------------------------------------------- refcount overflow

def test_refcount_overflow_names_the_cluster(tmp_path: Path) -> None:
    """refcount_bits=1, dirty, two guest clusters sharing one host cluster: the rebuild needs a
    count of 2, which does not fit: RefcountOverflowError naming the cluster. Read-only still works."""
    img = tmp_path / "o.qcow2"
    create(str(img), "4M", options="refcount_bits=1,lazy_refcounts=on")
    qemu_io(str(img), "write -q -P 0x66 0 64k")
    lay = Layout(img)
    entry0 = read_u64(img, lay.l2_entry_offset(0))
    host = entry0 & OFFSET_MASK
    write_u64(img, lay.l2_entry_offset(3), entry0 & ~COPIED)  # guest cluster 3 -> the same host cluster
    write_u64(img, lay.l2_entry_offset(0), entry0 & ~COPIED)  # shared: neither may be written in place
    set_incompat(img, INCOMPAT_DIRTY)
    with pytest.raises(RefcountOverflowError) as ei:
        QcowFile.open(str(img))
    msg = str(ei.value)
    cluster = host // lay.cluster_size
    assert hex(host) in msg.lower() or re.search(rf"\b{host}\b", msg) or re.search(rf"cluster {cluster}\b", msg), \
        f"message does not name host cluster {cluster} ({host:#x}): {msg}"
    with QcowFile.open(str(img), readonly=True) as disk:
        assert disk.read_at(3 * CS, 4) == b"\x66" * 4
