"""`--image-opts`, `--target-image-opts` and `--object` against qemu-img 7.2 on the same inputs.

Each case runs qemu-img and qcowdisk with the same words in the same directory and compares
exit status, stdout and stderr (and, for commands that write, the resulting images).
"""

from __future__ import annotations

import shutil
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
    f"{OPTS},force-share=on,read-only=off", f"{OPTS},read-only=on", f"{OPTS},id=0x", f"{OPTS},id=foo",
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
        assert got[2] == "qemu-img: qemu-img does not support objects of type 'can-bus' (only 'secret')\n"
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
