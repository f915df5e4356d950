"""`qcowdisk create`: a new qcow2 image, with `qemu-img create`'s syntax and `Formatting` line."""

from __future__ import annotations

import argparse
import contextlib
import os

from .. import formats
from ..errors import QcowError
from ..formats import OpenOptions, probe_format
from ..qcow2.file import QcowFile
from .common import Parser, UsageError, add_confine, add_image_opts, combine_path, confine_dir, parse_size, why
from .options import create_options, split_options

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .options import CreateKeywords, CreateOptions


def _formatting_line(image: str, size: int, kw: CreateOptions, given: list[tuple[str, str]]) -> str:
    """qemu-img's `Formatting 'IMAGE', fmt=qcow2 ...` line: QEMU's option order, given spellings."""
    shown = dict(given)

    def val(name: str, default: str) -> str:
        return shown.get(name, default)

    parts = [f"Formatting '{image}', fmt=qcow2",
             f"cluster_size={kw.get('cluster_size', 65536)}",
             f"extended_l2={val('extended_l2', 'off')}"]
    if "preallocation" in shown:
        parts.append(f"preallocation={shown['preallocation']}")
    parts.append(f"compression_type={val('compression_type', 'zlib')}")
    parts.append(f"size={size}")
    if kw.get("backing_file"):
        parts.append(f"backing_file={kw['backing_file']}")
    if kw.get("backing_format"):
        parts.append(f"backing_fmt={kw['backing_format']}")
    if "data_file" in shown:
        parts.append(f"data_file={shown['data_file']}")
    if "data_file_raw" in shown:
        parts.append(f"data_file_raw={shown['data_file_raw']}")
    if "compat" in shown:
        parts.append(f"compat={shown['compat']}")
    parts.append(f"lazy_refcounts={val('lazy_refcounts', 'off')}")
    parts.append(f"refcount_bits={val('refcount_bits', '16')}")
    return " ".join(parts)


def cmd_create(args: argparse.Namespace) -> int:
    """`qcowdisk create`: make a new qcow2 image (qemu-img create syntax)."""
    if args.format != "qcow2":
        raise UsageError(f"Unsupported format '{args.format}': qcowdisk creates qcow2 images only")
    confine_to = confine_dir(args)
    try:
        kw, given = create_options(split_options(args.options))
        size = parse_size(args.size) if args.size is not None else kw.pop("size", None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    kw.pop("size", None)
    if args.backing:
        kw["backing_file"] = args.backing
    if args.backing_format:
        if not kw.get("backing_file"):
            raise UsageError(f"{args.image}: Backing format cannot be used without backing file")
        kw["backing_format"] = args.backing_format
    backing = kw.pop("backing_file", None)
    backing_format = kw.pop("backing_format", None)
    create_kw: CreateKeywords = kw  # size and the backing keys are popped: the rest are create() keywords
    shown_kw: CreateOptions
    if backing is None:
        if size is None:
            raise UsageError(f"{args.image}: Image creation needs a size parameter")
        shown_kw = kw.copy()
        disk = QcowFile.create(args.image, size, **create_kw)
    else:
        # The name is stored as given and, like QEMU, resolved against the new image's directory.
        backing_path = combine_path(args.image, backing)
        options = OpenOptions(readonly=True, confine_to=confine_to)
        try:
            formats.check_confined(backing_path, options, "backing file", args.image)
            if backing_format is None:
                backing_format = probe_format(backing_path)
            if size is None:  # the backing file's size; its chain confined as well
                chain = (os.path.realpath(args.image),)
                with contextlib.closing(formats.open_backing(args.image, backing, backing_format, options, chain)) as b:
                    size = b.virtual_size
        except (QcowError, OSError) as e:
            raise UsageError(f"{args.image}: Could not open backing file '{backing_path}': {why(e, backing_path)}") from e
        shown_kw = {**kw, "backing_file": backing, "backing_format": backing_format}
        disk = QcowFile.create_from_backing(args.image, backing, backing_format=backing_format,
                                            size=size, **create_kw)
    with disk:
        final_size = size if size is not None else disk.virtual_size
    if not args.quiet:
        print(_formatting_line(args.image, final_size, shown_kw, given))
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pc = sub.add_parser("create", help="create a qcow2 image (like qemu-img create)")
    pc.add_argument("-f", dest="format", default="qcow2", help="image format (only qcow2)")
    pc.add_argument("-b", dest="backing", metavar="BACKING", help="backing file, stored as given")
    pc.add_argument("-F", dest="backing_format", metavar="FMT", help="backing file format (probed if omitted)")
    pc.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="comma-separated name=value creation options")
    pc.add_argument("-q", dest="quiet", action="store_true", help="do not print the Formatting line")
    add_confine(pc, "the new image")
    add_image_opts(pc, image_opts=False)  # qemu-img create takes --object only
    pc.add_argument("image", metavar="IMAGE")
    pc.add_argument("size", metavar="SIZE", nargs="?", help="virtual size, e.g. 10G (optional with -b)")
    pc.set_defaults(func=cmd_create)
