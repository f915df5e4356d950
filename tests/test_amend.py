"""Amending (`QcowFile.amend`, `qcowdisk amend`) against `qemu-img amend` (QEMU 7.2), the oracle.

Each case runs `qemu-img amend` on one copy of an input and `qcowdisk amend` on another: same
exit status, same stdout (progress included) and stderr (the program name aside), the same
`qemu-img info --output=json` afterwards (actual-size aside: host allocation differs), the same
first 4 KiB (header, extensions, the zeroed rest), `qemu-img check` clean and `qemu-img compare`
equal guest views. A refusal leaves the file byte-for-byte as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from qcowdisk import AmendError, InvalidImageError, QcowFile, cli
from qemutools import assert_clean, copy_sparse, create, info, qemu_img, qemu_io, qemu_io_holding

MiB = 1 << 20


def _inputs(d: Path) -> dict[str, str]:
    """Build each input image once, as qemu-img and qemu-io make them."""
    paths: dict[str, str] = {}

    def mk(name: str, size: str = "64M", options: str | None = None, *io_cmds: str,
           backing: str | None = None, backing_fmt: str | None = None) -> None:
        p = str(d / name)
        create(p, size, options=options, backing=backing, backing_fmt=backing_fmt)
        if io_cmds:
            qemu_io(p, *io_cmds)
        paths[name] = p

    mk("plain.qcow2", "64M", None, "write -P 1 0 64k", "write -P 2 3M 128k")
    mk("v2.qcow2", "64M", "compat=0.10", "write -P 1 0 64k")
    mk("lazy.qcow2", "64M", "lazy_refcounts=on", "write -P 1 0 64k")
    mk("extl2.qcow2", "64M", "extended_l2=on")
    mk("zstd.qcow2", "64M", "compression_type=zstd", "write -P 1 0 64k")
    mk("zeros.qcow2", "64M", None, "write -z 0 1M", "write -P 1 2M 64k")
    mk("prealloc.qcow2", "8M", "preallocation=metadata", "write -P 5 0 1M", "write -z 64k 128k")
    mk("rc8.qcow2", "64M", "refcount_bits=8")
    base = str(d / "base.raw")
    qemu_img("create", "-q", "-f", "raw", base, "64M")
    qemu_io(base, "write -P 7 0 4M", fmt="raw")
    mk("overlay.qcow2", "64M", None, "write -z 0 1M", "write -z 3M 64k", "write -P 3 5M 64k",
       backing="base.raw", backing_fmt="raw")
    mk("snap.qcow2", "64M", None, "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "s1", paths["snap.qcow2"])
    mk("snapzero.qcow2", "64M", None, "write -P 1 0 128k")
    qemu_img("snapshot", "-c", "s1", paths["snapzero.qcow2"])
    qemu_io(paths["snapzero.qcow2"], "write -z 0 64k", "write -z 3M 64k", "write -P 4 64k 64k")
    mk("snapoverlay.qcow2", "64M", None, "write -z 0 64k", "write -P 3 1M 64k", backing="base.raw",
       backing_fmt="raw")
    qemu_img("snapshot", "-c", "s1", paths["snapoverlay.qcow2"])
    qemu_io(paths["snapoverlay.qcow2"], "write -z 2M 64k", "write -P 4 64k 64k")
    mk("v2oldsnap.qcow2", "64M", "compat=0.10", "write -P 1 0 64k")
    qemu_img("snapshot", "-c", "old", paths["v2oldsnap.qcow2"])
    _strip_snapshot_extra(paths["v2oldsnap.qcow2"])
    data = str(d / "ext.raw")
    create(str(d / "datafile.qcow2"), "64M", options=f"data_file={data}")
    paths["datafile.qcow2"] = str(d / "datafile.qcow2")
    return paths


def _strip_snapshot_extra(path: str) -> None:
    """Rewrite a one-snapshot table as pre-1.1 QEMU wrote it: no extra data."""
    with open(path, "r+b") as f:
        head = f.read(72)
        (snap_offset,) = struct.unpack_from(">Q", head, 64)
        f.seek(snap_offset)
        entry = f.read(1024)
        fixed = list(struct.unpack_from(">QIHHIIQII", entry))
        id_size, name_size, extra = fixed[2], fixed[3], fixed[8]
        names = entry[40 + extra:40 + extra + id_size + name_size]
        fixed[8] = 0
        new = struct.pack(">QIHHIIQII", *fixed) + names
        f.seek(snap_offset)
        f.write(new + bytes(-len(new) % 8))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _inputs(tmp_path_factory.mktemp("amend-inputs"))


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["amend", *args])
    finally:
        os.chdir(old)
    return status, out.getvalue(), err.getvalue()


def _info(path: str) -> dict[str, object]:
    i = info(path)
    i.pop("actual-size", None)
    i.pop("filename", None)
    return i


CASES = [
    ("plain.qcow2", ["-o", "lazy_refcounts=on"]),
    ("lazy.qcow2", ["-o", "lazy_refcounts=off"]),
    ("plain.qcow2", ["-o", "compat=0.10"]),
    ("plain.qcow2", ["-o", "compat=v2"]),
    ("v2.qcow2", ["-o", "compat=1.1"]),
    ("v2.qcow2", ["-o", "compat=v3,lazy_refcounts=on"]),
    ("v2oldsnap.qcow2", ["-o", "compat=1.1"]),
    ("v2oldsnap.qcow2", ["-p", "-o", "compat=1.1,lazy_refcounts=on"]),
    ("snapzero.qcow2", ["-p", "-o", "compat=0.10"]),
    ("lazy.qcow2", ["-o", "compat=0.10"]),
    ("zstd.qcow2", ["-o", "compat=0.10"]),
    ("zeros.qcow2", ["-o", "compat=0.10"]),
    ("prealloc.qcow2", ["-o", "compat=0.10"]),
    ("overlay.qcow2", ["-o", "compat=0.10"]),
    ("snap.qcow2", ["-o", "compat=0.10"]),
    ("snapzero.qcow2", ["-o", "compat=0.10"]),
    ("snapoverlay.qcow2", ["-o", "compat=0.10"]),
    ("plain.qcow2", ["-o", "size=32M"]),
    ("plain.qcow2", ["-o", "size=128M"]),
    ("plain.qcow2", ["-o", "size=0"]),
    ("plain.qcow2", ["-p", "-o", "lazy_refcounts=on"]),
    ("plain.qcow2", ["-q", "-p", "-o", "lazy_refcounts=on"]),
    ("plain.qcow2", ["-f", "qcow2", "--force", "-o", "lazy_refcounts=on"]),
    ("plain.qcow2", ["-o", "lazy_refcounts=on", "-o", "lazy_refcounts=off"]),
    ("plain.qcow2", ["-o", "refcount_bits=16"]),
    ("overlay.qcow2", ["-o", "backing_file=base.raw,backing_fmt=raw"]),
    ("plain.qcow2", ["-o", "help"]),
    ("plain.qcow2", ["-o", "refcount_bits=1"]),
    ("snap.qcow2", ["-o", "refcount_bits=2"]),
    ("plain.qcow2", ["-o", "refcount_bits=64"]),
    ("zeros.qcow2", ["-o", "refcount_bits=8"]),
    ("rc8.qcow2", ["-o", "refcount_bits=16"]),
    ("overlay.qcow2", ["-o", "refcount_bits=4"]),
    ("rc8.qcow2", ["-o", "compat=0.10,refcount_bits=16"]),
    ("v2.qcow2", ["-o", "compat=1.1,refcount_bits=4"]),
    ("plain.qcow2", ["-p", "-o", "refcount_bits=8"]),
    ("v2.qcow2", ["-p", "-o", "compat=1.1,refcount_bits=8"]),
    ("rc8.qcow2", ["-p", "-o", "compat=0.10,refcount_bits=16"]),
    # refusals
    ("extl2.qcow2", ["-o", "compat=0.10"]),
    ("datafile.qcow2", ["-o", "compat=0.10"]),
    ("rc8.qcow2", ["-o", "compat=0.10"]),
    ("v2.qcow2", ["-o", "lazy_refcounts=on"]),
    ("plain.qcow2", ["-o", "compat=0.10,lazy_refcounts=on"]),
    ("plain.qcow2", ["-o", "compat=foo"]),
    ("plain.qcow2", ["-o", "compat="]),
    ("plain.qcow2", ["-o", "size=100"]),
    ("plain.qcow2", ["-o", "cluster_size=4096"]),
    ("plain.qcow2", ["-o", "preallocation=full"]),
    ("plain.qcow2", ["-o", "encryption=on"]),
    ("plain.qcow2", ["-o", "extended_l2=on"]),
    ("plain.qcow2", ["-o", "foo=bar"]),
    ("plain.qcow2", ["-o", "lazy_refcounts=maybe"]),
    ("plain.qcow2", ["-o", "refcount_bits=3"]),
    ("snap.qcow2", ["-o", "refcount_bits=1"]),
    ("v2.qcow2", ["-o", "refcount_bits=8"]),
    ("plain.qcow2", ["-o", "compat=0.10,refcount_bits=8"]),
    ("snap.qcow2", ["-p", "-o", "refcount_bits=1"]),
    ("plain.qcow2", ["-o", "refcount_bits=abc"]),
    ("plain.qcow2", ["-o", "data_file=x"]),
    ("plain.qcow2", ["-o", "data_file_raw=on"]),
    ("plain.qcow2", ["-o", "encrypt.state=active"]),
    ("plain.qcow2", ["-o", "backing_file=b"]),
    ("overlay.qcow2", ["-o", "backing_file=base.raw"]),
    ("plain.qcow2", ["-o", ",x"]),
    ("plain.qcow2", []),
    ("plain.qcow2", ["-x"]),
    ("plain.qcow2", ["-f", "raw", "-o", "lazy_refcounts=on"]),
    ("plain.qcow2", ["-p", "-o", "compat=foo"]),
]


@pytest.mark.parametrize(("name", "args"), CASES, ids=[f"{n}:{' '.join(a)}" for n, a in CASES])
def test_cli_matches_qemu_img(inputs: dict[str, str], tmp_path: Path, name: str, args: list[str]) -> None:
    src = inputs[name]
    for extra in ("base.raw", "ext.raw"):
        if os.path.exists(os.path.join(os.path.dirname(src), extra)):
            copy_sparse(os.path.join(os.path.dirname(src), extra), tmp_path / extra)
    q, o = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    shutil.copy(src, q)
    shutil.copy(src, o)
    before = o.read_bytes()
    qp = subprocess.run(["qemu-img", "amend", *args, "q.qcow2"], capture_output=True, cwd=tmp_path, check=False)
    status, out, err = run_cli([*args, "o.qcow2"], tmp_path)
    assert status == (1 if qp.returncode else 0)
    assert out == qp.stdout.decode()
    assert err.replace("qcowdisk", "qemu-img") == qp.stderr.decode()
    if status:
        assert o.read_bytes() == before
        return
    assert _info(str(o)) == _info(str(q))
    assert o.read_bytes()[:4096] == q.read_bytes()[:4096]
    assert_clean(str(o))
    qemu_img("compare", "-q", str(q), str(o))


def test_api_amend_and_refusal(inputs: dict[str, str], tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    shutil.copy(inputs["zeros.qcow2"], p)
    with QcowFile.open(p) as disk:
        before = disk.read_at(0, 4 * MiB)
        with pytest.raises(AmendError, match=r"Unknown compatibility level 0\.9"):
            disk.amend(compat="0.9")
        disk.amend(compat="0.10")
        assert disk.header.version == 2
        assert disk.read_at(0, 4 * MiB) == before
        disk.write_at(0, b"x" * 512)  # still writable as v2
        disk.amend(compat="1.1", lazy_refcounts=True)
        assert disk.header.version == 3
    assert_clean(str(p))
    assert info(str(p))["format-specific"]["data"]["lazy-refcounts"] is True


@pytest.mark.parametrize("name", ["snapzero.qcow2", "snapoverlay.qcow2"])
def test_downgrade_keeps_snapshot_views(inputs: dict[str, str], tmp_path: Path, name: str) -> None:
    """Zero clusters shared with a snapshot are expanded without changing the snapshot (where
    QEMU 7.2 zeroes a preallocated cluster the snapshot still reads)."""
    p = tmp_path / name
    shutil.copy(inputs[name], p)
    copy_sparse(os.path.join(os.path.dirname(inputs[name]), "base.raw"), tmp_path / "base.raw")

    def views() -> list[bytes]:
        out = []
        for snap in (None, "s1"):
            raw = tmp_path / "view.raw"
            args = ["convert", "-O", "raw"] + (["-l", f"snapshot.name={snap}"] if snap else []) + [str(p), str(raw)]
            qemu_img(*args)
            out.append(raw.read_bytes())
        return out

    before = views()
    with QcowFile.open(p) as disk:
        disk.amend(compat="0.10")
    assert views() == before
    assert_clean(str(p))


@pytest.mark.parametrize("bits", [1, 8, 64])
def test_writes_after_refcount_width_change(inputs: dict[str, str], tmp_path: Path, bits: int) -> None:
    p = tmp_path / "a.qcow2"
    shutil.copy(inputs["plain.qcow2"], p)
    with QcowFile.open(p) as disk:
        disk.amend(refcount_bits=bits, lazy_refcounts=True)
        disk.write_at(0, b"a" * 200000)
        disk.flush()
        disk.write_at(10 * MiB, b"b" * 3000000)
        assert disk.read_at(10 * MiB, 3) == b"bbb"
    assert_clean(str(p))
    assert info(str(p))["format-specific"]["data"]["refcount-bits"] == bits


# --------------------------------------------------------------------------------------------
# qcowdisk info: persistent bitmaps, as qemu-img info shows them

def _bitmap_image(d: Path) -> str:
    p = str(d / "bm.qcow2")
    create(p, "64M")
    qemu_io(p, "write -P 1 0 64k")
    qemu_img("bitmap", "--add", p, "b0")
    qemu_img("bitmap", "--add", "-g", "128k", p, "b1")
    qemu_img("bitmap", "--add", "--disable", p, "b2")
    qemu_img("bitmap", "--add", "-g", "1M", p, 'é"x\t/')
    return p


def _info_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(["info", *args])
    finally:
        os.chdir(old)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("extra", [[], ["--output=json"], ["-U"], ["-U", "--output=json"]])
def test_info_bitmaps_match_qemu_img(tmp_path: Path, extra: list[str]) -> None:
    _bitmap_image(tmp_path)
    q = subprocess.run(["qemu-img", "info", *extra, "bm.qcow2"], capture_output=True, cwd=tmp_path, check=True)
    status, out, _ = _info_cli([*extra, "bm.qcow2"], tmp_path)
    assert status == 0
    assert out == q.stdout.decode()


def test_info_bitmaps_in_use(tmp_path: Path) -> None:
    p = _bitmap_image(tmp_path)
    subprocess.run(["qemu-io", "-c", "write -P 2 0 64k", "-c", "sigraise 9", p], capture_output=True, check=False)
    for extra in ([], ["--output=json"]):
        q = subprocess.run(["qemu-img", "info", "-U", *extra, "bm.qcow2"], capture_output=True, cwd=tmp_path,
                           check=True)
        status, out, _ = _info_cli(["-U", *extra, "bm.qcow2"], tmp_path)
        assert status == 0
        assert out == q.stdout.decode()
    with QcowFile.open(p, readonly=True) as disk:
        assert [(b.name, b.flags) for b in disk.bitmaps][:3] == [("b0", 3), ("b1", 3), ("b2", 1)]


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize(("where", "value", "field"), [
    ("ext", 0, "nb_bitmaps"),                         # zero bitmaps
    ("ext+4", 1, "Reserved"),                         # reserved32
    ("ext+16", 0x200, "bitmap_directory_offset"),     # misaligned directory
    ("ext+8", 1 << 40, "bitmap_directory_size"),      # huge directory
    ("dir+16", 40, "granularity_bits"),               # type 1, granularity 2^40 (byte 17)
    ("dir+12", 0x80, "flags"),                        # reserved flag (byte 15)
    ("dir+18", 0, "name_size"),                       # empty name
    ("dir+0", 0x123, "bitmap_table_offset"),          # misaligned table
])
def test_bad_bitmap_directory_refused(tmp_path: Path, where: str, value: int, field: str) -> None:
    p = _bitmap_image(tmp_path)
    with QcowFile.open(p, readonly=True) as disk:
        ext = next(e for e in disk.header.extensions if e.ext_type == 0x23852875)
        header = Path(p).read_bytes()[:65536]
        ext_pos = header.index(ext.data)
        dir_offset = int.from_bytes(ext.data[16:24], "big")
    base, _, add = where.partition("+")
    at = (ext_pos if base == "ext" else dir_offset) + int(add or 0)
    widths = {"ext": 4, "ext+4": 4, "ext+16": 8, "ext+8": 8, "dir+16": 2, "dir+12": 4, "dir+18": 2, "dir+0": 8}
    w = widths[where]
    raw = value.to_bytes(w, "big") if where != "dir+16" else bytes([1, value])
    _patch(p, at, raw)
    with QcowFile.open(p, readonly=True) as disk, pytest.raises(InvalidImageError, match=field):
        _ = disk.bitmaps
    status, _, err = _info_cli([p], tmp_path)
    assert status == 1 and field in err


def test_locked_image_refused_as_qemu_img(inputs: dict[str, str], tmp_path: Path) -> None:
    shutil.copy(inputs["plain.qcow2"], tmp_path / "a.qcow2")
    with qemu_io_holding(str(tmp_path / "a.qcow2")):  # waits for its prompt, without racing its open
        q = subprocess.run(["qemu-img", "amend", "-o", "lazy_refcounts=on", "a.qcow2"], capture_output=True,
                           cwd=tmp_path, check=False)
        status, out, err = run_cli(["-o", "lazy_refcounts=on", "a.qcow2"], tmp_path)
        assert q.returncode == 1 and status == 1
        assert out == q.stdout.decode() == ""
        assert err.replace("qcowdisk", "qemu-img") == q.stderr.decode()
