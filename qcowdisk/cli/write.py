"""`qcowdisk write`: a file's bytes or a repeated byte into the guest view (like `qemu-io write`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import stat
import sys

from ..errors import QcowError
from ..qcow2.file import QcowFile
from .common import CHUNK, Parser, UsageError, add_confine, confine_dir, opening, parse_size, repair_if_dirty, why

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

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
        repair_if_dirty(args.image, confine_to)
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


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pw = sub.add_parser("write", help="write a file or a byte pattern into the guest view")
    pw.add_argument("image", metavar="IMAGE")
    pw.add_argument("offset", metavar="OFFSET")
    pw.add_argument("source", metavar="FILE", nargs="?", help="bytes to write ('-' for stdin)")
    pw.add_argument("--pattern", metavar="BYTE", help="byte value to repeat (e.g. 0xab)")
    pw.add_argument("--length", metavar="N", help="how many pattern bytes")
    pw.add_argument("-c", dest="compressed", action="store_true",
                    help="write compressed: whole clusters at a cluster-aligned offset (like qemu-io write -c)")
    pw.add_argument("-q", dest="quiet", action="store_true")
    add_confine(pw)
    pw.set_defaults(func=cmd_write)
