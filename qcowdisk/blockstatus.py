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

Host holes. A raw layer is its host file: data where the file has data, zero (with an offset)
where it has holes, per SEEK_DATA/SEEK_HOLE. A qcow2 layer consults the host file only when it
looks metadata-preallocated (`metadata_preallocated`): then the parts of its data clusters that
are holes in the file holding them read as zero and data ("zero": true, "data": true), and from
a hole reaching the end of that file (or from its end) to the end of the run, the same
(QEMU's BDRV_BLOCK_RECURSE into file-posix).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from itertools import islice
from typing import Any

from .cache import TableCodec
from .errors import QcowError
from .format import REFT_OFFSET_MASK
from .hostio import HostFile, host_extent
from .image import Extent, LayerExtent

SECTOR = 512
# Runs one layer_status call may return at most, in units of the layer's smallest run: keeps
# memory bounded on huge images while a sparse 1 TiB image still takes few calls.
_WINDOW_GRANULES = 16384

# (length, depth, present, zero, data, offset, compressed, filename): one unmerged answer.
_Entry = tuple[int, int, bool, bool, bool, int | None, bool, str | None]


def qemu_length(image: Any) -> int:
    """The disk's size as QEMU sees it: raw files round up to 512 bytes, qcow images down."""
    size: int = image.virtual_size
    if image.format_name == "raw":
        return -(-size // SECTOR) * SECTOR
    return size // SECTOR * SECTOR


def combine_path(base: str, name: str) -> str:
    """QEMU's path_combine: a relative backing name is joined to the naming image's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(base), name)


def metadata_preallocated(image: Any) -> bool:
    """QEMU's qcow2_detect_metadata_preallocation: are clearly more clusters refcounted than the
    image file occupies on the host?

    With `real` = host bytes allocated (st_blocks * 512) // cluster size, true when at least
    max(real * 10 // 9, real + 2) clusters below the end of the file (its length rounded up to
    512, in whole clusters) have a nonzero refcount. Counts the refcounts of the image file
    itself (never an external data file). False for other formats and when a refcount block
    cannot be read (QEMU: error, not preallocated).
    """
    if image.format_name != "qcow2":
        return False
    try:
        st = os.fstat(image.host.fd)
        cs: int = image.cluster_size
        real_clusters = st.st_blocks * SECTOR // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-(-(-st.st_size // SECTOR) * SECTOR) // cs)
        width: int = image.header.refcount_bits
        per_block = cs * 8 // width
        codec = TableCodec(width, cs)
        refcounts = getattr(image, "refcounts", None)  # read-write: counts may be cached, unwritten
        if refcounts is not None:
            reftable = refcounts.reftable
        else:
            h = image.header
            raw = image.host.pread(h.refcount_table_clusters * cs, h.refcount_table_offset)
            reftable = TableCodec(64, len(raw) // 8 * 8).decode(raw[:len(raw) // 8 * 8])
        count = 0
        for ri in range(min(len(reftable), -(-end_cluster // per_block))):
            block = reftable[ri] & REFT_OFFSET_MASK
            if not block:
                continue
            if block & (cs - 1):
                return False
            cached = refcounts.cache.peek(block) if refcounts is not None else None
            if cached is not None:
                entries = cached.entries
            else:
                data = image.host.pread(cs, block)
                entries = codec.decode(data + bytes(cs - len(data)))
            n = min(per_block, end_cluster - ri * per_block)
            count += n - entries[:n].count(0)
            if count >= threshold:
                return True
        return False
    except (OSError, ValueError):
        return False


class _Layer:
    """One image of the chain, with what the walk needs to know of it."""

    __slots__ = ("image", "name", "length", "granule", "window", "_preallocated")

    def __init__(self, image: Any, name: str) -> None:
        self.image = image
        self.name = name  # as QEMU names it: the path given, or joined to the parent's directory
        self.length = qemu_length(image)
        self.granule = _granularity(image)
        self.window = _WINDOW_GRANULES * self.granule
        self._preallocated: bool | None = None

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

    def preallocated(self) -> bool:
        """Detected once per walk, on first need (QEMU: once per open, on first status call)."""
        if self._preallocated is None:
            self._preallocated = metadata_preallocated(self.image)
        return self._preallocated

    def filename(self, ext: LayerExtent) -> str | None:
        """The name of the file holding `ext` (QEMU shows one only with a host offset)."""
        if ext.host_offset is None or ext.host_path is None:
            return None
        return self.name if ext.host_path == self.image.filename else ext.host_path


def _granularity(image: Any) -> int:
    """The smallest run a layer reports: its (sub)cluster, or a host file system block."""
    cs = getattr(image, "cluster_size", 0)
    if cs:
        return int(cs) >> 5 if getattr(image, "extended_l2", False) else int(cs)
    try:
        return max(SECTOR, os.fstat(image.host.fd).st_blksize)
    except (AttributeError, OSError):
        return 4096


def _chain(image: Any) -> list[_Layer]:
    layers = [_Layer(image, image.filename)]
    while layers[-1].image.backing is not None:
        top = layers[-1]
        name = combine_path(top.name, top.image.backing_file) if top.image.backing_file else top.image.backing.filename
        layers.append(_Layer(top.image.backing, name))
    return layers


def _probe_holes(layer: _Layer, depth: int, ext: LayerExtent) -> Iterator[_Entry]:
    """A data run of a metadata-preallocated qcow2 layer, split by the host file's holes.

    QEMU (bdrv_co_block_status, BDRV_BLOCK_RECURSE): ask file-posix about the run's host bytes;
    a hole reads as zero; a hole reaching the end of the file, or the end itself, makes the
    whole rest of the run zero. Everything stays data, with its offset.
    """
    host: HostFile = layer.image.data_host
    assert ext.host_offset is not None
    name = layer.filename(ext)
    n = ext.length
    p = 0
    try:
        total = -(-os.fstat(host.fd).st_size // SECTOR) * SECTOR
    except OSError:  # QEMU ignores a failed probe: plain data
        yield (n, depth, True, False, True, ext.host_offset, False, name)
        return
    while p < n:
        off = ext.host_offset + p
        if off >= total:
            break
        k, is_data = host_extent(host.fd, off, min(n - p, total - off))
        if not is_data and off + k == total:
            break
        yield (k, depth, True, not is_data, True, off, False, name)
        p += k
    if p < n:
        yield (n - p, depth, True, True, True, ext.host_offset + p, False, name)


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
                if ext.probe_holes and layer.preallocated():
                    yield from _probe_holes(layer, depth, ext)
                else:
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
        n, depth, present, zero, data, off, compressed, name = e
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


def block_status(image: Any, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
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
            except Exception as e:  # what came before the failure is still answered first
                error = e
        yield from chunk
        if error is not None:
            raise error
        if len(chunk) < batch:
            return


__all__ = ["block_status", "metadata_preallocated", "qemu_length", "combine_path", "locked", "Extent",
           "LayerExtent"]
