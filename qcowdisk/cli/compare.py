"""`qcowdisk compare`: compare two guest disks (`qcowdisk.ops.compare`; this parses, opens and prints)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..blockstatus import qemu_length
from ..ops import CompareError, compare
from .common import (
    USAGE_HINT,
    Parser,
    UsageError,
    add_cache_options,
    add_confine,
    add_force_share,
    add_image_opts,
    check_cache_modes,
    err,
    image_source,
    open_any,
)
from .progress import QemuProgress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image


def cmd_compare(args: argparse.Namespace) -> int:
    """`qcowdisk compare`: qemu-img compare's verdict, messages and exit status (0 identical,
    1 different, 2 an image cannot be opened, 3 its block status cannot be read, 4 its data);
    `-p` shows qemu-img's progress line when stdout is a terminal."""
    if len(args.image) != 2:
        return err("Expecting two image file names", hint=USAGE_HINT)
    try:
        check_cache_modes(args)
    except UsageError as e:
        return err(str(e), status=2)
    bar = QemuProgress(sys.stdout) if args.progress and not args.quiet and sys.stdout.isatty() else None
    shown: list[str] = []

    def say(line: str) -> None:
        shown.append(line)
        if not args.quiet:
            print(line)

    try:
        with contextlib.ExitStack() as stack:
            images: list[Image] = []
            for name, given in zip(args.image, (args.format, args.b_format), strict=True):
                try:
                    path, fmt = image_source(args, name, given)
                    img = open_any(path, fmt, args)
                except UsageError as e:
                    return err(str(e), status=2)
                stack.callback(img.close)
                images.append(img)
            shorter = min(qemu_length(images[0]), qemu_length(images[1]))
            sizes_differ = qemu_length(images[0]) != qemu_length(images[1])

            def progress(done: int, total: int) -> None:
                assert bar is not None
                if sizes_differ and done > shorter and not shown:  # qemu-img warns before the tail
                    say("Warning: Image size mismatch!")
                bar.advance(done, total)

            try:
                result = compare(images[0], images[1], strict=args.strict, progress=progress if bar else None)
            except CompareError as e:
                return err(str(e), status=e.status)
            for line in result.messages[len(shown):]:
                say(line)
            return 0 if result.identical else 1
    finally:
        if bar is not None:
            bar.end()


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pcmp = sub.add_parser("compare", help="compare two guest disks (like qemu-img compare)")
    pcmp.add_argument("-f", dest="format", metavar="FMT", help="first image's format (probed if omitted)")
    pcmp.add_argument("-F", dest="b_format", metavar="FMT", help="second image's format (probed if omitted)")
    pcmp.add_argument("-s", dest="strict", action="store_true", help="strict: sizes and block status must match too")
    pcmp.add_argument("-q", dest="quiet", action="store_true", help="print nothing (the exit status tells)")
    pcmp.add_argument("-p", dest="progress", action="store_true", help="show progress (on a terminal)")
    add_confine(pcmp, "either image")
    add_force_share(pcmp)
    add_cache_options(pcmp, target=False, source=True)
    add_image_opts(pcmp)
    pcmp.add_argument("image", metavar="IMAGE", nargs="*", help="the two images")
    pcmp.set_defaults(func=cmd_compare)
