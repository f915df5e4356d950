"""`qcowdisk bitmap`: edit an image's persistent bitmaps (`QcowFile.edit_bitmaps`) with `qemu-img
bitmap`'s syntax, messages and exit status (QEMU 7.2, img_bitmap).

The operations run in the order given, on the one bitmap named; the first that fails is
reported as `Operation OP on bitmap NAME failed: WHY` and ends the run, and, as qemu-img, what
the operations before it did is stored all the same (one crash-safe commit at the end).
Differences: where QEMU names its internal node ("#block123") qcowdisk names the file; a raw
image is refused as QEMU refuses it, without its probing warning.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import BitmapError, ImageLockedError, QcowError
from ..formats import OpenOptionError, format_names, open_image, probe_format
from ..qcow2.bitmapedit import BitmapEditor
from ..qcow2.file import QcowFile
from .common import USAGE_HINT, Parser, add_own_parsing, cvtnum, err, image_source, repair_if_dirty, shown, tuning
from .getoptlong import GetoptError, getopt_long
from .objects import process_objects

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image

BITMAP_HELP = """usage: qcowdisk bitmap [--object OBJECTDEF] [--image-opts | -f FMT] \
(--add [-g SIZE] | --remove | --clear | --enable | --disable | \
--merge SOURCE [-b SRC_FILE [-F SRC_FMT]])... FILE BITMAP

Add, remove, clear, enable, disable or merge into the persistent bitmap BITMAP of FILE (like
qemu-img bitmap); the operations run in the order given.
"""
_SHORT = {"h": False, "f": True, "g": True, "b": True, "F": True}
_LONG = {"help": False, "format": True, "add": False, "granularity": True, "remove": False, "clear": False,
         "enable": False, "disable": False, "merge": True, "source-file": True, "source-format": True,
         "image-opts": False, "object": True}
_ACTIONS = {"--add": "add", "--remove": "remove", "--clear": "clear", "--enable": "enable", "--disable": "disable",
            "--merge": "merge"}


def cmd_bitmap(args: argparse.Namespace) -> int:
    """`qcowdisk bitmap`: `qemu-img bitmap` (7.2)."""
    try:
        opts, operands = getopt_long(list(args.argv), _SHORT, _LONG)
    except GetoptError as e:
        return err(str(e), hint=USAGE_HINT)
    actions: list[tuple[str, str]] = []
    fmt = src_fmt = src_file = None
    granularity = 0
    image_opts = False
    objects: list[str] = []
    for name, value in opts:
        if name in ("-h", "--help"):
            sys.stdout.write(BITMAP_HELP)
            return 0
        if name in _ACTIONS:
            actions.append((_ACTIONS[name], value))
        elif name in ("-f", "--format"):
            fmt = value
        elif name in ("-g", "--granularity"):
            granularity = cvtnum("granularity", value)
            if granularity < 0:
                return 1
        elif name in ("-b", "--source-file"):
            src_file = value
        elif name in ("-F", "--source-format"):
            src_fmt = value
        elif name == "--image-opts":
            image_opts = True
        elif name == "--object":
            objects.append(value)
    process_objects(objects)  # (qemu-img creates them while it parses, before the checks below)
    if not actions:
        return err("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    if granularity and not any(a == "add" for a, _ in actions):
        return err("granularity only supported with --add")
    if src_fmt and not src_file:
        return err("-F only supported with -b")
    if src_file and not any(a == "merge" for a, _ in actions):
        return err("Merge bitmap source file only supported with --merge")
    if len(operands) != 2:
        return err("Expecting filename and bitmap name")
    name, bitmap = operands
    # With --image-opts the image operand is an option string; a merge source (-b) never is.
    path, fmt = image_source(argparse.Namespace(), name, fmt, writable=True, image_opts=image_opts,
                             opens_backing=False)
    disk, status = _open(path, fmt)
    if disk is None:
        return status
    source: Image | None = None
    editor = disk.edit_bitmaps() if isinstance(disk, QcowFile) else None
    try:
        if src_file is not None:
            source, status = _open(src_file, src_fmt, readonly=True)
            if source is None:
                return status
        for action, value in actions:
            try:
                _run(editor, action, bitmap, value, granularity, source, path)
            except BitmapError as e:
                first, _, hint = str(e).partition("\n")
                status = err(f"Operation {action} on bitmap {bitmap} failed: {first}", hint=hint + "\n" if hint else "")
                break
            except (QcowError, OSError) as e:
                status = err(f"Operation {action} on bitmap {bitmap} failed: {e}")
                break
    finally:
        try:
            if editor is not None:
                editor.commit()  # (after a failed operation too: qemu-img stores what the others did)
        except (QcowError, OSError) as e:
            status = err(f"Error while closing the image: {e}")
        finally:
            if source is not None:
                source.close()
            disk.close()
    return status


def _run(editor: BitmapEditor | None, action: str, bitmap: str, value: str, granularity: int,
         source: Image | None, path: str) -> None:
    if editor is None:  # a format without persistent bitmaps: QEMU's answers for raw
        if action == "add":
            raise BitmapError(f"Can't store persistent bitmaps to {path}: Operation not supported")
        raise BitmapError(f"Dirty bitmap '{value if action == 'merge' and source is not None else bitmap}' not found")
    if action == "add":
        # qemu-img passes -g to QMP as a uint32; 0 (or none given) means the default
        editor.add(bitmap, None if not granularity else granularity & 0xFFFFFFFF)
    elif action == "remove":
        editor.remove(bitmap)
    elif action == "clear":
        editor.clear(bitmap)
    elif action in ("enable", "disable"):
        editor.enable(bitmap, action == "enable")
    elif source is not None and not isinstance(source, QcowFile):
        _merge_from_raw(editor, bitmap, value)
    else:
        editor.merge(bitmap, value, source)


def _merge_from_raw(editor: BitmapEditor, bitmap: str, value: str) -> None:
    """A source file without bitmaps: the destination is looked up first, then the source."""
    if bitmap not in editor.names():
        raise BitmapError(f"Dirty bitmap '{bitmap}' not found")
    raise BitmapError(f"Dirty bitmap '{value}' not found")


def _open(path: str, fmt: str | None, *, readonly: bool = False) -> tuple[Image | None, int]:
    """The image opened as qemu-img bitmap opens it (no backing chain), or None and the status
    after printing qemu-img's message."""
    if fmt is not None and fmt not in format_names():
        return None, err(f"Could not open '{path}': Unknown driver '{fmt}'")
    try:
        probed = fmt or probe_format(path)
        options = tuning(path).replace(backing=False, backing_node=None)  # (--image-opts)
        if probed == "qcow2" and not readonly:
            repair_if_dirty(path)
            return QcowFile.open_for_bitmaps(path, tuning=options), 0
        return open_image(path, probed, options.replace(readonly=True)), 0
    except OpenOptionError as e:
        return None, err(f"Could not open '{shown(path)}': {e}")
    except OSError as e:
        return None, err(f"Could not open '{path}': Could not open '{path}': {e.strerror or e}")
    except ImageLockedError:
        # (QEMU's words: a reader lacks the shared "write" permission a writer denies)
        return None, err(f"Could not open '{path}': Failed to get {'shared ' if readonly else ''}\"write\" lock",
                         hint=f"Is another process using the image [{path}]?\n")
    except QcowError as e:
        return None, err(f"Could not open '{path}': {e}")


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    add_own_parsing(sub, "bitmap", "edit persistent bitmaps (like qemu-img bitmap)", BITMAP_HELP,
                    "(--add [-g SIZE] | --remove | --clear | --enable | --disable | --merge SOURCE [-b FILE [-F FMT]])... "
                    "FILE BITMAP", cmd_bitmap)
