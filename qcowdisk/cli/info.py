"""`qcowdisk info`: an image's (or its chain's) metadata, as `qemu-img info` prints it."""

from __future__ import annotations

import argparse
import sys

from ..errors import QcowError
from ..formats import probe_format
from .common import (
    Parser,
    add_confine,
    add_force_share,
    add_image_opts,
    image_source,
    open_any,
    open_failed,
    shown_as_info,
)
from .infotext import chain_info, format_human, image_info

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .common import AnyImage
    from .infotext import ImageInfo


def cmd_info(args: argparse.Namespace) -> int:
    """`qcowdisk info`: print an image's (or its whole chain's) metadata."""
    path, fmt = image_source(args, args.image, args.format, opens_backing=False, opens_data_file=False)
    img: AnyImage
    if fmt is None:  # probed as qemu-img probes: a file no format claims is raw
        try:
            fmt = probe_format(path)
        except (OSError, QcowError) as e:  # (QcowError: a FIFO, socket, directory or device)
            raise open_failed(path, e) from e
    img = open_any(path, fmt, args)  # (raw: any file, as QEMU's raw driver shows it)
    try:
        name = shown_as_info(path)
        infos = chain_info(img, path, name) if args.backing_chain else [image_info(img, path, name)]
    finally:
        img.close()
    if args.output == "json":
        from .qemujson import qemu_json  # (json only for JSON output: start-up time)
        payload: list[ImageInfo] | ImageInfo = infos if args.backing_chain else infos[0]
        sys.stdout.write(qemu_json(payload) + "\n")
    else:
        sys.stdout.write("\n".join(format_human(i) for i in infos))
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pi = sub.add_parser("info", help="show image metadata (like qemu-img info)")
    pi.add_argument("--output", choices=("human", "json"), default="human")
    pi.add_argument("--backing-chain", action="store_true", help="also show every backing image")
    add_confine(pi)
    add_force_share(pi)
    pi.add_argument("-f", dest="format", metavar="FMT", help="the image's format (qcow2 or qcow; probed if omitted)")
    add_image_opts(pi)
    pi.add_argument("image", metavar="IMAGE")
    pi.set_defaults(func=cmd_info)
