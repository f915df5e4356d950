"""Host I/O: one small class over a file descriptor.

This is the seam for fault injection and crash simulation: every byte qcowdisk reads or writes
on the host goes through a `HostFile`. Tests substitute a subclass (see tests/crashsim.py) that
records writes and syncs. All methods are positional (pread-style), so one HostFile can be
shared by threads without a file position.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence

from .errors import UnsafeFileError

_ZEROS = bytes(1 << 21)
ZERO_BLOCK_LENGTH = len(_ZEROS)


def zero_block(length: int) -> memoryview:
    """A read-only view of `length` (at most 2 MiB) zero bytes, shared."""
    return memoryview(_ZEROS)[:length]


_fallocate: list[Callable[[int, int, int, int], int] | None] = []  # libc's fallocate once looked up
_sync_file_range: list[Callable[[int, int, int, int], int] | None] = []  # and sync_file_range


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate (None off Linux), looked up at its first use: ctypes costs a few
    milliseconds of every start, and many commands never allocate or punch."""
    if not _fallocate:
        import ctypes
        fn: Callable[[int, int, int, int], int] | None
        try:  # Linux: hand space back without changing the file length
            # The interpreter's own namespace has libc's symbols: looking libc up by name
            # (ctypes.util.find_library) runs `ldconfig -p` in a subprocess at every start.
            libc = ctypes.CDLL(None, use_errno=True)
            if not hasattr(libc, "fallocate"):  # pragma: no cover - a statically linked interpreter
                import ctypes.util
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            libc.fallocate.restype = ctypes.c_int
            fn = libc.fallocate
        except (OSError, AttributeError):  # pragma: no cover - non-Linux
            fn = None
        _fallocate.append(fn)
    return _fallocate[0]


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (None off Linux), looked up at its first use as fallocate is."""
    if not _sync_file_range:
        import ctypes
        fn: Callable[[int, int, int, int], int] | None
        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):  # pragma: no cover - non-Linux, or a static interpreter
            fn = None
        _sync_file_range.append(fn)
    return _sync_file_range[0]


SYNC_FILE_RANGE_WRITE = 0x02  # start writeback of the range's dirty pages; wait for nothing

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

O_DIRECT = getattr(os, "O_DIRECT", 0)

# Linux caps one preadv/pwritev at IOV_MAX buffers.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# (typing is not imported at run time: it is a tenth of a short command's start-up)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    Buffer = Any  # any object supporting the buffer protocol (collections.abc.Buffer from 3.12)
else:
    Buffer = object


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str, writable: bool, extra_flags: int = 0) -> int:
    """Open a regular file or block device without ever blocking; refuse anything else.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer); fstat
    then tells what was opened, and only regular files and block devices are kept.
    `extra_flags` are or-ed into the open flags (O_DIRECT for DirectHostFile).
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK | extra_flags
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EINVAL and extra_flags & O_DIRECT:
            _refuse_direct(path, flags & ~O_DIRECT)
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP):
            try:
                kind = _file_kind(os.stat(path).st_mode)
            except OSError:
                raise e from None
            raise UnsafeFileError(f"{path!r} is a {kind}, not a regular file or block device") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise UnsafeFileError(f"{path!r} is a {_file_kind(mode)}, not a regular file or block device")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DirectIOUnsupportedError(OSError):
    """The file system refuses O_DIRECT (QEMU's words: "filesystem does not support O_DIRECT")."""


def _refuse_direct(path: str, flags: int) -> None:
    """After open with O_DIRECT failed with EINVAL: when the file opens without it, say that the
    file system is what refuses O_DIRECT (QEMU's qemu_open does the same); else return."""
    try:
        os.close(os.open(path, flags))
    except OSError:
        return
    raise DirectIOUnsupportedError(errno.EINVAL, "filesystem does not support O_DIRECT", path)


class HostFile:
    """Positional I/O on one host file. Short reads past EOF return what exists."""

    open_flags = 0  # or-ed into the flags the file is opened with

    def __init__(self, path: str, writable: bool) -> None:
        """Open `path` read-only or read-write (never creates)."""
        self.path = path
        self.writable = writable
        # Something was written (or truncated, punched) since the last fsync: lets the ordering
        # code sync only when a sync has something to make durable.
        self.unsynced = False
        self.fd = -1
        self.is_block_device = False
        self.can_zero_alloc = True  # until fallocate says the file system cannot
        self.can_start_writeback = True  # until sync_file_range says the host cannot
        self.fd = open_regular(path, writable, self.open_flags)
        self.is_block_device = stat.S_ISBLK(os.fstat(self.fd).st_mode)

    @classmethod
    def create(cls, path: str) -> HostFile:
        """Create a new, empty file (refusing to overwrite) and open it read-write."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
        return cls(path, True)

    def size(self) -> int:
        """Current length of the file (or block device) in bytes."""
        if self.is_block_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
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
        if len(buffers) == 1:  # the common case: one os.pwrite, no buffer list to build
            want = memoryview(buffers[0]).nbytes
            if not want:
                return
            self.unsynced = True
            n = os.pwrite(self.fd, buffers[0], offset)
            if n == want:
                return
            self._write_all([memoryview(buffers[0]).cast("B")], offset, n)
            return
        bufs = [m for m in (memoryview(b).cast("B") for b in buffers) if len(m)]
        if bufs:
            self.unsynced = True
            self._write_all(bufs, offset, 0)

    def _write_all(self, bufs: list[memoryview], pos: int, n: int) -> None:
        """Write the rest of `bufs` (of which `n` bytes are written already) from `pos`."""
        while True:
            pos += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs[0])
                bufs.pop(0)
            if bufs and n:
                bufs[0] = bufs[0][n:]
            if not bufs:
                return
            n = os.pwritev(self.fd, bufs[:IOV_MAX], pos)
            if n <= 0:  # no progress: retrying would spin forever
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (write made no progress)", self.path)

    def fsync(self) -> None:
        """Make everything written so far durable."""
        os.fsync(self.fd)
        self.unsynced = False

    def sync(self) -> None:
        """fsync if anything was written since the last fsync."""
        if self.unsynced:
            self.fsync()

    def start_writeback(self) -> None:
        """Start writing the file's dirty pages back to the disk without waiting for them
        (sync_file_range with SYNC_FILE_RANGE_WRITE alone), so the disk writes of a bulk copy
        overlap its copying and the fsync at its end has less left to wait for. A hint: it
        makes nothing durable and orders nothing (only fsync does), and it leaves a writeback
        error for the next fsync to report too (no WAIT flag: the file's error cursor stays).
        Does nothing where the host cannot (not Linux; a file it refuses with EINVAL or ESPIPE);
        any other error raises, as a failed write does."""
        if not (self.unsynced and self.can_start_writeback):
            return
        sync_file_range = _libc_sync_file_range()
        if sync_file_range is None or sync_file_range(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE) == 0:
            return
        import ctypes
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP):
            self.can_start_writeback = False
            return
        raise OSError(err, os.strerror(err), self.path)

    def truncate(self, length: int) -> None:
        """Set the file's length."""
        self.unsynced = True
        os.ftruncate(self.fd, length)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Hand the host space of a range back (reads as zeros afterwards). False if unsupported."""
        fallocate = _libc_fallocate()
        if fallocate is None or length <= 0:
            return False
        self.unsynced = True
        if fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return True
        import ctypes
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err), self.path)

    def zero_alloc(self, offset: int, length: int) -> bool:
        """Make a range read as zeros with its space allocated, extending the file if it ends
        before, without writing the zeros: file-posix's write_zeroes with BDRV_REQ_NO_FALLBACK
        on a regular file (FALLOC_FL_ZERO_RANGE, else a punched hole allocated again). False
        where the host cannot (a block device, a file system without either): the caller then
        writes the zeros itself, as QEMU falls back to writing its copy-on-write buffers."""
        fallocate = _libc_fallocate()
        if fallocate is None or length <= 0 or self.is_block_device or not self.can_zero_alloc:
            return False
        self.unsynced = True
        if fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length) == 0:
            return True
        import ctypes
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), self.path)
        # (tmpfs, for one, has no ZERO_RANGE): hand the range back, then allocate it as zeros
        if self.punch_hole(offset, length) and fallocate(self.fd, 0, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), self.path)
        self.can_zero_alloc = False
        return False

    def allocate(self, offset: int, length: int) -> bool:
        """Reserve the disk space of [offset, offset+length) without changing what it reads
        (posix_fallocate: the bytes there stay, a file ending before grows with zeros): what
        QEMU's falloc preallocation asks of file-posix. False where the file system cannot;
        another error (ENOSPC: the space is not there) raises."""
        if length <= 0:
            return True
        self.unsynced = True
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise
        return True

    def zero_range(self, offset: int, length: int) -> None:
        """Make a range read as zeros: punch it (file-posix's write_zeroes with MAY_UNMAP), or
        write zeros where the file system cannot punch."""
        if not self.punch_hole(offset, length):
            self.write_zeros(offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        """Write explicit zero bytes over [offset, offset+length), a shared zero block at a time."""
        end = offset + length
        while offset < end:
            n = min(ZERO_BLOCK_LENGTH, end - offset)
            self.pwrite(zero_block(n), offset)
            offset += n

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


DIRECT_ALIGN = 4096  # a multiple of every logical block size and of the page size


class DirectHostFile(HostFile):
    """A host file opened with O_DIRECT, bypassing the host page cache (QEMU's cache=none and
    cache=directsync, i.e. cache.direct=on).

    O_DIRECT wants the buffer, the offset and the length aligned; qcowdisk's requests are not
    (headers, L2 slices, compressed payloads), so every request goes through an aligned bounce
    buffer (anonymous mmap, page aligned): reads read the covering aligned blocks and copy out,
    writes read the partial blocks at either edge, merge, and write whole blocks. Writes are
    serialised (an edge block read-modify-written by two threads at once would lose one of
    them). A write whose padding reaches past the end of the file leaves the file as QEMU's
    does: grown to the request's end rounded up to the file's request alignment (probed as
    file-posix probes it, 512 to 4096), with zeros. Opening fails with EINVAL on a file system
    without O_DIRECT, as QEMU's does.
    """

    open_flags = O_DIRECT

    def __init__(self, path: str, writable: bool) -> None:
        """Open `path` with O_DIRECT, read-only or read-write."""
        self._write_lock = threading.Lock()
        super().__init__(path, writable)
        self.can_start_writeback = False  # O_DIRECT writes leave no dirty pages to write back
        self.request_alignment = self._probe_alignment()

    def _probe_alignment(self) -> int:
        """file-posix's raw_probe_alignment: the smallest read size from 512 to 4096 that
        O_DIRECT does not refuse with EINVAL."""
        with mmap.mmap(-1, DIRECT_ALIGN) as buf:
            view = memoryview(buf)
            try:
                align = 512
                while align < DIRECT_ALIGN:
                    try:
                        os.preadv(self.fd, [view[:align]], 0)
                        return align
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            return align
                    align *= 2
                return DIRECT_ALIGN
            finally:
                view.release()

    def _read_blocks(self, buf: mmap.mmap, start: int, pos: int, length: int) -> int:
        """Fill buf[start:start+length] from the file at `pos` (all aligned); bytes read."""
        view = memoryview(buf)
        try:
            done = 0
            while done < length:
                n = os.preadv(self.fd, [view[start + done:start + length]], pos + done)
                done += max(n, 0)
                if n <= 0 or done % DIRECT_ALIGN:  # the end of the file (retrying would be unaligned)
                    break
            return done
        finally:
            view.release()

    def pread(self, length: int, offset: int) -> bytes:
        """Read up to `length` bytes at `offset` through an aligned buffer."""
        if length <= 0:
            return b""
        first = offset - offset % DIRECT_ALIGN
        span = -(-(offset + length - first) // DIRECT_ALIGN) * DIRECT_ALIGN
        with mmap.mmap(-1, span) as buf:
            got = self._read_blocks(buf, 0, first, span)
            return buf[offset - first:max(offset - first, min(got, offset - first + length))]

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Read into `buffers` from `offset` through an aligned buffer; bytes read."""
        bufs = [memoryview(b).cast("B") for b in buffers]
        data = self.pread(sum(len(b) for b in bufs), offset)
        pos = 0
        for b in bufs:
            n = min(len(b), len(data) - pos)
            if n <= 0:
                break
            b[:n] = data[pos:pos + n]
            pos += n
        return pos

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        """Write all `buffers` contiguously at `offset`: whole aligned blocks, edges merged."""
        bufs = [m for m in (memoryview(b).cast("B") for b in buffers) if len(m)]
        length = sum(len(b) for b in bufs)
        if not length:
            return
        end = offset + length
        first = offset - offset % DIRECT_ALIGN
        last = -(-end // DIRECT_ALIGN) * DIRECT_ALIGN
        with self._write_lock, mmap.mmap(-1, last - first) as buf:
            self.unsynced = True
            old_size = self.size() if end != last else 0
            if offset != first:
                self._read_blocks(buf, 0, first, DIRECT_ALIGN)
            if end != last and (last - DIRECT_ALIGN > first or offset == first):
                self._read_blocks(buf, last - DIRECT_ALIGN - first, last - DIRECT_ALIGN, DIRECT_ALIGN)
            pos = offset - first
            for b in bufs:
                buf[pos:pos + len(b)] = b
                pos += len(b)
            view = memoryview(buf)
            try:
                self._write_all([view], first, 0)
            finally:
                view.release()
            grown = -(-end // self.request_alignment) * self.request_alignment
            if end != last and not self.is_block_device and last > max(old_size, grown):
                os.ftruncate(self.fd, max(old_size, grown))


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
