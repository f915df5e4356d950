"""`qcowdisk amend`: change qcow2 options in place (`QcowFile.amend`), with `qemu-img amend`'s parsing,
output and messages."""

from __future__ import annotations

import argparse
import functools
import sys
import warnings

from ..errors import AmendError, ImageLockedError, QcowError
from ..formats import OpenOptionError, format_names, probe_format
from ..ops import qemuopts
from ..qcow2.file import QcowFile
from .common import (
    USAGE_HINT,
    Parser,
    add_own_parsing,
    check_cache_modes,
    err,
    host_factory,
    image_source,
    print_warnings,
    repair_if_dirty,
    shown,
    tuning,
)
from .getoptlong import GetoptError, getopt_long
from .objects import process_objects
from .progress import QemuProgress, f32

AMEND_HELP = """usage: qcowdisk amend [-p] [-q] [-f FMT] [--force] [--confine-to DIR] -o OPTIONS IMAGE

Change qcow2 image options in place (like qemu-img amend). -o help lists the options.
"""
AMEND_OPTIONS_HELP = """Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
"""
_O = qemuopts.OptType
AMEND_TABLE = {"backing_file": _O.STRING, "backing_fmt": _O.STRING, "compat": _O.STRING, "data_file": _O.STRING,
               "data_file_raw": _O.BOOL, "encrypt.iter-time": _O.NUMBER, "encrypt.keyslot": _O.NUMBER,
               "encrypt.new-secret": _O.STRING, "encrypt.old-secret": _O.STRING, "encrypt.state": _O.STRING,
               "lazy_refcounts": _O.BOOL, "refcount_bits": _O.NUMBER, "size": _O.SIZE}
# qcow2's creation-only options: named in qemu-img's hint when amend refuses them
_CREATE_ONLY_TABLE = {"cluster_size": _O.SIZE, "compression_type": _O.STRING, "encrypt.cipher-alg": _O.STRING,
                      "encrypt.cipher-mode": _O.STRING, "encrypt.format": _O.STRING, "encrypt.hash-alg": _O.STRING,
                      "encrypt.ivgen-alg": _O.STRING, "encrypt.ivgen-hash-alg": _O.STRING,
                      "encrypt.key-secret": _O.STRING, "encryption": _O.BOOL, "extended_l2": _O.BOOL,
                      "preallocation": _O.STRING}
_AMEND_SHORT = {"f": True, "h": False, "o": True, "p": False, "q": False, "t": True}
_AMEND_LONG = {"help": False, "force": False, "confine-to": True, "image-opts": False, "object": True}


def _amend_status(progress: QemuProgress, offset: int, total: int) -> None:
    """img_amend's amend_status_cb: qemu_progress_print(100.f * offset / total_work_size, 0)."""
    progress.print_delta(f32(f32(100.0 * offset) / total) if total else 0.0, 0)


def cmd_amend(args: argparse.Namespace) -> int:
    """`qcowdisk amend`: `qemu-img amend` (7.2) for qcow2 images: its syntax, messages, progress
    output and exit status (1 on every failure)."""
    try:
        opts, operands = getopt_long(list(args.argv), _AMEND_SHORT, _AMEND_LONG)
    except GetoptError as e:
        return err(str(e), hint=USAGE_HINT)
    fmt: str | None = None
    options: str | None = None
    quiet = show_progress = image_opts = False
    cache: str | None = None
    objects: list[str] = []
    confine_to: str | None = None
    for name, value in opts:
        if name in ("-h", "--help"):
            sys.stdout.write(AMEND_HELP)
            return 0
        if name == "-o":
            if not qemuopts.valid_option_list(value):
                return err(f"Invalid option list: {value}")
            options = value if options is None else f"{options},{value}"
        elif name == "-f":
            fmt = value
        elif name == "-t":
            cache = value
        elif name == "-q":
            quiet = True
        elif name == "-p":
            show_progress = True
        elif name == "--confine-to":
            confine_to = value
        elif name == "--image-opts":
            image_opts = True
        elif name == "--object":
            objects.append(value)
    process_objects(objects)  # (qemu-img creates them as getopt meets them, before any other check)
    if options is None:
        return err("Must specify options (-o)", hint=USAGE_HINT)
    if quiet:
        show_progress = False
    pairs = qemuopts.split_option_list(options)
    wants_help = any(n in ("help", "?") for n, _ in pairs)
    if fmt == "qcow2" and wants_help:
        sys.stdout.write(AMEND_OPTIONS_HELP)
        return 0
    if len(operands) != 1:
        return err("Expecting one image file name")
    check_cache_modes(argparse.Namespace(cache=cache))
    path, fmt = image_source(argparse.Namespace(), operands[0], fmt, writable=True, image_opts=image_opts)
    shown_as = shown(path)
    if fmt is not None and fmt not in format_names():
        return err(f"Could not open '{shown_as}': Unknown driver '{fmt}'")
    try:
        probed = fmt or probe_format(path)
    except OSError as e:
        return err(f"Could not open '{shown_as}': Could not open '{path}': {e.strerror or e}")
    except QcowError as e:
        return err(f"Could not open '{shown_as}': {e}")
    if probed != "qcow2":
        return err(f"Format driver '{probed}' does not support option amendment")
    repair_if_dirty(path, confine_to)
    try:
        disk = QcowFile.open_keeping_bitmaps(path, confine_to=confine_to, host_factory=host_factory(path, cache),
                                             tuning=tuning(path))
    except OpenOptionError as e:
        return err(f"Could not open '{shown_as}': {e}")
    except OSError as e:
        return err(f"Could not open '{shown_as}': Could not open '{path}': {e.strerror or e}")
    except ImageLockedError:
        return err(f"Could not open '{shown_as}': Failed to get \"write\" lock",
                   hint=f"Is another process using the image [{path}]?\n")
    except QcowError as e:
        return err(f"Could not open '{shown_as}': {e}")
    progress = QemuProgress(sys.stdout, 1.0) if show_progress else None  # qemu-img amend: min_skip 1
    status = 0
    try:
        if wants_help:
            sys.stdout.write(AMEND_OPTIONS_HELP)
            return 0
        parsed = qemuopts.QemuOpts(AMEND_TABLE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", qemuopts.SizeSuffixWarning)
            try:
                parsed.parse(pairs)
            except qemuopts.OptionError as e:
                hint = e.hint
                try:
                    qemuopts.QemuOpts({**AMEND_TABLE, **_CREATE_ONLY_TABLE}).parse(pairs)
                    hint += "This option is only supported for image creation\n"
                except qemuopts.OptionError:
                    pass
                print_warnings(caught)
                return err(str(e), hint=hint)
        print_warnings(caught)
        if progress is not None:
            progress.print_delta(0.0, 100)
        try:
            disk.amend(compat=parsed.string("compat") if parsed.given("compat") else None,
                       lazy_refcounts=parsed.boolean("lazy_refcounts", False) if parsed.given("lazy_refcounts") else None,
                       backing_file=parsed.string("backing_file"), backing_fmt=parsed.string("backing_fmt"),
                       refcount_bits=parsed.number("refcount_bits", 0) if parsed.given("refcount_bits") else None,
                       size=parsed.number("size", 0) or None,
                       data_file=parsed.string("data_file"),
                       data_file_raw=parsed.boolean("data_file_raw", False) if parsed.given("data_file_raw") else None,
                       encrypt=any(n.startswith("encrypt.") for n in AMEND_TABLE if parsed.given(n)),
                       progress=None if progress is None else functools.partial(_amend_status, progress))
        finally:
            if progress is not None:
                progress.print_delta(100.0, 0)
        if progress is not None:
            progress.end()
            progress = None
    except AmendError as e:
        status = err(str(e), hint=e.hint)
    except OSError as e:
        status = err(e.strerror or str(e))
    except QcowError as e:
        status = err(str(e))
    finally:
        if progress is not None:
            progress.end()
        try:
            disk.close()
        except (QcowError, OSError) as e:
            if not status:
                status = err(str(e))
    return status


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    add_own_parsing(sub, "amend", "change image options in place (like qemu-img amend)", AMEND_HELP,
                    "[-p] [-q] [-f FMT] [--force] -o OPTIONS IMAGE", cmd_amend)
