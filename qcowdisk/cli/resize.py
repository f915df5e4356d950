"""`qcowdisk resize`: change the virtual size, with `qemu-img resize`'s own parsing."""

from __future__ import annotations

import argparse
import sys

from .. import formats
from ..errors import QcowError, ResizeError
from ..formats import OpenOptionError, format_names, probe_format
from ..ops import qemuopts
from ..ops.rawresize import RawResizeTarget
from ..qcow2.file import QcowFile
from ..resizecheck import PREALLOCATION_MODES, SHRINK_REFUSED, check_new_size
from .common import (
    INT64_MAX,
    PROG,
    USAGE_HINT,
    Parser,
    add_own_parsing,
    err,
    host_factory,
    image_source,
    image_spec,
    repair_if_dirty,
    shown,
    tuning,
    why,
)
from .getoptlong import GetoptError, getopt_long
from .objects import process_objects
from .snapshot import RAW_PROBE_WARNING

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image

RESIZE_HELP = """usage: qcowdisk resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] [--confine-to DIR] IMAGE [+|-]SIZE

Change the virtual size of a qcow2 or raw image to SIZE, or by +SIZE / -SIZE (like qemu-img
resize). SIZE takes qemu-img's suffixes (k, M, G, T, P, E: powers of 1024) and must come last,
so that a negative one is never read as an option; it is not rounded (qemu-img refuses a qcow2
size that is not a multiple of 512, and so does this; a raw file takes any size).

options:
  --shrink          allow making the image smaller (everything past the new end is discarded)
  --preallocation=MODE
                    how the new area is allocated: off, metadata (qcow2: clusters mapped,
                    the file left sparse), falloc, full (zeros written)
  -f FMT            the image format: qcow2 or raw (probed if omitted)
  -q                do not print 'Image resized.'
  --confine-to DIR  refuse backing and data files that resolve outside DIR
  -h, --help        show this help
"""
_RESIZE_SHORT = {"f": True, "h": False, "q": False}  # option letter -> takes an argument
_RESIZE_LONG = {"help": False, "shrink": False, "confine-to": True, "image-opts": False, "object": True,
                "preallocation": True}


def cmd_resize(args: argparse.Namespace) -> int:
    """`qcowdisk resize`: `qemu-img resize` (7.2) for qcow2, raw and qcow v1 images: its syntax,
    output, messages and exit status (1 on every failure, the program's name in front of each
    message).

    The parser hands over the words after `resize` untouched: like qemu-img, the size is taken
    off the end first and the rest parsed as getopt_long would, so `-1G` needs no `--` (which
    qemu-img accepts too). The image is opened as QEMU opens it for resizing (a raw file with
    QEMU's warning when its format was only probed; a qcow v1 image with the writer's lock), a
    relative size is applied to the current size with qemu-img's 64-bit arithmetic, and
    `QcowFile.resize` or `RawResizeTarget.resize` does the rest, their refusals (`ResizeError`)
    carrying qemu-img's messages in its order; a qcow v1 image gets qemu-img's own refusals
    (qcowdisk.resizecheck), then its driver's. Other formats are refused.
    """
    argv = list(args.argv)

    if len(argv) < 2:
        return err("Not enough arguments", hint=USAGE_HINT)
    size_text = argv.pop()
    try:
        opts, operands = getopt_long(argv, _RESIZE_SHORT, _RESIZE_LONG)
    except GetoptError as e:
        return err(str(e), hint=USAGE_HINT)
    fmt: str | None = None
    quiet = shrink = image_opts = False
    objects: list[str] = []
    confine_to: str | None = None
    preallocation = "off"
    for name, value in opts:
        if name in ("-h", "--help"):
            sys.stdout.write(RESIZE_HELP)
            return 0
        if name == "-f":
            fmt = value
        elif name == "-q":
            quiet = True
        elif name == "--shrink":
            shrink = True
        elif name == "--image-opts":
            image_opts = True
        elif name == "--object":
            objects.append(value)
        elif name == "--preallocation":
            if value not in PREALLOCATION_MODES:  # (qemu-img refuses it while parsing)
                return err(f"Invalid preallocation mode '{value}'")
            preallocation = value
        else:
            confine_to = value
    if len(operands) != 1:
        return err("Expecting image file name and size", hint=USAGE_HINT)
    process_objects(objects)
    path, fmt = image_source(argparse.Namespace(), operands[0], fmt, writable=True, image_opts=image_opts)
    shown_as = shown(path)

    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    text = size_text[1:] if relative else size_text
    try:
        n, hex_suffix = qemuopts.strtosz(text)
    except OverflowError:
        return err(f"Value '{text}' is out of range for parameter 'size'")
    except ValueError:
        return err("Parameter 'size' expects a non-negative number below 2^64",
                   hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                        "and exabytes, respectively.\n")
    if hex_suffix:
        print(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: {text}", file=sys.stderr)
    if n > INT64_MAX:  # qemu-img keeps the size in an int64_t
        n -= 1 << 64

    if fmt is not None and fmt not in format_names():
        return err(f"Could not open '{shown_as}': Unknown driver '{fmt}'")
    try:
        probed = fmt or probe_format(path)
        target: QcowFile | RawResizeTarget | Image
        if probed == "raw":
            if fmt is None:
                print(RAW_PROBE_WARNING.format(path=path), file=sys.stderr)
            spec = image_spec(path)
            target = RawResizeTarget(path, offset=spec.raw_offset or 0 if spec is not None else 0,
                                     size=spec.raw_size if spec is not None else None,
                                     host_factory=host_factory(path))
        elif probed == "qcow":  # opened as QEMU opens it (read-write: the writer's lock), then refused
            target = formats.open_image(path, "qcow", tuning(path).replace(
                readonly=True, write_lock=True, confine_to=confine_to, host_factory=host_factory(path)))
        elif probed == "qcow2":
            repair_if_dirty(path, confine_to)
            target = QcowFile.open_keeping_bitmaps(path, confine_to=confine_to, host_factory=host_factory(path),
                                                   tuning=tuning(path))
        else:
            return err(f"Could not open '{shown_as}': qcowdisk resizes qcow2 and raw images only, not {probed}")
    except OpenOptionError as e:
        return err(f"Could not open '{shown_as}': {e}")
    except OSError as e:  # QEMU names the file twice: its format layer, then its file layer
        return err(f"Could not open '{shown_as}': Could not open '{path}': {e.strerror or e}")
    except QcowError as e:
        return err(f"Could not open '{shown_as}': {why(e, path)}")
    status = 0
    try:
        current = target.virtual_size
        total = current + relative * n if relative else n
        total = (total + (1 << 63)) % (1 << 64) - (1 << 63)  # int64_t wraps
        if isinstance(target, (QcowFile, RawResizeTarget)):
            target.resize(total, shrink=shrink, preallocation=preallocation)
        else:  # qcow v1: qemu-img's own refusals first, then its driver's
            check_new_size(current, total, shrink=shrink, preallocation=preallocation)
            status = err("Image format driver does not support resize")
    except ResizeError as e:
        status = shrink_refused() if str(e) == SHRINK_REFUSED else err(str(e))
    except OSError as e:
        status = err(e.strerror or str(e))
    except QcowError as e:
        status = err(str(e))
    finally:
        try:
            target.close()
        except (QcowError, OSError) as e:
            if not status:
                status = err(str(e))
    if not status and not quiet:
        print("Image resized.")
    return status


def shrink_refused() -> int:
    """qemu-img's refusal of a shrink without --shrink: an error, then a warning; status 1."""
    return err(SHRINK_REFUSED,
               "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
               "Before performing such an operation, make sure there is no important data there.")


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    add_own_parsing(sub, "resize", "change the virtual size (like qemu-img resize)", RESIZE_HELP,
                    "[--shrink] [-f FMT] [-q] [--confine-to DIR] IMAGE [+|-]SIZE", cmd_resize)
