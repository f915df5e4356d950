"""Block status of a backing chain: which layer answers for each range, and what it says.

The format-independent half of `qemu-img map` (QEMU 7.2): each format says what it alone knows
about a range (`layer_status` -> `LayerExtent`s); this module walks the chain the way
`bdrv_co_block_status` + qemu-img's `get_block_status` do and merges the answers the way
`img_map` does (`entry_mergeable`), so the extents equal the entries of
`qemu-img map --output=json`.

Rules, per range, starting at depth 0 (the image itself):

* the layer allocates the range (data or zero): it answers at this depth, present; `offset` and
  `filename` when it reports a host offset;
* it does not, and has no backing file: zero at this depth, not present (with the host offset of
  an allocated cluster holding an unallocated subcluster, as QEMU reports it);
* it does not, and the range starts at or past the end of its backing file: the same;
* otherwise the backing file answers the part of the range it covers, at depth + 1, and the
  rest (past its end) is zero at this depth.

QEMU's sizes: a raw file is as long as its size rounded up to whole 512-byte sectors (the tail
past the end of the file reads as a hole); qcow images count whole sectors only.

Host holes are the formats' business: a raw layer is its host file (data where the file has
data, zero where it has holes, per SEEK_DATA/SEEK_HOLE), and a metadata-preallocated qcow2
layer splits its data runs by the holes of the file holding them (qcowdisk.qcow2.status).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from itertools import islice

from .errors import QcowError
from .image import Extent, LayerExtent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .image import Image

SECTOR = 512
# Runs one layer_status call may return at most, in units of the layer's smallest run: keeps
# memory bounded on huge images while a sparse 1 TiB image still takes few calls.
_WINDOW_GRANULES = 16384

# (length, depth, present, zero, data, offset, compressed, filename): one unmerged answer.
_Entry = tuple[int, int, bool, bool, bool, int | None, bool, str | None]


def qemu_length(image: Image) -> int:
    """The disk's size as QEMU sees it: raw files round up to 512 bytes, qcow images down."""
    size = image.virtual_size
    if image.format_name == "raw":
        return -(-size // SECTOR) * SECTOR
    return size // SECTOR * SECTOR


def combine_path(base: str, name: str) -> str:
    """QEMU's path_combine: a relative backing name is joined to the naming image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(base), name)


class _Layer:
    """One image of the chain, with what the walk needs to know of it."""

    __slots__ = ("granule", "image", "length", "name", "window")

    def __init__(self, image: Image, name: str) -> None:
        self.image = image
        self.name = name  # as QEMU names it: the path given, or joined to the parent's directory
        self.length = qemu_length(image)
        self.granule = _granularity(image)
        self.window = _WINDOW_GRANULES * self.granule

    def status(self, guest_offset: int, length: int) -> tuple[list[LayerExtent], Exception | None]:
        """layer_status, or on a bad table entry what precedes it and the error.

        QEMU reports every range before the one it cannot read, so the caller answers those
        before it fails.
        """
        try:
            return self.image.layer_status(guest_offset, length), None
        except (QcowError, OSError) as e:
            error: Exception = e
        out: list[LayerExtent] = []
        pos, end = guest_offset, guest_offset + length
        while pos < end:
            step = min(end, (pos // self.granule + 1) * self.granule) - pos
            try:
                out.extend(self.image.layer_status(pos, step))
            except (QcowError, OSError) as e:
                return out, e
            pos += step
        return out, error

    def filename(self, ext: LayerExtent) -> str | None:
        """The name of the file holding `ext` (QEMU shows one only with a host offset)."""
        if ext.host_offset is None or ext.host_path is None:
            return None
        return self.name if ext.host_path == self.image.filename else ext.host_path


def _granularity(image: Image) -> int:
    """The smallest run a layer reports: its (sub)cluster, or a host file system block."""
    cs = getattr(image, "cluster_size", 0)
    if cs:
        return int(cs) >> 5 if getattr(image, "extended_l2", False) else int(cs)
    try:
        return max(SECTOR, os.fstat(image.host.fd).st_blksize)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return 4096


def _chain(image: Image) -> list[_Layer]:
    layers = [_Layer(image, image.filename)]
    while (backing := layers[-1].image.backing) is not None:
        top = layers[-1]
        name = combine_path(top.name, top.image.backing_file) if top.image.backing_file else backing.filename
        layers.append(_Layer(backing, name))
    return layers


def _entries(layers: list[_Layer], depth: int, start: int, end: int) -> Iterator[_Entry]:
    """Unmerged answers covering [start, end) (end within layer `depth`'s length)."""
    layer = layers[depth]
    below = layers[depth + 1] if depth + 1 < len(layers) else None
    pos = start
    while pos < end:
        extents, error = layer.status(pos, min(end - pos, layer.window))
        for ext in extents:
            n = ext.length
            if ext.allocated:
                yield (n, depth, True, ext.zero, ext.data, ext.host_offset, ext.compressed, layer.filename(ext))
            else:
                split = pos if below is None else min(pos + n, max(pos, below.length))
                if split > pos:
                    yield from _entries(layers, depth + 1, pos, split)
                if split < pos + n:  # no backing file, or past its end: zero here
                    off = None if ext.host_offset is None else ext.host_offset + (split - pos)
                    yield (pos + n - split, depth, False, True, False, off, False, layer.filename(ext))
            pos += n
        if error is not None:
            raise error


def _merged(entries: Iterator[_Entry], start: int) -> Iterator[Extent]:
    """Merge adjacent answers exactly as img_map's entry_mergeable does."""
    cur: list[Any] | None = None
    for e in entries:
        n, depth, present, zero, data, off, _compressed, name = e  # compressed: implied by offset None
        if cur is not None and cur[1] == depth and cur[2] == present and cur[3] == zero and cur[4] == data \
                and cur[7] == name and (cur[5] is None) == (off is None) \
                and (off is None or cur[5] + cur[0] == off):
            cur[0] += n
            continue
        if cur is not None:
            yield Extent(start, cur[0], cur[1], cur[2], cur[3], cur[4], cur[5], cur[6], cur[7])
            start += cur[0]
        cur = list(e)
    if cur is not None:
        yield Extent(start, cur[0], cur[1], cur[2], cur[3], cur[4], cur[5], cur[6], cur[7])


def block_status(image: Image, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
    """The extents of [offset, offset + length) of `image` and its backing chain, merged.

    They cover the range exactly, in order, clipped to the disk as QEMU sizes it
    (`qemu_length`), and equal the entries `qemu-img map --output=json` prints for it. Lazy:
    memory stays bounded whatever the image's size. The caller holds the image's lock while
    iterating (the image's `block_status` method does that).
    """
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"negative offset or length: offset={offset} length={length}")
    layers = _chain(image)
    end = layers[0].length if length is None else min(layers[0].length, offset + length)
    if offset >= end:
        return iter(())
    return _merged(_entries(layers, 0, offset, end), offset)


def locked(extents: Iterator[Extent], lock: AbstractContextManager[Any], check: Callable[[], None],
           batch: int = 256) -> Iterator[Extent]:
    """Iterate `extents` taking `lock` (and calling `check`) around each batch, never across a yield."""
    while True:
        chunk: list[Extent] = []
        error: Exception | None = None
        with lock:
            check()
            try:
                chunk.extend(islice(extents, batch))
            except Exception as e:  # noqa: BLE001 - re-raised below, after what came before it
                error = e
        yield from chunk
        if error is not None:
            raise error
        if len(chunk) < batch:
            return


__all__ = ["block_status", "qemu_length", "combine_path", "locked", "Extent", "LayerExtent"]
