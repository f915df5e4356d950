"""`qcowdisk info`: an image's (or its chain's) metadata, as `qemu-img info` prints it."""

from __future__ import annotations

import argparse
import sys

from .common import Parser, add_confine, add_force_share, open_image
from .infotext import ImageInfo, chain_info, format_human, image_info
from .qemujson import qemu_json


def cmd_info(args: argparse.Namespace) -> int:
    """`qcowdisk info`: print an image's (or its whole chain's) metadata."""
    img = open_image(args.image, args)
    try:
        infos = chain_info(img, args.image) if args.backing_chain else [image_info(img, args.image)]
    finally:
        img.close()
    if args.output == "json":
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
    pi.add_argument("image", metavar="IMAGE")
    pi.set_defaults(func=cmd_info)
