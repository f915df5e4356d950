"""Backing chains: resolve a backing name, probe its format, open it read-only.

The chain of already-open images (their real paths) travels down so loops and excessive depth
are caught before anything recurses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol

from .errors import BackingChainError, QcowError, UnsupportedFeatureError
from .hostio import HostFactory, HostFile, host_extent
from .image import Extent, LayerExtent


class ReadableImage(Protocol):
    """What an overlay needs of its backing image."""

    virtual_size: int

    def readinto_at(self, buffer: Any, offset: int) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class RawImage:
    """A raw file used as a backing image (or an external raw data view): the file is the disk."""

    format_name = "raw"
    backing = None
    backing_file = None

    def __init__(self, path: str, host_factory: HostFactory | None = None) -> None:
        """Open `path` read-only."""
        self.filename = path
        self.host = (host_factory or HostFile)(path, False)
        self.virtual_size = self.host.size()

    def readinto_at(self, buffer: Any, offset: int) -> int:
        """Read into `buffer` from guest `offset`; short only at the end of the file."""
        mv = memoryview(buffer).cast("B")
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        n = max(0, min(len(mv), self.virtual_size - offset))
        if n == 0:
            return 0
        got = self.host.preadv([mv[:n]], offset)
        if got < n:  # file shrank under us: the missing tail reads as zeros
            mv[got:n] = bytes(n - got)
        return n

    def read_at(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at `offset`, clipped at the end of the file."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset/length ({offset}, {length})")
        buf = bytearray(max(0, min(length, self.virtual_size - offset)))
        self.readinto_at(buf, offset)
        return bytes(buf)

    def layer_status(self, guest_offset: int, length: int) -> list[LayerExtent]:
        """What the raw file says about [guest_offset, +length) (QEMU's raw format over file-posix).

        Everything is allocated (a raw file has no backing file) and maps to the same host
        offset: data where the host file has data, zero where it has a hole or has ended
        (SEEK_DATA/SEEK_HOLE). The range may run to the end of the file's last 512-byte sector.
        """
        out: list[LayerExtent] = []
        pos, end = guest_offset, guest_offset + length
        while pos < end:
            n, data = host_extent(self.host.fd, pos, end - pos)
            if out and out[-1].data == data:  # the system split an extent: one run
                last = out.pop()
                out.append(LayerExtent(last.length + n, True, not data, data, last.host_offset, False, self.filename))
            else:
                out.append(LayerExtent(n, True, not data, data, pos, False, self.filename))
            pos += n
        return out

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents of [offset, offset + length), as `qemu-img map` reports them."""
        from .blockstatus import block_status
        return block_status(self, offset, length)

    def close(self) -> None:
        """Release the file."""
        self.host.close()

    def __enter__(self) -> "RawImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_format(path: str, host_factory: HostFactory | None = None) -> str:
    """Guess an image's format from its first bytes, as QEMU's probing does for these three."""
    host = (host_factory or HostFile)(path, False)
    try:
        head = host.pread(8, 0)
    finally:
        host.close()
    if head[:4] == b"QFI\xfb" and len(head) == 8:
        version = int.from_bytes(head[4:8], "big")
        return "qcow" if version == 1 else "qcow2"
    return "raw"


def resolve_backing_path(parent_path: str, name: str) -> str:
    """A relative backing name is relative to the directory of the image naming it."""
    if name.startswith("json:") or (":" in name.split("/")[0] and not os.path.exists(name)
                                    and name.split(":", 1)[0] in ("nbd", "http", "https", "ftp", "ssh", "iscsi", "file")):
        if name.startswith("file:"):
            name = name[5:]
        else:
            raise UnsupportedFeatureError(f"backing file name {name!r}: protocols and json: names are not supported")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(parent_path)), name)


def open_backing(parent_path: str, name: str, fmt: str | None, *, chain: tuple[str, ...],
                 max_nesting_depth: int, host_factory: HostFactory | None = None) -> Any:
    """Open the backing image `name` of the image at `parent_path`, read-only.

    `chain` holds the real paths of every image above (the parent last); its length is the
    parent's depth. Raises BackingChainError for missing files, loops and chains deeper than
    `max_nesting_depth`.
    """
    path = resolve_backing_path(parent_path, name)
    if len(chain) > max_nesting_depth:
        raise BackingChainError(
            f"backing chain of {parent_path!r} is too deep: more than max_nesting_depth {max_nesting_depth} backing files")
    if not os.path.exists(path):
        raise BackingChainError(f"backing file {path!r} (named {name!r} by {parent_path!r}) does not exist")
    real = os.path.realpath(path)
    if real in chain:
        raise BackingChainError(f"backing chain loops: {parent_path!r} names {name!r}, which is already in the chain")
    if fmt is None or fmt == "":
        fmt = probe_format(path, host_factory)
    try:
        if fmt == "raw":
            return RawImage(path, host_factory)
        if fmt == "qcow2":
            from .qcowfile import QcowFile
            return QcowFile._open_chain(path, readonly=True, max_nesting_depth=max_nesting_depth,
                                        host_factory=host_factory, chain=chain + (real,))
        if fmt == "qcow":
            from .qcow1 import Qcow1File
            return Qcow1File.open(path, readonly=True, max_nesting_depth=max_nesting_depth,
                                  host_factory=host_factory, _chain=chain + (real,))
    except OSError as e:
        raise BackingChainError(f"cannot open backing file {path!r} of {parent_path!r}: {e.strerror}") from None
    except RecursionError:  # pragma: no cover - depth is bounded above
        raise BackingChainError(f"backing chain of {parent_path!r} is too deep") from None
    raise UnsupportedFeatureError(f"backing file {path!r}: format {fmt!r} is not supported (qcow2, qcow, raw)")


__all__ = ["RawImage", "open_backing", "probe_format", "resolve_backing_path", "QcowError"]
