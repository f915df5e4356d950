"""The `Image` protocol every format implements (qcow2, legacy qcow version 1, raw).

What an overlay needs of its backing file and what format-independent code (block status, the
CLI, convert/commit/compare) needs of any image. It lives apart from the records of
qcowdisk.image because a Protocol needs `typing` at run time, which nothing on a command's path
imports otherwise; `qcowdisk.Image` and `qcowdisk.image.Image` load it on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from .hostio import Buffer
from .image import Extent, LayerExtent


@runtime_checkable
class Image(Protocol):
    """A guest disk, whatever its format: byte ranges, their status, durability."""

    @property
    def virtual_size(self) -> int:
        """The guest disk's size in bytes."""
        ...

    @property
    def filename(self) -> str:
        """The path the image was opened by."""
        ...

    @property
    def format_name(self) -> str:
        """The format's name as qemu-img spells it: "qcow2", "qcow", "raw"."""
        ...

    @property
    def backing(self) -> Image | None:
        """The opened backing image, or None."""
        ...

    @property
    def backing_file(self) -> str | None:
        """The backing file name as the image stores it, or None."""
        ...

    def readinto_at(self, buffer: Buffer, offset: int) -> int:
        """Fill `buffer` from guest `offset`; returns the bytes read (short only at the end)."""
        ...

    def read_at(self, offset: int, length: int) -> bytes:
        """`length` guest bytes at `offset`, clipped at the end of the disk."""
        ...

    def write_at(self, offset: int, data: Buffer) -> int:
        """Write `data` at guest `offset`; returns its length."""
        ...

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros."""
        ...

    def punch_hole(self, offset: int, length: int) -> None:
        """Make a range read as zeros and give its host space back where possible."""
        ...

    def flush(self) -> None:
        """Make everything written so far durable."""
        ...

    def block_status(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The extents covering [offset, offset + length), in order, merged as `qemu-img map` merges."""
        ...

    def layer_status(self, guest_offset: int, length: int) -> list[LayerExtent]:
        """What this layer alone says about [guest_offset, +length), in order, covering it exactly."""
        ...

    def close(self) -> None:
        """Release the image and everything it opened."""
        ...


__all__ = ["Image"]
