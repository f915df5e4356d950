"""Compare two guest disks as `qemu-img compare` (QEMU 7.2) does, with the same verdicts.

QEMU's loop, step by step: at each offset it asks both images for their block status
(`bdrv_block_status_above`: the status word of the first layer of each chain that allocates
the range, and how far that answer holds), and takes the shorter of the two answers as the
next chunk. Ranges that read as zero in both are skipped unread; ranges allocated in both are
read (at most 2 MiB at a time, into two reused buffers) and compared 512-byte sector by
sector; a range allocated in one image only must read as zeros there. Past the end of the
shorter image, the longer one's tail must read as zeros (after "Warning: Image size
mismatch!"). Strict mode refuses images of different sizes and any chunk whose two status words
differ.

The status words and their lengths are QEMU's own, because strict mode's verdict and offset
depend on them (a run ending at the end of the disk carries QEMU's EOF flag, a qcow2 answer
stops at the end of an L2 table, a qcow answer at the end of a cluster...): `_Chain` rebuilds
them from each format's `layer_status` runs. (Host holes in a metadata-preallocated qcow2 make
its data read as zero there, as `layer_status` reports; QEMU's RECURSE flag itself is cleared
once used, as in QEMU 7.2's stable releases, so it never shows.) Memory stays bounded whatever the disks' sizes:
runs are fetched window by window, and data is read into two buffers of `IO_BUF_SIZE`.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable

from .. import formats
from ..blockstatus import qemu_length
from ..errors import QcowError
from ..image import LayerExtent, fill_zeros, zero_block
from ..qcow1 import Qcow1File
from ..qcow2.file import QcowFile
from ..record import FrozenRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    from ..image import Image

    Reason = Literal["identical", "content", "block-status", "size"]

IO_BUF_SIZE = 2 << 20  # qemu-img's IO_BUF_SIZE: the most compared in one step
SECTOR = 512
INT_MAX = (1 << 31) - 1

# QEMU's BDRV_BLOCK_* status flags (include/block/block-common.h)
DATA = 0x01
ZERO = 0x02
OFFSET_VALID = 0x04
ALLOCATED = 0x10
EOF = 0x20

Progress = Callable[[int, int], object]
# what names an image rather than being one (an isinstance check on the Image protocol would
# import typing, which a command's start-up does without)
_PATH_TYPES = (str, bytes, os.PathLike)


class CompareResult(FrozenRecord):
    """The verdict of `compare`.

    `identical` is qemu-img's exit status 0 (1 otherwise). `reason` says why they differ:
    "content" (bytes differ, or one image has data where the other reads zeros), "block-status"
    (strict mode: the two images' block status differ at `offset`), "size" (strict mode: the
    sizes differ); "identical" otherwise. `offset` is the guest offset qemu-img reports (the
    start of the first differing 512-byte sector, counted from where QEMU's chunk starts), None
    when there is none. `size_a`/`size_b` are the disk sizes as QEMU sees them. `messages` are
    the lines `qemu-img compare` prints on stdout, in order.
    """

    __slots__ = ("identical", "messages", "offset", "reason", "size_a", "size_b")
    identical: bool
    """Whether qemu-img compare would exit 0."""
    reason: Reason
    """Why they differ ("content", "block-status", "size"), or "identical"."""
    offset: int | None
    """The guest offset qemu-img reports for the first difference, None when there is none."""
    size_a: int
    """The first disk's size as QEMU sees it."""
    size_b: int
    """The second disk's size as QEMU sees it."""
    messages: tuple[str, ...]
    """The lines `qemu-img compare` prints on stdout, in order."""

    def __init__(self, identical: bool, reason: Reason, offset: int | None, size_a: int, size_b: int,
                 messages: tuple[str, ...]) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "identical", identical)
        setattr_(self, "reason", reason)
        setattr_(self, "offset", offset)
        setattr_(self, "size_a", size_a)
        setattr_(self, "size_b", size_b)
        setattr_(self, "messages", messages)


    @property
    def sizes_differ(self) -> bool:
        """Whether the two disks have different sizes (qemu-img's "Image size mismatch")."""
        return self.size_a != self.size_b


class CompareError(QcowError):
    """Comparing failed part way: an image could not be read. `status` is qemu-img's exit status
    (3: its block status could not be determined, 4: its data could not be read) and the message
    is qemu-img's."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        """qemu-img compare's exit status for this failure (3 or 4)."""


def compare(a: str | os.PathLike[str] | Image, b: str | os.PathLike[str] | Image, *, strict: bool = False,
            a_format: str | None = None, b_format: str | None = None, progress: Progress | None = None,
            force_share: bool = False) -> CompareResult:
    """Compare the guest disks `a` and `b` as `qemu-img compare [-s] [-f A_FMT] [-F B_FMT] A B` does.

    `a` and `b` are image paths (opened read-only with their backing chains, the format probed
    unless `a_format`/`b_format` name it; `force_share` as `qemu-img -U`) or already opened
    `Image`s (left open). `progress(done_bytes, total_bytes)` is called once at the start and
    after every step, `done_bytes` never decreasing, and with `total_bytes` (the larger size)
    when the images are found identical; an exception from it stops the comparison and
    propagates, every image opened here closed. Raises CompareError when an image cannot be
    read part way (qemu-img's exit statuses 3 and 4); opening errors propagate as they are.
    """
    with contextlib.ExitStack() as stack:
        img_a = _opened(a, a_format, force_share, stack)
        img_b = _opened(b, b_format, force_share, stack)
        name_a = os.fspath(a) if isinstance(a, _PATH_TYPES) else img_a.filename
        name_b = os.fspath(b) if isinstance(b, _PATH_TYPES) else img_b.filename
        return _Comparison(img_a, name_a, img_b, name_b, strict, progress).run()


def _opened(src: str | os.PathLike[str] | Image, fmt: str | None, force_share: bool,
            stack: contextlib.ExitStack) -> Image:
    if not isinstance(src, _PATH_TYPES):  # an opened image
        return src
    img = formats.open_image(os.fspath(src), fmt, formats.OpenOptions(readonly=True, force_share=force_share))
    stack.callback(img.close)
    return img


# ------------------------------------------------------------------------------------------
# QEMU's block status, call by call
# ------------------------------------------------------------------------------------------

def _continues(prev: LayerExtent, nxt: LayerExtent) -> bool:
    """Whether `nxt` continues the run `prev` (same answer, host offsets contiguous)."""
    if prev.compressed or nxt.compressed:
        return False  # QEMU answers for compressed clusters one at a time
    if (prev.allocated, prev.zero, prev.data, prev.host_path) != (nxt.allocated, nxt.zero, nxt.data, nxt.host_path):
        return False
    if prev.host_offset is None or nxt.host_offset is None:
        return prev.host_offset is None and nxt.host_offset is None
    return prev.host_offset + prev.length == nxt.host_offset


class _Run:
    """A run of one layer: [start, end), answered as `ext` (whose length is the run's so far)."""

    __slots__ = ("end", "ext", "start")

    def __init__(self, start: int, ext: LayerExtent) -> None:
        self.start = start
        self.end = start + ext.length
        self.ext = ext


class _Runs:
    """One layer's `layer_status` as maximal runs, fetched a window at a time, forward only."""

    __slots__ = ("_fetched", "_image", "_items", "_length", "_window")

    def __init__(self, image: Image, length: int, window: int) -> None:
        self._image = image
        self._length = length
        self._window = window
        self._items: deque[_Run] = deque()  # contiguous, in order
        self._fetched = 0  # where the next window starts

    def _fetch(self) -> None:
        pos = self._fetched
        items = self._items
        for ext in self._image.layer_status(pos, min(self._window, self._length - pos)):
            last = items[-1] if items else None
            if last is not None and last.end == pos and _continues(last.ext, ext):
                prev = last.ext  # the run keeps its first host offset; only its length grows
                last.ext = LayerExtent(prev.length + ext.length, prev.allocated, prev.zero, prev.data,
                                       prev.host_offset, prev.compressed, prev.host_path)
                last.end += ext.length
            else:
                items.append(_Run(pos, ext))
            pos += ext.length
        if pos == self._fetched:  # the protocol promises the whole range: never spin on an empty answer
            raise QcowError(f"block status of {self._image.filename!r} at {pos} covers nothing")
        self._fetched = pos

    def at(self, offset: int, limit: int) -> tuple[LayerExtent, int]:
        """The run holding `offset` and where it ends (looked for no further than `limit`).

        Offsets never decrease from one call to the next.
        """
        items = self._items
        while items and items[0].end <= offset:
            items.popleft()
        if not items:
            self._fetched = max(self._fetched, offset)
            self._fetch()
        first = items[0]
        while first.end < limit and first is items[-1] and self._fetched < self._length:
            self._fetch()
        return first.ext, first.end


class _Layer:
    """One image of a chain, answering as QEMU's bdrv_co_block_status does for that node."""

    __slots__ = ("backing_length", "has_backing", "int_max", "length", "raw", "runs", "span", "supports_backing")

    def __init__(self, image: Image, backing_length: int | None) -> None:
        self.length = qemu_length(image)
        self.raw = image.format_name == "raw"
        self.supports_backing = not self.raw
        self.has_backing = backing_length is not None
        self.backing_length = backing_length or 0
        self.span = 0  # QEMU's answers never cross a multiple of this (0: no limit)
        self.int_max = False  # qcow2 answers at most INT_MAX bytes
        granule = 4096
        if isinstance(image, QcowFile):
            cs = image.cluster_size
            self.span = cs * (cs // (16 if image.extended_l2 else 8))  # one L2 table
            self.int_max = True
            granule = cs >> 5 if image.extended_l2 else cs
        elif isinstance(image, Qcow1File):
            self.span = image.cluster_size  # qcow_co_block_status: one cluster at a time
            granule = image.cluster_size
        self.runs = _Runs(image, self.length, max(granule, SECTOR) * 16384)

    def call(self, offset: int, nbytes: int) -> tuple[int, int]:
        """(status flags, bytes they hold for) at `offset`, for at most `nbytes` bytes."""
        if offset >= self.length:
            return EOF, 0
        nbytes = min(nbytes, self.length - offset)
        limit = offset + (min(nbytes, INT_MAX) if self.int_max else nbytes)
        if self.span:
            limit = min(limit, (offset // self.span + 1) * self.span)
        ext, end = self.runs.at(offset, limit)
        pnum = min(end, limit) - offset
        if self.raw:  # raw over file-posix: data or a hole, at the same offset in the file
            flags = (DATA if ext.data else ZERO) | OFFSET_VALID
        elif ext.compressed:
            flags = DATA
        else:
            flags = 0 if ext.host_offset is None else OFFSET_VALID
            if ext.data:
                flags |= DATA  # (with metadata preallocation, QEMU's RECURSE is gone once used)
            if ext.zero:
                flags |= ZERO
        if flags & (DATA | ZERO):
            flags |= ALLOCATED
        elif self.supports_backing and (not self.has_backing or offset >= self.backing_length):
            flags |= ZERO
        if offset + pnum == self.length:
            flags |= EOF
        return flags, pnum


class _Chain:
    """An image and its backing chain, answering as bdrv_block_status_above(bs, NULL, ...)."""

    def __init__(self, image: Image, name: str) -> None:
        self.name = name
        images = [image]
        while (below := images[-1].backing) is not None:
            images.append(below)
        lengths: list[int | None] = [qemu_length(i) for i in images[1:]]
        self.layers = [_Layer(img, below_len) for img, below_len in zip(images, [*lengths, None], strict=True)]
        self.length = self.layers[0].length

    def status(self, offset: int, nbytes: int) -> tuple[int, int]:
        """(status flags, bytes they hold for) at `offset`; a failure to read the tables is
        qemu-img's "Sector allocation test failed" (status 3)."""
        try:
            return self._status(offset, nbytes)
        except (QcowError, OSError) as e:
            raise CompareError(f"Sector allocation test failed for {self.name}", 3) from e

    def _status(self, offset: int, nbytes: int) -> tuple[int, int]:
        layers = self.layers
        flags, pnum = layers[0].call(offset, nbytes)
        if pnum == 0 or flags & ALLOCATED:
            return flags, pnum
        eof = offset + pnum if flags & EOF else -1
        nbytes = pnum
        for layer in layers[1:]:
            flags, pnum = layer.call(offset, nbytes)
            if pnum == 0:  # past the end of a short backing file: zeros, allocated here
                flags, pnum = ZERO | ALLOCATED, nbytes
                break
            if flags & ALLOCATED:
                flags &= ~EOF  # the layer's end is not the disk's
                break
            nbytes = pnum
        if offset + pnum == eof:
            flags |= EOF
        return flags, pnum


# ------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------

def first_difference(a: bytearray, b: memoryview, n: int) -> int:
    """Offset of the first 512-byte sector of a[:n] and b[:n] that differs (-1: none)."""
    if a.startswith(b[:n]):
        return -1
    lo, hi = 0, n  # the first difference lies in [lo, hi)
    while hi - lo > SECTOR:
        mid = lo + max(SECTOR, (hi - lo) // 2 // SECTOR * SECTOR)
        if a.startswith(b[lo:mid], lo):
            lo = mid
        else:
            hi = mid
    return lo


def first_nonzero(a: bytearray, n: int) -> int:
    """Offset of the first 512-byte sector of a[:n] that is not all zeros (-1: none)."""
    zeros = zero_block(min(n, IO_BUF_SIZE))
    if a.startswith(zeros[:n]):
        return -1
    stripped = len(a) - len(a.lstrip(b"\0"))  # the first nonzero byte
    return stripped // SECTOR * SECTOR


class _Comparison:
    def __init__(self, img_a: Image, name_a: str, img_b: Image, name_b: str, strict: bool,
                 progress: Progress | None) -> None:
        self.images = (img_a, img_b)
        self.chains = (_Chain(img_a, name_a), _Chain(img_b, name_b))
        self.strict = strict
        self.progress = progress
        self.bufs: list[bytearray] = []
        self.messages: list[str] = []

    def _buffer(self, i: int) -> bytearray:
        while len(self.bufs) <= i:
            self.bufs.append(bytearray(IO_BUF_SIZE))
        return self.bufs[i]

    def _read(self, which: int, offset: int, n: int, buf: int) -> bytearray:
        """n bytes of image `which` at `offset` into buffer `buf` (zeros past its end)."""
        data = self._buffer(buf)
        view = memoryview(data)[:n]
        try:
            got = self.images[which].readinto_at(view, offset)
        except (QcowError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CompareError(f"Error while reading offset {offset} of {self.chains[which].name}: {why}", 4) from e
        if got < n:  # the end of a raw file inside its last sector: QEMU reads zeros
            fill_zeros(view, got, n)
        return data

    def _result(self, reason: Reason, offset: int | None, line: str) -> CompareResult:
        self.messages.append(line)
        a, b = self.chains
        return CompareResult(reason == "identical", reason, offset, a.length, b.length, tuple(self.messages))

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def _empty(self, which: int, offset: int, n: int) -> int:
        """qemu-img's check_empty_sectors: the offset of data in a range that must read as zeros, or -1."""
        idx = first_nonzero(self._read(which, offset, n, 0), n)
        return -1 if idx < 0 else offset + idx

    def run(self) -> CompareResult:
        chain_a, chain_b = self.chains
        size_a, size_b = chain_a.length, chain_b.length
        total, base = min(size_a, size_b), max(size_a, size_b)
        self._report(0, base)
        if self.strict and size_a != size_b:
            return self._result("size", None, "Strict mode: Image size mismatch!")
        offset = 0
        while offset < total:
            status_a, pnum_a = chain_a.status(offset, size_a - offset)
            status_b, pnum_b = chain_b.status(offset, size_b - offset)
            chunk = min(pnum_a, pnum_b)
            if self.strict and status_a != status_b:
                return self._result("block-status", offset, f"Strict mode: Offset {offset} block status mismatch!")
            if status_a & ZERO and status_b & ZERO:
                pass
            elif (status_a & ALLOCATED) == (status_b & ALLOCATED):
                if status_a & ALLOCATED:
                    chunk = min(chunk, IO_BUF_SIZE)
                    data_a = self._read(0, offset, chunk, 0)
                    data_b = self._read(1, offset, chunk, 1)
                    idx = first_difference(data_a, memoryview(data_b), chunk)
                    if idx >= 0:
                        return self._result("content", offset + idx, f"Content mismatch at offset {offset + idx}!")
            else:
                chunk = min(chunk, IO_BUF_SIZE)
                at = self._empty(0 if status_a & ALLOCATED else 1, offset, chunk)
                if at >= 0:
                    return self._result("content", at, f"Content mismatch at offset {at}!")
            offset += chunk
            self._report(offset, base)
        if size_a != size_b:
            self.messages.append("Warning: Image size mismatch!")
            longer = 0 if size_a > size_b else 1
            chain = self.chains[longer]
            while offset < base:
                status, chunk = chain.status(offset, base - offset)
                if status & ALLOCATED and not status & ZERO:
                    chunk = min(chunk, IO_BUF_SIZE)
                    at = self._empty(longer, offset, chunk)
                    if at >= 0:
                        return self._result("content", at, f"Content mismatch at offset {at}!")
                offset += chunk
                self._report(offset, base)
        return self._result("identical", None, "Images are identical.")


__all__ = ["compare", "CompareResult", "CompareError", "first_difference", "first_nonzero", "IO_BUF_SIZE"]
