"""`qcowdisk serve`: export an image over NBD, nbdkit running qcowdisk's plugin (qcowdisk.nbdserve)."""

from __future__ import annotations

import argparse

from ..nbdserve import ServeError, ServeOptions, serve
from .common import Parser, UsageError, add_confine, confine_dir


def cmd_serve(args: argparse.Namespace) -> int:
    """`qcowdisk serve`: nbdkit with qcowdisk's plugin, in the foreground, until SIGTERM, SIGINT
    or SIGHUP. Returns nbdkit's exit status: 0 after a clean stop, 1 when the image cannot be
    opened (`qcowdisk: Could not open ...`, printed by the plugin) or closed cleanly; a missing or
    incompatible nbdkit is a `qcowdisk: <why>` error before anything starts."""
    if args.socket is not None and (args.port is not None or args.bind is not None):
        raise UsageError("--socket cannot be combined with --port or --bind")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: must be between 1 and 65535")
    options = ServeOptions(args.image, readonly=args.readonly, socket=args.socket, port=args.port, bind=args.bind,
                           export_name=args.export_name, confine_to=confine_dir(args))
    try:
        return serve(options)
    except ServeError as e:
        raise UsageError(str(e)) from e


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    ps = sub.add_parser("serve", help="export the image over NBD until stopped (nbdkit with qcowdisk's plugin)")
    ps.add_argument("--readonly", action="store_true", help="export read-only (the image is opened read-only)")
    ps.add_argument("--socket", metavar="PATH", help="listen on this Unix socket instead of TCP")
    ps.add_argument("--port", type=int, metavar="N", help="TCP port to listen on (default 10809)")
    ps.add_argument("--bind", metavar="ADDR", help="TCP address to listen on (default: every address)")
    ps.add_argument("--export-name", metavar="NAME", help="serve this export name only (default: any name)")
    add_confine(ps)
    ps.add_argument("image", metavar="IMAGE")
    ps.set_defaults(func=cmd_serve)
