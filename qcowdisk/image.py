"""The records the image protocol speaks in, and helpers every format shares.

`Image` (qcowdisk.imageprotocol, loaded from here on first use) is what an overlay needs of its
backing file and what format-independent code (block status, the CLI, convert/commit/compare)
needs of any image: qcow2, legacy qcow version 1 and raw images all implement it. `Extent` is one range of a guest disk as
`qemu-img map --output=json` describes it; `LayerExtent` is what one layer of a backing chain
says about a range (qcowdisk.blockstatus combines them into extents).
"""

from __future__ import annotations

import operator

from .hostio import ZERO_BLOCK_LENGTH as ZERO_BLOCK_LENGTH
from .hostio import zero_block as zero_block
from .record import FrozenRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .imageprotocol import Image as Image


class Extent(FrozenRecord):
    """One range of the guest disk and where its bytes come from (a `qemu-img map` entry).

    `start`/`length` are guest bytes. `depth` is the layer of the backing chain that answered
    (0 the image itself, 1 its backing file, ...); a range no layer allocates is answered by the
    bottom layer, or by the first layer whose backing file ends before the range. `present` is
    whether that layer allocates the range, `zero` whether it reads as zeros, `data` whether the
    layer stores bytes for it, `offset` the host offset of those bytes (or of a preallocated
    cluster) in `filename` when QEMU reports one (None otherwise, e.g. compressed clusters),
    `compressed` whether they are compressed clusters. `filename` names the file holding the
    bytes as QEMU names it (the image path as given, backing names joined to the directory of
    the image naming them, external data files as stored); it is set exactly when `offset` is.
    Adjacent extents always differ in some field (or `offset` is not contiguous), as
    `qemu-img map --output=json` merges them.
    """

    start: int
    """Guest offset of the range's first byte."""
    length: int
    """Length of the range in guest bytes."""
    depth: int
    """Layer of the backing chain that answered: 0 the image itself, 1 its backing file, ..."""
    present: bool
    """Whether that layer allocates the range."""
    zero: bool
    """Whether the range reads as zeros."""
    data: bool
    """Whether the layer stores bytes for the range."""
    offset: int | None
    """Host offset of those bytes in `filename` when QEMU reports one, else None."""
    compressed: bool
    """Whether the bytes are stored in compressed clusters."""
    filename: str | None
    """The file holding the bytes, named as QEMU names it; set exactly when `offset` is."""

    __slots__ = ("compressed", "data", "depth", "filename", "length", "offset", "present", "start", "zero")

    def __init__(self, start: int, length: int, depth: int, present: bool, zero: bool, data: bool,
                 offset: int | None, compressed: bool = False, filename: str | None = None) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "start", start)
        setattr_(self, "length", length)
        setattr_(self, "depth", depth)
        setattr_(self, "present", present)
        setattr_(self, "zero", zero)
        setattr_(self, "data", data)
        setattr_(self, "offset", offset)
        setattr_(self, "compressed", compressed)
        setattr_(self, "filename", filename)


class LayerExtent(FrozenRecord):
    """What ONE layer of a chain says about a range, before the chain is consulted.

    The per-format answer QEMU's drivers give (`bdrv_co_block_status` flags): `allocated`
    (BDRV_BLOCK_ALLOCATED: this layer decides the contents; false sends the range to the
    backing file), `zero` (reads as zeros), `data` (bytes are stored), `host_offset`
    (OFFSET_VALID: the host position of the range's first byte in `host_path`; also set for
    preallocated zero clusters and for unallocated subclusters of an allocated cluster), `compressed`,
    and `host_path` (the file holding the bytes as the image names it: its own `filename`, or an
    external data file's name as stored in its header). A format that consults its host file's
    holes (raw; a metadata-preallocated qcow2) reports them here already.
    """

    __slots__ = ("allocated", "compressed", "data", "host_offset", "host_path", "length", "zero")
    length: int
    allocated: bool
    zero: bool
    data: bool
    host_offset: int | None
    compressed: bool
    host_path: str | None

    def __init__(self, length: int, allocated: bool, zero: bool, data: bool, host_offset: int | None = None,
                 compressed: bool = False, host_path: str | None = None) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "length", length)
        setattr_(self, "allocated", allocated)
        setattr_(self, "zero", zero)
        setattr_(self, "data", data)
        setattr_(self, "host_offset", host_offset)
        setattr_(self, "compressed", compressed)
        setattr_(self, "host_path", host_path)


def fill_zeros(mv: memoryview, start: int, end: int) -> None:
    """Zero mv[start:end] at C speed from the shared zero block."""
    while start < end:
        n = min(end - start, ZERO_BLOCK_LENGTH)
        mv[start:start + n] = zero_block(n)
        start += n


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


def __getattr__(name: str) -> object:
    """`Image` on first use: the protocol needs `typing`, which the engine does not import
    otherwise (start-up time), so it lives in qcowdisk.imageprotocol."""
    if name == "Image":
        from .imageprotocol import Image
        return Image
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
