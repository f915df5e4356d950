"""The `qcowdisk` command: `info`, `create`, `map`, `check`, and small `read` / `write` helpers.

`info` and `create` follow `qemu-img`'s syntax and output (QEMU 7.2) closely enough that scripts
written for one work with the other: `info --output=json` emits the same keys, value types and
key order as `qemu-img info --output=json` for every field qcowdisk knows; the human output uses
QEMU's layout and size formatting. Paths are reported the way QEMU reports them: as given on the
command line, and backing files joined to the directory of the image that names them, without
normalisation.

Every image is read through `QcowFile.open(path, readonly=True)` (`--confine-to` and `-U` passed
on as `confine_to` and `force_share`). Every failure, a bad argument included, is one line
`qcowdisk: <message>` on stderr and exit status 1, as qemu-img does: an image that cannot be
opened is `Could not open 'IMAGE': <why>`; argparse's usage errors add qemu-img's `Try ... --help`
hint line. `read` and `write` stream through a bounded buffer, whatever the length.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import stat
import struct
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NoReturn, Protocol, TextIO, TypedDict

from . import formats
from ._version import __version__
from .blockstatus import qemu_length
from .errors import AmendError, ImageLockedError, QcowError, SnapshotNotFoundError
from .formats import OpenOptions, format_names, probe_format
from .image import Extent, Image
from .ops import CommitError, CompareError, RebaseError, commit, compare, measure, qemuopts, rebase
from .qcow1 import Qcow1File
from .qcow2.check import CheckFailedError
from .qcow2.file import QcowFile
from .qcow2.format import (
    BME_FLAG_AUTO,
    BME_FLAG_IN_USE,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    Bitmap,
    Header,
    Snapshot,
)

PROG = "qcowdisk"
INT64_MAX = (1 << 63) - 1

# qemu_strtosz: the suffix multiplies by a power of 1024, case-insensitively; 'b' (or none) = bytes.
_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
                  "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(\d+)(?:\.(\d+))?\s*([bkmgtpe]?)\s*$", re.IGNORECASE)
_SIZE_HINT = ("You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, "
              "terabytes, petabytes and exabytes.")


class UsageError(Exception):
    """A failure worded for the user (a bad value, a file that cannot be opened): `qcowdisk: <message>`, status 1."""


class ArgumentsError(UsageError):
    """argparse's usage error (unknown option, missing argument): also gets qemu-img's `Try ... --help` line."""


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors reported as qemu-img reports them (status 1, not argparse's 2)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentsError(message)


CHUNK = 1 << 20  # read and write stream through buffers this large
HEXDUMP_CHUNK = 16 << 10  # --hexdump's text is about 4.3 times the bytes: smaller steps


def why(e: QcowError | OSError, path: str | None = None) -> str:
    """The reason in an error: an OS error's strerror (with its file name unless that is `path`)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename in (None, path) else f"{e.filename}: {e.strerror}"
    return str(e)


@contextlib.contextmanager
def opening(path: str) -> Iterator[None]:
    """Report an image (or file) that cannot be opened as qemu-img does: `Could not open 'PATH': why`."""
    try:
        yield
    except (QcowError, OSError) as e:
        raise UsageError(f"Could not open '{path}': {why(e, path)}") from e


def confine_dir(args: argparse.Namespace) -> str | None:
    """The --confine-to directory, checked to be one (None when not given)."""
    path: str | None = args.confine_to
    if path is not None and not os.path.isdir(path):
        raise UsageError(f"--confine-to '{path}': not a directory")
    return path


class AnyImage(Protocol):
    """What the CLI needs of an opened image of any format: the part of `image.Image` it uses.

    QcowFile, Qcow1File and backing.RawImage have it (as does every `Image`); format-specific
    fields (header, backing, snapshots) are read after an isinstance check.
    """

    @property
    def virtual_size(self) -> int: ...

    @property
    def format_name(self) -> str: ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class CreateKeywords(TypedDict, total=False):
    """The `QcowFile.create` keywords that `-o` options set."""

    cluster_size: int
    refcount_bits: int
    compat: str
    lazy_refcounts: bool
    extended_l2: bool
    compression_type: str
    preallocation: str
    data_file: str
    data_file_raw: bool


class CreateOptions(CreateKeywords, total=False):
    """Everything `-o` can set: the `QcowFile.create` keywords, the size and the backing file."""

    size: int
    backing_file: str
    backing_format: str


# qemu-img info --output=json, as QEMU's QAPI types (SnapshotInfo, ImageInfoSpecificQCow2, ImageInfo)
# spell their keys; a key is absent where QEMU leaves it out, and insertion order is QEMU's.
SnapshotInfo = TypedDict("SnapshotInfo", {
    "icount": int, "vm-clock-nsec": int, "name": str, "date-sec": int, "date-nsec": int,
    "vm-clock-sec": int, "id": str, "vm-state-size": int}, total=False)
class BitmapInfo(TypedDict):
    flags: list[str]
    name: str
    granularity: int
Qcow2SpecificInfo = TypedDict("Qcow2SpecificInfo", {
    "compat": str, "compression-type": str, "lazy-refcounts": bool, "bitmaps": list[BitmapInfo], "refcount-bits": int,
    "data-file": str, "data-file-raw": bool, "corrupt": bool, "extended-l2": bool}, total=False)


class FormatSpecificInfo(TypedDict):
    """ImageInfoSpecific: the format's name and its data (qcow2 is the only one shown)."""

    type: str
    data: Qcow2SpecificInfo


ImageInfo = TypedDict("ImageInfo", {
    "backing-filename-format": str, "snapshots": list[SnapshotInfo], "virtual-size": int, "filename": str,
    "cluster-size": int, "format": str, "actual-size": int, "format-specific": FormatSpecificInfo,
    "full-backing-filename": str, "backing-filename": str, "dirty-flag": bool}, total=False)


# --------------------------------------------------------------------------------------------
# Parsing helpers
# --------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Parse a qemu-img size: digits, an optional fraction, an optional suffix b/k/M/G/T/P/E.

    Suffixes are binary (k = 1024) and case-insensitive, as in qemu-img. A fraction needs a
    suffix larger than bytes ("1.5k" is 1536, "1.5" is refused). Raises ValueError.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"Invalid size {text!r}. {_SIZE_HINT}")
    whole, frac, suffix = m.group(1), m.group(2), m.group(3).lower()
    mul = _SIZE_SUFFIXES[suffix]
    value = int(whole) * mul
    if frac is not None:
        if mul == 1:
            raise ValueError(f"Invalid size {text!r}: a fraction needs a k, M, G, T, P or E suffix")
        value += int(frac) * mul // 10 ** len(frac)
    if value > INT64_MAX:
        raise ValueError(f"Invalid size {text!r}: must be between 0 and {INT64_MAX}")
    return value


def parse_bool(name: str, text: str) -> bool:
    """Parse an on/off option value the way QEMU does (on/off, yes/no, true/false)."""
    low = text.lower()
    if low in ("on", "yes", "true", "y"):
        return True
    if low in ("off", "no", "false", "n"):
        return False
    raise ValueError(f"Parameter '{name}' expects 'on' or 'off', got {text!r}")


def split_options(specs: Sequence[str]) -> list[tuple[str, str]]:
    """Split `-o a=1,b=2` strings into (name, value) pairs; ',,' is a literal comma (QEMU's rule)."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        items: list[str] = []
        cur = ""
        i = 0
        while i < len(spec):
            if spec[i] == ",":
                if spec[i + 1:i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                items.append(cur)
                cur = ""
            else:
                cur += spec[i]
            i += 1
        items.append(cur)
        for item in items:
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Invalid option {item!r}: expected name=value")
            pairs.append((name.strip(), value))
    return pairs


_COMPAT_ALIASES = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}


def create_options(pairs: Sequence[tuple[str, str]]) -> tuple[CreateOptions, list[tuple[str, str]]]:
    """Map `-o` pairs onto `QcowFile.create` keyword arguments.

    Returns the keywords and the (name, value-as-typed) pairs that were given, for the
    `Formatting ...` line. `size`, `backing_file` and `backing_fmt` come back under those keys.
    """
    kw: CreateOptions = {}
    given: list[tuple[str, str]] = []
    for name, value in pairs:
        given.append((name, value))
        if name == "size":
            kw["size"] = parse_size(value)
        elif name == "cluster_size":
            kw["cluster_size"] = parse_size(value)
        elif name == "refcount_bits":
            if not value.isdigit():
                raise ValueError(f"Invalid refcount_bits {value!r}: expected a power of two 1..64")
            kw["refcount_bits"] = int(value)
        elif name == "compat":
            if value not in _COMPAT_ALIASES:
                raise ValueError(f"Invalid compatibility level: '{value}' (use 0.10, 1.1, v2 or v3)")
            kw["compat"] = _COMPAT_ALIASES[value]
        elif name == "lazy_refcounts":
            kw["lazy_refcounts"] = parse_bool(name, value)
        elif name == "extended_l2":
            kw["extended_l2"] = parse_bool(name, value)
        elif name == "data_file_raw":
            kw["data_file_raw"] = parse_bool(name, value)
        elif name == "compression_type":
            if value not in COMPRESSION_NAMES.values():
                raise ValueError(f"Invalid compression_type {value!r} (use zlib or zstd)")
            kw["compression_type"] = value
        elif name == "preallocation":
            if value not in ("off", "metadata", "falloc", "full"):
                raise ValueError(f"Invalid preallocation mode: '{value}' (use off, metadata, falloc or full)")
            kw["preallocation"] = value
        elif name == "data_file":
            kw["data_file"] = value
        elif name == "backing_file":
            kw["backing_file"] = value
        elif name == "backing_fmt":
            kw["backing_format"] = value
        else:
            raise ValueError(f"Invalid parameter '{name}'")
    return kw, given


def combine_path(base: str, name: str) -> str:
    """Resolve a backing name against the naming image's path exactly as QEMU's path_combine does."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(base), name)


def size_to_str(value: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary unit ("204 KiB", "1 GiB")."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(0, (exp - 1) // 10)
    i = min(i, len(suffixes) - 1)
    return "%0.3g %sB" % (value / (1 << (i * 10)), suffixes[i])


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------

def open_image(path: str, args: argparse.Namespace) -> QcowFile | Qcow1File:
    """Open an image read-only (qcow2, or qcow v1) with the command's --confine-to and -U."""
    confine_to = confine_dir(args)
    with opening(path):
        return QcowFile.open(path, readonly=True, confine_to=confine_to, force_share=args.force_share)


def image_format(img: AnyImage) -> str:
    """The format name qemu-img would print for an opened image or backing reader."""
    return img.format_name  # "qcow2" (QcowFile), "qcow" (Qcow1File), "raw" (RawImage)


def _actual_size(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def _snapshot_info(s: Snapshot) -> SnapshotInfo:
    """One snapshot as qemu-img's JSON has it (QEMU's key order)."""
    d: SnapshotInfo = {}
    icount = s.icount
    if icount is not None and icount != 0xFFFFFFFFFFFFFFFF:  # QEMU: absent when unknown (-1)
        d["icount"] = icount
    date_sec = int(s.date.timestamp())
    d["vm-clock-nsec"] = s.vm_clock_ns % 1_000_000_000
    d["name"] = s.name
    d["date-sec"] = date_sec
    d["date-nsec"] = s.date.microsecond * 1000
    d["vm-clock-sec"] = s.vm_clock_ns // 1_000_000_000
    d["id"] = s.id
    d["vm-state-size"] = s.vm_state_size
    return d


def _bitmap_info(b: Bitmap) -> BitmapInfo:
    """One bitmap as qemu-img's JSON has it (QEMU's key order; flags in-use, auto)."""
    flags = [name for bit, name in ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto")) if b.flags & bit]
    return {"flags": flags, "name": b.name, "granularity": b.granularity}


def _qcow2_specific(header: Header, bitmaps: Sequence[Bitmap] = ()) -> Qcow2SpecificInfo:
    """format-specific.data for a qcow2 image, with QEMU 7.2's presence rules and key order."""
    data: Qcow2SpecificInfo = {}
    if header.version == 2:
        data["compat"] = "0.10"
        data["compression-type"] = COMPRESSION_NAMES.get(header.compression_type, "zlib")
        data["refcount-bits"] = header.refcount_bits
        return data
    data["compat"] = "1.1"
    data["compression-type"] = COMPRESSION_NAMES.get(header.compression_type, "zlib")
    data["lazy-refcounts"] = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
    if bitmaps:
        data["bitmaps"] = [_bitmap_info(b) for b in bitmaps]
    data["refcount-bits"] = header.refcount_bits
    if header.data_file is not None:
        data["data-file"] = header.data_file
    if header.has_data_file:  # QEMU: present whenever an external data file is in use
        data["data-file-raw"] = header.data_file_raw
    data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
    data["extended-l2"] = header.extended_l2
    return data


def image_info(img: AnyImage, filename: str) -> ImageInfo:
    """qemu-img info's JSON object for one opened image; `filename` is the name QEMU would show."""
    fmt = image_format(img)
    header = img.header if isinstance(img, QcowFile) else None  # the qcow2 header; None otherwise
    # qcow2 keeps the names in its header; Qcow1File exposes them on the image itself.
    backing_name: str | None = None
    backing_fmt: str | None = None
    if header is not None:
        backing_name, backing_fmt = header.backing_file, header.backing_format
    elif isinstance(img, Qcow1File):
        backing_name = img.backing_file  # qcow v1 cannot record a format; QEMU never shows one
    snapshots = list(img.snapshots) if isinstance(img, QcowFile) else []

    info: ImageInfo = {}
    if backing_name and backing_fmt:
        info["backing-filename-format"] = backing_fmt
    if snapshots:
        info["snapshots"] = [_snapshot_info(s) for s in snapshots]
    info["virtual-size"] = img.virtual_size
    info["filename"] = filename
    if isinstance(img, (QcowFile, Qcow1File)):
        info["cluster-size"] = img.cluster_size
    info["format"] = fmt
    actual = _actual_size(filename)
    if actual is not None:
        info["actual-size"] = actual
    if header is not None:
        assert isinstance(img, QcowFile)
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(header, img.bitmaps)}
    if backing_name:
        info["full-backing-filename"] = combine_path(filename, backing_name)
        info["backing-filename"] = backing_name
    dirty = False
    if header is not None and header.version >= 3:
        dirty = bool(header.incompatible_features & INCOMPAT_DIRTY)
    info["dirty-flag"] = dirty
    return info


def chain_info(img: AnyImage, filename: str) -> list[ImageInfo]:
    """Info for the image and every image below it, top first (qemu-img info --backing-chain)."""
    out: list[ImageInfo] = []
    while img is not None:
        entry = image_info(img, filename)
        out.append(entry)
        nxt = img.backing if isinstance(img, (QcowFile, Qcow1File)) else None  # a raw image has none
        if nxt is None or "full-backing-filename" not in entry:
            break
        img, filename = nxt, entry["full-backing-filename"]
    return out


def format_human(info: ImageInfo) -> str:
    """qemu-img info's human-readable text for one image (bdrv_image_info_dump, QEMU 7.2)."""
    lines = [f"image: {info['filename']}",
             f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)"]
    if "actual-size" in info:
        lines.append(f"disk size: {size_to_str(info['actual-size'])}")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append("%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"))
        for s in info["snapshots"]:
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
            secs = s["vm-clock-sec"]
            clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                            s["vm-clock-nsec"] // 1_000_000 % 1000)
            icount = str(s["icount"]) if "icount" in s else ""
            lines.append("%-9s %-16s %8s%20s%13s%11s" % (s["id"], s["name"], size_to_str(s["vm-state-size"]),
                                                         date, clock, icount))
    if "format-specific" in info:
        lines.append("Format specific information:")
        for key, value in info["format-specific"]["data"].items():
            _dump_value(lines, 1, key.replace("-", " "), value)
    return "\n".join(lines) + "\n"


def _dump_value(lines: list[str], level: int, label: str, value: object) -> None:
    """QEMU's dump_qobject: scalars on the label's line, lists as [i] and dicts as keys below it."""
    pad = "    " * level
    if isinstance(value, list):
        lines.append(f"{pad}{label}:")
        for i, item in enumerate(value):
            _dump_value(lines, level + 1, f"[{i}]", item)
    elif isinstance(value, dict):
        lines.append(f"{pad}{label}:")
        for key, item in value.items():
            _dump_value(lines, level + 1, str(key).replace("-", " "), item)
    else:
        shown = ("true" if value else "false") if isinstance(value, bool) else value
        lines.append(f"{pad}{label}: {shown}")


def qemu_json(value: object, level: int = 0) -> str:
    """QEMU's pretty JSON (qobject_to_json_pretty): json.dumps(indent=4), except that an empty
    list or dict still opens and closes on lines of its own."""
    pad = "    " * level
    if isinstance(value, dict):
        items = [f"{pad}    {_qemu_json_string(str(k))}: {qemu_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + pad + "}"
    if isinstance(value, list):
        items = [f"{pad}    {qemu_json(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + ("\n" if items else "") + pad + "]"
    if isinstance(value, str):
        return _qemu_json_string(value)
    return json.dumps(value)


_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _qemu_json_string(text: str) -> str:
    """A JSON string as QEMU's to_json writes it: control characters, DEL and everything past
    ASCII as \\uXXXX (upper-case hex, surrogate pairs past the BMP)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 | code >> 10, 0xDC00 | code & 0x3FF))
        else:
            out.append("\\u%04X" % code)
    out.append('"')
    return "".join(out)


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


# --------------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# read / write (small helpers for demos and scripts)
# --------------------------------------------------------------------------------------------

_PRINTABLE = bytes(b if 32 <= b < 127 else ord(".") for b in range(256))  # hexdump's text column


def hexdump(data: bytes, base: int = 0) -> str:
    """qemu-io style hex dump: 16 bytes a line, offset, hex, printable ASCII."""
    lines = []
    text = data.translate(_PRINTABLE).decode("ascii")
    for pos in range(0, len(data), 16):
        lines.append(f"{base + pos:08x}:  {data[pos:pos + 16].hex(' '):<47}  {text[pos:pos + 16]}")
    return "\n".join(lines) + ("\n" if lines else "")


_PATTERN_RE = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def pattern_byte(text: str) -> int:
    """qemu-io's pattern byte: a C integer (decimal, 0x hex, 0 octal, as strtol reads it) in 0..255."""
    if _PATTERN_RE.fullmatch(text):
        digits = text.lstrip("+-")
        value = int(digits, 16 if digits[:2].lower() == "0x" else 8 if digits[0] == "0" else 10)
        if text[0] == "-":
            value = -value
        if 0 <= value <= 255:
            return value
    raise ValueError(f"{text} is not a valid pattern byte")  # qemu-io's words


def cmd_write(args: argparse.Namespace) -> int:
    """`qcowdisk write`: write a file's bytes, or a repeated byte, at a guest offset (-c: compressed).

    The bytes stream through a buffer of CHUNK bytes (a whole number of clusters with -c). A
    write past the end of the disk fails as `qemu-io -c write` does (`write failed: Input/output
    error`), before anything is written when the length is known (a pattern, a regular file);
    from a pipe, the chunks before the one that would cross the end are written first. With -c
    the range must be whole clusters, as qemu-io's `write -c` (`write failed: Invalid argument`).
    """
    try:
        offset = parse_size(args.offset)
        name: str | None = args.source  # the file to copy ('-': stdin), or None with --pattern
        byte = length = None
        if args.pattern is not None:
            if args.length is None or name is not None:
                raise ValueError("--pattern needs --length and no FILE")
            byte = pattern_byte(args.pattern)
            length = parse_size(args.length)
        elif name is not None:
            if args.length is not None:
                raise ValueError("--length goes with --pattern only")
        else:
            raise ValueError("give a FILE (or '-') or --pattern BYTE --length N")
    except ValueError as e:
        raise UsageError(str(e)) from None
    confine_to = confine_dir(args)
    with contextlib.ExitStack() as stack:
        source: BinaryIO | None = None
        if name is not None:
            if name == "-":
                source = sys.stdin.buffer
            else:
                with opening(name):
                    source = stack.enter_context(open(name, "rb"))
            try:
                st = os.fstat(source.fileno())
                length = st.st_size if stat.S_ISREG(st.st_mode) else None
            except (OSError, ValueError):  # a stdin without a descriptor: its length is unknown
                length = None
        with opening(args.image):
            disk = stack.enter_context(QcowFile.open(args.image, confine_to=confine_to))

        chunk = max(CHUNK, disk.cluster_size) if args.compressed else CHUNK  # whole clusters with -c

        def put(pos: int, data: memoryview) -> None:
            if offset + pos + len(data) > disk.virtual_size:
                raise UsageError("write failed: Input/output error")  # qemu-io's words
            try:
                if args.compressed:
                    disk.write_compressed(offset + pos, data)
                else:
                    disk.write_at(offset + pos, data)
            except ValueError:  # -c on a range that is not whole clusters
                raise UsageError("write failed: Invalid argument") from None  # qemu-io's words
            except (QcowError, OSError) as e:
                raise UsageError(f"write failed: {why(e)}") from e

        if offset + (length or 0) > disk.virtual_size:  # a known length fails before anything is written
            raise UsageError("write failed: Input/output error")
        written = 0
        if source is None:
            assert byte is not None and length is not None
            block = memoryview(bytes([byte]) * min(length, chunk))
            while written < length:
                n = min(len(block), length - written)
                put(written, block[:n])
                written += n
        else:
            while data := source.read(chunk):
                put(written, memoryview(data))
                written += len(data)
    if not args.quiet:
        print(f"wrote {written}/{written} bytes at offset {offset}")
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    """`qcowdisk read`: copy guest bytes to stdout (raw, or as a hex dump with --hexdump).

    The bytes stream through a buffer of CHUNK bytes (HEXDUMP_CHUNK with --hexdump). A range
    past the end of the disk fails before any output, as `qemu-io -c read` does:
    `read failed: Input/output error`, status 1.
    """
    try:
        offset = parse_size(args.offset)
        length = parse_size(args.length)
    except ValueError as e:
        raise UsageError(str(e)) from None
    img = open_image(args.image, args)
    try:
        if offset + length > img.virtual_size:
            raise UsageError("read failed: Input/output error")  # qemu-io's words
        step = HEXDUMP_CHUNK if args.hexdump else CHUNK
        buf = memoryview(bytearray(min(length, step)))
        out: BinaryIO = sys.stdout.buffer
        pos = 0
        while pos < length:
            data = buf[:min(step, length - pos)]
            try:
                img.readinto_at(data, offset + pos)
            except (QcowError, OSError) as e:
                raise UsageError(f"read failed: {why(e)}") from e
            if args.hexdump:
                sys.stdout.write(hexdump(bytes(data), offset + pos))
            else:
                out.write(data)
            pos += len(data)
        sys.stdout.flush()
    finally:
        img.close()
    return 0


# --------------------------------------------------------------------------------------------
# map
# --------------------------------------------------------------------------------------------

def cmd_map(args: argparse.Namespace) -> int:
    """`qcowdisk map`: where the guest disk's data lives, printed exactly as `qemu-img map` (7.2) does.

    The extents are `block_status`'s; this only formats them. Errors are qemu-img's messages
    (with this program's name in front) and exit status 1: a bad number or --output value,
    an image to open that is not exactly one, and, in the human format, an extent stored
    without a host offset (compressed clusters), after the lines before it.
    """
    def err(*lines: str, hint: str = "") -> int:
        sys.stdout.flush()
        for line in lines:  # error_report: one prefixed line each
            print(f"{PROG}: {line}", file=sys.stderr)
        sys.stderr.write(hint)
        return 1

    def number(name: str, text: str) -> int:
        # qemu-img's cvtnum: qemu_strtosz, then 0 .. INT64_MAX
        try:
            value, hex_suffix = qemuopts.strtosz(text)
        except OverflowError:
            value, hex_suffix = INT64_MAX + 1, False
        except ValueError:
            return -err(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for",
                        "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
        if hex_suffix:
            print(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: {text}", file=sys.stderr)
        if value > INT64_MAX:
            return -err(f"Invalid {name} specified. Must be between 0 and {INT64_MAX}.")
        return value

    def reported(extents: Iterator[Extent]) -> Iterator[Extent]:
        # a failure to read the image's tables, in qemu-img's words
        try:
            yield from extents
        except (QcowError, OSError) as e:
            raise QcowError(f"Could not read file metadata: {e}") from e

    def hex16(value: int) -> str:
        # printf("%#-16" PRIx64): 0x-prefixed (but plain 0), left-aligned in 16 columns
        return f"{value:#x}".ljust(16) if value else "0".ljust(16)

    def json_entry(e: Extent) -> str:
        # one entry of qemu-img map --output=json (7.2: no "compressed" key)
        def b(v: bool) -> str:
            return "true" if v else "false"
        text = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, "present": {b(e.present)}, '
                f'"zero": {b(e.zero)}, "data": {b(e.data)}')
        if e.offset is not None:
            text += f', "offset": {e.offset}'
        return text + "}"

    start, max_length = 0, -1
    if args.start_offset is not None and (start := number("start offset", args.start_offset)) < 0:
        return 1
    if args.max_length is not None and (max_length := number("max length", args.max_length)) < 0:
        return 1
    if args.output not in ("human", "json"):
        return err("--output must be used with human or json as argument.")
    if len(args.image) != 1:
        return err("Expecting one image file name", hint=f"Try '{PROG} --help' for more information\n")
    path = args.image[0]
    options = OpenOptions(readonly=True, confine_to=confine_dir(args), force_share=args.force_share)
    with opening(path):
        fmt = args.format or probe_format(path)
        if fmt not in format_names():
            return err(f"Could not open '{path}': Unknown driver '{fmt}'")
        img = formats.open_image(path, fmt, options)
    out = sys.stdout
    try:
        human = args.output == "human"
        out.write("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File") if human else "[")
        end = qemu_length(img)
        if max_length != -1:
            limit = start + max_length
            if limit > INT64_MAX:  # qemu-img's int64 addition wraps negative: nothing to map
                limit -= 1 << 64
            end = min(limit, end)
        extents = img.block_status(start, end - start) if start < end else iter(())
        if human:
            for e in reported(extents):
                if e.data and e.offset is None:
                    return err("File contains external, encrypted or compressed clusters.")
                if e.data and not e.zero:
                    out.write(f"{hex16(e.start)}{hex16(e.length)}{hex16(e.offset or 0)}{e.filename or ''}\n")
        else:
            # qemu-img prints an entry with its ",\n" once it knows another follows (merged ones
            # are yielded just then): so also before failing on a later table entry.
            last: Extent | None = None
            try:
                for e in reported(extents):
                    if last is not None:
                        out.write(json_entry(last) + ",\n")
                    last = e
            except QcowError:
                if last is not None:
                    out.write(json_entry(last) + ",\n")
                raise
            # nothing to map: qemu-img prints its empty starting entry
            out.write(json_entry(last or Extent(start, 0, 0, False, False, False, None)) + "]\n")
    finally:
        img.close()
    return 0


# --------------------------------------------------------------------------------------------
# snapshot
# --------------------------------------------------------------------------------------------

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


def cmd_snapshot(args: argparse.Namespace) -> int:
    """`qcowdisk snapshot [-l | -c NAME | -a REF | -d REF] IMAGE`, as `qemu-img snapshot` (7.2).

    -l prints exactly what qemu-img prints; -a resolves an id first, then a name; -d (like
    qemu-img) a name only. A missing snapshot, mixed actions or not exactly one image give
    qemu-img's messages and exit status 1. Unlike qemu-img, -c refuses a name already in use.
    No action: nothing is done (qemu-img's behaviour too).
    """
    def err(*lines: str, hint: str = "") -> int:
        sys.stdout.flush()
        for line in lines:
            print(f"{PROG}: {line}", file=sys.stderr)
        sys.stderr.write(hint)
        return 1

    usage_hint = f"Try '{PROG} --help' for more information\n"
    given = [flag for flag, n in (("-l", args.list), ("-c", len(args.create or ())), ("-a", len(args.apply or ())),
                                  ("-d", len(args.delete or ()))) for _ in range(n)]
    if len(given) > 1:
        return err("Cannot mix '-l', '-a', '-c', '-d'", hint=usage_hint)
    if len(args.image) != 1:
        return err("Expecting one image file name", hint=usage_hint)
    path = args.image[0]
    action = given[0] if given else None
    if action in (None, "-l"):
        img = QcowFile.open(path, readonly=True, force_share=args.force_share, confine_to=args.confine_to)
        try:
            if action and isinstance(img, QcowFile) and not img.header.has_data_file:
                out = snapshot_list_text(img.snapshots)
                sys.stdout.flush()
                sys.stdout.buffer.write(out)
                sys.stdout.buffer.flush()
        finally:
            img.close()
        return 0
    if args.force_share:
        return err(f"Could not open '{path}': force-share=on can only be used with read-only images")
    with QcowFile.open(path, confine_to=args.confine_to) as disk:
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
# check
# --------------------------------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    """`qcowdisk check`: check (and with -r repair) an image, printing and exiting as `qemu-img check` (7.2).

    The per-cluster lines (`Leaked cluster ...`, `ERROR cluster ...`, `Repairing ...`) go to
    stderr as the check meets them; the summary (human or JSON) to stdout, unless -q. Exit
    status: 0 clean, 2 corruptions, 3 leaked clusters only, 1 the check failed (or found
    internal errors), 63 a format without checks (raw, qcow).
    """
    def err(message: str, hint: bool = False) -> int:
        sys.stdout.flush()
        print(f"{PROG}: {message}", file=sys.stderr)
        if hint:
            print(f"Try '{PROG} --help' for more information", file=sys.stderr)
        return 1

    def report(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    if args.repair is not None and args.repair not in ("leaks", "all"):
        return err(f"Unknown option value for -r (expecting 'leaks' or 'all'): {args.repair}", hint=True)
    if args.output not in ("human", "json"):
        return err("--output must be used with human or json as argument.")
    if len(args.image) != 1:
        return err("Expecting one image file name", hint=True)
    path = args.image[0]
    confine_to = confine_dir(args)
    if args.repair and args.force_share:
        return err(f"Could not open '{path}': force-share=on can only be used with read-only images")
    with opening(path):
        fmt = args.format or probe_format(path)
        if fmt not in format_names():
            return err(f"Could not open '{path}': Unknown driver '{fmt}'")
        if fmt != "qcow2":
            other = formats.open_image(path, fmt, OpenOptions(readonly=True, confine_to=confine_to,
                                                              force_share=args.force_share))
            other.close()
            err("This image format does not support checks")
            return 63
        img = QcowFile.open_for_check(path, repair=args.repair is not None, confine_to=confine_to,
                                      force_share=args.force_share)
    try:
        try:
            result = img.check(args.repair, report=report)
        except CheckFailedError as e:
            return err(str(e))
    finally:
        img.close()
    result = dataclasses.replace(result, filename=path)
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


# --------------------------------------------------------------------------------------------
# resize
# --------------------------------------------------------------------------------------------

RESIZE_HELP = """usage: qcowdisk resize [--shrink] [-f FMT] [-q] [--confine-to DIR] IMAGE [+|-]SIZE

Change the virtual size of a qcow2 image to SIZE, or by +SIZE / -SIZE (like qemu-img resize).
SIZE takes qemu-img's suffixes (k, M, G, T, P, E: powers of 1024) and must come last, so that
a negative one is never read as an option; it is not rounded (qemu-img refuses a size that is
not a multiple of 512, and so does this).

options:
  --shrink          allow making the image smaller (everything past the new end is discarded)
  -f FMT            the image format: qcow2 (probed if omitted)
  -q                do not print 'Image resized.'
  --confine-to DIR  refuse backing and data files that resolve outside DIR
  -h, --help        show this help
"""
_RESIZE_SHORT = {"f": True, "h": False, "q": False}  # option letter -> takes an argument
_RESIZE_LONG = {"help": False, "shrink": False, "confine-to": True}


class _GetoptError(Exception):
    """A command line getopt_long refuses, in qemu-img's words."""


def _getopt_long(argv: Sequence[str], short: dict[str, bool],
                 long: dict[str, bool]) -> tuple[list[tuple[str, str]], list[str]]:
    """glibc's getopt_long as qemu-img drives it: ([(option, argument)], operands).

    Options and operands may come in any order and `--` ends the options; short options
    cluster (`-qf qcow2`, `-fqcow2`); a long one may be any unambiguous prefix and takes its
    argument as `--name=value` or in the next word. Options come back as `-f` / `--shrink`.
    """
    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            operands.extend(argv[i:])
            break
        if not word.startswith("-") or word == "-":
            operands.append(word)
        elif word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            matches = [n for n in long if n == name] or [n for n in long if n.startswith(name)]
            if len(matches) != 1 or (eq and not long[matches[0]]):
                raise _GetoptError(f"unrecognized option '{word}'")
            if long[matches[0]] and not eq:
                if i == len(argv):
                    raise _GetoptError(f"missing argument for option '{word}'")
                value, i = argv[i], i + 1
            opts.append((f"--{matches[0]}", value))
        else:
            for j, letter in enumerate(word[1:], 1):
                if letter not in short:
                    raise _GetoptError(f"unrecognized option '{word}'")
                if not short[letter]:
                    opts.append((f"-{letter}", ""))
                    continue
                value = word[j + 1:]
                if not value:
                    if i == len(argv):
                        raise _GetoptError(f"missing argument for option '{word}'")
                    value, i = argv[i], i + 1
                opts.append((f"-{letter}", value))
                break
    return opts, operands


def cmd_resize(args: argparse.Namespace) -> int:
    """`qcowdisk resize`: `qemu-img resize` (7.2) for qcow2 images: its syntax, output, messages
    and exit status (1 on every failure, the program's name in front of each message).

    The parser hands over the words after `resize` untouched: like qemu-img, the size is taken
    off the end first and the rest parsed as getopt_long would, so `-1G` needs no `--` (which
    qemu-img accepts too). A relative size is applied to the current size with qemu-img's
    64-bit arithmetic; then the image is opened read-write and `QcowFile.resize` does the rest,
    its refusals (`ResizeError`) carrying qemu-img's messages. Other formats are refused.
    """
    argv = list(args.argv)

    def err(*lines: str, hint: str = "") -> int:
        sys.stdout.flush()
        for line in lines:  # error_report / warn_report: one prefixed line each
            print(f"{PROG}: {line}", file=sys.stderr)
        sys.stderr.write(hint)
        return 1

    usage_hint = f"Try '{PROG} --help' for more information\n"
    if len(argv) < 2:
        return err("Not enough arguments", hint=usage_hint)
    size_text = argv.pop()
    try:
        opts, operands = _getopt_long(argv, _RESIZE_SHORT, _RESIZE_LONG)
    except _GetoptError as e:
        return err(str(e), hint=usage_hint)
    fmt: str | None = None
    quiet = shrink = False
    confine_to: str | None = None
    for name, value in opts:
        if name in ("-h", "--help"):
            sys.stdout.write(RESIZE_HELP)
            return 0
        if name == "-f":
            fmt = value
        elif name == "-q":
            quiet = True
        elif name == "--shrink":
            shrink = True
        else:
            confine_to = value
    if len(operands) != 1:
        return err("Expecting image file name and size", hint=usage_hint)
    path = operands[0]

    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    text = size_text[1:] if relative else size_text
    try:
        n, hex_suffix = qemuopts.strtosz(text)
    except OverflowError:
        return err(f"Value '{text}' is out of range for parameter 'size'")
    except ValueError:
        return err("Parameter 'size' expects a non-negative number below 2^64",
                   hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                        "and exabytes, respectively.\n")
    if hex_suffix:
        print(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: {text}", file=sys.stderr)
    if n > INT64_MAX:  # qemu-img keeps the size in an int64_t
        n -= 1 << 64

    if fmt is not None and fmt not in format_names():
        return err(f"Could not open '{path}': Unknown driver '{fmt}'")
    try:
        probed = fmt or probe_format(path)
        if probed != "qcow2":
            return err(f"Could not open '{path}': qcowdisk resizes qcow2 images only, not {probed}")
        disk = QcowFile.open(path, confine_to=confine_to)
    except OSError as e:  # QEMU names the file twice: its format layer, then its file layer
        return err(f"Could not open '{path}': Could not open '{path}': {e.strerror or e}")
    except QcowError as e:
        return err(f"Could not open '{path}': {e}")
    status = 0
    try:
        current = disk.virtual_size
        total = current + relative * n if relative else n
        total = (total + (1 << 63)) % (1 << 64) - (1 << 63)  # int64_t wraps
        if total <= 0:
            status = err("New image size must be positive")
        elif total < current and not shrink:
            status = err("Use the --shrink option to perform a shrink operation.",
                         "warning: Shrinking an image will delete all data beyond the shrunken image's end. "
                         "Before performing such an operation, make sure there is no important data there.")
        else:
            disk.resize(total, shrink=True)
    except OSError as e:
        status = err(e.strerror or str(e))
    except QcowError as e:
        status = err(str(e))
    finally:
        try:
            disk.close()
        except (QcowError, OSError) as e:
            if not status:
                status = err(str(e))
    if not status and not quiet:
        print("Image resized.")
    return status


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# compare / measure (qcowdisk.ops; this only parses, opens and prints)
# --------------------------------------------------------------------------------------------

def _open_for_op(path: str, fmt: str | None, args: argparse.Namespace) -> Image:
    """Open an image of any format read-only with its chain, as qemu-img's img_open (UsageError if not)."""
    options = OpenOptions(readonly=True, confine_to=confine_dir(args), force_share=args.force_share)
    with opening(path):
        fmt = fmt or probe_format(path)
        if fmt not in format_names():
            raise UsageError(f"Could not open '{path}': Unknown driver '{fmt}'")
        return formats.open_image(path, fmt, options)


def _f32(value: float) -> float:
    """`value` rounded to a C float (qemu-img's progress arithmetic is single precision)."""
    result: float = struct.unpack("f", struct.pack("f", value))[0]
    return result


class QemuProgress:
    """qemu-img's progress line (util/qemu-progress.c with min_skip 2): `    (12.34/100%)\r`,
    printed at 0, at 100 and whenever the percentage grew by more than 2 since the last line;
    a newline at the end."""

    def __init__(self, out: TextIO, min_skip: float = 2.0) -> None:
        self.out = out
        self.min_skip = min_skip
        self.current = self.last_print = 0.0
        self.done = 0

    def print_delta(self, delta: float, max_: int = 100) -> None:
        """qemu_progress_print(delta, max)."""
        current = _f32(self.current + _f32(_f32(delta / 100) * max_)) if max_ else delta
        current = min(current, 100.0)
        self.current = current
        if current > _f32(self.last_print + self.min_skip) or current < _f32(self.last_print - self.min_skip) \
                or current in (0.0, 100.0):
            self.last_print = current
            self.out.write("    (%3.2f/100%%)\r" % current)
            self.out.flush()

    def advance(self, done: int, total: int) -> None:
        """An operation's progress(done, total): the step since the last call, as qemu-img reports it."""
        chunk, self.done = done - self.done, done
        self.print_delta(_f32(_f32(_f32(chunk) / _f32(total)) * 100) if total else 0.0)

    def end(self) -> None:
        """qemu_progress_end."""
        self.out.write("\n")
        self.out.flush()


def cmd_compare(args: argparse.Namespace) -> int:
    """`qcowdisk compare`: qemu-img compare's verdict, messages and exit status (0 identical,
    1 different, 2 an image cannot be opened, 3 its block status cannot be read, 4 its data);
    `-p` shows qemu-img's progress line when stdout is a terminal."""
    def err(status: int, *lines: str, hint: str = "") -> int:
        sys.stdout.flush()
        for line in lines:
            print(f"{PROG}: {line}", file=sys.stderr)
        sys.stderr.write(hint)
        return status

    if len(args.image) != 2:
        return err(1, "Expecting two image file names", hint=f"Try '{PROG} --help' for more information\n")
    bar = QemuProgress(sys.stdout) if args.progress and not args.quiet and sys.stdout.isatty() else None
    shown: list[str] = []

    def say(line: str) -> None:
        shown.append(line)
        if not args.quiet:
            print(line)

    try:
        with contextlib.ExitStack() as stack:
            images: list[Image] = []
            for path, fmt in zip(args.image, (args.format, args.b_format), strict=True):
                try:
                    img = _open_for_op(path, fmt, args)
                except UsageError as e:
                    return err(2, str(e))
                stack.callback(img.close)
                images.append(img)
            shorter = min(qemu_length(images[0]), qemu_length(images[1]))
            sizes_differ = qemu_length(images[0]) != qemu_length(images[1])

            def progress(done: int, total: int) -> None:
                assert bar is not None
                if sizes_differ and done > shorter and not shown:  # qemu-img warns before the tail
                    say("Warning: Image size mismatch!")
                bar.advance(done, total)

            try:
                result = compare(images[0], images[1], strict=args.strict, progress=progress if bar else None)
            except CompareError as e:
                return err(e.status, str(e))
            for line in result.messages[len(shown):]:
                say(line)
            return 0 if result.identical else 1
    finally:
        if bar is not None:
            bar.end()


def cmd_convert(args: argparse.Namespace) -> int:
    """`qcowdisk convert`: qemu-img convert's copy (qcow2 or raw out), its -S sparseness, -c, -B, -n, -l;
    `-p` shows qemu-img's progress line when stdout is a terminal."""
    from .ops.convert import convert
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
    if not os.path.exists(args.src):
        raise UsageError(f"Could not open '{args.src}': Could not open '{args.src}': No such file or directory")
    bar = QemuProgress(sys.stdout) if args.progress and not args.quiet and sys.stdout.isatty() else None
    try:
        convert(args.src, args.dst, src_format=args.format, out_format=args.out_format,
                options=",".join(args.options) if args.options else None, compress=args.compress,
                backing_file=args.backing, backing_format=args.backing_format, snapshot=snapshot,
                sparse_size=sparse, target_exists=args.target_exists, threads=threads,
                progress=bar.advance if bar is not None else None)
    finally:
        if bar is not None:
            bar.end()
    return 0


class _InOrder(argparse.Action):
    """Collect options in command-line order (qemu-img checks each as getopt returns it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[object] | None, option_string: str | None = None) -> None:
        ordered: list[tuple[str, str]] = list(getattr(namespace, "ordered", None) or [])
        ordered.append((self.dest, str(values)))
        namespace.ordered = ordered


def cmd_measure(args: argparse.Namespace) -> int:
    """`qcowdisk measure`: qemu-img measure's sizes, its output formats and its refusals (status 1)."""
    def err(*lines: str, hint: str = "") -> int:
        sys.stdout.flush()
        for line in lines:
            print(f"{PROG}: {line}", file=sys.stderr)
        sys.stderr.write(hint)
        return 1

    output, size, options = "human", None, None
    for name, value in args.ordered or []:
        if name == "output":
            if value not in ("human", "json"):
                return err("--output must be used with human or json as argument.")
            output = value
        elif name == "size":
            try:
                size, hex_suffix = qemuopts.strtosz(value)
            except OverflowError:
                size, hex_suffix = INT64_MAX + 1, False
            except ValueError:
                return err("Invalid image size specified. You may use k, M, G, T, P or E suffixes for",
                           "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            if hex_suffix:
                print(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: {value}",
                      file=sys.stderr)
            if size > INT64_MAX:
                return err(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
        elif not qemuopts.valid_option_list(value):
            return err(f"Invalid option list: {value}")
        else:
            options = value if options is None else f"{options},{value}"
    if len(args.image) > 1:
        return err("At most one filename argument is allowed.")
    filename = args.image[0] if args.image else None
    if filename is None and args.format:
        return err("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and size is not None:
        return err("--size N cannot be used together with a filename.")
    if filename is None and size is None:
        return err("Either --size N or one filename must be specified.")
    with contextlib.ExitStack() as stack:
        source = None
        if filename is not None:
            source = _open_for_op(filename, args.format, args)
            stack.callback(source.close)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", qemuopts.SizeSuffixWarning)
            try:
                result = measure(size=size, src=source, options=options, out_format=args.out_format)
            except qemuopts.OptionError as e:
                _print_warnings(caught)
                err(str(e), hint=e.hint)
                return err(f"Invalid options for file format '{args.out_format}'")
            except ValueError as e:
                _print_warnings(caught)
                return err(str(e))
        _print_warnings(caught)
    if output == "json":
        shown: dict[str, int] = {} if result.bitmaps is None else {"bitmaps": result.bitmaps}
        shown.update({"required": result.required, "fully-allocated": result.fully_allocated})
        sys.stdout.write(json.dumps(shown, indent=4) + "\n")
    else:
        sys.stdout.write(f"required size: {result.required}\nfully allocated size: {result.fully_allocated}\n")
        if result.bitmaps is not None:
            sys.stdout.write(f"bitmaps size: {result.bitmaps}\n")
    return 0


# --------------------------------------------------------------------------------------------
# commit / rebase (qcowdisk.ops; this only parses, checks and prints)
# --------------------------------------------------------------------------------------------

def _open_failed(path: str, e: QcowError | OSError) -> UsageError:
    """qemu-img's message for an image it cannot open (an OS error names the file twice)."""
    if isinstance(e, OSError) and e.strerror:
        return UsageError(f"Could not open '{path}': Could not open '{e.filename or path}': {e.strerror}")
    return UsageError(f"Could not open '{path}': {e}")


def _check_chain(path: str) -> None:
    """Refuse an image whose backing file is missing as qemu-img does when opening it."""
    try:
        with QcowFile.open(path, readonly=True, backing=False) as img:
            name = img.backing_file
    except (QcowError, OSError) as e:
        raise _open_failed(path, e) from e
    if name:
        shown = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
        if not os.path.exists(shown):
            raise UsageError(f"Could not open '{path}': Could not open backing file: Could not open '{shown}': "
                             f"{os.strerror(2)}")


def _bar(args: argparse.Namespace) -> QemuProgress | None:
    """qemu-img's progress line for -p (unless -q), on stdout whether or not it is a terminal."""
    return QemuProgress(sys.stdout) if args.progress and not args.quiet else None


def cmd_commit(args: argparse.Namespace) -> int:
    """`qcowdisk commit`: qemu-img commit's copy into the backing file (or the -b layer, which
    implies -d), the emptied image, "Image committed." and its errors (status 1)."""
    path: str = args.image
    if args.format not in (None, "qcow2"):
        raise UsageError(f"Could not open '{path}': only qcow2 images can be committed")
    if not os.path.exists(path):
        raise _open_failed(path, FileNotFoundError(2, os.strerror(2), path))
    _check_chain(path)
    bar = _bar(args)
    try:
        commit(path, base=args.base, drop=args.drop or args.base is not None,
               progress=bar.advance if bar else None, image_format=args.format)
    except CommitError as e:
        raise UsageError(str(e)) from e
    finally:
        if bar is not None:
            bar.end()
    if not args.quiet:
        print("Image committed.")
    return 0


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
        raise _open_failed(path, FileNotFoundError(2, os.strerror(2), path))
    if not args.unsafe:
        _check_chain(path)
    bar = _bar(args) if not args.unsafe else None
    try:
        rebase(path, backing, backing_format=args.backing_format, unsafe=args.unsafe,
               progress=bar.advance if bar else None)
    except RebaseError as e:
        raise UsageError(str(e)) from e
    finally:
        if bar is not None:
            bar.end()
    return 0


# --------------------------------------------------------------------------------------------
# amend (QcowFile.amend; qemu-img amend's parsing, output and messages)
# --------------------------------------------------------------------------------------------

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
_AMEND_LONG = {"help": False, "force": False, "confine-to": True}


def _amend_status(progress: QemuProgress, offset: int, total: int) -> None:
    """img_amend's amend_status_cb: qemu_progress_print(100.f * offset / total_work_size, 0)."""
    progress.print_delta(_f32(_f32(100.0 * offset) / total) if total else 0.0, 0)


def cmd_amend(args: argparse.Namespace) -> int:
    """`qcowdisk amend`: `qemu-img amend` (7.2) for qcow2 images: its syntax, messages, progress
    output and exit status (1 on every failure)."""
    def err(*lines: str, hint: str = "") -> int:
        sys.stdout.flush()
        for line in lines:
            print(f"{PROG}: {line}", file=sys.stderr)
        sys.stderr.write(hint)
        return 1

    usage_hint = f"Try '{PROG} --help' for more information\n"
    try:
        opts, operands = _getopt_long(list(args.argv), _AMEND_SHORT, _AMEND_LONG)
    except _GetoptError as e:
        return err(str(e), hint=usage_hint)
    fmt: str | None = None
    options: str | None = None
    quiet = show_progress = False
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
        elif name == "-q":
            quiet = True
        elif name == "-p":
            show_progress = True
        elif name == "--confine-to":
            confine_to = value
    if options is None:
        return err("Must specify options (-o)", hint=usage_hint)
    if quiet:
        show_progress = False
    pairs = qemuopts.split_option_list(options)
    wants_help = any(n in ("help", "?") for n, _ in pairs)
    if fmt == "qcow2" and wants_help:
        sys.stdout.write(AMEND_OPTIONS_HELP)
        return 0
    if len(operands) != 1:
        return err("Expecting one image file name")
    path = operands[0]
    if fmt is not None and fmt not in format_names():
        return err(f"Could not open '{path}': Unknown driver '{fmt}'")
    try:
        probed = fmt or probe_format(path)
    except OSError as e:
        return err(f"Could not open '{path}': Could not open '{path}': {e.strerror or e}")
    except QcowError as e:
        return err(f"Could not open '{path}': {e}")
    if probed != "qcow2":
        return err(f"Format driver '{probed}' does not support option amendment")
    try:
        disk = QcowFile.open(path, confine_to=confine_to)
    except OSError as e:
        return err(f"Could not open '{path}': Could not open '{path}': {e.strerror or e}")
    except ImageLockedError:
        return err(f"Could not open '{path}': Failed to get \"write\" lock",
                   hint=f"Is another process using the image [{path}]?\n")
    except QcowError as e:
        return err(f"Could not open '{path}': {e}")
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
                _print_warnings(caught)
                return err(str(e), hint=hint)
        _print_warnings(caught)
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



def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        if issubclass(w.category, qemuopts.SizeSuffixWarning):
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    p = Parser(prog=PROG, description="Inspect and create QEMU qcow2 images (pure Python).")
    p.add_argument("--version", action="version", version=f"{PROG} version {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def confine(sp: argparse.ArgumentParser, what: str = "the image") -> None:
        sp.add_argument("--confine-to", metavar="DIR",
                        help=f"refuse backing and data files {what} names that resolve outside DIR")

    def force_share(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-U", "--force-share", action="store_true",
                        help="neither take nor honour the image lock (qemu-img -U); may see it inconsistent")

    pi = sub.add_parser("info", help="show image metadata (like qemu-img info)")
    pi.add_argument("--output", choices=("human", "json"), default="human")
    pi.add_argument("--backing-chain", action="store_true", help="also show every backing image")
    confine(pi)
    force_share(pi)
    pi.add_argument("image", metavar="IMAGE")
    pi.set_defaults(func=cmd_info)

    pc = sub.add_parser("create", help="create a qcow2 image (like qemu-img create)")
    pc.add_argument("-f", dest="format", default="qcow2", help="image format (only qcow2)")
    pc.add_argument("-b", dest="backing", metavar="BACKING", help="backing file, stored as given")
    pc.add_argument("-F", dest="backing_format", metavar="FMT", help="backing file format (probed if omitted)")
    pc.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                    help="comma-separated name=value creation options")
    pc.add_argument("-q", dest="quiet", action="store_true", help="do not print the Formatting line")
    confine(pc, "the new image")
    pc.add_argument("image", metavar="IMAGE")
    pc.add_argument("size", metavar="SIZE", nargs="?", help="virtual size, e.g. 10G (optional with -b)")
    pc.set_defaults(func=cmd_create)

    pw = sub.add_parser("write", help="write a file or a byte pattern into the guest view")
    pw.add_argument("image", metavar="IMAGE")
    pw.add_argument("offset", metavar="OFFSET")
    pw.add_argument("source", metavar="FILE", nargs="?", help="bytes to write ('-' for stdin)")
    pw.add_argument("--pattern", metavar="BYTE", help="byte value to repeat (e.g. 0xab)")
    pw.add_argument("--length", metavar="N", help="how many pattern bytes")
    pw.add_argument("-c", dest="compressed", action="store_true",
                    help="write compressed: whole clusters at a cluster-aligned offset (like qemu-io write -c)")
    pw.add_argument("-q", dest="quiet", action="store_true")
    confine(pw)
    pw.set_defaults(func=cmd_write)

    pm = sub.add_parser("map", help="show where the guest disk's data lives (like qemu-img map)")
    pm.add_argument("--output", default="human", help="human (default) or json")  # checked by cmd_map, as qemu-img does
    pm.add_argument("-s", "--start-offset", dest="start_offset", metavar="OFFSET", help="first guest byte to map")
    pm.add_argument("-l", "--max-length", dest="max_length", metavar="LENGTH", help="how many bytes to map at most")
    pm.add_argument("-f", dest="format", metavar="FMT", help="image format (qcow2, qcow, raw; probed if omitted)")
    confine(pm)
    force_share(pm)
    pm.add_argument("image", metavar="IMAGE", nargs="*")
    pm.set_defaults(func=cmd_map)

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
    ps.add_argument("image", metavar="IMAGE", nargs="*")
    ps.set_defaults(func=cmd_snapshot)
    pk = sub.add_parser("check", help="check (and repair) an image's refcounts (like qemu-img check)")
    pk.add_argument("-r", "--repair", dest="repair", metavar="leaks|all",
                    help="repair leaked clusters (leaks) or corruptions too (all)")
    pk.add_argument("--output", default="human", help="human (default) or json")  # checked by cmd_check, as qemu-img does
    pk.add_argument("-f", dest="format", metavar="FMT", help="image format (probed if omitted)")
    pk.add_argument("-q", "--quiet", dest="quiet", action="store_true", help="print only errors")
    confine(pk)
    force_share(pk)
    pk.add_argument("image", metavar="IMAGE", nargs="*")
    pk.set_defaults(func=cmd_check)

    pr = sub.add_parser("read", help="read guest bytes to stdout")
    pr.add_argument("image", metavar="IMAGE")
    pr.add_argument("offset", metavar="OFFSET")
    pr.add_argument("length", metavar="LENGTH")
    pr.add_argument("--hexdump", action="store_true", help="print a hex dump instead of raw bytes")
    confine(pr)
    force_share(pr)
    pr.set_defaults(func=cmd_read)

    pcmp = sub.add_parser("compare", help="compare two guest disks (like qemu-img compare)")
    pcmp.add_argument("-f", dest="format", metavar="FMT", help="first image's format (probed if omitted)")
    pcmp.add_argument("-F", dest="b_format", metavar="FMT", help="second image's format (probed if omitted)")
    pcmp.add_argument("-s", dest="strict", action="store_true", help="strict: sizes and block status must match too")
    pcmp.add_argument("-q", dest="quiet", action="store_true", help="print nothing (the exit status tells)")
    pcmp.add_argument("-p", dest="progress", action="store_true", help="show progress (on a terminal)")
    confine(pcmp, "either image")
    force_share(pcmp)
    pcmp.add_argument("image", metavar="IMAGE", nargs="*", help="the two images")
    pcmp.set_defaults(func=cmd_compare)

    pme = sub.add_parser("measure", help="size a new image would need (like qemu-img measure)")
    pme.add_argument("--output", action=_InOrder, help="human (default) or json")
    pme.add_argument("--size", action=_InOrder, metavar="SIZE", help="a new disk of this size")
    pme.add_argument("-o", dest="options", action=_InOrder, metavar="OPTIONS", help="the new image's options")
    pme.add_argument("-O", dest="out_format", default="raw", metavar="FMT", help="the new image's format (raw)")
    pme.add_argument("-f", dest="format", metavar="FMT", help="the source image's format (probed if omitted)")
    confine(pme, "the source image")
    force_share(pme)
    pme.add_argument("image", metavar="SOURCE", nargs="*", help="the image to convert")
    pme.set_defaults(func=cmd_measure, ordered=None)

    pcm = sub.add_parser("commit", help="commit an overlay into its backing file (like qemu-img commit)")
    pcm.add_argument("-f", dest="format", metavar="FMT", help="the image's format (qcow2; probed if omitted)")
    pcm.add_argument("-b", dest="base", metavar="BASE", help="commit into this deeper layer of the chain (implies -d)")
    pcm.add_argument("-d", dest="drop", action="store_true", help="leave the image as it is (do not empty it)")
    pcm.add_argument("-p", dest="progress", action="store_true", help="show progress")
    pcm.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    pcm.add_argument("image", metavar="IMAGE")
    pcm.set_defaults(func=cmd_commit)

    prb = sub.add_parser("rebase", help="change an image's backing file (like qemu-img rebase)")
    prb.add_argument("-f", dest="format", metavar="FMT", help="the image's format (qcow2; probed if omitted)")
    prb.add_argument("-b", dest="backing", metavar="BACKING", help="the new backing file ('' for none)")
    prb.add_argument("-F", dest="backing_format", metavar="FMT", help="the new backing file's format")
    prb.add_argument("-u", dest="unsafe", action="store_true", help="only rewrite the name (copy nothing)")
    prb.add_argument("-p", dest="progress", action="store_true", help="show progress")
    prb.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    prb.add_argument("image", metavar="IMAGE")
    prb.set_defaults(func=cmd_rebase)

    # qemu-img's own parsing (cmd_amend), as for resize below
    pa = sub.add_parser("amend", help="change image options in place (like qemu-img amend)", add_help=False,
                        prefix_chars="\0", usage=AMEND_HELP.splitlines()[0][len("usage: "):])
    pa.add_argument("argv", nargs=argparse.REMAINDER, metavar="[-p] [-q] [-f FMT] [--force] -o OPTIONS IMAGE")
    pa.set_defaults(func=cmd_amend)

    pcv = sub.add_parser("convert", help="copy a guest disk into a new qcow2 or raw image (like qemu-img convert)")
    pcv.add_argument("-f", dest="format", metavar="FMT", help="the source's format (probed if omitted)")
    pcv.add_argument("-O", dest="out_format", default="raw", metavar="FMT", help="the output format: qcow2 or raw (raw)")
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
    pcv.add_argument("-W", dest="unordered", action="store_true", help="accepted (writes may be out of order)")
    pcv.add_argument("src", metavar="SRC")
    pcv.add_argument("dst", metavar="DST")
    pcv.set_defaults(func=cmd_convert)

    # qemu-img's own parsing (cmd_resize): the words after "resize" arrive untouched, so that a
    # size such as -1G is never taken for an option. No word is an option here ("\0" prefix).
    pz = sub.add_parser("resize", help="change the virtual size (like qemu-img resize)", add_help=False,
                        prefix_chars="\0", usage=RESIZE_HELP.splitlines()[0][len("usage: "):])
    pz.add_argument("argv", nargs=argparse.REMAINDER, metavar="[--shrink] [-f FMT] [-q] [--confine-to DIR] IMAGE [+|-]SIZE")
    pz.set_defaults(func=cmd_resize)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, or 1 after printing `qcowdisk: <message>`."""
    try:
        args = build_parser().parse_args(argv)
    except ArgumentsError as e:
        print(f"{PROG}: {e}\nTry '{PROG} --help' for more information", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    try:
        return int(args.func(args))
    except BrokenPipeError:  # the reader went away (`qcowdisk read ... | head`): no more output
        with contextlib.suppress(OSError, ValueError):  # nor a second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (QcowError, UsageError, OSError, ValueError) as e:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
        msg = str(e)
        if isinstance(e, OSError) and e.filename is not None and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        print(f"{PROG}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
