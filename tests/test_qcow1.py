"""qcow v1 (legacy `qemu-img -f qcow`) read-only reader, checked byte for byte against QEMU."""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib
from array import array

import pytest

from qcowdisk.errors import (
    BackingChainError,
    CorruptImageError,
    InvalidImageError,
    QcowError,
    ReadOnlyError,
    UnsupportedFeatureError,
)
from qcowdisk.hostio import HostFile
from qcowdisk.qcow1 import Qcow1File
from qemutools import create, info, pattern, qemu_img, qemu_io, to_raw, write_raw

MiB = 1024 * 1024
# Not a multiple of the cluster size, and bigger than one L2 table's reach (4 KiB * 512 = 2 MiB).
SIZE = 5 * MiB + 3 * 512
HEADER = struct.Struct(">4sIQIIQBBHIQ")


def guest_data(size: int = SIZE, seed: int = 1) -> bytes:
    """Random (incompressible) regions, repetitive (compressible) regions and holes."""
    buf = bytearray(size)
    rnd = random.Random(seed)
    text = b"qcowdisk legacy v1 " * 20000
    pos = 0
    while pos < size:
        n = min(size - pos, rnd.choice([512, 3000, 4096, 9000, 65536, 300000]))
        kind = rnd.randrange(3)
        if kind == 0:
            buf[pos:pos + n] = rnd.randbytes(n)
        elif kind == 1:
            start = rnd.randrange(1000)
            buf[pos:pos + n] = text[start:start + n]
        pos += n
    if size > 4 * MiB + 4096:
        # a long hole that spans a whole L2 table's reach, so an L1 entry stays unallocated
        buf[2 * MiB:4 * MiB + 4096] = bytes(2 * MiB + 4096)
    assert len(buf) == size
    return bytes(buf)


def slices(size: int, cluster: int) -> list[tuple[int, int]]:
    """Reads that start and end inside clusters, cross L2-table boundaries, and the whole disk."""
    out = [(0, size), (0, 1), (1, cluster), (cluster - 7, 20), (2 * MiB - 100, 300),
           (3 * cluster + 5, 10 * cluster), (size - 1, 1), (size - cluster - 3, cluster + 3)]
    rnd = random.Random(7)
    for _ in range(25):
        off = rnd.randrange(size)
        out.append((off, rnd.randrange(1, min(300000, size - off) + 1)))
    return out


def assert_reads_match(disk: Qcow1File, expect: bytes) -> None:
    """read_at and readinto_at (several buffer types) agree with QEMU's guest view."""
    assert disk.virtual_size == len(expect)
    assert disk.read_at(0, len(expect)) == expect
    for off, want in slices(len(expect), disk.cluster_size):
        length = min(want, len(expect) - off)
        assert disk.read_at(off, length) == expect[off:off + length], (off, length)
        ba = bytearray(length + 8)
        mv = memoryview(ba)[4:4 + length]  # a view into the middle of a bigger buffer
        assert disk.readinto_at(mv, off) == length
        assert ba[4:4 + length] == expect[off:off + length], (off, length)
        assert ba[:4] == b"\0" * 4 and ba[-4:] == b"\0" * 4  # nothing written outside the view
    words = array("I", bytes(4096))  # a non-byte buffer format
    assert disk.readinto_at(words, 8192) == 4096
    assert words.tobytes() == expect[8192:8192 + 4096]


def convert_compressed(src: str, dst: str, *extra: str) -> None:
    """`qemu-img convert -c -O qcow`. QEMU 7.2 exits 1 silently after writing everything: its final
    zero-length "EOF" compressed write is refused by the qcow driver. So check the result instead."""
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow", *extra, src, dst, check=False)
    p = qemu_img("compare", "-f", "raw", "-F", "qcow", src, dst, check=False)
    assert p.returncode == 0, f"convert -c produced a wrong image: {p.stdout}{p.stderr}"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Shared images for the read-only comparisons (built once: qemu-img is the slow part)."""
    d = tmp_path_factory.mktemp("qcow1")
    raw = write_raw(str(d / "src.raw"), guest_data())
    plain = str(d / "plain.qcow")
    qemu_img("convert", "-f", "raw", "-O", "qcow", raw, plain)
    comp = str(d / "comp.qcow")
    convert_compressed(raw, comp)
    return {"dir": str(d), "raw": raw, "plain": plain, "comp": comp}


# --- reads compared with QEMU ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "comp"])
def test_converted_image_matches_qemu(images: dict[str, str], name: str, tmp_path) -> None:
    image = images[name]
    assert info(image)["format"] == "qcow"
    expect = to_raw(image, str(tmp_path / "out.raw"))
    with Qcow1File.open(image) as disk:
        assert disk.format_name == "qcow"
        assert disk.cluster_size == 4096
        assert disk.backing is None and disk.backing_file is None
        assert_reads_match(disk, expect)


def table_census(path: str) -> tuple[int, int, int]:
    """(unallocated L1 entries, compressed L2 entries, plain L2 entries), read independently."""
    h = header_fields(path)
    shift = h["cluster_bits"] + h["l2_bits"]
    l1_size = (h["size"] + (1 << shift) - 1) >> shift
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"])
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        holes = compressed = plain = 0
        for l2 in l1:
            if not l2:
                holes += 1
                continue
            f.seek(l2)
            n = 1 << h["l2_bits"]
            for e in struct.unpack(f">{n}Q", f.read(8 * n)):
                if e >> 63:
                    compressed += 1
                elif e:
                    plain += 1
    return holes, compressed, plain


def test_images_exercise_every_entry_kind(images: dict[str, str]) -> None:
    # guards the comparisons above: they must cover holes, compressed and plain clusters
    holes, compressed, plain = table_census(images["plain"])
    assert holes >= 1 and compressed == 0 and plain > 100
    holes, compressed, plain = table_census(images["comp"])
    assert holes >= 1 and compressed > 100 and plain > 20  # random data stays uncompressed


def test_qemu_io_writes_and_empty_image(tmp_path) -> None:
    image = create(str(tmp_path / "w.qcow"), "3M", fmt="qcow")
    with Qcow1File.open(image) as disk:  # freshly created: all zeros, no L2 tables
        assert disk.virtual_size == 3 * MiB
        assert disk.read_at(0, 3 * MiB) == bytes(3 * MiB)
    qemu_io(image, "write -P 0x5a 1000 9000", "write -P 0x11 2095000 10000",
            "write -P 0x77 3144000 1000", fmt="qcow")
    expect = to_raw(image, str(tmp_path / "w.raw"))
    with Qcow1File.open(image) as disk:
        assert_reads_match(disk, expect)


def test_size_not_sector_multiple_is_truncated_like_qemu(tmp_path) -> None:
    image = create(str(tmp_path / "s.qcow"), 1536, fmt="qcow")
    qemu_io(image, "write -P 0x42 0 1536", fmt="qcow")
    patch(image, 24, struct.pack(">Q", 1500))  # QEMU sees whole sectors only
    expect = to_raw(image, str(tmp_path / "s.raw"))
    assert len(expect) == 1024
    with Qcow1File.open(image) as disk:
        assert disk.virtual_size == 1024
        assert disk.read_at(0, 4096) == expect


def test_raw_backing_file(tmp_path) -> None:
    base = write_raw(str(tmp_path / "base.raw"), pattern(3 * MiB, seed=3))
    top = create(str(tmp_path / "top.qcow"), 3 * MiB, fmt="qcow", backing="base.raw", backing_fmt="raw")
    qemu_io(top, "write -P 0xcd 700 5000", "write -P 0 1048576 65536", "write -P 0xee 2097000 3000",
            fmt="qcow")
    expect = to_raw(top, str(tmp_path / "top.raw"))
    with Qcow1File.open(top) as disk:
        assert disk.backing_file == "base.raw"  # as stored
        assert disk.backing is not None
        assert disk.cluster_size == 512  # what QEMU picks for images with a backing file
        assert_reads_match(disk, expect)
    assert os.path.exists(base)


def test_backing_shorter_than_overlay_reads_zeros(tmp_path) -> None:
    write_raw(str(tmp_path / "short.raw"), pattern(MiB + 512, seed=4))
    top = create(str(tmp_path / "long.qcow"), 3 * MiB, fmt="qcow", backing="short.raw", backing_fmt="raw")
    qemu_io(top, "write -P 0x99 2M 4096", fmt="qcow")
    expect = to_raw(top, str(tmp_path / "long.raw"))
    with Qcow1File.open(top) as disk:
        assert_reads_match(disk, expect)
        assert disk.read_at(MiB + 512, 4096) == bytes(4096)


def test_qcow1_chain_and_relative_name_resolution(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    write_raw(str(sub / "base.raw"), pattern(2 * MiB, seed=5))
    mid = create(str(sub / "mid.qcow"), 2 * MiB, fmt="qcow", backing="base.raw", backing_fmt="raw")
    qemu_io(mid, "write -P 0x21 4096 70000", fmt="qcow")
    top = create(str(sub / "top.qcow"), 2 * MiB, fmt="qcow", backing="mid.qcow", backing_fmt="qcow")
    qemu_io(top, "write -P 0x43 40000 9000", "write -P 0x44 1500000 512", fmt="qcow")
    expect = to_raw(top, str(tmp_path / "chain.raw"))
    # a decoy with the same name in the current directory must not be picked up
    monkeypatch.chdir(tmp_path)
    write_raw(str(tmp_path / "mid.qcow"), b"not an image")
    with Qcow1File.open(os.path.relpath(top)) as disk:
        assert isinstance(disk.backing, Qcow1File)
        assert disk.backing.backing_file == "base.raw"
        assert_reads_match(disk, expect)


def test_qcow2_backing_file(tmp_path) -> None:
    base = create(str(tmp_path / "base.qcow2"), 2 * MiB, fmt="qcow2")
    qemu_io(base, "write -P 0x61 0 100000", "write -P 0x62 1M 5000")
    top = create(str(tmp_path / "top.qcow"), 2 * MiB, fmt="qcow", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x63 50000 3000", fmt="qcow")
    expect = to_raw(top, str(tmp_path / "top.raw"))
    with Qcow1File.open(top) as disk:
        assert disk.backing_file == "base.qcow2"
        assert_reads_match(disk, expect)


def test_compressed_overlay_with_backing(tmp_path) -> None:
    write_raw(str(tmp_path / "b.raw"), pattern(2 * MiB, seed=6))
    src = write_raw(str(tmp_path / "src.raw"), guest_data(2 * MiB, seed=9))
    top = str(tmp_path / "ct.qcow")
    convert_compressed(src, top, "-B", "b.raw", "-F", "raw")
    expect = to_raw(top, str(tmp_path / "ct.out"))
    with Qcow1File.open(top) as disk:
        assert disk.backing_file == "b.raw"
        assert_reads_match(disk, expect)


# --- backing chain errors -------------------------------------------------------------------

def test_missing_backing_file(tmp_path) -> None:
    write_raw(str(tmp_path / "gone.raw"), bytes(MiB))
    top = create(str(tmp_path / "t.qcow"), MiB, fmt="qcow", backing="gone.raw", backing_fmt="raw")
    os.unlink(tmp_path / "gone.raw")
    with pytest.raises(BackingChainError, match=r"gone\.raw"):
        Qcow1File.open(top)


def test_backing_loop_is_an_error(tmp_path) -> None:
    a = str(tmp_path / "a.qcow")
    b = str(tmp_path / "b.qcow")
    create(a, MiB, fmt="qcow")
    create(b, MiB, fmt="qcow", backing="a.qcow", backing_fmt="qcow")
    shutil.copy(b, a)  # same name length trick: a's header now names "a.qcow" ...
    patch(a, HEADER.size, b"b.qcow")  # ... and points at b: a -> b -> a
    with pytest.raises(BackingChainError):
        Qcow1File.open(a)
    self_loop = str(tmp_path / "c.qcow")
    shutil.copy(b, self_loop)
    patch(self_loop, HEADER.size, b"c.qcow")
    with pytest.raises(BackingChainError):
        Qcow1File.open(self_loop)


def test_max_nesting_depth(tmp_path) -> None:
    prev = write_raw(str(tmp_path / "d0.raw"), bytes(MiB))
    for i in range(1, 5):
        prev = create(str(tmp_path / f"d{i}.qcow"), MiB, fmt="qcow", backing=os.path.basename(prev),
                      backing_fmt="raw" if i == 1 else "qcow")
    # d4 has four backing files: a limit of 4 allows it, 3 does not (each level counted once)
    with Qcow1File.open(prev, max_nesting_depth=4) as disk:
        assert disk.read_at(0, 512) == bytes(512)
    with pytest.raises(BackingChainError, match=r"deep|depth"):
        Qcow1File.open(prev, max_nesting_depth=3)


# --- API edges ------------------------------------------------------------------------------

def test_clipping_and_argument_checks(images: dict[str, str]) -> None:
    with open(images["raw"], "rb") as f:
        data = f.read()
    with Qcow1File.open(images["plain"]) as disk:
        vs = disk.virtual_size
        assert disk.read_at(vs - 100, 1000) == data[-100:]
        assert disk.read_at(vs, 10) == b""
        assert disk.read_at(vs + 12345, 10) == b""
        assert disk.read_at(5, 0) == b""
        buf = bytearray(4096)
        assert disk.readinto_at(buf, vs - 1000) == 1000
        assert buf[:1000] == data[-1000:] and buf[1000:] == bytes(3096)
        assert disk.readinto_at(buf, vs) == 0
        with pytest.raises(ValueError, match="negative"):
            disk.read_at(-1, 10)
        with pytest.raises(ValueError, match="negative"):
            disk.read_at(0, -1)
        with pytest.raises(ValueError, match="negative"):
            disk.readinto_at(bytearray(10), -5)
        with pytest.raises(TypeError):
            disk.readinto_at(b"immutable", 0)
    with pytest.raises(ValueError, match="closed"):
        disk.read_at(0, 10)  # closed
    disk.close()  # idempotent


def test_readonly_false_refused(images: dict[str, str]) -> None:
    with pytest.raises(ReadOnlyError, match="read-only"):
        Qcow1File.open(images["plain"], readonly=False)


def test_host_factory_is_used(images: dict[str, str]) -> None:
    opened: list[tuple[str, bool]] = []
    closed: list[str] = []

    class Recording(HostFile):
        def __init__(self, path: str, writable: bool) -> None:
            opened.append((path, writable))
            super().__init__(path, writable)

        def close(self) -> None:
            closed.append(self.path)
            super().close()

    with Qcow1File.open(images["plain"], host_factory=Recording) as disk:
        disk.read_at(0, 100)
    assert opened == [(images["plain"], False)]
    assert closed


# --- malformed headers ----------------------------------------------------------------------

def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_fields(path: str) -> dict[str, int]:
    with open(path, "rb") as f:
        v = HEADER.unpack(f.read(HEADER.size))
    names = ["magic", "version", "backing_file_offset", "backing_file_size", "mtime", "size",
             "cluster_bits", "l2_bits", "padding", "crypt_method", "l1_table_offset"]
    return dict(zip(names, v, strict=True))


@pytest.fixture
def small(tmp_path) -> str:
    """A small image with data in its first clusters (own copy: tests patch it)."""
    image = create(str(tmp_path / "small.qcow"), 4 * MiB, fmt="qcow")
    qemu_io(image, "write -P 0x33 0 16384", "write -P 0x34 3M 4096", fmt="qcow")
    return image


BAD_HEADERS = [
    # (offset, bytes, error class, text that must appear)
    (0, b"QFI\xfa", InvalidImageError, "magic"),
    (4, struct.pack(">I", 2), InvalidImageError, "version"),
    (4, struct.pack(">I", 0), InvalidImageError, "version"),
    (24, struct.pack(">Q", 1), InvalidImageError, "size"),
    (24, struct.pack(">Q", 0), InvalidImageError, "size"),
    (24, struct.pack(">Q", 1 << 63), InvalidImageError, "size"),
    (24, struct.pack(">Q", 1 << 50), InvalidImageError, "L1"),  # L1 table far too big
    (32, bytes([8]), InvalidImageError, "cluster_bits"),
    (32, bytes([17]), InvalidImageError, "cluster_bits"),
    (32, bytes([255]), InvalidImageError, "cluster_bits"),
    (33, bytes([5]), InvalidImageError, "l2_bits"),
    (33, bytes([14]), InvalidImageError, "l2_bits"),
    (36, struct.pack(">I", 1), UnsupportedFeatureError, "crypt_method"),
    (36, struct.pack(">I", 7), UnsupportedFeatureError, "crypt_method"),
    (40, struct.pack(">Q", 0), CorruptImageError, "l1_table_offset"),
    (40, struct.pack(">Q", 1 << 40), CorruptImageError, "l1_table_offset"),
    (40, struct.pack(">Q", (1 << 64) - 8), CorruptImageError, "l1_table_offset"),
    (8, struct.pack(">QI", 48, 1024), InvalidImageError, "backing_file_size"),
    (8, struct.pack(">QI", 48, 0xFFFFFFFF), InvalidImageError, "backing_file_size"),
    (8, struct.pack(">QI", 1 << 40, 10), CorruptImageError, "backing_file_offset"),
    (8, struct.pack(">QI", 4, 10), CorruptImageError, "backing_file_offset"),
]


@pytest.mark.parametrize("offset,data,exc,text", BAD_HEADERS,
                         ids=[f"{t}-{i}" for i, (_, _, _, t) in enumerate(BAD_HEADERS)])
def test_bad_header_fields(small: str, offset: int, data: bytes, exc: type, text: str) -> None:
    patch(small, offset, data)
    with pytest.raises(exc, match=text):
        Qcow1File.open(small)


def test_truncated_files(small: str) -> None:
    with open(small, "rb") as f:
        head = f.read()
    write_raw(small, head[:20])
    with pytest.raises(InvalidImageError, match="header"):
        Qcow1File.open(small)
    write_raw(small, b"")
    with pytest.raises(InvalidImageError):
        Qcow1File.open(small)
    l1_off = HEADER.unpack(head[:HEADER.size])[-1]
    write_raw(small, head[:l1_off + 4])  # header intact, L1 table cut short
    with pytest.raises(CorruptImageError, match="l1_table_offset"):
        Qcow1File.open(small)


def test_qcow2_image_is_not_qcow1(tmp_path) -> None:
    image = create(str(tmp_path / "v2.qcow2"), MiB, fmt="qcow2")
    with pytest.raises(InvalidImageError, match="version"):
        Qcow1File.open(image)


def test_error_messages_name_value_and_limit(small: str) -> None:
    patch(small, 32, bytes([17]))
    with pytest.raises(InvalidImageError) as e:
        Qcow1File.open(small)
    assert "17" in str(e.value) and "16" in str(e.value) and small in str(e.value)


# --- malformed tables -----------------------------------------------------------------------

def l1_entry_offset(path: str, index: int = 0) -> int:
    return header_fields(path)["l1_table_offset"] + 8 * index


def read_u64(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def test_l1_entry_unaligned_or_past_eof(small: str) -> None:
    at = l1_entry_offset(small)
    l2 = read_u64(small, at)
    assert l2 != 0
    patch(small, at, struct.pack(">Q", l2 + 8))
    with Qcow1File.open(small) as disk:  # tables are checked when a read uses them
        assert disk.read_at(3 * MiB, 4096) == b"\x34" * 4096  # another L1 entry still reads
        with pytest.raises(CorruptImageError, match="L2 table offset"):
            disk.read_at(0, 512)
    patch(small, at, struct.pack(">Q", 1 << 44))
    with Qcow1File.open(small) as disk:
        with pytest.raises(CorruptImageError, match="end of the file"):
            disk.read_at(0, 512)


def test_l2_entry_unaligned_or_past_eof(small: str) -> None:
    l2 = read_u64(small, l1_entry_offset(small))
    data = read_u64(small, l2 + 8)  # second cluster's entry
    assert data != 0 and not data >> 63
    patch(small, l2 + 8, struct.pack(">Q", data + 512))
    with Qcow1File.open(small) as disk:
        assert disk.read_at(0, 4096) == b"\x33" * 4096  # the first cluster is fine
        with pytest.raises(CorruptImageError, match="not aligned"):
            disk.read_at(4096, 1)
    patch(small, l2 + 8, struct.pack(">Q", 1 << 40))
    with Qcow1File.open(small) as disk:
        with pytest.raises(CorruptImageError, match="end of the file"):
            disk.read_at(4000, 200)


def compressed_image(tmp_path) -> tuple[str, int, int]:
    """A compressed image; returns (path, L2 offset of the first table, its first entry)."""
    src = write_raw(str(tmp_path / "c.raw"), b"compress me " * 100000)
    image = str(tmp_path / "c.qcow")
    convert_compressed(src, image)
    l2 = read_u64(image, l1_entry_offset(image))
    entry = read_u64(image, l2)
    assert entry >> 63, "expected a compressed cluster"
    return image, l2, entry


def compressed_entry(offset: int, size: int, cluster_bits: int = 12) -> int:
    return (1 << 63) | (size << (63 - cluster_bits)) | offset


def append(path: str, data: bytes) -> int:
    with open(path, "ab") as f:
        at = f.tell()
        f.write(data)
    return at


def test_compressed_cluster_corruptions(tmp_path) -> None:
    image, l2, entry = compressed_image(tmp_path)
    with Qcow1File.open(image) as disk:
        assert disk.read_at(0, 24) == b"compress me compress me "
    cases = []
    # garbage that is not deflate
    cases.append(compressed_entry(append(image, b"\xff" * 100), 100))
    # valid deflate of less than a cluster
    short = zlib.compressobj(wbits=-12)
    short_data = short.compress(b"x" * 1000) + short.flush()
    cases.append(compressed_entry(append(image, short_data), len(short_data)))
    # a bomb: inflates far beyond one cluster (must stop after one cluster, not inflate it all)
    bomb = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb_data = bomb.compress(bytes(4 << 20)) + bomb.flush()
    assert len(bomb_data) < 4096
    cases.append(compressed_entry(append(image, bomb_data), len(bomb_data)))
    # past the end of the file
    cases.append(compressed_entry(os.path.getsize(image) - 10, 100))
    # zero length
    cases.append(compressed_entry(48, 0))
    for bad in cases:
        patch(image, l2, struct.pack(">Q", bad))
        with Qcow1File.open(image) as disk:
            with pytest.raises(CorruptImageError, match="compressed"):
                disk.read_at(0, 4096)
    patch(image, l2, struct.pack(">Q", entry))
    with Qcow1File.open(image) as disk:
        assert disk.read_at(0, 24) == b"compress me compress me "


def test_random_corruption_raises_only_qcow_errors(tmp_path) -> None:
    """Bounded fuzz: flipped bytes in the header and tables never escape as other exceptions."""
    image, l2, _ = compressed_image(tmp_path)
    qemu_io(image, "write -P 0x70 1M 8192", fmt="qcow")  # plain clusters among compressed ones
    with open(image, "rb") as f:
        pristine = f.read()
    l1 = header_fields(image)["l1_table_offset"]
    hot = list(range(48)) + list(range(l1, l1 + 16)) + list(range(l2, l2 + 64))
    rnd = random.Random(11)
    fuzzed = str(tmp_path / "fuzz.qcow")
    for _ in range(150):
        buf = bytearray(pristine)
        for _ in range(rnd.randint(1, 4)):
            buf[rnd.choice(hot)] = rnd.randrange(256)
        write_raw(fuzzed, bytes(buf))
        try:
            with Qcow1File.open(fuzzed) as disk:
                disk.read_at(0, min(disk.virtual_size, 3 * MiB))
        except QcowError:
            pass
