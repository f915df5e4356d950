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

from .. import formats
from ..errors import ImageLockedError, QcowError
from ..formats import OpenOptionError, OpenOptions, format_names, probe_format
from ..hostio import DirectHostFile, HostFile
from ..ops import qemuopts
from ..ops.cachemode import CacheModeError, host_class, parse_cache_mode
from ..ops.imageopts import ImageOpts, ImageOptsError, parse_image_opts
from ..qcow1 import Qcow1File
from ..qcow2.file import QcowFile
from ..qcow2.format import HEADER_V2_LENGTH, HEADER_V3_MIN_LENGTH, HEADER_V3_STRUCT, INCOMPAT_DIRTY, QCOW_MAGIC
from ..raw import RawWindowError, raw_window

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn, Protocol

    from ..image import Image

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


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns (COLUMNS, else the terminal's, else 80), without
    importing shutil (with fnmatch, bz2 and lzma) at every start."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized without shutil: argparse makes one for every argument it adds
    (to check the metavar), so the default one imports shutil at every command's start."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors reported as qemu-img reports them (status 1, not argparse's 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

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


def why(e: QcowError | OSError | ValueError, path: str | None = None) -> str:
    """The reason in an error: an OS error's strerror (with its file name unless that is `path`),
    a lock conflict in qemu-img's words."""
    if isinstance(e, ImageLockedError) and e.qemu_reason:
        return f"{e.qemu_reason}\nIs another process using the image [{e.path}]?"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror if e.filename in (None, path) else f"{e.filename}: {e.strerror}"
    return str(e)


@contextlib.contextmanager
def opening(path: str) -> Iterator[None]:
    """Report an image (or file) that cannot be opened as qemu-img does: `Could not open 'PATH': why`."""
    try:
        yield
    except (QcowError, OSError, ValueError) as e:
        if isinstance(e, ValueError) and not isinstance(e, QcowError) and path not in _IMAGE_OPTS:
            raise  # (an --image-opts value QEMU checks at open, e.g. the L2 cache entry size)
        raise UsageError(f"Could not open '{shown(path)}': {why(e, path)}") from e


# --image-opts: the images named by option strings in this run, by the file each names
_IMAGE_OPTS: dict[str, ImageOpts] = {}


def reset_image_opts() -> None:
    """Forget the images named by --image-opts (a new command starts)."""
    _IMAGE_OPTS.clear()


def image_spec(path: str) -> ImageOpts | None:
    """The --image-opts string that named the image `path` in this run, parsed (None if none)."""
    return _IMAGE_OPTS.get(path)


def shown(path: str) -> str:
    """How qemu-img names an image in its messages: the option string that named it with
    --image-opts, else its file name."""
    spec = _IMAGE_OPTS.get(path)
    return spec.text if spec is not None else path


def add_image_opts(sp: argparse.ArgumentParser, image_opts: bool = True) -> None:
    """Add --object (and --image-opts) to a subcommand's parser."""
    if image_opts:
        sp.add_argument("--image-opts", dest="image_opts", action="store_true",
                        help="the image names are option strings (driver=qcow2,file.filename=PATH,...)")
    sp.add_argument("--object", dest="objects", action="append", default=[], metavar="OBJECTDEF",
                    help="define a QEMU object (secret: checked, unused: qcowdisk has no encryption)")


def image_source(args: argparse.Namespace, name: str, fmt: str | None, *, writable: bool = False,
                 opens_backing: bool = True, image_opts: bool | None = None,
                 opens_data_file: bool = True) -> tuple[str, str | None]:
    """(file name, format) of an image operand: `name` itself and `fmt`, or with --image-opts
    (`image_opts`, default args.image_opts) what the option string `name` says, checked as
    qemu-img checks it (UsageError with its message); `opens_backing` and `opens_data_file` say
    whether the command opens those (see parse_image_opts). An option string's force-share sets
    args.force_share; what else it says reaches `open_options` (spec_options)."""
    if not (getattr(args, "image_opts", False) if image_opts is None else image_opts):
        return name, fmt
    if fmt:
        raise UsageError("--image-opts and --format are mutually exclusive")
    def warn(line: str) -> None:
        print(f"{PROG}: warning: {line}", file=sys.stderr)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", qemuopts.SizeSuffixWarning)
        try:
            spec = parse_image_opts(name, force_share=getattr(args, "force_share", False), writable=writable,
                                    opens_backing=opens_backing, opens_data_file=opens_data_file, warn=warn)
        except ImageOptsError as e:
            print_warnings(caught)
            message = f"Could not open '{name}': {e}" if e.prefixed else str(e)
            raise UsageError(message + ("\n" + e.hint.rstrip("\n") if e.hint else "")) from None
    print_warnings(caught)
    if hasattr(args, "force_share"):
        args.force_share = spec.force_share
    _IMAGE_OPTS[spec.filename] = spec
    return spec.filename, spec.driver


def add_cache_options(sp: argparse.ArgumentParser, target: bool = True, source: bool = False) -> None:
    """Add qemu-img's -t CACHE (the image written) and/or -T SRC_CACHE (images read) to a parser."""
    if target:
        sp.add_argument("-t", dest="cache", metavar="CACHE",
                        help="none/directsync: O_DIRECT; unsafe: no fsync; writeback (default), writethrough")
    if source:
        sp.add_argument("-T", dest="src_cache", metavar="SRC_CACHE",
                        help="cache mode for the images read (none/directsync: O_DIRECT)")


def add_chain_options(sp: argparse.ArgumentParser, source_cache: bool) -> None:
    """Add commit's or rebase's -t (and rebase's -T), --image-opts and --object."""
    add_cache_options(sp, source=source_cache)
    add_image_opts(sp)


def check_cache_modes(args: argparse.Namespace) -> None:
    """Refuse a -t / -T mode qemu-img does not know, with its message (UsageError)."""
    for attr, what in (("cache", "cache"), ("src_cache", "source cache")):
        mode = getattr(args, attr, None)
        if mode is not None:
            try:
                parse_cache_mode(mode, what)
            except CacheModeError as e:
                raise UsageError(str(e)) from None


def host_factory(path: str, mode: str | None = None) -> type[HostFile]:
    """The host I/O class for the image `path`: the (checked) cache `mode`'s when given (O_DIRECT
    for none and directsync), else O_DIRECT when its --image-opts said cache.direct=on."""
    if mode is not None:
        return host_class(mode)
    spec = _IMAGE_OPTS.get(path)
    return DirectHostFile if spec is not None and spec.cache_direct else HostFile


def chain_operand(args: argparse.Namespace, verb: str, opens_backing: bool = True) -> tuple[str, str | None]:
    """(file name, format) of the qcow2 image commit or rebase (`verb`: "committed", "rebased")
    works on: args.image with -f, or --image-opts (`opens_backing`: whether the command opens
    its chain); refuses what they cannot do, and a bad -t / -T."""
    check_cache_modes(args)
    path, fmt = image_source(args, args.image, args.format, writable=True, opens_backing=opens_backing)
    if fmt not in (None, "qcow2"):
        raise UsageError(f"Could not open '{shown(path)}': only qcow2 images can be {verb}")
    return path, fmt


def read_write_asked(path: str) -> bool:
    """Whether the --image-opts string of `path` said read-only=off: qemu-img then opens the image
    read-write (taking the write lock) even for a command that only reads it."""
    spec = _IMAGE_OPTS.get(path)
    return spec is not None and spec.read_only is False


def for_format(options: OpenOptions, fmt: str) -> OpenOptions:
    """`options` for an image of format `fmt`: a qcow v1 image asked to open read-write by a
    command that only reads opens read-only with the writer's lock (qcowdisk never writes one)."""
    if fmt == "qcow" and not options.readonly:
        return options.replace(readonly=True, write_lock=True)
    return options


def open_options(args: argparse.Namespace, path: str, readonly: bool = True) -> OpenOptions:
    """How to open the image `path` for this command: --confine-to, -U, and what an --image-opts
    string said (see spec_options; read-only=off opens it read-write)."""
    return OpenOptions(readonly=readonly and not read_write_asked(path), confine_to=confine_dir(args),
                       force_share=getattr(args, "force_share", False),
                       host_factory=host_factory(path, getattr(args, "src_cache", None)), **spec_options(path))


def spec_options(path: str) -> dict[str, Any]:
    """The OpenOptions keywords an --image-opts string gave the image `path` ({} if none):
    `backing=` (none) and backing.*, cache sizes, raw's offset and size, data-file.*."""
    spec = _IMAGE_OPTS.get(path)
    if spec is None:
        return {}
    return {"backing": not spec.no_backing, "backing_node": spec.backing_node,
            "l2_cache_size": spec.l2_cache_size, "l2_cache_entry_size": spec.l2_cache_entry_size,
            "cache_size": spec.cache_size, "refcount_cache_size": spec.refcount_cache_size,
            "raw_offset": spec.raw_offset, "raw_size": spec.raw_size, "data_file": spec.data_file}


def check_window(path: str) -> None:
    """Refuse the raw offset/size window an --image-opts string gave `path` where QEMU's raw
    driver refuses it, as qemu-img reports it (for commands that open the image later)."""
    spec = _IMAGE_OPTS.get(path)
    if spec is None or (spec.raw_offset == 0 and spec.raw_size is None):
        return
    try:
        raw_window(os.path.getsize(path), spec.raw_offset, spec.raw_size)
    except (RawWindowError, OSError) as e:
        raise UsageError(f"Could not open '{spec.text}': {why(e, path)}") from None


@contextlib.contextmanager
def refused_options(path: str) -> Iterator[None]:
    """Report an option refused when the image `path` opens (a cache size, a raw window), or a
    lock conflict, as qemu-img does: `Could not open 'OPTIONS': why`."""
    try:
        yield
    except OpenOptionError as e:
        raise UsageError(f"Could not open '{shown(path)}': {e}") from None
    except ImageLockedError as e:
        if not e.qemu_reason:
            raise
        raise UsageError(f"Could not open '{shown(path)}': {why(e, path)}") from None


def tuning(path: str) -> OpenOptions:
    """OpenOptions carrying what an --image-opts string gave the image `path` (spec_options)."""
    return OpenOptions(**spec_options(path))


def shown_as_info(path: str) -> str:
    """The name qemu-img info gives the image `path`: a json: name for options that change what
    is read (raw's offset and size), else as `shown`."""
    spec = _IMAGE_OPTS.get(path)
    return spec.shown if spec is not None and spec.shown else path


def confine_dir(args: argparse.Namespace) -> str | None:
    """The --confine-to directory, checked to be one (None when not given)."""
    path: str | None = args.confine_to
    if path is not None and not os.path.isdir(path):
        raise UsageError(f"--confine-to '{path}': not a directory")
    return path


if TYPE_CHECKING:  # a Protocol needs typing at run time
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
    o = open_options(args, path)
    with opening(path):
        fmt = "qcow" if probe_format(path, o.host_factory) == "qcow" else "qcow2"
        img = formats.open_image(path, fmt, for_format(o, fmt))
        assert isinstance(img, (QcowFile, Qcow1File))  # (the qcow2 driver opens qcow v1 read-only)
        return img


def image_format(img: AnyImage) -> str:
    """The format name qemu-img would print for an opened image or backing reader."""
    return img.format_name  # "qcow2" (QcowFile), "qcow" (Qcow1File), "raw" (RawImage)


def open_any(path: str, fmt: str | None, args: argparse.Namespace) -> Image:
    """Open an image of any format read-only with its chain, as qemu-img's img_open (UsageError if not)."""
    options = open_options(args, path)
    with opening(path):
        fmt = fmt or probe_format(path)
        if fmt not in format_names():
            raise UsageError(f"Could not open '{shown(path)}': Unknown driver '{fmt}'")
        return formats.open_image(path, fmt, for_format(options, fmt))


def open_failed(path: str, e: QcowError | OSError) -> UsageError:
    """qemu-img's message for an image it cannot open (an OS error names the file twice)."""
    if isinstance(e, OSError) and e.strerror:
        return UsageError(f"Could not open '{shown(path)}': Could not open '{e.filename or path}': {e.strerror}")
    return UsageError(f"Could not open '{shown(path)}': {e}")


def check_chain(path: str) -> None:
    """Refuse an image whose backing file is missing as qemu-img does when opening it (the one
    it records: --image-opts backing options choose another, or none)."""
    spec = _IMAGE_OPTS.get(path)
    if spec is not None and (spec.no_backing or spec.backing_node is not None):
        return
    try:
        with QcowFile.open(path, readonly=True, backing=False) as img:
            name = img.backing_file
    except (QcowError, OSError) as e:
        raise open_failed(path, e) from e
    if name:
        backing = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
        if not os.path.exists(backing):
            raise UsageError(f"Could not open '{shown(path)}': Could not open backing file: Could not open '{backing}': "
                             f"{os.strerror(2)}")


def print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print the size-suffix warnings caught while parsing options, as qemu-img's warn_report does."""
    for w in caught:
        if issubclass(w.category, qemuopts.SizeSuffixWarning):
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)

def repair_if_dirty(path: str, confine_to: str | None = None) -> None:
    """Before a command opens the qcow2 image `path` read-write: if it is dirty (lazy refcounts,
    not closed cleanly), check and repair it now, its check lines on stderr, as QEMU's open does
    (qcow2_do_open runs the check with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS, printing what
    `qemu-img check -r all` prints on stderr). The engine's own open would repair it silently.
    Anything that goes wrong here is left to the command's open to report."""
    try:
        host = HostFile(path, False)
        try:
            head = host.pread(HEADER_V3_MIN_LENGTH, 0)
        finally:
            host.close()
    except (QcowError, OSError):
        return
    if len(head) < HEADER_V3_MIN_LENGTH or head[:4] != QCOW_MAGIC or int.from_bytes(head[4:8], "big") < 3:
        return
    if HEADER_V3_STRUCT.unpack_from(head, HEADER_V2_LENGTH)[0] & INCOMPAT_DIRTY:  # incompatible_features
        try:
            with QcowFile.open_for_check(path, repair=True, confine_to=confine_to) as img:
                img.check("all", report=report_line)
        except (QcowError, OSError):
            return


def report_line(line: str) -> None:
    """Print one of a check's per-cluster lines as qemu-img does: on stderr, at once."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
