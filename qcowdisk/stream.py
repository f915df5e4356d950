"""A guest disk as a Python file object: `QcowIO` (raw, unbuffered) and `open` (like built-in open()).

Anything that takes a binary file works on a guest disk: `shutil.copyfileobj`, `tarfile`,
`zipfile`, `hashlib.file_digest`, `io.TextIOWrapper`::

    with qcowdisk.open("disk.qcow2", "rb") as f:     # io.BufferedReader
        f.seek(-512, os.SEEK_END)
        tail = f.read()

The stream is a block device, not a regular file: its length is the virtual size, fixed when
the image was created. So there is no create, truncate or append mode, `truncate()` is refused
unless it would not change the size, a write that would run past the end is refused as a full
device refuses it (`OSError` with `errno.ENOSPC`, nothing written), and seeking past the end is
allowed (reads there return b"", as on any file). Through a buffered stream from `open()`, a
small write past the end is refused when the buffer is flushed (at `flush()`, a later write or
`close()`), together with whatever else that buffer held: loudly, never silently in part.

Threads: the position belongs to the stream object and a `QcowIO` does not lock it, so do not
share one raw stream between threads. The disk under it is thread-safe: give each thread its own
`QcowIO(disk)` over one `QcowFile`, or share a buffered stream from `open()` (io's buffered
objects lock each call).
"""

from __future__ import annotations

import errno
import io
import operator
import os
import warnings
from typing import Any, Literal, overload

from .qcow2.file import QcowFile

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .hostio import Buffer
    from .image import Image

# The buffer size of open(buffering=-1): 64 KiB, the default cluster size, rather than
# io.DEFAULT_BUFFER_SIZE (8 KiB). Every raw call costs a pass through the engine (lock, L1/L2
# lookup), so 8x fewer calls win for the sequential use files mostly get (4 KiB reads or writes
# of a 64 MiB image: about 3x and 2x faster), and a sequential writer flushes whole clusters,
# which need no copy-on-write fill. The price is on small reads after random seeks (a fill
# spans two clusters): ~30 us instead of ~15; buffering=0 does those in ~4. Not the image's own
# cluster size: with 2 MiB clusters each such read would fill 2 MiB.
DEFAULT_BUFFER_SIZE = 64 * 1024

_ReadMode = Literal["rb", "br"]
_UpdateMode = Literal["r+b", "rb+", "+rb", "br+", "b+r", "+br"]


class QcowIO(io.RawIOBase):
    """An unbuffered binary stream over a guest disk: `io.RawIOBase` with a position.

    `disk` is an open `QcowFile` (any `qcowdisk.Image` works; one without a `readonly`
    attribute counts as read-only). The stream is writable when the disk is not read-only.
    `close()` closes the disk only if `close_disk` is true: `open()` passes True for the image it
    opened, while a disk handed in stays the caller's to close (like `closefd=False`).

    Reads go straight into the caller's buffer (`readinto`) and never past the virtual size.
    Writes are all or nothing: one that would run past the virtual size raises
    `OSError(ENOSPC)` and writes nothing, because a silently short write is lost data for the
    many callers that ignore the count (`shutil.copyfileobj` among them).

    Not thread-safe: the position is this object's and is not locked. Use one stream per thread
    over a shared disk (which is thread-safe), or a buffered stream, whose calls io locks.
    """

    def __init__(self, disk: Image, *, close_disk: bool = False) -> None:
        """Wrap `disk` with the position at 0."""
        super().__init__()
        self._disk = disk
        self._close_disk = close_disk
        self._writable = getattr(disk, "readonly", True) is False
        self._pos = 0

    # ------------------------------------------------------------------ attributes
    @property
    def disk(self) -> Image:
        """The image this stream reads and writes."""
        return self._disk

    @property
    def name(self) -> str:
        """The image's file name (as `FileIO.name` is the file's)."""
        return self._disk.filename

    @property
    def mode(self) -> str:
        """"rb+" when writable, else "rb", spelled as `FileIO.mode` spells them."""
        return "rb+" if self._writable else "rb"

    @property
    def close_disk(self) -> bool:
        """Whether `close()` also closes the disk."""
        return self._close_disk

    def readable(self) -> bool:
        """True: a guest disk can always be read."""
        self._check_closed()
        return True

    def writable(self) -> bool:
        """True when the disk was opened read-write."""
        self._check_closed()
        return self._writable

    def seekable(self) -> bool:
        """True: every offset of the disk is addressable."""
        self._check_closed()
        return True

    def fileno(self) -> int:
        """Refused with io.UnsupportedOperation: the image file's descriptor holds qcow2
        structures, not the guest's bytes, so no descriptor stands for this stream."""
        self._check_closed()
        raise io.UnsupportedOperation(f"{type(self).__name__} has no file descriptor: guest bytes are not a host file")

    # ------------------------------------------------------------------ position
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move to `offset` from the start, the current position or the end (the virtual size).

        Past the end is allowed; a negative result raises OSError(EINVAL) as `FileIO.seek` does
        (zipfile relies on that OSError when a file is shorter than it probes for).
        """
        offset = operator.index(offset)
        self._check_closed()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._disk.virtual_size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(errno.EINVAL, f"{os.strerror(errno.EINVAL)}: seek to negative position {pos}", self.name)
        self._pos = pos
        return pos

    def tell(self) -> int:
        """The current position."""
        self._check_closed()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        """Refused (io.UnsupportedOperation) unless `size` (default: the position) equals the
        virtual size, when there is nothing to do: the disk's size is fixed. Resize the image
        instead (`qemu-img resize`)."""
        self._check_closed()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        size = self._pos if size is None else operator.index(size)
        if size != self._disk.virtual_size:
            raise io.UnsupportedOperation(
                f"cannot truncate a guest disk to {size} bytes: its virtual size is fixed at {self._disk.virtual_size}")
        return size

    # ------------------------------------------------------------------ reading
    def readinto(self, buffer: Buffer) -> int:
        """Read into `buffer` (any writable bytes-like object) at the position; 0 at or past the end."""
        self._check_closed()
        if self._pos >= self._disk.virtual_size:
            return 0
        n = self._disk.readinto_at(buffer, self._pos)  # into the caller's memory: no copy here
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes at the position (all the rest when `size` is negative or None)."""
        self._check_closed()
        if size is None or operator.index(size) < 0:
            return self.readall()
        # read_at rather than RawIOBase's readinto into a temporary: one allocation, and a small
        # read of a read-only image can take the engine's lock-free single-pread path.
        return self._read(operator.index(size))

    def readall(self) -> bytes:
        """Everything from the position to the end, in one engine call (not 8 KiB at a time).

        Like reading a whole file, this holds the rest of the disk in memory.
        """
        self._check_closed()
        return self._read(self._disk.virtual_size - self._pos)

    def _read(self, n: int) -> bytes:
        if n <= 0 or self._pos >= self._disk.virtual_size:
            return b""
        data = self._disk.read_at(self._pos, n)
        self._pos += len(data)
        return data

    # ------------------------------------------------------------------ writing
    def write(self, data: Buffer) -> int:
        """Write all of `data` (any bytes-like object) at the position and return its length.

        A write that would end past the virtual size writes nothing and raises
        OSError(ENOSPC), whether it starts inside the disk or at/after its end.
        """
        self._check_closed()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")
        mv = memoryview(data)
        n = mv.nbytes
        if n == 0:
            return 0
        end = self._pos + n
        if end > self._disk.virtual_size:
            # ENOSPC, what Linux answers for writing at the end of a block device; EFBIG is for
            # regular files that may not grow, and this is not a file that could grow.
            raise OSError(errno.ENOSPC,
                          f"{os.strerror(errno.ENOSPC)}: write of {n} bytes at offset {self._pos} would end at {end},"
                          f" past the end of the guest disk ({self._disk.virtual_size} bytes); nothing was written", self.name)
        self._disk.write_at(self._pos, mv)
        self._pos = end
        return n

    def flush(self) -> None:
        """Make what was written durable (`disk.flush()`) when writable; a no-op when read-only."""
        self._check_closed()
        # A disk someone else closed has nothing left to flush: its close flushed it.
        if self._writable and not getattr(self._disk, "closed", False):
            self._disk.flush()

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Flush, mark the stream closed and, when `close_disk`, close the disk. Idempotent."""
        if self.closed:
            return
        try:
            super().close()  # runs flush(), then marks the stream closed even if flush raised
        finally:
            if self._close_disk:
                self._disk.close()

    def _check_closed(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def __repr__(self) -> str:
        if self.closed:
            return "<qcowdisk.QcowIO [closed]>"
        return f"<qcowdisk.QcowIO name={self.name!r} mode={self.mode!r} close_disk={self._close_disk}>"


def _parse_mode(mode: str) -> bool:
    """Validate an open() mode; return whether it opens for update ("r+b")."""
    if not isinstance(mode, str):
        raise TypeError(f"open() argument 'mode' must be str, not {type(mode).__name__}")
    chars = set(mode)
    if len(chars) != len(mode) or not chars <= set("rwxabt+"):
        raise ValueError(f"invalid mode: {mode!r}")
    if chars & set("wxa"):
        raise ValueError(f"invalid mode: {mode!r}: a guest disk has a fixed size and always exists, so it cannot be"
                         f" created, truncated or appended to; use 'rb' or 'r+b' (create images with QcowFile.create)")
    if "r" not in chars:
        raise ValueError(f"invalid mode: {mode!r}: must have exactly one of create/read/write/append mode")
    if "t" in chars or "b" not in chars:
        raise ValueError(f"invalid mode: {mode!r}: a guest disk opens in binary mode only ('rb' or 'r+b');"
                         f" wrap the result in io.TextIOWrapper for text")
    return "+" in chars


@overload
def open(path: str | os.PathLike[str], mode: str = "rb", *, buffering: Literal[0], **open_options: Any) -> QcowIO: ...
@overload
def open(path: str | os.PathLike[str], mode: _ReadMode = "rb", *, buffering: Literal[-1, 1] = -1,
         **open_options: Any) -> io.BufferedReader: ...
@overload
def open(path: str | os.PathLike[str], mode: _UpdateMode, *, buffering: Literal[-1, 1] = -1,
         **open_options: Any) -> io.BufferedRandom: ...
@overload
def open(path: str | os.PathLike[str], mode: str = "rb", *, buffering: int = -1,
         **open_options: Any) -> QcowIO | io.BufferedReader | io.BufferedRandom: ...


def open(path: str | os.PathLike[str], mode: str = "rb", *, buffering: int = -1,
         **open_options: Any) -> QcowIO | io.BufferedReader | io.BufferedRandom:
    """Open a qcow2 image's guest disk as a binary file, as built-in `open()` opens a file.

    `mode` is "rb" (an `io.BufferedReader`; the image is opened read-only) or "r+b"/"rb+" (an
    `io.BufferedRandom`; read-write, taking QEMU's write lock). Other modes raise ValueError: the
    disk has a fixed size and already exists, so "w" (truncate), "x" (create) and "a" (append)
    have no meaning, and text modes are left to `io.TextIOWrapper`.

    `buffering=0` returns the raw `QcowIO`; a value above 1 is the buffer size; -1 (or any
    negative) uses 64 KiB (`DEFAULT_BUFFER_SIZE`: the default cluster size, see there why);
    1 (line buffering) is meaningless in binary mode, so, as open() does, it warns
    (RuntimeWarning) and uses the default.

    `open_options` go to `QcowFile.open` (max_nesting_depth, host_factory, ...); read-only
    comes from the mode. Closing the returned object closes the image.
    """
    update = _parse_mode(mode)
    buffering = operator.index(buffering)
    if buffering == 1:
        warnings.warn("line buffering (buffering=1) isn't supported in binary mode, the default buffer size will be"
                      " used", RuntimeWarning, stacklevel=2)
        buffering = -1
    if "readonly" in open_options:
        raise TypeError("open() derives readonly from the mode: use 'rb' or 'r+b' instead of readonly=")
    disk = QcowFile.open(path, readonly=not update, **open_options)
    try:
        raw = QcowIO(disk, close_disk=True)
        if buffering == 0:
            return raw
        size = DEFAULT_BUFFER_SIZE if buffering < 0 else buffering
        return io.BufferedRandom(raw, size) if update else io.BufferedReader(raw, size)
    except BaseException:
        disk.close()
        raise


__all__ = ["DEFAULT_BUFFER_SIZE", "QcowIO", "open"]
