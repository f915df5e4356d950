"""`qcowdisk bitmap` against `qemu-img bitmap` (7.2): the same steps on two copies of an image
give the same messages and exit codes at every step, and the same bitmaps (list, flags, and
contents as QEMU reads them through qemu-nbd -B); and crash safety of every editing operation
(tests/crashsim.py: a cut anywhere leaves the old bitmaps or the new ones, never corruption).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from clirun import qcowdisk_in
from crashsim import CrashLog
from qcowdisk import QcowFile, ReadOnlyError
from qemutools import assert_clean, create, qemu_img, qemu_io, qemu_io_holding
from test_bitmaps import bitmap_map, bitmaps_of
from test_bitmaps_crash import sweep


def _source(d: Path) -> Path:
    """A merge source in another file: 64 MiB, bitmaps with contents, one in use."""
    p = str(d / "src.qcow2")
    create(p, "64M")
    qemu_img("bitmap", "--add", p, "s0")
    qemu_io(p, "write -P 1 20M 128k", "write -P 2 1049088 300")
    qemu_img("bitmap", "--add", "-g", "512", p, "fine")
    qemu_io(p, "write -P 3 40M 4k")
    qemu_img("bitmap", "--add", "--disable", p, "off")
    small = str(d / "small.qcow2")
    create(small, "32M")
    qemu_img("bitmap", "--add", small, "s0")
    return Path(p)


# (arguments, bitmap name): run in order on both copies
STEPS: list[tuple[list[str], str]] = [
    (["--add"], "a"), (["--add"], "a"), (["--remove"], "a"), (["--add", "-g", "128k", "--disable"], "a"),
    (["--enable"], "a"), (["--clear"], "a"), (["--remove"], "zz"), (["--clear"], "zz"), (["--enable"], "zz"),
    (["--merge", "a"], "zz"), (["--merge", "zz"], "a"), (["--merge", "s0", "-b", "{src}"], "a"),
    (["--merge", "fine", "-b", "{src}", "-F", "qcow2"], "a"), (["-g", "1000", "--add"], "g"),
    (["-g", "0", "--add"], "g0"), (["-g", "4G", "--add"], "g4"), (["-g", "2G", "--add"], "g2"),
    (["--add", "--merge", "zz"], "new"), (["--add", "-g", "1k", "--merge", "s0", "-b", "{src}"], "fine"),
    (["--merge", "a"], "fine"), (["--merge", "fine"], "a"), ([], "a"), (["-g", "64k", "--enable"], "a"),
    (["-b", "{src}", "--add"], "a"), (["-F", "raw", "--merge", "a"], "a"), (["--merge", "s0", "-b", "{small}"], "a"),
    (["--merge", "nope", "-b", "{src}"], "a"), (["--merge", "s0", "-b", "{raw}", "-F", "raw"], "a"),
    (["--disable", "--remove", "--add", "-g", "4k"], "g2"), (["--merge", "off", "-b", "{src}"], "g2"),
    (["--remove"], "g0"), (["--disable"], "a"), (["--add"], "é\"x\t/"), ([], ""),
]


def test_steps_as_qemu_img(tmp_path: Path) -> None:
    src = _source(tmp_path)
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(1 << 20))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    create(str(theirs), "64M", options="cluster_size=4k")
    shutil.copy(theirs, ours)
    names = {"src": str(src), "small": str(tmp_path / "small.qcow2"), "raw": str(raw)}
    for args, name in STEPS:
        words = [a.format(**names) for a in args]
        tail = [name] if name else []
        q = subprocess.run(["qemu-img", "bitmap", *words, str(theirs), *tail], capture_output=True, text=True,
                           check=False)
        status, out, err = qcowdisk_in(tmp_path, "bitmap", [*words, str(ours), *tail])
        assert (status, out) == (q.returncode, q.stdout), (args, name, q.stderr, err)
        assert err.replace(str(ours), str(theirs)) == q.stderr.replace("qemu-img: ", "qcowdisk: "), (args, name)
        assert bitmaps_of(ours) == bitmaps_of(theirs), (args, name)
    assert len(bitmaps_of(ours)) >= 4
    assert_clean(str(ours))
    for bm in bitmaps_of(theirs):
        assert bitmap_map(ours, bm["name"]) == bitmap_map(theirs, bm["name"]), bm["name"]


def test_inconsistent_bitmaps_as_qemu_img(tmp_path: Path) -> None:
    """In-use bitmaps: every operation but --remove refused with QEMU's message and hint; a
    removal keeps the other in-use ones as they are."""
    base = tmp_path / "base.qcow2"
    create(str(base), "64M")
    for name in ("b0", "b1", "b2"):
        qemu_img("bitmap", "--add", str(base), name)
    subprocess.run(["qemu-io", "-c", "write -P 2 0 64k", "-c", "sigraise 9", str(base)], capture_output=True,
                   check=False)
    qemu_img("bitmap", "--add", str(base), "ok")
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    shutil.copy(base, theirs)
    shutil.copy(base, ours)
    for args, name in [(["--enable"], "b1"), (["--disable"], "b1"), (["--clear"], "b1"), (["--merge", "b0"], "ok"),
                       (["--merge", "ok"], "b1"), (["--remove"], "b1"), (["--merge", "ok"], "ok"), (["--add"], "n")]:
        q = subprocess.run(["qemu-img", "bitmap", *args, str(theirs), name], capture_output=True, text=True, check=False)
        status, out, err = qcowdisk_in(tmp_path, "bitmap", [*args, str(ours), name])
        assert (status, out) == (q.returncode, q.stdout)
        assert err.replace(str(ours), str(theirs)) == q.stderr.replace("qemu-img: ", "qcowdisk: "), (args, name)
        assert bitmaps_of(ours) == bitmaps_of(theirs)
    assert [b["name"] for b in bitmaps_of(ours)] == ["b0", "b2", "ok", "n"]
    assert "in-use" in bitmaps_of(ours)[0]["flags"]
    assert_clean(str(ours))


def test_locks_as_qemu_img(tmp_path: Path) -> None:
    """An image in use elsewhere, and a merge source that is the image itself: qemu-img's lock
    failures, word for word."""
    p = create(str(tmp_path / "a.qcow2"), "1M")
    qemu_img("bitmap", "--add", p, "b")
    for args, hold in [(["--add", p, "c"], True), (["--merge", "b", "-b", p, p, "b"], False)]:
        if hold:
            with qemu_io_holding(p):
                q = subprocess.run(["qemu-img", "bitmap", *args], capture_output=True, text=True, check=False)
                status, out, err = qcowdisk_in(tmp_path, "bitmap", args)
        else:
            q = subprocess.run(["qemu-img", "bitmap", *args], capture_output=True, text=True, check=False)
            status, out, err = qcowdisk_in(tmp_path, "bitmap", args)
        assert (status, out, err) == (q.returncode, q.stdout, q.stderr.replace("qemu-img: ", "qcowdisk: ")) != (0, "", "")
    assert [b["name"] for b in bitmaps_of(p)] == ["b"]


def test_open_for_bitmaps_refuses_guest_writes(tmp_path: Path) -> None:
    p = create(str(tmp_path / "a.qcow2"), "1M")
    qemu_img("bitmap", "--add", p, "b")
    before = Path(p).read_bytes()
    with QcowFile.open_for_bitmaps(p) as disk:
        with pytest.raises(ReadOnlyError):
            disk.write_at(0, b"x")
        assert disk.read_at(0, 4) == bytes(4)
        ed = disk.edit_bitmaps()
        ed.commit()  # nothing changed: nothing written
    assert Path(p).read_bytes() == before
    with QcowFile.open(p, readonly=True) as disk, pytest.raises(ReadOnlyError):
        disk.edit_bitmaps()


# --------------------------------------------------------------------------------------------
# crash safety of each operation

OPS = {
    "remove-middle": [("remove", "b1")],
    "remove-all": [("remove", "b0"), ("remove", "b1"), ("remove", "b2")],
    "clear": [("clear", "b0")],
    "disable-enable": [("disable", "b0"), ("enable", "b2")],
    "merge": [("merge", "b2", "b0")],
    "add-merge-remove": [("add", "n"), ("merge", "n", "b0"), ("remove", "b1")],
}


def _image(d: Path) -> str:
    p = str(d / "img.qcow2")
    create(p, "8M", options="cluster_size=4k")
    qemu_io(p, "write -P 1 0 64k")
    qemu_img("bitmap", "--add", "-g", "4k", p, "b0")
    qemu_io(p, "write -P 2 1M 300k", "write -P 3 7M 4k")
    qemu_img("bitmap", "--add", "--disable", p, "b1")
    qemu_img("bitmap", "--merge", "b0", p, "b1")
    qemu_img("bitmap", "--add", "-g", "512", "--disable", p, "b2")
    qemu_img("bitmap", "--merge", "b0", p, "b2")
    qemu_io(p, "write -P 4 2M 512")
    return p


def _state(path: str) -> tuple[str, ...]:
    return tuple(repr(b) + bitmap_map(path, b["name"]) for b in bitmaps_of(path))


@pytest.mark.parametrize("name", list(OPS))
def test_power_cut_while_editing_bitmaps(tmp_path: Path, name: str) -> None:
    image = _image(tmp_path)
    view_before = subprocess.run(["qemu-img", "convert", "-O", "raw", image, str(tmp_path / "v.raw")], check=True)
    assert view_before.returncode == 0
    before = _state(image)
    log = CrashLog()
    log.snapshot_initial(image)
    with QcowFile.open_for_bitmaps(image, host_factory=log.factory()) as disk:
        ed = disk.edit_bitmaps()
        for op, *args in OPS[name]:
            if op == "add":
                ed.add(args[0])
            elif op == "merge":
                ed.merge(args[0], args[1])
            elif op == "disable":
                ed.enable(args[0], False)
            else:
                getattr(ed, op)(args[0])
        ed.commit()
    after = _state(image)
    assert after != before
    assert_clean(image)
    guest = (tmp_path / "v.raw").read_bytes()

    def judge(cut_image: str) -> list[str]:
        problems = []
        subprocess.run(["qemu-img", "convert", "-O", "raw", cut_image, str(tmp_path / "c.raw")], check=True)
        if (tmp_path / "c.raw").read_bytes() != guest:
            problems.append("VIEW guest view changed")
        state = _state(cut_image)
        if state not in (before, after):
            problems.append(f"MIXED bitmaps {bitmaps_of(cut_image)}")
        return problems

    sweep(log, image, tmp_path, f"bitmap edit crash {name}", judge,
          subsets=["all", "none", ("random", 1), ("torn", 2), ("torn", 3)])


def test_image_opts_and_objects_as_qemu_img(tmp_path: Path) -> None:
    """--image-opts (the image operand as an option string; never the -b merge source) and
    --object, with qemu-img's messages and exit codes, and the same bitmaps after."""
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "o.qcow2"
    create(str(theirs), "64M")
    qemu_img("bitmap", "--add", str(theirs), "s0")
    shutil.copy(theirs, ours)
    cases = [
        ["--add", "--image-opts", "driver=qcow2,file.filename={img}", "b0"],
        ["--add", "--image-opts", "-f", "qcow2", "{img}", "b1"],
        ["--add", "--object", "secret,id=s0,data=x", "{img}", "b2"],
        ["--add", "--object", "foo,id=x", "{img}", "b3"],
        ["--add", "--object", "secret,data=x", "{img}", "b4"],
        ["--add", "--image-opts", "driver=qcow2,file.filename={img},bogus=1", "b5"],
        ["--merge", "s0", "--image-opts", "file.filename={img}", "b0"],
        ["--remove", "--image-opts", "driver=raw,file.filename={img}", "b0"],
    ]
    for args in cases:
        q = subprocess.run(["qemu-img", "bitmap", *(a.format(img=theirs) for a in args)], capture_output=True,
                           text=True, check=False)
        status, out, err = qcowdisk_in(tmp_path, "bitmap", [a.format(img=ours) for a in args])
        assert (status, out) == (q.returncode, q.stdout), (args, q.stderr, err)
        assert err.replace(str(ours), str(theirs)) == q.stderr.replace("qemu-img: ", "qcowdisk: "), args
        assert bitmaps_of(ours) == bitmaps_of(theirs), args
    assert [b["name"] for b in bitmaps_of(ours)] == ["s0", "b0", "b2"]
    assert_clean(str(ours))
