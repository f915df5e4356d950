"""Specific write semantics, one test each: create's rules, create_from_backing, bounds and
read-only refusals, copy-on-write (backing file, internal snapshot, compressed cluster), zero
writes and holes, freeing and reusing clusters, refcount-table growth, COPIED flags, lazy
refcounts and the dirty bit, unknown header extensions/fields and autoclear bits.

QEMU (qemu-img / qemu-io 7.2) is the oracle throughout. Invalid create() combinations are the
ones qemu-img refuses, and each case checks that qemu-img really refuses it too; qcowdisk answers
every bad argument with ValueError.

Not tested here: L1 table growth. The L1 table is sized for the virtual size at create and only
grows on resize, which is not a write-path operation; the refcount table is what writes grow.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest

from qcowdisk import QcowError, QcowFile, ReadOnlyError
from qcowdisk.hostio import HostFile
from qemutools import assert_clean, compare, create, info, pattern, qemu_img, qemu_io, to_raw, write_raw

KiB = 1024
MiB = 1024 * KiB

HDR_INCOMPAT = 72
HDR_AUTOCLEAR = 88
INCOMPAT_DIRTY = 1
COPIED = 1 << 63
COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# --------------------------------------------------------------------------- small helpers

def header_u64(path: Path | str, offset: int) -> int:
    """A big-endian u64 field of the image header, read straight from the file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def header_u32(path: Path | str, offset: int) -> int:
    """A big-endian u32 field of the image header, read straight from the file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">I", f.read(4))[0]


def qemu_map(image: Path | str) -> list[dict[str, Any]]:
    """`qemu-img map --output=json`."""
    return json.loads(qemu_img("map", "--output=json", str(image)).stdout)


def map_at(entries: list[dict[str, Any]], guest_offset: int) -> dict[str, Any]:
    """The qemu-img map extent containing guest_offset."""
    for e in entries:
        if e["start"] <= guest_offset < e["start"] + e["length"]:
            return e
    raise AssertionError(f"no map extent at {guest_offset:#x}: {entries}")


def host_offset_of(entries: list[dict[str, Any]], guest_offset: int) -> int | None:
    """Host offset QEMU reports for a guest offset (None: not plainly allocated, e.g. compressed)."""
    e = map_at(entries, guest_offset)
    if "offset" not in e:
        return None
    return e["offset"] + (guest_offset - e["start"])


def recording_factory(log: list[tuple[str, int, int]]) -> type[HostFile]:
    """A HostFile subclass that logs every pread/preadv as (basename, offset, length)."""

    class RecordingHost(HostFile):
        def pread(self, length: int, offset: int) -> bytes:
            log.append((os.path.basename(self.path), offset, length))
            return super().pread(length, offset)

        def preadv(self, buffers: Any, offset: int) -> int:
            log.append((os.path.basename(self.path), offset, sum(memoryview(b).nbytes for b in buffers)))
            return super().preadv(buffers, offset)

    return RecordingHost


class ImageView:
    """Just enough of a qcow2 reader (non-extended L2) to audit L2 flags and refcounts."""

    def __init__(self, path: Path | str) -> None:
        self.data = Path(path).read_bytes()
        d = self.data
        self.cluster_bits = struct.unpack_from(">I", d, 20)[0]
        self.cluster_size = 1 << self.cluster_bits
        self.l1_size = struct.unpack_from(">I", d, 36)[0]
        self.l1_offset = struct.unpack_from(">Q", d, 40)[0]
        self.reftable_offset = struct.unpack_from(">Q", d, 48)[0]
        version = struct.unpack_from(">I", d, 4)[0]
        self.refcount_order = struct.unpack_from(">I", d, 96)[0] if version >= 3 else 4

    def u64(self, offset: int) -> int:
        return struct.unpack_from(">Q", self.data, offset)[0]

    def l1(self) -> list[int]:
        return [self.u64(self.l1_offset + 8 * i) for i in range(self.l1_size)]

    def l2_entries(self, l2_offset: int) -> list[int]:
        return [self.u64(l2_offset + 8 * i) for i in range(self.cluster_size // 8)]

    def refcount(self, host_offset: int) -> int:
        bits = 1 << self.refcount_order
        per_block = self.cluster_size * 8 // bits
        cluster = host_offset >> self.cluster_bits
        block = self.u64(self.reftable_offset + 8 * (cluster // per_block)) & ~0x1FF
        if not block:
            return 0
        index = cluster % per_block
        bit = index * bits
        if bits >= 8:  # whole bytes, big-endian
            start = block + bit // 8
            return int.from_bytes(self.data[start:start + bits // 8], "big")
        # narrower entries are packed least-significant first within each byte (as QEMU does)
        return (self.data[block + bit // 8] >> (bit % 8)) & ((1 << bits) - 1)


# --------------------------------------------------------------------------- create

def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    """create() on an existing path fails and leaves the file alone."""
    path = tmp_path / "exists.qcow2"
    path.write_bytes(b"precious data")
    with pytest.raises((FileExistsError, QcowError)):
        QcowFile.create(str(path), 1 * MiB)
    assert path.read_bytes() == b"precious data"


@pytest.mark.parametrize("size,expected", [(1000, 1024), (1, 512), (512, 512), (MiB + 1, MiB + 512), (0, 0)])
def test_create_rounds_size_up_to_512(tmp_path: Path, size: int, expected: int) -> None:
    """Virtual sizes are rounded up to whole sectors, as qemu-img does."""
    path = tmp_path / "r.qcow2"
    with QcowFile.create(str(path), size) as disk:
        assert disk.virtual_size == expected
    assert info(str(path))["virtual-size"] == expected
    assert_clean(str(path))


# (id, QcowFile.create kwargs, equivalent qemu-img -o options, needs a backing file)
INVALID_CREATES: list[tuple[str, dict[str, Any], str, bool]] = [
    ("extl2-cluster-8k", {"cluster_size": 8192, "extended_l2": True}, "cluster_size=8192,extended_l2=on", False),
    ("extl2-cluster-512", {"cluster_size": 512, "extended_l2": True}, "cluster_size=512,extended_l2=on", False),
    ("v2-lazy", {"compat": "0.10", "lazy_refcounts": True}, "compat=0.10,lazy_refcounts=on", False),
    ("v2-extl2", {"compat": "0.10", "extended_l2": True}, "compat=0.10,extended_l2=on", False),
    ("v2-zstd", {"compat": "0.10", "compression_type": "zstd"}, "compat=0.10,compression_type=zstd", False),
    ("v2-rc8", {"compat": "0.10", "refcount_bits": 8}, "compat=0.10,refcount_bits=8", False),
    ("v2-rc1", {"compat": "0.10", "refcount_bits": 1}, "compat=0.10,refcount_bits=1", False),
    ("v2-datafile", {"compat": "0.10", "data_file": "DATA"}, "compat=0.10,data_file=DATA", False),
    ("datafileraw-without-datafile", {"data_file_raw": True}, "data_file_raw=on", False),
    ("backing-with-datafileraw", {"data_file": "DATA", "data_file_raw": True},
     "data_file=DATA,data_file_raw=on", True),
    ("rc0", {"refcount_bits": 0}, "refcount_bits=0", False),
    ("rc3", {"refcount_bits": 3}, "refcount_bits=3", False),
    ("rc128", {"refcount_bits": 128}, "refcount_bits=128", False),
    ("cluster-1000", {"cluster_size": 1000}, "cluster_size=1000", False),
    ("cluster-256", {"cluster_size": 256}, "cluster_size=256", False),
    ("cluster-4M", {"cluster_size": 4 * MiB}, "cluster_size=4M", False),
    ("cluster-0", {"cluster_size": 0}, "cluster_size=0", False),
    ("prealloc-metadata-with-backing", {"preallocation": "metadata"}, "preallocation=metadata", True),
    ("prealloc-falloc-with-backing", {"preallocation": "falloc"}, "preallocation=falloc", True),
    ("prealloc-full-with-backing", {"preallocation": "full"}, "preallocation=full", True),
    ("compression-lz4", {"compression_type": "lz4"}, "compression_type=lz4", False),
    ("prealloc-bogus", {"preallocation": "bogus"}, "preallocation=bogus", False),
    ("compat-2", {"compat": "2"}, "compat=2", False),
]


@pytest.mark.parametrize("kwargs,qemu_opts,needs_backing", [c[1:] for c in INVALID_CREATES],
                         ids=[c[0] for c in INVALID_CREATES])
def test_create_refuses_invalid_combinations(tmp_path: Path, kwargs: dict[str, Any], qemu_opts: str,
                                             needs_backing: bool) -> None:
    """Every combination qemu-img refuses, create() refuses with ValueError, creating no file."""
    data = str(tmp_path / "data.raw")
    kwargs = {k: (data if v == "DATA" else v) for k, v in kwargs.items()}
    qemu_opts = qemu_opts.replace("DATA", str(tmp_path / "qemu-data.raw"))
    base = tmp_path / "base.raw"
    write_raw(str(base), pattern(MiB, 1))
    extra: list[str] = ["-b", str(base), "-F", "raw"] if needs_backing else []
    # The oracle: qemu-img refuses this too.
    p = qemu_img("create", "-f", "qcow2", "-o", qemu_opts, *extra, str(tmp_path / "qemu.qcow2"), "1M", check=False)
    assert p.returncode != 0, f"qemu-img accepted {qemu_opts}; the case is wrong"

    path = tmp_path / "mine.qcow2"
    if needs_backing:
        kwargs = {**kwargs, "backing_file": str(base), "backing_format": "raw"}
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message; the type is the contract
        QcowFile.create(str(path), MiB, **kwargs)
    assert not path.exists(), "a refused create() left a file behind"
    assert not os.path.exists(data), "a refused create() left a data file behind"


def test_create_refuses_negative_size(tmp_path: Path) -> None:
    """A negative size is a bad argument."""
    with pytest.raises(ValueError, match="size"):
        QcowFile.create(str(tmp_path / "n.qcow2"), -512)
    assert not (tmp_path / "n.qcow2").exists()


# Boundary combinations qemu-img accepts; qcowdisk must accept them and produce what qemu-img reports.
VALID_CREATES: list[tuple[str, dict[str, Any], bool]] = [
    ("extl2-16k", {"cluster_size": 16384, "extended_l2": True}, False),
    ("rc1", {"refcount_bits": 1}, False),
    ("rc64", {"refcount_bits": 64}, False),
    ("cluster-512", {"cluster_size": 512}, False),
    ("cluster-2M", {"cluster_size": 2 * MiB}, False),
    ("v2", {"compat": "0.10"}, False),
    ("lazy", {"lazy_refcounts": True}, False),
    ("zstd", {"compression_type": "zstd"}, False),
    ("prealloc-metadata-extl2-with-backing", {"preallocation": "metadata", "extended_l2": True}, True),
    ("datafile-with-backing", {"data_file": "DATA"}, True),
    ("datafile-raw", {"data_file": "DATA", "data_file_raw": True}, False),
]


@pytest.mark.parametrize("kwargs,needs_backing", [c[1:] for c in VALID_CREATES], ids=[c[0] for c in VALID_CREATES])
def test_create_accepts_boundary_combinations(tmp_path: Path, kwargs: dict[str, Any], needs_backing: bool) -> None:
    """qemu-img accepts these; so does create(), and qemu-img info reports the options back."""
    data = str(tmp_path / "data.raw")
    kwargs = {k: (data if v == "DATA" else v) for k, v in kwargs.items()}
    base = tmp_path / "base.raw"
    if needs_backing:
        write_raw(str(base), pattern(MiB, 2))
        kwargs = {**kwargs, "backing_file": str(base), "backing_format": "raw"}
    path = tmp_path / "ok.qcow2"
    with QcowFile.create(str(path), MiB, **kwargs) as disk:
        disk.write_at(4096, b"hello")
    assert_clean(str(path))
    i = info(str(path))
    spec = i["format-specific"]["data"]
    assert i["cluster-size"] == kwargs.get("cluster_size", 65536)
    assert spec["compat"] == kwargs.get("compat", "1.1")
    if spec["compat"] == "1.1":
        assert spec["refcount-bits"] == kwargs.get("refcount_bits", 16)
        assert spec["lazy-refcounts"] == kwargs.get("lazy_refcounts", False)
        assert spec["extended-l2"] == kwargs.get("extended_l2", False)
        assert spec["compression-type"] == kwargs.get("compression_type", "zlib")
    if "data_file" in kwargs:
        assert spec["data-file"] == data
        assert spec.get("data-file-raw", False) == kwargs.get("data_file_raw", False)
    expected = bytearray(pattern(MiB, 2) if needs_backing else bytes(MiB))
    expected[4096:4101] = b"hello"
    assert to_raw(str(path), str(tmp_path / "out.raw")) == bytes(expected)


# --------------------------------------------------------------------------- create_from_backing

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_create_from_backing_size_name_and_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Size comes from the backing file; the relative name is stored as given and resolved against
    the overlay's directory (not the cwd); the backing-format extension is written even when the
    format was probed."""
    size = 3 * MiB + 512
    data = pattern(size, 3)
    raw = write_raw(str(tmp_path / "src.raw"), data)
    base_name = f"base.{fmt}"
    if fmt == "raw":
        os.rename(raw, tmp_path / base_name)
    else:
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, str(tmp_path / base_name))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a cwd-relative resolution would not find base.*
    overlay = tmp_path / "overlay.qcow2"
    with QcowFile.create_from_backing(str(overlay), base_name) as disk:
        assert disk.virtual_size == size
        assert disk.read_at(size - 4096, 4096) == data[-4096:]
        assert disk.header.backing_file == base_name
        assert disk.header.backing_format == fmt
    i = info(str(overlay))
    assert i["virtual-size"] == size
    assert i["backing-filename"] == base_name, "relative backing name must be stored as given"
    assert i["backing-filename-format"] == fmt, "backing-format extension missing or wrong"
    assert_clean(str(overlay))
    compare(str(overlay), str(tmp_path / base_name), fmt_a="qcow2", fmt_b=fmt)
    # reopening from yet another cwd still finds the backing file
    with QcowFile.open(str(overlay), readonly=True) as disk:
        assert disk.read_at(0, 4096) == data[:4096]


def test_create_from_backing_explicit_size_and_options(tmp_path: Path) -> None:
    """An explicit size wins over the backing file's; create options pass through."""
    base = tmp_path / "base.raw"
    write_raw(str(base), pattern(MiB, 4))
    overlay = tmp_path / "o.qcow2"
    with QcowFile.create_from_backing(str(overlay), str(base), backing_format="raw", size=4 * MiB,
                                      cluster_size=4096) as disk:
        assert disk.virtual_size == 4 * MiB
        assert disk.read_at(MiB - 10, 20) == pattern(MiB, 4)[-10:] + bytes(10)
        disk.write_at(MiB - 5, b"0123456789")
    i = info(str(overlay))
    assert i["virtual-size"] == 4 * MiB and i["cluster-size"] == 4096
    assert i["backing-filename-format"] == "raw"
    assert_clean(str(overlay))
    expected = bytearray(pattern(MiB, 4) + bytes(3 * MiB))
    expected[MiB - 5:MiB + 5] = b"0123456789"
    assert to_raw(str(overlay), str(tmp_path / "out.raw")) == bytes(expected)


# --------------------------------------------------------------------------- bounds, read-only, buffers

def test_writes_past_the_end_raise_valueerror(tmp_path: Path) -> None:
    """Nothing is written when a range runs past virtual_size or is negative."""
    path = tmp_path / "e.qcow2"
    size = MiB
    with QcowFile.create(str(path), size) as disk:
        disk.write_at(size - 4096, b"\x11" * 4096)
        for bad in (lambda: disk.write_at(size - 1, b"ab"),
                    lambda: disk.write_at(size, b"x"),
                    lambda: disk.write_at(-1, b"x"),
                    lambda: disk.write_zeroes(size - 512, 1024),
                    lambda: disk.write_zeroes(-512, 512),
                    lambda: disk.punch_hole(size - 512, 1024),
                    lambda: disk.punch_hole(0, -1),
                    lambda: disk.write_zeroes(0, -1)):
            with pytest.raises(ValueError):  # noqa: PT011 - past the end or negative: the type is the contract
                bad()
        assert disk.read_at(size - 4096, 4096) == b"\x11" * 4096, "a refused write changed data"
    assert_clean(str(path))


def test_readonly_refuses_every_write(tmp_path: Path) -> None:
    """write_at / write_zeroes / punch_hole on a read-only image raise ReadOnlyError; file untouched."""
    path = tmp_path / "ro.qcow2"
    create(str(path), "1M")
    qemu_io(str(path), "write -q -P 0x5a 0 128k")
    before = path.read_bytes()
    with QcowFile.open(str(path), readonly=True) as disk:
        with pytest.raises(ReadOnlyError):
            disk.write_at(0, b"x")
        with pytest.raises(ReadOnlyError):
            disk.write_zeroes(0, 512)
        with pytest.raises(ReadOnlyError):
            disk.punch_hole(0, 65536)
        assert disk.read_at(0, 4) == b"\x5a" * 4
    assert path.read_bytes() == before


def test_write_at_accepts_buffer_types(tmp_path: Path) -> None:
    """bytes, bytearray, memoryview (also a slice), array.array; returns the byte count written."""
    path = tmp_path / "b.qcow2"
    expected = bytearray(MiB)
    with QcowFile.create(str(path), MiB) as disk:
        cases: list[tuple[int, Any, bytes]] = []
        raw = pattern(5000, 5)
        cases.append((0, raw, raw))
        cases.append((70000, bytearray(raw), raw))
        cases.append((140001, memoryview(raw)[100:3100], raw[100:3100]))
        cases.append((200000, array("B", raw), raw))
        words = array("I", range(1000))
        cases.append((300000, words, words.tobytes()))
        cases.append((400000, memoryview(bytearray(raw)).cast("B"), raw))
        for offset, buf, content in cases:
            n = disk.write_at(offset, buf)
            assert n == len(content), f"write_at({type(buf).__name__}) returned {n}, wrote {len(content)} bytes"
            expected[offset:offset + len(content)] = content
        assert disk.read_at(0, MiB) == bytes(expected)
    assert to_raw(str(path), str(tmp_path / "o.raw")) == bytes(expected)


# --------------------------------------------------------------------------- copy-on-write

def _raw_backed(tmp_path: Path, cluster_size: int, extended_l2: bool = False) -> tuple[Path, bytes]:
    """An overlay (made by qemu-img) over a raw backing file full of random data."""
    data = pattern(2 * MiB, 7)
    write_raw(str(tmp_path / "base.raw"), data)
    overlay = tmp_path / "overlay.qcow2"
    opts = f"cluster_size={cluster_size}" + (",extended_l2=on" if extended_l2 else "")
    create(str(overlay), 2 * MiB, options=opts, backing=str(tmp_path / "base.raw"), backing_fmt="raw")
    return overlay, data


def _backing_reads(log: list[tuple[str, int, int]], name: str) -> list[tuple[int, int]]:
    return [(o, n) for (p, o, n) in log if p == name and n > 0]


def _within(reads: list[tuple[int, int]], allowed: list[tuple[int, int]]) -> bool:
    """Every read lies within one of the allowed [start, end) ranges."""
    return all(any(a <= o and o + n <= b for a, b in allowed) for o, n in reads)


@pytest.mark.parametrize("start,length", [(65536 + 1000, 3000), (65536, 100), (2 * 65536 - 50, 50),
                                          (3 * 65536 - 700, 1400)])
def test_cow_partial_write_reads_only_uncovered_backing(tmp_path: Path, start: int, length: int) -> None:
    """A partial write into unallocated clusters reads from the backing file only what it does not cover."""
    cs = 65536
    overlay, data = _raw_backed(tmp_path, cs)
    log: list[tuple[str, int, int]] = []
    payload = pattern(length, 8)
    with QcowFile.open(str(overlay), host_factory=recording_factory(log)) as disk:
        log.clear()
        disk.write_at(start, payload)
        reads = _backing_reads(log, "base.raw")
        first, last = start // cs * cs, -(-(start + length) // cs) * cs
        uncovered = [(first, start), (start + length, last)]
        assert reads, "partial write over a backing file read nothing from it (or host_factory not used for backing)"
        assert _within(reads, uncovered), f"backing reads {reads} outside the uncovered parts {uncovered}"
        expected = bytearray(data)
        expected[start:start + length] = payload
        assert disk.read_at(0, 4 * cs) == bytes(expected[:4 * cs])
    assert_clean(str(overlay))
    expected = bytearray(data)
    expected[start:start + length] = payload
    assert to_raw(str(overlay), str(tmp_path / "o.raw")) == bytes(expected)


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
def test_cow_whole_cluster_write_reads_nothing_from_backing(tmp_path: Path, backing_fmt: str) -> None:
    """Whole-cluster writes never read the backing file."""
    cs = 65536
    overlay, data = _raw_backed(tmp_path, cs)
    name = "base.raw"
    if backing_fmt == "qcow2":
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "base.raw"), str(tmp_path / "base.qcow2"))
        qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", str(overlay))
        name = "base.qcow2"
    log: list[tuple[str, int, int]] = []
    payload = pattern(3 * cs, 9)
    with QcowFile.open(str(overlay), host_factory=recording_factory(log)) as disk:
        log.clear()
        disk.write_at(cs, payload)            # three whole clusters
        disk.write_at(8 * cs, payload[:cs])   # one more, alone
        assert _backing_reads(log, name) == [], f"whole-cluster writes read the backing file: {log}"
    assert_clean(str(overlay))
    expected = bytearray(data)
    expected[cs:4 * cs] = payload
    expected[8 * cs:9 * cs] = payload[:cs]
    assert to_raw(str(overlay), str(tmp_path / "o.raw")) == bytes(expected)


def test_cow_extended_l2_subclusters(tmp_path: Path) -> None:
    """With extended L2, whole-subcluster writes read nothing; a partial one reads only the rest of
    its own subcluster(s)."""
    cs = 65536
    sc = cs // 32
    overlay, data = _raw_backed(tmp_path, cs, extended_l2=True)
    expected = bytearray(data)
    log: list[tuple[str, int, int]] = []
    with QcowFile.open(str(overlay), host_factory=recording_factory(log)) as disk:
        log.clear()
        p1 = pattern(3 * sc, 10)
        disk.write_at(cs + 5 * sc, p1)  # three whole subclusters in the middle of a cluster
        expected[cs + 5 * sc:cs + 8 * sc] = p1
        assert _backing_reads(log, "base.raw") == [], f"whole-subcluster write read the backing: {log}"

        log.clear()
        start, length = 3 * cs + 10 * sc + 100, sc  # straddles subclusters 10 and 11
        p2 = pattern(length, 11)
        disk.write_at(start, p2)
        expected[start:start + length] = p2
        reads = _backing_reads(log, "base.raw")
        uncovered = [(3 * cs + 10 * sc, start), (start + length, 3 * cs + 12 * sc)]
        assert reads, "partial subcluster write read nothing from the backing file"
        assert _within(reads, uncovered), f"backing reads {reads} outside the uncovered subcluster parts {uncovered}"
        assert disk.read_at(0, 5 * cs) == bytes(expected[:5 * cs])
    assert_clean(str(overlay))
    assert to_raw(str(overlay), str(tmp_path / "o.raw")) == bytes(expected)


def _snapshot_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A qemu-written image (8 clusters of random data) with internal snapshot s1."""
    cs = 65536
    img = tmp_path / "snap.qcow2"
    create(str(img), "4M")
    data = pattern(8 * cs, 12)
    (tmp_path / "d.bin").write_bytes(data)
    qemu_io(str(img), f"write -q -s {tmp_path / 'd.bin'} 0 {8 * cs}")
    qemu_img("snapshot", "-c", "s1", str(img))
    return img, data


def test_write_to_snapshot_shared_cluster_goes_to_new_cluster(tmp_path: Path) -> None:
    """Clusters shared with an internal snapshot are copied; the snapshot's data is untouched and
    COPIED flags/refcounts stay consistent (qemu-img check would flag wrong COPIED flags)."""
    cs = 65536
    img, data = _snapshot_image(tmp_path)
    before = qemu_map(img)
    expected = bytearray(data + bytes(4 * MiB - len(data)))
    with QcowFile.open(str(img)) as disk:
        assert [s.name for s in disk.snapshots] == ["s1"]
        disk.write_at(100, b"partial")                  # partial write, cluster 0
        expected[100:107] = b"partial"
        p = pattern(cs, 13)
        disk.write_at(cs, p)                            # whole cluster 1
        expected[cs:2 * cs] = p
        disk.write_zeroes(2 * cs, cs)                   # cluster 2
        expected[2 * cs:3 * cs] = bytes(cs)
        disk.punch_hole(3 * cs, cs)                     # cluster 3
        expected[3 * cs:4 * cs] = bytes(cs)
        disk.write_at(5 * cs - 10, b"x" * 20)           # across clusters 4/5
        expected[5 * cs - 10:5 * cs + 10] = b"x" * 20
    assert_clean(str(img))
    after = qemu_map(img)
    for guest in (0, cs, 4 * cs, 5 * cs):
        assert host_offset_of(after, guest) != host_offset_of(before, guest), \
            f"guest {guest:#x} written in place although shared with snapshot s1"
    assert to_raw(str(img), str(tmp_path / "active.raw")) == bytes(expected)
    snap_raw = tmp_path / "s1.raw"
    qemu_img("convert", "-l", "snapshot.name=s1", "-O", "raw", str(img), str(snap_raw))
    assert snap_raw.read_bytes()[:len(data)] == data, "snapshot s1's data changed"
    # Deleting the snapshot must leave consistent refcounts too (catches wrong increments/decrements).
    qemu_img("snapshot", "-d", "s1", str(img))
    assert_clean(str(img))
    assert to_raw(str(img), str(tmp_path / "active2.raw")) == bytes(expected)


def test_copied_flag_set_exactly_when_refcount_is_one(tmp_path: Path) -> None:
    """After snapshot + writes, every active L2 entry has COPIED iff its cluster's refcount is 1,
    and every L1 entry has COPIED iff its L2 table's refcount is 1."""
    cs = 65536
    img, _ = _snapshot_image(tmp_path)
    with QcowFile.open(str(img)) as disk:
        disk.write_at(cs + 7, b"cow")
        disk.write_at(6 * cs, pattern(cs, 14))
        disk.write_at(40 * cs, b"fresh cluster")  # never shared
    assert_clean(str(img))
    view = ImageView(img)
    checked = 0
    for l1e in view.l1():
        l2 = l1e & OFFSET_MASK
        if not l2:
            continue
        assert bool(l1e & COPIED) == (view.refcount(l2) == 1), f"L1 entry {l1e:#x} refcount {view.refcount(l2)}"
        for l2e in view.l2_entries(l2):
            host = l2e & OFFSET_MASK
            if not host or l2e & COMPRESSED:
                continue
            rc = view.refcount(host)
            assert bool(l2e & COPIED) == (rc == 1), f"L2 entry {l2e:#x}: refcount {rc}"
            checked += 1
    assert checked >= 9


def test_write_over_compressed_cluster_goes_to_new_cluster(tmp_path: Path) -> None:
    """Writing into a compressed cluster (qemu-io write -c) allocates a normal cluster for it."""
    cs = 65536
    img = tmp_path / "c.qcow2"
    create(str(img), "4M")
    unit = pattern(100, 15)
    data = (unit * (4 * cs // 100 + 1))[:4 * cs]
    (tmp_path / "c.bin").write_bytes(data)
    qemu_io(str(img), f"write -q -c -s {tmp_path / 'c.bin'} 0 {4 * cs}")
    before = qemu_map(img)
    assert all(host_offset_of(before, g) is None for g in (0, cs, 2 * cs, 3 * cs)), "qemu did not compress"
    expected = bytearray(data + bytes(4 * MiB - len(data)))
    with QcowFile.open(str(img)) as disk:
        assert disk.read_at(0, 4 * cs) == data
        disk.write_at(cs + 123, b"into compressed")
        expected[cs + 123:cs + 138] = b"into compressed"
        disk.write_at(2 * cs, b"\xee" * cs)
        expected[2 * cs:3 * cs] = b"\xee" * cs
    assert_clean(str(img))
    after = qemu_map(img)
    assert host_offset_of(after, cs) is not None and host_offset_of(after, 2 * cs) is not None
    assert host_offset_of(after, 0) is None and host_offset_of(after, 3 * cs) is None, \
        "untouched compressed clusters changed"
    assert to_raw(str(img), str(tmp_path / "o.raw")) == bytes(expected)


# --------------------------------------------------------------------------- zeroes and holes

@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_zeroes_and_holes_over_backing_read_zero(tmp_path: Path, compat: str) -> None:
    """write_zeroes and punch_hole read back as zeros over a backing file: v3 via the zero flag
    (qemu-img map reports zero), v2 via explicit zero data."""
    cs = 65536
    base = tmp_path / "base.raw"
    data = pattern(2 * MiB, 16)
    write_raw(str(base), data)
    img = tmp_path / "o.qcow2"
    expected = bytearray(data)
    with QcowFile.create(str(img), 2 * MiB, compat=compat, backing_file=str(base), backing_format="raw") as disk:
        disk.write_at(4 * cs, pattern(2 * cs, 17))          # allocated, then zeroed
        disk.write_zeroes(cs + 1000, 2 * cs)                # partial, whole, partial
        expected[cs + 1000:3 * cs + 1000] = bytes(2 * cs)
        disk.write_zeroes(4 * cs, 2 * cs)
        expected[4 * cs:6 * cs] = bytes(2 * cs)
        disk.punch_hole(8 * cs - 512, 3 * cs)
        expected[8 * cs - 512:11 * cs - 512] = bytes(3 * cs)
        disk.punch_hole(20 * cs, cs)                        # unallocated cluster over backing data
        expected[20 * cs:21 * cs] = bytes(cs)
        assert disk.read_at(0, 2 * MiB) == bytes(expected)
    assert_clean(str(img))
    assert to_raw(str(img), str(tmp_path / "o.raw")) == bytes(expected)
    if compat == "1.1":
        m = qemu_map(img)
        for guest in (2 * cs, 4 * cs, 5 * cs, 8 * cs, 9 * cs, 20 * cs):
            e = map_at(m, guest)
            assert e["zero"] is True and e["data"] is False and e["depth"] == 0, f"{guest:#x}: {e}"
    with QcowFile.open(str(img), readonly=True) as disk:
        assert disk.read_at(0, 2 * MiB) == bytes(expected)


def test_punch_hole_frees_host_clusters(tmp_path: Path) -> None:
    """punch_hole on whole clusters frees their host clusters: check clean and st_blocks drop."""
    img = tmp_path / "p.qcow2"
    with QcowFile.create(str(img), 64 * MiB) as disk:
        disk.write_at(0, pattern(8 * MiB, 18))
    blocks_full = os.stat(img).st_blocks
    with QcowFile.open(str(img)) as disk:
        disk.punch_hole(0, 8 * MiB)
        assert disk.read_at(0, 8 * MiB) == bytes(8 * MiB)
    assert_clean(str(img))
    blocks_punched = os.stat(img).st_blocks
    assert blocks_punched * 512 < blocks_full * 512 - 7 * MiB, \
        f"st_blocks {blocks_full} -> {blocks_punched}: host space not handed back"
    assert all(not e["data"] for e in qemu_map(img) if e["start"] < 8 * MiB)


def test_freed_clusters_are_reused(tmp_path: Path) -> None:
    """50 x {write 4 MiB; punch_hole 4 MiB} keeps the file size bounded."""
    cs = 65536
    img = tmp_path / "reuse.qcow2"
    chunk = pattern(4 * MiB, 19)
    sizes = []
    with QcowFile.create(str(img), 64 * MiB) as disk:
        for i in range(50):
            offset = (i % 8) * 4 * MiB + (i % 3) * 512  # wander, sometimes unaligned
            disk.write_at(offset, chunk)
            disk.punch_hole(offset // cs * cs, 4 * MiB + cs)
            disk.flush()
            sizes.append(os.path.getsize(img))
        assert disk.read_at(0, 64 * MiB) == bytes(64 * MiB)
    assert_clean(str(img))
    assert max(sizes) <= sizes[0] + 4 * cs, f"file grew although clusters were freed: {sizes}"


# --------------------------------------------------------------------------- refcount table growth

@pytest.mark.parametrize("refcount_bits,total", [(64, 4 * MiB), (16, 10 * MiB)])
def test_refcount_table_growth(tmp_path: Path, refcount_bits: int, total: int) -> None:
    """512 B clusters: writing enough data forces the refcount table to grow (and move)."""
    img = tmp_path / "g.qcow2"
    create(str(img), "64M", options=f"cluster_size=512,refcount_bits={refcount_bits}")
    clusters_before = header_u32(img, 56)
    expected = bytearray(total)
    with QcowFile.open(str(img)) as disk:
        step = 256 * KiB
        for offset in range(0, total, step):
            p = pattern(step, offset)
            disk.write_at(offset, p)
            expected[offset:offset + step] = p
        disk.write_at(60 * MiB, b"far away")
        assert disk.read_at(0, total) == bytes(expected)
    assert header_u32(img, 56) > clusters_before, "refcount table did not grow"
    assert_clean(str(img))
    out = to_raw(str(img), str(tmp_path / "o.raw"))
    assert out[:total] == bytes(expected) and out[60 * MiB:60 * MiB + 8] == b"far away"


# --------------------------------------------------------------------------- lazy refcounts / dirty bit

_DIRTY_WRITER = r"""
import os, random, sys
from qcowdisk import QcowFile
disk = QcowFile.open(sys.argv[1])
disk.write_at(int(sys.argv[2]), random.Random(int(sys.argv[3])).randbytes(int(sys.argv[4])))
disk.flush()
os._exit(0)  # no close: the image stays dirty
"""


def test_lazy_refcounts_dirty_bit(tmp_path: Path) -> None:
    """Dirty bit set after flushed writes, clear after close; an image left dirty is rebuilt on rw open."""
    img = tmp_path / "lazy.qcow2"
    payload = pattern(3 * 65536 + 77, 20)
    with QcowFile.create(str(img), 16 * MiB, lazy_refcounts=True) as disk:
        disk.write_at(1000, payload)
        disk.flush()
        assert header_u64(img, HDR_INCOMPAT) & INCOMPAT_DIRTY, "dirty bit not set after writes with lazy refcounts"
    assert not header_u64(img, HDR_INCOMPAT) & INCOMPAT_DIRTY, "dirty bit still set after close"
    assert_clean(str(img))

    second = pattern(5 * 65536, 21)  # qemutools.pattern is random.Random(seed).randbytes
    p = subprocess.run([sys.executable, "-c", _DIRTY_WRITER, str(img), str(8 * MiB + 3), "21", str(len(second))],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    assert header_u64(img, HDR_INCOMPAT) & INCOMPAT_DIRTY, "writer died without close: image should be dirty"
    expected = bytearray(16 * MiB)
    expected[1000:1000 + len(payload)] = payload
    expected[8 * MiB + 3:8 * MiB + 3 + len(second)] = second

    with QcowFile.open(str(img), readonly=True) as disk:  # read-only: works, rebuilds nothing
        assert disk.read_at(0, 16 * MiB) == bytes(expected)
    assert header_u64(img, HDR_INCOMPAT) & INCOMPAT_DIRTY
    with QcowFile.open(str(img)) as disk:  # read-write: refcounts rebuilt
        disk.write_at(12 * MiB, b"after repair")
        expected[12 * MiB:12 * MiB + 12] = b"after repair"
    assert not header_u64(img, HDR_INCOMPAT) & INCOMPAT_DIRTY
    assert_clean(str(img))
    assert to_raw(str(img), str(tmp_path / "o.raw")) == bytes(expected)


# --------------------------------------------------------------------------- unknown header content

UNKNOWN_EXT_TYPE = 0x7A7A7A7A
UNKNOWN_EXT_DATA = b"qcowdisk-test"  # 13 bytes: padded to 16 in the file
UNKNOWN_FIELDS = b"\xa5\x5a\x00\x11\x22\x33\x44\x55"


def _add_unknown_header_parts(img: Path) -> None:
    """Grow header_length 112 -> 120 with unknown trailing bytes and add an unknown extension."""
    with open(img, "r+b") as f:
        head = bytearray(f.read(4096))
        cluster_size = 1 << struct.unpack_from(">I", head, 20)[0]
        header_length = struct.unpack_from(">I", head, 100)[0]
        assert header_length == 112
        exts = []
        pos = header_length
        while True:
            ext_type, ext_len = struct.unpack_from(">II", head, pos)
            if ext_type == 0:
                break
            exts.append(bytes(head[pos:pos + 8 + (ext_len + 7) // 8 * 8]))
            pos += 8 + (ext_len + 7) // 8 * 8
        unknown = struct.pack(">II", UNKNOWN_EXT_TYPE, len(UNKNOWN_EXT_DATA)) + UNKNOWN_EXT_DATA + bytes(3)
        new = bytes(head[:112]) + UNKNOWN_FIELDS + b"".join(exts) + unknown + bytes(8)
        new = bytearray(new)
        struct.pack_into(">I", new, 100, 120)
        assert len(new) <= cluster_size
        f.seek(0)
        f.write(new)  # longer than the old header + extensions, so nothing stale remains


def _assert_unknown_header_parts(img: Path) -> None:
    head = img.read_bytes()[:4096]
    assert struct.unpack_from(">I", head, 100)[0] == 120, "header_length not preserved"
    assert head[112:120] == UNKNOWN_FIELDS, "unknown header fields lost"
    pos = 120
    found = False
    while True:
        ext_type, ext_len = struct.unpack_from(">II", head, pos)
        if ext_type == 0:
            break
        if ext_type == UNKNOWN_EXT_TYPE:
            found = head[pos + 8:pos + 8 + ext_len] == UNKNOWN_EXT_DATA
        pos += 8 + (ext_len + 7) // 8 * 8
    assert found, "unknown header extension lost"


def test_unknown_header_extensions_and_fields_survive(tmp_path: Path) -> None:
    """Unknown header extensions and fields (header_length > 112) survive every header rewrite:
    dirty bit toggles (lazy refcounts) and refcount-table growth."""
    img = tmp_path / "u.qcow2"
    create(str(img), "64M", options="cluster_size=512,refcount_bits=64,lazy_refcounts=on")
    _add_unknown_header_parts(img)
    assert_clean(str(img))  # qemu accepts the patched image
    reftable_clusters = header_u32(img, 56)
    expected = bytearray(4 * MiB)
    with QcowFile.open(str(img)) as disk:
        for offset in range(0, 4 * MiB, 512 * KiB):
            p = pattern(512 * KiB, offset + 1)
            disk.write_at(offset, p)
            expected[offset:offset + len(p)] = p
            disk.flush()
        _assert_unknown_header_parts(img)
    assert header_u32(img, 56) > reftable_clusters, "test premise: refcount table should have grown"
    _assert_unknown_header_parts(img)
    assert_clean(str(img))
    assert to_raw(str(img), str(tmp_path / "o.raw"))[:4 * MiB] == bytes(expected)


def test_unknown_autoclear_bits_cleared_on_rw_open(tmp_path: Path) -> None:
    """Unknown autoclear bits are cleared by a read-write open (and left alone by read-only)."""
    img = tmp_path / "a.qcow2"
    create(str(img), "4M")
    qemu_io(str(img), "write -q -P 3 0 64k")
    unknown = (1 << 40) | (1 << 63)
    with open(img, "r+b") as f:
        f.seek(HDR_AUTOCLEAR)
        f.write(struct.pack(">Q", unknown))
    with QcowFile.open(str(img), readonly=True) as disk:
        assert disk.read_at(0, 4) == b"\x03" * 4
    assert header_u64(img, HDR_AUTOCLEAR) == unknown, "read-only open changed the header"
    with QcowFile.open(str(img)) as disk:
        assert header_u64(img, HDR_AUTOCLEAR) & unknown == 0, "unknown autoclear bits not cleared on rw open"
        disk.write_at(65536, b"ok")
    assert header_u64(img, HDR_AUTOCLEAR) & unknown == 0
    assert_clean(str(img))
