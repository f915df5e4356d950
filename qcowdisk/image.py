"""The image protocol every format implements, and the records it speaks in.

`Image` is what an overlay needs of its backing file and what format-independent code
(block status, the CLI, later convert/commit/compare) needs of any image: qcow2, legacy qcow
version 1 and raw images all implement it. `Extent` is one range of a guest disk as
`qemu-img map --output=json` describes it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .hostio import Buffer


@dataclass(frozen=True, slots=True)
class Extent:
    """One range of the guest disk and where its bytes come from (a `qemu-img map` entry).

    `start`/`length` are guest bytes. `depth` is the layer of the backing chain that answered
    (0 the image itself, 1 its backing file, ...; one past the bottom for ranges no layer
    allocates). `present` is whether some layer allocates the range, `zero` whether it reads as
    zeros, `data` whether bytes are stored for it, `offset` the host offset of those bytes in
    `filename` when they are stored uncompressed (None otherwise), `compressed` whether they are
    a compressed cluster.
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    compressed: bool = False
    filename: str | None = None


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

    def close(self) -> None:
        """Release the image and everything it opened."""
        ...


_ZEROS = bytes(1 << 21)


def fill_zeros(mv: memoryview, start: int, end: int) -> None:
    """Zero mv[start:end] at C speed from a shared zero block."""
    while start < end:
        n = min(end - start, len(_ZEROS))
        mv[start:start + n] = _ZEROS[:n]
        start += n


def zero_block(length: int) -> memoryview:
    """A read-only view of `length` (at most 2 MiB) zero bytes, shared."""
    return memoryview(_ZEROS)[:length]


ZERO_BLOCK_LENGTH = len(_ZEROS)


def as_index(value: object, name: str) -> int:
    """`value` as a non-negative int, or TypeError/ValueError naming the parameter."""
    if type(value) is not int:
        try:
            value = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    assert isinstance(value, int)
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value
