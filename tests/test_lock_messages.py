"""Lock conflicts on the commands that change an image in place (resize, snapshot, amend,
bitmap): qcowdisk answers as qemu-img 7.2 does, word for word, status included, whether the
other process holds the image for writing (qemu-io) or only reads it (qemu-io -r, which
still refuses writers), and a reading command beside a reader runs as qemu-img's does."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clirun import qcowdisk_in, qemu_img_in
from qemutools import qemu_img, qemu_io

COMMANDS = [
    ["resize", "a.qcow2", "2M"],
    ["snapshot", "-c", "s2", "a.qcow2"],
    ["snapshot", "-l", "a.qcow2"],
    ["snapshot", "-a", "s1", "a.qcow2"],
    ["snapshot", "-d", "s1", "a.qcow2"],
    ["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
    ["bitmap", "--add", "a.qcow2", "b0"],
]


@pytest.fixture(params=["writer", "reader"])
def held(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """tmp_path with a.qcow2 (one snapshot, s1) open in qemu-io for the test's length: read-write
    ("writer") or read-only ("reader")."""
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    qemu_io(str(tmp_path / "a.qcow2"), "write -P 7 0 64k")
    qemu_img("snapshot", "-c", "s1", str(tmp_path / "a.qcow2"))
    ro = ["-r"] if request.param == "reader" else []
    p = subprocess.Popen(["qemu-io", *ro, "-f", "qcow2", str(tmp_path / "a.qcow2")], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ino = (tmp_path / "a.qcow2").stat().st_ino
        deadline = time.monotonic() + 30
        while f":{ino} " not in Path("/proc/locks").read_text():
            assert time.monotonic() < deadline, "qemu-io did not lock the image"
            time.sleep(0.05)
        yield tmp_path
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=30)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_lock_conflict_reported_as_qemu_img(held: Path, command: list[str]) -> None:
    status, out, err = qemu_img_in(held, command[0], command[1:])
    assert qcowdisk_in(held, command[0], command[1:], as_qemu_img=True) == (status, out, err)
    if command[1] != "-l":
        assert status == 1 and 'Failed to get "write" lock\nIs another process using the image [a.qcow2]?' in err
