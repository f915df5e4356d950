"""`qcowdisk commit`: commit an overlay into its backing file (`qcowdisk.ops.commit`; this parses, checks and prints)."""

from __future__ import annotations

import argparse
import os

from ..formats import OpenOptionError, OpenOptions
from ..ops import CommitError, commit
from .common import (
    Parser,
    UsageError,
    add_chain_options,
    chain_operand,
    check_chain,
    host_factory,
    open_failed,
    repair_if_dirty,
    shown,
    spec_options,
)
from .progress import progress_bar


def cmd_commit(args: argparse.Namespace) -> int:
    """`qcowdisk commit`: qemu-img commit's copy into the backing file (or the -b layer, which
    implies -d), the emptied image, "Image committed." and its errors (status 1)."""
    path, fmt = chain_operand(args, "committed")
    if not os.path.exists(path):
        raise open_failed(path, FileNotFoundError(2, os.strerror(2), path))
    check_chain(path)
    repair_if_dirty(path)  # (the image opens read-write, as does the base; see README)
    bar = progress_bar(args)
    try:
        commit(path, base=args.base, drop=args.drop or args.base is not None,
               progress=bar.advance if bar else None, image_format=fmt, host_factory=host_factory(path, args.cache),
               options=OpenOptions(**spec_options(path)))
    except CommitError as e:
        raise UsageError(str(e)) from e
    except OpenOptionError as e:
        raise UsageError(f"Could not open '{shown(path)}': {e}") from e
    finally:
        if bar is not None:
            bar.end()
    if not args.quiet:
        print("Image committed.")
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pcm = sub.add_parser("commit", help="commit an overlay into its backing file (like qemu-img commit)")
    pcm.add_argument("-f", dest="format", metavar="FMT", help="the image's format (qcow2; probed if omitted)")
    pcm.add_argument("-b", dest="base", metavar="BASE", help="commit into this deeper layer of the chain (implies -d)")
    pcm.add_argument("-d", dest="drop", action="store_true", help="leave the image as it is (do not empty it)")
    pcm.add_argument("-p", dest="progress", action="store_true", help="show progress")
    pcm.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    add_chain_options(pcm, source_cache=False)
    pcm.add_argument("image", metavar="IMAGE")
    pcm.set_defaults(func=cmd_commit)
