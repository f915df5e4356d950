"""Raw images: the file is the guest disk. Used as backing files and external raw data views."""

from __future__ import annotations

from collections.abc import Iterator

from . import formats
from .blockstatus import block_status
from .errors import ReadOnlyError
from .hostio import HostFactory, HostFile, host_extent
from .image import Extent, LayerExtent, fill_zeros
from .locking import ImageLock, lock_image

# file-posix's allocate_first_block: the zeros QEMU writes at the start of a raw file it creates
# or grows from empty, so that the file's first block is allocated
FIRST_BLOCK = 4096

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .hostio import Buffer


class RawWindowError(formats.OpenOptionError):
    """A raw `offset`/`size` window QEMU's raw driver refuses (its message)."""


def raw_window(file_size: int, offset: int, size: int | None) -> int:
    """The length of the guest disk QEMU's raw driver (raw_apply_options) makes of the bytes
    [offset, offset + size) of a file `file_size` long (`size` None: to the end of the file);
    RawWindowError with QEMU's message for a window it refuses. QEMU measures the file in
    whole 512-byte sectors (the tail of the last reads as zeros); the whole file is its own
    length (qemu_length rounds it)."""
    if offset == 0 and size is None:
        return file_size
    file_size = -(-file_size // 512) * 512
    if offset > file_size:
        raise RawWindowError(f"Offset ({offset}) cannot be greater than size of the containing file ({file_size})")
    if size is None:
        return file_size - offset
    if file_size - offset < size:
        raise RawWindowError(f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the "
                             f" actual size of the containing file ({file_size})")  # (QEMU's two spaces)
    if size % 512:
        raise RawWindowError("Specified size is not multiple of 512")
    return size


class RawImage:
    """A raw file opened read-only as a guest disk (implements `qcowdisk.image.Image`); with
    `offset`/`size`, the window of the file QEMU's raw driver options make the disk."""

    format_name = "raw"
    backing: None = None
    backing_file: None = None

    def __init__(self, path: str, host_factory: HostFactory | None = None, *, host: HostFile | None = None,
                 force_share: bool = False, offset: int = 0, size: int | None = None) -> None:
        """Open `path` read-only (or take the already opened `host`), with QEMU's reader locks
        unless `force_share`; the disk is the file's bytes from `offset`, `size` of them (None:
        to the end), checked as QEMU checks them (RawWindowError)."""
        self.filename = path
        self.host = host if host is not None else (host_factory or HostFile)(path, False)
        self._image_lock: ImageLock | None = None
        self.offset = offset
        try:
            if not force_share:
                self._image_lock = lock_image(self.host.fd, path, write=False)
            self.virtual_size = raw_window(self.host.size(), offset, size)
        except BaseException:
            self.host.close()
            raise

    def readinto_at(self, buffer: Buffer, offset: int) -> int:
        """Read into `buffer` from guest `offset`; short only at the end of the file."""
        mv = memoryview(buffer).cast("B")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        n = max(0, min(len(mv), self.virtual_size - offset))
        if n == 0:
            return 0
        got = self.host.preadv([mv[:n]], self.offset + offset)
        if got < n:  # file shrank under us: the missing tail reads as zeros
            fill_zeros(mv, got, n)
        return n

    def read_at(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at `offset`, clipped at the end of the file."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset/length ({offset}, {length})")
        buf = bytearray(max(0, min(length, self.virtual_size - offset)))
        self.readinto_at(buf, offset)
        return bytes(buf)

    def _refuse_write(self) -> ReadOnlyError:
        return ReadOnlyError(f"raw image {self.filename!r} is open read-only")

    def write_at(self, offset: int, data: Buffer) -> int:
        """Refused: raw images are opened read-only."""
        raise self._refuse_write()

    def write_zeroes(self, offset: int, length: int) -> None:
        """Refused: raw images are opened read-only."""
        raise self._refuse_write()

    def punch_hole(self, offset: int, length: int) -> None:
        """Refused: raw images are opened read-only."""
        raise self._refuse_write()

    def flush(self) -> None:
        """Nothing to flush on a read-only image."""

    def layer_status(self, guest_offset: int, length: int) -> list[LayerExtent]:
        """What the raw file says about [guest_offset, +length) (QEMU's raw format over file-posix).

        Everything is allocated (a raw file has no backing file) and maps to the same host
        offset: data where the host file has data, zero where it has a hole or has ended
        (SEEK_DATA/SEEK_HOLE). The range may run to the end of the file's last 512-byte sector.
        With an `offset` window, host offsets are the guest's plus it.
        """
        out: list[LayerExtent] = []
        pos, end = guest_offset, guest_offset + length
        while pos < end:
            n, data = host_extent(self.host.fd, self.offset + pos, end - pos)
            if out and out[-1].data == data:  # the system split an extent: one run
                last = out.pop()
                out.append(LayerExtent(last.length + n, True, not data, data, last.host_offset, False, self.filename))
            else:
                out.append(LayerExtent(n, True, not data, data, self.offset + pos, False, self.filename))
            pos += n
        return out

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents of [offset, offset + length), as `qemu-img map` reports them."""
        return block_status(self, offset, length)

    def close(self) -> None:
        """Release the file and its lock."""
        image_lock, self._image_lock = self._image_lock, None
        if image_lock is not None:
            image_lock.release()
        self.host.close()

    def __enter__(self) -> RawImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_raw(path: str, options: formats.OpenOptions, chain: tuple[str, ...]) -> RawImage:
    if len(chain) > 1:  # a backing file: named by the image above, so confined
        host = formats.open_named_file(path, False, options, "backing file", chain[-2])
    else:
        host = options.host_factory(path, False)
    return RawImage(path, host=host, force_share=options.force_share, offset=options.raw_offset,
                    size=options.raw_size)


formats.register(formats.FormatDriver("raw", lambda head: 1, _open_raw))
