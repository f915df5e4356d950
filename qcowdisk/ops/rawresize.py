"""Resizing a raw image as `qemu-img resize -f raw` does (QEMU 7.2's raw driver over file-posix).

The file is opened read-write with the locks qemu-img takes for it (RAW_RESIZER_PERMS: raw
shares everything, so a raw writer such as qemu-io does not stop it; a qcow2 open of the file
does). The guest disk is the file, measured in whole 512-byte sectors, or the part of it after
raw's `offset` option; a `size` option fixes the disk's size, which QEMU then refuses to change.
Growing extends the file: as a hole (`preallocation="off"`; an empty file gets its first block
written, as file-posix does), allocated (`"falloc"`) or written with zeros (`"full"`); raw has
no metadata to preallocate. Shrinking truncates. The refusals carry qemu-img's messages and come
in its order: a size that is not positive, preallocation without growth, a shrink not asked for.
The file is fsynced before `resize` returns.
"""

from __future__ import annotations

from ..errors import ResizeError
from ..hostio import HostFactory, HostFile, zero_block
from ..locking import RAW_RESIZER_PERMS, ImageLock, lock_image
from ..raw import FIRST_BLOCK, raw_window
from ..resizecheck import check_new_size


class RawResizeTarget:
    """A raw image opened read-write, with qemu-img resize's locks, to change its size."""

    def __init__(self, path: str, *, offset: int = 0, size: int | None = None,
                 host_factory: HostFactory = HostFile) -> None:
        """Open `path` (raw's `offset` and `size` options as QEMU's raw driver takes them:
        RawWindowError for a window it refuses; ImageLockedError when another open holds it)."""
        self.path = path
        self.offset = offset
        self.fixed_size = size is not None
        self.host = host_factory(path, True)
        self._lock: ImageLock | None = None
        try:
            self._lock = lock_image(self.host.fd, path, write=True, perms=RAW_RESIZER_PERMS)
            raw_window(self.host.size(), offset, size)  # (refused as at QEMU's open)
            self._size = size
        except BaseException:
            self.close()
            raise

    @property
    def virtual_size(self) -> int:
        """The disk's size: the window's, or the file's length after the offset, the file
        measured in whole 512-byte sectors as QEMU measures it (bdrv_getlength)."""
        if self._size is not None:
            return self._size
        return max(0, -(-self.host.size() // 512) * 512 - self.offset)

    def resize(self, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
        """Make the disk `new_size` bytes, as `qemu-img resize [--shrink] [--preallocation=MODE]`
        does; ResizeError with qemu-img's message for what it refuses, before anything changes."""
        current = self.virtual_size
        check_new_size(current, new_size, shrink=shrink, preallocation=preallocation)
        if self.fixed_size:
            raise ResizeError("Cannot resize fixed-size raw disks")
        if preallocation == "metadata":
            raise ResizeError("Unsupported preallocation mode: metadata")
        old_end, new_end = self.host.size(), self.offset + new_size  # (file-posix: the file's own end)
        if preallocation == "falloc" and self.host.allocate(old_end, new_end - old_end):
            pass  # (posix_fallocate, as file-posix: the file grown, its new range allocated)
        elif preallocation in ("falloc", "full"):  # (falloc where the file system cannot: zeros)
            self.host.write_zeros(old_end, new_end - old_end)
        else:
            self.host.truncate(new_end)
            if old_end == 0:  # as file-posix grows an empty file: its first block allocated
                self.host.pwrite(zero_block(min(FIRST_BLOCK, new_end)), 0)
        self.host.fsync()

    def close(self) -> None:
        """Release the lock and the file (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        self.host.close()

    def __enter__(self) -> RawResizeTarget:
        """Use as a context manager: closed at the end of the block."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close."""
        self.close()


__all__ = ["RawResizeTarget"]
