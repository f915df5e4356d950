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
import subprocess
from pathlib import Path

import pytest

from qcowdisk import AmendError, QcowFile, cli
from qemutools import assert_clean, create, info, qemu_img, qemu_io

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
    data = str(d / "ext.raw")
    create(str(d / "datafile.qcow2"), "64M", options=f"data_file={data}")
    paths["datafile.qcow2"] = str(d / "datafile.qcow2")
    return paths


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
    ("lazy.qcow2", ["-o", "compat=0.10"]),
    ("zstd.qcow2", ["-o", "compat=0.10"]),
    ("zeros.qcow2", ["-o", "compat=0.10"]),
    ("prealloc.qcow2", ["-o", "compat=0.10"]),
    ("overlay.qcow2", ["-o", "compat=0.10"]),
    ("snap.qcow2", ["-o", "compat=0.10"]),
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
            shutil.copy(os.path.join(os.path.dirname(src), extra), tmp_path / extra)
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
