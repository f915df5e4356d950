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
time into the target's `BitmapEditor` at its commit (crash-safe: all bitmaps appear in one
header write). An existing target (-n) with bitmaps of its own has them marked in use while
the data is copied and the written ranges set in its enabled ones, as QEMU records the writes
of a convert in them (`QcowFile` does it for every writer); the commit clears the marks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

from ..errors import BitmapError
from ..qcow2.bitmapedit import BitmapEditor
from ..qcow2.bitmaps import NewBitmap
from ..qcow2.file import QcowFile
from ..qcow2.format import BME_FLAG_AUTO, BME_FLAG_IN_USE, Bitmap

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image


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


def copy(source: QcowFile, found: list[Bitmap], editor: BitmapEditor) -> None:
    """Add the consistent bitmaps of `found` to the target's `editor` with the source's
    contents (read when the editor commits), skipping the others with qemu-img's warning.
    As qemu-img, they are tried newest first and the first one the target refuses ends the
    copy (BitmapCopyError), the ones tried before it being added all the same; they are listed
    in the source's order."""
    ok: list[NewBitmap] = []
    failure: tuple[str, BitmapError] | None = None
    for bm in reversed(found):
        if bm.flags & BME_FLAG_IN_USE:
            warnings.warn(f"Skipping inconsistent bitmap '{bm.name}'", BitmapSkippedWarning, stacklevel=2)
            continue
        new = NewBitmap(bm.name, bm.granularity, bool(bm.flags & BME_FLAG_AUTO), _contents(source, bm.name))
        try:
            editor.check([*ok, new])
        except BitmapError as e:
            failure = (bm.name, e)
            break
        ok.append(new)
    for new in reversed(ok):
        editor.add(new.name, new.granularity, enabled=new.enabled, data=new.data)
    if failure is not None:
        raise BitmapCopyError(f"Failed to create bitmap {failure[0]}: {failure[1]}")


def _contents(source: QcowFile, name: str) -> Iterator[bytes]:
    """The bitmap's chunks, read only when iterated (at the target's commit)."""
    yield from source.read_bitmap(name)


__all__ = ["BitmapSkippedWarning", "BitmapCopyError", "check_source", "refuse_target", "copy"]
