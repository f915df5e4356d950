"""`qcowdisk map`: where the guest disk's data lives, as `qemu-img map` prints it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from .. import formats
from ..blockstatus import qemu_length
from ..errors import QcowError
from ..formats import format_names, probe_format
from ..image import Extent
from .common import (
    INT64_MAX,
    USAGE_HINT,
    Parser,
    add_confine,
    add_force_share,
    add_image_opts,
    cvtnum,
    err,
    for_format,
    image_source,
    open_options,
    opening,
    shown,
)


def cmd_map(args: argparse.Namespace) -> int:
    """`qcowdisk map`: where the guest disk's data lives, printed exactly as `qemu-img map` (7.2) does.

    The extents are `block_status`'s; this only formats them. Errors are qemu-img's messages
    (with this program's name in front) and exit status 1: a bad number or --output value,
    an image to open that is not exactly one, and, in the human format, an extent stored
    without a host offset (compressed clusters), after the lines before it.
    """
    def reported(extents: Iterator[Extent]) -> Iterator[Extent]:
        # a failure to read the image's tables, in qemu-img's words
        try:
            yield from extents
        except (QcowError, OSError) as e:
            raise QcowError(f"Could not read file metadata: {e}") from e

    def hex16(value: int) -> str:
        # printf("%#-16" PRIx64): 0x-prefixed (but plain 0), left-aligned in 16 columns
        return f"{value:#x}".ljust(16) if value else "0".ljust(16)

    def json_entry(e: Extent) -> str:
        # one entry of qemu-img map --output=json (7.2: no "compressed" key)
        def b(v: bool) -> str:
            return "true" if v else "false"
        text = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, "present": {b(e.present)}, '
                f'"zero": {b(e.zero)}, "data": {b(e.data)}')
        if e.offset is not None:
            text += f', "offset": {e.offset}'
        return text + "}"

    start, max_length = 0, -1
    if args.start_offset is not None and (start := cvtnum("start offset", args.start_offset)) < 0:
        return 1
    if args.max_length is not None and (max_length := cvtnum("max length", args.max_length)) < 0:
        return 1
    if args.output not in ("human", "json"):
        return err("--output must be used with human or json as argument.")
    if len(args.image) != 1:
        return err("Expecting one image file name", hint=USAGE_HINT)
    path, fmt = image_source(args, args.image[0], args.format)
    options = open_options(args, path)
    with opening(path):
        fmt = fmt or probe_format(path)
        if fmt not in format_names():
            return err(f"Could not open '{shown(path)}': Unknown driver '{fmt}'")
        img = formats.open_image(path, fmt, for_format(options, fmt))
    out = sys.stdout
    try:
        human = args.output == "human"
        out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File") if human else "[")
        end = qemu_length(img)
        if max_length != -1:
            limit = start + max_length
            if limit > INT64_MAX:  # qemu-img's int64 addition wraps negative: nothing to map
                limit -= 1 << 64
            end = min(limit, end)
        extents = img.block_status(start, end - start) if start < end else iter(())
        if human:
            for e in reported(extents):
                if e.data and e.offset is None:
                    return err("File contains external, encrypted or compressed clusters.")
                if e.data and not e.zero:
                    out.write(f"{hex16(e.start)}{hex16(e.length)}{hex16(e.offset or 0)}{e.filename or ''}\n")
        else:
            # qemu-img prints an entry with its ",\n" once it knows another follows (merged ones
            # are yielded just then): so also before failing on a later table entry.
            last: Extent | None = None
            try:
                for e in reported(extents):
                    if last is not None:
                        out.write(json_entry(last) + ",\n")
                    last = e
            except QcowError:
                if last is not None:
                    out.write(json_entry(last) + ",\n")
                raise
            # nothing to map: qemu-img prints its empty starting entry
            out.write(json_entry(last or Extent(start, 0, 0, False, False, False, None)) + "]\n")
    finally:
        img.close()
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pm = sub.add_parser("map", help="show where the guest disk's data lives (like qemu-img map)")
    pm.add_argument("--output", default="human", help="human (default) or json")  # checked by cmd_map, as qemu-img does
    pm.add_argument("-s", "--start-offset", dest="start_offset", metavar="OFFSET", help="first guest byte to map")
    pm.add_argument("-l", "--max-length", dest="max_length", metavar="LENGTH", help="how many bytes to map at most")
    pm.add_argument("-f", dest="format", metavar="FMT", help="image format (qcow2, qcow, raw; probed if omitted)")
    add_confine(pm)
    add_force_share(pm)
    add_image_opts(pm)
    pm.add_argument("image", metavar="IMAGE", nargs="*")
    pm.set_defaults(func=cmd_map)
