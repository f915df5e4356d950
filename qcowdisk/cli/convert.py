"""`qcowdisk convert`: copy a guest disk into a new image (`qcowdisk.ops.convert`; this parses and prints)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..formats import OpenOptions, probe_format
from ..hostio import DirectHostFile, DirectIOUnsupportedError
from ..ops import qemuopts
from ..ops.bitmapcopy import BitmapSkippedWarning
from ..ops.cachemode import DEFAULT_SOURCE_CACHE, DEFAULT_TARGET_CACHE
from .common import (
    PROG,
    Parser,
    UsageError,
    add_image_opts,
    check_window,
    cvtnum,
    host_factory,
    image_source,
    repair_if_dirty,
    shown,
    spec_options,
)
from .progress import QemuProgress


def cmd_convert(args: argparse.Namespace) -> int:
    """`qcowdisk convert`: qemu-img convert's copy (qcow2 or raw out), its -S sparseness, -c, -B, -n, -l,
    -m/-W, -t/-T cache modes (default -t unsafe: no fsync, as qemu-img), -U, -r, --target-is-zero,
    --bitmaps; `-p` shows qemu-img's progress line when stdout is a terminal."""
    from ..ops.convert import OpenRefusedError, convert
    snapshot = args.snapshot
    if snapshot is not None:
        for prefix in ("snapshot.name=", "snapshot.id="):
            if snapshot.startswith(prefix):
                snapshot = snapshot[len(prefix):]
                break
    try:
        sparse = qemuopts.strtosz(args.sparse)[0] if args.sparse is not None else 4096
    except (ValueError, OverflowError):
        raise UsageError("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                         "16777216. Select 0 to disable sparse detection (fully allocates output).") from None
    threads = None
    if args.threads is not None:
        if not args.threads.isdigit() or not 1 <= int(args.threads) <= 16:
            raise UsageError(f"Invalid number of coroutines. Allowed number of coroutines is between 1 and 16: "
                             f"'{args.threads}'")
        threads = int(args.threads)
    rate = 0
    if args.rate is not None and (rate := cvtnum("rate limit", args.rate)) < 0:
        return 1
    if args.skip_broken_bitmaps and not args.bitmaps:
        raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
    if args.target_image_opts and not args.target_exists:
        raise UsageError("--target-image-opts requires use of -n flag")
    src, src_format = image_source(args, args.src, args.format)
    check_window(src)
    src_cache = "none" if host_factory(src) is DirectHostFile and args.src_cache == DEFAULT_SOURCE_CACHE \
        else args.src_cache  # cache.direct=on in the source's options
    dst, out_format = args.dst, args.out_format
    if args.target_image_opts:
        dst, out_format = image_source(argparse.Namespace(), args.dst, args.out_format, writable=True, image_opts=True)
        out_format = out_format or probe_format(dst)
        check_window(dst)
    if not os.path.exists(src):
        raise UsageError(f"Could not open '{src}': Could not open '{src}': No such file or directory")
    if args.target_exists and out_format == "qcow2":
        repair_if_dirty(dst)  # (an existing target opens read-write: a dirty one is checked first, as by QEMU)
    bar = QemuProgress(sys.stdout) if args.progress and not args.quiet and sys.stdout.isatty() else None
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BitmapSkippedWarning)
            convert(src, dst, src_format=src_format, out_format=out_format or "raw",
                    options=",".join(args.options) if args.options else None, compress=args.compress,
                    backing_file=args.backing, backing_format=args.backing_format, snapshot=snapshot,
                    sparse_size=sparse, target_exists=args.target_exists, threads=threads,
                    progress=bar.advance if bar is not None else None, out_of_order=args.unordered,
                    target_is_zero=args.target_is_zero, cache=args.cache, src_cache=src_cache,
                    rate_limit=rate, force_share=args.force_share, bitmaps=args.bitmaps,
                    skip_broken_bitmaps=args.skip_broken_bitmaps, source_open=OpenOptions(**spec_options(src)),
                    target_open=OpenOptions(**spec_options(dst)) if args.target_image_opts else None)
    except OpenRefusedError as e:  # qemu-img names the image by its option string
        raise UsageError(f"Could not open '{shown(e.path)}': {e.reason}") from None
    except DirectIOUnsupportedError as e:  # qemu-img: the open's error, after img_open's prefix
        raise UsageError(f"Could not open '{e.filename}': Could not open '{e.filename}': {e.strerror}") from None
    finally:
        if bar is not None:
            bar.end()
        for w in caught:  # qemu-img's warn_report lines, printed after the copy as it prints them
            if issubclass(w.category, BitmapSkippedWarning):
                print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pcv = sub.add_parser("convert", help="copy a guest disk into a new qcow2 or raw image (like qemu-img convert)")
    pcv.add_argument("-f", dest="format", metavar="FMT", help="the source's format (probed if omitted)")
    pcv.add_argument("-O", dest="out_format", metavar="FMT", help="the output format: qcow2 or raw (raw)")
    pcv.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS", help="the new image's options")
    pcv.add_argument("-c", dest="compress", action="store_true", help="write compressed clusters (qcow2)")
    pcv.add_argument("-B", dest="backing", metavar="BACKING", help="make the output an overlay of BACKING")
    pcv.add_argument("-F", dest="backing_format", metavar="FMT", help="the backing file's format")
    pcv.add_argument("-l", dest="snapshot", metavar="SNAPSHOT", help="snapshot.name=N or snapshot.id=N: convert that snapshot")
    pcv.add_argument("-S", dest="sparse", metavar="SIZE", help="zero runs this long stay unallocated (4k; 0: allocate all)")
    pcv.add_argument("-n", dest="target_exists", action="store_true", help="the target exists: write into it")
    pcv.add_argument("-p", dest="progress", action="store_true", help="show progress (on a terminal)")
    pcv.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    pcv.add_argument("-m", dest="threads", metavar="N", help="compression threads")
    pcv.add_argument("-W", dest="unordered", action="store_true",
                     help="compressed clusters written as soon as compressed, out of guest order")
    pcv.add_argument("-t", dest="cache", default=DEFAULT_TARGET_CACHE, metavar="CACHE",
                     help="the target's cache mode (unsafe: never fsynced, qemu-img's default; writeback: "
                          "fsynced at the end; writethrough: after every write; none/directsync: as "
                          "writeback/writethrough, through the page cache)")
    pcv.add_argument("-T", dest="src_cache", default=DEFAULT_SOURCE_CACHE, metavar="SRC_CACHE",
                     help="the source's cache mode (checked; reads use the page cache)")
    pcv.add_argument("-U", dest="force_share", action="store_true", help="open the source without its lock")
    pcv.add_argument("-r", dest="rate", metavar="RATE", help="write at most RATE bytes a second")
    pcv.add_argument("--target-is-zero", dest="target_is_zero", action="store_true",
                     help="with -n: the target reads as zeros already")
    pcv.add_argument("--bitmaps", action="store_true", help="copy the source's persistent bitmaps (qcow2 to qcow2)")
    pcv.add_argument("--skip-broken-bitmaps", dest="skip_broken_bitmaps", action="store_true",
                     help="with --bitmaps: skip inconsistent bitmaps (with a warning) instead of failing")
    add_image_opts(pcv)
    pcv.add_argument("--target-image-opts", dest="target_image_opts", action="store_true",
                     help="DST is an option string (driver=qcow2,file.filename=PATH,...); needs -n")
    pcv.add_argument("src", metavar="SRC")
    pcv.add_argument("dst", metavar="DST")
    pcv.set_defaults(func=cmd_convert)
