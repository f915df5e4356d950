"""`qcowdisk snapshot`: list, create, apply or delete internal snapshots (like `qemu-img snapshot`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .. import formats
from ..errors import SnapshotNotFoundError
from ..qcow2.file import QcowFile
from ..qcow2.format import (
    Snapshot,
)
from .common import (
    USAGE_HINT,
    Parser,
    add_image_opts,
    err,
    host_factory,
    image_source,
    refused_options,
    repair_if_dirty,
    size_to_str,
    tuning,
)


def snapshot_list_text(snapshots: Sequence[Snapshot]) -> bytes:
    """What `qemu-img snapshot -l` prints for these snapshots (QEMU 7.2's dump_snapshots and
    bdrv_snapshot_dump), byte for byte: nothing without snapshots; ids and names as the C
    strings QEMU keeps (cut at a NUL, at most 127 and 255 bytes); dates in local time; the
    icount column empty where it is unknown."""
    if not snapshots:
        return b""
    lines = [b"Snapshot list:",
             b"%-10s%-17s%8s%20s%13s%11s" % (b"ID", b"TAG", b"VM SIZE", b"DATE", b"VM CLOCK", b"ICOUNT")]
    for sn in snapshots:
        entry = sn.entry
        sid = entry.id_c[:127] if entry is not None else sn.id.encode()
        name = entry.name_c[:255] if entry is not None else sn.name.encode()
        date_sec = entry.date_sec if entry is not None else int(sn.date.timestamp())
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(date_sec)).encode()
        secs = sn.vm_clock_ns // 1_000_000_000
        clock = b"%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60, sn.vm_clock_ns // 1_000_000 % 1000)
        icount = b""
        if sn.icount is not None and sn.icount != (1 << 64) - 1:
            icount = b"%d" % (sn.icount - (1 << 64) if sn.icount >= 1 << 63 else sn.icount)  # PRId64
        lines.append(b"%-9s %-16s %8s%20s%13s%11s" % (sid, name, size_to_str(sn.vm_state_size).encode(), date,
                                                      clock, icount))
    return b"\n".join(lines) + b"\n"


# what QEMU prints when it opens for writing a file whose format it only probed as raw
RAW_PROBE_WARNING = """WARNING: Image format was not specified for '{path}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions."""


def _raw(args: argparse.Namespace, path: str, action: str | None, probed: bool) -> int:
    """A raw image has no snapshots: -l lists none; -c, -a and -d fail as QEMU's raw driver
    makes them fail, after the open (and its warning for a raw format only probed)."""
    readonly = action == "-l"  # (with no action qemu-img opens read-write, and does nothing)
    if probed and not readonly:  # (-a: QEMU's snapshot_goto opens the file a second time)
        print("\n".join([RAW_PROBE_WARNING.format(path=path)] * (2 if action == "-a" else 1)), file=sys.stderr)
    options = tuning(path).replace(readonly=readonly, force_share=args.force_share and readonly,
                                   confine_to=args.confine_to, host_factory=host_factory(path))
    with refused_options(path):
        formats.open_image(path, "raw", options).close()
    if action in (None, "-l"):
        return 0
    ref = (args.create or args.apply or args.delete)[0]
    return err({"-c": f"Could not create snapshot '{ref}': -95 (Operation not supported)",
                "-a": f"Could not apply snapshot '{ref}': Block driver does not support snapshots",
                "-d": f"Could not delete snapshot '{ref}': snapshot not found"}[action])


def cmd_snapshot(args: argparse.Namespace) -> int:
    """`qcowdisk snapshot [-l | -c NAME | -a REF | -d REF] IMAGE`, as `qemu-img snapshot` (7.2).

    -l prints exactly what qemu-img prints; -a resolves an id first, then a name; -d (like
    qemu-img) a name only. A missing snapshot, mixed actions or not exactly one image give
    qemu-img's messages and exit status 1. Unlike qemu-img, -c refuses a name already in use.
    No action: nothing is done (qemu-img's behaviour too).
    """
    given = [flag for flag, n in (("-l", args.list), ("-c", len(args.create or ())), ("-a", len(args.apply or ())),
                                  ("-d", len(args.delete or ()))) for _ in range(n)]
    if len(given) > 1:
        return err("Cannot mix '-l', '-a', '-c', '-d'", hint=USAGE_HINT)
    if len(args.image) != 1:
        return err("Expecting one image file name", hint=USAGE_HINT)
    action = given[0] if given else None
    if args.force_share and action not in (None, "-l") and not args.image_opts:
        return err(f"Could not open '{args.image[0]}': force-share=on can only be used with read-only images")
    path, fmt = image_source(args, args.image[0], None, writable=action not in (None, "-l"))
    if (fmt or formats.probe_format(path)) == "raw":
        return _raw(args, path, action, probed=fmt is None)
    if action in (None, "-l"):
        options = tuning(path).replace(readonly=True, force_share=args.force_share,
                                       confine_to=args.confine_to, host_factory=host_factory(path))
        with refused_options(path):
            img = formats.open_image(path, "qcow" if formats.probe_format(path) == "qcow" else "qcow2", options)
        try:
            if action and isinstance(img, QcowFile) and not img.header.has_data_file:
                out = snapshot_list_text(img.snapshots)
                sys.stdout.flush()
                sys.stdout.buffer.write(out)
                sys.stdout.buffer.flush()
        finally:
            img.close()
        return 0
    repair_if_dirty(path, args.confine_to)
    with refused_options(path):
        disk = QcowFile.open_keeping_bitmaps(path, confine_to=args.confine_to, host_factory=host_factory(path),
                                             tuning=tuning(path))
    with disk:
        data_file = disk.header.has_data_file
        if action == "-c":
            name = args.create[0]
            if data_file:
                return err(f"Could not create snapshot '{name}': -95 (Operation not supported)")
            disk.create_snapshot(name)
        elif action == "-a":
            ref = args.apply[0]
            if data_file:
                return err(f"Could not apply snapshot '{ref}': Failed to load snapshot: Operation not supported")
            if disk.bitmaps:  # QEMU's bdrv_snapshot_goto refuses first
                return err(f"Could not apply snapshot '{ref}': Device has active dirty bitmaps")
            try:
                found = disk.find_snapshot(ref)
            except SnapshotNotFoundError:
                return err(f"Could not apply snapshot '{ref}': Failed to load snapshot: No such file or directory")
            disk.apply_snapshot(found)
        else:
            ref = args.delete[0]
            key = ref.encode("utf-8", "surrogateescape")
            named = [] if data_file else [sn for sn in disk.snapshots
                                          if sn.entry is not None and sn.entry.name_c[:255] == key]
            if not named:
                return err(f"Could not delete snapshot '{ref}': snapshot not found")
            disk.delete_snapshot(named[0])
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    ps = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots (like qemu-img snapshot)")
    ps.add_argument("-l", dest="list", action="count", default=0, help="list the snapshots")
    ps.add_argument("-c", dest="create", action="append", metavar="NAME", help="create a snapshot")
    ps.add_argument("-a", dest="apply", action="append", metavar="REF", help="revert to a snapshot (id or name)")
    ps.add_argument("-d", dest="delete", action="append", metavar="REF", help="delete a snapshot (by name)")
    ps.add_argument("-q", dest="quiet", action="store_true", help="accepted for qemu-img compatibility")
    ps.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                    help="list without taking the image lock (read-only)")
    ps.add_argument("--confine-to", dest="confine_to", metavar="DIR",
                    help="refuse backing and data files outside DIR")
    add_image_opts(ps)
    ps.add_argument("image", metavar="IMAGE", nargs="*")
    ps.set_defaults(func=cmd_snapshot)
