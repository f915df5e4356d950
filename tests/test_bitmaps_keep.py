"""Operations that keep persistent bitmaps, against qemu-img 7.2 on twin images: `resize`
(grow, shrink: the bitmaps resized with the disk), `snapshot -c/-d` (bitmaps untouched), `amend`
(lazy_refcounts, refcount_bits, compat=1.1 and size kept; compat=0.10 drops them). Each is run
by qemu-img on one copy and by qcowdisk on the other; exit status and output must match, so
must `qemu-img info`'s bitmap list, and every bitmap's contents as qemu-nbd -B exports them;
qcowdisk's result checks clean. `snapshot -a` is refused with QEMU's message, as are resizes
of an image with an inconsistent bitmap.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from clirun import qcowdisk_in
from qcowdisk import QcowFile, ReadOnlyError
from qemutools import assert_clean, compare, qemu_img, qemu_io
from test_bitmaps import _dense, _mixed, _same_bitmaps, bitmap_map, bitmaps_of

EXT_BITMAPS = 0x23852875


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bitmap-keep-sources")
    return {"mixed": _mixed(d), "dense": _dense(d)}


def _twins(tmp_path: Path, source: Path) -> tuple[Path, Path]:
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    theirs.write_bytes(source.read_bytes())
    ours.write_bytes(source.read_bytes())
    return theirs, ours


def _run_both(tmp_path: Path, theirs: Path, ours: Path, args: list[str]) -> tuple[int, str]:
    q = qemu_img(*[a.format(p=theirs) for a in args], check=False)
    status, out, err = qcowdisk_in(tmp_path, args[0], [a.format(p=ours) for a in args[1:]])
    assert (status, out) == (q.returncode, q.stdout)
    assert err == q.stderr.replace("qemu-img: ", "qcowdisk: ")
    return status, err


@pytest.mark.parametrize(("source", "args"), [
    ("mixed", ["resize", "{p}", "+3M"]),
    ("mixed", ["resize", "{p}", "100000256"]),               # an odd size: the last bits cut short
    ("mixed", ["resize", "--shrink", "{p}", "20M"]),
    ("mixed", ["resize", "--shrink", "{p}", "1049088"]),     # inside a set region of b0
    ("mixed", ["resize", "{p}", "8G"]),                      # the 512-byte granularity table grows
    ("dense", ["resize", "--shrink", "{p}", "-4M"]),
    ("dense", ["resize", "{p}", "+1536"]),
    ("mixed", ["snapshot", "-c", "s1", "{p}"]),
    ("mixed", ["amend", "-o", "lazy_refcounts=on", "{p}"]),
    ("mixed", ["amend", "-o", "refcount_bits=1", "{p}"]),
    ("dense", ["amend", "-o", "refcount_bits=64", "{p}"]),
    ("mixed", ["amend", "-o", "compat=1.1", "{p}"]),
    ("mixed", ["amend", "-o", "size=80M", "{p}"]),
    ("mixed", ["amend", "-o", "size=32M", "{p}"]),
])
def test_operations_keep_bitmaps_as_qemu_img(tmp_path: Path, sources: dict[str, Path], source: str,
                                             args: list[str]) -> None:
    """What qemu-img does to the bitmaps, qcowdisk does: same list, same contents."""
    theirs, ours = _twins(tmp_path, sources[source])
    status, _ = _run_both(tmp_path, theirs, ours, args)
    assert status == 0
    _same_bitmaps(theirs, ours)
    compare(str(theirs), str(ours))
    info = json.loads(qemu_img("info", "--output=json", str(ours)).stdout)
    assert info["virtual-size"] == json.loads(qemu_img("info", "--output=json", str(theirs)).stdout)["virtual-size"]


def test_snapshot_delete_keeps_bitmaps(tmp_path: Path, sources: dict[str, Path]) -> None:
    """snapshot -c then -d by each tool (after a write the snapshot shares): bitmaps unchanged."""
    theirs, ours = _twins(tmp_path, sources["mixed"])
    for p in (theirs, ours):
        qemu_img("snapshot", "-c", "s1", str(p))
    _run_both(tmp_path, theirs, ours, ["snapshot", "-c", "s2", "{p}"])
    _run_both(tmp_path, theirs, ours, ["snapshot", "-d", "s1", "{p}"])
    _same_bitmaps(theirs, ours)
    assert [b["name"] for b in bitmaps_of(ours)] == ["b0", "b1", "fine", 'é"x\t/']


def test_snapshot_apply_refused(tmp_path: Path, sources: dict[str, Path]) -> None:
    """snapshot -a: QEMU's refusal (before the name is looked up), nothing written."""
    theirs, ours = _twins(tmp_path, sources["mixed"])
    for p in (theirs, ours):
        qemu_img("snapshot", "-c", "s1", str(p))
    before = ours.read_bytes()
    for ref in ("s1", "nope"):
        status, err = _run_both(tmp_path, theirs, ours, ["snapshot", "-a", ref, "{p}"])
        assert status == 1 and "Device has active dirty bitmaps" in err
    assert ours.read_bytes() == before


def _mark_in_use(path: Path, name: str) -> None:
    """Set the in-use flag of bitmap `name` in the directory (as a VM that died leaves it)."""
    data = path.read_bytes()
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == EXT_BITMAPS:
            count, _, _, offset = struct.unpack_from(">IIQQ", data, pos + 8)
            break
        pos += 8 + -(-length // 8) * 8
    for _ in range(count):
        name_size = struct.unpack_from(">H", data, offset + 18)[0]
        extra = struct.unpack_from(">I", data, offset + 20)[0]
        if data[offset + 24 + extra:offset + 24 + extra + name_size].decode() == name:
            flags = struct.unpack_from(">I", data, offset + 12)[0]
            with open(path, "r+b") as f:
                f.seek(offset + 12)
                f.write(struct.pack(">I", flags | 1))
            return
        offset += -(-(24 + extra + name_size) // 8) * 8
    raise AssertionError(name)


@pytest.mark.parametrize("args", [["resize", "{p}", "+1M"], ["resize", "--shrink", "{p}", "32M"],
                                  ["snapshot", "-c", "s", "{p}"], ["amend", "-o", "lazy_refcounts=on", "{p}"]])
def test_inconsistent_bitmap(tmp_path: Path, sources: dict[str, Path], args: list[str]) -> None:
    """An in-use bitmap: resize refused with QEMU's message (nothing written); the others done,
    the bitmap left inconsistent."""
    theirs, ours = _twins(tmp_path, sources["mixed"])
    for p in (theirs, ours):
        _mark_in_use(p, "b1")
    before = ours.read_bytes()
    status, err = _run_both(tmp_path, theirs, ours, args)
    if args[0] == "resize":
        assert status == 1 and "Bitmap 'b1' is inconsistent and cannot be used" in err
        assert ours.read_bytes() == before
    else:
        assert status == 0
        assert bitmaps_of(ours) == bitmaps_of(theirs)
        assert_clean(str(ours))


def test_downgrade_drops_bitmaps_and_frees_them(tmp_path: Path, sources: dict[str, Path]) -> None:
    """compat=0.10: as qemu-img, the v2 image has no bitmaps and the same guest view; unlike it
    (which keeps the bitmaps extension, ignored in v2, and leaks the bitmaps' clusters), the
    extension is gone and the clusters are free: qemu-img check finds no leak, and opening the
    image prints no warning."""
    theirs, ours = _twins(tmp_path, sources["mixed"])
    status, _ = _run_both(tmp_path, theirs, ours, ["amend", "-o", "compat=0.10", "{p}"])
    assert status == 0
    compare(str(theirs), str(ours))
    assert "leaked" in qemu_img("check", str(theirs), check=False).stdout  # what qcowdisk does better
    assert_clean(str(ours))
    r = qemu_img("info", "--output=json", str(ours))
    assert "warning" not in r.stderr
    assert json.loads(r.stdout)["format-specific"]["data"]["compat"] == "0.10"
    assert EXT_BITMAPS.to_bytes(4, "big") not in ours.read_bytes()[:4096]


def test_api_resize_after_adding_bitmaps(tmp_path: Path, sources: dict[str, Path]) -> None:
    """The library: an image opened with open_for_bitmaps (or after add_bitmaps) resizes and
    snapshots, keeping the bitmaps; guest writes stay refused."""
    theirs, ours = _twins(tmp_path, sources["dense"])
    qemu_img("resize", str(theirs), "+64k")
    with QcowFile.open_for_bitmaps(ours) as disk:
        disk.resize(len(disk) + 65536)
        disk.create_snapshot("x")
        disk.delete_snapshot("x")
        with pytest.raises(ReadOnlyError):
            disk.write_at(0, b"x")
        assert [b.name for b in disk.bitmaps] == ["d", "e"]
    _same_bitmaps(theirs, ours)
    assert bitmap_map(ours, "d") == bitmap_map(theirs, "d")
    qemu_io(str(theirs), "read 0 512")
