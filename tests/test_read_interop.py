"""Interop: qcowdisk reads every image QEMU 7.2 makes exactly as `qemu-img convert -O raw` does.

Each test builds its image with the real qemu-img / qemu-io (or patches bytes of one they made,
see imagefactory), checks with `qemu-img map` / the raw tables that it made what it meant to,
then compares `QcowFile.open(path, readonly=True)` reads against QEMU's guest view: one whole-disk
`read_at` plus unaligned `readinto_at` slices into several buffer types.
"""

from __future__ import annotations

import array
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagefactory import (
    CLUSTER_SIZES,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_FEATURE_TABLE,
    REFCOUNT_BITS,
    KiB,
    MiB,
    compressed_host_sharing,
    decode_feature_table,
    feature_table,
    file_digest,
    kill_writer,
    l2_entries,
    make_image,
    map_at,
    mixed_raw,
    or_be,
    patch_be,
    qemu_map,
    read_be,
    read_cluster0,
    set_header_length,
    snapshot_table,
    text_like,
    write_cluster0,
    write_pattern_file,
)
from qcowdisk import BackingChainError, QcowFile, UnsupportedFeatureError
from qemutools import create, info, pattern, qemu_img, qemu_io, to_raw, write_raw

# --------------------------------------------------------------------------- comparison helpers

_view_counter = itertools.count()


def qemu_view(image: str | Path, scratch: Path, fmt: str | None = None) -> bytes:
    """The guest view according to QEMU (`qemu-img convert -O raw`)."""
    out = scratch / f"qemu-view-{next(_view_counter)}.raw"
    data = to_raw(str(image), str(out), fmt)
    out.unlink()
    return data


def first_difference(got: bytes, expected: bytes) -> str:
    """Describe where two byte strings first differ (never dump megabytes into the report)."""
    head = f"length {len(got)} != expected {len(expected)}; " if len(got) != len(expected) else ""
    n = min(len(got), len(expected))
    block = 4096
    for start in range(0, n, block):
        if got[start:start + block] != expected[start:start + block]:
            i = start + next(k for k in range(min(block, n - start)) if got[start + k] != expected[start + k])
            return (f"{head}first difference at byte {i} (0x{i:x}): got {bytes(got[i:i + 16]).hex()} "
                    f"expected {bytes(expected[i:i + 16]).hex()}")
    return head + "common prefix identical"


def assert_same(got: bytes, expected: bytes, what: str) -> None:
    """Equal bytes, or a failure naming the first differing offset."""
    if got != expected:
        raise AssertionError(f"{what}: {first_difference(got, expected)}")


def probe_slices(size: int, cluster_size: int) -> list[tuple[int, int]]:
    """Unaligned (offset, length) pairs: sector- and cluster-straddling, mid-disk, at the very end."""
    cs = cluster_size
    raw = [(0, 1), (1, 511), (cs - 3, 7), (cs + 17, 2 * cs + 1), (size // 3 + 5, cs // 2 + 13),
           (size // 2 - 4099, 8194), (size - 517, 517), (size - 1, 1)]
    out = []
    for off, want in raw:
        if 0 <= off < size:
            n = min(want, size - off)
            if n > 0:
                out.append((off, n))
    return out


# Each factory returns (buffer passed to readinto_at, function giving the bytes written into it).
BufferFactory = Callable[[int], tuple[Any, Callable[[], bytes]]]


def _bytearray_buf(n: int) -> tuple[Any, Callable[[], bytes]]:
    b = bytearray(b"\xee" * n)
    return b, lambda: bytes(b)


def _memoryview_slice_buf(n: int) -> tuple[Any, Callable[[], bytes]]:
    # A view into the middle of a larger buffer: the guards on both sides must stay untouched.
    backing = bytearray(b"\xee" * (n + 16))
    view = memoryview(backing)[8:8 + n]

    def contents() -> bytes:
        assert backing[:8] == b"\xee" * 8 and backing[-8:] == b"\xee" * 8, "readinto_at wrote outside the view"
        return bytes(backing[8:8 + n])
    return view, contents


def _array_b_buf(n: int) -> tuple[Any, Callable[[], bytes]]:
    a = array.array("B", bytes(n))
    return a, a.tobytes


def _array_i_buf(n: int) -> tuple[Any, Callable[[], bytes]]:
    # Multi-byte items: readinto_at must count bytes, not items.
    a = array.array("I", bytes(n // 4 * 4))
    return a, a.tobytes


BUFFERS: list[BufferFactory] = [_bytearray_buf, _memoryview_slice_buf, _array_b_buf, _array_i_buf]


def check_disk(disk: QcowFile, expected: bytes, what: str = "image") -> None:
    """Whole-disk read_at plus unaligned readinto_at slices into every buffer type."""
    size = disk.virtual_size
    assert size == len(expected), f"{what}: virtual_size {size} != qemu's {len(expected)}"
    assert_same(disk.read_at(0, size), expected, f"{what}: read_at(0, {size})")
    for k, (off, n) in enumerate(probe_slices(size, disk.cluster_size)):
        factory = BUFFERS[k % len(BUFFERS)]
        buf, contents = factory(n)
        want = len(contents())
        if want == 0:
            continue
        got = disk.readinto_at(buf, off)
        assert got == want, f"{what}: readinto_at({factory.__name__}, {off}) returned {got}, expected {want}"
        assert_same(contents(), expected[off:off + want], f"{what}: readinto_at({factory.__name__}, {off})[:{want}]")


def assert_reads_like_qemu(image: str | Path, scratch: Path, expected: bytes | None = None,
                           **open_kwargs: Any) -> bytes:
    """Open read-only and compare with QEMU's guest view (computed unless given); returns that view."""
    if expected is None:
        expected = qemu_view(image, scratch)
    with QcowFile.open(str(image), readonly=True, **open_kwargs) as disk:
        check_disk(disk, expected, str(image))
    return expected


def size_id(n: int) -> str:
    """512 -> '512', 65536 -> '64k', 2097152 -> '2M' (parametrize ids)."""
    for unit, suffix in ((MiB, "M"), (KiB, "k")):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def chain_depth(disk: Any) -> int:
    """Number of images below `disk` in its opened backing chain."""
    depth = 0
    b = getattr(disk, "backing", None)
    while b is not None:
        depth += 1
        b = getattr(b, "backing", None)
    return depth


# --------------------------------------------------------------------------- versions, cluster sizes, refcounts


@pytest.mark.parametrize("cluster_size", CLUSTER_SIZES, ids=size_id)
@pytest.mark.parametrize("compat", ["0.10", "1.1"], ids=["v2", "v3"])
def test_version_and_cluster_size(tmp_path: Path, compat: str, cluster_size: int) -> None:
    """Every cluster size, qcow2 v2 and v3: unaligned data, zeroes, discards, the disk's last bytes."""
    cs = cluster_size
    size = max(2 * MiB, 8 * cs)
    src = write_pattern_file(str(tmp_path / "src"), 3 * cs + 4096, seed=cs)
    img = make_image(str(tmp_path / "img.qcow2"), size, f"compat={compat},cluster_size={cs}", commands=[
        f"write -s {src} {cs + cs // 2 + 3} {2 * cs + 1500}",
        f"write -P 0xa5 {size - 3000} 3000",
        f"write -z {2 * cs} {cs}",
        f"write -P 0x33 {5 * cs} {2 * cs}",
        f"discard {6 * cs} {cs}",
        f"write -z -u {4 * cs} {cs}",
    ])
    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.version == (2 if compat == "0.10" else 3)
        assert disk.cluster_size == cs
        assert disk.header.cluster_bits == cs.bit_length() - 1


@pytest.mark.parametrize("refcount_bits", REFCOUNT_BITS)
def test_refcount_bits(tmp_path: Path, refcount_bits: int) -> None:
    """Every refcount width (small clusters so several refcount blocks exist for wide counts)."""
    cs = 4096
    src = write_pattern_file(str(tmp_path / "src"), 1 * MiB, seed=refcount_bits)
    img = make_image(str(tmp_path / "img.qcow2"), 3 * MiB, f"refcount_bits={refcount_bits},cluster_size={cs}",
                     commands=[f"write -s {src} 777 {MiB}", f"write -P 0x5c {2 * MiB + 100} 300000",
                               f"write -z {8 * cs} {3 * cs}", f"discard {20 * cs} {4 * cs}"])
    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.refcount_bits == refcount_bits


# --------------------------------------------------------------------------- header layout


@pytest.mark.parametrize("header_length", [104, 112, 120, 264], ids=lambda n: f"hl{n}")
def test_header_length(tmp_path: Path, header_length: int) -> None:
    """Headers of 104, 112 and longer (unknown trailing fields) bytes; extensions and backing name shifted."""
    base = make_image(str(tmp_path / "base.qcow2"), 2 * MiB, commands=["write -P 0x61 0 1M"])
    img = make_image(str(tmp_path / "img.qcow2"), 2 * MiB, backing=base, backing_fmt="qcow2", commands=[
        "write -P 0x62 300k 200k", "write -c -P 0x63 1M 64k", "write -z 0 64k"])
    extra = set_header_length(img, header_length)
    assert read_be(img, 100, "I") == header_length
    # QEMU must still accept the edited image, else the comparison proves nothing.
    assert info(img)["backing-filename"] == base
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.header_length == header_length
        assert disk.header.backing_file == base
        assert disk.header.backing_format == "qcow2"
        if extra and hasattr(disk.header, "extra_header"):
            assert disk.header.extra_header == extra


def test_v2_header_with_extensions(tmp_path: Path) -> None:
    """A v2 header is 72 bytes; its extensions (here the backing format) start right after it."""
    base = write_raw(str(tmp_path / "base.raw"), pattern(MiB, 3))
    img = make_image(str(tmp_path / "img.qcow2"), 2 * MiB, "compat=0.10", backing=base, backing_fmt="raw",
                     commands=["write -P 1 100k 100k"])
    c0 = read_cluster0(img)
    assert c0.version == 2 and c0.ext(EXT_BACKING_FORMAT) == b"raw"
    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.version == 2 and disk.header.backing_format == "raw"


# --------------------------------------------------------------------------- cluster kinds


@pytest.mark.parametrize("with_backing", [False, True], ids=["standalone", "over-backing"])
def test_cluster_kinds(tmp_path: Path, with_backing: bool) -> None:
    """Data, unallocated, zero-flag, preallocated-zero and discarded clusters, confirmed by qemu-img map."""
    cs = 64 * KiB
    backing = write_raw(str(tmp_path / "base.raw"), pattern(4 * MiB, 11)) if with_backing else None
    src = write_pattern_file(str(tmp_path / "src"), 3 * cs, seed=5)
    img = make_image(str(tmp_path / "img.qcow2"), 4 * MiB, backing=backing, backing_fmt="raw" if backing else None,
                     commands=[
                         f"write -s {src} 0 {3 * cs}",
                         f"write -z {cs} {cs}",          # allocated -> preallocated zero (keeps its offset)
                         f"write -z -u {2 * cs} {cs}",   # allocated -> zero flag, cluster freed
                         f"write -z {8 * cs} {2 * cs}",  # unallocated -> zero flag
                         f"write -P 7 {4 * cs} {2 * cs}",
                         f"discard {5 * cs} {cs}",
                     ])
    m = qemu_map(img)
    assert map_at(m, 0)["data"] and map_at(m, 0)["depth"] == 0
    prealloc = map_at(m, cs)
    assert prealloc["zero"] and not prealloc["data"] and "offset" in prealloc and prealloc["depth"] == 0, prealloc
    for off in (2 * cs, 8 * cs, 9 * cs):
        z = map_at(m, off)
        assert z["zero"] and not z["data"] and "offset" not in z and z["depth"] == 0, z
    unalloc = map_at(m, 12 * cs)
    assert unalloc["depth"] == (1 if with_backing else 0) and (unalloc["present"] == with_backing), unalloc
    assert "offset" not in map_at(m, 5 * cs) or map_at(m, 5 * cs)["depth"] == 1  # discarded
    assert_reads_like_qemu(img, tmp_path)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocation(tmp_path: Path, prealloc: str) -> None:
    """preallocation=metadata|falloc|full: every cluster allocated, unwritten ones read as zeros."""
    size = MiB + 3 * 512
    img = make_image(str(tmp_path / "img.qcow2"), size, f"preallocation={prealloc}",
                     commands=["write -P 3 65541 1000", f"write -P 4 {size - 700} 700", "write -z 300k 64k"])
    m = qemu_map(img)
    assert all("offset" in e for e in m), f"not every cluster allocated: {m}"
    assert_reads_like_qemu(img, tmp_path)


# --------------------------------------------------------------------------- compression


def _compression_checks(img: str, *, want_uncompressed: bool) -> None:
    """Several compressed payloads share a host cluster; incompressible clusters stayed plain."""
    entries = list(l2_entries(img))
    compressed = [e for e in entries if e.compressed]
    plain = [e for e in entries if not e.compressed and e.entry & 0x00FFFFFFFFFFFE00]
    assert len(compressed) >= 3, f"expected compressed clusters, L2 has {len(compressed)}"
    sharing = compressed_host_sharing(img)
    assert max(sharing.values()) >= 2, f"no host cluster holds two compressed payloads: {sharing}"
    if want_uncompressed:
        assert plain, "expected some clusters stored uncompressed"


@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB, 2 * MiB], ids=size_id)
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_qemu_io(tmp_path: Path, ctype: str, cluster_size: int) -> None:
    """`write -c` clusters (tiny, text-like, incompressible), partly overwritten, both compression types."""
    cs = cluster_size
    size = max(MiB, 8 * cs)
    text = write_raw(str(tmp_path / "text"), text_like(cs, seed=cs))
    rnd = write_pattern_file(str(tmp_path / "rnd"), cs, seed=cs + 1)
    img = make_image(str(tmp_path / "img.qcow2"), size, f"compression_type={ctype},cluster_size={cs}", commands=[
        f"write -c -P 0x11 0 {cs}", f"write -c -P 0x22 {cs} {cs}", f"write -c -P 0x33 {2 * cs} {cs}",
        f"write -c -s {text} {3 * cs} {cs}", f"write -c -s {rnd} {4 * cs} {cs}",
        f"write -c -P 0x44 {6 * cs} {cs}",
        f"write -P 0x55 {cs + 100} 200",  # copy-on-write out of a compressed cluster
    ])
    _compression_checks(img, want_uncompressed=True)
    assert info(img)["format-specific"]["data"]["compression-type"] == ctype
    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.compression_type in ({"zlib": 0, "zstd": 1}[ctype], ctype)


@pytest.mark.parametrize("cluster_size", [512, 64 * KiB], ids=size_id)
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_convert(tmp_path: Path, ctype: str, cluster_size: int) -> None:
    """`qemu-img convert -c` of text-like / random / zero / constant data: compressed and plain clusters mixed."""
    cs = cluster_size
    raw = write_raw(str(tmp_path / "src.raw"), mixed_raw(MiB + 4 * cs, cs + cs // 3, seed=cs))
    img = str(tmp_path / "img.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype},cluster_size={cs}", raw, img)
    _compression_checks(img, want_uncompressed=True)
    expected = assert_reads_like_qemu(img, tmp_path)
    with open(raw, "rb") as f:
        assert expected == f.read()  # sanity: qemu round-trips its own conversion


# --------------------------------------------------------------------------- extended L2


@pytest.mark.parametrize("cluster_size", [c for c in CLUSTER_SIZES if c >= 16 * KiB], ids=size_id)
def test_extended_l2(tmp_path: Path, cluster_size: int) -> None:
    """Per-subcluster allocated / zero / unallocated (reads through to the backing file), unaligned writes."""
    cs = cluster_size
    sc = cs // 32
    size = max(4 * MiB, 4 * cs)
    base = write_raw(str(tmp_path / "base.raw"), pattern(size - 3 * sc, 21))  # a little shorter, too
    src = write_pattern_file(str(tmp_path / "src"), 4 * sc, seed=22)
    img = make_image(str(tmp_path / "img.qcow2"), size, f"extended_l2=on,cluster_size={cs}",
                     backing=base, backing_fmt="raw", commands=[
                         f"write -s {src} 0 {sc}",                          # subcluster 0 allocated
                         f"write -P 0x22 {3 * sc + sc // 2 - 100} {sc}",   # unaligned: COW from backing
                         f"write -z {6 * sc} {2 * sc}",                     # zero subclusters
                         f"write -s {src} {cs + 5 * sc + 1} {4 * sc - 7}",
                         f"write -z -u {cs + 6 * sc} {sc}",
                         f"discard {cs + 8 * sc} {sc}",
                         f"write -z {2 * cs} {cs}",                         # whole cluster zero
                         f"write -P 0x44 {size - 2 * sc - 5} {2 * sc + 5}",  # last subclusters
                     ])
    first = [e for e in l2_entries(img) if e.guest_cluster == 0]
    assert first and first[0].bitmap is not None
    bm = first[0].bitmap
    assert bm & 0xFFFFFFFF and bm >> 32, f"cluster 0 should mix allocated and zero subclusters: {bm:064b}"
    assert (bm | bm >> 32) & 0xFFFFFFFF != 0xFFFFFFFF, "cluster 0 should keep unallocated subclusters"
    m = [e for e in qemu_map(img) if e["start"] < cs]
    assert {e["depth"] for e in m} == {0, 1}, m
    assert any(e["zero"] and not e["data"] and e["depth"] == 0 for e in m), m
    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.extended_l2


def test_extended_l2_standalone_and_compressed(tmp_path: Path) -> None:
    """Extended L2 with no backing file (unallocated subclusters read zeros) and a compressed cluster."""
    cs = 64 * KiB
    sc = cs // 32
    img = make_image(str(tmp_path / "img.qcow2"), 2 * MiB, f"extended_l2=on,cluster_size={cs}", commands=[
        f"write -P 1 {sc + 3} {sc}", f"write -z {5 * sc} {sc}", f"write -c -P 2 {cs} {cs}",
        f"write -c -P 3 {2 * cs} {cs}", f"write -P 4 {2 * cs + 7 * sc} 10"])
    assert any(e.compressed for e in l2_entries(img))
    assert_reads_like_qemu(img, tmp_path)


# --------------------------------------------------------------------------- external data file


@pytest.mark.parametrize("name_kind", ["relative", "absolute"])
@pytest.mark.parametrize("data_file_raw", [False, True], ids=["data_file", "data_file_raw"])
def test_external_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_file_raw: bool,
                            name_kind: str) -> None:
    """Guest data in an external file, with and without data_file_raw.

    QEMU 7.2 opens a relative data-file name against the current directory, so QEMU runs from the
    image's directory; qcowdisk is then opened from elsewhere and must resolve the name against
    the image's directory (as for backing files).
    """
    imgdir = tmp_path / "img"
    other = tmp_path / "other"
    imgdir.mkdir()
    other.mkdir()
    monkeypatch.chdir(imgdir)
    name = "data.raw" if name_kind == "relative" else str(imgdir / "data.raw")
    opts = f"data_file={name}" + (",data_file_raw=on" if data_file_raw else "")
    src = write_pattern_file("src", 200 * KiB, seed=31)
    img = make_image("img.qcow2", 4 * MiB, opts, commands=[
        f"write -s {src} 1000 {200 * KiB}", "write -P 9 1M 300k", "write -z 1100k 64k", "discard 1200k 64k",
        f"write -P 10 {4 * MiB - 100} 100"])
    assert info(img)["format-specific"]["data"]["data-file"] == name
    expected = qemu_view(img, tmp_path)
    if data_file_raw:
        assert (imgdir / "data.raw").read_bytes()[:len(expected)] == expected
    monkeypatch.chdir(other)
    assert_reads_like_qemu(imgdir / "img.qcow2", tmp_path, expected)
    with QcowFile.open(str(imgdir / "img.qcow2"), readonly=True) as disk:
        assert disk.header.data_file == name
        assert disk.header.has_data_file and disk.header.data_file_raw == data_file_raw


# --------------------------------------------------------------------------- snapshots


def _expected_snapshots(img: str) -> list[dict]:
    """Snapshots per `qemu-img info` and `qemu-img snapshot -l` (which must agree), in table order."""
    listed = info(img).get("snapshots", [])
    lines = qemu_img("snapshot", "-l", img).stdout.splitlines()
    rows = [ln.split(None, 1) for ln in lines[2:] if ln.strip()]
    assert len(rows) == len(listed), (lines, listed)
    for row, s in zip(rows, listed, strict=True):  # columns: ID, TAG (may contain spaces), VM SIZE, ...
        assert row[0] == s["id"] and row[1].startswith(s["name"] + " "), (row, s)
    return listed


@pytest.mark.parametrize("compat", ["0.10", "1.1"], ids=["v2", "v3"])
def test_internal_snapshots(tmp_path: Path, compat: str) -> None:
    """The active layer reads correctly and disk.snapshots matches QEMU's list field by field."""
    img = str(tmp_path / "img.qcow2")
    src = write_pattern_file(str(tmp_path / "src"), 300 * KiB, seed=41)
    make_image(img, 4 * MiB, f"compat={compat}", commands=[f"write -s {src} 0 {300 * KiB}"])
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 2 64k 128k", "write -z 1M 64k", "discard 0 64k")
    sizes = [4 * MiB]
    if compat == "1.1":  # v2 images cannot be resized once they have snapshots
        qemu_img("resize", img, "6M")
    sizes.append(6 * MiB if compat == "1.1" else 4 * MiB)
    qemu_img("snapshot", "-c", "second snapshot", img)
    qemu_io(img, "write -P 3 100k 10k", "write -P 4 5000 7")
    qemu_img("snapshot", "-c", "s3", img)
    qemu_img("snapshot", "-d", "s3", img)  # a deleted entry must not linger
    qemu_io(img, "write -P 5 2M 64k")
    # Give snapshot 1 a nonzero VM clock and VM state size so those fields are tested too.
    table = snapshot_table(img)
    e0 = table[0]["entry_offset"]
    patch_be(img, e0 + 24, "Q", 3_500_000_123)
    patch_be(img, e0 + 32, "I", 12345)
    patch_be(img, e0 + 40, "Q", 12345)
    table = snapshot_table(img)
    expected = _expected_snapshots(img)
    assert [s["name"] for s in expected] == ["s1", "second snapshot"]
    assert expected[0]["vm-clock-sec"] == 3 and expected[0]["vm-clock-nsec"] == 500_000_123
    assert [t["disk_size"] for t in table] == sizes

    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        snaps = list(disk.snapshots)
        assert [(s.id, s.name) for s in snaps] == [(e["id"], e["name"]) for e in expected]
        for s, e, t in zip(snaps, expected, table, strict=True):
            assert isinstance(s.date, datetime)
            want_ts = e["date-sec"] + e["date-nsec"] / 1e9
            assert abs(s.date.timestamp() - want_ts) < 2e-6, (s.date, e)
            assert s.vm_clock_ns == e["vm-clock-sec"] * 1_000_000_000 + e["vm-clock-nsec"]
            assert s.vm_state_size == e["vm-state-size"]
            assert s.disk_size == t["disk_size"]
            assert s.icount == e.get("icount", t["icount"])


# --------------------------------------------------------------------------- dirty images


def test_dirty_lazy_refcounts_read_only(tmp_path: Path) -> None:
    """A lazy-refcounts image whose writer was SIGKILLed keeps the dirty bit; read-only open reads it intact."""
    img = str(tmp_path / "img.qcow2")
    src = write_pattern_file(str(tmp_path / "src"), 300 * KiB, seed=51)
    make_image(img, 4 * MiB, "lazy_refcounts=on", commands=["write -P 1 2M 64k"])
    kill_writer(img, f"write -s {src} 1000 {300 * KiB}", "write -P 9 1M 64k", "write -z 2M 32k")
    assert read_be(img, 72, "Q") & 1, "dirty bit should be left set by the killed writer"
    assert info(img)["dirty-flag"] is True
    expected = qemu_view(img, tmp_path)
    before = file_digest(img)
    assert_reads_like_qemu(img, tmp_path, expected)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.incompatible_features & 1
    assert file_digest(img) == before, "a read-only open modified the image"


# --------------------------------------------------------------------------- backing chains


def _make_base(path: str, fmt: str, size: int, seed: int) -> str:
    """A backing file of the given format (raw, qcow v1, qcow2 v2) holding random data in places."""
    if fmt == "raw":
        return write_raw(path, pattern(size, seed))
    src = write_pattern_file(path + ".src", MiB, seed)
    opts = "compat=0.10" if fmt == "qcow2" else None
    return make_image(path, size, opts, fmt=fmt, commands=[
        f"write -s {src} 0 {MiB}", f"write -P 0x77 {size - 5000} 5000", f"write -P 0x78 {MiB + 4096} 8192"])


@pytest.mark.parametrize("base_fmt", ["raw", "qcow", "qcow2"])
def test_backing_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_fmt: str) -> None:
    """A 4-level chain over a raw / qcow v1 / qcow2 base, relative names resolved per naming image.

    top.qcow2 -> sub/mid2.qcow2 -> mid1.qcow2 (in sub/) -> ../base.X; read from another cwd.
    """
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(imgs)
    ext = {"raw": "raw", "qcow": "qcow", "qcow2": "qcow2"}[base_fmt]
    _make_base(f"base.{ext}", base_fmt, 3 * MiB, 61)
    make_image("sub/mid1.qcow2", 4 * MiB, "compat=0.10", backing=f"../base.{ext}", backing_fmt=base_fmt,
               commands=["write -P 0x31 256k 300k", "write -z 2M 64k", f"write -P 0x32 {3 * MiB - 10} 20"])
    make_image("sub/mid2.qcow2", 4 * MiB, "cluster_size=4096", backing="mid1.qcow2", backing_fmt="qcow2",
               commands=["write -P 0x41 500k 5000", "write -z 600k 8k", "write -P 0x42 3500k 100k"])
    make_image("top.qcow2", 5 * MiB, None, backing="sub/mid2.qcow2", backing_fmt="qcow2",
               commands=["write -P 0x51 0 100", "write -z 1M 64k", "discard 3M 64k", f"write -P 0x52 {5 * MiB - 512} 512"])
    expected = qemu_view(imgs / "top.qcow2", tmp_path)
    monkeypatch.chdir(tmp_path / "other")
    rel_top = os.path.join("..", "imgs", "top.qcow2")
    assert_reads_like_qemu(rel_top, tmp_path, expected)
    with QcowFile.open(rel_top, readonly=True) as disk:
        assert disk.header.backing_file == "sub/mid2.qcow2"
        assert chain_depth(disk) == 3


def test_qcow1_backing_with_compressed_cluster(tmp_path: Path) -> None:
    """A qcow v1 backing file holding a compressed cluster (qcow v1's own compression format)."""
    base = make_image(str(tmp_path / "base.qcow"), 2 * MiB, fmt="qcow", commands=[
        "write -P 1 0 64k", "write -c -P 2 64k 4k", "write -c -P 3 1M 4k", "write -c -P 4 1028k 4k"])
    img = make_image(str(tmp_path / "img.qcow2"), 2 * MiB, backing=base, backing_fmt="qcow",
                     commands=["write -P 4 100k 1k"])
    assert_reads_like_qemu(img, tmp_path)


def test_backing_format_extension_honoured(tmp_path: Path) -> None:
    """A raw backing file whose bytes are a valid qcow2 image is read as raw bytes when -F raw says so."""
    inner = make_image(str(tmp_path / "inner.qcow2"), MiB, commands=["write -P 0xee 0 512k"])
    base = str(tmp_path / "base.img")
    shutil.copyfile(inner, base)
    img = make_image(str(tmp_path / "img.qcow2"), 2 * MiB, backing=base, backing_fmt="raw",
                     commands=["write -P 1 64k 4k"])
    expected = qemu_view(img, tmp_path)
    with open(base, "rb") as f:
        head = f.read(64 * KiB)
    assert expected[:64 * KiB] == head and head[:4] == b"QFI\xfb"  # QEMU reads the qcow2 bytes as raw data
    assert_reads_like_qemu(img, tmp_path, expected)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.backing_format == "raw"


@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_backing_format_probed(tmp_path: Path, base_fmt: str) -> None:
    """No backing-format extension (byte-patched out): the backing file's format is probed."""
    base = _make_base(str(tmp_path / f"base.{base_fmt}"), base_fmt, 2 * MiB, 71)
    img = make_image(str(tmp_path / "img.qcow2"), 3 * MiB, backing=base, backing_fmt=base_fmt,
                     commands=["write -P 1 10k 20k", "write -z 1M 64k"])
    c0 = read_cluster0(img)
    c0.drop_ext(EXT_BACKING_FORMAT)
    write_cluster0(img, c0)
    assert "backing-filename-format" not in info(img)
    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.header.backing_format is None


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_backing_shorter_than_overlay(tmp_path: Path, base_fmt: str) -> None:
    """Past the backing file's end the overlay reads zeros, including inside a partly-backed cluster."""
    base_size = MiB + 1234 if base_fmt == "raw" else MiB + 512
    if base_fmt == "raw":
        base = write_raw(str(tmp_path / "base.raw"), pattern(base_size, 81))
    else:
        base = make_image(str(tmp_path / "base.qcow2"), base_size, commands=[f"write -P 0x99 0 {base_size}"])
    img = make_image(str(tmp_path / "img.qcow2"), 4 * MiB, backing=base, backing_fmt=base_fmt,
                     commands=[f"write -P 5 {MiB - 100} 50", f"write -P 6 {MiB + 2048} 100", "write -P 7 3M 4k"])
    expected = assert_reads_like_qemu(img, tmp_path)
    assert expected[MiB + 4096:3 * MiB] == bytes(2 * MiB - 4096)


def _chain(tmp_path: Path, levels: int) -> list[str]:
    """levels qcow2 images, each backed by the previous one; returns their paths, base first."""
    paths: list[str] = []
    for i in range(levels):
        p = str(tmp_path / f"l{i}.qcow2")
        make_image(p, 2 * MiB, backing=paths[-1] if paths else None, backing_fmt="qcow2" if paths else None,
                   commands=[f"write -P {i + 1} {i * 128 * KiB} 200k"])
        paths.append(p)
    return paths


def test_chain_deeper_than_max_nesting_depth(tmp_path: Path) -> None:
    """A 4-image chain opens by default and fails with max_nesting_depth=2."""
    top = _chain(tmp_path, 4)[-1]
    assert_reads_like_qemu(top, tmp_path)
    assert_reads_like_qemu(top, tmp_path, max_nesting_depth=4)
    with pytest.raises(BackingChainError):
        QcowFile.open(top, readonly=True, max_nesting_depth=2)


@pytest.mark.parametrize("loop", ["a-b-a", "a-a", "a-./a"])
def test_backing_loop(tmp_path: Path, loop: str) -> None:
    """A chain that loops back on itself is refused (no RecursionError, no hang)."""
    a = make_image(str(tmp_path / "a.qcow2"), MiB, commands=["write -P 1 0 4k"])
    if loop == "a-b-a":
        b = make_image(str(tmp_path / "b.qcow2"), MiB, backing="a.qcow2", backing_fmt="qcow2")
        qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
        targets = [a, b]
    else:
        qemu_img("rebase", "-u", "-b", "a.qcow2" if loop == "a-a" else "./a.qcow2", "-F", "qcow2", a)
        targets = [a]
    for t in targets:
        with pytest.raises(BackingChainError):
            QcowFile.open(t, readonly=True)


def test_missing_backing_file(tmp_path: Path) -> None:
    """A backing file that does not exist: BackingChainError naming it."""
    base = make_image(str(tmp_path / "gone.qcow2"), MiB)
    img = make_image(str(tmp_path / "img.qcow2"), MiB, backing=base, backing_fmt="qcow2")
    os.unlink(base)
    with pytest.raises(BackingChainError, match=r"gone\.qcow2"):
        QcowFile.open(img, readonly=True)


# --------------------------------------------------------------------------- header extensions


UNKNOWN_EXT_TYPE = 0x7A5B3C1D
UNKNOWN_EXT_DATA = b"kept verbatim, 29 bytes long!"


def test_header_extensions(tmp_path: Path) -> None:
    """Backing format, feature-name table, bitmaps and an unknown extension are all parsed / kept."""
    base = make_image(str(tmp_path / "base.qcow2"), 2 * MiB, commands=["write -P 1 0 1M"])
    img = make_image(str(tmp_path / "img.qcow2"), 2 * MiB, backing=base, backing_fmt="qcow2",
                     commands=["write -P 2 512k 64k"])
    qemu_img("bitmap", "--add", img, "b0")
    c0 = read_cluster0(img)
    assert c0.ext(EXT_BITMAPS) is not None, "qemu-img bitmap --add made no bitmaps extension"
    c0.extensions.append((UNKNOWN_EXT_TYPE, UNKNOWN_EXT_DATA))
    write_cluster0(img, c0)
    assert read_be(img, 88, "Q") & 1, "bitmaps autoclear bit"
    r = qemu_img("check", img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    table = decode_feature_table(c0.ext(EXT_FEATURE_TABLE) or b"")
    assert table[(0, 0)] == "dirty bit"

    assert_reads_like_qemu(img, tmp_path)
    with QcowFile.open(img, readonly=True) as disk:
        h = disk.header
        assert h.backing_file == base and h.backing_format == "qcow2"
        assert h.feature_names == table
        assert h.autoclear_features & 1
        exts = [(e.ext_type, e.data) for e in h.extensions]
        assert (UNKNOWN_EXT_TYPE, UNKNOWN_EXT_DATA) in exts
        assert (EXT_BITMAPS, c0.ext(EXT_BITMAPS)) in exts


# --------------------------------------------------------------------------- refused images


def _secret_args() -> list[str]:
    return ["--object", "secret,id=sec0,data=abc"]


@pytest.mark.parametrize("method", ["aes", "luks"])
def test_encrypted_images_refused(tmp_path: Path, method: str) -> None:
    """AES- and LUKS-encrypted images are refused at open with an error naming the encryption."""
    img = str(tmp_path / "img.qcow2")
    opts = f"encrypt.format={method},encrypt.key-secret=sec0"
    if method == "luks":
        opts += ",encrypt.iter-time=10"  # keep PBKDF cheap
    r = qemu_img("create", "-q", "-f", "qcow2", *_secret_args(), "-o", opts, img, "1M", check=False)
    if r.returncode != 0:
        # Fallback: QEMU refused to create it; mark a plain image as encrypted by hand.
        create(img, MiB)
        patch_be(img, 32, "I", {"aes": 1, "luks": 2}[method])
    assert read_be(img, 32, "I") == {"aes": 1, "luks": 2}[method]
    with pytest.raises(UnsupportedFeatureError) as exc:
        QcowFile.open(img, readonly=True)
    msg = str(exc.value).lower()
    assert "encrypt" in msg and method in msg, msg


@pytest.mark.parametrize("bit", [5, 63])
@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_unknown_incompatible_feature_refused(tmp_path: Path, bit: int, named: bool) -> None:
    """An unknown incompatible feature bit refuses the open (named from the feature table if it is there)."""
    img = make_image(str(tmp_path / "img.qcow2"), MiB, commands=["write -P 1 0 4k"])
    if named:
        c0 = read_cluster0(img)
        table = decode_feature_table(c0.ext(EXT_FEATURE_TABLE) or b"")
        table[(0, bit)] = "frobnicated clusters"
        c0.extensions = [(t, feature_table((k, b, n) for (k, b), n in table.items()) if t == EXT_FEATURE_TABLE else d)
                         for t, d in c0.extensions]
        write_cluster0(img, c0)
    or_be(img, 72, "Q", 1 << bit)
    assert qemu_img("info", img, check=False).returncode != 0, "QEMU should refuse it too"
    with pytest.raises(UnsupportedFeatureError) as exc:
        QcowFile.open(img, readonly=True)
    if named:
        assert "frobnicated clusters" in str(exc.value)


def test_unknown_compatible_and_autoclear_bits_ignored(tmp_path: Path) -> None:
    """Unknown compatible / autoclear bits do not stop a read-only open, which leaves them alone."""
    img = make_image(str(tmp_path / "img.qcow2"), MiB, commands=["write -P 1 0 100k"])
    or_be(img, 80, "Q", 1 << 7)
    or_be(img, 88, "Q", 1 << 9)
    before = file_digest(img)
    assert_reads_like_qemu(img, tmp_path)
    assert file_digest(img) == before


# --------------------------------------------------------------------------- rich images, API edges, random reads


def _build_rich(tmp: Path, kind: str) -> str:
    """One image with most of what a reader meets: backing (shorter), compressed, zero, COW, discards."""
    base = make_image(str(tmp / "base.qcow2"), 5 * MiB, "cluster_size=16384", commands=[
        f"write -s {write_pattern_file(str(tmp / 'bsrc'), 5 * MiB, 91)} 0 {5 * MiB - 3333}", "write -z 2M 100k"])
    src = write_pattern_file(str(tmp / "src"), MiB, 92)
    text = write_raw(str(tmp / "text"), text_like(64 * KiB, 93))
    opts = {"extl2": "extended_l2=on,cluster_size=32768,compression_type=zstd",
            "plain": "cluster_size=4096,lazy_refcounts=on"}[kind]
    cs = 32768 if kind == "extl2" else 4096
    cmds = [f"write -s {src} 12345 {300 * KiB}", f"write -c -P 0x0c {MiB} {cs}", f"write -c -s {text} {MiB + cs} {cs}",
            f"write -c -P 0x0d {MiB + 2 * cs} {cs}", f"write -P 0x0e {MiB + cs + 77} 100",
            "write -z 700k 70k", "write -z -u 40k 8k", "discard 3M 256k", f"write -s {src} {4 * MiB + 1} {MiB}",
            f"write -P 0x0f {6 * MiB - 1} 1"]
    return make_image(str(tmp / f"rich-{kind}.qcow2"), 6 * MiB, opts, backing=base, backing_fmt="qcow2", commands=cmds)


class OpenedImage:
    """An image opened read-only next to QEMU's view of it.

    A plain class, not a dataclass: hypothesis pretty-prints dataclass fields (megabytes of
    `expected`) in its falsifying example, but honours __repr__ here.
    """

    def __init__(self, name: str, disk: QcowFile, expected: bytes) -> None:
        self.name = name
        self.disk = disk
        self.expected = expected

    def __repr__(self) -> str:
        return f"<OpenedImage {self.name}: {len(self.expected)} bytes>"


@pytest.fixture(scope="module", params=["extl2", "plain"])
def rich(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenedImage]:
    """A richly-populated image, opened read-only once per module, with QEMU's guest view."""
    tmp = tmp_path_factory.mktemp(f"rich-{request.param}")
    img = _build_rich(tmp, request.param)
    expected = qemu_view(img, tmp)
    disk = QcowFile.open(img, readonly=True)
    try:
        yield OpenedImage(request.param, disk, expected)
    finally:
        disk.close()


def test_rich_image_whole(rich: OpenedImage) -> None:
    """The rich images read whole and in slices like QEMU."""
    disk, expected = rich.disk, rich.expected
    check_disk(disk, expected, "rich image")


def test_read_api_edges(rich: OpenedImage) -> None:
    """Clipping at virtual_size, zero lengths, negative arguments, short readinto_at only at the end."""
    disk, expected = rich.disk, rich.expected
    size = disk.virtual_size
    assert disk.read_at(size - 10, 100) == expected[-10:]
    assert disk.read_at(size, 5) == b""
    assert disk.read_at(123, 0) == b""
    assert disk.read_at(0, 0) == b""
    for bad in ((-1, 1), (0, -1), (-512, -512)):
        with pytest.raises(ValueError, match="negative"):
            disk.read_at(*bad)
    with pytest.raises(ValueError, match="negative"):
        disk.readinto_at(bytearray(4), -1)
    buf = bytearray(8192)
    assert disk.readinto_at(buf, size - 1000) == 1000
    assert buf[:1000] == expected[-1000:]
    assert disk.readinto_at(bytearray(8192), size) == 0
    assert disk.readinto_at(bytearray(0), 4096) == 0
    big = bytearray(size + 4096)  # one call spanning the whole disk and beyond
    assert disk.readinto_at(big, 0) == size
    assert_same(bytes(big[:size]), expected, "readinto_at whole disk")
    mid = bytearray(3 * 65536 + 5)
    assert disk.readinto_at(mid, MiB - 7) == len(mid)  # not short away from the end
    assert mid == expected[MiB - 7:MiB - 7 + len(mid)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_reads(rich: OpenedImage, data: st.DataObject) -> None:
    """Random (offset, length) reads through read_at and readinto_at agree with QEMU's bytes."""
    disk, expected = rich.disk, rich.expected
    size = disk.virtual_size
    offset = data.draw(st.one_of(st.integers(0, size), st.integers(size - 70000, size)), label="offset")
    length = data.draw(st.one_of(st.integers(0, 70000), st.integers(0, size)), label="length")
    want = expected[offset:offset + length]
    assert_same(disk.read_at(offset, length), want, f"read_at({offset}, {length})")
    buf = bytearray(length)
    assert disk.readinto_at(memoryview(buf), offset) == len(want)
    assert_same(bytes(buf[:len(want)]), want, f"readinto_at({offset}, {length})")
