"""The public open API: one `QcowFile.open` for qcow2 and legacy qcow v1, its options, its argument checks.

QEMU is the oracle throughout: images are built with qemu-img/qemu-io, and what qcowdisk reads,
maps or writes is judged with `qemu-img convert -O raw`, `map --output=json`, `check` and
`compare`. Covered here:

* a read-only `QcowFile.open` of a qcow v1 file returns a `Qcow1File` with the reading API, and
  refuses every write (and a read-write open) with ReadOnlyError, leaving the file untouched;
* every path parameter takes os.PathLike as well as str; `len(disk)` is the virtual size;
* offsets and lengths must be integers (TypeError naming the parameter) and not negative
  (ValueError), on every method that takes them, and a refused call changes nothing;
* `allocate(offset, length)` gives every touched cluster its own uncompressed host cluster
  holding what it read, so reads are unchanged, `qemu-img map` shows data, and later writes
  land in place without growing the file;
* `force_share=True` reads an image qemu-io holds for writing, takes no lock, and is refused
  with readonly=False;
* `backing=False` never opens the backing file and reads what QEMU's `backing: null` reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import imagepatch as ip
import qcowdisk
from imagefactory import extents_as_qemu_json
from qcowdisk import BackingChainError, ImageLockedError, QcowError, QcowFile, ReadOnlyError
from qcowdisk.hostio import HostFile
from qcowdisk.qcow1 import Qcow1File
from qemutools import assert_clean, compare, create, info, qemu_img, qemu_io, run, to_raw

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB


# --------------------------------------------------------------------------- helpers

def digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def qemu_map(image: str) -> list[dict[str, Any]]:
    """`qemu-img map --output=json`, parsed."""
    return json.loads(qemu_img("map", "--output=json", image).stdout)


def cluster_view(entries: list[dict[str, Any]], guest: int) -> tuple[int, bool, bool, bool, int | None]:
    """(depth, present, zero, data, host offset) that a map says of the byte at `guest`."""
    for e in entries:
        if e["start"] <= guest < e["start"] + e["length"]:
            off = e.get("offset")
            return (e["depth"], e["present"], e["zero"], e["data"],
                    None if off is None else off + guest - e["start"])
    raise AssertionError(f"no map entry covers {guest}: {entries}")


def null_backing(image: str) -> str:
    """QEMU's name for `image` opened with `backing: null` (its backing file never opened)."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": image}})


class Recorder:
    """A host_factory that records every path qcowdisk opens (the seam of qcowdisk.hostio)."""

    def __init__(self) -> None:
        self.opened: list[str] = []

    def __call__(self, path: str, writable: bool) -> HostFile:
        self.opened.append(os.path.realpath(path))
        return HostFile(path, writable)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class QemuIoSession:
    """An interactive qemu-io holding an image open (and locked) until closed."""

    def __init__(self, image: str, fmt: str = "qcow2") -> None:
        self.proc = subprocess.Popen(["qemu-io", "-f", fmt, image], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.out = b""
        # a read proves the image is open, hence locked (QEMU locks at open)
        self.command("read 0 512", b"read 512/512 bytes")

    def command(self, cmd: str, expect: bytes, timeout: float = 10) -> None:
        """Send one command; wait until `expect` appears in what qemu-io prints after it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.out = b""
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while expect not in self.out:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"qemu-io: no {expect!r} after {cmd!r} within {timeout} s: {self.out!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"qemu-io exited after {cmd!r}: {self.out!r}")
                self.out += chunk

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@contextlib.contextmanager
def held_for_writing(image: str, fmt: str = "qcow2") -> Iterator[QemuIoSession]:
    session = QemuIoSession(image, fmt)
    try:
        yield session
    finally:
        session.close()


def qemu_io_write_status(image: str, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
    """A one-shot qemu-io write (fails if someone holds a conflicting lock)."""
    return run("qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 512", image, check=False)


# --------------------------------------------------------------------------- qcow v1 through QcowFile.open

V1_SIZE = 3 * MiB + 5 * 512 + 100  # QEMU counts whole sectors: the last 100 bytes are not part of the disk
V1_SIZE_FIELD = 24  # byte offset of the u64 size in the qcow v1 header


def create_v1(path: str, backing: str | None = None, backing_fmt: str | None = None) -> str:
    """A qcow v1 image whose header says V1_SIZE (qemu-img create would round it up to a sector)."""
    create(path, str(V1_SIZE), fmt="qcow", backing=backing, backing_fmt=backing_fmt)
    ip.patch_u64(path, V1_SIZE_FIELD, V1_SIZE)
    return path


@pytest.fixture(scope="module")
def v1_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A qcow v1 overlay (plain and unallocated clusters) on a qcow2 base, and a v1 image alone
    (plain, compressed, unallocated: QEMU writes compressed qcow clusters only without a backing file)."""
    d = tmp_path_factory.mktemp("v1")
    base = create(str(d / "base.qcow2"), "2M")
    qemu_io(base, "write -P 0x11 0 2M")
    top = create_v1(str(d / "top.qcow"), backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x22 64k 100k", "write -P 0x44 3M 2k", fmt="qcow")
    alone = create_v1(str(d / "alone.qcow"))
    compressed = [f"write -c -P 0x33 {MiB + i * 4 * KiB} 4k" for i in range(4)]  # one 4 KiB cluster each
    qemu_io(alone, "write -P 0x55 4k 8k", *compressed, fmt="qcow")
    return {"dir": str(d), "base": base, "top": top, "alone": alone}


def test_readonly_open_of_qcow1_returns_its_reader(v1_chain: dict[str, str], tmp_path: Path) -> None:
    top = v1_chain["top"]
    before = digest(top)
    expected = to_raw(top, str(tmp_path / "top.raw"))
    expected_map = qemu_map(top)
    size = info(top)["virtual-size"]
    assert size == V1_SIZE // 512 * 512
    with QcowFile.open(top, readonly=True) as disk:
        assert isinstance(disk, Qcow1File) and not isinstance(disk, QcowFile)
        assert disk.readonly
        assert len(disk) == size == disk.virtual_size
        assert disk.read_at(0, len(disk) + 4096) == expected  # clipped at the end
        buf = bytearray(100 * KiB)
        assert disk.readinto_at(buf, MiB - 10 * KiB) == len(buf)
        assert bytes(buf) == expected[MiB - 10 * KiB:MiB + 90 * KiB]
        assert extents_as_qemu_json(list(disk.block_status())) == expected_map
        assert disk.snapshots == []
        assert disk.backing is not None
        assert os.path.realpath(disk.backing.filename) == os.path.realpath(v1_chain["base"])
        for attempt in (lambda: disk.write_at(0, b"x" * 512), lambda: disk.write_zeroes(0, CS),
                        lambda: disk.punch_hole(0, CS)):
            with pytest.raises(ReadOnlyError, match="read-only"):
                attempt()
        assert disk.read_at(0, len(disk)) == expected
    assert digest(top) == before


def test_readonly_open_of_qcow1_without_backing(v1_chain: dict[str, str], tmp_path: Path) -> None:
    alone = v1_chain["alone"]
    fds = fd_count()
    with QcowFile.open(alone, readonly=True) as disk:
        assert isinstance(disk, Qcow1File)
        assert disk.backing is None
        assert len(disk) == V1_SIZE // 512 * 512
        expected = to_raw(alone, str(tmp_path / "alone.raw"))
        assert expected[MiB:MiB + 16 * KiB] == b"\x33" * (16 * KiB)
        assert disk.read_at(0, len(disk)) == expected
        assert extents_as_qemu_json(list(disk.block_status())) == qemu_map(alone)
        assert any(e.compressed for e in disk.block_status())
    assert fd_count() == fds  # the qcow2 attempt's descriptor was closed before the v1 reader took over


def test_readwrite_open_of_qcow1_leaves_nothing_behind(v1_chain: dict[str, str], tmp_path: Path) -> None:
    img = str(tmp_path / "v1.qcow")
    shutil.copy(v1_chain["alone"], img)
    before = digest(img)
    fds = fd_count()
    for attempt in (lambda: QcowFile.open(img), lambda: QcowFile.open(img, readonly=False),
                    lambda: qcowdisk.open(img, "r+b")):
        with pytest.raises(QcowError, match=r"qcow|version 1"):
            attempt()
    assert digest(img) == before
    assert fd_count() == fds
    # no lock left behind: QEMU can still write the file
    qemu_io(img, "write -P 0x66 0 512", fmt="qcow")


def test_readwrite_open_of_qcow1_raises_readonly_error(v1_chain: dict[str, str]) -> None:
    with pytest.raises(ReadOnlyError, match="read-only"):
        QcowFile.open(v1_chain["alone"])


# --------------------------------------------------------------------------- os.PathLike, len()

def test_every_path_parameter_takes_pathlike(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    with QcowFile.create(base, 2 * MiB) as disk:
        disk.write_at(0, b"\x11" * (2 * MiB))
    data = tmp_path / "data.raw"
    with QcowFile.create(tmp_path / "df.qcow2", MiB, data_file=data) as disk:
        disk.write_at(CS, b"\x22" * CS)
    with QcowFile.create(tmp_path / "ov.qcow2", 2 * MiB, backing_file=base, backing_format="qcow2") as disk:
        disk.write_at(0, b"\x33" * 512)
    with QcowFile.create_from_backing(tmp_path / "ov2.qcow2", base) as disk:
        assert len(disk) == 2 * MiB
        disk.write_at(MiB, b"\x44" * 512)

    df_info = info(str(tmp_path / "df.qcow2"))
    assert df_info["format-specific"]["data"]["data-file"] == str(data)
    assert data.stat().st_size >= 2 * CS
    for name in ("ov.qcow2", "ov2.qcow2"):
        assert info(str(tmp_path / name))["backing-filename"] == str(base)
    for name in ("base.qcow2", "df.qcow2", "ov.qcow2", "ov2.qcow2"):
        assert_clean(str(tmp_path / name))

    expected = to_raw(str(tmp_path / "ov2.qcow2"), str(tmp_path / "ov2.raw"))
    assert expected[MiB:MiB + 512] == b"\x44" * 512 and expected[:512] == b"\x11" * 512
    with QcowFile.open(tmp_path / "ov2.qcow2", readonly=True, confine_to=tmp_path) as disk:
        assert disk.read_at(0, len(disk)) == expected
    with qcowdisk.open(tmp_path / "ov2.qcow2") as f:
        assert f.read() == expected
    with QcowFile.open(tmp_path / "df.qcow2", confine_to=tmp_path) as disk:  # read-write, data file confined
        assert disk.read_at(CS, CS) == b"\x22" * CS


@pytest.mark.parametrize("size, options", [(MiB + 512, None), (5 * CS + 3 * 512, "compat=0.10"),
                                           (4 * MiB, "cluster_size=2M")])
def test_len_is_the_virtual_size(tmp_path: Path, size: int, options: str | None) -> None:
    img = create(str(tmp_path / "img.qcow2"), size, options=options)
    assert info(img)["virtual-size"] == size
    with QcowFile.open(img, readonly=True) as disk:
        assert len(disk) == size
    with QcowFile.open(img) as disk:
        assert len(disk) == size
        disk.write_at(size - 1, b"\x01")
        with pytest.raises(ValueError, match="virtual size"):
            disk.write_at(size, b"\x01")
    assert to_raw(img, str(tmp_path / "img.raw"))[-1:] == b"\x01"


# --------------------------------------------------------------------------- argument checks

# (method, the call with one parameter replaced by `bad`): every offset/length parameter.
ARG_CALLS: dict[str, Callable[[Any, Any], Any]] = {
    "read_at:offset": lambda d, bad: d.read_at(bad, 512),
    "read_at:length": lambda d, bad: d.read_at(0, bad),
    "readinto_at:offset": lambda d, bad: d.readinto_at(bytearray(512), bad),
    "write_at:offset": lambda d, bad: d.write_at(bad, b"\x01" * 512),
    "write_zeroes:offset": lambda d, bad: d.write_zeroes(bad, 512),
    "write_zeroes:length": lambda d, bad: d.write_zeroes(0, bad),
    "punch_hole:offset": lambda d, bad: d.punch_hole(bad, CS),
    "punch_hole:length": lambda d, bad: d.punch_hole(0, bad),
    "allocate:offset": lambda d, bad: d.allocate(bad, CS),
    "allocate:length": lambda d, bad: d.allocate(0, bad),
    "block_status:offset": lambda d, bad: list(d.block_status(bad, CS)),
    "block_status:length": lambda d, bad: list(d.block_status(0, bad)),
}
NOT_INTEGERS = [(512.0, "float"), ("512", "str"), (None, "NoneType"), (b"\x00", "bytes"), (1.5, "float")]
NONE_MEANS_TO_THE_END = {"block_status:length"}  # block_status(offset, None): up to the end of the disk


def not_integers(call: str) -> list[tuple[object, str]]:
    """The non-integer values `call` must refuse."""
    return [(v, t) for v, t in NOT_INTEGERS if v is not None or call not in NONE_MEANS_TO_THE_END]


@pytest.fixture
def data_image(tmp_path: Path) -> str:
    img = create(str(tmp_path / "img.qcow2"), "1M")
    qemu_io(img, "write -P 0x11 0 128k", "write -c -P 0x22 256k 64k")
    return img


@pytest.mark.parametrize("call", list(ARG_CALLS))
def test_offsets_and_lengths_must_be_integers(data_image: str, tmp_path: Path, call: str) -> None:
    expected = to_raw(data_image, str(tmp_path / "before.raw"))
    before_map = qemu_map(data_image)
    param = call.split(":")[1]
    with QcowFile.open(data_image) as disk:
        for bad, type_name in not_integers(call):
            with pytest.raises(TypeError) as excinfo:
                ARG_CALLS[call](disk, bad)
            assert str(excinfo.value) == f"{param} must be an integer, not {type_name}"
        for bad in (-1, -CS):
            with pytest.raises(ValueError, match=f"^{param} must not be negative"):
                ARG_CALLS[call](disk, bad)
        assert disk.read_at(0, len(disk)) == expected
    assert to_raw(data_image, str(tmp_path / "after.raw")) == expected
    assert qemu_map(data_image) == before_map
    assert_clean(data_image)


@pytest.mark.parametrize("call", ["read_at:offset", "read_at:length", "readinto_at:offset"])
def test_argument_checks_on_readonly_images(data_image: str, call: str) -> None:
    with QcowFile.open(data_image, readonly=True) as disk:
        with pytest.raises(TypeError, match=f"^{call.split(':')[1]} must be an integer, not float$"):
            ARG_CALLS[call](disk, 0.0)
        with pytest.raises(ValueError, match=f"^{call.split(':')[1]} must not be negative"):
            ARG_CALLS[call](disk, -512)


@pytest.mark.parametrize("call", [
    "read_at:offset", "read_at:length", "readinto_at:offset", "block_status:offset", "block_status:length",
])
def test_argument_checks_on_qcow1(v1_chain: dict[str, str], call: str) -> None:
    param = call.split(":")[1]
    with QcowFile.open(v1_chain["top"], readonly=True) as disk:
        for bad, type_name in not_integers(call):
            with pytest.raises(TypeError) as excinfo:
                ARG_CALLS[call](disk, bad)
            assert str(excinfo.value) == f"{param} must be an integer, not {type_name}"
        with pytest.raises(ValueError, match=param):
            ARG_CALLS[call](disk, -1)


def test_integer_like_offsets_are_accepted(data_image: str) -> None:
    """Anything with __index__ is an integer (as for list indexing): no TypeError."""

    class Index:
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    with QcowFile.open(data_image, readonly=True) as disk:
        assert disk.read_at(Index(CS - 4), Index(8)) == b"\x11" * 8
        buf = bytearray(4)
        assert disk.readinto_at(buf, Index(128 * KiB - 2)) == 4
        assert bytes(buf) == b"\x11\x11\x00\x00"


# --------------------------------------------------------------------------- allocate

def _standalone(d: Path) -> tuple[str, str | None, set[int]]:
    """No backing file; clusters: 0, 2 shared with snapshot snap1; 1 owned; 3 unallocated;
    4 compressed; 5 zero; 6 zero with a preallocated host cluster; 16 a 512-byte tail cluster."""
    img = create(str(d / "img.qcow2"), str(16 * CS + 512))
    qemu_io(img, "write -P 0x11 0 192k")
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 0x22 64k 64k", "write -c -P 0x33 256k 64k", "write -z 320k 64k",
            "write -P 0x44 384k 64k", "write -z 384k 64k", "write -P 0x66 1M 512")
    return img, "snap1", {1, 16}


def _overlay(extended_l2: bool) -> Callable[[Path], tuple[str, str | None, set[int]]]:
    def build(d: Path) -> tuple[str, str | None, set[int]]:
        base = create(str(d / "base.qcow2"), "768k")
        qemu_io(base, "write -P 0x11 0 512k", "write -P 0x12 512k 256k")
        img = create(str(d / "img.qcow2"), "1M", options="extended_l2=on" if extended_l2 else None,
                     backing="base.qcow2", backing_fmt="qcow2")
        # partial over backing data; zero over backing; compressed; plain past the backing's end
        qemu_io(img, "write -P 0x55 68k 4k", "write -z 128k 64k", "write -c -P 0x33 192k 64k",
                "write -P 0x77 832k 64k")
        return img, None, {13} | (set() if extended_l2 else {1})
    return build


def _data_file(d: Path) -> tuple[str, str | None, set[int]]:
    img = create(str(d / "img.qcow2"), "1M", options=f"data_file={d / 'data.raw'}")
    qemu_io(img, "write -P 0x77 0 64k", "write -z 64k 64k", "write -P 0x78 200k 1k")
    return img, None, {0, 3}


def _data_file_raw(d: Path) -> tuple[str, str | None, set[int]]:
    img = create(str(d / "img.qcow2"), "1M", options=f"data_file={d / 'data-raw.raw'},data_file_raw=on")
    qemu_io(img, "write -P 0x77 0 64k", "write -P 0x78 200k 1k")
    return img, None, set(range(16))  # qemu-img create maps every cluster of a raw data file: nothing moves


def _snapshot_then_allocate(d: Path) -> tuple[str, str | None, set[int]]:
    """Every L2 table and data cluster shared with the snapshot taken just before allocate."""
    img = create(str(d / "img.qcow2"), "1M")
    qemu_io(img, "write -P 0x11 0 64k", "write -c -P 0x22 128k 64k", "write -z 256k 64k")
    qemu_img("snapshot", "-c", "snap1", img)
    return img, "snap1", set()


def _small_clusters(d: Path) -> tuple[str, str | None, set[int]]:
    """512-byte clusters: an L2 table maps 32 KiB, so the ranges cross many tables, some absent."""
    base = create(str(d / "base.qcow2"), "256k", options="cluster_size=512")
    qemu_io(base, "write -P 0x11 0 256k")
    img = create(str(d / "img.qcow2"), "320k", options="cluster_size=512", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(img, "write -P 0x22 40k 1k", "write -z 100k 4k", "write -P 0x23 290k 512")
    return img, None, {80, 81, 580}


def _lazy_refcounts(d: Path) -> tuple[str, str | None, set[int]]:
    img = create(str(d / "img.qcow2"), "1M", options="lazy_refcounts=on")
    qemu_io(img, "write -P 0x11 0 64k", "write -c -P 0x22 128k 64k", "write -z 256k 64k")
    return img, None, {0}


def _chunked(d: Path) -> tuple[str, str | None, set[int]]:
    """A range of several MiB, mostly unallocated: allocated in chunks."""
    img = create(str(d / "img.qcow2"), "5M")
    qemu_io(img, "write -P 0x11 1M 64k", "write -c -P 0x22 2M 64k", "write -P 0x33 4M 64k")
    return img, None, {16, 64}


ALLOCATE_CASES: dict[str, tuple[Callable[[Path], tuple[str, str | None, set[int]]], list[tuple[int, int]]]] = {
    # (builder, ranges to allocate): ranges start and end mid-cluster
    "standalone-head": (_standalone, [(100, 5 * CS)]),
    "standalone-tail": (_standalone, [(6 * CS - 1, 10 * CS + 2)]),
    "standalone-whole": (_standalone, [(0, 16 * CS + 512)]),
    "standalone-two-ranges": (_standalone, [(CS + 5, 1), (4 * CS + CS // 2, CS)]),
    "overlay": (_overlay(False), [(0, MiB)]),
    "overlay-extended-l2": (_overlay(True), [(4 * KiB, 250 * KiB), (800 * KiB, 100 * KiB)]),
    "data-file": (_data_file, [(0, MiB)]),
    "data-file-raw": (_data_file_raw, [(0, MiB)]),
    "snapshot-then-allocate": (_snapshot_then_allocate, [(0, MiB)]),
    "small-clusters": (_small_clusters, [(30 * KiB + 7, 100 * KiB), (280 * KiB, 40 * KiB)]),
    "chunked": (_chunked, [(512, 5 * MiB - 1024)]),
    "lazy-refcounts": (_lazy_refcounts, [(0, 320 * KiB)]),
}


def _touched(ranges: list[tuple[int, int]], size: int, cs: int) -> set[int]:
    out: set[int] = set()
    for off, n in ranges:
        out.update(range(off // cs, min(-(-(off + n) // cs), -(-size // cs))))
    return out


@pytest.mark.parametrize("case", list(ALLOCATE_CASES))
def test_allocate(tmp_path: Path, case: str) -> None:
    build, ranges = ALLOCATE_CASES[case]
    img, snapshot, owned = build(tmp_path)
    size, cs = info(img)["virtual-size"], info(img)["cluster-size"]
    clusters = -(-size // cs)
    touched = _touched(ranges, size, cs)
    expected = to_raw(img, str(tmp_path / "before.raw"))
    snap_raw = str(tmp_path / "snap.raw")
    if snapshot:
        qemu_img("convert", "-l", snapshot, "-O", "raw", img, snap_raw)
        snap_expected = Path(snap_raw).read_bytes()
    before = qemu_map(img)
    assert touched <= owned or any(not cluster_view(before, c * cs)[3] or cluster_view(before, c * cs)[0] > 0
               or cluster_view(before, c * cs)[4] is None for c in touched), "nothing to allocate in this case"

    with QcowFile.open(img) as disk:
        for off, n in ranges:
            disk.allocate(off, n)
        assert disk.read_at(0, size) == expected  # reads are unchanged, before and after a flush
        ours = list(disk.block_status())
    assert to_raw(img, str(tmp_path / "after.raw")) == expected
    assert_clean(img)
    after = qemu_map(img)
    assert extents_as_qemu_json(ours) == after
    for c in range(clusters):
        was, now = cluster_view(before, c * cs), cluster_view(after, c * cs)
        if c in touched:
            depth, present, zero, data, offset = now
            assert (depth, present, zero, data) == (0, True, False, True), f"cluster {c}: {now} (was {was})"
            assert offset is not None, f"cluster {c} has no host offset: {now}"
            if c in owned:
                assert now == was, f"cluster {c} was already owned and must stay in place: {was} -> {now}"
        else:
            assert now == was, f"cluster {c} lies outside the allocated ranges: {was} -> {now}"
    if snapshot:
        qemu_img("convert", "-l", snapshot, "-O", "raw", img, snap_raw)
        assert Path(snap_raw).read_bytes() == snap_expected

    # later writes over the allocated clusters land in place: same host offsets, no growth
    files = [img] + [str(f) for f in tmp_path.glob("data*.raw")]
    sizes = [os.path.getsize(f) for f in files]
    new = bytearray(expected)
    with QcowFile.open(img) as disk:
        for i, c in enumerate(sorted(touched)):
            start, end = c * cs, min(size, (c + 1) * cs)
            payload = bytes([0xA0 + i % 16]) * (end - start)
            disk.write_at(start, payload)
            new[start:end] = payload
    assert [os.path.getsize(f) for f in files] == sizes
    final = qemu_map(img)
    for c in touched:
        assert cluster_view(final, c * cs) == cluster_view(after, c * cs), f"cluster {c} moved"
    assert to_raw(img, str(tmp_path / "final.raw")) == bytes(new)
    assert_clean(img)
    if snapshot:
        qemu_img("convert", "-l", snapshot, "-O", "raw", img, snap_raw)
        assert Path(snap_raw).read_bytes() == snap_expected


def test_allocate_refusals(data_image: str, tmp_path: Path) -> None:
    before = digest(data_image)
    with QcowFile.open(data_image, readonly=True) as disk:
        with pytest.raises(ReadOnlyError):
            disk.allocate(0, CS)
    assert digest(data_image) == before
    expected_map = qemu_map(data_image)
    with QcowFile.open(data_image) as disk:
        with pytest.raises(ValueError, match="virtual size"):
            disk.allocate(MiB - 512, 1024)
        disk.allocate(512 * KiB, 0)  # nothing to do
    assert qemu_map(data_image) == expected_map


def test_allocate_is_visible_to_block_status_before_close(tmp_path: Path) -> None:
    img = create(str(tmp_path / "img.qcow2"), "1M")
    with QcowFile.open(img) as disk:
        disk.allocate(CS, 2 * CS)
        mid = list(disk.block_status(0, 4 * CS))
        assert [(e.start, e.length, e.present, e.zero, e.data) for e in mid] == [
            (0, CS, False, True, False), (CS, 2 * CS, True, False, True), (3 * CS, CS, False, True, False)]
        assert disk.read_at(0, 4 * CS) == bytes(4 * CS)


# --------------------------------------------------------------------------- force_share

@pytest.fixture
def plain_image(tmp_path: Path) -> str:
    img = create(str(tmp_path / "img.qcow2"), "1M")
    qemu_io(img, "write -P 0x11 128k 64k")
    return img


def test_force_share_reads_an_image_qemu_io_holds_for_writing(plain_image: str) -> None:
    with held_for_writing(plain_image) as q:
        q.command("write -P 0x5a 0 64k", b"wrote 65536/65536 bytes")
        q.command("flush", b"qemu-io>")
        q.command("read -P 0x5a 0 64k", b"read 65536/65536 bytes")
        with pytest.raises(ImageLockedError):
            QcowFile.open(plain_image, readonly=True)
        with pytest.raises(ImageLockedError):
            qcowdisk.open(plain_image)
        with QcowFile.open(plain_image, readonly=True, force_share=True) as disk:
            assert disk.read_at(0, 64 * KiB) == b"\x5a" * (64 * KiB)
            assert disk.read_at(128 * KiB, 64 * KiB) == b"\x11" * (64 * KiB)
            assert disk.read_at(64 * KiB, 64 * KiB) == bytes(64 * KiB)
        with qcowdisk.open(plain_image, force_share=True) as f:
            assert f.read(4) == b"\x5a" * 4


def test_force_share_takes_no_lock(plain_image: str) -> None:
    with QcowFile.open(plain_image, readonly=True):
        p = qemu_io_write_status(plain_image)
        assert p.returncode != 0 and "lock" in (p.stdout + p.stderr).lower()
    with QcowFile.open(plain_image, readonly=True, force_share=True) as disk:
        p = qemu_io_write_status(plain_image)
        assert p.returncode == 0, p.stdout + p.stderr
        assert disk.read_at(128 * KiB, 4) == b"\x11" * 4


def test_force_share_needs_readonly(plain_image: str) -> None:
    rec = Recorder()
    before = digest(plain_image)
    with pytest.raises(ValueError, match="readonly"):
        QcowFile.open(plain_image, force_share=True, host_factory=rec)
    with pytest.raises(ValueError, match="readonly"):
        QcowFile.open(plain_image, readonly=False, force_share=True, host_factory=rec)
    with pytest.raises(ValueError, match="readonly"):
        qcowdisk.open(plain_image, "r+b", force_share=True, host_factory=rec)
    assert rec.opened == []
    assert digest(plain_image) == before
    with held_for_writing(plain_image):  # still refused while someone writes
        with pytest.raises(ValueError, match="readonly"):
            QcowFile.open(plain_image, force_share=True)


def test_force_share_reaches_the_backing_file(tmp_path: Path) -> None:
    base = create(str(tmp_path / "base.qcow2"), "1M")
    qemu_io(base, "write -P 0x11 0 1M")
    top = create(str(tmp_path / "top.qcow2"), "1M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x22 0 64k")
    with held_for_writing(base):
        with pytest.raises(ImageLockedError):
            QcowFile.open(top, readonly=True)
        with QcowFile.open(top, readonly=True, force_share=True) as disk:
            assert disk.read_at(0, 128 * KiB) == b"\x22" * (64 * KiB) + b"\x11" * (64 * KiB)


def test_raw_backing_file_held_for_writing_is_refused_without_force_share(tmp_path: Path) -> None:
    base = create(str(tmp_path / "base.raw"), "1M", fmt="raw")
    top = create(str(tmp_path / "top.qcow2"), "1M", backing="base.raw", backing_fmt="raw")
    with held_for_writing(base, fmt="raw"):
        q = run("qemu-img", "convert", "-O", "raw", top, str(tmp_path / "o.raw"), check=False)
        assert q.returncode != 0 and "lock" in q.stderr  # the oracle refuses
        with QcowFile.open(top, readonly=True, force_share=True) as disk:
            assert disk.read_at(0, 512) == bytes(512)
        with pytest.raises(ImageLockedError):
            QcowFile.open(top, readonly=True)


def test_force_share_on_qcow1(v1_chain: dict[str, str], tmp_path: Path) -> None:
    img = str(tmp_path / "v1.qcow")
    shutil.copy(v1_chain["alone"], img)
    expected = to_raw(img, str(tmp_path / "v1.raw"))
    with held_for_writing(img, fmt="qcow"):
        with pytest.raises(ImageLockedError):
            QcowFile.open(img, readonly=True)
        with QcowFile.open(img, readonly=True, force_share=True) as disk:
            assert isinstance(disk, Qcow1File)
            assert disk.read_at(0, len(disk)) == expected
    with QcowFile.open(img, readonly=True, force_share=True):
        assert qemu_io_write_status(img, fmt="qcow").returncode == 0


# --------------------------------------------------------------------------- backing=False

@pytest.fixture
def chain(tmp_path: Path) -> dict[str, str]:
    base = create(str(tmp_path / "base.qcow2"), "1M")
    qemu_io(base, "write -P 0x11 0 1M")
    top = create(str(tmp_path / "top.qcow2"), "1M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x22 64k 64k", "write -P 0x33 200k 1k", "write -z 512k 64k")
    return {"base": base, "top": top}


def test_backing_false_never_opens_the_backing_file(chain: dict[str, str], tmp_path: Path) -> None:
    top = chain["top"]
    expected = to_raw(null_backing(top), str(tmp_path / "null.raw"))
    with_backing = to_raw(top, str(tmp_path / "full.raw"))
    assert expected != with_backing  # the oracle tells the two apart
    expected_map = qemu_map(null_backing(top))

    rec = Recorder()
    with QcowFile.open(top, readonly=True, host_factory=rec) as disk:
        assert disk.read_at(0, len(disk)) == with_backing
    assert os.path.realpath(chain["base"]) in rec.opened  # the seam sees backing opens

    rec = Recorder()
    with QcowFile.open(top, readonly=True, backing=False, host_factory=rec) as disk:
        assert disk.backing is None
        assert disk.backing_file == "base.qcow2"
        assert disk.read_at(0, len(disk)) == expected
        assert extents_as_qemu_json(list(disk.block_status())) == expected_map
    assert rec.opened == [os.path.realpath(top)]


def test_backing_false_with_the_backing_file_missing(chain: dict[str, str], tmp_path: Path) -> None:
    top = chain["top"]
    expected = to_raw(null_backing(top), str(tmp_path / "null.raw"))
    os.unlink(chain["base"])
    with pytest.raises(BackingChainError):
        QcowFile.open(top, readonly=True)
    with QcowFile.open(top, readonly=True, backing=False) as disk:
        assert disk.read_at(0, len(disk)) == expected
    with qcowdisk.open(top, backing=False) as f:
        assert f.read() == expected


def test_backing_false_on_qcow1(v1_chain: dict[str, str], tmp_path: Path) -> None:
    top = v1_chain["top"]
    rec = Recorder()
    with QcowFile.open(top, readonly=True, backing=False, host_factory=rec) as disk:
        assert isinstance(disk, Qcow1File)
        assert disk.backing is None
        got = disk.read_at(0, len(disk))
    assert set(rec.opened) == {os.path.realpath(top)}
    full = to_raw(top, str(tmp_path / "full.raw"))
    # what the overlay itself stores is kept; everything it leaves to the base reads as zeros
    assert got[64 * KiB:164 * KiB] == full[64 * KiB:164 * KiB] == b"\x22" * (100 * KiB)
    assert got[3 * MiB:3 * MiB + 2 * KiB] == b"\x44" * (2 * KiB)
    assert got[:64 * KiB] == bytes(64 * KiB) and full[:64 * KiB] == b"\x11" * (64 * KiB)
    assert got[2 * MiB:3 * MiB] == bytes(MiB)
    img = "json:" + json.dumps({"driver": "qcow", "backing": None, "file": {"driver": "file", "filename": top}})
    assert got == to_raw(img, str(tmp_path / "null.raw"))


def test_backing_false_read_write_matches_qemu(chain: dict[str, str], tmp_path: Path) -> None:
    """A partial-cluster write without the backing file fills the rest of the cluster with zeros, as QEMU does."""
    ours, theirs = chain["top"], str(tmp_path / "theirs.qcow2")
    shutil.copy(ours, theirs)
    rec = Recorder()
    with QcowFile.open(ours, backing=False, host_factory=rec) as disk:
        disk.write_at(4 * KiB, b"\x44" * 512)
        disk.write_at(96 * KiB, b"\x45" * 512)  # inside the cluster the overlay already has
    assert rec.opened == [os.path.realpath(ours)]
    qemu_io(null_backing(theirs), "write -P 0x44 4k 512", "write -P 0x45 96k 512", fmt=None)
    assert_clean(ours)
    compare(ours, theirs)  # both opened with their backing file
    assert to_raw(ours, str(tmp_path / "o.raw"))[:8 * KiB] == bytes(4 * KiB) + b"\x44" * 512 + bytes(3584)
