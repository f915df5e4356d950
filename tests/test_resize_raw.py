"""`qcowdisk resize` of raw images answers as `qemu-img resize` (7.2) does: the same stdout,
stderr and status, and the same file afterwards (length, allocated blocks, bytes), for probed
and named formats, relative and absolute sizes (the file measured in 512-byte sectors),
--shrink, --preallocation (off, falloc, full; metadata and unknown modes refused), raw's offset
and size options, and the locks (a raw writer does not stop it, a qcow2 holder does).
`RawResizeTarget` refuses in qemu-img's order. A qcow v1 image gets qemu-img's refusals, then its
driver's; a file that is not one, QEMU's first words.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clirun import qcowdisk_in, qemu_img_in
from qcowdisk.errors import ResizeError
from qcowdisk.ops.rawresize import RawResizeTarget
from qemutools import qemu_img

ODD = 3_000_001  # not a multiple of 512: QEMU measures it as 3000320


def setup(d: Path) -> None:
    d.mkdir()
    with open(d / "a.raw", "wb") as f:
        f.write(b"hello")
        f.truncate(ODD)
    qemu_img("create", "-q", "-f", "qcow2", str(d / "q.qcow2"), "3M")
    qemu_img("create", "-q", "-f", "qcow", str(d / "v1.qcow"), "1M")
    (d / "empty").write_bytes(b"")


def state(d: Path) -> list[tuple[str, int, int, bytes]]:
    """Each file's name, length, allocated 512-byte blocks and bytes."""
    out = []
    for p in sorted(d.iterdir()):
        st = p.stat()
        out.append((p.name, st.st_size, st.st_blocks, p.read_bytes()))
    return out


CASES = [
    "a.raw +1M", "-f raw a.raw +1M", "-f raw a.raw 1M", "-f raw --shrink a.raw 1M", "--shrink a.raw 100K",
    "-f raw a.raw 3000002", "-f raw a.raw 3000500", "-f raw a.raw +100", "-f raw a.raw -- -100",
    "-f raw a.raw 0", "-f raw a.raw -10M", "-f raw --preallocation=falloc a.raw 5M",
    "-f raw --preallocation=full a.raw 5M", "--preallocation=full a.raw 5M", "-f raw --preallocation=off a.raw 5M",
    "-f raw --preallocation=metadata a.raw 5M", "-f raw --preallocation=bogus a.raw 5M",
    "-f raw --preallocation=falloc a.raw 1M", "-f raw --shrink --preallocation=full a.raw 1M",
    "-q -f raw a.raw 8M", "--image-opts driver=raw,file.filename=a.raw,offset=4096 8M",
    "--image-opts driver=raw,file.filename=a.raw,offset=4096 +1M",
    "--image-opts driver=raw,file.filename=a.raw,size=1048576 8M",
    "--image-opts driver=raw,file.filename=a.raw,offset=99999999 8M", "-f raw q.qcow2 +1M",
    "-f raw nonexist 1M", "--preallocation=falloc q.qcow2 2M",
    # an empty file grows with its first block allocated, as file-posix grows it
    "-f raw empty 2M", "empty 1M", "-f raw --preallocation=full empty 1M",
    # qcow v1: qemu-img's own refusals, in order, then its driver's (no resize)
    "v1.qcow 2M", "v1.qcow 512K", "--shrink v1.qcow 512K", "--preallocation=full v1.qcow 512K", "v1.qcow 0",
    "-f qcow v1.qcow +1M", "-f qcow nonexist 1M",
]


@pytest.mark.parametrize("args", CASES)
def test_raw_resize_as_qemu_img(tmp_path: Path, args: str) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "qemu"
    setup(ours)
    setup(theirs)
    argv = args.split()
    expected = qemu_img_in(theirs, "resize", argv)
    assert qcowdisk_in(ours, "resize", argv, as_qemu_img=True) == expected
    assert state(ours) == state(theirs)


@pytest.fixture(params=["raw writer", "qcow2 writer", "qcow2 reader"])
def holder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A copy of setup() for each tool, with a.raw (raw writer) or q.qcow2 held open by qemu-io."""
    dirs = [tmp_path / "ours", tmp_path / "qemu"]
    procs = []
    image, fmt, ro = {"raw writer": ("a.raw", "raw", []), "qcow2 writer": ("q.qcow2", "qcow2", []),
                      "qcow2 reader": ("q.qcow2", "qcow2", ["-r"])}[request.param]
    try:
        for d in dirs:
            setup(d)
            procs.append(subprocess.Popen(["qemu-io", *ro, "-f", fmt, str(d / image)], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ino = (d / image).stat().st_ino
            deadline = time.monotonic() + 30
            while f":{ino} " not in Path("/proc/locks").read_text():
                assert time.monotonic() < deadline, "qemu-io did not lock the image"
                time.sleep(0.05)
        yield tmp_path, image
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)


def test_raw_resize_beside_a_holder(holder: tuple[Path, str]) -> None:
    d, image = holder
    argv = ["-f", "raw", image, "+1M"]
    expected = qemu_img_in(d / "qemu", "resize", argv)
    assert qcowdisk_in(d / "ours", "resize", argv, as_qemu_img=True) == expected
    assert expected[0] == (0 if image == "a.raw" else 1)
    assert (d / "ours" / image).stat().st_size == (d / "qemu" / image).stat().st_size


def test_target_refuses_in_qemu_img_order(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(4096))
    with RawResizeTarget(str(path)) as t:
        assert t.virtual_size == 4096
        for size, kw, message in [
            (0, {"preallocation": "full"}, "New image size must be positive"),
            (4096, {"preallocation": "falloc"}, "Preallocation can only be used for growing images"),
            (1024, {}, "Use the --shrink option to perform a shrink operation."),
            (8192, {"preallocation": "metadata"}, "Unsupported preallocation mode: metadata"),
            (8192, {"preallocation": "sparse"}, "Invalid preallocation mode 'sparse'"),
        ]:
            with pytest.raises(ResizeError, match=message):
                t.resize(size, **kw)  # type: ignore[arg-type]
            assert path.stat().st_size == 4096
        t.resize(1 << 20, preallocation="full")
        assert t.virtual_size == 1 << 20
        t.resize(512, shrink=True)
    assert path.read_bytes() == bytes(512)
    with RawResizeTarget(str(path), offset=0, size=512) as t, \
            pytest.raises(ResizeError, match="Cannot resize fixed-size raw disks"):
        t.resize(1024)
    assert os.path.getsize(path) == 512


@pytest.mark.parametrize("name", ["a.raw", "empty"])
def test_not_a_qcow_image_leads_with_qemu_words(tmp_path: Path, name: str) -> None:
    setup(tmp_path / "d")
    status, out, err = qcowdisk_in(tmp_path / "d", "resize", ["-f", "qcow", name, "2M"], as_qemu_img=True)
    expected = qemu_img_in(tmp_path / "d", "resize", ["-f", "qcow", name, "2M"])
    assert (status, out) == expected[:2] == (1, "")
    assert err.startswith(expected[2].rstrip("\n")), (err, expected)  # (then qcowdisk's detail)


@pytest.mark.parametrize("argv", [["resize", "-f", "qcow2", "v1.qcow", "2M"],
                                  ["amend", "-f", "qcow2", "-o", "lazy_refcounts=on", "v1.qcow"],
                                  ["bitmap", "--add", "-f", "qcow2", "v1.qcow", "b0"]])
def test_qcow_v1_opened_as_qcow2_for_writing_leads_with_qemu_words(tmp_path: Path, argv: list[str]) -> None:
    """One refusal for every command that opens a qcow2 image read-write (QcowFile's open):
    QEMU's qcow2 driver's words, then qcowdisk's detail."""
    setup(tmp_path / "d")
    status, out, err = qcowdisk_in(tmp_path / "d", argv[0], argv[1:], as_qemu_img=True)
    expected = qemu_img_in(tmp_path / "d", argv[0], argv[1:])
    assert (status, out) == expected[:2] == (1, "")
    assert err.startswith(expected[2].rstrip("\n")), (err, expected)
