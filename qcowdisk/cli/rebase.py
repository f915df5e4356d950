"""`qcowdisk rebase`: change an image's backing file (`qcowdisk.ops.rebase`; this parses, checks and prints)."""

from __future__ import annotations

import argparse
import os
import sys

from ..ops import RebaseError, rebase
from .common import PROG, Parser, UsageError, check_chain, open_failed
from .progress import progress_bar


def cmd_rebase(args: argparse.Namespace) -> int:
    """`qcowdisk rebase`: qemu-img rebase, safe (copy what reads differently) or -u (the name
    only); -b '' makes the image standalone. Errors as qemu-img prints them (status 1)."""
    path: str = args.image
    if args.backing is None and not args.unsafe:
        print(f"{PROG}: Must specify backing file (-b) or use unsafe mode (-u)\nTry '{PROG} --help' for more information",
              file=sys.stderr)
        return 1
    if args.format not in (None, "qcow2"):
        raise UsageError(f"Could not open '{path}': only qcow2 images can be rebased")
    backing: str = args.backing or ""
    if backing and args.backing_format is None:  # QEMU 7.2 refuses to record a name without a format
        shown = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(path), backing)
        if not args.unsafe and not os.path.exists(shown):  # safe mode opens it first
            raise UsageError(f"Could not open new backing file '{backing}': Could not open '{shown}': "
                             f"{os.strerror(2)}")
        raise UsageError(f"Could not change the backing file to '{backing}': backing format must be specified")
    if not os.path.exists(path):
        raise open_failed(path, FileNotFoundError(2, os.strerror(2), path))
    if not args.unsafe:
        check_chain(path)
    bar = progress_bar(args) if not args.unsafe else None
    try:
        rebase(path, backing, backing_format=args.backing_format, unsafe=args.unsafe,
               progress=bar.advance if bar else None)
    except RebaseError as e:
        raise UsageError(str(e)) from e
    finally:
        if bar is not None:
            bar.end()
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    prb = sub.add_parser("rebase", help="change an image's backing file (like qemu-img rebase)")
    prb.add_argument("-f", dest="format", metavar="FMT", help="the image's format (qcow2; probed if omitted)")
    prb.add_argument("-b", dest="backing", metavar="BACKING", help="the new backing file ('' for none)")
    prb.add_argument("-F", dest="backing_format", metavar="FMT", help="the new backing file's format")
    prb.add_argument("-u", dest="unsafe", action="store_true", help="only rewrite the name (copy nothing)")
    prb.add_argument("-p", dest="progress", action="store_true", help="show progress")
    prb.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    prb.add_argument("image", metavar="IMAGE")
    prb.set_defaults(func=cmd_rebase)
