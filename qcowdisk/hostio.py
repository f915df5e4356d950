"""Host I/O: one small class over a file descriptor.

This is the seam for fault injection and crash simulation: every byte qcowdisk reads or writes
on the host goes through a `HostFile`. Tests substitute a subclass (see tests/crashsim.py) that
records writes and syncs. All methods are positional (pread-style), so one HostFile can be
shared by threads without a file position.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any, Callable

try:  # Linux: hand space back without changing the file length
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _fallocate = None

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# Linux caps one preadv/pwritev at IOV_MAX buffers.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

Buffer = Any  # any object supporting the buffer protocol


class HostFile:
    """Positional I/O on one host file. Short reads past EOF return what exists."""

    def __init__(self, path: str, writable: bool) -> None:
        """Open `path` read-only or read-write (never creates)."""
        self.path = path
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))

    @classmethod
    def create(cls, path: str) -> "HostFile":
        """Create a new, empty file (refusing to overwrite) and open it read-write."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        os.close(fd)
        return cls(path, True)

    def size(self) -> int:
        """Current length of the file in bytes."""
        return os.fstat(self.fd).st_size

    def pread(self, length: int, offset: int) -> bytes:
        """Read up to `length` bytes at `offset`."""
        return os.pread(self.fd, length, offset)

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Read into `buffers` starting at `offset`; returns bytes read (loops over short reads)."""
        total = 0
        bufs = [memoryview(b).cast("B") for b in buffers]
        want = sum(len(b) for b in bufs)
        while bufs:
            chunk = bufs[:IOV_MAX]
            n = os.preadv(self.fd, chunk, offset + total)
            if n == 0:
                break
            total += n
            if total >= want:
                break
            # drop the consumed buffers, trim the first partially filled one
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if bufs and n:
                bufs[0] = bufs[0][n:]
        return total

    def pwrite(self, data: Buffer, offset: int) -> None:
        """Write all of `data` at `offset`."""
        self.pwritev([data], offset)

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        """Write all `buffers` contiguously at `offset` (loops over short writes)."""
        bufs = [m for m in (memoryview(b).cast("B") for b in buffers) if len(m)]
        pos = offset
        while bufs:
            n = os.pwritev(self.fd, bufs[:IOV_MAX], pos)
            pos += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if bufs and n:
                bufs[0] = bufs[0][n:]

    def fsync(self) -> None:
        """Make everything written so far durable."""
        os.fsync(self.fd)

    def truncate(self, length: int) -> None:
        """Set the file's length."""
        os.ftruncate(self.fd, length)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Hand the host space of a range back (reads as zeros afterwards). False if unsupported."""
        if _fallocate is None or length <= 0:
            return False
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err), self.path)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


HostFactory = Callable[[str, bool], HostFile]


def host_extent(fd: int, offset: int, length: int) -> tuple[int, bool]:
    """(n, is_data): how far from `offset` (at most `length`) the host file is data, or a hole.

    QEMU's file-posix rule (`find_allocation` + `raw_co_block_status`): SEEK_DATA/SEEK_HOLE at
    `offset`; a hole reaching the end of the file (ENXIO), and anything past the end, is one
    hole of `length`; when the system cannot tell (any other error) the whole range is data.
    """
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as e:
        return length, e.errno != errno.ENXIO
    if data > offset:
        return min(length, data - offset), False
    if data < offset:  # not a valid answer: we learned nothing
        return length, True
    try:
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError as e:
        return length, e.errno != errno.ENXIO
    if hole <= offset:  # a hole dug between the two calls (QEMU: -EBUSY, "no info")
        return length, True
    return min(length, hole - offset), True
