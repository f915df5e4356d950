"""Internal snapshots, with QEMU (qemu-img / qemu-io 7.2) as the oracle both ways.

QEMU lists, applies, deletes and exports (`convert -l snapshot.name=`) the snapshots qcowdisk
made, and qcowdisk does the same with QEMU's; `qemu-img check` must be clean (no leaks) after
every step, and every snapshot's contents are compared with a bytearray model of it. Image
shapes: 64 KiB and 512-byte clusters, extended L2, lazy refcounts, v2 (compat=0.10), a backing
file, compressed clusters. Also: refusals (external data file, a name in use, a bad snapshot
L1, refcount overflow), the `qcowdisk snapshot` command against `qemu-img snapshot`, and space
reuse over create/delete loops.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qcowdisk import (
    CorruptImageError,
    InvalidImageError,
    QcowFile,
    RefcountOverflowError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)
from qcowdisk.cli import main as cli_main
from qemutools import assert_clean, check, create, info, pattern, qemu_img, qemu_io, to_raw, write_raw

KiB = 1024
MiB = 1024 * KiB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT_HEADER = struct.Struct(">QIHHIIQII")


# --------------------------------------------------------------------------- helpers

def raw_table(img: str) -> list[dict[str, Any]]:
    """The snapshot table straight from the file: every field, with the entry's bytes."""
    with open(img, "rb") as f:
        data = f.read()
    nb, off = struct.unpack_from(">IQ", data, 60)
    out = []
    pos = off
    for _ in range(nb):
        start = pos
        (l1_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = SNAPSHOT_HEADER.unpack_from(data, pos)
        pos += SNAPSHOT_HEADER.size
        extra = data[pos:pos + extra_size]
        pos += extra_size
        sid = data[pos:pos + id_len]
        pos += id_len
        name = data[pos:pos + name_len]
        pos += name_len
        out.append({"l1_offset": l1_offset, "l1_size": l1_size, "id": sid, "name": name, "date_sec": date_sec,
                    "date_nsec": date_nsec, "vm_clock": vm_clock, "vm_state": vm_state, "extra": extra,
                    "bytes": data[start:pos]})
        pos = (pos + 7) // 8 * 8
    return out


def export(img: str, name: str, out: str, *extra: str) -> bytes:
    """What QEMU exports of snapshot `name`."""
    qemu_img("convert", *extra, "-l", f"snapshot.name={name}", "-O", "raw", img, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def qcow_snapshot_view(img: str, ref: str) -> bytes:
    with QcowFile.open(img, readonly=True, snapshot=ref) as disk:
        return disk.read_at(0, disk.virtual_size)


def cli(*args: str) -> tuple[int, bytes, str]:
    """Run `qcowdisk ARGS` in a child process (stdout as bytes, stderr as text)."""
    p = subprocess.run([sys.executable, "-m", "qcowdisk.cli", *args], capture_output=True, check=False,
                       env={**os.environ, "PYTHONPATH": REPO})
    return p.returncode, p.stdout, p.stderr.decode()


def qemu_list(img: str) -> bytes:
    return subprocess.run(["qemu-img", "snapshot", "-l", img], capture_output=True, check=True).stdout


@dataclass
class Shape:
    """An image shape to run the round trips on."""

    name: str
    options: str = ""
    size: int = 4 * MiB
    backing: bool = False
    compressed: bool = True  # also write compressed clusters with qemu-io


SHAPES = [
    Shape("default"),
    Shape("extended-l2", "extended_l2=on,cluster_size=64k"),
    Shape("lazy", "lazy_refcounts=on"),
    Shape("v2", "compat=0.10"),
    Shape("c512", "cluster_size=512", size=1 * MiB),
    Shape("backing", backing=True),
    Shape("refcount8-zstd", "refcount_bits=8,compression_type=zstd"),
]


@dataclass
class World:
    """An image, its guest model, and a model of every snapshot."""

    img: str
    tmp: Path
    size: int
    active: bytearray
    snaps: dict[str, bytes] = field(default_factory=dict)

    def write(self, offset: int, data: bytes) -> None:
        with QcowFile.open(self.img) as disk:
            disk.write_at(offset, data)
        self.active[offset:offset + len(data)] = data

    def qemu_write(self, cmd: str, offset: int, data: bytes) -> None:
        src = str(self.tmp / "src.bin")
        write_raw(src, data)
        qemu_io(self.img, f"{cmd} -s {src} {offset} {len(data)}")
        self.active[offset:offset + len(data)] = data

    def check_all(self, label: str) -> None:
        """qemu-img check clean; active view and every snapshot, by QEMU and by qcowdisk."""
        r = check(self.img)
        assert r["returncode"] == 0 and not r.get("leaks") and not r.get("corruptions"), (label, r)
        assert to_raw(self.img, str(self.tmp / "a.raw")) == bytes(self.active), f"{label}: active view (QEMU)"
        with QcowFile.open(self.img, readonly=True) as disk:
            assert disk.read_at(0, self.size) == bytes(self.active), f"{label}: active view (qcowdisk)"
            names = [s.name for s in disk.snapshots]
        assert sorted(names) == sorted(self.snaps), (label, names)
        listed = [s["name"] for s in info(self.img).get("snapshots", [])]
        assert listed == names, (label, listed, names)
        for name, want in self.snaps.items():
            assert export(self.img, name, str(self.tmp / "e.raw")) == want, f"{label}: QEMU export of {name}"
            assert qcow_snapshot_view(self.img, name) == want, f"{label}: qcowdisk view of {name}"


def make_world(tmp: Path, shape: Shape) -> World:
    img = str(tmp / "disk.qcow2")
    base = None
    active = bytearray(shape.size)
    if shape.backing:
        base = str(tmp / "base.qcow2")
        create(base, shape.size)
        data = pattern(shape.size, 99)
        write_raw(str(tmp / "b.bin"), data)
        qemu_io(base, f"write -s {tmp / 'b.bin'} 0 {shape.size}")
        active[:] = data
    create(img, shape.size, options=shape.options or None, backing=base, backing_fmt="qcow2" if base else None)
    return World(img, tmp, shape.size, active)


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_round_trip_both_ways(tmp_path: Path, shape: Shape) -> None:
    """qcowdisk and QEMU create, list, export, apply and delete each other's snapshots."""
    w = make_world(tmp_path, shape)
    cs = 512 if "cluster_size=512" in shape.options else 65536
    w.write(0, pattern(3 * cs + 100, 1))
    w.write(shape.size - 2 * cs, pattern(2 * cs, 2))
    if shape.compressed:
        w.qemu_write("write -c", 4 * cs, pattern(cs, 3)[: cs // 2] * 2)
    with QcowFile.open(w.img) as disk:
        made = disk.create_snapshot("ours-1")
    w.snaps["ours-1"] = bytes(w.active)
    w.check_all("after qcowdisk create")
    table = raw_table(w.img)
    assert [t["id"] for t in table] == [b"1"] and made.id == "1"
    extra = table[0]["extra"]
    assert len(extra) == 24 and struct.unpack(">QQQ", extra) == (0, shape.size, 0)
    assert table[0]["vm_clock"] == 0 and table[0]["vm_state"] == 0
    assert table[0]["date_nsec"] % 1000 == 0 and table[0]["date_nsec"] < 10**9
    meta = info(w.img)["snapshots"][0]
    assert meta["icount"] == 0 and meta["vm-state-size"] == 0 and meta["id"] == "1"

    # Overwrite shared clusters (COW), partly and wholly, then let QEMU take a snapshot.
    w.write(100, b"x" * 5000)
    w.write(cs, pattern(cs, 4))
    with QcowFile.open(w.img) as disk:
        disk.write_zeroes(2 * cs, cs)
    w.active[2 * cs:3 * cs] = bytes(cs)
    w.check_all("after writes over shared clusters")
    qemu_img("snapshot", "-c", "qemu-2", w.img)
    w.snaps["qemu-2"] = bytes(w.active)
    w.qemu_write("write", 50, pattern(700, 5))
    with QcowFile.open(w.img) as disk:
        disk.create_snapshot("ours-3")
        assert [s.id for s in disk.snapshots] == ["1", "2", "3"]
        assert disk.snapshots[1].entry is not None
    w.snaps["ours-3"] = bytes(w.active)
    # the QEMU-made entry is kept byte for byte when qcowdisk rewrites the table
    assert raw_table(w.img)[1]["bytes"] == table_qemu_entry(w.img, "qemu-2")
    w.check_all("after both created")

    # QEMU applies qcowdisk's snapshot; qcowdisk applies QEMU's.
    qemu_img("snapshot", "-a", "ours-1", w.img)
    w.active[:] = w.snaps["ours-1"]
    w.check_all("after qemu-img -a ours-1")
    w.write(cs + 7, b"after-apply")
    with QcowFile.open(w.img) as disk:
        disk.apply_snapshot("qemu-2")
    w.active[:] = w.snaps["qemu-2"]
    w.check_all("after qcowdisk apply qemu-2")
    with QcowFile.open(w.img) as disk:
        disk.apply_snapshot("3")  # by id
    w.active[:] = w.snaps["ours-3"]
    w.check_all("after qcowdisk apply id 3")

    # Deletes, both ways, to the end.
    qemu_img("snapshot", "-d", "ours-3", w.img)
    del w.snaps["ours-3"]
    w.check_all("after qemu-img -d ours-3")
    with QcowFile.open(w.img) as disk:
        disk.delete_snapshot("qemu-2")
    del w.snaps["qemu-2"]
    w.check_all("after qcowdisk delete qemu-2")
    w.write(0, pattern(cs, 6))
    with QcowFile.open(w.img) as disk:
        disk.delete_snapshot("1")
        assert disk.snapshots == []
    del w.snaps["ours-1"]
    w.check_all("after deleting the last")
    assert struct.unpack(">IQ", Path(w.img).read_bytes()[60:72]) == (0, 0)  # as QEMU leaves it


_QEMU_ENTRIES: dict[tuple[str, str], bytes] = {}


def table_qemu_entry(img: str, name: str) -> bytes:
    """The bytes of the entry QEMU wrote for `name` (recorded the first time it is asked for)."""
    key = (img, name)
    if key not in _QEMU_ENTRIES:
        _QEMU_ENTRIES[key] = next(t["bytes"] for t in raw_table(img) if t["name"] == name.encode())
    return _QEMU_ENTRIES[key]


def test_qemu_made_snapshots(tmp_path: Path) -> None:
    """Snapshots QEMU made: listed as qemu-img lists them, opened, applied, deleted."""
    w = make_world(tmp_path, Shape("qemu"))
    w.qemu_write("write", 0, pattern(200 * KiB, 1))
    qemu_img("snapshot", "-c", "a", w.img)
    w.snaps["a"] = bytes(w.active)
    w.qemu_write("write -c", 64 * KiB, pattern(64 * KiB, 2))
    qemu_img("snapshot", "-c", "b", w.img)
    w.snaps["b"] = bytes(w.active)
    w.qemu_write("write", 1000, pattern(3000, 3))
    table_qemu_entry(w.img, "a")
    table_qemu_entry(w.img, "b")
    with QcowFile.open(w.img, readonly=True) as disk:
        got = [(s.id, s.name, s.vm_state_size, s.vm_clock_ns, s.icount, s.disk_size) for s in disk.snapshots]
    listed = info(w.img)["snapshots"]
    assert got == [(s["id"], s["name"], 0, 0, 0, 4 * MiB) for s in listed]
    w.check_all("QEMU-made")
    with QcowFile.open(w.img) as disk:
        disk.apply_snapshot("a")
    w.active[:] = w.snaps["a"]
    w.check_all("qcowdisk applied a")
    w.write(0, b"new")
    with QcowFile.open(w.img) as disk:
        disk.delete_snapshot("a")
    del w.snaps["a"]
    w.check_all("qcowdisk deleted a")
    assert [t["bytes"] for t in raw_table(w.img)] == [table_qemu_entry(w.img, "b")]


def test_duplicate_names_and_resolution(tmp_path: Path) -> None:
    """A name in use is refused; refs resolve id first, then name, first match (QEMU's rule)."""
    w = make_world(tmp_path, Shape("dups"))
    w.write(0, b"one")
    qemu_img("snapshot", "-c", "2", w.img)   # id 1, named "2"
    w.snaps["2"] = bytes(w.active)
    w.write(0, b"two")
    qemu_img("snapshot", "-c", "x", w.img)   # id 2
    qemu_img("snapshot", "-c", "x", w.img)   # id 3, a duplicate name QEMU accepts
    with QcowFile.open(w.img) as disk:
        with pytest.raises(SnapshotExistsError, match="'x'"):
            disk.create_snapshot("x")
        with pytest.raises(SnapshotExistsError):
            disk.create_snapshot("2")
        assert disk.find_snapshot("2").id == "2"      # the id wins over the name "2"
        assert disk.find_snapshot("x").id == "2"      # the first of the duplicates
        with pytest.raises(SnapshotNotFoundError):
            disk.find_snapshot("nosuch")
        with pytest.raises(ValueError, match="255 bytes"):
            disk.create_snapshot("n" * 256)
        with pytest.raises(ValueError, match="NUL"):
            disk.create_snapshot("a\0b")
        made = disk.create_snapshot("")            # QEMU accepts an empty name too
        assert made.id == "4"
    assert [s["id"] for s in info(w.img)["snapshots"]] == ["1", "2", "3", "4"]
    assert_clean(w.img)
    with pytest.raises(ValueError, match="readonly=True"):
        QcowFile.open(w.img, snapshot="x")
    with pytest.raises(SnapshotNotFoundError):
        QcowFile.open(w.img, readonly=True, snapshot="nosuch")


def test_ids_after_deletes_follow_qemu(tmp_path: Path) -> None:
    """New ids are one more than the largest numeric id, as QEMU's find_new_snapshot_id."""
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    create(a, "1M")
    create(b, "1M")
    steps = [("c", "s1"), ("c", "s2"), ("c", "s3"), ("d", "s2"), ("c", "s4"), ("d", "s4"), ("d", "s3"), ("c", "s5")]
    for op, name in steps:
        qemu_img("snapshot", f"-{op}", name, a)
        with QcowFile.open(b) as disk:
            disk.create_snapshot(name) if op == "c" else disk.delete_snapshot(name)
    ids = [(s["id"], s["name"]) for s in info(a)["snapshots"]]
    assert ids == [(s["id"], s["name"]) for s in info(b)["snapshots"]] == [("1", "s1"), ("2", "s5")]
    assert_clean(b)


def test_apply_snapshot_of_another_size(tmp_path: Path) -> None:
    """A snapshot taken before a resize brings its disk size back, as qemu-img -a does."""
    q, o = str(tmp_path / "q.qcow2"), str(tmp_path / "o.qcow2")
    create(q, "64M")
    qemu_io(q, "write -P 1 0 128k", "write -P 2 60M 64k")
    qemu_img("snapshot", "-c", "small", q)
    qemu_img("resize", "-q", q, "1200M")  # L1 grows past one entry
    qemu_io(q, "write -P 3 1100M 64k")
    qemu_img("snapshot", "-c", "big", q)
    shutil.copy(q, o)
    small = export(q, "small", str(tmp_path / "x.raw"))[:64 * MiB]
    qemu_img("snapshot", "-a", "small", q)
    with QcowFile.open(o) as disk:
        disk.apply_snapshot("small")
        assert disk.virtual_size == 64 * MiB
        assert disk.read_at(0, 64 * MiB) == small
    assert_clean(o)
    assert info(o)["virtual-size"] == info(q)["virtual-size"] == 64 * MiB
    assert to_raw(o, str(tmp_path / "o.raw")) == to_raw(q, str(tmp_path / "q.raw"))
    with QcowFile.open(o, readonly=True, snapshot="big") as disk:
        assert disk.virtual_size == 1200 * MiB
        assert disk.read_at(1100 * MiB, 4) == b"\3" * 4
    with QcowFile.open(o) as disk:
        disk.apply_snapshot("big")
        assert disk.virtual_size == 1200 * MiB
        disk.write_at(1199 * MiB, b"tail")
    assert_clean(o)
    assert info(o)["virtual-size"] == 1200 * MiB
    qemu_img("snapshot", "-a", "big", q)
    qemu_io(q, "write -P 0x74 1199M 1", "write -P 0x61 1199M 1")
    raw = to_raw(o, str(tmp_path / "o2.raw"))
    assert raw[1100 * MiB:1100 * MiB + 4] == b"\3" * 4 and raw[1199 * MiB:1199 * MiB + 4] == b"tail"


def test_create_delete_loop_reuses_space(tmp_path: Path) -> None:
    """A loop of create / write / delete keeps the file bounded: freed clusters are reused."""
    img = str(tmp_path / "loop.qcow2")
    create(img, "8M")
    sizes = []
    with QcowFile.open(img) as disk:
        disk.write_at(0, pattern(1 * MiB, 1))
        for i in range(30):
            disk.create_snapshot(f"s{i}")
            disk.write_at((i % 8) * 128 * KiB, pattern(64 * KiB, i))
            disk.delete_snapshot(f"s{i}")
            sizes.append(os.path.getsize(img))
    assert_clean(img)
    assert max(sizes[10:]) <= max(sizes[:10]), sizes


def test_data_file_refused(tmp_path: Path) -> None:
    """Images with an external data file: every snapshot operation refused, as QEMU does."""
    img = str(tmp_path / "df.qcow2")
    create(img, "4M", options=f"data_file={tmp_path / 'data.raw'}")
    with QcowFile.open(img) as disk:
        with pytest.raises(UnsupportedFeatureError, match="data file"):
            disk.create_snapshot("s")
    assert qemu_img("snapshot", "-c", "s", img, check=False).returncode == 1
    for args in (["-c", "s"], ["-a", "s"], ["-d", "s"], ["-l"]):
        rc, out, err = cli("snapshot", *args, img)
        q = subprocess.run(["qemu-img", "snapshot", *args, img], capture_output=True, text=True, check=False)
        assert (rc, out.decode()) == (q.returncode, q.stdout), args
        assert err == q.stderr.replace("qemu-img:", "qcowdisk:"), (args, err, q.stderr)
    assert_clean(img)


def test_refcount_overflow_refused_unchanged(tmp_path: Path) -> None:
    """With 1-bit refcounts nothing can be shared: refused before anything changes (QEMU fails
    half-way and leaks a cluster)."""
    img = str(tmp_path / "r1.qcow2")
    create(img, "4M", options="refcount_bits=1")
    qemu_io(img, "write -P 1 0 128k")
    before = Path(img).read_bytes()
    with QcowFile.open(img) as disk:
        with pytest.raises(RefcountOverflowError, match="nothing was changed"):
            disk.create_snapshot("s")
        assert disk.snapshots == []
        disk.write_at(0, b"still writable")
    assert_clean(img)
    assert len(Path(img).read_bytes()) == len(before)


def test_bad_snapshot_l1_refused(tmp_path: Path) -> None:
    """A snapshot whose L1 table is bad is neither opened nor applied nor deleted; the error
    names the field and value, and the image is left as it was."""
    img = str(tmp_path / "bad.qcow2")
    create(img, "4M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s", img)
    t = raw_table(img)[0]
    with open(img, "r+b") as f:  # reserved bits in the snapshot's L1 entry 0
        f.seek(t["l1_offset"])
        e = struct.unpack(">Q", f.read(8))[0]
        f.seek(t["l1_offset"])
        f.write(struct.pack(">Q", e | 0x100))
    before = Path(img).read_bytes()
    with pytest.raises(CorruptImageError, match=r"snapshot 1 \('s'\) L1 entry 0 = 0x[0-9a-f]+ has reserved bits"):
        QcowFile.open(img, readonly=True, snapshot="s")
    with QcowFile.open(img) as disk:
        for op in (disk.apply_snapshot, disk.delete_snapshot):
            with pytest.raises(CorruptImageError, match="L1 entry 0"):
                op("s")
        assert [s.name for s in disk.snapshots] == ["s"]
    assert Path(img).read_bytes()[:72] == before[:72]
    # An L1 table that runs past the end of the file: the table itself is refused at open,
    # read-write (as today) and for the snapshot (read-only).
    with open(img, "r+b") as f:
        f.seek(t["l1_offset"])
        f.write(struct.pack(">Q", e))
    off = struct.unpack_from(">Q", before, 64)[0]
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(InvalidImageError, match="l1_table_offset 0x10000000000"):
        QcowFile.open(img, readonly=True, snapshot="s")
    with pytest.raises(InvalidImageError, match="Snapshot L1 table offset invalid"):
        QcowFile.open(img)


def test_writes_after_snapshot_copy_on_write(tmp_path: Path) -> None:
    """After create_snapshot every shared cluster is copied on write (COPIED cleared), with the
    image open all along; the snapshot's data never changes."""
    img = str(tmp_path / "cow.qcow2")
    create(img, "4M", options="cluster_size=4k")
    data = pattern(256 * KiB, 7)
    with QcowFile.open(img) as disk:
        disk.write_at(0, data)
        disk.create_snapshot("s")
        for off in range(0, 256 * KiB, 12 * KiB):
            disk.write_at(off + 5, b"y" * 3000)
        disk.punch_hole(128 * KiB, 64 * KiB)
        disk.flush()
        snap_view = bytes(data) + bytes(4 * MiB - len(data))
        assert export(img, "s", str(tmp_path / "s.raw"), "-U") == snap_view  # flushed: consistent
    assert_clean(img)
    assert qcow_snapshot_view(img, "s") == snap_view


def test_block_status_of_snapshot(tmp_path: Path) -> None:
    """block_status of an opened snapshot is what qemu-img map says of the exported snapshot."""
    img = str(tmp_path / "map.qcow2")
    create(img, "4M")
    qemu_io(img, "write -P 1 0 64k", "write -z 128k 64k", "write -P 2 1M 128k")
    qemu_img("snapshot", "-c", "s", img)
    qemu_io(img, "write -P 3 2M 64k", "discard 0 64k")
    with QcowFile.open(img, readonly=True, snapshot="s") as disk:
        extents = [(e.start, e.length, e.data, e.zero) for e in disk.block_status()]
        assert disk.opened_snapshot is not None and disk.opened_snapshot.name == "s"
    assert (0, 64 * KiB, True, False) in extents
    assert any(start <= 1 * MiB < start + length and is_data for start, length, is_data, _ in extents)
    assert not any(start <= 2 * MiB < start + length and is_data for start, length, is_data, _ in extents)


# --------------------------------------------------------------------------- the command line

def _mixed_image(tmp_path: Path) -> str:
    img = str(tmp_path / "cli.qcow2")
    create(img, "4M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "qemu one", img)
    rc, out, err = cli("snapshot", "-c", "ours", img)
    assert (rc, out, err) == (0, b"", "")
    qemu_img("snapshot", "-c", "a-rather-long-snapshot-name-over-16", img)
    rc, _, err = cli("snapshot", "-c", "", img)
    assert rc == 0, err
    # a VM-made looking entry: clock, state size and icount set
    t = raw_table(img)[0]
    off = struct.unpack_from(">Q", Path(img).read_bytes(), 64)[0]
    with open(img, "r+b") as f:
        f.seek(off + 24)
        f.write(struct.pack(">QI", 3_725_123_456_789, 5 * MiB))
        f.seek(off + 40)
        f.write(struct.pack(">QQQ", 5 * MiB, 4 * MiB, 123456))
    assert t["name"] == b"qemu one"
    return img


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Asia/Kathmandu"])
def test_cli_list_identical_to_qemu(tmp_path: Path, tz: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`qcowdisk snapshot -l` prints exactly what `qemu-img snapshot -l` prints."""
    img = _mixed_image(tmp_path)
    monkeypatch.setenv("TZ", tz)
    want = qemu_list(img)
    assert b"01:02:05.123" in want and b"123456" in want
    rc, out, err = cli("snapshot", "-l", img)
    assert (rc, err) == (0, "") and out == want, (out, want)
    rc, out, _ = cli("snapshot", "-l", "-U", "--confine-to", str(tmp_path), img)
    assert out == want
    empty = str(tmp_path / "empty.qcow2")
    create(empty, "1M")
    assert cli("snapshot", "-l", empty)[:2] == (0, qemu_list(empty)) == (0, b"")


def test_cli_apply_delete_and_errors_like_qemu(tmp_path: Path) -> None:
    """-a by id or name, -d by name only, and qemu-img's messages and exit codes otherwise."""
    img = _mixed_image(tmp_path)
    twin = str(tmp_path / "twin.qcow2")
    shutil.copy(img, twin)
    cases = [["-a", "nosuch"], ["-d", "nosuch"], ["-d", "1"], ["-l", "-c", "x"], ["-c", "x", "-c", "y"],
             ["-l", "-l"], ["-a", "2"], ["-d", "qemu one"], ["-a", "ours"], ["-U", "-d", "ours"]]
    for args in cases:
        q = subprocess.run(["qemu-img", "snapshot", *args, twin], capture_output=True, text=True, check=False)
        rc, out, err = cli("snapshot", *args, img)
        assert rc == q.returncode, (args, rc, err, q.stderr)
        assert out.decode() == q.stdout, args
        assert err == q.stderr.replace("qemu-img", "qcowdisk").replace(twin, img), (args, err, q.stderr)
        assert_clean(img)
        assert qemu_list(img) == qemu_list(twin), args
        assert to_raw(img, str(tmp_path / "a.raw")) == to_raw(twin, str(tmp_path / "b.raw")), args
    for args in (["snapshot", "-l"], ["snapshot", "-l", img, img]):
        q = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
        rc, _, err = cli(*args)
        assert (rc, err) == (q.returncode, q.stderr.replace("qemu-img", "qcowdisk")), args
    rc, _, err = cli("snapshot", "-c", "ours", img)
    assert rc == 1 and "exists already" in err
    rc, out, err = cli("snapshot", img)  # no action: qemu-img does nothing either
    assert (rc, out, err) == (0, b"", "")


def test_cli_in_process_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The parser entry, run in this process (counts toward coverage of cmd_snapshot)."""
    img = str(tmp_path / "m.qcow2")
    create(img, "1M")
    assert cli_main(["snapshot", "-c", "s", img]) == 0
    assert cli_main(["snapshot", "-a", "s", img]) == 0
    assert cli_main(["snapshot", "-d", "nosuch", img]) == 1
    assert "Could not delete snapshot 'nosuch': snapshot not found" in capsys.readouterr().err
    assert cli_main(["snapshot", "-d", "s", img]) == 0
    assert json.loads(qemu_img("info", "--output=json", img).stdout).get("snapshots") is None


def test_snapshot_l2_on_metadata_refused(tmp_path: Path) -> None:
    """A snapshot L1 entry naming the refcount table as an L2 table: apply and delete refuse
    before writing anything (apply would clear COPIED bits in that 'L2 table')."""
    img = str(tmp_path / "meta.qcow2")
    create(img, "4M")
    qemu_io(img, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s", img)
    t = raw_table(img)[0]
    reftable = struct.unpack_from(">Q", Path(img).read_bytes(), 48)[0]
    with open(img, "r+b") as f:
        f.seek(t["l1_offset"])
        f.write(struct.pack(">Q", reftable))
    before = Path(img).read_bytes()
    with QcowFile.open(img) as disk:
        for op in (disk.apply_snapshot, disk.delete_snapshot):
            with pytest.raises(CorruptImageError, match=f"L2 table offset 0x{reftable:x} overlaps other metadata"):
                op("s")
    assert Path(img).read_bytes() == before
