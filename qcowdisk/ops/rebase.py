"""Change an image's backing file as `qemu-img rebase` (QEMU 7.2) does.

Safe mode (qemu-img's default) keeps the guest view: wherever the image does not allocate a
range itself, the range is read through the old backing chain and through the new backing file
(zeros past its end, or everywhere for `backing_file=""`), 512-byte sector by sector, and the
sectors that differ are written into the image with what the old chain showed. Then the header
names the new backing file and format, in one header switch after the copied data is durable,
so a power cut leaves the old name (with data copied that reads the same through it) or the new
one. Unsafe mode (`-u`, crosvm's set_backing_file) only rewrites the name and format.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from .. import formats
from ..errors import QcowError
from ..hostio import HostFactory, HostFile
from ..image import Image
from ..qcow2.file import QcowFile

IO_BUF_SIZE = 2 << 20  # qemu-img rebase's step
WINDOW = 256 << 20
SECTOR = 512

Progress = Callable[[int, int], object]


class RebaseError(QcowError):
    """The rebase cannot be done; the message is qemu-img's."""


def rebase(image: str | os.PathLike[str], backing_file: str | os.PathLike[str] | None, *,
           backing_format: str | None = None, unsafe: bool = False, progress: Progress | None = None,
           host_factory: HostFactory | None = None) -> None:
    """Make the qcow2 image at `image` name `backing_file` (None or "": no backing file, the
    image becomes standalone) with `backing_format`, as `qemu-img rebase [-u] -b BACKING [-F FMT]`.

    Safe mode (the default) first copies into the image whatever reads differently through the
    new backing file than through the old chain, so the guest view does not change; the new
    backing file's format is probed when `backing_format` is None (and then recorded). Unsafe
    mode only rewrites the header (the backing file need not exist). `progress(done, total)`
    is called with the guest offset reached and the disk size (safe mode); an exception from it
    stops the rebase and propagates, with every image closed and the header unchanged. Raises
    RebaseError with qemu-img's message when the new backing file cannot be opened.
    `host_factory` is the host I/O seam (tests record every write there).
    """
    hf = host_factory or HostFile
    path = os.fspath(image)
    name = os.fspath(backing_file) if backing_file is not None else ""
    with contextlib.ExitStack() as stack:
        if unsafe:
            img = QcowFile.open(path, backing=False, host_factory=hf)
            stack.callback(img.close)
            img.set_backing_file(name or None, backing_format if name else None, open_backing=False)
            return
        img = QcowFile.open(path, host_factory=hf)
        stack.callback(img.close)
        new: Image | None = None
        if name:
            bpath = formats.resolve_backing_path(path, name)
            try:
                if backing_format is None:
                    backing_format = formats.probe_format(bpath, hf)
                new = formats.open_image(bpath, backing_format, formats.OpenOptions(readonly=True, host_factory=hf))
            except (QcowError, OSError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                shown = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
                raise RebaseError(f"Could not open new backing file '{name}': Could not open '{shown}': {why}") from e
            stack.callback(new.close)
        _copy_differences(img, new, progress)
        img.flush()
        img.set_backing_file(name or None, backing_format if name else None, open_backing=False)


def _copy_differences(img: QcowFile, new: Image | None, progress: Progress | None) -> None:
    size = img.virtual_size
    new_size = new.virtual_size if new is not None else 0
    if progress is not None:
        progress(0, size)
    if img.backing is None and new is None:
        if progress is not None:
            progress(size, size)
        return
    old_buf = bytearray(IO_BUF_SIZE)
    new_buf = bytearray(IO_BUF_SIZE)
    pos = 0
    while pos < size:
        win_end = min(size, pos + WINDOW)
        at = pos
        for ext in img.layer_status(pos, win_end - pos):
            start, end = at, at + ext.length
            at = end
            if ext.allocated:
                continue
            off = start
            while off < end:
                n = min(IO_BUF_SIZE, end - off)
                old_view = memoryview(old_buf)[:n]
                img.readinto_at(old_view, off)
                new_view = memoryview(new_buf)[:n]
                got = 0
                if new is not None and off < new_size:
                    got = new.readinto_at(new_view[:min(n, new_size - off)], off)
                if got < n:
                    new_view[got:n] = bytes(n - got)
                if old_view != new_view:
                    _write_differing(img, off, old_view, new_view)
                off += n
                if progress is not None:
                    progress(off, size)
        pos = win_end
        if progress is not None:
            progress(pos, size)


def _write_differing(img: QcowFile, offset: int, old: memoryview, new: memoryview) -> None:
    """Write the runs of 512-byte sectors where `old` and `new` differ (old's bytes) at `offset`."""
    n = len(old)
    i = 0
    while i < n:
        j = min(n, i + SECTOR)
        if old[i:j] == new[i:j]:
            i = j
            continue
        k = j
        while k < n and old[k:min(n, k + SECTOR)] != new[k:min(n, k + SECTOR)]:
            k = min(n, k + SECTOR)
        img.write_at(offset + i, old[i:k])
        i = k


__all__ = ["rebase", "RebaseError"]
