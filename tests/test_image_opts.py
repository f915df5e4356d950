"""`--image-opts`, `--target-image-opts` and `--object` against qemu-img 7.2 on the same inputs.

Each case runs qemu-img and qcowdisk with the same words in the same directory and compares
exit status, stdout and stderr (and, for commands that write, the resulting images).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clirun import qcowdisk_in, qemu_img_in, same_as_qemu_img
from qcowdisk.ops.imageopts import qdict_order, split
from qemutools import qemu_img, qemu_io

OPTS = "driver=qcow2,file.filename=a.qcow2"
WOPTS = "driver=qcow2,file.filename=w.qcow2"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.qcow2 over b.qcow2 (both with data), r.raw, and a pristine overlay pair to copy for writers."""
    d = tmp_path_factory.mktemp("imageopts")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "b.qcow2"), "1M")
    qemu_io(str(d / "b.qcow2"), "write -P 3 0 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(d / "a.qcow2"))
    qemu_io(str(d / "a.qcow2"), "write -P 5 128k 64k")
    qemu_img("convert", "-O", "raw", str(d / "a.qcow2"), str(d / "r.raw"))
    return d


READ_CASES = [
    OPTS, "file.filename=a.qcow2", "a.qcow2", "filename=a.qcow2", "", ",driver=qcow2", "driver=qcow2",
    f"{OPTS},foo=1", f"{OPTS},file.foo=1", f"{OPTS},foo=1,bar=2", f"{OPTS},file.foo=1,bar=2", f"{OPTS},foo=1,l2-cache-size=x",
    f"{OPTS},l2-cache-size=xyz", f"{OPTS},l2-cache-size=-1", f"{OPTS},l2-cache-size=0x1k", f"{OPTS},l2-cache-entry-size=3",
    f"{OPTS},l2-cache-size=1M,cache-size=512k", f"{OPTS},l2-cache-size=1M,cache-size=2M,refcount-cache-size=1M",
    f"{OPTS},refcount-cache-size=3M,cache-size=2M", f"{OPTS},l2-cache-size=1M,l2-cache-size=2M",
    f"{OPTS},l2-cache-size=4k,l2-cache-entry-size=1k", "driver=foo,file.filename=a.qcow2",
    "driver=qcow2,file.driver=nope,file.filename=a.qcow2", f"{OPTS},,x", f"{OPTS},,x=1", "driver=qcow2,file.filename=nope",
    f"{OPTS},backing=", f"{OPTS},backing=null", f"{OPTS},backing=foo", f"{OPTS},force-share", f"{OPTS},nofoo",
    f"{OPTS},force-share=on,read-only=off", f"{OPTS},read-only=on", f"{OPTS},read-only=off", f"{OPTS},id=0x", f"{OPTS},id=foo",
    f"{OPTS},file.locking=off", f"{OPTS},file.locking=xx", f"{OPTS},file.aio=threads,file.aio=xx", f"{OPTS},file.aio=native",
    f"{OPTS},file.aio=native,cache.direct=on", f"{OPTS},file.aio-max-batch=x", f"{OPTS},discard=xx", f"{OPTS},discard=unmap",
    f"{OPTS},detect-zeroes=xx", f"{OPTS},cache.direct=xx", f"{OPTS},cache.direct=on", f"{OPTS},overlap-check=xx",
    f"{OPTS},overlap-check=all,pass-discard-other=on", f"{OPTS},cache-clean-interval=xx", f"{OPTS},lazy-refcounts=xx",
    f"{OPTS},node-name=0x", f"{OPTS},node-name=x,,y", f"{OPTS},node-name=n1,auto-read-only=on,cache.no-flush=on",
    "file.driver=file,file.filename=a.qcow2,driver=qcow2", f"{OPTS},file.filename=b.qcow2",
    "driver=qcow2,file.driver=host_device,file.filename=a.qcow2",
]


@pytest.mark.parametrize("command", [["info"], ["map", "--output=json"], ["check", "--output=json"],
                                     ["measure", "-O", "qcow2"], ["compare"]])
@pytest.mark.parametrize("spec", READ_CASES)
def test_read_commands(d: Path, command: list[str], spec: str) -> None:
    """Every subcommand that reads an image takes --image-opts as qemu-img does: its output, its
    refusals (message, exit status) and its warnings."""
    operands = [spec, OPTS] if command == ["compare"] else [spec]
    same_as_qemu_img(d, command[0], [*command[1:], "--image-opts", *operands])


@pytest.mark.parametrize("args", [
    ["info", "-f", "qcow2", "--image-opts", OPTS], ["compare", "-f", "qcow2", "--image-opts", OPTS, OPTS],
    ["map", "-U", "--image-opts", f"{OPTS},force-share=off"], ["info", "-U", "--image-opts", f"{OPTS},force-share=yes"],
    ["info", "-U", "--image-opts", f"{OPTS},force-share=on"], ["compare", "--image-opts", OPTS, "b.qcow2"],
    ["compare", "--image-opts", f"{OPTS},backing=", "driver=qcow2,file.filename=b.qcow2"],
    ["measure", "-O", "qcow2", "--size", "1M", "--image-opts"], ["check", "-r", "all", "--image-opts", f"{OPTS},read-only=on"],
    ["check", "-r", "leaks", "--image-opts", f"{OPTS},force-share=on"], ["map", "--image-opts", "driver=raw,file.filename=r.raw"],
    ["compare", "--image-opts", "driver=raw,file.filename=r.raw", OPTS],
])
def test_read_command_combinations(d: Path, args: list[str]) -> None:
    """-f with --image-opts, -U against force-share, a plain name among option strings, raw."""
    same_as_qemu_img(d, args[0], args[1:])


def _pair(where: Path) -> None:
    """w.qcow2 (data at 0) over wb.qcow2, and an empty t.qcow2, fresh in `where`."""
    where.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(where / "wb.qcow2"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "wb.qcow2", "-F", "qcow2", str(where / "w.qcow2"))
    qemu_io(str(where / "w.qcow2"), "write -P 9 0 4k")
    qemu_img("create", "-q", "-f", "qcow2", str(where / "t.qcow2"), "1M")


@pytest.mark.parametrize("args", [
    ["commit", "--image-opts", WOPTS], ["commit", "--image-opts", f"{WOPTS},foo=1"],
    ["commit", "-f", "qcow2", "--image-opts", WOPTS],
    ["commit", "--image-opts", f"{WOPTS},read-only=on"], ["commit", "--image-opts", f"{WOPTS},force-share=on"],
    ["rebase", "-u", "-b", "", "--image-opts", WOPTS], ["rebase", "-b", "", "--image-opts", WOPTS],
    ["rebase", "-b", "", "--image-opts", f"{WOPTS},l2-cache-size=x"],
    ["amend", "-o", "lazy_refcounts=on", "--image-opts", WOPTS],
    ["amend", "-o", "lazy_refcounts=on", "--image-opts", f"{WOPTS},nofoo"],
    ["amend", "-o", "lazy_refcounts=on", "--image-opts", "-f", "qcow2", WOPTS],
    ["resize", "--image-opts", WOPTS, "2M"], ["resize", "--image-opts", f"{WOPTS},read-only=on", "2M"],
    ["resize", "--image-opts", f"{WOPTS},foo", "2M"], ["resize", "--image-opts", "w.qcow2", "2M"],
    ["snapshot", "-c", "s1", "--image-opts", WOPTS], ["snapshot", "-l", "--image-opts", WOPTS],
    ["snapshot", "-l", "-U", "--image-opts", f"{WOPTS},force-share=off"],
    ["snapshot", "-c", "s1", "--image-opts", f"{WOPTS},force-share=on"],
    ["convert", "--image-opts", "-O", "qcow2", WOPTS, "t.qcow2"],
    ["convert", "--image-opts", "-O", "qcow2", "w.qcow2", "t.qcow2"],
    ["convert", "-n", "--target-image-opts", "w.qcow2", "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "-n", "--target-image-opts", "w.qcow2", "file.filename=t.qcow2"],
    ["convert", "-n", "--target-image-opts", "-O", "qcow2", "w.qcow2", "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "--target-image-opts", "w.qcow2", "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "-n", "--target-image-opts", "w.qcow2", "driver=qcow2,file.filename=t.qcow2,foo=1"],
    ["convert", "-n", "--target-image-opts", "w.qcow2", "driver=qcow2,file.filename=t.qcow2,read-only=on"],
    ["convert", "-n", "--image-opts", "--target-image-opts", WOPTS, "driver=qcow2,file.filename=t.qcow2,force-share=on"],
])
def test_write_commands(tmp_path: Path, args: list[str]) -> None:
    """Subcommands that write take --image-opts (convert also --target-image-opts) as qemu-img
    does: same messages and status, and images that compare equal afterwards."""
    _pair(tmp_path / "q")
    _pair(tmp_path / "o")
    expected = qemu_img_in(tmp_path / "q", args[0], args[1:])
    assert qcowdisk_in(tmp_path / "o", args[0], args[1:], as_qemu_img=True) == expected
    for name in ("w.qcow2", "wb.qcow2", "t.qcow2"):
        qemu_img("compare", "-q", str(tmp_path / "q" / name), str(tmp_path / "o" / name))
    snapshots = [qemu_img("snapshot", "-l", str(tmp_path / side / "w.qcow2")).stdout.count("\n") for side in "qo"]
    assert snapshots[0] == snapshots[1]


def test_direct_io_from_image_opts(d: Path, tmp_path: Path) -> None:
    """cache.direct=on in the options opens the image with O_DIRECT (as QEMU does), same output."""
    import os

    from qcowdisk import hostio
    seen: list[str] = []
    real = hostio.open_regular

    def spy(path: str, writable: bool, extra_flags: int = 0) -> int:
        if extra_flags & os.O_DIRECT:
            seen.append(path)
        return real(path, writable, extra_flags)

    hostio.open_regular = spy  # type: ignore[assignment]
    try:
        same_as_qemu_img(d, "map", ["--output=json", "--image-opts", f"{OPTS},cache.direct=on"])
    finally:
        hostio.open_regular = real  # type: ignore[assignment]
    assert "a.qcow2" in seen


def test_qemuopts_splitting() -> None:
    """QemuOpts' reading: `,,` escapes, an implied first `file`, bare flags; QDict's hash order."""
    warned: list[str] = []
    assert split("a.qcow2,x=1,,2,flag,noother", warned) == {"file": "a.qcow2", "x": "1,2", "flag": "on",
                                                              "other": "off"}
    assert warned == ["short-form boolean option 'flag' deprecated\nPlease use flag=on instead",
                      "short-form boolean option 'noother' deprecated\nPlease use other=off instead"]
    assert qdict_order(["foo", "bar"]) == ["bar", "foo"]  # qemu-img names 'bar' for foo=1,bar=2


OBJECT_CASES = [
    "secret,id=sec0,data=abc", "secret,id=sec0", "secret,data=abc", "secret,id=sec0,data=abc,file=/etc/hostname",
    "secret,id=sec0,file=/nonexistent", "secret,id=sec0,file=/tmp", "secret,id=sec0,file=/etc/hostname",
    "secret,id=sec0,data=abc,format=base64", "secret,id=sec0,data=YWJj,format=base64",
    "secret,id=s,data=a$b,format=base64", "secret,id=sec0,data=abc,format=xx", "secret,id=sec0,data=abc,foo=1",
    "secret,id=s,foo=1,bar=1", "secret,id=s,data=a,foo=1,format=xx", "secret,foo=1", "secret,id=s,foo.x=1",
    "secret,id=sec0,data.x=abc", "secret,id=s,data=abc,data.x=1", "secret,id=s,x y=1", "secret,id=s,,data=1",
    "foo,id=x", "id=x", "", "secret_sec0", "can-bus,id=x", "secret,id=0bad,data=abc", "secret,id=,data=x",
    "secret,id=sec0,data=abc,data=def", "secret,id=sec0,data=abc,,d", "secret,id=sec0,data", "secret,id=sec0,data=abc,",
    "qom-type=secret,id=sec0,data=abc", "secret,qom-type=secret,id=sec0,data=abc", "secret,id=sec0,data=abc,loaded=on",
    "secret,id=s,data=abc,keyid=k", "secret,id=s,data=abc,id=t", "help", "secret,help", "secret,id=s,data=abc,help",
    "secret,help=1",
]


@pytest.mark.parametrize("objdef", OBJECT_CASES)
def test_object(d: Path, objdef: str) -> None:
    """--object: qemu-img's syntax, checks, messages and exit status for secrets; other types refused."""
    expected = qemu_img_in(d, "info", ["--object", objdef, "a.qcow2"])
    got = qcowdisk_in(d, "info", ["--object", objdef, "a.qcow2"], as_qemu_img=True)
    if objdef.startswith("can-bus"):  # a type qemu-img knows: qcowdisk refuses it, in its own words
        assert got[0] == expected[0] == 1
        assert got[2] == "qemu-img: qemu-img does not support objects of type 'can-bus'\n"
    else:
        assert got == expected


KEY = "abcdefghijklmnopqrstuvwxyz012345"
IV = "YWJjZGVmZ2hpamtsbW5vcA=="


@pytest.mark.parametrize("objects", [
    [f"secret,id=k,data={KEY}", "secret,id=s,data=abc,keyid=k"],
    ["secret,id=k,data=abc", "secret,id=s,data=abc,keyid=k"],
    [f"secret,id=k,data={KEY}", "secret,id=s,data=abc,keyid=k,iv=x"],
    [f"secret,id=k,data={KEY}", f"secret,id=s,data=abc,keyid=k,iv={IV}"],
    [f"secret,id=k,data={KEY}", "secret,id=s,data=abc,keyid=nokey,iv=x"],
    ["secret,id=sec0,data=abc", "secret,id=sec0,data=abc"],
])
def test_object_secret_chain(d: Path, objects: list[str]) -> None:
    """Encrypted secrets: the key's id, length, the IV, the ciphertext's length; duplicate ids."""
    args = [w for o in objects for w in ("--object", o)]
    for command, rest in (("info", ["a.qcow2"]), ("compare", ["a.qcow2", "a.qcow2"]),
                          ("resize", ["r.raw", "+0"]), ("amend", ["-o", "help", "a.qcow2"])):
        same_as_qemu_img(d, command, [*args, *rest])


@pytest.mark.parametrize("command", [["create", "-f", "qcow2"], ["check"], ["map"], ["measure", "-O", "qcow2"],
                                     ["snapshot", "-l"],
                                     ["compare"], ["commit"], ["rebase", "-u", "-b", ""], ["convert", "-n", "-O", "qcow2"]])
def test_object_on_every_command(d: Path, tmp_path: Path, command: list[str]) -> None:
    """Every subcommand qemu-img gives --object takes it, and refuses a bad one before anything else."""
    for objdef in ("secret,id=sec0", "secret,id=sec0,data=x"):
        work = tmp_path / objdef.replace(",", "_").replace("=", "-")
        shutil.copytree(d, work)
        operands = {"compare": ["a.qcow2", "b.qcow2"], "convert": ["a.qcow2", "t.qcow2"],
                    "create": ["n.qcow2", "1M"]}.get(command[0], ["a.qcow2"])
        qemu_img("create", "-q", "-f", "qcow2", str(work / "t.qcow2"), "1M")
        args = [*command[1:], "--object", objdef, *operands]
        expected = qemu_img_in(work, command[0], args)
        (work / "n.qcow2").unlink(missing_ok=True)  # (qcowdisk create refuses to overwrite a file)
        assert qcowdisk_in(work, command[0], args, as_qemu_img=True) == expected


# raw's offset= and size=: a window on the file. (An offset that is not a multiple of 512 with
# no size makes qemu-img 7.2 abort or hang in map, compare and measure: not compared.)
RAW_WINDOWS = [
    "driver=raw,offset=64k,size=512k,file.filename=r.raw", "driver=raw,offset=64k,file.filename=r.raw",
    "driver=raw,offset=1000,size=512k,file.filename=r.raw", "offset=128k,size=64k,file.filename=r.raw",
    "driver=raw,offset=2M,file.filename=r.raw", "driver=raw,offset=512k,size=1M,file.filename=r.raw",
    "driver=raw,size=1000,file.filename=r.raw", "driver=raw,offset=1M,file.filename=r.raw",
    "driver=raw,size=0,file.filename=r.raw", "driver=raw,offset=-1,file.filename=r.raw",
    "driver=raw,offset=x,file.filename=r.raw", "driver=raw,offset=64k,file.filename=a.qcow2",
    "driver=raw,file.filename=a.qcow2", "offset=64k,file.filename=a.qcow2",
    "driver=raw,offset=64k,size=128k,file.driver=file,file.filename=r.raw,file.locking=off",
]


@pytest.mark.parametrize("command", [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"],
                                     ["check"], ["measure", "-O", "qcow2"], ["measure", "--output=json"],
                                     ["compare"]])
@pytest.mark.parametrize("spec", RAW_WINDOWS)
def test_raw_window(d: Path, command: list[str], spec: str) -> None:
    """A raw window reads as QEMU's raw driver shows it (info names it by QEMU's json: name);
    QEMU's checks of offset and size, with its messages."""
    operands = [spec, "driver=raw,offset=64k,size=512k,file.filename=r.raw"] if command == ["compare"] else [spec]
    args = [*command[1:], "--image-opts", *operands]
    same_as_qemu_img(d, command[0], args)


@pytest.mark.parametrize("args", [["info", "-f", "raw", "r.raw"], ["info", "-f", "raw", "a.qcow2"],
                                  ["info", "--output=json", "-f", "raw", "a.qcow2"]])
def test_info_as_raw(d: Path, args: list[str]) -> None:
    """qemu-img info shows any file as raw when told to."""
    same_as_qemu_img(d, args[0], args[1:])


BACKING_CASES = [
    "backing.driver=qcow2,backing.file.filename=b.qcow2", "backing.file.filename=r.raw,backing.driver=raw",
    "backing.driver=raw", "backing.driver=raw,backing.offset=64k,backing.file.filename=r.raw",
    "backing.driver=raw,backing.size=1000", "backing.file.filename=nope", "backing.foo=1", "backing.backing=",
    "backing.l2-cache-size=x", "backing.l2-cache-size=1k", "backing=,backing.driver=qcow2", "backing.file=foo",
    "backing.backing.driver=qcow2", "foo=1,backing.foo=1", "backing.driver=vmdk2",
    "backing.cache-size=1E,backing.refcount-cache-size=0", "backing.file.driver=nope",
    "backing.driver=qcow2,backing.file.filename=b.qcow2,backing.backing=",
    "cache-size=1E,refcount-cache-size=0", "refcount-cache-size=1E", "cache-size=1M", "cache-size=100",
    "cache-size=64k,l2-cache-size=32k", "cache-size=64k,refcount-cache-size=32k", "cache-size=1E,l2-cache-size=1k",
    "refcount-cache-size=xx",
]


@pytest.mark.parametrize("command", [["info"], ["map", "--output=json"], ["check"], ["measure", "-O", "qcow2"],
                                     ["compare"]])
@pytest.mark.parametrize("extra", BACKING_CASES)
def test_backing_and_cache_options(d: Path, command: list[str], extra: str) -> None:
    """backing.* open the backing file as QEMU opens it (another file or format, its own
    options, its own backing file or none); cache-size and refcount-cache-size as QEMU checks
    and shares them."""
    spec = f"{OPTS},{extra}"
    operands = [spec, OPTS] if command == ["compare"] else [spec]
    same_as_qemu_img(d, command[0], [*command[1:], "--image-opts", *operands])


RAWT = "driver=raw,file.filename=t.raw"


@pytest.mark.parametrize("args", [
    ["convert", "-n", "--target-image-opts", "w.qcow2", f"{RAWT},offset=64k,size=512k"],
    ["convert", "-n", "--image-opts", "--target-image-opts", "driver=raw,offset=64k,size=512k,file.filename=r.raw",
     f"{RAWT},offset=64k"],
    ["convert", "-n", "--image-opts", "--target-image-opts", "driver=raw,offset=64k,size=512k,file.filename=r.raw",
     f"{RAWT},offset=512k,size=512k"],
    ["convert", "-n", "--target-image-opts", "r.raw", f"{RAWT},offset=2M"],
    ["convert", "-n", "--target-image-opts", "r.raw", f"{RAWT},size=1000"],
    ["convert", "--image-opts", "-O", "qcow2", "driver=raw,offset=2M,file.filename=r.raw", "n.qcow2"],
    ["convert", "--image-opts", "-O", "qcow2", "driver=raw,offset=64k,size=512k,file.filename=r.raw", "n.qcow2"],
    ["convert", "--image-opts", "-O", "raw", "driver=raw,offset=4k,size=512k,file.filename=r.raw", "n.raw"],
    ["convert", "--image-opts", "-O", "qcow2", f"{WOPTS},backing=", "n.qcow2"],
    ["convert", "--image-opts", "-O", "qcow2", f"{WOPTS},backing.driver=raw,backing.offset=4k,backing.file.filename=r.raw",
     "n.qcow2"],
    ["convert", "--image-opts", "-O", "qcow2", f"{WOPTS},cache-size=1E,refcount-cache-size=0", "n.qcow2"],
    ["convert", "--image-opts", "-O", "qcow2", f"{WOPTS},cache-size=1M", "n.qcow2"],
    ["convert", "-n", "--target-image-opts", "w.qcow2", "driver=qcow2,file.filename=t.qcow2,refcount-cache-size=1E"],
    ["convert", "-n", "--target-image-opts", "w.qcow2", "driver=qcow2,file.filename=t.qcow2,l2-cache-entry-size=1M"],
    ["convert", "-n", "--target-image-opts", "w.qcow2", "driver=qcow2,file.filename=t.qcow2,l2-cache-size=1k"],
    *[[*cmd, "--image-opts", f"{WOPTS},{extra}"]
      for cmd in (["commit"], ["commit", "-d"], ["rebase", "-b", ""], ["rebase", "-u", "-b", ""],
                  ["rebase", "-b", "t.qcow2", "-F", "qcow2"])
      for extra in ("backing=", "backing.driver=qcow2", "backing.file.filename=t.qcow2", "backing.driver=raw",
                    "l2-cache-size=1k", "cache-size=1M", "cache-size=1E,refcount-cache-size=0",
                    "backing.l2-cache-size=x")],
    *[[*cmd, "--image-opts", f"{WOPTS},{extra}", *rest]
      for cmd, rest in ((["resize"], ["2M"]), (["amend", "-o", "lazy_refcounts=on"], []), (["snapshot", "-l"], []),
                        (["snapshot", "-c", "s1"], []), (["bitmap", "--add"], ["b0"]))
      for extra in ("backing.driver=raw", "backing.file.filename=t.qcow2", "backing.foo=1", "backing=foo",
                    "cache-size=1E,refcount-cache-size=0", "l2-cache-entry-size=1M", "cache-size=1M")],
])
def test_window_backing_and_cache_writers(tmp_path: Path, args: list[str]) -> None:
    """convert into and out of raw windows, and commit, rebase and convert with backing.*,
    backing= and cache sizes: same messages and status as qemu-img, and images that compare equal."""
    for side in "qo":
        _pair(tmp_path / side)
        qemu_img("create", "-q", "-f", "raw", str(tmp_path / side / "t.raw"), "1M")
        qemu_img("convert", "-O", "raw", str(tmp_path / side / "w.qcow2"), str(tmp_path / side / "r.raw"))
        qemu_io(str(tmp_path / side / "r.raw"), "write -P 7 64k 64k", fmt="raw")
    expected = qemu_img_in(tmp_path / "q", args[0], args[1:])
    assert qcowdisk_in(tmp_path / "o", args[0], args[1:], as_qemu_img=True) == expected
    for name in ("w.qcow2", "wb.qcow2", "t.qcow2", "n.qcow2"):  # each layer alone
        if (tmp_path / "q" / name).exists():
            alone = [f"driver=qcow2,file.filename={tmp_path / side / name},backing=" for side in "qo"]
            if qemu_img("compare", "--image-opts", *alone, check=False).returncode == 2:  # (written as raw)
                alone = [f"driver=raw,file.filename={tmp_path / side / name}" for side in "qo"]
            qemu_img("compare", "-q", "--image-opts", *alone)
    for name in ("t.raw", "n.raw"):
        if (tmp_path / "q" / name).exists():
            assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "o" / name).read_bytes()


@pytest.fixture(scope="module")
def dd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x.qcow2 with its data in d.raw (data at 0), d2.raw a copy with other data, a.qcow2 without."""
    d = tmp_path_factory.mktemp("datafile")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={d / 'd.raw'}", str(d / "x.qcow2"), "1M")
    qemu_io(str(d / "x.qcow2"), "write -P 6 0 64k")
    shutil.copy(d / "d.raw", d / "d2.raw")
    qemu_io(str(d / "d2.raw"), "write -P 9 0 64k", fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "1M")
    return d


XOPTS = "driver=qcow2,file.filename=x.qcow2"
DATA_FILE_CASES = [
    "data-file.filename=d2.raw", "data-file.driver=file,data-file.filename=d2.raw",
    "data-file.driver=raw,data-file.file.filename=d2.raw", "data-file.file.filename=d2.raw",
    "data-file.locking=off,data-file.filename=d2.raw", "data-file.filename=nope", "data-file.foo=1",
    "data-file=foo", "data-file.driver=file", "data-file.driver=qcow2",
    "data-file.driver=file,data-file.filename=d2.raw,data-file.bar=1",
    "data-file.driver=raw,data-file.file.filename=d2.raw,data-file.zz=1", "data-file.driver=raw,data-file.filename=d2.raw",
]


@pytest.mark.parametrize("command", [["info"], ["map", "--output=json"], ["check"], ["measure", "-O", "qcow2"],
                                     ["compare"]])
@pytest.mark.parametrize("extra", DATA_FILE_CASES)
def test_data_file_options(dd: Path, command: list[str], extra: str) -> None:
    """data-file.* reads the guest data from another file, as QEMU's data-file child does
    (qemu-img info opens no data file: it ignores them); QEMU's checks and messages."""
    spec = f"{XOPTS},{extra}"
    operands = [spec, "driver=raw,file.filename=d2.raw"] if command == ["compare"] else [spec]
    same_as_qemu_img(dd, command[0], [*command[1:], "--image-opts", *operands])


@pytest.mark.parametrize("spec", ["driver=qcow2,file.filename=a.qcow2,data-file.filename=d2.raw",
                                  "driver=raw,file.filename=d.raw,data-file.filename=d2.raw"])
def test_data_file_needs_one(dd: Path, spec: str) -> None:
    """data-file.* on an image without an external data file (or not qcow2): QEMU's refusal."""
    same_as_qemu_img(dd, "map", ["--image-opts", spec])


@pytest.mark.parametrize("args", [
    ["convert", "-O", "qcow2", "--image-opts", f"{XOPTS},data-file.filename=d2.raw", "n.qcow2"],
    ["convert", "-n", "--target-image-opts", "a.qcow2", f"{XOPTS},data-file.filename=d2.raw"],
    ["resize", "--image-opts", f"{XOPTS},data-file.filename=d2.raw", "2M"],
    ["check", "-r", "all", "--image-opts", f"{XOPTS},data-file.filename=d2.raw"],
    *[[*cmd, "--image-opts", f"{XOPTS},{extra}", *rest]
      for cmd, rest in ((["bitmap", "--add"], ["b0"]), (["snapshot", "-l"], []), (["rebase", "-u", "-b", ""], []),
                        (["amend", "-o", "lazy_refcounts=on"], []))
      for extra in ("data-file.filename=nope", "data-file.foo=1", "data-file.filename=d2.raw")],
])
def test_data_file_writers(dd: Path, tmp_path: Path, args: list[str]) -> None:
    """Commands that write honour data-file.*: same output, and the same bytes in each file."""
    for side in "qo":
        shutil.copytree(dd, tmp_path / side)
    expected = qemu_img_in(tmp_path / "q", args[0], args[1:])
    assert qcowdisk_in(tmp_path / "o", args[0], args[1:], as_qemu_img=True) == expected
    for name in ("d.raw", "d2.raw"):
        assert (tmp_path / "q" / name).read_bytes() == (tmp_path / "o" / name).read_bytes()
    # (QEMU 7.2 opens a data file by its name from the working directory: named explicitly)
    qemu_img("compare", "-q", "--image-opts", *[f"driver=qcow2,file.filename={tmp_path / side / 'x.qcow2'},"
                                                f"data-file.filename={tmp_path / side / 'd2.raw'}" for side in "qo"])
    if (tmp_path / "q" / "n.qcow2").exists():
        qemu_img("compare", "-q", str(tmp_path / "q" / "n.qcow2"), str(tmp_path / "o" / "n.qcow2"))


def test_cache_size_shared_as_qemu_shares_it(tmp_path: Path) -> None:
    """read_cache_sizes: cache-size goes to the L2 cache up to what maps the whole disk when the
    refcount cache keeps its 4 clusters, else the refcount cache takes those first; what one
    named share leaves goes to the other (uncapped); then the entry-size rule and INT_MAX."""
    from qcowdisk import formats
    from qcowdisk.qcow2.cachesize import l2_cache_geometry

    whole = 128 * 1024  # 1 GiB disk, 64 KiB clusters: 16384 entries of 8 bytes
    assert l2_cache_geometry(1 << 30, 65536, False, None, None, cache_size=1 << 20) == (whole // 65536, 65536)
    # 300 KiB < whole + 256 KiB: 256 KiB refcount, 44 KiB of L2 in 4 KiB slices
    assert l2_cache_geometry(1 << 30, 65536, False, None, None, cache_size=300 << 10) == (11, 4096)
    assert l2_cache_geometry(1 << 30, 65536, False, None, None, cache_size=64 << 10) == (2, 4096)
    assert l2_cache_geometry(1 << 30, 65536, False, None, None, cache_size=8 << 20,
                             refcount_cache_size=0) == ((8 << 20) // 65536, 65536)
    assert l2_cache_geometry(1 << 30, 65536, False, 32 << 10, None, cache_size=8 << 20) == (8, 4096)
    with pytest.raises(ValueError, match=r"^L2 cache size too big$"):
        l2_cache_geometry(1 << 30, 65536, False, None, None, cache_size=1 << 60, refcount_cache_size=0)
    with pytest.raises(ValueError, match=r"^Refcount cache size too big$"):
        l2_cache_geometry(1 << 30, 65536, False, None, None, refcount_cache_size=1 << 60)
    # and an image opened so has that L2 cache
    path = tmp_path / "g.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1G")
    img = formats.open_image(str(path), "qcow2", formats.OpenOptions(readonly=True, cache_size=300 << 10))
    try:
        assert img._state.l2_slices is not None and img._state.l2_slices.capacity == 11  # type: ignore[attr-defined]
    finally:
        img.close()


@pytest.mark.parametrize("spec", ["file.filename=sub", "driver=qcow2,file.filename=sub", "driver=raw,file.filename=sub"])
def test_directory_refused(d: Path, spec: str) -> None:
    """A directory behind the file driver (the format probed or named): QEMU's refusal."""
    (d / "sub").mkdir(exist_ok=True)
    for command in (["info"], ["map", "--output=json"]):
        same_as_qemu_img(d, command[0], [*command[1:], "--image-opts", spec])


@pytest.fixture
def held(d: Path) -> Iterator[Path]:
    """d with a.qcow2, v1.qcow and r.raw held open read-only by another process (qemu-io -r,
    which unshares "write"), as long as the test runs."""
    qemu_img("create", "-q", "-f", "qcow", str(d / "v1.qcow"), "1M")
    procs = [subprocess.Popen(["qemu-io", "-r", "-f", fmt, str(d / name)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for fmt, name in (("qcow2", "a.qcow2"), ("qcow", "v1.qcow"), ("raw", "r.raw"))]
    try:
        for name in ("a.qcow2", "v1.qcow", "r.raw"):  # (each lock seen before the test starts)
            _wait_locked(d / name)
        yield d
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)


def _wait_locked(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not Path("/proc/locks").read_text().count(f":{path.stat().st_ino} "):
        assert time.monotonic() < deadline, f"qemu-io did not lock {path}"
        time.sleep(0.05)


RW_SPECS = [f"{OPTS},read-only=off", "driver=qcow,file.filename=v1.qcow,read-only=off",
            "driver=raw,file.filename=r.raw,read-only=off", f"{OPTS},read-only=on", OPTS]


@pytest.mark.parametrize("command", [["info"], ["map", "--output=json"], ["check"], ["measure", "-O", "qcow2"],
                                     ["compare"]])
@pytest.mark.parametrize("spec", RW_SPECS)
def test_read_only_off_takes_the_write_lock(held: Path, command: list[str], spec: str) -> None:
    """read-only=off on a command that only reads: qemu-img opens the image read-write and takes
    the write lock, so a reader elsewhere makes it fail (status 1, 'Failed to get "write" lock'),
    qcow v1 too (a raw image beside a reader opens: both tools); without it (or with read-only=on)
    the command runs beside the reader."""
    operands = [spec, OPTS] if command == ["compare"] else [spec]
    args = [*command[1:], "--image-opts", *operands]
    status, out, err = qemu_img_in(held, command[0], args)
    assert qcowdisk_in(held, command[0], args, as_qemu_img=True) == (status, out, err)
    assert ("read-only=off" in spec and "raw" not in spec) == ('"write" lock' in err), err


@pytest.fixture(scope="module")
def snapd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """top.qcow2 over base.qcow2 with internal snapshot s1 (id 1) taken when top held only its first
    64 KiB, so the rest of s1's disk reads from the backing file; alt.qcow2 another backing file."""
    d = tmp_path_factory.mktemp("snapopts")
    for name, pattern in (("base.qcow2", 0x11), ("alt.qcow2", 0x22)):
        qemu_img("create", "-q", "-f", "qcow2", str(d / name), "1M")
        qemu_io(str(d / name), f"write -P {pattern} 0 1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    qemu_io(str(d / "top.qcow2"), "write -P 0x33 0 64k")
    qemu_img("snapshot", "-c", "s1", str(d / "top.qcow2"))
    qemu_io(str(d / "top.qcow2"), "write -P 0x44 64k 64k")
    return d


@pytest.mark.parametrize("snapshot", ["snapshot.name=s1", "snapshot.id=1", "s1"])
@pytest.mark.parametrize("extra", ["", ",backing=", ",backing.driver=qcow2,backing.file.filename=alt.qcow2",
                                   ",backing.driver=raw,backing.file.filename=nope", ",cache.direct=on",
                                   ",l2-cache-size=1k"])
def test_convert_snapshot_with_image_opts(snapd: Path, snapshot: str, extra: str) -> None:
    """convert -l SNAPSHOT --image-opts: the snapshot's disk is read through the option string's
    backing choice (none, another file) as qemu-img reads it: same output, same image."""
    spec = f"driver=qcow2,file.filename=top.qcow2{extra}"
    for name in ("q.raw", "o.raw"):
        (snapd / name).unlink(missing_ok=True)
    status, out, err = qemu_img_in(snapd, "convert", ["-l", snapshot, "-O", "raw", "--image-opts", spec, "q.raw"])
    assert qcowdisk_in(snapd, "convert", ["-l", snapshot, "-O", "raw", "--image-opts", spec, "o.raw"],
                       as_qemu_img=True) == (status, out, err)
    if status == 0:
        assert (snapd / "o.raw").read_bytes() == (snapd / "q.raw").read_bytes()
