"""`qcowdisk compare` and `qcowdisk.compare` answer what `qemu-img compare` (QEMU 7.2) answers.

QEMU is the oracle: every image is built with qemu-img/qemu-io (or written as a plain file),
then both tools compare the same pair from the same working directory, in both orders, with
and without strict mode; stdout, stderr (program name normalised) and the exit status must be
identical. The pairs cover qcow2 against raw, different sizes with zero and non-zero tails,
backing chains (a short backing file too), compressed clusters, zero clusters, subclusters,
metadata preallocation, external data files, qcow v1, odd raw sizes and mismatches past the
first 2 MiB chunk. The `-p` progress line is compared on a pseudo-terminal. The library's
progress callback, its failure path and its memory on a 100 GiB sparse pair are checked too.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import pty
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import qcowdisk
from clirun import qcowdisk_in, qemu_img_in, same_as_qemu_img
from imagefactory import raw_qcow2_qcow2_chain, sparse_file
from qcowdisk import Image, QcowFile
from qcowdisk.formats import OpenOptions, open_image
from qcowdisk.ops.compare import CompareError, first_difference, first_nonzero
from qemutools import create, qemu_img, qemu_io

REPO = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def poke(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a plain file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def convert(src: str, dst: str, fmt: str = "raw", *extra: str) -> None:
    qemu_img("convert", "-O", fmt, *extra, src, dst)


def build_zoo(d: Path) -> None:
    """Every image the pairs below use, made by QEMU's tools (or as plain files) in `d`."""
    with contextlib.chdir(d):
        # qcow2 with data, a zero cluster over data, compressed data, a partial cluster, zero clusters
        create("data.qcow2", "6M")
        qemu_io("data.qcow2", "write -P 1 0 192k", "write -z 64k 64k", "write -c -P 2 1M 128k",
                "write -P 3 2M 100k", "write -z 3M 64k", "write -P 4 4M 2M")
        convert("data.qcow2", "data.raw")  # sparse: holes where QEMU sees zeros
        convert("data.qcow2", "data-full.raw", "raw", "-S", "0")  # every zero byte written as data
        convert("data.qcow2", "data-copy.qcow2", "qcow2")  # no compressed clusters, other layout
        convert("data.qcow2", "data-2m.qcow2", "qcow2", "-o", "cluster_size=2M")
        convert("data.qcow2", "data-ext.qcow2", "qcow2", "-o", "extended_l2=on")
        for name, offset, byte in [("diff-first.raw", 0, b"\x09"), ("diff-mid.raw", 2 * MiB + 700, b"\x09"),
                                   ("diff-tail-of-cluster.raw", 2 * MiB + 100 * KiB + 3, b"\x09"),
                                   ("diff-in-zeros.raw", 3 * MiB + 4097, b"\x09"),
                                   ("diff-past-2m.raw", 4 * MiB + 1536 * KiB + 1, b"\x09"),
                                   ("diff-last-byte.raw", 6 * MiB - 1, b"\x09")]:
            convert("data.qcow2", name)
            poke(d / name, offset, byte)
        convert("data.qcow2", "diff-compressed.qcow2", "qcow2", "-c")
        qemu_io("diff-compressed.qcow2", "write -P 7 1040k 1")  # inside a compressed cluster

        # different sizes: the tail reads as zeros (unallocated, zero clusters, zeros as data) or not
        create("s1.qcow2", "1M")
        qemu_io("s1.qcow2", "write -P 1 0 64k")
        create("s3-zero-tail.qcow2", "3M")
        qemu_io("s3-zero-tail.qcow2", "write -P 1 0 64k", "write -z 2M 64k", "write -P 0 1536k 64k")
        create("s3-data-tail.qcow2", "3M")
        qemu_io("s3-data-tail.qcow2", "write -P 1 0 64k", "write -P 0 1536k 64k", "write -P 5 2600000 1")
        sparse_file(d / "s-odd.raw", 1 * MiB + 1000, [(0, b"\x01" * 65536)])  # its last sector half a file
        sparse_file(d / "s-odd-data.raw", 1 * MiB + 1000, [(0, b"\x01" * 65536), (MiB + 999, b"\x02")])

        # odd raw sizes against qcow2 (QEMU's chunk starts where the file's data ends)
        sparse_file(d / "odd.raw", 1000, [(0, b"x" * 1000)])
        create("odd.qcow2", "1000")
        qemu_io("odd.qcow2", "write -P 120 0 1000", "write -P 1 1010 1")
        create("odd-same.qcow2", "1000")
        qemu_io("odd-same.qcow2", "write -P 120 0 1000")

        # backing chains: raw <- qcow2 <- qcow2 against their flattened copy; a short backing file
        raw_qcow2_qcow2_chain(d)
        convert("top.qcow2", "top-flat.raw")
        convert("top.qcow2", "top-flat.qcow2", "qcow2")
        create("sb.qcow2", "1M")
        create("short-top.qcow2", "2M", backing="sb.qcow2", backing_fmt="qcow2")
        create("plain-2m.qcow2", "2M")

        # zero clusters, zeros written as data, data against nothing
        create("empty.qcow2", "2M")
        create("zeroed.qcow2", "2M")
        qemu_io("zeroed.qcow2", "write -z 0 1M")
        create("zeros-as-data.qcow2", "2M")
        qemu_io("zeros-as-data.qcow2", "write -P 0 0 1M")
        create("some-data.qcow2", "2M")
        qemu_io("some-data.qcow2", "write -P 9 1536k 4k")
        sparse_file(d / "empty.raw", 2 * MiB, [])

        # empty disks whose block status differs only in how QEMU splits it (the EOF flag)
        create("e64k.qcow2", "1G")
        create("e2m.qcow2", "1G", options="cluster_size=2M")
        sparse_file(d / "e.raw", GiB, [])
        # a qcow2 answer stops after INT_MAX bytes: with 2 MiB clusters one L2 table maps 512 GiB
        create("e64k-5g.qcow2", "5G")
        create("e2m-5g.qcow2", "5G", options="cluster_size=2M")
        qemu_io("e2m-5g.qcow2", "write -P 8 4G 64k")
        create("d64k-5g.qcow2", "5G")
        qemu_io("d64k-5g.qcow2", "write -P 8 4G 64k")

        # subclusters, metadata preallocation, external data files, qcow v1, compat 0.10
        create("ext.qcow2", "1M", options="extended_l2=on")
        qemu_io("ext.qcow2", "write -P 1 0 4k", "write -z 8k 4k", "write -P 2 64k 2k", "write -c -P 4 256k 64k")
        convert("ext.qcow2", "ext.raw")
        create("pre.qcow2", "1M", options="preallocation=metadata")
        qemu_io("pre.qcow2", "write -P 1 64k 4k", "write -z 256k 64k", "write -P 2 700k 100k")
        create("pre-like.qcow2", "1M")
        qemu_io("pre-like.qcow2", "write -P 1 64k 4k", "write -P 2 700k 100k")
        create("df.qcow2", "1M", options="data_file=df.bin")
        qemu_io("df.qcow2", "write -P 1 64k 4k", "write -z 256k 64k", "write -P 3 512k 64k")
        convert("df.qcow2", "df.raw")
        create("q1.qcow", "2M", fmt="qcow")
        qemu_io("q1.qcow", "write -P 1 0 8k", "write -c -P 2 64k 4k", "write -P 3 1M 64k", fmt="qcow")
        convert("q1.qcow", "q1.raw")
        create("q1-top.qcow2", "2M", backing="q1.qcow", backing_fmt="qcow")
        qemu_io("q1-top.qcow2", "write -P 4 1M 4k")
        convert("q1-top.qcow2", "q1-top.raw")
        create("v2.qcow2", "2M", options="compat=0.10")
        qemu_io("v2.qcow2", "write -P 1 0 64k", "write -P 3 1536k 100k")
        convert("v2.qcow2", "v2.raw")


PAIRS: list[tuple[str, str]] = [
    ("data.qcow2", "data.raw"), ("data.qcow2", "data-full.raw"), ("data.qcow2", "data-copy.qcow2"),
    ("data.qcow2", "data-2m.qcow2"), ("data.qcow2", "data-ext.qcow2"), ("data.qcow2", "data.qcow2"),
    ("data.raw", "data-full.raw"),
    ("data.qcow2", "diff-first.raw"), ("data.qcow2", "diff-mid.raw"), ("data.qcow2", "diff-tail-of-cluster.raw"),
    ("data.qcow2", "diff-in-zeros.raw"), ("data.qcow2", "diff-past-2m.raw"), ("data.qcow2", "diff-last-byte.raw"),
    ("data.raw", "diff-in-zeros.raw"), ("data.qcow2", "diff-compressed.qcow2"),
    ("s1.qcow2", "s3-zero-tail.qcow2"), ("s1.qcow2", "s3-data-tail.qcow2"), ("s1.qcow2", "s-odd.raw"),
    ("s1.qcow2", "s-odd-data.raw"), ("s-odd.raw", "s3-zero-tail.qcow2"), ("s1.qcow2", "empty.qcow2"),
    ("odd.raw", "odd.qcow2"), ("odd.raw", "odd-same.qcow2"),
    ("top.qcow2", "top-flat.raw"), ("top.qcow2", "top-flat.qcow2"), ("mid.qcow2", "base.raw"),
    ("short-top.qcow2", "plain-2m.qcow2"), ("short-top.qcow2", "empty.raw"),
    ("empty.qcow2", "zeroed.qcow2"), ("empty.qcow2", "zeros-as-data.qcow2"), ("empty.qcow2", "some-data.qcow2"),
    ("empty.qcow2", "empty.raw"), ("zeroed.qcow2", "empty.raw"), ("zeros-as-data.qcow2", "empty.raw"),
    ("e64k.qcow2", "e2m.qcow2"), ("e64k.qcow2", "e.raw"), ("e2m.qcow2", "e.raw"),
    ("e64k-5g.qcow2", "e2m-5g.qcow2"), ("d64k-5g.qcow2", "e2m-5g.qcow2"), ("e2m-5g.qcow2", "e64k.qcow2"),
    ("ext.qcow2", "ext.raw"), ("pre.qcow2", "pre-like.qcow2"), ("df.qcow2", "df.raw"), ("q1.qcow", "q1.raw"),
    ("q1-top.qcow2", "q1-top.raw"), ("q1-top.qcow2", "q1.qcow"),
    ("v2.qcow2", "v2.raw"), ("q1.qcow", "v2.qcow2"),
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cmpzoo")
    build_zoo(d)
    return d


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}~{p[1]}")
def test_compare_matches_qemu(pair: tuple[str, str], zoo: Path) -> None:
    a, b = pair
    for mode in ([], ["-s"]):
        for first, second in ((a, b), (b, a)):
            same_as_qemu_img(zoo, "compare", [*mode, first, second])


def test_zoo_shows_every_verdict(zoo: Path) -> None:
    """The pairs really cover each kind of answer (else the comparisons above prove little)."""
    outputs = {qemu_img_in(zoo, "compare", [*mode, a, b])[1] for a, b in PAIRS for mode in ([], ["-s"])}
    text = "".join(outputs)
    assert "Images are identical." in text
    assert "Warning: Image size mismatch!\nImages are identical." in text
    assert "Warning: Image size mismatch!\nContent mismatch" in text
    assert "Strict mode: Image size mismatch!" in text
    offsets = {int(m) for m in re.findall(r"Content mismatch at offset (\d+)!", text)}
    assert 1000 in offsets and 0 in offsets and any(o > 4 * MiB for o in offsets)  # a raw tail sector; past 2 MiB
    assert any(o % 512 for o in offsets)  # QEMU's sectors count from where its chunk starts
    strict = {int(m) for m in re.findall(r"Strict mode: Offset (\d+) block status mismatch!", text)}
    assert 0 in strict and any(o > 0 for o in strict)


@pytest.mark.parametrize("args", [
    ["-f", "raw", "-F", "raw", "data.qcow2", "data.qcow2"], ["-f", "raw", "data.qcow2", "data.raw"],
    ["-F", "qcow2", "data.raw", "data.qcow2"], ["-f", "qcow2", "-F", "raw", "data.qcow2", "data.raw"],
    ["-q", "data.qcow2", "diff-mid.raw"], ["-q", "-s", "data.qcow2", "data.raw"], ["-q", "data.qcow2", "data.raw"],
    ["-U", "data.qcow2", "data.raw"], ["-p", "-q", "s1.qcow2", "s3-data-tail.qcow2"],
    ["-f", "foo", "data.qcow2", "data.raw"], ["-F", "foo", "data.qcow2", "data.raw"],
    ["data.qcow2"], [], ["data.qcow2", "data.raw", "data.raw"],
])


def test_options_and_argument_errors_match_qemu(args: list[str], zoo: Path) -> None:
    same_as_qemu_img(zoo, "compare", args)


@pytest.mark.parametrize("args,bad", [(["nothere.qcow2", "data.raw"], "nothere.qcow2"),
                                      (["data.raw", "nothere.qcow2"], "nothere.qcow2"),
                                      (["-f", "qcow2", "data.raw", "data.qcow2"], "data.raw")])


def test_unopenable_image_is_status_2(args: list[str], bad: str, zoo: Path) -> None:
    """Status 2 and nothing on stdout, as qemu-img; the message starts as qemu-img's (the reason
    is worded by each tool)."""
    status, out, err = qemu_img_in(zoo, "compare", args)
    ours = qcowdisk_in(zoo, "compare", args, as_qemu_img=True)
    assert (ours[0], ours[1]) == (status, out) == (2, "")
    assert err.startswith(f"qemu-img: Could not open '{bad}': ") and ours[2].startswith(f"qemu-img: Could not open '{bad}': ")


# --------------------------------------------------------------------------- -p on a terminal


def on_terminal(cmd: list[str], cwd: Path) -> tuple[int, bytes]:
    """Run `cmd` with stdout on a pseudo-terminal; return its status and everything it printed there."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=cwd, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=60), out


@pytest.mark.parametrize("args", [["data.qcow2", "data.raw"], ["s1.qcow2", "s3-zero-tail.qcow2"],
                                  ["s1.qcow2", "s3-data-tail.qcow2"], ["-s", "s1.qcow2", "s3-zero-tail.qcow2"],
                                  ["data.qcow2", "diff-past-2m.raw"], ["e64k.qcow2", "e.raw"],
                                  ["top.qcow2", "top-flat.raw"], ["nothere.qcow2", "data.raw"]])


def test_progress_line_matches_qemu_on_a_terminal(args: list[str], zoo: Path) -> None:
    theirs = on_terminal(["qemu-img", "compare", "-p", *args], zoo)
    ours = on_terminal([sys.executable, "-m", "qcowdisk", "compare", "-p", *args], zoo)
    assert ours == theirs
    if args[0] != "nothere.qcow2":
        assert b"    (0.00/100%)\r" in theirs[1]


def test_no_progress_line_off_a_terminal(zoo: Path) -> None:
    """qcowdisk draws the progress line only on a terminal (qemu-img 7.2 draws it into pipes too)."""
    status, out, _ = qcowdisk_in(zoo, "compare", ["-p", "data.qcow2", "data.raw"], as_qemu_img=True)
    assert (status, out) == (0, "Images are identical.\n")
    assert "(0.00/100%)" in qemu_img_in(zoo, "compare", ["-p", "data.qcow2", "data.raw"])[1]


# --------------------------------------------------------------------------- the library


@pytest.mark.parametrize("pair", [("data.qcow2", "diff-mid.raw"), ("s1.qcow2", "s3-zero-tail.qcow2"),
                                  ("e64k.qcow2", "e2m.qcow2"), ("data.qcow2", "data.raw")])


def test_library_result_is_qemus_verdict(pair: tuple[str, str], zoo: Path) -> None:
    for strict in (False, True):
        status, out, _ = qemu_img_in(zoo, "compare", [*(["-s"] if strict else []), *pair])
        r = qcowdisk.compare(zoo / pair[0], zoo / pair[1], strict=strict)
        assert r.identical == (status == 0)
        assert "\n".join(r.messages) + "\n" == out
        m = re.search(r"offset (\d+)", out, re.IGNORECASE)
        assert r.offset == (int(m.group(1)) if m else None)
        assert r.reason == ("identical" if status == 0 else "size" if "Image size" in out and strict
                            else "block-status" if "block status" in out else "content")
        assert r.sizes_differ == ("size mismatch" in out)


def test_library_formats_and_opened_images(zoo: Path) -> None:
    assert not qcowdisk.compare(zoo / "data.qcow2", zoo / "data.raw", a_format="raw").identical
    assert qcowdisk.compare(zoo / "data.qcow2", zoo / "data.qcow2", a_format="raw", b_format="raw").identical
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(QcowFile.open(zoo / "data.qcow2", readonly=True))
        b = open_image(str(zoo / "data.raw"), "raw", OpenOptions(readonly=True))
        stack.callback(b.close)
        assert qcowdisk.compare(a, b).identical
        assert a.read_at(0, 4) == b"\x01" * 4 and b.read_at(0, 4) == b"\x01" * 4  # both left open


def test_progress_callback_is_monotonic_and_ends_at_total(zoo: Path) -> None:
    for a, b in [("data.qcow2", "data.raw"), ("s1.qcow2", "s3-zero-tail.qcow2"), ("top.qcow2", "top-flat.raw")]:
        calls: list[tuple[int, int]] = []
        r = qcowdisk.compare(zoo / a, zoo / b, progress=lambda done, total, calls=calls: calls.append((done, total)))
        assert r.identical
        total = max(r.size_a, r.size_b)
        assert calls[0] == (0, total) and calls[-1] == (total, total)
        assert all(t == total for _, t in calls)
        assert all(x[0] <= y[0] for x, y in itertools.pairwise(calls))
        assert len(calls) > 2


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_progress_exception_stops_and_closes_everything(zoo: Path) -> None:
    class Stop(Exception):
        pass

    def stop_at_second(done: int, total: int) -> None:
        if done:
            raise Stop(done)

    before = open_fds()
    with pytest.raises(Stop):
        qcowdisk.compare(zoo / "top.qcow2", zoo / "top-flat.qcow2", progress=stop_at_second)
    assert open_fds() == before
    with QcowFile.open(zoo / "top.qcow2") as disk:  # no lock left behind: it opens read-write
        assert disk.virtual_size == 3 * MiB


class Failing:
    """An opened image whose reads (or block status) fail with EIO from `after` bytes on."""

    def __init__(self, inner: Image, *, reads: bool = False, status: bool = False, after: int = 0) -> None:
        self._inner, self._reads, self._status, self._after = inner, reads, status, after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def readinto_at(self, buffer: Any, offset: int) -> int:
        if self._reads and offset + len(memoryview(buffer)) > self._after:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return int(self._inner.readinto_at(buffer, offset))

    def layer_status(self, guest_offset: int, length: int) -> Any:
        if self._status and guest_offset + length > self._after:
            raise qcowdisk.CorruptImageError("a bad L2 entry")
        return self._inner.layer_status(guest_offset, length)


@pytest.mark.parametrize("kind", ["reads", "status"])
def test_failures_part_way_are_qemus_statuses_3_and_4(kind: str, zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreadable data is 'Error while reading offset N of FILE: why' (status 4), unreadable
    tables 'Sector allocation test failed for FILE' (status 3); what came before is printed."""
    expected_status = 4 if kind == "reads" else 3
    expected = ("Error while reading offset 2097152 of data.qcow2: Input/output error" if kind == "reads"
                else "Sector allocation test failed for data.qcow2")
    with QcowFile.open(zoo / "data.qcow2", readonly=True) as a, QcowFile.open(zoo / "data-copy.qcow2",
                                                                               readonly=True) as b:
        with pytest.raises(CompareError) as info:
            qcowdisk.compare(Failing(a, **{kind: True}, after=2 * MiB), b)  # type: ignore[arg-type]
        assert info.value.status == expected_status
        assert str(info.value) == expected.replace("data.qcow2", a.filename)
    real_open = qcowdisk.formats.open_image

    def failing_open(path: str, *args: Any) -> Any:
        img = real_open(path, *args)
        return Failing(img, **{kind: True}, after=2 * MiB) if path == "data.qcow2" else img

    monkeypatch.setattr(qcowdisk.formats, "open_image", failing_open)
    status, out, err = qcowdisk_in(zoo, "compare", ["data.qcow2", "data-copy.qcow2"], as_qemu_img=True)
    assert (status, out, err) == (expected_status, "", f"qemu-img: {expected}\n")


def test_hundred_gib_sparse_pair_in_bounded_memory(tmp_path: Path) -> None:
    """A 100 GiB qcow2 against a 100 GiB sparse raw file with the same data in three places:
    block status skips the rest unread, and memory stays a few buffers whatever the size."""
    img, raw = tmp_path / "big.qcow2", tmp_path / "big.raw"
    create(str(img), "100G")
    qemu_io(str(img), "write -P 1 0 64k", "write -P 2 40G 1M", "write -P 3 99G 64k")
    sparse_file(raw, 100 * GiB, [(0, b"\x01" * 65536), (40 * GiB, b"\x02" * MiB), (99 * GiB, b"\x03" * 65536)])
    tracemalloc.start()
    try:
        same = qcowdisk.compare(img, raw)
        poke(raw, 99 * GiB + 1234, b"\x00")
        differ = qcowdisk.compare(img, raw, strict=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert same.identical and not differ.identical and differ.offset == 99 * GiB + 1024
    assert peak < 16 * MiB, peak
    assert qemu_img_in(tmp_path, "compare", ["big.qcow2", "big.raw"])[1] == "Content mismatch at offset 106300441600!\n"


# --------------------------------------------------------------------------- the helpers


@pytest.mark.parametrize("n", [1, 511, 512, 513, 4096, 2 * MiB - 1, 2 * MiB])
def test_first_difference_and_first_nonzero_are_sector_granular(n: int) -> None:
    a = bytearray(2 * MiB)
    b = bytearray(2 * MiB)
    assert first_difference(a, memoryview(b), n) == -1 and first_nonzero(a, n) == -1
    for pos in sorted({0, n // 2, n - 1}):
        b[pos] = 1
        assert first_difference(a, memoryview(b), n) == pos // 512 * 512
        assert first_nonzero(b, n) == pos // 512 * 512
        b[pos] = 0
    if n < len(a):  # bytes past n never count
        a[n] = 1
        assert first_difference(a, memoryview(b), n) == -1

