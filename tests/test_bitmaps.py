"""Persistent dirty bitmaps: `convert --bitmaps` against qemu-img 7.2, the reader on hostile
tables, and `QcowFile.add_bitmaps` (its refusals, and QEMU reading what it writes).

Bitmap contents are judged by QEMU: `qemu-nbd -B NAME` exports a bitmap as the NBD context
`qemu:dirty-bitmap:NAME` and `nbdinfo --map` lists its dirty and clean extents; the two outputs
(qemu-img's and qcowdisk's) must list the same extents for every bitmap. Sources are made with
`qemu-img bitmap --add/--disable/--merge` and qemu-io writes while a bitmap is enabled.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

import qcowdisk
from clirun import qcowdisk_in
from qcowdisk import BitmapError, CorruptImageError, InvalidImageError, NewBitmap, QcowError, QcowFile
from qcowdisk.ops.convert import ConvertError
from qcowdisk.qcow2.bitmaps import bitmap_bytes
from qemutools import assert_clean, compare, create, qemu_img, qemu_io

MiB = 1 << 20
EXT_BITMAPS = 0x23852875


def bitmap_map(path: str | Path, name: str) -> str:
    """QEMU's view of a bitmap: nbdinfo's extent list of qemu-nbd's export of it."""
    r = subprocess.run(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--", "[", "qemu-nbd", "-r", "-f", "qcow2",
                        "-B", name, str(path), "]"], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"nbdinfo/qemu-nbd on {path} bitmap {name!r}: {r.stderr}"
    return r.stdout


def expected_map(data: bytes, granularity: int, size: int) -> str:
    """nbdinfo --map's text for serialized bits `data` of a disk of `size` bytes."""
    bits = -(-size // granularity)
    runs: list[list[int]] = []
    for i in range(bits):
        bit = data[i // 8] >> (i % 8) & 1
        if runs and runs[-1][2] == bit:
            runs[-1][1] += 1
        else:
            runs.append([i, 1, bit])
    return "".join(f"{start * granularity:>10} {min(n * granularity, size - start * granularity):>11}    {bit}  "
                   f"{'dirty' if bit else 'clean'}\n" for start, n, bit in runs)


def bitmaps_of(path: str | Path, *, force_share: bool = False) -> list[dict[str, Any]]:
    """qemu-img info's `bitmaps` list ([] when there is none); `force_share`: -U (an image in use)."""
    args = ["info", "--output=json", *(["-U"] if force_share else []), str(path)]
    data = json.loads(qemu_img(*args).stdout)["format-specific"]["data"]
    found: list[dict[str, Any]] = data.get("bitmaps", [])
    return found


def _mixed(d: Path) -> Path:
    """64 MiB, 64 KiB clusters: an enabled bitmap with writes, a disabled one filled by a merge,
    a 512-byte granularity one, an odd name."""
    p = str(d / "mixed.qcow2")
    create(p, "64M")
    qemu_io(p, "write -P 1 0 1M", "write -P 2 10M 64k")
    qemu_img("bitmap", "--add", p, "b0")
    qemu_io(p, "write -P 3 20M 128k", "write -P 4 1049088 300", "write -z 30M 1M")
    qemu_img("bitmap", "--add", "-g", "128k", "--disable", p, "b1")
    qemu_img("bitmap", "--merge", "b0", p, "b1")
    qemu_img("bitmap", "--add", "-g", "512", p, "fine")
    qemu_io(p, "write -P 5 40M 4k", "write -P 6 63M 1536", "write -P 7 7000 1")
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", p, 'é"x\t/')
    return Path(p)


def _dense(d: Path) -> Path:
    """512-byte clusters, an odd size, a 512-byte granularity bitmap with scattered writes and
    one long run (whole bitmap clusters of set bits)."""
    p = str(d / "dense.qcow2")
    size = 8 * MiB + 1536
    create(p, size, options="cluster_size=512")
    qemu_img("bitmap", "--add", "-g", "512", p, "d")
    rng = random.Random(9)
    cmds = ["write -P 9 4M 2M", f"write -P 8 {size - 512} 512"]
    for _ in range(120):
        off = rng.randrange(size // 512 - 16) * 512
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {rng.randrange(1, 16) * 512}")
    qemu_io(p, *cmds)
    qemu_img("bitmap", "--add", "-g", "4k", "--disable", p, "e")
    qemu_img("bitmap", "--merge", "d", p, "e")
    return Path(p)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bitmap-sources")
    return {"mixed": _mixed(d), "dense": _dense(d)}


def _same_bitmaps(theirs: Path, ours: Path) -> None:
    """Same list (names, granularity, flags, order), same contents; ours checks clean."""
    assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert bitmaps_of(ours)
    assert_clean(str(ours))
    for bm in bitmaps_of(theirs):
        assert bitmap_map(ours, bm["name"]) == bitmap_map(theirs, bm["name"]), bm["name"]


@pytest.mark.parametrize(("source", "opts"), [
    ("mixed", []), ("mixed", ["-o", "cluster_size=512"]), ("mixed", ["-o", "cluster_size=2M"]), ("mixed", ["-c"]),
    ("mixed", ["-o", "extended_l2=on,lazy_refcounts=on"]),
    ("dense", []), ("dense", ["-o", "cluster_size=4k"]), ("dense", ["-o", "cluster_size=512"])])
def test_convert_bitmaps_as_qemu_img(tmp_path: Path, sources: dict[str, Path], source: str, opts: list[str]) -> None:
    """The copy has the source's bitmaps, in order, with the same contents as qemu-img's copy,
    whatever the target's cluster size (the bitmap tables are cut differently)."""
    src = sources[source]
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    q = qemu_img("convert", "--bitmaps", "-O", "qcow2", *opts, str(src), str(theirs), check=False)
    status, out, err = qcowdisk_in(tmp_path, "convert", ["--bitmaps", "-O", "qcow2", *opts, str(src), str(ours)])
    assert (status, out, err) == (q.returncode, q.stdout, q.stderr) == (0, "", "")
    compare(str(src), str(ours))
    _same_bitmaps(theirs, ours)
    # qcowdisk stores all-set clusters as table entries, QEMU as data clusters: never bigger
    assert ours.stat().st_size <= theirs.stat().st_size * 1.05


def test_convert_bitmaps_overlay_snapshot_existing(tmp_path: Path, sources: dict[str, Path]) -> None:
    """-B (an overlay of the source), -l (a snapshot of the source) and -n (a target without
    bitmaps) copy the bitmaps of the source image as qemu-img does."""
    src = tmp_path / "src.qcow2"
    src.write_bytes(sources["mixed"].read_bytes())
    qemu_img("snapshot", "-c", "sn", str(src))
    for name, opts in [("overlay", ["-B", str(src), "-F", "qcow2"]), ("snap", ["-l", "snapshot.name=sn"]),
                       ("existing", ["-n"])]:
        theirs, ours = tmp_path / f"q-{name}.qcow2", tmp_path / f"o-{name}.qcow2"
        if name == "existing":
            create(str(theirs), "64M", options="cluster_size=4k")
            create(str(ours), "64M", options="cluster_size=4k")
        qemu_img("convert", "--bitmaps", "-O", "qcow2", *opts, str(src), str(theirs))
        qcowdisk.convert(src, ours, bitmaps=True, backing_file=str(src) if name == "overlay" else None,
                         backing_format="qcow2" if name == "overlay" else None,
                         snapshot="sn" if name == "snap" else None, target_exists=name == "existing")
        compare(str(theirs), str(ours))
        _same_bitmaps(theirs, ours)


def _in_use(d: Path, src: Path) -> Path:
    """A copy whose bitmaps are all in use (qemu-io killed while it had them open), plus a
    consistent one added afterwards."""
    p = d / "inuse.qcow2"
    p.write_bytes(src.read_bytes())
    subprocess.run(["qemu-io", "-c", "write -P 2 0 64k", "-c", "sigraise 9", str(p)], capture_output=True, check=False)
    qemu_img("bitmap", "--add", str(p), "late")
    qemu_io(str(p), "write -P 3 5M 64k")
    return p


def test_inconsistent_bitmaps(tmp_path: Path, sources: dict[str, Path]) -> None:
    """An in-use bitmap: the same refusal (message, hint, exit code, no target) or, with
    --skip-broken-bitmaps, the same warnings (newest first, as QEMU walks them) and copy."""
    src = _in_use(tmp_path, sources["mixed"])
    assert [b["flags"] for b in bitmaps_of(src)][-1] == ["auto"]
    for extra in ([], ["--skip-broken-bitmaps"]):
        theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
        q = qemu_img("convert", "--bitmaps", *extra, "-O", "qcow2", str(src), str(theirs), check=False)
        status, out, err = qcowdisk_in(tmp_path, "convert", ["--bitmaps", *extra, "-O", "qcow2", str(src), str(ours)])
        assert status == q.returncode and out == q.stdout
        assert err == q.stderr.replace("qemu-img: ", "qcowdisk: ")
        if not extra:
            assert status == 1 and "Cannot copy inconsistent bitmap 'é\"x\t/'" in err and "--skip-broken" in err
            assert not theirs.exists() and not ours.exists()
            with pytest.raises(ConvertError, match="inconsistent bitmap"):
                qcowdisk.convert(src, ours, bitmaps=True)
            assert not ours.exists()
        else:
            assert status == 0 and err.count("warning: Skipping inconsistent bitmap") == 4
            assert [b["name"] for b in bitmaps_of(ours)] == ["late"]
            _same_bitmaps(theirs, ours)


@pytest.mark.parametrize("case", ["skip-alone", "raw-src", "v2-src", "raw-dst", "v2-dst", "v2-existing", "raw-both"])
def test_refusals_as_qemu_img(tmp_path: Path, sources: dict[str, Path], case: str) -> None:
    """What qemu-img convert --bitmaps refuses, qcowdisk refuses with the same message and exit
    code, in the same order (source checks before target checks), writing nothing."""
    src, opts = str(sources["mixed"]), ["--bitmaps", "-O", "qcow2"]
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(MiB))
    v2 = create(str(tmp_path / "v2.qcow2"), "64M", options="compat=0.10")
    if case == "skip-alone":
        opts = ["--skip-broken-bitmaps", "-O", "qcow2"]
    elif case == "raw-src":
        src = str(raw)
    elif case == "v2-src":
        src = v2
    elif case == "raw-dst":
        opts = ["--bitmaps", "-O", "raw"]
    elif case == "v2-dst":
        opts += ["-o", "compat=0.10"]
    elif case == "v2-existing":
        opts += ["-n"]
    elif case == "raw-both":
        src, opts = str(raw), ["--bitmaps", "-O", "raw"]
    for who in ("q", "o"):
        dst = v2 if case == "v2-existing" else str(tmp_path / f"{who}.out")
        before = Path(dst).read_bytes() if case == "v2-existing" else None
        if who == "q":
            r = qemu_img("convert", *opts, src, dst, check=False)
            expected = (r.returncode, r.stdout, r.stderr.replace("qemu-img: ", "qcowdisk: "))
        else:
            assert qcowdisk_in(tmp_path, "convert", [*opts, src, dst]) == expected
            assert expected[0] == 1 and expected[2].count("\n") == 1
            assert Path(dst).read_bytes() == before if before is not None else not Path(dst).exists()
        if before is not None:
            Path(dst).write_bytes(before)


# --------------------------------------------------------------------------------------------
# the reader: hostile tables

def _table_entry_at(path: Path, name: str, index: int) -> int:
    with QcowFile.open(path, readonly=True) as disk:
        bm = next(b for b in disk.bitmaps if b.name == name)
        return bm.table_offset + 8 * index


@pytest.mark.parametrize(("case", "error", "field"), [
    ("reserved", CorruptImageError, "entry 0"), ("unaligned", CorruptImageError, "entry 0"),
    ("ones-with-offset", CorruptImageError, "entry 0"), ("past-eof", CorruptImageError, "outside the file"),
    ("table-size", InvalidImageError, "bitmap_table_size"),
    ("table-offset", InvalidImageError, "bitmap_table_offset")])
def test_bad_bitmap_tables_refused(tmp_path: Path, sources: dict[str, Path], case: str,
                                   error: type[QcowError], field: str) -> None:
    """Each broken table or entry raises its QcowError naming what is wrong, before the first
    chunk; convert --bitmaps refuses the source before it creates the target."""
    p = tmp_path / "bad.qcow2"
    p.write_bytes(sources["dense"].read_bytes())
    at = _table_entry_at(p, "d", 0)
    with QcowFile.open(p, readonly=True) as disk:
        bm = next(b for b in disk.bitmaps if b.name == "d")
        dir_offset = int.from_bytes(next(e for e in disk.header.extensions if e.ext_type == EXT_BITMAPS).data[16:24],
                                    "big")
    data = bytearray(p.read_bytes())
    entry = int.from_bytes(data[at:at + 8], "big")
    if case == "reserved":
        entry |= 1 << 60
    elif case == "unaligned":
        entry = 0x10100
    elif case == "ones-with-offset":
        entry = 0x10000 | 1
    elif case == "past-eof":
        entry = 1 << 40
    if case == "table-size":
        data[dir_offset + 8:dir_offset + 12] = (bm.table_size - 1).to_bytes(4, "big")
    elif case == "table-offset":
        data[dir_offset:dir_offset + 8] = (0x300).to_bytes(8, "big")
    else:
        data[at:at + 8] = entry.to_bytes(8, "big")
    p.write_bytes(bytes(data))
    with QcowFile.open(p, readonly=True) as disk, pytest.raises(error, match=field):
        disk.read_bitmap("d")
    with pytest.raises(QcowError):
        qcowdisk.convert(p, tmp_path / "out.qcow2", bitmaps=True)
    assert not (tmp_path / "out.qcow2").exists()


# --------------------------------------------------------------------------------------------
# add_bitmaps

def test_add_bitmaps_read_by_qemu(tmp_path: Path) -> None:
    """Contents given as chunks of any size are what QEMU then reports, with all-clear,
    all-set and mixed clusters, bits past the disk's end ignored; the image stays writable and
    a write after the add is recorded in the enabled bitmap (the disabled one left clean)."""
    p = create(str(tmp_path / "a.qcow2"), 4 * MiB + 512, options="cluster_size=512")
    n = bitmap_bytes(4 * MiB + 512, 512)
    data = bytearray(n)
    data[0:3] = b"\x01\x80\xff"
    data[512:1024] = b"\xff" * 512   # a whole set cluster: table entry 1
    data[-1] = 0xFF                   # one real bit (the disk's last 512 bytes), seven past the end
    with QcowFile.open(p) as disk:
        disk.write_at(0, b"x" * 1000)
        disk.add_bitmaps([NewBitmap("a", 512, True, [bytes(data[i:i + 77]) for i in range(0, n, 77)]),
                          NewBitmap("z", 1 << 20, False)])
        assert bitmaps_of(p, force_share=True) == [{"flags": ["auto"], "name": "a", "granularity": 512},
                                                   {"flags": [], "name": "z", "granularity": 1 << 20}]
        disk.write_at(9 * 512 + 7, b"y")  # bit 9 of "a"
        assert all("in-use" in b["flags"] for b in bitmaps_of(p, force_share=True))  # tracking again since that write
    data[1] |= 0x02
    assert_clean(p)
    assert bitmaps_of(p) == [{"flags": ["auto"], "name": "a", "granularity": 512},
                             {"flags": [], "name": "z", "granularity": 1 << 20}]
    assert bitmap_map(p, "a") == expected_map(bytes(data), 512, 4 * MiB + 512)
    assert bitmap_map(p, "a").splitlines()[-1].split() == ["2097152", str(2 * MiB + 512), "1", "dirty"]
    assert bitmap_map(p, "z").split() == ["0", str(4 * MiB + 512), "0", "clean"]
    with QcowFile.open(p, readonly=True) as disk:
        got = b"".join(disk.read_bitmap("a"))
    data[-1] = 0x01
    assert got == bytes(data)


def test_add_bitmaps_refusals(tmp_path: Path) -> None:
    """What QEMU refuses is refused before anything is written (the file stays byte for byte)."""
    p = create(str(tmp_path / "a.qcow2"), "16M")
    v2 = create(str(tmp_path / "v2.qcow2"), "16M", options="compat=0.10")
    before = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    for new, message in [([NewBitmap("")], "name cannot be empty"),
                         ([NewBitmap("a"), NewBitmap("a")], "Bitmap already exists: a"),
                         ([NewBitmap("a", 3000)], "Granularity must be power of 2 and at least 512"),
                         ([NewBitmap("a", 256)], "Granularity must be power of 2 and at least 512"),
                         ([NewBitmap("a", 1 << 32)], "Granularity exceeds maximum \\(2147483648 bytes\\)"),
                         ([NewBitmap("é" * 512)], "Name length exceeds maximum \\(1023 characters\\)")]:
        with QcowFile.open(p) as disk, pytest.raises(BitmapError, match=message):
            disk.add_bitmaps(new)
        assert hashlib.sha256(Path(p).read_bytes()).hexdigest() == before
    with QcowFile.open(v2) as disk, pytest.raises(BitmapError, match="Cannot store dirty bitmaps in qcow2 v2 files"):
        disk.add_bitmaps([NewBitmap("a")])
    with QcowFile.open(p) as disk, pytest.raises(ValueError, match="data holds 5 bytes"):
        disk.add_bitmaps([NewBitmap("a", 65536, True, [b"12345"])])
    assert bitmaps_of(p) == []
    r = qemu_img("check", "--output=json", p, check=False)
    assert json.loads(r.stdout).get("corruptions", 0) == 0


@pytest.mark.parametrize("extra", [[], ["--bitmaps"], ["--target-is-zero"], ["--bitmaps", "--skip-broken-bitmaps"]])
def test_convert_into_target_with_bitmaps(tmp_path: Path, sources: dict[str, Path], extra: list[str]) -> None:
    """-n into an image with bitmaps of its own: what the copy writes is recorded in its enabled
    bitmaps (the disabled one stays), then the source's are added, newest first, the first name
    in use ending the copy with qemu-img's message: the same result as qemu-img's."""
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    create(str(theirs), "64M", options="cluster_size=4k")
    qemu_io(str(theirs), "write -P 9 0 1M")
    qemu_img("bitmap", "--add", "-g", "4k", str(theirs), "tb")
    qemu_img("bitmap", "--add", "--disable", str(theirs), "td")
    qemu_img("bitmap", "--add", str(theirs), "b1")  # a name the source has too
    ours.write_bytes(theirs.read_bytes())
    q = qemu_img("convert", *extra, "-n", "-O", "qcow2", str(sources["mixed"]), str(theirs), check=False)
    status, out, err = qcowdisk_in(tmp_path, "convert", [*extra, "-n", "-O", "qcow2", str(sources["mixed"]), str(ours)])
    assert (status, out) == (q.returncode, q.stdout)
    assert err == q.stderr.replace("qemu-img: ", "qcowdisk: ")
    compare(str(theirs), str(ours))
    _same_bitmaps(theirs, ours)
    if "--bitmaps" in extra:
        assert status == 1 and "Failed to create bitmap b1: Bitmap already exists: b1" in err
        assert [b["name"] for b in bitmaps_of(ours)] == ["tb", "td", "b1", "fine", 'é"x\t/']
    assert "1  dirty" in bitmap_map(ours, "tb") and "dirty" not in bitmap_map(ours, "td")
