"""The `qcowdisk` command line: `info` agrees with `qemu-img info`, `create` with `qemu-img create`.

QEMU is the oracle: images are built with qemu-img, described by both tools, and the JSON compared
key by key; images created by `qcowdisk create` must pass `qemu-img check` and show the requested
options in `qemu-img info`. Also runs tools/quickstart.py end to end.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import qcowdisk
from qcowdisk import cli
from qcowdisk.cli.common import parse_size, size_to_str
from qcowdisk.cli.options import split_options
from qcowdisk.cli.write import pattern_byte
from qemutools import assert_clean, compare, create, info, pattern, qemu_img, qemu_io, qemu_io_holding, to_raw, write_raw

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30

# Keys of qemu-img info's JSON that qcowdisk knows; anything else QEMU prints (bitmaps, ...) is
# dropped from QEMU's side before comparing. qcowdisk must print nothing outside this set.
TOP_KEYS = {"virtual-size", "filename", "cluster-size", "format", "actual-size", "dirty-flag",
            "backing-filename", "full-backing-filename", "backing-filename-format", "snapshots",
            "format-specific"}
QCOW2_DATA_KEYS = {"compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt",
                   "extended-l2", "data-file", "data-file-raw"}


def shared(qemu: dict[str, Any]) -> dict[str, Any]:
    """QEMU's info object restricted to the keys qcowdisk knows."""
    out = {k: v for k, v in qemu.items() if k in TOP_KEYS}
    if "format-specific" in out:
        fs = out["format-specific"]
        out["format-specific"] = {"type": fs["type"],
                                  "data": {k: v for k, v in fs["data"].items() if k in QCOW2_DATA_KEYS}}
    return out


def run_cmd(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m qcowdisk ARGS` from this tree in a subprocess (stdin empty); capture the output."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([sys.executable, "-m", "qcowdisk", *args], capture_output=True, env=env,
                          timeout=60, check=False, **kwargs)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run cli.main in-process; return (status, stdout, stderr)."""
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def cli_info(capsys: pytest.CaptureFixture[str], image: str, *extra: str) -> Any:
    status, out, err = run_cli(capsys, "info", "--output=json", *extra, image)
    assert status == 0, err
    return json.loads(out)


# --------------------------------------------------------------------------- image zoo


def _zoo(kind: str, d: Path) -> str:
    """Build one image of the named kind with QEMU's tools; return its path."""
    img = str(d / f"{kind}.qcow2")
    if kind == "v3":
        create(img, "1G")
        qemu_io(img, "write -P 0x11 0 128k")
    elif kind == "v2":
        create(img, "1G", options="compat=0.10")
        qemu_io(img, "write -P 0x22 1M 64k")
    elif kind == "lazy":
        create(img, "64M", options="lazy_refcounts=on")
    elif kind == "extl2":
        create(img, "64M", options="extended_l2=on,cluster_size=32k")
        qemu_io(img, "write -P 0x33 4k 4k")
    elif kind == "zstd":
        create(img, "64M", options="compression_type=zstd")
        qemu_io(img, "write -c -P 0x44 0 64k")
    elif kind == "refcount8-4k":
        create(img, "10M", options="refcount_bits=8,cluster_size=4k")
    elif kind == "snapshots":
        create(img, "64M")
        qemu_img("snapshot", "-c", "first", img)
        qemu_io(img, "write -P 0x55 0 64k")
        qemu_img("snapshot", "-c", "second one", img)
    elif kind == "v2-snapshots":
        create(img, "64M", options="compat=0.10")
        qemu_img("snapshot", "-c", "old", img)
    elif kind == "backing-qcow2":
        base = create(str(d / "base.qcow2"), "32M")
        create(img, "32M", backing=base, backing_fmt="qcow2")
    elif kind == "backing-raw":
        base = write_raw(str(d / "base.raw"), pattern(3 * MiB))
        create(img, "3M", backing=base, backing_fmt="raw")
    elif kind == "backing-relative":
        create(str(d / "rbase.qcow2"), "8M")
        create(img, "8M", backing="rbase.qcow2", backing_fmt="qcow2")
    elif kind == "data-file":
        create(img, "8M", options=f"data_file={d / 'data.raw'}")
        qemu_io(img, "write -P 0x66 0 64k")
    elif kind == "data-file-raw":
        create(img, "8M", options=f"data_file={d / 'data2.raw'},data_file_raw=on")
    elif kind == "odd-size":
        create(img, "1000")
    else:  # pragma: no cover
        raise AssertionError(kind)
    return img


ZOO = ["v3", "v2", "lazy", "extl2", "zstd", "refcount8-4k", "snapshots", "v2-snapshots",
       "backing-qcow2", "backing-raw", "backing-relative", "data-file", "data-file-raw", "odd-size"]


@pytest.mark.parametrize("kind", ZOO)
def test_info_json_matches_qemu(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _zoo(kind, tmp_path)
    ours = cli_info(capsys, img)
    assert ours == shared(info(img))
    # Same keys in the same order as QEMU prints them, too (diffable output).
    assert list(ours) == [k for k in info(img) if k in TOP_KEYS]


def test_info_json_relative_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """filename as given, full-backing-filename joined to the image's directory (QEMU's rules)."""
    sub = tmp_path / "sub"
    sub.mkdir()
    create(str(sub / "base.qcow2"), "4M")
    create(str(sub / "top.qcow2"), "4M", backing="base.qcow2", backing_fmt="qcow2")
    monkeypatch.chdir(tmp_path)
    ours = cli_info(capsys, "sub/top.qcow2")
    assert ours["filename"] == "sub/top.qcow2"
    assert ours["backing-filename"] == "base.qcow2"
    assert ours["full-backing-filename"] == "sub/base.qcow2"
    assert ours == shared(info("sub/top.qcow2"))
    chain = cli_info(capsys, "sub/top.qcow2", "--backing-chain")
    assert chain == [shared(i) for i in info("sub/top.qcow2", "--backing-chain")]


def test_info_backing_chain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_raw(str(tmp_path / "bottom.raw"), pattern(2 * MiB))
    mid = create(str(tmp_path / "mid.qcow2"), "4M", backing=raw, backing_fmt="raw")
    qemu_io(mid, "write -P 0x77 1M 64k")
    top = create(str(tmp_path / "top.qcow2"), "4M", options="compat=0.10", backing=mid, backing_fmt="qcow2")
    qemu_img("snapshot", "-c", "s", top)
    ours = cli_info(capsys, top, "--backing-chain")
    theirs = info(top, "--backing-chain")
    assert isinstance(ours, list) and len(ours) == 3
    assert [i["format"] for i in ours] == ["qcow2", "qcow2", "raw"]
    assert ours == [shared(i) for i in theirs]


def test_info_qcow1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_raw(str(tmp_path / "b.raw"), pattern(MiB))
    img = create(str(tmp_path / "old.qcow"), "1M", fmt="qcow", backing=raw, backing_fmt="raw")
    ours = cli_info(capsys, img)
    assert ours["format"] == "qcow"
    assert ours == shared(info(img))
    assert cli_info(capsys, img, "--backing-chain") == [shared(i) for i in info(img, "--backing-chain")]


@pytest.mark.parametrize("kind", ["v3", "v2", "snapshots", "backing-raw", "data-file-raw", "extl2"])
def test_info_human_matches_qemu(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _zoo(kind, tmp_path)
    status, out, err = run_cli(capsys, "info", img)
    assert status == 0, err
    assert "virtual size:" in out and "cluster_size:" in out
    assert out == qemu_img("info", img).stdout


def test_info_human_backing_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = write_raw(str(tmp_path / "b.raw"), pattern(MiB))
    top = create(str(tmp_path / "t.qcow2"), "1M", backing=raw, backing_fmt="raw")
    status, out, _ = run_cli(capsys, "info", "--backing-chain", top)
    assert status == 0
    assert out == qemu_img("info", "--backing-chain", top).stdout
    assert out.count("image: ") == 2 and "\n\nimage: " in out


def test_info_dirty_and_corrupt_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Header bits read straight through: set the dirty bit and the corrupt bit by hand."""
    img = create(str(tmp_path / "flags.qcow2"), "4M", options="lazy_refcounts=on")
    with open(img, "r+b") as f:
        f.seek(72)
        incompat = int.from_bytes(f.read(8), "big") | 0b11  # dirty | corrupt
        f.seek(72)
        f.write(incompat.to_bytes(8, "big"))
    ours = cli_info(capsys, img)
    assert ours["dirty-flag"] is True
    assert ours["format-specific"]["data"]["corrupt"] is True
    assert ours == shared(info(img))
    status, out, _ = run_cli(capsys, "info", img)
    assert status == 0 and "cleanly shut down: no" in out


def test_size_to_str_matches_qemu() -> None:
    cases = {0: "0 B", 1: "1 B", 999: "999 B", 1000: "0.977 KiB", 1024: "1 KiB", 204 * 1024: "204 KiB",
             1536 * 1024: "1.5 MiB", GiB: "1 GiB", 1000 * GiB: "0.977 TiB", (1 << 63) - 1: "8 EiB"}
    for value, text in cases.items():
        assert size_to_str(value) == text, value


# --------------------------------------------------------------------------- errors


def test_info_bad_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = create(str(tmp_path / "bad.qcow2"), "4M")
    with open(img, "r+b") as f:  # cluster_bits 30: beyond qcow2's 2 MiB limit
        f.seek(20)
        f.write((30).to_bytes(4, "big"))
    status, out, err = run_cli(capsys, "info", img)
    assert status == 1
    assert out == ""
    assert err.startswith("qcowdisk: ") and "30" in err and err.count("\n") == 1


@pytest.mark.parametrize("content", [b"", b"just some text, not an image\n" * 10])
def test_info_not_an_image(content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file no format claims is shown as a raw image, as qemu-img info shows it."""
    path = write_raw(str(tmp_path / "x.img"), content)
    status, out, err = run_cli(capsys, "info", path)
    size = -(-len(content) // 512) * 512  # (QEMU counts a raw disk in whole sectors)
    assert (status, err) == (0, "") and "file format: raw\n" in out and f"({size} bytes)" in out


def test_info_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(capsys, "info", str(tmp_path / "nope.qcow2"))
    assert status == 1 and err.startswith("qcowdisk: ") and "nope.qcow2" in err


def test_error_via_console_entry_point(tmp_path: Path) -> None:
    """The real process: exit status 1 and one error line on stderr."""
    path = write_raw(str(tmp_path / "bad.qcow2"), b"QFI\xfb\x00\x00\x00\x09" + bytes(200))
    p = subprocess.run([sys.executable, "-m", "qcowdisk.cli", "info", path], capture_output=True, text=True, check=False)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.startswith("qcowdisk: ") and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- create


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("100b", 100), ("100B", 100), ("1k", 1024), ("1K", 1024),
    ("64k", 65536), ("1M", MiB), ("1m", MiB), ("1G", GiB), ("1.5G", 3 * GiB // 2),
    ("1.5k", 1536), ("2T", 2 << 40), ("1P", 1 << 50), ("1E", 1 << 60), ("7E", 7 << 60),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1x", "-1", "1.5", "1.5b", "8E", "1kk", "0x10", "1 2"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="Invalid size"):
        parse_size(text)


def test_split_options() -> None:
    assert split_options(["a=1,b=2", "c=x,,y"]) == [("a", "1"), ("b", "2"), ("c", "x,y")]
    with pytest.raises(ValueError, match="expected name=value"):
        split_options(["novalue"])


CREATE_CASES = [
    ([], "1G", {}),
    (["-o", "compat=v2"], "64M", {"compat": "0.10"}),
    (["-o", "compat=0.10,cluster_size=4k"], "64M", {"compat": "0.10"}),
    (["-o", "compat=v3,refcount_bits=8", "-o", "lazy_refcounts=on"], "64M",
     {"compat": "1.1", "refcount-bits": 8, "lazy-refcounts": True}),
    (["-o", "cluster_size=16k,extended_l2=on,compression_type=zstd"], "100M",
     {"extended-l2": True, "compression-type": "zstd"}),
    (["-o", "refcount_bits=64,cluster_size=2M"], "5G", {"refcount-bits": 64}),
    (["-o", "preallocation=metadata"], "8M", {}),
    (["-o", "preallocation=falloc,cluster_size=128k"], "3M", {}),
    (["-f", "qcow2", "-o", "size=20M,lazy_refcounts=off"], None, {"lazy-refcounts": False}),
]


@pytest.mark.parametrize("args,size,expect", CREATE_CASES)
def test_create_matches_options(args: list[str], size: str | None, expect: dict[str, Any], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    img = str(tmp_path / "new.qcow2")
    status, out, err = run_cli(capsys, "create", *args, img, *([size] if size else []))
    assert status == 0, err
    assert out.startswith(f"Formatting '{img}', fmt=qcow2 ")
    assert_clean(img)
    theirs = info(img)
    assert theirs["format"] == "qcow2"
    # The size and cluster size QEMU reads back are what qemu-img itself would have made.
    ref = str(tmp_path / "ref.qcow2")
    qemu_args = ["create", "-q", "-f", "qcow2", *args, ref] + ([size] if size else [])
    qemu_img(*qemu_args)
    want = info(ref)
    assert theirs["virtual-size"] == want["virtual-size"]
    assert theirs["cluster-size"] == want["cluster-size"]
    assert shared(theirs)["format-specific"] == shared(want)["format-specific"]
    for key, value in expect.items():
        assert theirs["format-specific"]["data"][key] == value
    # and qcowdisk reads back what QEMU reads
    assert cli_info(capsys, img) == shared(info(img))


def test_create_preallocation_metadata_maps_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(tmp_path / "pre.qcow2")
    assert run_cli(capsys, "create", "-q", "-o", "preallocation=metadata", img, "4M")[0] == 0
    m = json.loads(qemu_img("map", "--output=json", img).stdout)
    assert all(e["data"] is True and e["zero"] is True for e in m), m
    assert_clean(img)


@pytest.mark.parametrize("size,expect", [("1.5G", 3 * GiB // 2), ("100", 512), ("1000", 1024), ("1b", 512),
                                         ("64k", 65536), ("2T", 2 << 40)])
def test_create_size_units(size: str, expect: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(tmp_path / "s.qcow2")
    status, out, err = run_cli(capsys, "create", img, size)
    assert status == 0, err
    assert f"size={parse_size(size)} " in out
    assert info(img)["virtual-size"] == expect
    assert_clean(img)


def test_create_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(tmp_path / "meta.qcow2")
    data = str(tmp_path / "guest.raw")
    status, out, err = run_cli(capsys, "create", "-o", f"data_file={data},data_file_raw=on", img, "4M")
    assert status == 0, err
    assert f"data_file={data}" in out
    d = info(img)["format-specific"]["data"]
    assert d["data-file"] == data and d["data-file-raw"] is True
    assert os.path.exists(data)
    assert_clean(img)


def test_create_with_backing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = create(str(tmp_path / "base.qcow2"), "16M")
    qemu_io(base, "write -P 0xa5 1M 128k")
    top = str(tmp_path / "top.qcow2")
    status, out, err = run_cli(capsys, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    assert status == 0, err
    assert f"backing_file={base} backing_fmt=qcow2" in out
    theirs = info(top)
    assert theirs["virtual-size"] == 16 * MiB
    assert theirs["backing-filename"] == base and theirs["backing-filename-format"] == "qcow2"
    assert_clean(top)
    assert to_raw(top, str(tmp_path / "t.raw")) == to_raw(base, str(tmp_path / "b.raw"))


def test_create_with_backing_probed_format_and_size(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """-b without -F: the format is probed and recorded; a relative name is resolved like QEMU."""
    (tmp_path / "d").mkdir()
    write_raw(str(tmp_path / "d" / "base.raw"), pattern(MiB, seed=3))
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(capsys, "create", "-b", "base.raw", "d/top.qcow2", "2M")
    assert status == 0, err
    theirs = info("d/top.qcow2")
    assert theirs["backing-filename"] == "base.raw"
    assert theirs["backing-filename-format"] == "raw"
    assert theirs["virtual-size"] == 2 * MiB
    assert_clean("d/top.qcow2")
    guest = to_raw("d/top.qcow2", str(tmp_path / "g.raw"))
    assert guest == pattern(MiB, seed=3) + bytes(MiB)


@pytest.mark.parametrize("args,needle", [
    (["-o", "foo=1"], "Invalid parameter 'foo'"),
    (["-o", "compat=2.0"], "compat"),
    (["-o", "lazy_refcounts=maybe"], "lazy_refcounts"),
    (["-o", "compression_type=lz4"], "compression_type"),
    (["-o", "preallocation=sparse"], "preallocation"),
    (["-F", "raw"], "without backing file"),
    (["-f", "vmdk"], "vmdk"),
])
def test_create_rejects_bad_options(args: list[str], needle: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    img = str(tmp_path / "x.qcow2")
    status, _, err = run_cli(capsys, "create", *args, img, "1M")
    assert status == 1
    assert err.startswith("qcowdisk: ") and needle in err
    assert not os.path.exists(img)


def test_create_needs_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(capsys, "create", str(tmp_path / "x.qcow2"))
    assert status == 1 and "size" in err


def test_create_engine_refusal_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Values the engine refuses (lazy refcounts on v2, odd cluster size) become error lines."""
    for opts in ("compat=0.10,lazy_refcounts=on", "cluster_size=1000", "refcount_bits=3"):
        img = str(tmp_path / f"x{len(opts)}.qcow2")
        status, _, err = run_cli(capsys, "create", "-o", opts, img, "1M")
        assert status == 1, opts
        assert err.startswith("qcowdisk: "), err


# --------------------------------------------------------------------------- read / write


def test_write_and_read_helpers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = create(str(tmp_path / "rw.qcow2"), "4M")
    src = write_raw(str(tmp_path / "src.bin"), pattern(70000, seed=9))
    assert run_cli(capsys, "write", img, "1M", src)[0] == 0
    assert run_cli(capsys, "write", img, "3k", "--pattern", "0xcd", "--length", "2k")[0] == 0
    assert_clean(img)
    guest = to_raw(img, str(tmp_path / "g.raw"))
    assert guest[MiB:MiB + 70000] == pattern(70000, seed=9)
    assert guest[3072:5120] == b"\xcd" * 2048
    assert guest[:3072] == bytes(3072)
    status, out, _ = run_cli(capsys, "read", "--hexdump", img, "3k", "32")
    assert status == 0
    assert out.splitlines()[0].startswith("00000c00:  cd cd")
    p = subprocess.run([sys.executable, "-m", "qcowdisk.cli", "read", img, "1M", "70000"], capture_output=True, check=False)
    assert p.returncode == 0 and p.stdout == pattern(70000, seed=9)


def test_write_past_end_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = create(str(tmp_path / "small.qcow2"), "1M")
    status, _, err = run_cli(capsys, "write", img, "1M", "--pattern", "1", "--length", "512")
    assert status == 1 and err.startswith("qcowdisk: ")


# --------------------------------------------------------------------------- --version, python -m qcowdisk


def test_version() -> None:
    installed = importlib.metadata.version("qcowdisk")
    assert qcowdisk.__version__ == installed
    p = run_cmd("--version")
    assert p.returncode == 0 and p.stderr == b""
    assert p.stdout.decode() == f"qcowdisk version {installed}\n"


def test_version_without_an_installation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree imported without installing it has no metadata: the version says so instead of failing."""
    from qcowdisk import _version

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    with monkeypatch.context() as m:
        m.setattr(importlib.metadata, "version", missing)
        assert importlib.reload(_version).__version__ == "0+unknown"
    assert importlib.reload(_version).__version__ == importlib.metadata.version("qcowdisk")


def test_python_dash_m_qcowdisk(tmp_path: Path) -> None:
    img = create(str(tmp_path / "m.qcow2"), "3M")
    p = run_cmd("info", img)
    assert p.returncode == 0 and p.stderr == b""
    assert p.stdout.decode() == qemu_img("info", img).stdout
    p = run_cmd()
    assert p.returncode == 1 and p.stderr.startswith(b"qcowdisk: ")


# --------------------------------------------------------------------------- bad arguments
#
# Every subcommand with bad values, bad files and bad options, each in its own directory holding
# img.qcow2 (1 MiB, qcow2), src.bin (4 KiB), text.txt, a directory, a FIFO and a socket; names
# are relative to it. Each must exit 1 with one `qcowdisk: ` message containing the needle, print
# nothing on stdout, and leave img.qcow2 as it was and new.qcow2 uncreated. (Every line is prefixed:
# map splits one message over two lines as qemu-img does.)

BAD_ARGS: list[tuple[list[str], str]] = [
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["--bogus"], "the following arguments are required: COMMAND"),  # argparse checks that first
    # info
    (["info"], "the following arguments are required: IMAGE"),
    (["info", "--bogus", "img.qcow2"], "unrecognized arguments: --bogus"),
    (["info", "--output=xml", "img.qcow2"], "invalid choice: 'xml'"),
    (["info", "missing.qcow2"], "Could not open 'missing.qcow2': No such file or directory"),
    (["info", "dir"], "Could not open 'dir': 'dir' is a directory, not a regular file or block device"),
    (["info", "fifo"], "Could not open 'fifo': 'fifo' is a FIFO, not a regular file or block device"),
    (["info", "sock"], "Could not open 'sock': 'sock' is a socket, not a regular file or block device"),
    (["info", "/dev/null"], "Could not open '/dev/null': '/dev/null' is a character device"),
    (["info", "--confine-to", "missing", "img.qcow2"], "--confine-to 'missing': not a directory"),
    (["info", "--confine-to"], "argument --confine-to: expected one argument"),
    # create
    (["create", "new.qcow2"], "new.qcow2: Image creation needs a size parameter"),
    (["create", "new.qcow2", "1Q"], "Invalid size '1Q'"),
    (["create", "new.qcow2", "-1"], "Invalid size '-1'"),
    (["create", "new.qcow2", "8E"], "Invalid size '8E'"),
    (["create", "new.qcow2", "1M", "2M"], "unrecognized arguments: 2M"),
    (["create", "-o", "cluster_size=zz", "new.qcow2", "1M"], "Invalid size 'zz'"),
    (["create", "-o", "nosuch=1", "new.qcow2", "1M"], "Invalid parameter 'nosuch'"),
    (["create", "-o", "refcount_bits=3", "new.qcow2", "1M"], "got 3"),
    (["create", "-f", "vmdk", "new.qcow2", "1M"], "Unsupported format 'vmdk'"),
    (["create", "-f"], "argument -f: expected one argument"),
    (["create", "-x", "new.qcow2", "1M"], "unrecognized arguments: -x"),
    (["create", "-F", "raw", "new.qcow2", "1M"], "Backing format cannot be used without backing file"),
    (["create", "-b", "missing.qcow2", "new.qcow2"], "Could not open backing file 'missing.qcow2': No such file"),
    (["create", "-b", "dir", "new.qcow2"], "Could not open backing file 'dir': 'dir' is a directory"),
    (["create", "-b", "fifo", "new.qcow2"], "Could not open backing file 'fifo': 'fifo' is a FIFO"),
    (["create", "-b", "/dev/null", "new.qcow2"], "'/dev/null' is a character device"),
    (["create", "-b", "img.qcow2", "-F", "vmdk", "new.qcow2"], "Could not open backing file 'img.qcow2'"),
    (["create", "--confine-to", "dir", "-b", "img.qcow2", "new.qcow2"], "outside the directory 'dir'"),
    (["create", "missing/new.qcow2", "1M"], "missing/new.qcow2"),
    # write
    (["write", "img.qcow2"], "the following arguments are required: OFFSET"),
    (["write", "img.qcow2", "0"], "give a FILE"),
    (["write", "img.qcow2", "0", "--pattern", "zz", "--length", "1"], "zz is not a valid pattern byte"),
    (["write", "img.qcow2", "0", "--pattern", "256", "--length", "1"], "256 is not a valid pattern byte"),
    (["write", "img.qcow2", "0", "--pattern", "-1", "--length", "1"], "-1 is not a valid pattern byte"),
    (["write", "img.qcow2", "0", "--pattern", "08", "--length", "1"], "08 is not a valid pattern byte"),
    (["write", "img.qcow2", "0", "--pattern", "1"], "--pattern needs --length"),
    (["write", "img.qcow2", "0", "--pattern", "1", "--length", "x"], "Invalid size 'x'"),
    (["write", "img.qcow2", "0", "src.bin", "--length", "1"], "--length goes with --pattern only"),
    (["write", "img.qcow2", "-512", "src.bin"], "Invalid size '-512'"),
    (["write", "img.qcow2", "1M", "--pattern", "1", "--length", "1"], "write failed: Input/output error"),
    (["write", "img.qcow2", "0", "--pattern", "1", "--length", "7E"], "write failed: Input/output error"),
    (["write", "img.qcow2", "1021k", "src.bin"], "write failed: Input/output error"),
    (["write", "img.qcow2", "0", "missing.bin"], "Could not open 'missing.bin': No such file or directory"),
    (["write", "img.qcow2", "0", "dir"], "Could not open 'dir': Is a directory"),
    (["write", "missing.qcow2", "0", "src.bin"], "Could not open 'missing.qcow2': No such file or directory"),
    (["write", "dir", "0", "src.bin"], "Could not open 'dir': 'dir' is a directory"),
    (["write", "fifo", "0", "src.bin"], "Could not open 'fifo': 'fifo' is a FIFO"),
    (["write", "/dev/null", "0", "src.bin"], "'/dev/null' is a character device"),
    (["write", "text.txt", "0", "src.bin"], "Could not open 'text.txt': "),
    (["write", "-U", "img.qcow2", "0", "src.bin"], "unrecognized arguments: -U"),
    (["write", "--confine-to", "missing", "img.qcow2", "0", "src.bin"], "--confine-to 'missing': not a directory"),
    # read
    (["read", "img.qcow2", "0"], "the following arguments are required: LENGTH"),
    (["read", "img.qcow2", "0", "2M"], "read failed: Input/output error"),
    (["read", "img.qcow2", "2M", "0"], "read failed: Input/output error"),
    (["read", "img.qcow2", "0", "7E"], "read failed: Input/output error"),
    (["read", "img.qcow2", "-1", "1"], "Invalid size '-1'"),
    (["read", "img.qcow2", "0", "-1"], "Invalid size '-1'"),
    (["read", "img.qcow2", "zz", "1"], "Invalid size 'zz'"),
    (["read", "img.qcow2", "0", "8E"], "Invalid size '8E'"),
    (["read", "img.qcow2", "0", "1", "--bogus"], "unrecognized arguments: --bogus"),
    (["read", "missing.qcow2", "0", "1"], "Could not open 'missing.qcow2': No such file or directory"),
    (["read", "dir", "0", "1"], "Could not open 'dir': 'dir' is a directory"),
    (["read", "fifo", "0", "1"], "Could not open 'fifo': 'fifo' is a FIFO"),
    (["read", "sock", "0", "1"], "Could not open 'sock': 'sock' is a socket"),
    (["read", "/dev/null", "0", "1"], "'/dev/null' is a character device"),
    (["read", "--confine-to", "src.bin", "img.qcow2", "0", "1"], "--confine-to 'src.bin': not a directory"),
    # map
    (["map"], "Expecting one image file name"),
    (["map", "-s", "-1", "img.qcow2"], "Invalid start offset specified"),
    (["map", "-l", "zz", "img.qcow2"], "Invalid max length specified"),
    (["map", "--output=xml", "img.qcow2"], "--output must be used with human or json as argument."),
    (["map", "-f", "vmdk", "img.qcow2"], "Could not open 'img.qcow2': Unknown driver 'vmdk'"),
    (["map", "-f"], "argument -f: expected one argument"),
    (["map", "missing.qcow2"], "Could not open 'missing.qcow2': No such file or directory"),
    (["map", "dir"], "Could not open 'dir': 'dir' is a directory"),
    (["map", "fifo"], "Could not open 'fifo': 'fifo' is a FIFO"),
    (["map", "/dev/null"], "'/dev/null' is a character device"),
    (["map", "-U", "--confine-to", "missing", "img.qcow2"], "--confine-to 'missing': not a directory"),
]


# Runs each case in a process of its own, as `python -m qcowdisk` would, but forked from one that
# has imported qcowdisk already (84 fresh interpreters would cost about 20 s): stdin /dev/null,
# stdout and stderr to files, an uncaught exception printed by traceback as the interpreter does.
_FORK_RUNNER = r"""
import json, os, runpy, sys, traceback
import qcowdisk.cli
results = []
for cwd, args in json.load(sys.stdin):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(cwd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open("stdout.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open("stderr.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.argv = ["qcowdisk", *args]
            try:
                runpy.run_module("qcowdisk", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def bad_arg_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, subprocess.CompletedProcess[bytes]]]:
    """Every BAD_ARGS case run in a directory of its own: {case: (directory, what the process did)}."""
    root = tmp_path_factory.mktemp("badargs")
    img = create(str(root / "img.qcow2"), "1M")
    qemu_io(img, "write -P 0x3c 0 64k")
    dirs = []
    for i in range(len(BAD_ARGS)):
        d = root / f"case{i}"
        d.mkdir()
        (d / "img.qcow2").write_bytes(Path(img).read_bytes())
        (d / "src.bin").write_bytes(pattern(4096))
        (d / "text.txt").write_text("not an image\n")
        (d / "dir").mkdir()
        os.mkfifo(d / "fifo")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(d / "sock"))
        dirs.append(d)
    cases = json.dumps([[str(d), args] for d, (args, _) in zip(dirs, BAD_ARGS, strict=True)])
    p = subprocess.run([sys.executable, "-c", _FORK_RUNNER], input=cases.encode(), capture_output=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300, check=True)
    codes = json.loads(p.stdout)
    return {i: (d, subprocess.CompletedProcess(BAD_ARGS[i][0], codes[i], (d / "stdout.out").read_bytes(),
                                               (d / "stderr.out").read_bytes()))
            for i, d in enumerate(dirs)}


@pytest.mark.parametrize("case", range(len(BAD_ARGS)), ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGS])
def test_bad_arguments_exit_1_with_one_message(case: int, bad_arg_runs: dict[int, tuple[Path, Any]]) -> None:
    args, needle = BAD_ARGS[case]
    d, p = bad_arg_runs[case]
    err = p.stderr.decode()
    assert p.returncode == 1, (args, err)
    assert err.startswith("qcowdisk: "), err
    assert "Traceback" not in err and "qcowdisk: error:" not in err
    assert needle in err.splitlines()[0], err
    hint = "Try 'qcowdisk --help' for more information"  # qemu-img's line after a usage error
    assert all(line.startswith("qcowdisk: ") for line in err.splitlines() if line != hint), err
    assert p.stdout == b""
    assert not (d / "new.qcow2").exists()
    assert (d / "img.qcow2").read_bytes() == (d.parent / "img.qcow2").read_bytes()
    if case % 8 == 0:  # now and then, the same again from a fresh `python -m qcowdisk`
        fresh = run_cmd(*args, cwd=d)
        assert (fresh.returncode, fresh.stdout, fresh.stderr) == (p.returncode, p.stdout, p.stderr)


# --------------------------------------------------------------------------- errors: qemu-img's form


def test_usage_errors_look_like_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own errors: status 1 (not 2), qemu-img's two lines, also from cli.main in-process."""
    img = create(str(tmp_path / "u.qcow2"), "1M")
    theirs = qemu_img("info", "--bogus", img, check=False)
    assert theirs.returncode == 1
    hint = theirs.stderr.splitlines()[1].replace("qemu-img", "qcowdisk")
    status, out, err = run_cli(capsys, "info", "--bogus", img)
    assert (status, out) == (1, "")
    assert err == f"qcowdisk: unrecognized arguments: --bogus\n{hint}\n"
    assert run_cli(capsys, "--help")[0] == 0  # --help still exits 0


@pytest.mark.parametrize("text", ["0", "255", "0xff", "0XaB", "010", "0377", "+7", "-0", "256", "0x100", "-1", "08",
                                  "1_0", "0x", "a", "1.0", "0o7", "0b1", "7k"])
def test_pattern_byte_accepted_as_qemu_io_does(text: str, tmp_path: Path) -> None:
    img = create(str(tmp_path / "p.qcow2"), "64k")
    theirs = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {text} 0 1", img],
                            capture_output=True, text=True, check=False)
    accepted = "wrote 1/1 bytes" in theirs.stdout
    if accepted:
        assert pattern_byte(text) == to_raw(img, str(tmp_path / "p.raw"))[0]
    else:
        assert f"{text} is not a valid pattern byte" in theirs.stdout
        with pytest.raises(ValueError, match="is not a valid pattern byte"):
            pattern_byte(text)


# --------------------------------------------------------------------------- read / write: the end of the disk, streaming


@pytest.mark.parametrize("command,offset,length", [
    ("read", "0", "2M"), ("read", "1M", "1"), ("read", "1048575", "2"), ("read", "2M", "0"), ("read", "5G", "1"),
    ("read", "1M", "0"), ("read", "0", "1M"), ("read", "1048575", "1"),
    ("write", "1M", "512"), ("write", "1048064", "1024"), ("write", "2M", "0"), ("write", "0", "2M"),
    ("write", "1M", "0"), ("write", "1048064", "512"),
])
def test_end_of_disk_as_qemu_io(command: str, offset: str, length: str, tmp_path: Path,
                                capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """Past the end: qemu-io's message (which it prints on stdout) after `qcowdisk: `, and its status."""
    theirs_img = create(str(tmp_path / "q.qcow2"), "1M")
    qemu_io(theirs_img, "write -P 0x11 960k 64k")
    ours_img = str(tmp_path / "o.qcow2")
    Path(ours_img).write_bytes(Path(theirs_img).read_bytes())
    pat = "-P 0x5a " if command == "write" else ""
    theirs = subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"{command} {pat}{offset} {length}", theirs_img],
                            capture_output=True, text=True, check=False)
    extra = ["--pattern", "0x5a", "--length", length] if command == "write" else [length]
    status = cli.main([command, ours_img, offset, *extra])
    out, err = capsysbinary.readouterr()
    assert status == theirs.returncode
    if theirs.returncode:
        assert theirs.stdout == f"{command} failed: Input/output error\n" and theirs.stderr == ""
        assert err.decode() == f"qcowdisk: {theirs.stdout}"
        assert out == b""
    else:
        assert err == b""
        if command == "read":
            assert out == to_raw(theirs_img, str(tmp_path / "q.raw"))[parse_size(offset):][:parse_size(length)]
    compare(theirs_img, ours_img, strict=True)


def test_write_from_a_pipe_past_the_end(tmp_path: Path) -> None:
    """An unknown length (a pipe): the chunks before the one crossing the end are written, then the error."""
    img = create(str(tmp_path / "pipe.qcow2"), "2M")
    data = pattern(MiB + MiB // 2, seed=5)
    p = run_cmd("write", img, "1M", "-", input=data, stdin=None)
    assert p.returncode == 1 and p.stderr == b"qcowdisk: write failed: Input/output error\n"
    guest = to_raw(img, str(tmp_path / "g.raw"))
    assert guest[MiB:] == data[:MiB] and guest[:MiB] == bytes(MiB)
    p = run_cmd("write", img, "512k", "-", input=data[:MiB], stdin=None)
    assert p.returncode == 0 and p.stdout == b"wrote 1048576/1048576 bytes at offset 524288\n"
    assert to_raw(img, str(tmp_path / "g.raw"))[512 << 10:(512 << 10) + MiB] == data[:MiB]
    assert_clean(img)


def _peak_memory(*args: str) -> int:
    """Run cli.main(args) in-process under tracemalloc; return the peak of traced allocations."""
    tracemalloc.start()
    try:
        status = cli.main(list(args))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 0
    return peak


def test_read_and_write_stream_in_bounded_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 64 * MiB
    bound = 8 * MiB  # well below the 64 MiB moved; the whole range in memory would be at least that much
    img = create(str(tmp_path / "big.qcow2"), "80M")
    src = tmp_path / "src.bin"
    with open(src, "wb") as f:
        for i in range(size // MiB):
            f.write(pattern(MiB, seed=i))
    assert _peak_memory("write", "-q", img, "8M", str(src)) < bound
    assert _peak_memory("write", "-q", img, "4M", "--pattern", "0x5a", "--length", "4M") < bound
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(f, write_through=True))
        peak = _peak_memory("read", img, "8M", "64M")
        sys.stdout.flush()
    assert peak < bound
    assert os.path.getsize(out) == size
    with open(src, "rb") as a, open(out, "rb") as b:
        while chunk := a.read(MiB):
            assert b.read(MiB) == chunk
    assert "read 4194304/4194304" in qemu_io(img, "read -P 0x5a 4M 4M")
    assert_clean(img)
    hexout = tmp_path / "hex.txt"
    with open(hexout, "wb") as f:
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(f, write_through=True))
        peak = _peak_memory("read", "--hexdump", img, "7M", "1M")  # (slow under tracemalloc: a smaller range)
        sys.stdout.flush()
    assert peak < MiB  # the text of 1 MiB alone would be 4.3 MB
    with open(hexout, encoding="ascii") as h:
        lines = h.read().splitlines()
    assert len(lines) == MiB // 16
    assert lines[0] == "00700000:  " + " ".join(["5a"] * 16) + "  " + "Z" * 16
    assert lines[-1].startswith("007ffff0:  5a 5a")


def test_read_rss_stays_small_in_a_subprocess(tmp_path: Path) -> None:
    """The same from outside: the process reading 64 MiB to a file grows by far less than that."""
    img = create(str(tmp_path / "rss.qcow2"), "64M")
    qemu_io(img, "write -P 0x77 0 64M")
    code = ("import resource, sys\nfrom qcowdisk import cli\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "status = cli.main(sys.argv[1:])\n"
            "sys.stdout.flush()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, file=sys.stderr)\n"
            "sys.exit(status)\n")
    with open(tmp_path / "out.bin", "wb") as f:
        p = subprocess.run([sys.executable, "-c", code, "read", img, "0", "64M"], stdout=f, stderr=subprocess.PIPE,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    grown_kib = int(p.stderr.decode().split()[-1])
    assert grown_kib < 16 * 1024, grown_kib  # ru_maxrss is in KiB on Linux
    assert os.path.getsize(tmp_path / "out.bin") == 64 * MiB


def test_read_into_a_closed_pipe(tmp_path: Path) -> None:
    """`qcowdisk read ... | head -c1`: status 1, nothing on stderr (no BrokenPipeError traceback)."""
    img = create(str(tmp_path / "pipe.qcow2"), "64M")
    p = subprocess.Popen([sys.executable, "-m", "qcowdisk", "read", img, "0", "64M"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.read(1) == b"\0"
    p.stdout.close()
    err = p.stderr.read()
    p.stderr.close()
    assert p.wait(timeout=60) == 1
    assert err == b""


# --------------------------------------------------------------------------- --confine-to, -U


def test_confine_to_refuses_a_backing_file_outside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top = create(str(tmp_path / "top.qcow2"), "1M", backing="/etc/passwd", backing_fmt="raw")
    with open("/etc/passwd", "rb") as f:
        head = f.read(16)
    d = str(tmp_path)
    for command, rest in (("info", []), ("map", []), ("read", ["0", "16"]),
                          ("write", ["0", "--pattern", "1", "--length", "1"])):
        status, out, err = run_cli(capsys, command, "--confine-to", d, top, *rest)
        assert (status, out) == (1, ""), (command, err)
        assert err.startswith(f"qcowdisk: Could not open '{top}': backing file '/etc/passwd'"), err
        assert f"outside the directory '{d}'" in err and err.count("\n") == 1, err
    p = run_cmd("read", top, "0", "16")  # without it, QEMU's rules: the backing file is read
    assert p.returncode == 0 and p.stdout == head
    assert run_cli(capsys, "info", "--backing-chain", top)[0] == 0
    # create probes (and sizes from) the backing file it is given: confined too
    new = str(tmp_path / "new.qcow2")
    status, _, err = run_cli(capsys, "create", "--confine-to", d, "-b", "/etc/passwd", "-F", "raw", new)
    assert status == 1 and not os.path.exists(new)
    assert err.startswith(f"qcowdisk: {new}: Could not open backing file '/etc/passwd': backing file '/etc/passwd'")
    assert f"outside the directory '{d}'" in err
    # ... and so is the backing file's own chain when the size comes from it
    status, _, err = run_cli(capsys, "create", "--confine-to", d, "-b", top, "-F", "qcow2", new)
    assert status == 1 and not os.path.exists(new) and "'/etc/passwd'" in err
    assert run_cli(capsys, "create", "-q", "-b", "/etc/passwd", "-F", "raw", new)[0] == 0
    ref = str(tmp_path / "ref.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", ref)
    assert info(new)["virtual-size"] == info(ref)["virtual-size"]


def test_confine_to_accepts_a_chain_inside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub").mkdir()
    write_raw(str(tmp_path / "sub" / "base.raw"), pattern(MiB, seed=8))
    mid = create(str(tmp_path / "sub" / "mid.qcow2"), "1M", backing="base.raw", backing_fmt="raw")
    top = str(tmp_path / "top.qcow2")
    d = str(tmp_path)
    status, _, err = run_cli(capsys, "create", "-q", "--confine-to", d, "-b", mid, top)
    assert status == 0, err
    assert cli_info(capsys, top, "--backing-chain", "--confine-to", d) == [shared(i) for i in info(top, "--backing-chain")]
    status, out, _ = run_cli(capsys, "map", "--confine-to", d, "--output=json", top)
    assert status == 0 and json.loads(out) == json.loads(qemu_img("map", "--output=json", top).stdout)
    assert run_cli(capsys, "write", "-q", "--confine-to", d, top, "0", "--pattern", "9", "--length", "512")[0] == 0
    p = run_cmd("read", "--confine-to", d, top, "0", "1M")
    assert p.returncode == 0 and p.stdout == b"\x09" * 512 + pattern(MiB, seed=8)[512:]
    # The image itself may lie outside DIR: only the files it names are confined.
    status, _, err = run_cli(capsys, "info", "--confine-to", str(tmp_path / "sub"), top)
    assert status == 0, err
    # A name inside DIR that is a symlink to a file outside is refused (the check follows symlinks).
    os.symlink("/etc/passwd", tmp_path / "sub" / "link.raw")
    sneaky = create(str(tmp_path / "sneaky.qcow2"), "1M", backing="sub/link.raw", backing_fmt="raw")
    status, _, err = run_cli(capsys, "read", "--confine-to", d, sneaky, "0", "1")
    assert status == 1 and "resolves to '/etc/passwd'" in err and f"outside the directory '{d}'" in err


def test_force_share_reads_an_image_qemu_io_holds(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    img = create(str(tmp_path / "busy.qcow2"), "4M")
    qemu_io(img, "write -P 0x6b 1M 64k")

    def run(*args: str) -> tuple[int, bytes, str]:
        status = cli.main(list(args))
        out, err = capsysbinary.readouterr()
        return status, out, err.decode()

    with qemu_io_holding(img):
        for args in (["info", img], ["map", img], ["read", img, "1M", "16"]):
            status, out, err = run(*args)
            assert (status, out) == (1, b""), args
            assert err.startswith(f"qcowdisk: Could not open '{img}': ") and "lock" in err, err
        status, out, err = run("info", "-U", img)
        assert status == 0, err
        assert out.decode() == qemu_img("info", "-U", img).stdout
        status, out, err = run("map", "--force-share", img)
        assert status == 0, err
        assert out.decode() == qemu_img("map", "-U", img).stdout
        assert run("read", "-U", img, "1M", "16") == (0, b"\x6b" * 16, "")
        status, _, err = run("write", img, "0", "--pattern", "1", "--length", "1")  # no -U for writes
        assert status == 1 and "lock" in err
    assert run("info", img)[0] == 0  # released


# --------------------------------------------------------------------------- quickstart


def test_quickstart_runs(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "stale-file").write_text("removed by the quickstart")
    p = subprocess.run([sys.executable, str(REPO / "tools" / "quickstart.py"), str(demo)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (demo / "stale-file").exists()
    assert "virtual size: 1 GiB" in p.stdout and "backing file format: qcow2" in p.stdout
    assert "No errors were found on the image." in p.stdout
    assert "Images are identical." in p.stdout
    overlay = str(demo / "overlay.qcow2")
    assert_clean(overlay)
    assert_clean(str(demo / "base.qcow2"))
    chain = info(overlay, "--backing-chain")
    assert [i["format"] for i in chain] == ["qcow2", "qcow2"]
    out = qemu_io(overlay, "read -P 0xb5 512M 192k", "read -P 0 256M 64k")
    assert "read 196608/196608" in out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 image, a qcow v1 image, a sparse raw file, a text file and an empty file."""
    d = tmp_path_factory.mktemp("mixed")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow", str(d / "v1.qcow"), "1M")
    with open(d / "r.raw", "wb") as f:
        f.truncate(1 << 20)
    (d / "text.txt").write_text("this is not a disk image\n")
    (d / "empty.img").write_bytes(b"")
    return d


@pytest.mark.parametrize("args", [["r.raw"], ["text.txt"], ["empty.img"], ["--output=json", "text.txt"],
                                  ["v1.qcow"], ["-f", "raw", "a.qcow2"]], ids=" ".join)
def test_info_shows_a_probed_raw_file_as_qemu_img(mixed: Path, args: list[str]) -> None:
    """A file no format claims is shown as raw, as qemu-img info shows it (it used to be refused)."""
    from clirun import qcowdisk_in, qemu_img_in
    expected = qemu_img_in(mixed, "info", args)
    assert expected[0] == 0
    assert qcowdisk_in(mixed, "info", args, as_qemu_img=True) == expected


@pytest.mark.parametrize("command", [["info"], ["map"], ["check"], ["compare", "r.raw"]], ids=lambda c: c[0])
@pytest.mark.parametrize(("fmt", "image"), [("qcow2", "r.raw"), ("qcow", "r.raw"), ("qcow", "a.qcow2"),
                                            ("qcow2", "v1.qcow")])
def test_a_format_the_file_is_not(mixed: Path, command: list[str], fmt: str, image: str) -> None:
    """-f naming a format the file is not: status 1 and qemu-img's message (the first line of it),
    qcowdisk's detail after it; a qcow v1 image named qcow2 once let an internal exception out."""
    from clirun import qcowdisk_in, qemu_img_in
    args = ["-f", fmt, image, *command[1:]]
    status, out, err = qemu_img_in(mixed, command[0], args)
    ours = qcowdisk_in(mixed, command[0], args, as_qemu_img=True)
    assert (ours[0], ours[1]) == (status, out) and status in (1, 2) and out == ""  # (compare fails with 2)
    assert ours[2].startswith(err.splitlines()[0]), (ours[2], err)



@pytest.mark.parametrize("action", [["-l"], ["-c", "s"], ["-a", "s"], ["-d", "s"], []], ids=lambda a: a[0] if a else "none")
@pytest.mark.parametrize("image", [["r.raw"], ["text.txt"], ["empty.img"], ["--image-opts", "driver=raw,file.filename=r.raw"]],
                         ids=lambda i: i[-1])
def test_snapshot_of_a_raw_image(mixed: Path, tmp_path: Path, action: list[str], image: list[str]) -> None:
    """A raw image has no snapshots: -l lists none (status 0), -c/-a/-d fail with QEMU's raw-driver
    messages, after QEMU's warning for a format only probed (twice for -a, as QEMU opens twice)."""
    from clirun import qcowdisk_in, qemu_img_in
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for d in (ours, theirs):
        shutil.copytree(mixed, d)
    expected = qemu_img_in(theirs, "snapshot", [*action, *image])
    assert qcowdisk_in(ours, "snapshot", [*action, *image], as_qemu_img=True) == expected
    assert (ours / "r.raw").read_bytes() == (theirs / "r.raw").read_bytes()
