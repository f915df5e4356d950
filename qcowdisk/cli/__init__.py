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
hint line. `read` and `write` stream through a bounded buffer, whatever the length. `serve` runs
nbdkit with qcowdisk's plugin (qcowdisk.nbdserve) until it is stopped.

Each subcommand is a module of this package with its `add_parser` and its `cmd_*`; `common`
holds what they share. A command line naming a subcommand imports that module only (each
drags in the part of the engine it needs): start-up is most of a short command's time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from ..errors import QcowError
from .common import PROG, ArgumentsError, Parser, UsageError, reset_image_opts
from .objects import ObjectHelp, process_objects

__all__ = ["build_parser", "main"]

# the subcommands (each a module of this package, named as the command), in the order
# `qcowdisk --help` lists them
_COMMANDS = ("info", "create", "write", "map", "snapshot", "check", "read", "compare", "measure", "commit", "rebase",
             "amend", "convert", "resize", "bitmap", "serve")


class _Version(argparse.Action):
    """--version, with the version looked up only then (importlib.metadata is slow to import)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from .._version import __version__
        print(f"{PROG} version {__version__}")
        parser.exit()


def build_parser(commands: Sequence[str] = _COMMANDS) -> argparse.ArgumentParser:
    """The argument parser for every subcommand (or for those of `commands` only)."""
    p = Parser(prog=PROG, description="Inspect and create QEMU qcow2 images (pure Python).")
    p.add_argument("--version", action=_Version, nargs=0, help="show program's version number and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        importlib.import_module(f"{__name__}.{command}").add_parser(sub)
    return p


def _commands(argv: Sequence[str]) -> Sequence[str]:
    """The subcommands a parser for `argv` needs: the one named first, when it is one (its
    parsing and messages are the same without the others); else all, for --help and for
    argparse's message on a wrong name."""
    return (argv[0],) if argv and argv[0] in _COMMANDS else _COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, or 1 after printing `qcowdisk: <message>`."""
    try:
        args = build_parser(_commands(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    except ArgumentsError as e:
        print(f"{PROG}: {e}\nTry '{PROG} --help' for more information", file=sys.stderr)
        return 1
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    reset_image_opts()
    try:
        try:
            process_objects(getattr(args, "objects", []))
        except UsageError as e:  # qemu-img compare exits 2 for a bad --object, the others 1
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2 if args.command == "compare" else 1
        return int(args.func(args))
    except ObjectHelp:
        return 0
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

