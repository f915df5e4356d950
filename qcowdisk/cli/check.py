"""`qcowdisk check`: check (and repair) an image's refcounts (like `qemu-img check`)."""

from __future__ import annotations

import argparse
import sys

from .. import formats
from ..formats import format_names, probe_format
from ..qcow2.check import CheckFailedError
from ..qcow2.file import QcowFile
from .common import (
    USAGE_HINT,
    Parser,
    add_cache_options,
    add_confine,
    add_force_share,
    add_image_opts,
    check_cache_modes,
    confine_dir,
    err,
    for_format,
    image_source,
    open_options,
    opening,
    report_line,
    shown,
)


def cmd_check(args: argparse.Namespace) -> int:
    """`qcowdisk check`: check (and with -r repair) an image, printing and exiting as `qemu-img check` (7.2).

    The per-cluster lines (`Leaked cluster ...`, `ERROR cluster ...`, `Repairing ...`) go to
    stderr as the check meets them; the summary (human or JSON) to stdout, unless -q. Exit
    status: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check failed (or found
    internal errors), 63 a format without checks (raw, qcow).
    """
    if args.repair is not None and args.repair not in ("leaks", "all"):
        return err(f"Unknown option value for -r (expecting 'leaks' or 'all'): {args.repair}", hint=USAGE_HINT)
    if args.output not in ("human", "json"):
        return err("--output must be used with human or json as argument.")
    if len(args.image) != 1:
        return err("Expecting one image file name", hint=USAGE_HINT)
    check_cache_modes(args)
    if args.repair and args.force_share and not args.image_opts:
        return err(f"Could not open '{args.image[0]}': force-share=on can only be used with read-only images")
    path, fmt = image_source(args, args.image[0], args.format, writable=args.repair is not None)
    confine_to = confine_dir(args)
    with opening(path):
        fmt = fmt or probe_format(path)
        if fmt not in format_names():
            return err(f"Could not open '{shown(path)}': Unknown driver '{fmt}'")
        if fmt != "qcow2":
            other = formats.open_image(path, fmt, for_format(open_options(args, path), fmt))
            other.close()
            err("This image format does not support checks")
            return 63
        o = open_options(args, path)
        # read-only=off: read-write as with -r (BDRV_O_CHECK: a corrupt image opens, a dirty one is not rebuilt)
        img = QcowFile.open_for_check(path, repair=args.repair is not None or not o.readonly, confine_to=confine_to,
                                      backing=o.backing, force_share=args.force_share,
                                      l2_cache_size=o.l2_cache_size, l2_cache_entry_size=o.l2_cache_entry_size,
                                      host_factory=o.host_factory, tuning=o)
    try:
        try:
            result = img.check(args.repair, report=report_line)
        except CheckFailedError as e:
            return err(str(e))
    finally:
        img.close()
    result = result.replace(filename=shown(path))
    if not args.quiet:
        if args.output == "json":
            sys.stdout.write(result.to_json() + "\n")
        else:
            if result.corruptions_fixed or result.leaks_fixed:
                sys.stdout.write(result.repaired_banner())
            sys.stdout.write(result.to_human())
    if result.check_errors:
        return err("Check failed")
    return result.exit_status


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pk = sub.add_parser("check", help="check (and repair) an image's refcounts (like qemu-img check)")
    pk.add_argument("-r", "--repair", dest="repair", metavar="leaks|all",
                    help="repair leaked clusters (leaks) or corruptions too (all)")
    pk.add_argument("--output", default="human", help="human (default) or json")  # checked by cmd_check, as qemu-img does
    pk.add_argument("-f", dest="format", metavar="FMT", help="image format (probed if omitted)")
    pk.add_argument("-q", "--quiet", dest="quiet", action="store_true", help="print only errors")
    add_confine(pk)
    add_force_share(pk)
    add_cache_options(pk, target=False, source=True)
    add_image_opts(pk)
    pk.add_argument("image", metavar="IMAGE", nargs="*")
    pk.set_defaults(func=cmd_check)
