"""`qcowdisk read`: guest bytes to stdout, raw or as qemu-io's hex dump."""

from __future__ import annotations

import argparse
import sys

from ..errors import QcowError
from .common import CHUNK, Parser, UsageError, add_confine, add_force_share, open_image, parse_size, why

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

HEXDUMP_CHUNK = 16 << 10  # --hexdump's text is about 4.3 times the bytes: smaller steps
_PRINTABLE = bytes(b if 32 <= b < 127 else ord(".") for b in range(256))  # hexdump's text column


def hexdump(data: bytes, base: int = 0) -> str:
    """qemu-io style hex dump: 16 bytes a line, offset, hex, printable ASCII."""
    lines = []
    text = data.translate(_PRINTABLE).decode("ascii")
    for pos in range(0, len(data), 16):
        lines.append(f"{base + pos:08x}:  {data[pos:pos + 16].hex(' '):<47}  {text[pos:pos + 16]}")
    return "\n".join(lines) + ("\n" if lines else "")



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


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    pr = sub.add_parser("read", help="read guest bytes to stdout")
    pr.add_argument("image", metavar="IMAGE")
    pr.add_argument("offset", metavar="OFFSET")
    pr.add_argument("length", metavar="LENGTH")
    pr.add_argument("--hexdump", action="store_true", help="print a hex dump instead of raw bytes")
    add_confine(pr)
    add_force_share(pr)
    pr.set_defaults(func=cmd_read)
