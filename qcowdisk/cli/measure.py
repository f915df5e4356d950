"""`qcowdisk measure`: the size a new image would need (`qcowdisk.ops.measure`; this parses and prints)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Sequence

from ..ops import measure, qemuopts
from .common import (
    INT64_MAX,
    PROG,
    Parser,
    add_confine,
    add_force_share,
    add_image_opts,
    err,
    image_source,
    open_any,
    print_warnings,
)


class _InOrder(argparse.Action):
    """Collect options in command-line order (qemu-img checks each as getopt returns it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[object] | None, option_string: str | None = None) -> None:
        ordered: list[tuple[str, str]] = list(getattr(namespace, "ordered", None) or [])
        ordered.append((self.dest, str(values)))
        namespace.ordered = ordered


def cmd_measure(args: argparse.Namespace) -> int:
    """`qcowdisk measure`: qemu-img measure's sizes, its output formats and its refusals (status 1)."""
    output, size, options = "human", None, None
    for name, value in args.ordered or []:
        if name == "output":
            if value not in ("human", "json"):
                return err("--output must be used with human or json as argument.")
            output = value
        elif name == "size":
            try:
                size, hex_suffix = qemuopts.strtosz(value)
            except OverflowError:
                size, hex_suffix = INT64_MAX + 1, False
            except ValueError:
                return err("Invalid image size specified. You may use k, M, G, T, P or E suffixes for",
                           "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            if hex_suffix:
                print(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: {value}",
                      file=sys.stderr)
            if size > INT64_MAX:
                return err(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
        elif not qemuopts.valid_option_list(value):
            return err(f"Invalid option list: {value}")
        else:
            options = value if options is None else f"{options},{value}"
    if len(args.image) > 1:
        return err("At most one filename argument is allowed.")
    filename = args.image[0] if args.image else None
    if filename is None and (args.format or args.image_opts):
        return err("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        return err("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        return err("Either --size N or one filename must be specified.")
    with contextlib.ExitStack() as stack:
        source = None
        if filename is not None:
            path, fmt = image_source(args, filename, args.format)
            source = open_any(path, fmt, args)
            stack.callback(source.close)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", qemuopts.SizeSuffixWarning)
            try:
                result = measure(size=size, src=source, options=options, out_format=args.out_format)
            except qemuopts.OptionError as e:
                print_warnings(caught)
                err(str(e), hint=e.hint)
                return err(f"Invalid options for file format '{args.out_format}'")
            except ValueError as e:
                print_warnings(caught)
                return err(str(e))
        print_warnings(caught)
    if output == "json":
        shown: dict[str, int] = {} if result.bitmaps is None else {"bitmaps": result.bitmaps}
        shown.update({"required": result.required, "fully-allocated": result.fully_allocated})
        sys.stdout.write(json.dumps(shown, indent=4) + "\n")
    else:
        sys.stdout.write(f"required size: {result.required}\nfully allocated size: {result.fully_allocated}\n")
        if result.bitmaps is not None:
            sys.stdout.write(f"bitmaps size: {result.bitmaps}\n")
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pme = sub.add_parser("measure", help="size a new image would need (like qemu-img measure)")
    pme.add_argument("--output", action=_InOrder, help="human (default) or json")
    pme.add_argument("--size", action=_InOrder, metavar="SIZE", help="a new disk of this size")
    pme.add_argument("-o", dest="options", action=_InOrder, metavar="OPTIONS", help="the new image's options")
    pme.add_argument("-O", dest="out_format", default="raw", metavar="FMT", help="the new image's format (raw)")
    pme.add_argument("-f", dest="format", metavar="FMT", help="the source image's format (probed if omitted)")
    add_confine(pme, "the source image")
    add_force_share(pme)
    add_image_opts(pme)
    pme.add_argument("image", metavar="SOURCE", nargs="*", help="the image to convert")
    pme.set_defaults(func=cmd_measure, ordered=None)
