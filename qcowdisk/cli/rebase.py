"""`qcowdisk rebase`: change an image's backing file (`qcowdisk.ops.rebase`; this parses, checks and prints)."""

from __future__ import annotations

import argparse
import bisect
import os
import sys
from collections.abc import Iterator

from .. import formats
from ..formats import OpenOptions
from ..ops import RebaseError, rebase
from ..ops.cachemode import DEFAULT_SOURCE_CACHE, host_class
from ..ops.imageopts import overridden_name
from ..qcow2.file import QcowFile
from .common import (
    PROG,
    Parser,
    UsageError,
    add_chain_options,
    chain_operand,
    check_chain,
    host_factory,
    image_spec,
    open_failed,
    repair_if_dirty,
    shown,
    spec_options,
)
from .progress import QemuProgress, f32, progress_bar

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image

IO_BUF_SIZE = 2 << 20  # qemu-img rebase's step
WINDOW = 256 << 20  # block status asked for at a time


def _allocated_runs(img: Image, size: int, step: int) -> list[tuple[int, int, bool]]:
    """(start, end, allocated) runs of one layer alone, also split every `step` bytes (where
    QEMU's block status of a qcow2 layer stops: the end of an L2 table)."""
    runs: list[tuple[int, int, bool]] = []
    for pos in range(0, size, WINDOW):
        at = pos
        stop = min(size, pos + WINDOW, img.virtual_size)
        if at >= stop:
            break
        for ext in img.layer_status(pos, stop - pos):
            start, at = at, at + ext.length
            while start < at:
                end = min(at, (start // step + 1) * step)
                if start == pos and runs and runs[-1][2] == ext.allocated and start % step:
                    start = runs.pop()[0]  # one run across two status windows
                runs.append((start, end, ext.allocated))
                start = end
    if (runs[-1][1] if runs else 0) < size:  # past a shorter layer's end: not allocated
        runs.append((runs[-1][1] if runs else 0, size, False))
    return runs


def _l2_reach(img: Image) -> int:
    if isinstance(img, QcowFile):
        return img.cluster_size * (img.cluster_size // (16 if img.extended_l2 else 8))
    return 1 << 62


def reported_chunks(path: str, new_backing: str) -> tuple[int, list[tuple[int, int]]]:
    """(disk size, the ranges qemu-img rebase's loop reports a step for): the image's own
    unallocated runs, and when the new backing file is already in the chain (qemu-img's
    prefix chain), only where the layers between the old and the new backing allocate;
    bdrv_is_allocated(_above) answers at most to the end of an L2 table, so runs split there.
    One entry per run: memory follows the image's extents, not its size."""
    options = formats.OpenOptions(readonly=True, force_share=True)
    chain = formats.open_image(path, "qcow2", options)
    try:
        size = chain.virtual_size
        layers: list[Image] = []
        node: Image | None = chain
        while node is not None:
            layers.append(node)
            node = node.backing
        prefix = None
        if new_backing:
            real = os.path.realpath(formats.resolve_backing_path(path, new_backing))
            prefix = next((d for d in range(1, len(layers)) if os.path.realpath(layers[d].filename) == real), None)
        cuts: set[int] = set()
        between: list[list[tuple[int, int, bool]]] = []
        for img in layers[1:prefix] if prefix is not None else []:
            runs = _allocated_runs(img, size, _l2_reach(img))
            between.append(runs)
            cuts.update(end for _, end, _ in runs)
        ordered = sorted(cuts)
        ranges: list[tuple[int, int]] = []
        for start, end, allocated in _allocated_runs(chain, size, _l2_reach(chain)):
            if allocated:
                continue
            if prefix is None:
                ranges.append((start, end))
                continue
            lo, hi = bisect.bisect_right(ordered, start), bisect.bisect_left(ordered, end)
            for a, b in _split(start, end, ordered[lo:hi]):
                if any(_allocated_at(runs, a) for runs in between):
                    ranges.append((a, b))
        return size, ranges
    finally:
        chain.close()


def _split(start: int, end: int, cuts: list[int]) -> Iterator[tuple[int, int]]:
    for cut in [*cuts, end]:
        yield start, cut
        start = cut


def _allocated_at(runs: list[tuple[int, int, bool]], offset: int) -> bool:
    i = bisect.bisect_right(runs, (offset, 1 << 63, True)) - 1
    return i >= 0 and runs[i][0] <= offset < runs[i][1] and runs[i][2]


class RebaseProgress:
    """qemu-img rebase's -p line: 0 first, then (local_progress = 100 / (size / 2 MiB)) for each
    chunk of at most 2 MiB of the image's unallocated runs it handles, 100 at the end. Driven by
    the operation's progress(done, total): each chunk is counted once `done` passes its end."""

    def __init__(self, bar: QemuProgress, size: int, pieces: list[tuple[int, int]]) -> None:
        self.bar = bar
        self.local = f32(100.0 / f32(size // min(size, IO_BUF_SIZE))) if size else 0.0
        self.chunk_ends = self._ends(pieces)
        self.next = next(self.chunk_ends, None)
        bar.print_delta(0.0, 100)

    @staticmethod
    def _ends(pieces: list[tuple[int, int]]) -> Iterator[int]:
        for start, end in pieces:
            for at in range(start, end, IO_BUF_SIZE):
                yield min(end, at + IO_BUF_SIZE)

    def advance(self, done: int, total: int) -> None:
        """The operation reached guest offset `done`."""
        while self.next is not None and self.next <= done:
            self.bar.print_delta(self.local, 100)
            self.next = next(self.chunk_ends, None)

    def finish(self) -> None:
        """The rebase is done: any chunk left, then qemu_progress_print(100, 0)."""
        self.advance(1 << 63, 0)
        self.bar.print_delta(100.0, 0)


def refuse_relative(path: str, backing: str) -> None:
    """QEMU cannot resolve a relative new backing name against an image it names by a json:
    name (its backing file replaced by --image-opts options): refuse as qemu-img does."""
    spec = image_spec(path)
    name = overridden_name(spec) if spec is not None and backing and not os.path.isabs(backing) else None
    if name is not None:
        raise UsageError(f"Could not resolve backing filename: Cannot use relative backing file names for '{name}'")


def cmd_rebase(args: argparse.Namespace) -> int:
    """`qcowdisk rebase`: qemu-img rebase, safe (copy what reads differently) or -u (the name
    only); -b '' makes the image standalone. Errors as qemu-img prints them (status 1)."""
    if args.backing is None and not args.unsafe:
        print(f"{PROG}: Must specify backing file (-b) or use unsafe mode (-u)\nTry '{PROG} --help' for more information",
              file=sys.stderr)
        return 1
    path, _ = chain_operand(args, "rebased", opens_backing=not args.unsafe)
    backing: str = args.backing or ""
    if backing and args.backing_format is None:  # QEMU 7.2 refuses to record a name without a format
        named = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(path), backing)
        if not args.unsafe and not os.path.exists(named):  # safe mode opens it first
            raise UsageError(f"Could not open new backing file '{backing}': Could not open '{named}': "
                             f"{os.strerror(2)}")
        raise UsageError(f"Could not change the backing file to '{backing}': backing format must be specified")
    if not os.path.exists(path):
        raise open_failed(path, FileNotFoundError(2, os.strerror(2), path))
    if not args.unsafe:
        check_chain(path)
        refuse_relative(path, backing)
    repair_if_dirty(path)  # (the image opens read-write; its old and new backing files read-only)
    bar = progress_bar(args)
    steps: RebaseProgress | None = None
    try:
        if bar is not None:
            steps = RebaseProgress(bar, *reported_chunks(path, backing)) if not args.unsafe else None
            if steps is None:
                bar.print_delta(0.0, 100)
        rebase(path, backing, backing_format=args.backing_format, unsafe=args.unsafe,
               progress=steps.advance if steps else None, host_factory=host_factory(path, args.cache),
               options=OpenOptions(**spec_options(path)),
               backing_host_factory=host_class(args.src_cache or DEFAULT_SOURCE_CACHE))
        if steps is not None:
            steps.finish()
        elif bar is not None:
            bar.print_delta(100.0, 0)
    except RebaseError as e:
        raise UsageError(str(e)) from e
    except formats.OpenOptionError as e:
        raise UsageError(f"Could not open '{shown(path)}': {e}") from e
    finally:
        if bar is not None:
            bar.end()
    return 0


def add_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    """Add this subcommand's parser to `sub`."""
    prb = sub.add_parser("rebase", help="change an image's backing file (like qemu-img rebase)")
    prb.add_argument("-f", dest="format", metavar="FMT", help="the image's format (qcow2; probed if omitted)")
    prb.add_argument("-b", dest="backing", metavar="BACKING", help="the new backing file ('' for none)")
    prb.add_argument("-F", dest="backing_format", metavar="FMT", help="the new backing file's format")
    prb.add_argument("-u", dest="unsafe", action="store_true", help="only rewrite the name (copy nothing)")
    prb.add_argument("-p", dest="progress", action="store_true", help="show progress")
    prb.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    add_chain_options(prb, source_cache=True)
    prb.add_argument("image", metavar="IMAGE")
    prb.set_defaults(func=cmd_rebase)
