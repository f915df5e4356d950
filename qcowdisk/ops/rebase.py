"""Change an image's backing file as `qemu-img rebase` (QEMU 7.2) does.

Safe mode (qemu-img's default) keeps the guest view: wherever the image does not allocate a
range itself, the range is compared through the old backing chain and through the new backing
file (zeros past its end, or everywhere for `backing_file=""`), and what differs is written into
the image with what the old chain showed. Block status comes first: ranges that read as zeros
through both chains are skipped unread (a sparse 100 GiB chain rebases in moments), ranges that
read as zeros only through the old chain become `write_zeroes`. The rest is read in 2 MiB steps
and compared at C speed, then granule by granule (the image's cluster, or subcluster with
extended L2): a differing granule is written whole, which allocates exactly what qemu-img's
sector-wise writes allocate (a cluster is allocated whole either way) with the same bytes.
(qemu-img writes zeros as data where the old chain reads zeros inside its length; here they
become zero clusters: the same guest view, less space.) Then the header names the new backing
file and format, in one header switch after the copied data is durable,
so a power cut leaves the old name (with data copied that reads the same through it) or the new
one. Unsafe mode (`-u`, crosvm's set_backing_file) only rewrites the name and format.

An image with enabled persistent bitmaps (QcowFile records every write in them) is rebased
the way qemu-img writes, so that they get the same bits: every range is compared (no zeros
shortcut) and runs of differing 512-byte sectors are written, not whole granules.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

from .. import formats
from ..errors import QcowError
from ..hostio import HostFactory, HostFile
from ..image import fill_zeros
from ..qcow2.file import QcowFile
from .inflight import InFlight
from .writeback import WritebackPacer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image

IO_BUF_SIZE = 2 << 20  # qemu-img rebase's step
SECTOR = 512  # qemu-img's compare_buffers unit
WINDOW = 256 << 20
IN_FLIGHT = 4  # compare steps at once (worker threads, each with two buffers)

Progress = Callable[[int, int], object]


class RebaseError(QcowError):
    """The rebase cannot be done; the message is qemu-img's."""


def rebase(image: str | os.PathLike[str], backing_file: str | os.PathLike[str] | None, *,
           backing_format: str | None = None, unsafe: bool = False, progress: Progress | None = None,
           host_factory: HostFactory | None = None, options: formats.OpenOptions | None = None,
           backing_host_factory: HostFactory | None = None) -> None:
    """Make the qcow2 image at `image` name `backing_file` (None or "": no backing file, the
    image becomes standalone) with `backing_format`, as `qemu-img rebase [-u] -b BACKING [-F FMT]`.

    Safe mode (the default) first copies into the image whatever reads differently through the
    new backing file than through the old chain, so the guest view does not change; the new
    backing file's format is probed when `backing_format` is None (and then recorded). Unsafe
    mode only rewrites the header (the backing file need not exist). `progress(done, total)`
    is called with the guest offset reached and the disk size (safe mode); an exception from it
    stops the rebase and propagates, with every image closed and the header unchanged. Raises
    RebaseError with qemu-img's message when the new backing file cannot be opened.
    `host_factory` is the host I/O seam (tests record every write there) for the image and its
    old chain (qemu-img's -t); `backing_host_factory` (default HostFile) reads the new backing
    file (qemu-img's -T), unless that file is already in the chain, whose node qemu-img reuses
    with the chain's cache mode. `options` open the
    image as `--image-opts` says: its cache sizes, and in safe mode `backing`/`backing_node`
    choose the old chain compared with (QEMU's backing options; `backing=False`: none).
    """
    hf = host_factory or HostFile
    given = options or formats.OpenOptions()
    path = os.fspath(image)
    name = os.fspath(backing_file) if backing_file is not None else ""
    with contextlib.ExitStack() as stack:
        if unsafe:
            img = _open(path, given.replace(backing=False, backing_node=None, host_factory=hf))
            stack.callback(img.close)
            img.set_backing_file(name or None, backing_format if name else None, open_backing=False)
            return
        img = _open(path, given.replace(host_factory=hf))
        stack.callback(img.close)
        new: Image | None = None
        if name:
            bpath = formats.resolve_backing_path(path, name)
            try:
                if backing_format is None:
                    backing_format = formats.probe_format(bpath, hf)
                bhf = hf if _in_chain(img, bpath) else backing_host_factory or HostFile
                new = formats.open_image(bpath, backing_format, formats.OpenOptions(readonly=True, host_factory=bhf))
            except (QcowError, OSError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                shown = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
                raise RebaseError(f"Could not open new backing file '{name}': Could not open '{shown}': {why}") from e
            stack.callback(new.close)
        _copy_differences(img, new, progress)
        img.flush()
        img.set_backing_file(name or None, backing_format if name else None, open_backing=False)


def _in_chain(img: Image, path: str) -> bool:
    """Whether the file `path` is one of `img`'s backing files (qemu-img's prefix chain)."""
    real = os.path.realpath(path)
    node = img.backing
    while node is not None:
        if os.path.realpath(node.filename) == real:
            return True
        node = node.backing
    return False


def _open(path: str, options: formats.OpenOptions) -> QcowFile:
    """The image, opened read-write with `options`."""
    img = formats.open_image(path, "qcow2", options.replace(readonly=False))
    assert isinstance(img, QcowFile)
    return img


def _zero_runs(image: Image | None, start: int, end: int) -> list[tuple[int, bool]]:
    """(run end, reads as zeros) covering [start, end) of `image` by its block status (no bytes
    read); past its end, or with no image at all, everything reads as zeros."""
    stop = start if image is None else min(end, image.virtual_size)
    out: list[tuple[int, bool]] = []
    pos = start
    if pos < stop:
        assert image is not None
        for ext in image.block_status(pos, stop - pos):
            n = min(ext.length, stop - pos)
            pos += n
            if out and out[-1][1] == ext.zero:
                out[-1] = (pos, ext.zero)
            else:
                out.append((pos, ext.zero))
    if pos < end:
        if out and out[-1][1]:
            out[-1] = (end, True)
        else:
            out.append((end, True))
    return out


def _both(old: list[tuple[int, bool]], new: list[tuple[int, bool]], start: int) -> list[tuple[int, int, bool, bool]]:
    """Intersect two _zero_runs lists: (start, end, old zero, new zero) runs."""
    out: list[tuple[int, int, bool, bool]] = []
    i = j = 0
    pos = start
    while i < len(old) and j < len(new):
        end = min(old[i][0], new[j][0])
        out.append((pos, end, old[i][1], new[j][1]))
        pos = end
        if old[i][0] == end:
            i += 1
        if new[j][0] == end:
            j += 1
    return out


def _granule(img: QcowFile) -> int:
    """The smallest unit the image allocates: what one differing sector makes qemu-img allocate."""
    return img.cluster_size // 32 if img.extended_l2 else img.cluster_size


class _Differ:
    """Copies into the image, granule by granule, what reads differently through `new` (the
    new backing file, or None for zeros) than through the image's old chain. Compare steps run
    IN_FLIGHT at a time in worker threads (see ops.inflight), each with two buffers of its own."""

    def __init__(self, img: QcowFile, new: Image | None, steps: InFlight[tuple[bytearray, bytearray]]) -> None:
        self.img = img
        self.old = img.backing
        self.new = new
        self.granule = _granule(img)
        # With persistent bitmaps recording writes, write what qemu-img writes (runs of
        # differing 512-byte sectors, none where the bytes are the same) so that they get the
        # same bits: compare everything, sector by sector.
        self.exact = img.tracks_writes
        self.unit = SECTOR if self.exact else self.granule
        self.steps = steps
        self.writeback = WritebackPacer(img.start_writeback)  # the flush at the end waits less

    def window(self, start: int, end: int) -> None:
        """Handle the window [start, end): in the ranges the image does not allocate, skip what
        reads as zeros through both chains (block status, asked once per window; nothing read),
        compare the rest in IO_BUF_SIZE steps."""
        runs = _both(_zero_runs(self.old, start, end), _zero_runs(self.new, start, end), start)
        k = 0
        at = start
        for ext in self.img.layer_status(start, end - start):
            ext_start, at = at, at + ext.length
            if ext.allocated:
                continue
            while runs[k][1] <= ext_start:
                k += 1
            for run_start, run_end, old_zero, new_zero in runs[k:]:
                if run_start >= at:
                    break
                self._range(max(run_start, ext_start), min(run_end, at), old_zero, new_zero)

    def _range(self, start: int, end: int, old_zero: bool, new_zero: bool) -> None:
        if old_zero and new_zero:
            return
        if old_zero and not self.exact:  # nothing to compare: the new chain shows data where the old showed zeros
            self.steps.drain()  # a partial cluster may be shared with a step in flight
            if self.old is None:  # (opened without its backing file: zeros must be stored to hide the new one)
                self.img.zeroize(start, end - start)
            else:
                self.img.write_zeroes(start, end - start)
            return
        off = start
        while off < end:
            n = min(IO_BUF_SIZE - off % self.granule, end - off)
            self.steps.submit(functools.partial(self._compare, off, n, new_zero), off + n)
            off += n

    def _read(self, image: Image | None, view: memoryview, offset: int) -> None:
        got = 0
        if image is not None and offset < image.virtual_size:
            got = image.readinto_at(view[:min(len(view), image.virtual_size - offset)], offset)
        if got < len(view):
            fill_zeros(view, got, len(view))

    def _compare(self, offset: int, n: int, new_zero: bool, buffers: tuple[bytearray, bytearray]) -> None:
        old_buf, new_buf = buffers
        old_view, new_view = memoryview(old_buf)[:n], memoryview(new_buf)[:n]
        self._read(self.old, old_view, offset)
        if new_zero:
            fill_zeros(new_view, 0, n)
        else:
            self._read(self.new, new_view, offset)
        # bytearrays, not memoryviews, are compared: bytearray == bytearray is one memcmp,
        # memoryview == memoryview unpacks item by item.
        old, new = (old_buf, new_buf) if n == IO_BUF_SIZE else (old_buf[:n], new_buf[:n])
        if old == new:
            return
        g = self.unit
        # Granule boundaries in guest terms: whole granules are written where any byte differs,
        # which allocates exactly what qemu-img's sector-wise writes allocate (sectors: `exact`).
        i, run_from = 0, -1
        while i < n:
            j = min(n, (offset + i) // g * g + g - offset)
            if old[i:j] != new[i:j]:
                if run_from < 0:
                    run_from = i
            elif run_from >= 0:
                self._write(offset + run_from, old_view[run_from:i])
                run_from = -1
            i = j
        if run_from >= 0:
            self._write(offset + run_from, old_view[run_from:n])

    def _write(self, offset: int, data: memoryview) -> None:
        self.img.write_at(offset, data)
        self.writeback.wrote(len(data))


def _copy_differences(img: QcowFile, new: Image | None, progress: Progress | None) -> None:
    size = img.virtual_size

    def report(done: int) -> None:
        if progress is not None:
            progress(done, size)

    report(0)
    if img.backing is None and new is None:
        report(size)
        return
    with InFlight(IN_FLIGHT, lambda: (bytearray(IO_BUF_SIZE), bytearray(IO_BUF_SIZE)), report) as steps:
        differ = _Differ(img, new, steps)
        for pos in range(0, size, WINDOW):
            win_end = min(size, pos + WINDOW)
            differ.window(pos, win_end)
            steps.drain()
            report(win_end)


__all__ = ["rebase", "RebaseError"]
