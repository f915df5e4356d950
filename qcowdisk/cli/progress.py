"""qemu-img's progress line (`-p`), with its single-precision arithmetic."""

from __future__ import annotations

import argparse
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO


def f32(value: float) -> float:
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
        current = f32(self.current + f32(f32(delta / 100) * max_)) if max_ else delta
        current = min(current, 100.0)
        self.current = current
        if current > f32(self.last_print + self.min_skip) or current < f32(self.last_print - self.min_skip) \
                or current in (0.0, 100.0):
            self.last_print = current
            self.out.write("    (%3.2f/100%%)\r" % current)
            self.out.flush()

    def advance(self, done: int, total: int) -> None:
        """An operation's progress(done, total): the step since the last call, as qemu-img reports it."""
        chunk, self.done = done - self.done, done
        self.print_delta(f32(f32(f32(chunk) / f32(total)) * 100) if total else 0.0)

    def end(self) -> None:
        """qemu_progress_end."""
        self.out.write("\n")
        self.out.flush()



def progress_bar(args: argparse.Namespace) -> QemuProgress | None:
    """qemu-img's progress line for -p (unless -q), on stdout whether or not it is a terminal."""
    return QemuProgress(sys.stdout) if args.progress and not args.quiet else None

