"""What every subcommand shares: the program name, its errors and parser, opening images, sizes."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import NoReturn, Protocol

from .. import formats
from ..errors import QcowError
from ..formats import OpenOptions, format_names, probe_format
from ..image import Image
from ..ops import qemuopts
from ..qcow1 import Qcow1File
from ..qcow2.file import QcowFile

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


USAGE_HINT = f"Try '{PROG} --help' for more information\n"  # qemu-img's line after a usage error


def err(*lines: str, hint: str = "", status: int = 1) -> int:
    """Report a failure as qemu-img's error_report does: stdout flushed first, each line with the
    program's name in front, then `hint` as it is; returns `status` for the command to exit with."""
    sys.stdout.flush()
    for line in lines:
        print(f"{PROG}: {line}", file=sys.stderr)
    sys.stderr.write(hint)
    return status


def cvtnum(name: str, text: str) -> int:
    """qemu-img's cvtnum: a size (qemu_strtosz) from 0 to INT64_MAX, or qemu-img's messages
    about `name` printed and -1 returned."""
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


def add_confine(sp: argparse.ArgumentParser, what: str = "the image") -> None:
    """Add --confine-to DIR to a subcommand's parser; `what` names the images it confines."""
    sp.add_argument("--confine-to", metavar="DIR",
                    help=f"refuse backing and data files {what} names that resolve outside DIR")


def add_own_parsing(sub: argparse._SubParsersAction[Parser], name: str, help: str, help_text: str, metavar: str,
                    func: Callable[[argparse.Namespace], int]) -> None:
    """Add a subcommand that parses its words itself, as qemu-img does (getopt_long): they arrive
    untouched in `args.argv`, none taken for an option ("\0" prefix), so that a size such as -1G
    needs no `--`; its usage line is the first line of its own `help_text`."""
    sp = sub.add_parser(name, help=help, add_help=False, prefix_chars="\0",
                        usage=help_text.splitlines()[0][len("usage: "):])
    sp.add_argument("argv", nargs=argparse.REMAINDER, metavar=metavar)
    sp.set_defaults(func=func)


def add_force_share(sp: argparse.ArgumentParser) -> None:
    """Add -U / --force-share to a subcommand's parser."""
    sp.add_argument("-U", "--force-share", action="store_true",
                    help="neither take nor honour the image lock (qemu-img -U); may see it inconsistent")


CHUNK = 1 << 20  # read and write stream through buffers this large


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



def open_image(path: str, args: argparse.Namespace) -> QcowFile | Qcow1File:
    """Open an image read-only (qcow2, or qcow v1) with the command's --confine-to and -U."""
    confine_to = confine_dir(args)
    with opening(path):
        return QcowFile.open(path, readonly=True, confine_to=confine_to, force_share=args.force_share)


def image_format(img: AnyImage) -> str:
    """The format name qemu-img would print for an opened image or backing reader."""
    return img.format_name  # "qcow2" (QcowFile), "qcow" (Qcow1File), "raw" (RawImage)



def open_any(path: str, fmt: str | None, args: argparse.Namespace) -> Image:
    """Open an image of any format read-only with its chain, as qemu-img's img_open (UsageError if not)."""
    options = OpenOptions(readonly=True, confine_to=confine_dir(args), force_share=args.force_share)
    with opening(path):
        fmt = fmt or probe_format(path)
        if fmt not in format_names():
            raise UsageError(f"Could not open '{path}': Unknown driver '{fmt}'")
        return formats.open_image(path, fmt, options)



def open_failed(path: str, e: QcowError | OSError) -> UsageError:
    """qemu-img's message for an image it cannot open (an OS error names the file twice)."""
    if isinstance(e, OSError) and e.strerror:
        return UsageError(f"Could not open '{path}': Could not open '{e.filename or path}': {e.strerror}")
    return UsageError(f"Could not open '{path}': {e}")


def check_chain(path: str) -> None:
    """Refuse an image whose backing file is missing as qemu-img does when opening it."""
    try:
        with QcowFile.open(path, readonly=True, backing=False) as img:
            name = img.backing_file
    except (QcowError, OSError) as e:
        raise open_failed(path, e) from e
    if name:
        shown = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
        if not os.path.exists(shown):
            raise UsageError(f"Could not open '{path}': Could not open backing file: Could not open '{shown}': "
                             f"{os.strerror(2)}")



def print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print the size-suffix warnings caught while parsing options, as qemu-img's warn_report does."""
    for w in caught:
        if issubclass(w.category, qemuopts.SizeSuffixWarning):
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)

