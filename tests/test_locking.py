"""Image locking: qcowdisk against itself, against another process, and against QEMU.

QEMU is the oracle: the lock bytes we take must be exactly the ones `qemu-io` takes, qemu-io must
refuse an image we hold for writing, and we must refuse one qemu-io holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from qcowdisk import locking
from qcowdisk.errors import ImageLockedError, QcowError
from qcowdisk.locking import ImageLock, lock_image
from qemutools import create, qemu_img, qemu_io, run

ofd_only = pytest.mark.skipif(not locking.USE_OFD, reason="OFD locks are Linux-only")

WRITER_BYTES = {100, 101, 103, 201, 203}   # what qemu-io (read-write) locks in QEMU 7.2
READER_BYTES = {100, 201, 203}             # what qemu-io -r locks


@pytest.fixture
def image(tmp_path) -> str:
    return create(str(tmp_path / "img.qcow2"), "1M")


@pytest.fixture
def fds(image) -> Iterator[list[int]]:
    """Factory-ish: a list the test appends opened fds to; all closed afterwards."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def open_fd(fds: list[int], path: str, write: bool = True) -> int:
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    fds.append(fd)
    return fd


# --- independent probes (do not reuse the code under test) ---------------------------------

def byte_locked_by_other(path: str, offset: int) -> bool:
    """F_OFD_GETLK from a fresh open: is `offset` locked by anybody?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, 36, arg))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def proc_lock_bytes(path: str) -> set[int]:
    """Every byte offset /proc/locks shows locked (granted, not waiting) on `path`'s inode."""
    st = os.stat(path)
    dev_ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields or dev_ino not in fields:
                continue
            i = fields.index(dev_ino)
            start, end = int(fields[i + 1]), int(fields[i + 2])
            found.update(range(start, end + 1))
    return found


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def held_by_qemu_io(path: str, readonly: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """Run qemu-io on `path` idling at its prompt (stdin a pipe) until the block exits."""
    args = ["qemu-io", "-f", "qcow2"] + (["-r"] if readonly else []) + [path]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not byte_locked_by_other(path, 100):  # byte 100: it holds "consistent read"
            if p.poll() is not None:
                raise AssertionError(f"qemu-io exited {p.returncode}: {p.stdout.read()!r}")
            if time.monotonic() > deadline:
                raise AssertionError("qemu-io did not lock the image within 10 s")
            time.sleep(0.01)
        yield p
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


def qemu_io_write(path: str) -> subprocess.CompletedProcess[str]:
    return run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512", path, check=False)


# --- qcowdisk against itself ---------------------------------------------------------------

def test_second_write_lock_on_another_fd_fails(image, fds):
    first = lock_image(open_fd(fds, image), image, write=True)
    with pytest.raises(ImageLockedError) as exc:
        lock_image(open_fd(fds, image), image, write=True)
    assert isinstance(exc.value, QcowError)
    assert f"image '{image}' is locked" in str(exc.value)
    assert '"write"' in str(exc.value)
    first.release()


def test_release_then_relock(image, fds):
    a, b = open_fd(fds, image), open_fd(fds, image)
    first = lock_image(a, image, write=True)
    assert first.held
    first.release()
    first.release()  # idempotent
    assert not first.held
    second = lock_image(b, image, write=True)
    with pytest.raises(ImageLockedError):
        lock_image(a, image, write=True)  # a's own earlier lock is gone; b's conflicts
    second.release()
    lock_image(a, image, write=True).release()


def test_readers_share(image, fds):
    r1 = lock_image(open_fd(fds, image, write=False), image, write=False)
    r2 = lock_image(open_fd(fds, image, write=False), image, write=False)
    r3 = lock_image(open_fd(fds, image), image, write=False)
    for r in (r1, r2, r3):
        r.release()


def test_reader_and_writer_exclude_each_other(image, fds):
    # As in QEMU: a reader does not share "write", a writer does not share "write".
    reader = lock_image(open_fd(fds, image, write=False), image, write=False)
    with pytest.raises(ImageLockedError, match=r'shared "write" lock|"write" lock'):
        lock_image(open_fd(fds, image), image, write=True)
    reader.release()
    writer = lock_image(open_fd(fds, image), image, write=True)
    with pytest.raises(ImageLockedError, match="is locked"):
        lock_image(open_fd(fds, image, write=False), image, write=False)
    writer.release()


def test_context_manager_releases(image, fds):
    with lock_image(open_fd(fds, image), image, write=True) as lk:
        assert isinstance(lk, ImageLock) and lk.held
    assert not lk.held
    lock_image(open_fd(fds, image), image, write=True).release()


@ofd_only
def test_failed_attempt_leaves_no_locks_and_no_fds(image, fds):
    holder = lock_image(open_fd(fds, image), image, write=True)
    other = open_fd(fds, image)
    before = open_fd_count()
    for write in (True, False):
        with pytest.raises(ImageLockedError):
            lock_image(other, image, write=write)
    assert open_fd_count() == before  # the internal dup was closed
    assert proc_lock_bytes(image) == WRITER_BYTES  # only the holder's bytes remain
    holder.release()
    assert proc_lock_bytes(image) == set()
    lock_image(other, image, write=True).release()


@ofd_only
def test_lock_outlives_closed_fd_until_release(image, fds):
    # release() works on its own duplicate: closing the image fd first is safe.
    fd = os.open(image, os.O_RDWR)
    lk = lock_image(fd, image, write=True)
    os.close(fd)
    with pytest.raises(ImageLockedError):
        lock_image(open_fd(fds, image), image, write=True)
    lk.release()
    assert proc_lock_bytes(image) == set()
    lock_image(open_fd(fds, image), image, write=True).release()


@ofd_only
def test_release_after_fd_reuse_does_not_touch_the_new_file(image, tmp_path, fds):
    fd = os.open(image, os.O_RDWR)
    lk = lock_image(fd, image, write=True)
    os.close(fd)
    other = create(str(tmp_path / "other.qcow2"), "1M")
    reused = os.open(other, os.O_RDWR)  # very likely gets fd's number back
    fds.append(reused)
    other_lock = lock_image(reused, other, write=True)
    lk.release()
    assert proc_lock_bytes(other) == WRITER_BYTES
    other_lock.release()


# --- the lock bytes are QEMU's -------------------------------------------------------------

@ofd_only
@pytest.mark.parametrize("write", [True, False], ids=["rw", "ro"])
def test_lock_bytes_match_qemu_io(image, fds, write):
    with held_by_qemu_io(image, readonly=not write):
        qemu_bytes = proc_lock_bytes(image)
    assert qemu_bytes == (WRITER_BYTES if write else READER_BYTES)
    lk = lock_image(open_fd(fds, image, write=write), image, write=write)
    assert proc_lock_bytes(image) == qemu_bytes
    lk.release()
    assert proc_lock_bytes(image) == set()


# --- against QEMU --------------------------------------------------------------------------

@ofd_only
def test_qemu_io_write_refused_while_we_hold_write_lock(image, fds):
    lk = lock_image(open_fd(fds, image), image, write=True)
    p = qemu_io_write(image)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "lock" in out.lower(), out
    # Plain qemu-img info is refused too (as with a QEMU writer); -U (force-share) works.
    assert qemu_img("info", image, check=False).returncode != 0
    assert "virtual size" in qemu_img("info", "-U", image).stdout
    lk.release()
    qemu_io(image, "write -P 0x5a 0 512")
    qemu_io(image, "read -P 0x5a 0 512")


@ofd_only
def test_we_hold_read_lock_qemu_reads_but_cannot_write(image, fds):
    lk = lock_image(open_fd(fds, image, write=False), image, write=False)
    assert "virtual size" in qemu_img("info", image).stdout
    qemu_io(image, "read 0 512", extra=("-r",))
    p = qemu_io_write(image)
    assert p.returncode != 0 and "lock" in (p.stdout + p.stderr).lower()
    lk.release()
    qemu_io(image, "write 0 512")


@ofd_only
def test_we_refuse_image_qemu_io_holds_for_writing(image, fds):
    fd = open_fd(fds, image)
    with held_by_qemu_io(image):
        with pytest.raises(ImageLockedError, match=f"image '{image}' is locked"):
            lock_image(fd, image, write=True)
        with pytest.raises(ImageLockedError, match="is locked"):
            lock_image(fd, image, write=False)
    lock_image(fd, image, write=True).release()


@ofd_only
def test_qemu_io_reader_blocks_our_writer_not_our_reader(image, fds):
    with held_by_qemu_io(image, readonly=True):
        with pytest.raises(ImageLockedError):
            lock_image(open_fd(fds, image), image, write=True)
        lock_image(open_fd(fds, image, write=False), image, write=False).release()


# --- against another Python process --------------------------------------------------------

CHILD = """
import os, sys
from qcowdisk.errors import ImageLockedError
from qcowdisk.locking import lock_image
path, write = sys.argv[1], sys.argv[2] == "w"
fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
try:
    lock_image(fd, path, write=write)
except ImageLockedError as e:
    print(e)
    sys.exit(3)
"""


def child_lock(path: str, write: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, path, "w" if write else "r"],
                          capture_output=True, text=True, timeout=30, check=False)


def test_other_process_cannot_lock_while_we_hold(image, fds):
    lk = lock_image(open_fd(fds, image), image, write=True)
    p = child_lock(image, write=True)
    assert p.returncode == 3 and "is locked" in p.stdout, (p.stdout, p.stderr)
    lk.release()
    p = child_lock(image, write=True)
    assert p.returncode == 0, (p.stdout, p.stderr)


# --- side-file fallback (no OFD locks) -----------------------------------------------------

def test_side_file_fallback(image, fds, monkeypatch):
    monkeypatch.setattr(locking, "USE_OFD", False)
    w = lock_image(open_fd(fds, image), image, write=True)
    assert os.path.exists(image + ".lock")
    with pytest.raises(ImageLockedError, match=f"image '{image}' is locked"):
        lock_image(open_fd(fds, image), image, write=True)
    with pytest.raises(ImageLockedError, match="is locked"):
        lock_image(open_fd(fds, image, write=False), image, write=False)
    w.release()
    w.release()
    r1 = lock_image(open_fd(fds, image, write=False), image, write=False)
    r2 = lock_image(open_fd(fds, image, write=False), image, write=False)
    w2 = lock_image(open_fd(fds, image), image, write=True)  # readers hold nothing here
    with pytest.raises(ImageLockedError):
        lock_image(open_fd(fds, image), image, write=True)
    for lk in (r1, r2, w2):
        lk.release()


# --- QcowFile level ------------------------------------------------------------------------

def test_qcowfile_open_twice_fails(image):
    from qcowdisk import QcowFile
    with QcowFile.open(image) as disk:
        with pytest.raises(ImageLockedError, match=f"image '{image}' is locked"):
            QcowFile.open(image)
        # The failed open must not have dropped the first open's lock.
        with pytest.raises(ImageLockedError):
            QcowFile.open(image)
        disk.write_at(0, b"x" * 512)
    with QcowFile.open(image) as disk:  # released on close
        assert disk.read_at(0, 512) == b"x" * 512


def test_qcowfile_readonly_opens_mirror_qemu_readers(image):
    """Read-only opens take QEMU's reader locks: readers share, but exclude writers both ways."""
    from qcowdisk import QcowFile
    with QcowFile.open(image):
        with pytest.raises(ImageLockedError):
            QcowFile.open(image, readonly=True)
    with QcowFile.open(image, readonly=True), QcowFile.open(image, readonly=True):
        with pytest.raises(ImageLockedError):
            QcowFile.open(image)
    QcowFile.open(image).close()


def test_qcowfile_create_holds_lock(tmp_path):
    from qcowdisk import QcowFile
    path = str(tmp_path / "new.qcow2")
    with QcowFile.create(path, 1 << 20):
        with pytest.raises(ImageLockedError):
            QcowFile.open(path)
    QcowFile.open(path).close()


@ofd_only
def test_qcowfile_and_qemu_io_exclude_each_other(image):
    from qcowdisk import QcowFile
    with QcowFile.open(image):
        p = qemu_io_write(image)
        assert p.returncode != 0 and "lock" in (p.stdout + p.stderr).lower()
    with held_by_qemu_io(image):
        with pytest.raises(ImageLockedError):
            QcowFile.open(image)
    with held_by_qemu_io(image, readonly=True):  # a QEMU reader does not share "write"
        with pytest.raises(ImageLockedError):
            QcowFile.open(image)
    QcowFile.open(image).close()
