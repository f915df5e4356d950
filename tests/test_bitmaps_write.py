"""Writes into images with persistent dirty bitmaps, against QEMU 7.2 on twin images.

QEMU's protocol (qcow2-bitmap.c), seen with qemu-io and `qemu-img info -U`: a read-write open
marks every consistent bitmap in use on disk, enabled or not; every write, write-zeroes and
discard sets the bits of the granules its byte range touches in the enabled ones (even a
discard too small to free anything); a flush stores nothing (killed after a flush, qemu-io
leaves them in use); the close stores them and clears the marks; a bitmap already in use at
open is left in use, and the open succeeds. qemu-img commit's mirror writes whole chunks of the
base's default bitmap granularity; qemu-img rebase writes runs of differing 512-byte sectors;
the committed overlay's bitmaps record nothing of its emptying.

Each test builds two identical images with qemu-img (bitmaps of several granularities, a
disabled one, one left in use by a killed qemu-io), applies the same operation with QEMU to
one and with qcowdisk to the other, and compares: `qemu-img check` clean, `qemu-img info`'s
bitmap lists equal, every consistent bitmap's bits equal (read by qcowdisk's reader on both
twins; QEMU's own export through qemu-nbd for one case), and `qemu-img compare` identical.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import qcowdisk
from clirun import qcowdisk_in, qemu_img_in
from qcowdisk import CorruptImageError, QcowFile
from qcowdisk.qcow2.format import BME_FLAG_IN_USE
from qemutools import assert_clean, compare, create, qemu_img, qemu_io, run
from test_bitmaps import bitmap_map, bitmaps_of
from test_nbd import needs_nbdkit, serving

MiB = 1 << 20
SIZE = 8 * MiB + 1536


def add(path: str | Path, name: str, *extra: str) -> None:
    """qemu-img bitmap --add EXTRA PATH NAME."""
    qemu_img("bitmap", "--add", *extra, str(path), name)


def leave_in_use(path: str | Path, name: str) -> None:
    """Add bitmap `name` and leave it in use, as a crash of the program writing leaves it:
    qemu-io writes and kills itself (its bitmaps are marked in use at open, never stored)."""
    add(path, name)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 3 64k 4k", "-c", "sigraise 9", str(path), check=False)


def bitmapped(path: Path, size: int = SIZE, options: str | None = None, backing: str | None = None) -> Path:
    """An image with data and bitmaps: 512 B, 4 KiB, default, 1 MiB granularity, a disabled
    one, and (first in the directory) one left in use."""
    lazy = options is not None and "lazy_refcounts=on" in options
    if lazy:  # (killed with lazy refcounts, qemu-io would leave the dirty bit too: amended after)
        options = ",".join(o for o in (options or "").split(",") if o != "lazy_refcounts=on")
    create(str(path), size, options=options or None, backing=backing, backing_fmt="qcow2" if backing else None)
    leave_in_use(path, "broken")
    if lazy:
        qemu_img("amend", "-o", "lazy_refcounts=on", str(path))
    qemu_io(str(path), "write -P 1 0 1M")
    add(path, "g512", "-g", "512")
    add(path, "g4k", "-g", "4k")
    qemu_io(str(path), "write -P 2 3M 10000")
    add(path, "gdef")
    add(path, "off", "--disable", "-g", "4k")
    add(path, "g1m", "-g", "1M")
    return path


def twins(tmp_path: Path, make: Callable[[Path], object]) -> tuple[Path, Path]:
    """Directories q (QEMU's twin) and o (ours), each filled by `make(dir)` from the same script."""
    q, o = tmp_path / "q", tmp_path / "o"
    q.mkdir()
    make(q)
    shutil.copytree(q, o)
    return q, o


def bits(path: Path) -> dict[str, bytes]:
    """Each consistent bitmap's serialized bits, by qcowdisk's reader (checked against QEMU's
    export in tests/test_bitmaps.py)."""
    with QcowFile.open(path, readonly=True, backing=False) as disk:
        return {b.name: b"".join(disk.read_bitmap(b.name)) for b in disk.bitmaps if not b.flags & BME_FLAG_IN_USE}


def same_bitmaps(theirs: Path, ours: Path) -> None:
    """Both check clean, list the same bitmaps (names, flags, granularity, order) with the same
    bits, and read the same."""
    assert_clean(str(ours))
    assert_clean(str(theirs))
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    want = bits(theirs)
    got = bits(ours)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name
    compare(str(theirs), str(ours))


def _requests(seed: int, size: int, count: int = 40) -> list[tuple[str, int, int]]:
    """Writes, zero writes and discards of odd sizes and offsets, the disk's last bytes included."""
    rng = random.Random(seed)
    out = [("write", size - 700, 700), ("discard", 100, 200)]
    for _ in range(count):
        kind = rng.choice(["write", "write", "zero", "discard", "punch"])
        length = rng.choice([1, 511, 4096, 70000, 300000])
        out.append((kind, rng.randrange(size - length), length))
    return out


QEMU_IO = {"write": "write -P 7 {o} {n}", "zero": "write -z {o} {n}", "punch": "write -z -u {o} {n}",
           "discard": "discard {o} {n}"}


def _apply(disk: QcowFile, requests: list[tuple[str, int, int]]) -> None:
    for kind, offset, length in requests:
        if kind == "write":
            disk.write_at(offset, b"\x07" * length)
        elif kind == "zero":
            disk.write_zeroes(offset, length)
        elif kind == "punch":
            disk.punch_hole(offset, length)
        else:
            disk.discard(offset, length)


@pytest.mark.parametrize("options", ["cluster_size=64k", "cluster_size=512", "cluster_size=64k,extended_l2=on",
                                     "cluster_size=4k,lazy_refcounts=on"])
def test_library_writes_set_the_bits_qemu_sets(tmp_path: Path, options: str) -> None:
    """QcowFile.open read-write, then writes, zero writes, hole punches and discards: the same
    bits as qemu-io's session of the same requests; the in-use bitmap stays in use."""
    q, o = twins(tmp_path, lambda d: bitmapped(d / "img.qcow2", options=options))
    requests = _requests(len(options), SIZE)
    qemu_io(str(q / "img.qcow2"), *(QEMU_IO[k].format(o=off, n=n) for k, off, n in requests))
    with QcowFile.open(o / "img.qcow2") as disk:
        _apply(disk, requests)
    same_bitmaps(q / "img.qcow2", o / "img.qcow2")
    assert bitmaps_of(o / "img.qcow2")[0]["flags"] == ["in-use", "auto"]
    assert "1  dirty" in bitmap_map(o / "img.qcow2", "g512")  # QEMU's own export of one of them
    assert bitmap_map(o / "img.qcow2", "g512") == bitmap_map(q / "img.qcow2", "g512")


def test_open_marks_in_use_as_qemu(tmp_path: Path) -> None:
    """While open read-write every consistent bitmap is in use on disk, the disabled one too,
    as in QEMU's image killed after open, a write and a flush (a flush stores nothing); the
    close clears the marks of all but the one in use before."""
    q, o = twins(tmp_path, lambda d: bitmapped(d / "img.qcow2"))
    run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "flush", "-c", "sigraise 9", str(q / "img.qcow2"),
        check=False)
    with QcowFile.open(o / "img.qcow2") as disk:
        disk.write_at(0, bytes(4096))
        disk.flush()
        during = bitmaps_of(o / "img.qcow2", force_share=True)
    assert during == bitmaps_of(q / "img.qcow2")
    assert all("in-use" in b["flags"] for b in during)
    after = bitmaps_of(o / "img.qcow2")
    assert [b["flags"] for b in after] == [["in-use", "auto"], ["auto"], ["auto"], ["auto"], [], ["auto"]]
    assert_clean(str(o / "img.qcow2"))


def test_stream_cli_and_compressed_writes(tmp_path: Path) -> None:
    """The other writers go through the same path: qcowdisk.open(..., "r+b"), `qcowdisk write`
    and compressed writes (a write for the bitmaps)."""
    q, o = twins(tmp_path, lambda d: bitmapped(d / "img.qcow2"))
    qemu_io(str(q / "img.qcow2"), "write -P 5 5000 3000", "write -P 1 0 512", "write -c -P 6 2M 64k")
    with qcowdisk.open(o / "img.qcow2", "r+b") as f:
        f.seek(5000)
        f.write(b"\x05" * 3000)
    status, _, err = qcowdisk_in(tmp_path, "write", [str(o / "img.qcow2"), "0", "--pattern", "1", "--length", "512"])
    assert status == 0, err
    with QcowFile.open(o / "img.qcow2") as disk:
        disk.write_compressed(2 * MiB, b"\x06" * 65536)
    same_bitmaps(q / "img.qcow2", o / "img.qcow2")


def test_resize_and_bitmap_edits_while_open(tmp_path: Path) -> None:
    """A resize of an image open for writes (stored first, tracking again after it), a bitmap
    added, then disabled, then writes: what qemu-io's truncate and qemu-img bitmap leave."""
    def make(d: Path) -> None:  # (an inconsistent bitmap refuses a resize, in QEMU as here)
        qemu_img("bitmap", "--remove", str(bitmapped(d / "img.qcow2")), "broken")
    q, o = twins(tmp_path, make)
    qi = str(q / "img.qcow2")
    qemu_io(qi, "write -P 1 100k 5k", "truncate 12M", "write -P 2 11M 4k")
    add(qi, "new", "-g", "8k")
    qemu_io(qi, "write -P 3 6000 20000")
    qemu_img("bitmap", "--disable", qi, "g4k")
    qemu_io(qi, "write -P 4 9M 1")
    with QcowFile.open(o / "img.qcow2") as disk:
        disk.write_at(100 * 1024, b"\x01" * 5120)
        disk.resize(12 * MiB)
        disk.write_at(11 * MiB, b"\x02" * 4096)
        disk.add_bitmaps([qcowdisk.NewBitmap("new", 8192)])
        disk.write_at(6000, b"\x03" * 20000)
        editor = disk.edit_bitmaps()
        editor.enable("g4k", False)
        disk.write_at(9 * MiB, b"\x04")
        editor.commit()
    same_bitmaps(q / "img.qcow2", o / "img.qcow2")


def _chain(d: Path, base_bitmaps: bool, top_bitmaps: bool, base_cs: str, top_cs: str) -> None:
    """base (data, bitmaps or not) <- top (writes, zeros, data past a short base's end)."""
    base = d / "base.qcow2"
    if base_bitmaps:  # (shorter, so grown: no inconsistent bitmap, which refuses that)
        qemu_img("bitmap", "--remove", str(bitmapped(base, 6 * MiB, f"cluster_size={base_cs}")), "broken")
    else:
        create(str(base), 6 * MiB, options=f"cluster_size={base_cs}")
        qemu_io(str(base), "write -P 1 0 1M")
    top = d / "top.qcow2"
    if top_bitmaps:
        bitmapped(top, SIZE, f"cluster_size={top_cs}", backing="base.qcow2")
    else:
        create(str(top), SIZE, options=f"cluster_size={top_cs}", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(top), "write -P 2 1000 100", "write -z 300000 5000", "write -P 3 2M 70000", "write -P 4 7M 9000",
            f"write -P 5 {SIZE - 512} 512")


@pytest.mark.parametrize(("base_bitmaps", "top_bitmaps"), [(True, False), (False, True), (True, True)],
                         ids=["base", "top", "both"])
@pytest.mark.parametrize(("base_cs", "top_cs", "drop"), [("64k", "4k", False), ("4k", "64k", False),
                                                         ("2M", "512", True), ("512", "64k", False)])
def test_commit_as_qemu_img(tmp_path: Path, base_bitmaps: bool, top_bitmaps: bool, base_cs: str, top_cs: str,
                            drop: bool) -> None:
    """qcowdisk commit [-d] of an overlay into a base, either or both with bitmaps (the base
    shorter, so grown): the base's bitmaps get the mirror's whole chunks, the overlay's none."""
    q, o = twins(tmp_path, lambda d: _chain(d, base_bitmaps, top_bitmaps, base_cs, top_cs))
    args = ["-d", "top.qcow2"] if drop else ["top.qcow2"]
    assert qemu_img_in(q, "commit", ["-q", *args])[0] == 0
    status, _, err = qcowdisk_in(o, "commit", ["-q", *args])
    assert status == 0, err
    for name in ("base.qcow2", "top.qcow2"):
        same_bitmaps(q / name, o / name)


def test_commit_into_a_shorter_base_with_an_inconsistent_bitmap(tmp_path: Path) -> None:
    """Growing the base is refused when a bitmap of it is inconsistent: qemu-img's job fails
    with its message and exit code before writing anything, and so does qcowdisk's commit."""
    def make(d: Path) -> None:
        bitmapped(d / "base.qcow2", 6 * MiB)
        create(str(d / "top.qcow2"), SIZE, backing="base.qcow2", backing_fmt="qcow2")
        qemu_io(str(d / "top.qcow2"), "write -P 9 6M 100")
    q, o = twins(tmp_path, make)
    want = qemu_img_in(q, "commit", ["top.qcow2"])
    got = qcowdisk_in(o, "commit", ["top.qcow2"], as_qemu_img=True)
    assert got == want and want[0] == 1, (got, want)
    for name in ("base.qcow2", "top.qcow2"):
        same_bitmaps(q / name, o / name)


def test_commit_through_a_middle_layer(tmp_path: Path) -> None:
    """commit -b BASE of a three-layer chain: the base's bitmaps record the middle layer's
    ranges and the top's; the middle layer (opened read-only) keeps its bitmaps as they were."""
    def make(d: Path) -> None:
        bitmapped(d / "base.qcow2", SIZE)
        bitmapped(d / "mid.qcow2", SIZE, "cluster_size=4k", backing="base.qcow2")
        qemu_io(str(d / "mid.qcow2"), "write -P 8 5M 3000")
        create(str(d / "top.qcow2"), SIZE, backing="mid.qcow2", backing_fmt="qcow2")
        qemu_io(str(d / "top.qcow2"), "write -P 9 6M 100")
    q, o = twins(tmp_path, make)
    assert qemu_img_in(q, "commit", ["-q", "-b", "base.qcow2", "top.qcow2"])[0] == 0
    status, _, err = qcowdisk_in(o, "commit", ["-q", "-b", "base.qcow2", "top.qcow2"])
    assert status == 0, err
    for name in ("base.qcow2", "mid.qcow2"):
        same_bitmaps(q / name, o / name)


def _rebase_chain(d: Path, top_cs: str) -> None:
    """old <- top (bitmaps); new differs from old by a few sectors and clusters."""
    create(str(d / "old.qcow2"), SIZE)
    qemu_io(str(d / "old.qcow2"), "write -P 1 0 1M", "write -P 5 3M 4096", "write -P 6 6M 64k")
    create(str(d / "new.qcow2"), 6 * MiB)
    qemu_io(str(d / "new.qcow2"), "write -P 1 0 512k", "write -P 1 520k 504k", "write -P 9 2M 1536",
            "write -P 1 3M 4096", "write -P 1 3149824 512", "write -P 0 4M 64k")
    add(d / "new.qcow2", "nb", "-g", "512")
    bitmapped(d / "top.qcow2", SIZE, f"cluster_size={top_cs}", backing="old.qcow2")
    qemu_io(str(d / "top.qcow2"), "write -P 2 1000 100")


@pytest.mark.parametrize("args", [["-b", "new.qcow2", "-F", "qcow2"], ["-u", "-b", "new.qcow2", "-F", "qcow2"],
                                  ["-b", ""], ["-u", "-b", ""]], ids=["safe", "unsafe", "standalone", "unsafe-none"])
@pytest.mark.parametrize("top_cs", ["64k", "4k", "64k,extended_l2=on"])
def test_rebase_as_qemu_img(tmp_path: Path, args: list[str], top_cs: str) -> None:
    """qcowdisk rebase (safe, -u, -b '') of an overlay with bitmaps: the bits qemu-img rebase's
    sector-wise copy sets (a 512-byte bitmap included), the new backing file's left alone."""
    q, o = twins(tmp_path, lambda d: _rebase_chain(d, top_cs))
    assert qemu_img_in(q, "rebase", [*args, "top.qcow2"])[0] == 0
    status, _, err = qcowdisk_in(o, "rebase", [*args, "top.qcow2"])
    assert status == 0, err
    for name in ("top.qcow2", "new.qcow2"):
        same_bitmaps(q / name, o / name)
    assert qemu_img("info", str(o / "top.qcow2")).stdout.count("backing file") == \
        qemu_img("info", str(q / "top.qcow2")).stdout.count("backing file")


def test_broken_table_refuses_read_write_open(tmp_path: Path) -> None:
    """A consistent bitmap whose table is broken: QEMU refuses to open the image (also
    read-write), and so does qcowdisk read-write, writing nothing."""
    p = bitmapped(tmp_path / "img.qcow2")
    with QcowFile.open(p, readonly=True) as disk:
        bm = next(b for b in disk.bitmaps if b.name == "g512")
    with open(p, "r+b") as f:  # reserved bits in its first table entry
        f.seek(bm.table_offset)
        f.write((0xFF << 56 | 2).to_bytes(8, "big"))
    before = p.read_bytes()
    assert run("qemu-io", "-f", "qcow2", "-c", "write 0 512", str(p), check=False).returncode != 0
    with pytest.raises(CorruptImageError, match="bitmap 'g512'"):
        QcowFile.open(p)
    assert p.read_bytes() == before


@needs_nbdkit
def test_writes_over_nbd(tmp_path: Path) -> None:
    """`qcowdisk serve` an image with bitmaps: qemu-io's writes, zero writes and discards over
    NBD set the bits qemu-io's same requests set on the twin's file; stored when the server stops."""
    q, o = twins(tmp_path, lambda d: bitmapped(d / "img.qcow2"))
    commands = ["write -P 5 8k 12k", "write -z 1M 128k", "write -z -u 2M 1M", "discard 5M 512k",
                "write -P 6 7000 1000"]
    qemu_io(str(q / "img.qcow2"), *commands)
    with serving(o / "img.qcow2") as srv:
        qemu_io(srv.url, *commands, fmt="raw")
        assert srv.stop() == 0, srv.output()
    same_bitmaps(q / "img.qcow2", o / "img.qcow2")
