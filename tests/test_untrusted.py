"""Untrusted images: the files an image names, special files, and broken snapshot tables.

An image is untrusted input, and so are the files it names. Pinned here:

* by default a backing file is followed wherever it points, as QEMU follows it (an image can
  name /etc/passwd and read it back as guest data);
* `confine_to=DIR` refuses, with UnsafeFileError naming the file and the directory, every
  backing or data file that resolves (after symlinks) outside DIR: absolute names, `../`
  names, symlinks, a `DIR-evil` sibling, the bottom of a 3-deep chain, through a qcow v1
  layer; a refused open changes no byte of the image or of the file it named, and leaks no
  descriptor or lock;
* whatever the options, a FIFO, socket, directory or character device (as the image, its
  backing file or its data file) is refused with UnsafeFileError naming it, without blocking;
* a broken snapshot table over an intact active layer: a read-only open reads exactly what
  the active layer holds (per `qemu-img convert`, or the bytes written before the damage when
  QEMU refuses the image), `disk.snapshots` raises InvalidImageError, a read-write open is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import imagepatch as ip
import qcowdisk
from imagefactory import extents_as_qemu_json, kill_writer
from qcowdisk import InvalidImageError, QcowFile, UnsafeFileError
from qcowdisk.qcow1 import Qcow1File
from qemutools import create, info, qemu_img, qemu_io, run, to_raw

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB


# --------------------------------------------------------------------------- helpers

class Blocked(BaseException):
    """Raised by the watchdog when an open blocks (a BaseException, so no `except OSError` eats it)."""


@contextlib.contextmanager
def must_not_block(seconds: float = 5) -> Iterator[None]:
    """Fail (instead of hanging forever) if the block takes longer than `seconds`."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Blocked(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def qemu_map(image: str) -> list[dict[str, Any]]:
    return json.loads(qemu_img("map", "--output=json", image).stdout)


def read_all(path: str, **options: Any) -> bytes:
    with QcowFile.open(path, readonly=True, **options) as disk:
        return disk.read_at(0, len(disk))


def set_data_file_name(image: str, name: str) -> None:
    """Point the data-file name extension of `image` at `name` (bytes patched, no qcowdisk involved)."""
    exts = [(e.ext_type, name.encode() if e.ext_type == ip.EXT_DATA_FILE else e.data)
            for e in ip.read_header(image).extensions]
    assert any(t == ip.EXT_DATA_FILE for t, _ in exts), f"{image} has no data file"
    ip.rewrite_extensions(image, exts)
    assert info(image)["format-specific"]["data"]["data-file"] == name


def drop_backing_format(image: str) -> None:
    """Remove the backing format extension, so the backing file's format must be probed."""
    exts = [(e.ext_type, e.data) for e in ip.read_header(image).extensions if e.ext_type != ip.EXT_BACKING_FORMAT]
    ip.rewrite_extensions(image, exts)
    assert "backing-filename-format" not in info(image)


def expect_unsafe(open_it: Callable[[], Any], *named: str | Path) -> UnsafeFileError:
    """`open_it()` must raise UnsafeFileError (without blocking) whose message names each of `named`."""
    with must_not_block(), pytest.raises(UnsafeFileError) as excinfo:
        open_it()
    msg = str(excinfo.value)
    for name in named:
        assert str(name) in msg, f"{msg!r} does not name {name}"
    return excinfo.value


def write_pattern(path: Path, size: int, seed: int) -> bytes:
    import random
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


# --------------------------------------------------------------------------- the default: followed as QEMU does

@pytest.fixture
def passwd_image(tmp_path: Path) -> tuple[Path, str]:
    confined = tmp_path / "confined"
    confined.mkdir()
    img = create(str(confined / "img.qcow2"), "64k", backing="/etc/passwd", backing_fmt="raw")
    return confined, img


def test_default_reads_whatever_the_backing_name_points_at(passwd_image: tuple[Path, str], tmp_path: Path) -> None:
    """Documented default: no confinement, so an image can read /etc/passwd back as guest data."""
    _, img = passwd_image
    secret = Path("/etc/passwd").read_bytes()
    assert 0 < len(secret) < 64 * KiB
    expected = to_raw(img, str(tmp_path / "img.raw"))
    assert expected[:len(secret)] == secret
    got = read_all(img)
    assert got == expected
    with QcowFile.open(img) as disk:  # read-write opens follow it too
        assert disk.read_at(0, len(secret)) == secret


@pytest.mark.parametrize("readonly", [True, False])
@pytest.mark.parametrize("name", ["/etc/passwd", "file:/etc/passwd"])
def test_confined_absolute_backing_outside(tmp_path: Path, readonly: bool, name: str) -> None:
    confined = tmp_path / "confined"
    confined.mkdir()
    img = create(str(confined / "img.qcow2"), "64k")
    qemu_img("rebase", "-u", "-b", name, "-F", "raw", img)
    assert info(img)["backing-filename"] == name
    before = digest(img)
    fds = fd_count()
    err = expect_unsafe(lambda: QcowFile.open(img, readonly=readonly, confine_to=confined), "/etc/passwd", confined)
    assert "outside" in str(err)
    expect_unsafe(lambda: QcowFile.open(img, readonly=readonly, confine_to=str(confined)), "/etc/passwd")
    assert digest(img) == before
    assert fd_count() == fds
    QcowFile.open(img).close()  # no lock left behind


def test_confined_relative_dotdot_backing(tmp_path: Path) -> None:
    secret = write_pattern(tmp_path / "secret.raw", 64 * KiB, 1)
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True)
    img = create(str(d / "img.qcow2"), "64k", backing="../../secret.raw", backing_fmt="raw")
    assert read_all(img) == secret == to_raw(img, str(tmp_path / "img.raw"))
    expect_unsafe(lambda: QcowFile.open(img, readonly=True, confine_to=d), "../../secret.raw",
                  tmp_path / "secret.raw", d)
    expect_unsafe(lambda: QcowFile.open(img, readonly=True, confine_to=tmp_path / "a"), tmp_path / "a")
    assert read_all(img, confine_to=tmp_path) == secret  # inside a wider directory: fine


def test_confined_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True)
    base = create(str(d / "base.qcow2"), "1M")
    qemu_io(base, "write -P 0x11 0 1M")
    img = create(str(d / "img.qcow2"), "1M", backing="../b/./base.qcow2", backing_fmt="qcow2")
    assert read_all(img, confine_to=d) == b"\x11" * MiB


def test_confined_sibling_with_the_same_prefix_is_outside(tmp_path: Path) -> None:
    """DIR-evil is not inside DIR, though its name starts with DIR's."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf-evil").mkdir()
    base = create(str(tmp_path / "conf-evil" / "base.qcow2"), "1M")
    img = create(str(tmp_path / "conf" / "img.qcow2"), "1M", backing="../conf-evil/base.qcow2", backing_fmt="qcow2")
    assert base
    expect_unsafe(lambda: QcowFile.open(img, readonly=True, confine_to=tmp_path / "conf"),
                  tmp_path / "conf-evil" / "base.qcow2", tmp_path / "conf")


def test_confined_symlink_pointing_outside(tmp_path: Path) -> None:
    d, out = tmp_path / "confined", tmp_path / "outside"
    d.mkdir()
    out.mkdir()
    base = create(str(out / "base.qcow2"), "1M")
    qemu_io(base, "write -P 0x11 0 1M")
    (d / "link.qcow2").symlink_to(out / "base.qcow2")
    img = create(str(d / "img.qcow2"), "1M", backing="link.qcow2", backing_fmt="qcow2")
    assert read_all(img) == b"\x11" * MiB  # default: followed
    expect_unsafe(lambda: QcowFile.open(img, readonly=True, confine_to=d), d / "link.qcow2", out / "base.qcow2", d)
    expect_unsafe(lambda: QcowFile.open(img, confine_to=d), d / "link.qcow2", d)

    # a symlink that stays inside, and DIR given through a symlink, are fine
    (d / "sub").mkdir()
    inner = create(str(d / "sub" / "inner.qcow2"), "1M")
    qemu_io(inner, "write -P 0x22 0 1M")
    (d / "inlink.qcow2").symlink_to(Path("sub") / "inner.qcow2")
    img2 = create(str(d / "img2.qcow2"), "1M", backing="inlink.qcow2", backing_fmt="qcow2")
    (tmp_path / "alias").symlink_to(d)
    assert read_all(img2, confine_to=d) == b"\x22" * MiB
    assert read_all(img2, confine_to=tmp_path / "alias") == b"\x22" * MiB
    expect_unsafe(lambda: QcowFile.open(img, readonly=True, confine_to=tmp_path / "alias"), d / "link.qcow2")


# --------------------------------------------------------------------------- data files

@pytest.fixture(params=["absolute", "relative"])
def data_file_escape(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """DIR/img.qcow2 whose data-file name was patched to an existing file outside DIR
    (named by its absolute path, or as ../outside/victim.raw).

    QEMU 7.2 resolves a relative data-file name against its working directory, qcowdisk against
    the image's directory: the relative case runs from DIR, where the two agree.
    """
    d, out = tmp_path / "confined", tmp_path / "outside"
    d.mkdir()
    out.mkdir()
    img = create(str(d / "img.qcow2"), "1M", options=f"data_file={d / 'data.raw'}")
    qemu_io(img, "write -P 0x44 0 128k", "write -P 0x45 512k 64k")
    victim = out / "victim.raw"
    victim_data = write_pattern(victim, MiB, 7)
    if request.param == "relative":
        monkeypatch.chdir(d)
    set_data_file_name(img, str(victim) if request.param == "absolute" else "../outside/victim.raw")
    return {"dir": d, "img": img, "victim": victim, "victim_data": victim_data}


def test_data_file_outside_is_followed_by_default(data_file_escape: dict[str, Any], tmp_path: Path) -> None:
    img, victim_data = data_file_escape["img"], data_file_escape["victim_data"]
    expected = to_raw(img, str(tmp_path / "img.raw"))  # QEMU follows the patched name
    assert expected[:128 * KiB] != b"\x44" * (128 * KiB)
    assert victim_data[:128 * KiB] in expected
    assert read_all(img) == expected


@pytest.mark.parametrize("state", ["clean", "dirty"])
def test_data_file_outside_is_refused_and_untouched(data_file_escape: dict[str, Any], state: str) -> None:
    d, img, victim = data_file_escape["dir"], data_file_escape["img"], data_file_escape["victim"]
    if state == "dirty":
        # a lazy-refcounts image left dirty: a read-write open would repair it, so nothing may run first
        qemu_img("amend", "-o", "lazy_refcounts=on", img)
        kill_writer(img, "write -P 0x46 256k 64k")
        assert info(img)["format-specific"]["data"].get("corrupt") is False
        assert ip.read_header_field(img, "incompatible_features") & 1, "the dirty bit should be set"
    before_img = digest(img)
    before_victim, victim_mtime = digest(victim), victim.stat().st_mtime_ns
    fds = fd_count()
    for attempt in (lambda: QcowFile.open(img, confine_to=d),
                    lambda: QcowFile.open(img, readonly=False, confine_to=str(d)),
                    lambda: qcowdisk.open(img, "r+b", confine_to=d),
                    lambda: QcowFile.open(img, readonly=True, confine_to=d),
                    lambda: qcowdisk.open(img, confine_to=d),
                    lambda: QcowFile.open(img, readonly=True, backing=False, confine_to=d)):
        expect_unsafe(attempt, victim, d)
    assert digest(victim) == before_victim and victim.stat().st_mtime_ns == victim_mtime
    assert digest(img) == before_img
    assert fd_count() == fds
    QcowFile.open(img, readonly=True).close()


def test_data_file_symlink_outside_is_refused(tmp_path: Path) -> None:
    d, out = tmp_path / "confined", tmp_path / "outside"
    d.mkdir()
    out.mkdir()
    (out / "real.raw").write_bytes(b"")
    (d / "data.raw").symlink_to(out / "real.raw")
    img = create(str(d / "img.qcow2"), "1M", options=f"data_file={d / 'data.raw'}")
    qemu_io(img, "write -P 0x44 0 64k")
    assert read_all(img)[:64 * KiB] == b"\x44" * (64 * KiB)
    expect_unsafe(lambda: QcowFile.open(img, readonly=True, confine_to=d), d / "data.raw", out / "real.raw", d)
    with QcowFile.open(img, readonly=True, confine_to=tmp_path) as disk:
        assert disk.read_at(0, 64 * KiB) == b"\x44" * (64 * KiB)


def test_data_file_inside_is_fine(tmp_path: Path) -> None:
    d = tmp_path / "confined"
    d.mkdir()
    img = create(str(d / "img.qcow2"), "1M", options=f"data_file={d / 'data.raw'}")
    qemu_io(img, "write -P 0x44 0 64k")
    with QcowFile.open(img, confine_to=d) as disk:
        disk.write_at(64 * KiB, b"\x55" * 512)
    expected = to_raw(img, str(tmp_path / "img.raw"))
    assert expected[:64 * KiB + 512] == b"\x44" * (64 * KiB) + b"\x55" * 512
    assert read_all(img, confine_to=d) == expected


# --------------------------------------------------------------------------- chains

@pytest.fixture
def escaping_chain(tmp_path: Path) -> dict[str, Path]:
    """DIR/top.qcow2 -> DIR/mid.qcow2 -> OUT/base.qcow2 (named by its absolute path)."""
    d, out = tmp_path / "confined", tmp_path / "outside"
    d.mkdir()
    out.mkdir()
    base = create(str(out / "base.qcow2"), "1M")
    qemu_io(base, "write -P 0x11 0 1M")
    mid = create(str(d / "mid.qcow2"), "1M", backing=base, backing_fmt="qcow2")
    qemu_io(mid, "write -P 0x22 64k 64k")
    top = create(str(d / "top.qcow2"), "1M", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io(top, "write -P 0x33 128k 64k")
    return {"dir": d, "out": out, "base": Path(base), "mid": Path(mid), "top": Path(top)}


@pytest.mark.parametrize("readonly", [True, False])
def test_chain_of_three_whose_bottom_escapes(escaping_chain: dict[str, Path], tmp_path: Path, readonly: bool) -> None:
    c = escaping_chain
    digests = {k: digest(c[k]) for k in ("top", "mid", "base")}
    fds = fd_count()
    err = expect_unsafe(lambda: QcowFile.open(c["top"], readonly=readonly, confine_to=c["dir"]), c["base"], c["dir"])
    assert str(c["mid"]) in str(err)  # and the image that names it
    assert fd_count() == fds
    assert {k: digest(c[k]) for k in digests} == digests
    for k in ("top", "mid"):  # no lock left on the layers opened before the refusal
        qemu_io(str(c[k]), f"write -P 0x5a {MiB - 512} 512")
    expected = to_raw(str(c["top"]), str(tmp_path / "top.raw"))
    assert expected[:64 * KiB] == b"\x11" * (64 * KiB)
    assert read_all(str(c["top"]), confine_to=tmp_path) == expected


def test_qcow1_layer_keeps_the_chain_confined(escaping_chain: dict[str, Path], tmp_path: Path) -> None:
    c = escaping_chain
    d = c["dir"]
    v1 = create(str(d / "mid.qcow"), "1M", fmt="qcow", backing=str(c["base"]), backing_fmt="qcow2")
    qemu_io(v1, "write -P 0x66 64k 64k", fmt="qcow")
    top = create(str(d / "over-v1.qcow2"), "1M", backing="mid.qcow", backing_fmt="qcow")
    qemu_io(top, "write -P 0x33 128k 64k")
    expected = to_raw(top, str(tmp_path / "top.raw"))
    assert expected[:192 * KiB] == b"\x11" * (64 * KiB) + b"\x66" * (64 * KiB) + b"\x33" * (64 * KiB)
    assert read_all(top) == expected

    fds = fd_count()
    expect_unsafe(lambda: QcowFile.open(top, readonly=True, confine_to=d), c["base"], d)
    expect_unsafe(lambda: QcowFile.open(top, confine_to=d), c["base"], d)
    expect_unsafe(lambda: QcowFile.open(v1, readonly=True, confine_to=d), c["base"], d)  # v1 on top
    expect_unsafe(lambda: Qcow1File.open(v1, confine_to=d), c["base"], d)
    assert fd_count() == fds
    assert read_all(top, confine_to=tmp_path) == expected
    with QcowFile.open(v1, readonly=True, confine_to=tmp_path) as disk:
        assert isinstance(disk, Qcow1File)
        assert disk.read_at(0, 128 * KiB) == b"\x11" * (64 * KiB) + b"\x66" * (64 * KiB)


def test_backing_false_does_not_open_an_escaping_backing_file(escaping_chain: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """backing=False opens no backing file, so there is nothing to confine."""
    c = escaping_chain
    got = read_all(str(c["mid"]), backing=False, confine_to=c["dir"])
    null = "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file", "filename": str(c["mid"])}})
    assert got == to_raw(null, str(tmp_path / "mid.raw"))
    assert got[:64 * KiB] == bytes(64 * KiB) and got[64 * KiB:128 * KiB] == b"\x22" * (64 * KiB)


# --------------------------------------------------------------------------- special files

@pytest.fixture
def specials(tmp_path: Path) -> Iterator[dict[str, str]]:
    """One of each refused kind of file: FIFO (no writer: a plain open would block), unix socket,
    directory, character devices."""
    sdir = tmp_path / "s"
    sdir.mkdir()
    os.mkfifo(sdir / "fifo")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sdir / "sock"))
    (sdir / "dir").mkdir()
    try:
        yield {"fifo": str(sdir / "fifo"), "socket": str(sdir / "sock"), "directory": str(sdir / "dir"),
               "dev-zero": "/dev/zero", "dev-null": "/dev/null"}
    finally:
        sock.close()


KIND_WORDS = {"fifo": "FIFO", "socket": "socket", "directory": "directory",
              "dev-zero": "character device", "dev-null": "character device"}
KINDS = list(KIND_WORDS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["readonly", "readwrite", "stream", "force-share", "qcow1-reader"])
def test_special_file_as_the_image(specials: dict[str, str], kind: str, how: str) -> None:
    path = specials[kind]
    fds = fd_count()
    opener: dict[str, Callable[[], Any]] = {
        "readonly": lambda: QcowFile.open(path, readonly=True),
        "readwrite": lambda: QcowFile.open(path),
        "stream": lambda: qcowdisk.open(path),
        "force-share": lambda: QcowFile.open(path, readonly=True, force_share=True, backing=False),
        "qcow1-reader": lambda: Qcow1File.open(path),
    }
    err = expect_unsafe(opener[how], path)
    assert KIND_WORDS[kind] in str(err)
    assert fd_count() == fds


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["raw", "qcow2", "probed", "under-qcow1", "readwrite-overlay"])
def test_special_file_as_the_backing_file(specials: dict[str, str], tmp_path: Path, kind: str, layout: str) -> None:
    path = specials[kind]
    if layout == "under-qcow1":
        img = str(tmp_path / "img.qcow")  # qemu-img cannot rebase a qcow v1 image: create it unsafe (-u)
        qemu_img("create", "-q", "-f", "qcow", "-u", "-b", path, "-F", "raw", img, "1M")
    else:
        img = create(str(tmp_path / "img.qcow2"), "1M")
        fmt = "qcow2" if layout == "qcow2" else "raw"
        qemu_img("rebase", "-u", "-b", path, "-F", fmt, img)
        if layout == "probed":
            drop_backing_format(img)
    assert info(img)["backing-filename"] == path
    before = digest(img)
    fds = fd_count()
    readonly = layout != "readwrite-overlay"
    err = expect_unsafe(lambda: QcowFile.open(img, readonly=readonly), path)
    assert KIND_WORDS[kind] in str(err)
    # refused for its kind even inside the directory the image is confined to
    inside = tmp_path if path.startswith(str(tmp_path)) else Path("/dev")
    err = expect_unsafe(lambda: QcowFile.open(img, readonly=True, confine_to=inside), path)
    assert KIND_WORDS[kind] in str(err)
    assert fd_count() == fds
    assert digest(img) == before
    # not opened at all without the backing file
    with must_not_block(), QcowFile.open(img, readonly=True, backing=False) as disk:
        assert disk.read_at(0, 4096) == bytes(4096)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("readonly", [True, False])
def test_special_file_as_the_data_file(specials: dict[str, str], tmp_path: Path, kind: str, readonly: bool) -> None:
    path = specials[kind]
    img = create(str(tmp_path / "img.qcow2"), "1M", options=f"data_file={tmp_path / 'data.raw'}")
    qemu_io(img, "write -P 0x44 0 64k")
    set_data_file_name(img, path)
    before = digest(img)
    fds = fd_count()
    err = expect_unsafe(lambda: QcowFile.open(img, readonly=readonly), path)
    assert KIND_WORDS[kind] in str(err)
    expect_unsafe(lambda: QcowFile.open(img, readonly=True, backing=False), path)
    assert fd_count() == fds
    assert digest(img) == before


def test_fifo_refusal_does_not_consume_a_writer(tmp_path: Path) -> None:
    """With a writer on the FIFO, the refusal still comes at once and reads nothing from it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = create(str(tmp_path / "img.qcow2"), "1M")
    qemu_img("rebase", "-u", "-b", str(fifo), "-F", "raw", img)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer open without blocking
    wfd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(wfd, b"guest data from a pipe")
        expect_unsafe(lambda: QcowFile.open(img, readonly=True), fifo)
        assert os.read(rfd, 100) == b"guest data from a pipe"
    finally:
        os.close(wfd)
        os.close(rfd)


# --------------------------------------------------------------------------- broken snapshot tables

@pytest.fixture(scope="module")
def snap_pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two internal snapshots under an active layer that shares some clusters with them."""
    d = tmp_path_factory.mktemp("snap")
    img = create(str(d / "pristine.qcow2"), "4M")
    qemu_io(img, "write -P 0x11 0 128k")
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 0x22 64k 64k")
    qemu_img("snapshot", "-c", "snap2", img)
    qemu_io(img, "write -P 0x33 1M 64k", "write -c -P 0x44 2M 64k")
    raw = to_raw(img, str(d / "pristine.raw"))
    assert raw[:192 * KiB] == b"\x11" * (64 * KiB) + b"\x22" * (64 * KiB) + bytes(64 * KiB)
    return {"img": img, "raw": raw, "map": qemu_map(img)}


def _entry(path: str, i: int) -> ip.SnapshotEntry:
    return ip.snapshot_entries(path)[i]


# Damage QEMU 7.2 itself refuses at open ("Snapshot table offset invalid" / "Snapshot table too
# large"): qcowdisk refuses it too, even read-only, rather than read an image QEMU will not.
QEMU_REFUSES = {"offset-unaligned", "offset-2^63", "nb-snapshots-too-many"}


def _data_cluster_offset(path: str) -> int:
    """Host offset of the cluster holding guest offset 0 (0x11 bytes)."""
    for e in qemu_map(path):
        if e["start"] == 0:
            return int(e["offset"])
    raise AssertionError("guest cluster 0 is not allocated")


SNAPSHOT_DAMAGE: dict[str, Callable[[str], None]] = {
    "offset-past-eof": lambda p: ip.patch_header_field(p, "snapshots_offset", (ip.file_size(p) // CS + 16) * CS),
    "offset-into-data": lambda p: ip.patch_header_field(p, "snapshots_offset", _data_cluster_offset(p)),
    "offset-unaligned": lambda p: ip.patch_header_field(p, "snapshots_offset", ip.read_header(p).snapshots_offset + 512),
    # (found by the fuzz test: pread of an offset past off_t raised OverflowError)
    "offset-2^63": lambda p: ip.patch_header_field(p, "snapshots_offset", 1 << 63),
    "offset-ends-past-int64": lambda p: ip.patch_header_field(p, "snapshots_offset", (1 << 63) - CS),
    "nb-snapshots-one-more": lambda p: ip.patch_header_field(p, "nb_snapshots", 3),
    "nb-snapshots-too-many": lambda p: ip.patch_header_field(p, "nb_snapshots", 65537),
    "entry-l1-size-huge": lambda p: ip.patch_u32(p, _entry(p, 0).field_offset("l1_size"), 0x7FFFFFFF),
    "entry-l1-past-eof": lambda p: ip.patch_u64(p, _entry(p, 1).field_offset("l1_table_offset"), 1 << 40),
    "entry-l1-unaligned": lambda p: ip.patch_u64(p, _entry(p, 0).field_offset("l1_table_offset"),
                                                 _entry(p, 0).fields["l1_table_offset"] + 8),
    "entry-extra-data-huge": lambda p: ip.patch_u32(p, _entry(p, 1).field_offset("extra_data_size"), 0xFFFFFFFF),
    "entry-garbage": lambda p: ip.patch_bytes(p, ip.read_header(p).snapshots_offset, b"\xff" * 80),
}
@pytest.mark.parametrize("damage", list(SNAPSHOT_DAMAGE))
def test_broken_snapshot_table_over_an_intact_active_layer(snap_pristine: dict[str, Any], tmp_path: Path,
                                                          damage: str) -> None:
    img = str(tmp_path / "img.qcow2")
    shutil.copy(snap_pristine["img"], img)
    SNAPSHOT_DAMAGE[damage](img)
    expected = snap_pristine["raw"]
    q = run("qemu-img", "convert", "-O", "raw", img, str(tmp_path / "img.raw"), check=False)
    if damage in QEMU_REFUSES:
        assert q.returncode != 0 and "Snapshot table" in q.stderr, q.stderr
        with pytest.raises(InvalidImageError, match="Snapshot table"):
            QcowFile.open(img, readonly=True)
        return
    if q.returncode == 0:  # QEMU reads it: it is the oracle (and agrees with the bytes written)
        expected = (tmp_path / "img.raw").read_bytes()
        assert expected == snap_pristine["raw"]
    before = digest(img)

    with QcowFile.open(img, readonly=True) as disk:
        assert disk.read_at(0, len(disk)) == expected
        assert disk.read_at(64 * KiB + 100, 10) == b"\x22" * 10
        assert extents_as_qemu_json(disk.block_status()) == snap_pristine["map"]
        for _ in range(2):
            with pytest.raises(InvalidImageError, match=r"(?i)snapshot"):
                _ = disk.snapshots
    with qcowdisk.open(img) as f:
        assert f.read() == expected
    with pytest.raises(InvalidImageError, match=r"(?i)snapshot"):
        QcowFile.open(img)
    with pytest.raises(InvalidImageError, match=r"(?i)snapshot"):
        qcowdisk.open(img, "r+b")
    assert digest(img) == before


def test_broken_snapshot_table_in_a_backing_file(snap_pristine: dict[str, Any], tmp_path: Path) -> None:
    """A backing file is opened read-only, so a broken snapshot table there does not stop a writer above it."""
    base = str(tmp_path / "base.qcow2")
    shutil.copy(snap_pristine["img"], base)
    top = create(str(tmp_path / "top.qcow2"), "4M", backing="base.qcow2", backing_fmt="qcow2")
    SNAPSHOT_DAMAGE["entry-garbage"](base)
    base_before = digest(base)
    with QcowFile.open(top) as disk:
        assert disk.read_at(0, len(disk)) == snap_pristine["raw"]
        disk.write_at(64 * KiB + 512, b"\x55" * 512)  # copy-on-write reads the backing file
    with QcowFile.open(top, readonly=True) as disk:
        got = disk.read_at(0, 192 * KiB)
    assert got == b"\x11" * (64 * KiB) + b"\x22" * 512 + b"\x55" * 512 + b"\x22" * (63 * KiB) + bytes(64 * KiB)
    assert digest(base) == base_before


def test_intact_snapshot_table_still_lists(snap_pristine: dict[str, Any], tmp_path: Path) -> None:
    """Control for the damage cases: the pristine image lists its snapshots and opens read-write."""
    img = str(tmp_path / "img.qcow2")
    shutil.copy(snap_pristine["img"], img)
    with QcowFile.open(img, readonly=True) as disk:
        assert [s.name for s in disk.snapshots] == ["snap1", "snap2"]
    with QcowFile.open(img) as disk:
        assert [s.name for s in disk.snapshots] == ["snap1", "snap2"]
        assert disk.read_at(0, len(disk)) == snap_pristine["raw"]


@pytest.mark.parametrize("offset", [1 << 63, (1 << 63) - CS, (1 << 64) - CS])
def test_check_of_a_snapshot_table_offset_past_int64(snap_pristine: dict[str, Any], tmp_path: Path,
                                                     offset: int) -> None:
    """qemu-img check reports the offset as invalid and fails (exit 1); so does qcowdisk's,
    where an OverflowError from pread escaped before."""
    img = str(tmp_path / "img.qcow2")
    shutil.copy(snap_pristine["img"], img)
    ip.patch_header_field(img, "snapshots_offset", offset)
    q = run("qemu-img", "check", img, check=False)
    ours = run(sys.executable, "-m", "qcowdisk", "check", img, check=False)
    assert (ours.returncode, ours.stdout) == (q.returncode, q.stdout)
    assert ours.stderr == q.stderr.replace("qemu-img:", "qcowdisk:")
    for args in (["info"], ["info", "--output=json"], ["map"]):
        q = run("qemu-img", *args, img, check=False)
        ours = run(sys.executable, "-m", "qcowdisk", *args, img, check=False)
        assert ours.returncode == q.returncode == 1
        assert ours.stderr.startswith("qcowdisk: ") and "Traceback" not in ours.stderr
