"""Every hostile or broken input of docs/bad-inputs.md ("Header", "Tables", "Backing chains").

Each test builds a good image with qemu-img/qemu-io, corrupts exactly one field with
tests/imagepatch.py (which parses the image with struct, not with qcowdisk), opens it read-only
and reads the affected range. The answer must be the right QcowError subclass, with a message
naming the field (or a clear word for it) and the offending value (decimal or hex). Any other
exception (struct.error, IndexError, OverflowError, RecursionError, zlib.error ...) fails the
test as an error, because pytest.raises(QcowError) lets it through.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import struct
import subprocess
import tracemalloc
import zlib
from collections.abc import Iterable
from pathlib import Path

import pytest
import zstandard

import imagepatch as ip
from qcowdisk import BackingChainError, InvalidImageError, QcowError, QcowFile, UnsupportedFeatureError
from qemutools import create, pattern, qemu_img, qemu_io, to_raw, write_raw

CS = 65536  # cluster size of the standard test images
INVALID = InvalidImageError  # CorruptImageError is a subclass
EITHER = (InvalidImageError, UnsupportedFeatureError)


# ---------------------------------------------------------------- message checks

_PATH = re.compile(r"/[^\s'\"]+")
_NUMBER = re.compile(r"(?<![0-9a-z_])(0x[0-9a-f]+|[0-9a-f]+)")


def numbers_in(message: str) -> set[int]:
    """Every integer a message shows: decimal, 0x-hex, or bare hex of 8+ digits (QEMU's feature form)."""
    found: set[int] = set()
    for tok in _NUMBER.findall(message.lower()):
        if tok.startswith("0x"):
            found.add(int(tok, 16))
            continue
        if tok.isdigit():
            found.add(int(tok))
        if len(tok) >= 8:
            found.add(int(tok, 16))
    return found


def check_message(err: BaseException, words: Iterable[str], values: Iterable[int] | None) -> None:
    """The message must contain one of `words` and (if given) one of `values` in str or hex form."""
    # Paths (which hold test names and digits) must not satisfy the check by accident.
    msg = _PATH.sub("<path>", str(err))
    words = list(words)
    assert any(w.lower() in msg.lower() for w in words), f"message {msg!r} names none of {words}"
    if values is not None:
        values = list(values)
        shown = numbers_in(msg)
        assert shown & set(values), (
            f"message {msg!r} shows none of the offending values {[f'{v} / {v:#x}' for v in values]}")


def open_and_read(path: str, read: tuple[int, int] | None = (0, CS), **open_kwargs: object) -> None:
    """Open read-only, read `read` (offset, length), list snapshots, close."""
    disk = QcowFile.open(path, readonly=True, **open_kwargs)
    try:
        _ = disk.snapshots
        if read is not None:
            offset, length = read
            disk.read_at(offset, length)
    finally:
        disk.close()


def expect_error(path: str, cls: type | tuple[type, ...], words: Iterable[str], values: Iterable[int] | None,
                 read: tuple[int, int] | None = (0, CS), **open_kwargs: object) -> QcowError:
    """Opening/reading `path` must raise a QcowError of `cls` whose message passes check_message."""
    with pytest.raises(QcowError) as excinfo:
        open_and_read(path, read, **open_kwargs)
    err = excinfo.value
    assert isinstance(err, cls), f"{type(err).__name__} raised, expected {cls}: {err}"
    check_message(err, words, values)
    return err


# ---------------------------------------------------------------- images

def _v3(path: str) -> None:
    create(path, "16G", options="cluster_size=64k")
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x22 1M 4k")


def _v2(path: str) -> None:
    create(path, "16G", options="compat=0.10,cluster_size=64k")
    qemu_io(path, "write -P 0x11 0 64k")


def _zlib(path: str) -> None:
    create(path, "4M")
    qemu_io(path, "write -c -P 0x33 0 64k", "write -c -P 0x44 64k 64k", "write -P 0x55 1M 64k")


def _zstd(path: str) -> None:
    create(path, "4M", options="compression_type=zstd")
    qemu_io(path, "write -c -P 0x33 0 64k", "write -c -P 0x44 64k 64k")


def _extl2(path: str) -> None:
    create(path, "4M", options="extended_l2=on,cluster_size=64k")
    qemu_io(path, "write -P 0x66 4k 4k", "write -P 0x77 1M 64k")


def _snap(path: str) -> None:
    create(path, "4M")
    qemu_io(path, "write -P 0x11 0 128k")
    qemu_img("snapshot", "-c", "snap1", path)
    qemu_io(path, "write -P 0x22 64k 64k")


def _small(cluster_size: int):
    def build(path: str) -> None:
        create(path, "1M", options=f"cluster_size={cluster_size}")
        qemu_io(path, "write -P 0x11 0 4k")
    return build


def _tiny_clusters(path: str) -> None:
    create(path, "1M", options="cluster_size=512")


_BUILDERS = {"v3": _v3, "v2": _v2, "zlib": _zlib, "zstd": _zstd, "extl2": _extl2, "snap": _snap,
             "4k": _small(4096), "8k": _small(8192), "512": _tiny_clusters}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Good qemu-made images, built once per module; tests patch copies."""
    d = tmp_path_factory.mktemp("pristine")
    out = {}
    for name, build in _BUILDERS.items():
        path = str(d / f"{name}.qcow2")
        build(path)
        out[name] = path
    return out


@pytest.fixture
def image(pristine: dict[str, str], tmp_path: Path):
    """image(kind) -> path of a fresh, patchable copy of a pristine image."""
    def copy(kind: str) -> str:
        dst = str(tmp_path / f"{kind}.qcow2")
        shutil.copyfile(pristine[kind], dst)
        return dst
    return copy


def overlay_pair(tmp_path: Path, fmt_ext: bool = True) -> tuple[str, str]:
    """A base image and an overlay naming it by absolute path (with a backing-format extension)."""
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    create(base, "4M")
    qemu_io(base, "write -P 0x5a 0 64k")
    create(top, "4M", backing=base, backing_fmt="qcow2" if fmt_ext else None)
    return base, top


def round_up(value: int, alignment: int) -> int:
    """Round up to a multiple of alignment."""
    return -(-value // alignment) * alignment


# ================================================================ Header (at open)

@pytest.mark.parametrize("magic", [
    pytest.param(b"QFI\xfc", id="off-by-one"),
    pytest.param(b"XXXX", id="text"),
    pytest.param(b"\0\0\0\0", id="zeros"),
])
def test_header_wrong_magic(image, magic: bytes) -> None:
    """wrong magic -> InvalidImageError naming the magic and what it found."""
    path = image("v3")
    ip.patch_header_field(path, "magic", magic)
    err = expect_error(path, INVALID, ["magic", "not in qcow2", "qcow2 format"], None)
    msg = str(err)
    forms = [repr(magic), magic.hex(), hex(int.from_bytes(magic, "big")), str(int.from_bytes(magic, "big"))]
    assert any(f in msg for f in forms), f"message {msg!r} does not show the magic found ({forms})"


def test_header_wrong_magic_raw_disk(tmp_path: Path) -> None:
    """A raw disk image (no header at all) is refused, not read as a qcow2."""
    path = write_raw(str(tmp_path / "disk.raw"), pattern(1 << 20, seed=3))
    with pytest.raises(InvalidImageError, match=r"(?i)magic|qcow2 format"):
        open_and_read(path)


@pytest.mark.parametrize("version", [0, 4, 0xFFFFFFFF])
def test_header_version(image, version: int) -> None:
    """version not 2 or 3 -> UnsupportedFeatureError naming version and value."""
    path = image("v3")
    ip.patch_header_field(path, "version", version)
    expect_error(path, UnsupportedFeatureError, ["version"], [version])


def test_header_version_1_legacy_qcow(tmp_path: Path) -> None:
    """A real `qemu-img create -f qcow` image (magic QFI\\xfb, version 1, a different layout).

    Either qcowdisk reads it with a qcow v1 reader and returns exactly QEMU's guest view, or it
    refuses clearly (naming version 1). What it must not do is read it as a qcow2.
    """
    path = str(tmp_path / "legacy.qcow")
    create(path, "2M", fmt="qcow")
    qemu_io(path, "write -P 0x3c 0 64k", "write -P 0x3d 1M 4k", fmt="qcow")
    expected = to_raw(path, str(tmp_path / "legacy.raw"), fmt="qcow")
    try:
        disk = QcowFile.open(path, readonly=True)
    except QcowError as err:  # refusing is one of the two allowed outcomes, so no pytest.raises
        assert isinstance(err, EITHER), f"{type(err).__name__}: {err}"  # noqa: PT017
        check_message(err, ["version", "qcow"], [1])
        return
    with disk:
        assert disk.virtual_size == len(expected)
        assert disk.read_at(0, len(expected)) == expected


@pytest.mark.parametrize("bits", [0, 8, 22, 63])
def test_header_cluster_bits(image, bits: int) -> None:
    """cluster_bits < 9 or > 21 -> error naming the cluster size/bits."""
    path = image("v3")
    ip.patch_header_field(path, "cluster_bits", bits)
    expect_error(path, EITHER, ["cluster"], [bits, 1 << bits])


@pytest.mark.parametrize("length", [
    pytest.param(96, id="too-short-96"),
    pytest.param(100, id="too-short-100"),
    pytest.param(108, id="unaligned-108"),
    pytest.param(CS + 8, id="beyond-cluster"),
])
def test_header_length(image, length: int) -> None:
    """header_length < 104, not a multiple of 8, or > cluster size."""
    path = image("v3")
    ip.patch_header_field(path, "header_length", length)
    expect_error(path, INVALID, ["header_length", "header length", "header"], [length])


@pytest.mark.parametrize("how", ["huge-length", "just-past-cluster0"])
def test_header_extension_past_cluster0(image, how: str) -> None:
    """A header extension whose length runs past cluster 0."""
    path = image("v3")
    ext = ip.find_extension(path, ip.EXT_FEATURE_TABLE)
    length = 0xFFFFFFF0 if how == "huge-length" else CS - ext.data_offset + 8
    ip.patch_u32(path, ext.length_offset, length)
    expect_error(path, INVALID, ["extension"], [length])


def test_header_extension_past_cluster0_small_cluster(image) -> None:
    """Same with 512-byte clusters (no room for QEMU's feature table): an unknown extension overruns."""
    path = image("512")
    assert ip.read_header(path).extensions == []
    length = 512 - 120 + 8  # data from byte 120 to 520
    ip.patch_bytes(path, 112, struct.pack(">II", 0x12345678, length))
    expect_error(path, INVALID, ["extension"], [length])


@pytest.mark.parametrize("where", ["at-cluster-end", "straddling", "huge"])
def test_header_backing_file_offset(tmp_path: Path, where: str) -> None:
    """backing_file_offset (+ size) beyond cluster 0."""
    _, top = overlay_pair(tmp_path)
    size = ip.read_header(top).backing_file_size
    offset = {"at-cluster-end": CS, "straddling": CS - size // 2, "huge": 1 << 63}[where]
    ip.patch_header_field(top, "backing_file_offset", offset)
    expect_error(top, INVALID, ["backing"], [offset, offset + size])


@pytest.mark.parametrize("size", [1024, 0xFFFFFFFF])
def test_header_backing_file_name_too_long(tmp_path: Path, size: int) -> None:
    """backing_file_size > 1023."""
    _, top = overlay_pair(tmp_path)
    ip.patch_header_field(top, "backing_file_size", size)
    expect_error(top, INVALID, ["backing"], [size])


@pytest.mark.parametrize("length", [16, 20])
def test_header_backing_format_extension_length(tmp_path: Path, length: int) -> None:
    """backing format extension length >= 16 (QEMU: ext_backing_format: len=20 too large)."""
    _, top = overlay_pair(tmp_path)
    ext = ip.find_extension(top, ip.EXT_BACKING_FORMAT)
    ip.patch_u32(top, ext.length_offset, length)
    expect_error(top, INVALID, ["format"], [length])


@pytest.mark.parametrize("order", [7, 64, 0xFFFFFFFF])
def test_header_refcount_order(image, order: int) -> None:
    """refcount_order > 6."""
    path = image("v3")
    ip.patch_header_field(path, "refcount_order", order)
    values = [order] + ([1 << order] if order < 64 else [])
    expect_error(path, INVALID, ["refcount", "reference count"], values)


@pytest.mark.parametrize("case", ["zero-clusters", "over-8MiB", "unaligned", "past-eof",
                                  "runs-past-eof", "overlaps-header"])
def test_header_refcount_table(image, case: str) -> None:
    """Refcount table: 0 clusters, > 8 MiB, unaligned, past EOF, overlapping the header."""
    path = image("v3")
    h = ip.read_header(path)
    if case == "zero-clusters":
        ip.patch_header_field(path, "refcount_table_clusters", 0)
        values = [0]
    elif case == "over-8MiB":
        clusters = (8 << 20) // CS + 1
        ip.patch_header_field(path, "refcount_table_clusters", clusters)
        values = [clusters, clusters * CS]
    elif case == "unaligned":
        offset = h.refcount_table_offset + 0x200
        ip.patch_header_field(path, "refcount_table_offset", offset)
        values = [offset]
    elif case == "past-eof":
        offset = round_up(h.file_size, CS) + 16 * CS
        ip.patch_header_field(path, "refcount_table_offset", offset)
        values = [offset]
    elif case == "runs-past-eof":
        clusters = 100  # under the 8 MiB limit, but the file is much shorter
        ip.patch_header_field(path, "refcount_table_clusters", clusters)
        values = [clusters, clusters * CS, h.refcount_table_offset, h.file_size]
    else:
        ip.patch_header_field(path, "refcount_table_offset", 0)
        values = [0]
    expect_error(path, INVALID, ["refcount", "reference count"], values)


@pytest.mark.parametrize("case", ["too-small", "over-32MiB", "unaligned", "past-eof", "runs-past-eof",
                                  "overlaps-refcount-table", "overlaps-refcount-block", "overlaps-header"])
def test_header_l1_table(image, case: str) -> None:
    """L1: l1_size too small, > 32 MiB, unaligned, past EOF, overlapping other metadata."""
    path = image("v3")  # 16 GiB with 64 KiB clusters: l1_size 32
    h = ip.read_header(path)
    assert h.l1_size == 32
    read = (0, CS)
    if case == "too-small":
        ip.patch_header_field(path, "l1_size", 31)
        values = [31, 32]
    elif case == "over-32MiB":
        n = (32 << 20) // 8 + 1
        ip.patch_header_field(path, "l1_size", n)
        values = [n, n * 8]
    elif case == "unaligned":
        values = [h.l1_table_offset + 0x200]
        ip.patch_header_field(path, "l1_table_offset", values[0])
    elif case == "past-eof":
        values = [round_up(h.file_size, CS) + 16 * CS]
        ip.patch_header_field(path, "l1_table_offset", values[0])
    elif case == "runs-past-eof":
        n = 1 << 16  # 512 KiB of table, the file holds far less after the L1 offset
        ip.patch_header_field(path, "l1_size", n)
        values = [n, n * 8, h.l1_table_offset, h.file_size]
    elif case == "overlaps-refcount-table":
        values = [h.refcount_table_offset]
        ip.patch_header_field(path, "l1_table_offset", values[0])
    elif case == "overlaps-refcount-block":
        block = ip.read_u64(path, ip.refcount_table_entry_offset(path, 0))
        values = [block]
        ip.patch_header_field(path, "l1_table_offset", block)
    else:
        ip.patch_header_field(path, "l1_table_offset", 0)
        values = [0]
    expect_error(path, INVALID, ["l1"], values, read=read)


def _snapshot_big_table(path: str) -> None:
    """Append a > 64 MiB snapshot table: 509 entries of 132 KiB each, sparse (only headers written)."""
    entry_len = 40 + 1024 + 0xFFFF + 0xFFFF
    entry_len += -entry_len % 8
    count = (64 << 20) // entry_len + 2
    start = round_up(ip.file_size(path), CS)
    with open(path, "r+b") as f:
        f.truncate(start + count * entry_len + CS)
        for i in range(count):
            f.seek(start + i * entry_len)
            f.write(struct.pack(">QIHHIIQII", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 1024))
    ip.patch_header_field(path, "snapshots_offset", start)
    ip.patch_header_field(path, "nb_snapshots", count)


@pytest.mark.parametrize("case", ["too-many", "table-over-64MiB", "unaligned", "past-eof",
                                  "entry-cut-by-eof", "entry-incomplete-extra", "extra-data-over-1024",
                                  "snapshot-l1-unaligned", "snapshot-l1-past-eof", "snapshot-l1-too-large"])
def test_header_snapshot_table(image, case: str) -> None:
    """Snapshots: > 65536, table > 64 MiB, unaligned, past EOF, incomplete entry, extra > 1024, bad L1."""
    path = image("snap")
    h = ip.read_header(path)
    entry = ip.snapshot_entries(path)[0]
    values: list[int] | None
    if case == "too-many":
        values = [65537]
        ip.patch_header_field(path, "nb_snapshots", 65537)
    elif case == "table-over-64MiB":
        _snapshot_big_table(path)
        # Every entry is in the file: the message must say the table is too large, not "incomplete".
        expect_error(path, INVALID, ["too large", "limit"], [64 << 20, 64])
        return
    elif case == "unaligned":
        values = [h.snapshots_offset + 0x200]
        ip.patch_header_field(path, "snapshots_offset", values[0])
    elif case == "past-eof":
        values = [round_up(h.file_size, CS) + 16 * CS]
        ip.patch_header_field(path, "snapshots_offset", values[0])
    elif case == "entry-cut-by-eof":
        # A copy of the table at the end of the file, cut in the middle of its first entry.
        raw = ip.read_bytes(path, entry.offset, entry.length)
        start = ip.append_aligned(path, raw[:50], CS)
        ip.patch_header_field(path, "snapshots_offset", start)
        values = None
    elif case == "entry-incomplete-extra":
        values = [8]  # v3 needs at least 16 bytes of extra data (QEMU: entry 0 is incomplete)
        ip.patch_u32(path, entry.field_offset("extra_data_size"), 8)
    elif case == "extra-data-over-1024":
        values = [1025]
        ip.patch_u32(path, entry.field_offset("extra_data_size"), 1025)
    elif case == "snapshot-l1-unaligned":
        values = [entry.fields["l1_table_offset"] + 0x200]
        ip.patch_u64(path, entry.field_offset("l1_table_offset"), values[0])
    elif case == "snapshot-l1-past-eof":
        values = [round_up(h.file_size, CS) + 16 * CS]
        ip.patch_u64(path, entry.field_offset("l1_table_offset"), values[0])
    else:
        values = [(32 << 20) // 8 + 1]
        ip.patch_u32(path, entry.field_offset("l1_size"), values[0])
    expect_error(path, INVALID, ["snapshot"], values)


@pytest.mark.parametrize("bit", [5, 63])
def test_header_unknown_incompatible_bit(image, bit: int) -> None:
    """Unknown incompatible bit without a feature-name table entry: the message shows the bit."""
    path = image("v3")
    # Drop the feature-name table so no name is known for any bit.
    exts = [(e.ext_type, e.data) for e in ip.read_header(path).extensions if e.ext_type != ip.EXT_FEATURE_TABLE]
    ip.rewrite_extensions(path, exts)
    value = ip.set_header_bits(path, "incompatible_features", 1 << bit)
    expect_error(path, UnsupportedFeatureError, ["feature", "incompatible"], [1 << bit, value, bit])


def test_header_unknown_incompatible_bit_named(image) -> None:
    """With a feature-name table entry for the bit, the message uses that name."""
    path = image("v3")
    name = "quantum entanglement"
    exts = []
    for e in ip.read_header(path).extensions:
        data = e.data + ip.feature_table_entry(0, 63, name) if e.ext_type == ip.EXT_FEATURE_TABLE else e.data
        exts.append((e.ext_type, data))
    ip.rewrite_extensions(path, exts)
    ip.set_header_bits(path, "incompatible_features", 1 << 63)
    expect_error(path, UnsupportedFeatureError, [name], None)


@pytest.mark.parametrize("method", [pytest.param(1, id="aes"), pytest.param(2, id="luks"),
                                    pytest.param(3, id="unknown-3")])
def test_header_encryption(image, method: int) -> None:
    """crypt_method 1 (AES), 2 (LUKS), unknown -> UnsupportedFeatureError."""
    path = image("v3")
    ip.patch_header_field(path, "crypt_method", method)
    expect_error(path, UnsupportedFeatureError, ["crypt", "encrypt"], [method])


@pytest.mark.parametrize("case", ["bit-set-type-zlib", "type-zstd-bit-clear", "unknown-type-2"])
def test_header_compression_type(image, case: str) -> None:
    """compression_type bit and field disagree; unknown compression type."""
    if case == "bit-set-type-zlib":
        path = image("v3")
        ip.set_header_bits(path, "incompatible_features", 1 << 3)
        cls, values = EITHER, [0]
    elif case == "type-zstd-bit-clear":
        path = image("zstd")
        ip.clear_header_bits(path, "incompatible_features", 1 << 3)
        cls, values = EITHER, [1]
    else:
        path = image("zstd")
        ip.patch_header_field(path, "compression_type", 2)
        cls, values = EITHER, [2]
    expect_error(path, cls, ["compression"], values)


def test_header_data_file_bit_without_name(image) -> None:
    """External data file bit with no data-file name extension (the value is the flag itself)."""
    path = image("v3")
    ip.set_header_bits(path, "incompatible_features", 1 << 2)
    expect_error(path, INVALID, ["data-file", "data file", "data_file"], None)


def test_header_data_file_raw_without_data_file(image) -> None:
    """Autoclear data-file-raw without the external data file bit."""
    path = image("v3")
    ip.set_header_bits(path, "autoclear_features", 1 << 1)
    expect_error(path, INVALID, ["data-file", "data file", "data_file", "raw"], None)


@pytest.mark.parametrize("kind,bits", [("4k", 12), ("8k", 13)])
def test_header_extended_l2_small_cluster(image, kind: str, bits: int) -> None:
    """Extended L2 with cluster size < 16 KiB (incompat bit 4 patched onto a small-cluster image)."""
    path = image(kind)
    ip.set_header_bits(path, "incompatible_features", 1 << 4)
    expect_error(path, EITHER, ["subcluster", "extended", "cluster"], [bits, 1 << bits, (1 << bits) // 32])


@pytest.mark.parametrize("case", ["2^63", "2^64-1", "2^62-beyond-l1-limit", "one-beyond-l1_size"])
def test_header_virtual_size(image, case: str) -> None:
    """Absurd virtual size: > 2^63, more than a 32 MiB L1 can map, more than l1_size maps."""
    path = image("v3")
    h = ip.read_header(path)
    size = {"2^63": 1 << 63, "2^64-1": (1 << 64) - 1, "2^62-beyond-l1-limit": 1 << 62,
            "one-beyond-l1_size": h.l1_size * CS * (CS // 8) + 1}[case]
    ip.patch_header_field(path, "size", size)
    expect_error(path, INVALID, ["size"], [size, h.l1_size])


@pytest.mark.parametrize("case", ["50-bytes", "100-bytes-v3", "110-bytes-v3", "mid-extensions",
                                  "refcount-table", "l1-table", "snapshot-table"])
def test_header_file_truncated(image, case: str) -> None:
    """File shorter than its header, or than the tables its header declares."""
    kind = "snap" if case == "snapshot-table" else "v3"
    path = image(kind)
    h = ip.read_header(path)
    table = {"refcount-table": h.refcount_table_offset, "l1-table": h.l1_table_offset,
             "snapshot-table": h.snapshots_offset}.get(case)
    length = {"50-bytes": 50, "100-bytes-v3": 100, "110-bytes-v3": 110, "mid-extensions": 300}.get(case)
    if length is None:
        length = table + 8
    os.truncate(path, length)
    values = [length] + ([table] if table is not None else [])
    words = ["truncat", "short", "end of file", "eof", "past", "beyond", "file", "incomplete"]
    expect_error(path, INVALID, words, values)


# ================================================================ Tables (first access)

@pytest.mark.parametrize("case", ["unaligned", "past-eof", "reserved-bit0", "reserved-bit56"])
def test_table_l1_entry(image, case: str) -> None:
    """L1 entry: L2 offset unaligned, past EOF, reserved bits set."""
    path = image("v3")
    at = ip.l1_entry_offset(path, 0)
    entry = ip.read_u64(path, at)
    table = entry & ip.OFFSET_MASK
    if case == "unaligned":
        new, values = (entry & ~ip.OFFSET_MASK) | (table + 0x200), [table + 0x200]
    elif case == "past-eof":
        off = round_up(ip.file_size(path), CS) + 256 * CS
        new, values = ip.OFLAG_COPIED | off, [off]
    elif case == "reserved-bit0":
        new = entry | 1
        values = [new, 1]
    else:
        new = entry | 1 << 56
        values = [new, 1 << 56]
    ip.patch_u64(path, at, new)
    expect_error(path, INVALID, ["l1", "l2"], values, read=(0, CS))


@pytest.mark.parametrize("case", ["unaligned", "past-eof", "reserved-bit1", "reserved-bit56"])
def test_table_l2_entry(image, case: str) -> None:
    """L2 entry: data offset unaligned, past EOF, reserved bits set."""
    path = image("v3")
    at = ip.l2_entry_offset(path, 0)
    entry = ip.read_u64(path, at)
    data = entry & ip.OFFSET_MASK
    assert data, "test image must have guest cluster 0 allocated"
    if case == "unaligned":
        new, values = (entry & ~ip.OFFSET_MASK) | (data + 0x200), [data + 0x200]
    elif case == "past-eof":
        off = round_up(ip.file_size(path), CS) + 256 * CS
        new, values = ip.OFLAG_COPIED | off, [off]
    elif case == "reserved-bit1":
        new = entry | 2
        values = [new, 2]
    else:
        new = entry | 1 << 56
        values = [new, 1 << 56]
    ip.patch_u64(path, at, new)
    expect_error(path, INVALID, ["l2", "cluster", "offset", "entry"], values, read=(0, CS))


def _compressed_entry(path: str, guest_offset: int = 0) -> tuple[int, int, int]:
    """(location, entry, cluster_bits) of a compressed L2 entry."""
    at = ip.l2_entry_offset(path, guest_offset)
    entry = ip.read_u64(path, at)
    assert entry & ip.OFLAG_COMPRESSED, "test image must have guest cluster 0 compressed"
    return at, entry, ip.read_header(path).cluster_bits


@pytest.mark.parametrize("kind", ["zlib", "zstd"])
def test_table_compressed_descriptor_past_eof(image, kind: str) -> None:
    """Compressed descriptor whose payload starts past the end of the file."""
    path = image(kind)
    at, _entry, bits = _compressed_entry(path)
    host = ip.file_size(path) + 3 * CS + 123
    ip.patch_u64(path, at, ip.make_compressed_entry(host, 0, bits))
    expect_error(path, INVALID, ["compress", "offset", "end of file", "eof"], [host], read=(0, CS))


def _zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize("kind", ["zlib", "zstd"])
@pytest.mark.parametrize("damage", ["garbage", "short-output", "truncated-stream", "zeros"])
def test_table_compressed_payload_bad(image, kind: str, damage: str) -> None:
    """A payload that does not decompress to exactly one cluster is corrupt, not zero-filled."""
    path = image(kind)
    at, entry, bits = _compressed_entry(path)
    host, sectors = ip.decode_compressed_entry(entry, bits)
    old_length = min((sectors + 1) * 512 - (host & 511), ip.file_size(path) - host)
    make = _deflate if kind == "zlib" else _zstd_frame
    if damage == "garbage":
        payload = b"\xff" * old_length  # deflate: BTYPE 11 (reserved); zstd: no frame magic
    elif damage == "short-output":
        payload = make(b"\x33" * 1000)  # a complete, valid stream of far less than a cluster
    elif damage == "truncated-stream":
        payload = make(pattern(CS, seed=7))[:2000]  # incompressible data cut short
    else:
        payload = bytes(old_length)
    new_host = ip.append_aligned(path, payload, 512)
    n = (new_host + len(payload) - 1 >> 9) - (new_host >> 9)
    ip.patch_u64(path, at, ip.make_compressed_entry(new_host, n, bits))
    expect_error(path, INVALID, ["compress"], None, read=(0, CS))


@pytest.mark.parametrize("declared", [False, True])
@pytest.mark.parametrize("kind", ["zlib", "zstd"])
def test_table_compressed_payload_longer_than_a_cluster(image, tmp_path: Path, kind: str, declared: bool) -> None:
    """A stream that decodes to two clusters: QEMU takes the first cluster of a deflate stream
    (inflate stops with the output full) but fails a zstd frame not finished within the
    cluster; qcowdisk does the same, whether or not the frame declares its size."""
    path = image(kind)
    at, _entry, bits = _compressed_entry(path)
    data = pattern(1024, seed=3) * (2 * CS // 1024)  # (compressible: the payload fits a descriptor)
    if kind == "zlib":
        payload = _deflate(data)
    else:
        c = zstandard.ZstdCompressor(write_content_size=declared).compressobj(size=len(data) if declared else -1)
        payload = c.compress(data) + c.flush()
    host = ip.append_aligned(path, payload, 512)
    ip.patch_u64(path, at, ip.make_compressed_entry(host, (host + len(payload) - 1 >> 9) - (host >> 9), bits))
    out = tmp_path / "qemu.raw"
    qemu = subprocess.run(["qemu-img", "convert", "-O", "raw", path, str(out)], capture_output=True, text=True,
                          check=False)
    if kind == "zlib":
        assert qemu.returncode == 0, qemu.stderr
        with QcowFile.open(path, readonly=True) as disk:
            assert disk.read_at(0, CS) == data[:CS] == out.read_bytes()[:CS]
    else:
        assert qemu.returncode == 1 and "error while reading" in qemu.stderr, qemu.stderr
        expect_error(path, INVALID, ["compress"], None, read=(0, CS))


@pytest.mark.parametrize("kind", ["zlib", "zstd"])
def test_table_compressed_bomb(image, kind: str) -> None:
    """A payload that would expand far beyond a cluster: never more than a cluster is produced.

    zlib: ~100 KiB of raw deflate for 100 MiB of zeros, covered by the descriptor's sector count.
    zstd: one frame that declares 256 MiB of content (a naive ZstdDecompressor().decompress()
    allocates all of it). Either a clean QcowError or exactly one cluster of zeros is fine;
    the traced allocation peak must stay far below the expanded size.
    """
    path = image(kind)
    at, _entry, bits = _compressed_entry(path)
    if kind == "zlib":
        c = zlib.compressobj(9, zlib.DEFLATED, -12, 9)
        chunk = bytes(1 << 20)
        payload = b"".join(c.compress(chunk) for _ in range(100)) + c.flush()
        expanded = 100 << 20
    else:
        expanded = 256 << 20
        c = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=expanded)
        chunk = bytes(1 << 20)
        payload = b"".join(c.compress(chunk) for _ in range(256)) + c.flush()
    host = ip.append_aligned(path, payload, 512)
    n = (host + len(payload) - 1 >> 9) - (host >> 9)
    assert n < 256, "payload must fit the descriptor's sector count"
    ip.patch_u64(path, at, ip.make_compressed_entry(host, n, bits))
    tracemalloc.start()
    try:
        try:
            disk = QcowFile.open(path, readonly=True)
            try:
                data = disk.read_at(0, CS)
            finally:
                disk.close()
        except QcowError as err:
            data = None
            check_message(err, ["compress"], None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if data is not None:
        assert data == bytes(CS)
    assert peak < 16 << 20, f"reading one bomb cluster allocated {peak} bytes (expands to {expanded})"


@pytest.mark.parametrize("kind", ["zlib", "zstd"])
def test_table_copied_on_compressed(image, kind: str) -> None:
    """COPIED flag on a compressed entry (the value is the flag; the message must name it)."""
    path = image(kind)
    at, entry, _ = _compressed_entry(path)
    ip.patch_u64(path, at, entry | ip.OFLAG_COPIED)
    expect_error(path, INVALID, ["copied"], None, read=(0, CS))


@pytest.mark.parametrize("case", ["allocated-and-zero-overlap", "allocated-bits-on-unallocated"])
def test_table_extended_l2_bitmap(image, case: str) -> None:
    """Extended L2: allocated and zero halves overlap; allocated bits on an unallocated cluster."""
    path = image("extl2")
    if case == "allocated-and-zero-overlap":
        guest = 0  # cluster 0 holds subclusters 2-3 (4 KiB at 4 KiB)
        bitmap_at = ip.l2_bitmap_offset(path, guest)
        old = ip.read_u64(path, bitmap_at)
        assert old & 0xFFFFFFFF, "cluster 0 must have allocated subclusters"
        bitmap = old | (old & 0xFFFFFFFF) << 32
    else:
        guest = 2 * CS  # no data there: L2 entry 0
        assert ip.read_u64(path, ip.l2_entry_offset(path, guest)) == 0
        bitmap_at = ip.l2_bitmap_offset(path, guest)
        bitmap = 0x1
    ip.patch_u64(path, bitmap_at, bitmap)
    expect_error(path, INVALID, ["bitmap", "subcluster", "l2", "cluster"], [bitmap], read=(guest, CS))


def _open_rw_and_write(path: str) -> None:
    """Open read-write and write to an unallocated cluster, so refcounts must be read."""
    disk = QcowFile.open(path)
    try:
        disk.write_at(2 << 20, b"\xab" * 4096)
        disk.flush()
    finally:
        with contextlib.suppress(QcowError):  # the error under test has already been raised (or will be asserted missing)
            disk.close()


@pytest.mark.parametrize("case", ["unaligned", "reserved-bits", "past-eof"])
def test_table_refcount_table_entry(image, case: str) -> None:
    """Refcount table entry unaligned / reserved bits: matters when refcounts are read (read-write)."""
    path = image("v3")
    at = ip.refcount_table_entry_offset(path, 0)
    block = ip.read_u64(path, at)
    if case == "unaligned":
        new, values = block + 0x200, [block + 0x200]
    elif case == "reserved-bits":
        new, values = block | 0x100, [block | 0x100, 0x100]
    else:
        new = round_up(ip.file_size(path), CS) + 256 * CS
        values = [new]
    ip.patch_u64(path, at, new)
    with pytest.raises(QcowError) as excinfo:
        _open_rw_and_write(path)
    err = excinfo.value
    assert isinstance(err, INVALID), f"{type(err).__name__}: {err}"
    check_message(err, ["refcount", "reference count", "refblock"], values)


# ================================================================ Backing chains

@pytest.mark.parametrize("naming", ["absolute", "relative"])
def test_backing_missing(tmp_path: Path, naming: str) -> None:
    """Missing backing file: the error names the missing path and the image that names it."""
    base = tmp_path / "gone-base.qcow2"
    top = tmp_path / "the-overlay.qcow2"
    create(str(base), "4M")
    create(str(top), "4M", backing=str(base) if naming == "absolute" else base.name, backing_fmt="qcow2")
    base.unlink()
    with pytest.raises(QcowError) as excinfo:
        open_and_read(str(top))
    err = excinfo.value
    assert isinstance(err, BackingChainError), f"{type(err).__name__}: {err}"
    msg = str(err)
    missing = str(base) if naming == "absolute" else base.name
    assert missing in msg, f"message {msg!r} does not name the missing file {missing}"
    assert top.name in msg, f"message {msg!r} does not name the image {top} that names it"


@pytest.mark.parametrize("depth_limit", [None, 100_000], ids=["default-limit", "huge-limit"])
@pytest.mark.parametrize("shape", ["a-a", "a-b-a", "a-b-c-a"])
def test_backing_loop(tmp_path: Path, shape: str, depth_limit: int | None) -> None:
    """A looping chain is an error, never a RecursionError (even with a huge nesting limit)."""
    names = shape.split("-")[:-1]
    paths = [str(tmp_path / f"{n}.qcow2") for n in names]
    for p in paths:
        create(p, "1M")
    for p, nxt in zip(paths, paths[1:] + paths[:1], strict=True):
        qemu_img("rebase", "-u", "-b", os.path.basename(nxt), "-F", "qcow2", p)
    kwargs = {} if depth_limit is None else {"max_nesting_depth": depth_limit}
    with pytest.raises(QcowError) as excinfo:
        open_and_read(paths[0], **kwargs)
    err = excinfo.value
    assert isinstance(err, BackingChainError), f"{type(err).__name__}: {err}"
    msg = str(err)
    assert any(f"{n}.qcow2" in msg for n in names), f"message {msg!r} names no image of the loop"


def _chain(tmp_path: Path, length: int) -> list[str]:
    """base + (length-1) overlays; returns paths from base to top. Base holds data at 0.

    One overlay is made by qemu-img; the others are copies with the (same-length) backing
    name patched, which keeps a 70-deep chain cheap.
    """
    paths = [str(tmp_path / f"chain{i:03d}.qcow2") for i in range(length)]
    create(paths[0], "1M")
    qemu_io(paths[0], "write -P 0x42 0 4k")
    template = str(tmp_path / "template.qcow2")
    create(template, "1M", backing=os.path.basename(paths[0]), backing_fmt="qcow2")
    name_at = ip.read_header(template).backing_file_offset
    for lower, upper in itertools.pairwise(paths):
        shutil.copyfile(template, upper)
        ip.patch_bytes(upper, name_at, os.path.basename(lower).encode())
    assert ip.read_header(paths[-1]).backing_file == os.path.basename(paths[-2]).encode()
    return paths


def test_backing_too_deep(tmp_path: Path) -> None:
    """A chain deeper than max_nesting_depth: error naming the limit; within the limit it reads."""
    paths = _chain(tmp_path, 6)  # top + 5 backing files
    with pytest.raises(QcowError) as excinfo:
        open_and_read(paths[-1], max_nesting_depth=3)
    err = excinfo.value
    assert isinstance(err, BackingChainError), f"{type(err).__name__}: {err}"
    check_message(err, ["depth", "nest", "deep", "limit"], [3])
    with QcowFile.open(paths[-1], readonly=True, max_nesting_depth=10) as disk:
        assert disk.read_at(0, 8192) == b"\x42" * 4096 + bytes(4096)


def test_backing_too_deep_default_limit(tmp_path: Path) -> None:
    """The default limit (64) holds: a 70-deep chain is refused naming 64."""
    paths = _chain(tmp_path, 71)
    with pytest.raises(QcowError) as excinfo:
        open_and_read(paths[-1])
    err = excinfo.value
    assert isinstance(err, BackingChainError), f"{type(err).__name__}: {err}"
    check_message(err, ["depth", "nest", "deep", "limit"], [64])


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_backing_shorter_reads_zeros(tmp_path: Path, base_fmt: str) -> None:
    """A backing file shorter than the overlay reads as zeros past its end (valid, positive)."""
    base = str(tmp_path / f"short-base.{base_fmt}")
    top = str(tmp_path / "long-top.qcow2")
    if base_fmt == "raw":
        write_raw(base, pattern(1 << 20, seed=11))
    else:
        create(base, "1M")
        qemu_io(base, "write -P 0x5b 0 1M")
    create(top, "3M", backing=base, backing_fmt=base_fmt)
    qemu_io(top, "write -P 0x6c 2M 4k")
    expected = to_raw(top, str(tmp_path / "expected.raw"))
    with QcowFile.open(top, readonly=True) as disk:
        assert disk.virtual_size == 3 << 20
        assert disk.read_at(0, 3 << 20) == expected
        # A read straddling the backing file's end.
        assert disk.read_at((1 << 20) - 100, 200) == expected[(1 << 20) - 100:(1 << 20) + 100]
        assert disk.read_at((1 << 20) + 100, 100) == bytes(100)


@pytest.mark.parametrize("open_by", ["absolute-path", "relative-path"])
def test_backing_relative_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_by: str) -> None:
    """A relative backing name resolves against the naming image's directory, never the cwd."""
    images = tmp_path / "images"
    images.mkdir()
    base = str(images / "base.qcow2")
    create(base, "1M")
    qemu_io(base, "write -P 0x71 0 64k")
    top = str(images / "top.qcow2")
    create(top, "1M", backing="base.qcow2", backing_fmt="qcow2")
    assert ip.read_header(top).backing_file == b"base.qcow2"
    # A decoy with different data where a cwd-relative lookup would find it.
    decoy = str(tmp_path / "base.qcow2")
    create(decoy, "1M")
    qemu_io(decoy, "write -P 0xde 0 64k")
    monkeypatch.chdir(tmp_path)
    path = top if open_by == "absolute-path" else os.path.join("images", "top.qcow2")
    with QcowFile.open(path, readonly=True) as disk:
        assert disk.read_at(0, 4096) == b"\x71" * 4096
