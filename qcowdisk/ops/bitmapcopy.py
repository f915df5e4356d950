"""`qemu-img convert --bitmaps [--skip-broken-bitmaps]`: copy the source's persistent bitmaps.

What qemu-img 7.2 does (img_convert, convert_check_bitmaps, convert_copy_bitmaps), in order:
before the target is created, a source without bitmap support (not qcow2, or qcow2 version 2)
is refused ("Source lacks bitmap support"), and so is an inconsistent bitmap (flag in-use:
the program that had it open did not store it) unless `--skip-broken-bitmaps`, which skips it
with a warning; a target that cannot hold bitmaps (raw, qcow2 version 2) is refused next. After
the data, each consistent bitmap is created in the target with the same name, granularity and
enabled state (QEMU's `auto` flag), and filled with the source's contents (QEMU's merge into
an empty bitmap is a copy). QEMU walks a node's bitmaps newest first, so its messages name them
in reverse directory order, and its stores put them back in directory order; both are kept.

The source's bitmap tables are checked before anything is written (`QcowFile.read_bitmap`
validates a whole table before its first chunk), and their contents stream one cluster at a
time into the target (`QcowFile.add_bitmaps`, crash-safe: all bitmaps appear in one header
write). The target is left read-only by that, which is what convert wants: it is done.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

from ..errors import BitmapError
from ..image import Image
from ..qcow2.bitmaps import NewBitmap
from ..qcow2.file import QcowFile
from ..qcow2.format import BME_FLAG_AUTO, BME_FLAG_IN_USE, Bitmap


class BitmapSkippedWarning(UserWarning):
    """An inconsistent bitmap was not copied (`--skip-broken-bitmaps`); the message is qemu-img's."""


class BitmapCopyError(ValueError):
    """A refusal of qemu-img convert --bitmaps, with qemu-img's message (lines after the first:
    its hint)."""


def check_source(source: Image, skip_broken: bool) -> list[Bitmap]:
    """The source's bitmaps to copy (directory order), after qemu-img's source checks; their
    tables are validated here, before anything is written."""
    if not isinstance(source, QcowFile) or source.header.version < 3:
        raise BitmapCopyError("Source lacks bitmap support")
    found = source.bitmaps
    for bm in reversed(found):
        if bm.flags & BME_FLAG_IN_USE and not skip_broken:
            raise BitmapCopyError(f"Cannot copy inconsistent bitmap '{bm.name}'\n"
                                  f"Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it")
    keep = [bm for bm in found if not bm.flags & BME_FLAG_IN_USE]
    for bm in keep:
        source.read_bitmap(bm.name)  # checks the whole table; the chunks are read later
    return found


def refuse_target(out_format: str, version: int) -> None:
    """qemu-img's refusal of a target format or version that has no persistent bitmaps."""
    if out_format != "qcow2" or version < 3:
        raise BitmapCopyError(f"Format driver '{out_format}' does not support bitmaps")


def copy(source: QcowFile, found: list[Bitmap], target: QcowFile) -> None:
    """Skip (with qemu-img's warning) the inconsistent bitmaps of `found`, and add the others to
    `target` with the source's contents."""
    for bm in reversed(found):
        if bm.flags & BME_FLAG_IN_USE:
            warnings.warn(f"Skipping inconsistent bitmap '{bm.name}'", BitmapSkippedWarning, stacklevel=2)
    new = [NewBitmap(bm.name, bm.granularity, bool(bm.flags & BME_FLAG_AUTO), _contents(source, bm.name))
           for bm in found if not bm.flags & BME_FLAG_IN_USE]
    try:
        target.add_bitmaps(new)
    except BitmapError as e:
        raise BitmapCopyError(f"Failed to create bitmap {_first_refused(str(e), new)}: {e}") from None


def _contents(source: QcowFile, name: str) -> Iterator[bytes]:
    yield from source.read_bitmap(name)


def _first_refused(message: str, new: list[NewBitmap]) -> str:
    """The name of the bitmap a refusal is about (the message names it)."""
    return next((b.name for b in new if f"'{b.name}'" in message or message.endswith(f": {b.name}")),
                new[0].name if new else "")


__all__ = ["BitmapSkippedWarning", "BitmapCopyError", "check_source", "refuse_target", "copy"]
