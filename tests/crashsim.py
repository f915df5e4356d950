"""Crash simulation at the host I/O seam.

`RecordingHost` is a `HostFile` that performs every operation for real and also appends it to a
shared `CrashLog`: write(offset, bytes), truncate(length), punch(offset, length),
zero(offset, length) (a range allocated as zeros: fallocate ZERO_RANGE), fsync. The
workload driver adds marker ops (a guest op started / ended, a `flush()` returned) to the same
log, so every host op has a known place relative to the guest's view.

A *power cut at point k* is the state after the first k log entries were issued. For each file,
what survives is the contents as of that file's last fsync before k, plus any subset of the
writes issued since (applied in issue order). `materialise` and `CutWalker` build those states:
subsets "all", "none", seeded random ones, and random ones whose writes are also torn into
independently surviving 512-byte sectors (the atomic unit of a disk). A `("tear", i)` subset
is the systematic form for header writes: every unsynced op survives, except that the last
unsynced write into cluster 0 of a qcow2 file lands as its i-th tear pattern over the sectors it
changes (`tear_patterns`: every pattern for a few sectors, else the prefixes, the suffixes and a
seeded sample), so a header rewrite spanning several sectors is tried torn every way.

`GuestModel` is the oracle side: a sparse, chunked model of the guest disk with the history of
every chunk, so a check can ask "what did this chunk hold when flush #F returned, and what
versions could it hold if the cut fell after guest op J?". `check_view` applies the two rules:
whatever was not touched after the last completed flush reads back exactly, and whatever was
touched since reads back, byte by byte, as one of the versions written since (or the flushed one).

The judging every crash test shares: `crash_states` sweeps the (cut, subset) states of one or
more files, `judge_states` examines each distinct state once and judges it at every cut, counting
cut points, states and distinct images into a `Tally` (findings by category, `assert_none`).
`qemu_check` / `check_findings` are the qemu-img check verdict (leaks allowed; a repaired
image entirely clean), `repair_on_open` the lazy-refcount repair, and `GuestJudge` /
`GuestRecording` judge a guest workload's images against its `GuestModel` through QEMU's and
qcowdisk's views.

The guest workloads are deterministic (`make_guest_ops`), so a SIGKILLed child process
(`child_main`, run and killed by `run_and_kill` / `kill_guest_writer`) and the parent that
checks its image agree on every byte without talking.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qcowdisk.hostio import HostFile

SECTOR = 512
CHUNK = 64 * 1024  # granularity of the guest model and of view comparisons


# --------------------------------------------------------------------------------------------
# The log and the recording host file

@dataclass(frozen=True)
class Op:
    """One log entry. kind: write | truncate | punch | zero | allocate | fsync | mark."""

    kind: str
    path: str = ""
    offset: int = 0
    data: bytes = b""
    length: int = 0
    label: Any = None

    def describe(self) -> str:
        """Short human-readable form for failure reports."""
        name = os.path.basename(self.path)
        if self.kind == "write":
            return f"write({name}, off={self.offset:#x}, len={len(self.data)})"
        if self.kind in ("punch", "zero", "allocate"):
            return f"{self.kind}({name}, off={self.offset:#x}, len={self.length})"
        if self.kind == "truncate":
            return f"truncate({name}, {self.length:#x})"
        if self.kind == "fsync":
            return f"fsync({name})"
        return f"mark{self.label}"


class CrashLog:
    """Ordered record of every mutating host op (all files) plus the driver's marker ops."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.initial: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def factory(self) -> Callable[[str, bool], RecordingHost]:
        """A `host_factory` for QcowFile.open/create that records into this log."""
        def make(path: str, writable: bool) -> RecordingHost:
            return RecordingHost(path, writable, log=self)
        return make

    def mark(self, label: Any) -> int:
        """Append a marker op (e.g. ("flushed", j)); returns its index."""
        with self._lock:
            self.ops.append(Op("mark", label=label))
            return len(self.ops) - 1

    def ensure_initial(self, host: RecordingHost) -> None:
        """Before the first mutation of a file, take its contents as the durable starting point."""
        with self._lock:
            if host.key not in self.initial:
                size = host.size()
                self.initial[host.key] = os.pread(host.fd, size, 0) if size else b""

    def record(self, host: RecordingHost, op: Op) -> None:
        """Append a host op (the caller has called ensure_initial before performing it)."""
        with self._lock:
            self.ops.append(op)

    def snapshot_initial(self, path: str) -> None:
        """Declare `path`'s current contents durable and the starting point of its history."""
        with open(path, "rb") as f:
            self.initial[os.path.abspath(path)] = f.read()

    def paths(self) -> list[str]:
        """Files that saw at least one op."""
        return sorted({op.path for op in self.ops if op.path})

    def file_ops(self, path: str) -> int:
        """Number of mutating ops + fsyncs on `path`."""
        key = os.path.abspath(path)
        return sum(1 for op in self.ops if op.path == key)


class RecordingHost(HostFile):
    """A HostFile that does everything for real and logs it (including the bytes written)."""

    def __init__(self, path: str, writable: bool, log: CrashLog | None = None) -> None:
        super().__init__(path, writable)
        self.log = log
        self.key = os.path.abspath(path)

    @classmethod
    def create(cls, path: str) -> RecordingHost:  # type: ignore[override]
        """Create an empty file; the result is not attached to a log (use CrashLog.factory)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        os.close(fd)
        return cls(path, True)

    def _before(self) -> None:
        if self.log is not None:
            self.log.ensure_initial(self)

    def _rec(self, op: Op) -> None:
        if self.log is not None:
            self.log.record(self, op)

    def pwrite(self, data: Any, offset: int) -> None:
        """Record then write (one log entry, whatever the base class delegates to)."""
        self.pwritev([data], offset)

    def pwritev(self, buffers: Sequence[Any], offset: int) -> None:
        """Record the joined bytes, then write them with the base implementation."""
        joined = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        if joined:
            self._before()
            self._rec(Op("write", self.key, offset, joined))
        HostFile.pwritev(self, buffers, offset)

    def truncate(self, length: int) -> None:
        """Record then truncate."""
        self._before()
        self._rec(Op("truncate", self.key, length=length))
        HostFile.truncate(self, length)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Punch for real; record only if the range was really handed back (reads zeros)."""
        self._before()
        ok = HostFile.punch_hole(self, offset, length)
        if ok:
            self._rec(Op("punch", self.key, offset, length=length))
        return ok

    def zero_alloc(self, offset: int, length: int) -> bool:
        """Allocate as zeros for real; record only if it was done (else the caller writes)."""
        self._before()
        ok = HostFile.zero_alloc(self, offset, length)
        if ok:
            self._rec(Op("zero", self.key, offset, length=length))
        return ok

    def allocate(self, offset: int, length: int) -> bool:
        """Allocate for real; record only if it was done (it may have grown the file)."""
        self._before()
        ok = HostFile.allocate(self, offset, length)
        if ok and length > 0:
            self._rec(Op("allocate", self.key, offset, length=length))
        return ok

    def fsync(self) -> None:
        """Sync for real, then record: only a completed fsync makes earlier ops durable."""
        HostFile.fsync(self)
        self._rec(Op("fsync", self.key))


# --------------------------------------------------------------------------------------------
# Materialising crash states

Subset = str | tuple[str, int]
""""all" | "none" | ("random", seed) | ("torn", seed) | ("tear", i): which unsynced ops survive the
cut ("tear": all of them, the last header write torn by pattern i, see `tear_state`)."""


def apply_op(buf: bytearray, op: Op, keep_sectors: Callable[[int, int], bool] | None = None) -> None:
    """Apply one file op to `buf` in place. With `keep_sectors`, a write survives only in the
    512-byte host sectors for which keep_sectors(sector_start, sector_end) is true (tearing).

    A zero op (fallocate ZERO_RANGE, which may extend the file) is judged as pessimistically as
    a write of zeros: until an fsync, any of its sectors may keep the old bytes, and the file may
    or may not have grown."""
    if op.kind in ("write", "zero"):
        pieces: Iterable[tuple[int, int]]
        end = op.offset + (len(op.data) if op.kind == "write" else op.length)
        if keep_sectors is None:
            pieces = [(op.offset, end)]
        else:
            cuts = [op.offset, *range((op.offset // SECTOR + 1) * SECTOR, end, SECTOR), end]
            pieces = [(a, b) for a, b in itertools.pairwise(cuts) if keep_sectors(a, b)]
        for a, b in pieces:
            if b > len(buf):
                buf.extend(bytes(b - len(buf)))
            buf[a:b] = op.data[a - op.offset:b - op.offset] if op.kind == "write" else bytes(b - a)
    elif op.kind == "truncate":
        if op.length < len(buf):
            del buf[op.length:]
        else:
            buf.extend(bytes(op.length - len(buf)))
    elif op.kind == "allocate":  # (posix_fallocate: contents kept, the file grown to cover the range)
        if op.offset + op.length > len(buf):
            buf.extend(bytes(op.offset + op.length - len(buf)))
    elif op.kind == "punch":
        a, b = op.offset, min(op.offset + op.length, len(buf))  # KEEP_SIZE: never extends
        if b > a:
            buf[a:b] = bytes(b - a)


def surviving(pending: Sequence[Op], subset: Subset, cut: int) -> list[tuple[Op, Callable[[int, int], bool] | None]]:
    """The unsynced ops that reach the disk under `subset`, in issue order, with tearing rules."""
    if subset == "all":
        return [(op, None) for op in pending]
    if subset == "none":
        return []
    mode, seed = subset  # type: ignore[misc]
    rng = random.Random(f"{seed}:{cut}")
    out: list[tuple[Op, Callable[[int, int], bool] | None]] = []
    for op in pending:
        if mode == "torn" and (op.kind == "zero" or (op.kind == "write" and len(op.data) > 0)):
            if rng.random() < 0.2:
                continue
            decisions: dict[int, bool] = {}
            r2 = random.Random(rng.random())

            def keep(a: int, b: int, _d: dict[int, bool] = decisions, _r: random.Random = r2) -> bool:
                return _d.setdefault(a // SECTOR, _r.random() < 0.5)
            out.append((op, keep))
        elif rng.random() < 0.5:
            out.append((op, None))
    return out


TEAR_PATTERNS = 16
"""Tear patterns tried per header write: all of them up to 4 changed sectors (2^4 - 1)."""

HEADER_TEARS: list[Subset] = [("tear", i) for i in range(TEAR_PATTERNS)]
"""The subsets that tear the pending header write every way `tear_patterns` gives."""


def tear_patterns(k: int, limit: int = TEAR_PATTERNS, seed: Any = 0) -> list[int]:
    """Bit masks over a write's k changed sectors (bit s set: sector s holds the new bytes), never
    the full mask (that is the whole write). Every mask while 2^k - 1 <= limit; else the
    prefixes and suffixes (the write torn at one sector boundary, either way round), then
    seeded random masks, `limit` in all."""
    full = (1 << k) - 1
    if full <= limit:
        return list(range(full))
    out: list[int] = []
    for j in range(k):  # prefixes: the first j sectors new; suffixes: the last k - j
        for m in ((1 << j) - 1, full ^ ((1 << j) - 1)):
            if m != full and m not in out:
                out.append(m)
    rng = random.Random(f"tear:{k}:{seed}")
    while len(out) < min(limit, full):
        m = rng.randrange(full)
        if m not in out:
            out.append(m)
    return out[:limit]


def header_cluster_size(buf: bytes | bytearray) -> int:
    """The cluster size of a qcow2 file's bytes (its header cluster), 0 if it is no qcow2 file."""
    if len(buf) < 24 or bytes(buf[:4]) != b"QFI\xfb":
        return 0
    bits: int = struct.unpack_from(">I", buf, 20)[0]
    return 1 << min(bits, 21)


@dataclass
class Tear:
    """The pending header write a ("tear", i) subset tears: the file just before it (earlier
    pending ops landed), the write, the pieces it changes (per 512-byte sector), the pending ops
    after it, and its tear patterns."""

    before: bytearray
    op: Op
    pieces: list[tuple[int, int]]
    later: Sequence[Op]
    patterns: list[int]

    def state(self, i: int) -> bytes | None:
        """The file with pattern i of the write and every later op landed (None: no pattern i)."""
        if i >= len(self.patterns):
            return None
        buf = bytearray(self.before)
        for n, (a, b) in enumerate(self.pieces):
            if self.patterns[i] >> n & 1:
                if b > len(buf):
                    buf.extend(bytes(b - len(buf)))
                buf[a:b] = self.op.data[a - self.op.offset:b - self.op.offset]
        for later in self.later:
            apply_op(buf, later)
        return bytes(buf)


def find_tear(base: bytes | bytearray, pending: Sequence[Op], seed: Any = 0) -> Tear | None:
    """The last pending write into cluster 0 (the header cluster) of a qcow2 file, if it changes
    more than one sector (compared with what the file held just before it), as a `Tear`."""
    cs = header_cluster_size(base)
    last = max((n for n, op in enumerate(pending) if op.kind == "write" and op.offset < cs), default=-1)
    if last < 0:
        return None
    buf = bytearray(base)
    for op in pending[:last]:
        apply_op(buf, op)
    op = pending[last]
    end = op.offset + len(op.data)
    cuts = [op.offset, *range((op.offset // SECTOR + 1) * SECTOR, end, SECTOR), end]
    pieces = [(a, b) for a, b in itertools.pairwise(cuts)
              if bytes(buf[a:b]) != op.data[a - op.offset:b - op.offset]]
    if len(pieces) < 2:
        return None
    return Tear(buf, op, pieces, pending[last + 1:], tear_patterns(len(pieces), seed=seed))


def tear_state(base: bytes | bytearray, pending: Sequence[Op], i: int, seed: Any = 0) -> bytes | None:
    """The file after every pending op landed, except the last pending write into cluster 0,
    which lands as the i-th of `tear_patterns` over the sectors it changes. None when there is
    no such write or it has fewer patterns (nothing new to try)."""
    tear = find_tear(base, pending, seed)
    return None if tear is None else tear.state(i)


def durable_parts(initial: bytes, ops: Sequence[Op], path: str, cut: int) -> tuple[bytearray, list[Op]]:
    """(contents as of `path`'s last fsync before `cut`, unsynced ops on `path` issued since)."""
    key = os.path.abspath(path)
    base = bytearray(initial)
    pending: list[Op] = []
    for op in ops[:cut]:
        if op.path != key:
            continue
        if op.kind == "fsync":
            for p in pending:
                apply_op(base, p)
            pending = []
        else:
            pending.append(op)
    return base, pending


def materialise(initial: bytes, ops: Sequence[Op], path: str, cut: int, subset: Subset,
                out_path: str | None = None) -> bytes:
    """The bytes of `path` after a power cut at log index `cut` where `subset` of the unsynced
    ops survived; written to `out_path` if given."""
    base, pending = durable_parts(initial, ops, path, cut)
    if isinstance(subset, tuple) and subset[0] == "tear":
        data = tear_state(base, pending, subset[1], cut) or bytes(base)
    else:
        for op, keep in surviving(pending, subset, cut):
            apply_op(base, op, keep)
        data = bytes(base)
    if out_path is not None:
        with open(out_path, "wb") as f:
            f.write(data)
    return data


class CutWalker:
    """Walks cut points in increasing order, keeping the durable base incrementally (O(log) total
    instead of replaying from scratch at every cut)."""

    def __init__(self, log: CrashLog, path: str) -> None:
        self.ops = log.ops
        self.key = os.path.abspath(path)
        self.base = bytearray(log.initial.get(self.key, b""))
        if self.key not in log.initial:
            with open(path, "rb") as f:  # never written: the live file is the durable one
                self.base = bytearray(f.read())
        self.pending: list[Op] = []
        self.pos = 0
        self._tear_at = -1
        self._tear: Tear | None = None

    def advance(self, cut: int) -> None:
        """Move to cut point `cut` (must not go backwards)."""
        assert cut >= self.pos, "CutWalker only moves forward"
        for op in self.ops[self.pos:cut]:
            if op.path != self.key:
                continue
            if op.kind == "fsync":
                for p in self.pending:
                    apply_op(self.base, p)
                self.pending = []
            else:
                self.pending.append(op)
        self.pos = cut

    def state(self, subset: Subset) -> bytes:
        """File bytes at the current cut under `subset` (a tear pattern that does not exist at
        this cut gives the "none" state; `tear` tells which exist)."""
        if isinstance(subset, tuple) and subset[0] == "tear":
            return self.tear(subset[1]) or bytes(self.base)
        if subset == "none" or not self.pending:
            return bytes(self.base)
        buf = bytearray(self.base)
        for op, keep in surviving(self.pending, subset, self.pos):
            apply_op(buf, op, keep)
        return bytes(buf)

    def tear(self, i: int) -> bytes | None:
        """The ("tear", i) state at the current cut, or None if that pattern does not exist
        (the write to tear is found once per cut)."""
        if self._tear_at != self.pos:
            self._tear_at = self.pos
            self._tear = find_tear(self.base, self.pending, self.pos) if self.pending else None
        return None if self._tear is None else self._tear.state(i)


# --------------------------------------------------------------------------------------------
# Deterministic guest workloads

GuestOp = tuple[str, int, int, int]
"""(kind, guest_offset, length, data_seed); kind: write | zero | punch | flush | close."""


def guest_data(op: GuestOp) -> bytes:
    """The bytes a write op writes (regenerated from its seed, so both processes agree)."""
    return random.Random(op[3]).randbytes(op[2])


def make_guest_ops(seed: int, virtual_size: int, cluster_size: int, count: int, *,
                   regions: Sequence[tuple[int, int]] | None = None,
                   big_write: int = 0, big_write_at: int = 0, max_length: int = 192 * 1024,
                   close: bool = True) -> list[GuestOp]:
    """A seeded mix of allocating / partial-cluster / L2-boundary-crossing writes, write_zeroes
    and punch_hole, with a flush every 1-4 ops. `big_write` bytes are written sequentially from
    `big_write_at` in 64 KiB pieces first (to grow the host file, e.g. past the reach of the
    first refcount table). Ends with a flush and, with `close`, a close."""
    rng = random.Random(seed)
    l2_reach = cluster_size * (cluster_size // 8)
    if regions is None:
        regions = [(0, min(4 << 20, virtual_size))]
        boundary = l2_reach
        if boundary < virtual_size:
            regions.append((max(0, boundary - 4 * cluster_size),
                            min(8 * cluster_size, virtual_size - boundary + 4 * cluster_size)))
        if virtual_size > (8 << 20):
            regions.append((virtual_size - (1 << 20), 1 << 20))
    ops: list[GuestOp] = []
    pos = big_write_at
    while pos < big_write_at + big_write:
        n = min(64 * 1024, big_write_at + big_write - pos, virtual_size - pos)
        if n <= 0:
            break
        ops.append(("write", pos, n, rng.getrandbits(64)))
        pos += n
        if len(ops) % 5 == 4:
            ops.append(("flush", 0, 0, 0))
    until_flush = rng.randint(1, 4)
    for _ in range(count):
        start, span = regions[rng.randrange(len(regions))]
        shape = rng.random()
        if shape < 0.45:      # cluster-aligned
            off = start + rng.randrange(max(1, span // cluster_size)) * cluster_size
            length = rng.randint(1, 4) * cluster_size
        elif shape < 0.8:     # unaligned: partial clusters at both ends (COW)
            off = start + rng.randrange(span)
            length = rng.randint(1, 3 * cluster_size)
        else:                 # straddle an L2 table boundary so a second table gets involved
            b = ((start + rng.randrange(span)) // l2_reach + 1) * l2_reach
            if b >= virtual_size:
                b = ((virtual_size - 1) // l2_reach) * l2_reach or cluster_size
            off = max(0, b - rng.randint(1, 2 * cluster_size))
            length = rng.randint(b - off + 1, b - off + 2 * cluster_size)
        off = min(off, virtual_size - 1)
        length = max(1, min(length, max_length, virtual_size - off))
        kind = rng.choices(["write", "zero", "punch"], [0.65, 0.17, 0.18])[0]
        ops.append((kind, off, length, rng.getrandbits(64)))
        until_flush -= 1
        if until_flush == 0:
            ops.append(("flush", 0, 0, 0))
            until_flush = rng.randint(1, 4)
    if ops[-1][0] != "flush":
        ops.append(("flush", 0, 0, 0))
    if close:
        ops.append(("close", 0, 0, 0))
    return ops


def describe_guest_op(j: int, op: GuestOp) -> str:
    """e.g. '#12 write(0x1f000, 4096)'."""
    if op[0] in ("flush", "close"):
        return f"#{j} {op[0]}()"
    return f"#{j} {op[0]}({op[1]:#x}, {op[2]})"


def run_guest_ops(disk: Any, ops: Sequence[GuestOp], log: CrashLog | None = None,
                  on_flush: Callable[[int], None] | None = None,
                  handlers: Mapping[str, Callable[[Any, GuestOp], None]] | None = None) -> None:
    """Apply `ops` to an open QcowFile, marking the log: ("start", j) / ("end", j) around every
    op and ("flushed", j) as soon as a flush() (or close()) returned. `handlers` perform the
    op kinds a test adds (e.g. a compressed write), by kind."""
    for j, op in enumerate(ops):
        kind, off, length, _ = op
        if log is not None:
            log.mark(("start", j))
        if handlers is not None and kind in handlers:
            handlers[kind](disk, op)
        elif kind == "write":
            disk.write_at(off, guest_data(op))
        elif kind == "zero":
            disk.write_zeroes(off, length)
        elif kind == "punch":
            disk.punch_hole(off, length)
        elif kind in ("flush", "close"):
            disk.flush() if kind == "flush" else disk.close()
            if log is not None:
                log.mark(("flushed", j))
            if on_flush is not None:
                on_flush(j)
        else:
            raise ValueError(f"unknown guest op {kind}")
        if log is not None:
            log.mark(("end", j))


# --------------------------------------------------------------------------------------------
# The guest model (oracle)

class GuestModel:
    """Sparse chunked model of the guest disk with per-chunk history.

    Version index -1 is the starting content (zeros, or the backing file's data); version j is
    the content after guest op j."""

    def __init__(self, virtual_size: int, base: bytes | None = None) -> None:
        self.virtual_size = virtual_size
        self.base_chunks: dict[int, bytes] = {}
        if base:
            for c in range((min(len(base), virtual_size) + CHUNK - 1) // CHUNK):
                piece = base[c * CHUNK:(c + 1) * CHUNK]
                if piece.count(0) != len(piece):
                    self.base_chunks[c] = piece + bytes(self.chunk_len(c) - len(piece))
        self.history: dict[int, tuple[list[int], list[bytes]]] = {}
        self.ops_touching: list[list[int]] = []  # op index -> chunks

    def chunk_len(self, c: int) -> int:
        """Length of chunk c (the last one may be short)."""
        return min(CHUNK, self.virtual_size - c * CHUNK)

    def base(self, c: int) -> bytes:
        """Starting content of chunk c."""
        return self.base_chunks.get(c) or bytes(self.chunk_len(c))

    def at(self, c: int, j: int) -> bytes:
        """Content of chunk c after guest op j (j = -1: before any op)."""
        h = self.history.get(c)
        if h is None:
            return self.base(c)
        i = bisect_right(h[0], j) - 1
        return h[1][i] if i >= 0 else self.base(c)

    def apply_all(self, ops: Sequence[GuestOp]) -> GuestModel:
        """Apply a whole op list in order (returns self)."""
        for j, op in enumerate(ops):
            self.apply(j, op)
        return self

    def writes(self, op: GuestOp) -> bool:
        """Whether guest op `op` changes the disk's contents (a subclass adds its own kinds)."""
        return op[0] in ("write", "zero", "punch")

    def op_data(self, op: GuestOp) -> bytes | None:
        """The bytes a writing op leaves (None: zeros); a subclass adds its own kinds."""
        return guest_data(op) if op[0] == "write" else None

    def apply(self, j: int, op: GuestOp) -> None:
        """Record the effect of guest op j (must be called in order)."""
        _, off, length, _ = op
        touched: list[int] = []
        if self.writes(op):
            data = self.op_data(op)
            end = off + length
            for c in range(off // CHUNK, (end - 1) // CHUNK + 1):
                cstart = c * CHUNK
                a, b = max(off, cstart), min(end, cstart + self.chunk_len(c))
                cur = bytearray(self.at(c, j - 1))
                cur[a - cstart:b - cstart] = data[a - off:b - off] if data is not None else bytes(b - a)
                h = self.history.setdefault(c, ([], []))
                h[0].append(j)
                h[1].append(bytes(cur))
                touched.append(c)
        self.ops_touching.append(touched)

    def all_chunks(self) -> set[int]:
        """Every chunk that is ever non-base or non-zero: the ones worth reading back."""
        return set(self.history) | set(self.base_chunks)

    def touched_between(self, f: int, j: int) -> set[int]:
        """Chunks touched by guest ops f+1..j."""
        out: set[int] = set()
        for i in range(f + 1, min(j, len(self.ops_touching) - 1) + 1):
            out.update(self.ops_touching[i])
        return out

    def versions(self, c: int, f: int, j: int) -> list[bytes]:
        """Content of chunk c at op f, then after each op in f+1..j that touched it."""
        out = [self.at(c, f)]
        h = self.history.get(c)
        if h:
            lo = bisect_right(h[0], f)
            hi = bisect_right(h[0], j)
            out.extend(h[1][lo:hi])
        return out


@dataclass
class Finding:
    """One violated rule at one crash state."""

    category: str   # CORRUPTION | LOST-FLUSHED | UNFLUSHED-GARBAGE | READ-ERROR | STRAY-DATA | ...
    detail: str
    where: str = ""

    def __str__(self) -> str:
        return f"[{self.category}] {self.where}: {self.detail}"


def check_chunk(model: GuestModel, c: int, actual: bytes, f: int, j: int, view: str,
                touched: set[int]) -> Finding | None:
    """Rule check for one chunk of a recovered guest view, given last completed flush f and last
    started guest op j. Returns the first violation or None."""
    flushed = model.at(c, f)
    if actual == flushed:
        return None
    if len(actual) != len(flushed):
        return Finding("READ-ERROR", f"{view}: chunk {c} read {len(actual)} bytes, want {len(flushed)}")
    if c not in touched:
        i = _first_diff(actual, flushed)
        return Finding("LOST-FLUSHED", f"{view}: guest byte {c * CHUNK + i:#x} = {actual[i]:#04x}, "
                       f"flushed model has {flushed[i]:#04x} (no write touched it after the last flush)")
    vers = model.versions(c, f, j)
    stray = stray_byte(actual, vers)
    if stray is None:
        return None
    i, allowed = stray
    cat = "LOST-FLUSHED" if len(allowed) == 1 else "UNFLUSHED-GARBAGE"
    return Finding(cat, f"{view}: guest byte {c * CHUNK + i:#x} = {actual[i]:#04x}, "
                   f"allowed {sorted(allowed)} (versions since last flush: {len(vers)})")


def stray_byte(actual: bytes, versions: Sequence[bytes]) -> tuple[int, set[int]] | None:
    """The rule for data written since the last flush: each byte of `actual` is that byte of
    one of `versions` (a whole 512-byte sector of one version is the quick case). Returns the
    first byte that is not, with the values the versions allow there, or None."""
    if actual in versions:
        return None
    for s in range(0, len(actual), SECTOR):
        a = actual[s:s + SECTOR]
        if any(a == v[s:s + SECTOR] for v in versions):
            continue
        for i in range(s, s + len(a)):
            allowed = {v[i] for v in versions}
            if actual[i] not in allowed:
                return i, allowed
    return None


def _first_diff(a: bytes, b: bytes) -> int:
    lo, hi = 0, min(len(a), len(b))
    while hi - lo > 64:  # bisect on slices: C-speed compares
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return hi


def check_view(model: GuestModel, view: dict[int, bytes], f: int, j: int, name: str) -> list[Finding]:
    """Check every chunk in `view` against the rules for (last flush f, last started op j)."""
    touched = model.touched_between(f, j)
    out = []
    for c in sorted(view):
        r = check_chunk(model, c, view[c], f, j, name, touched)
        if r is not None:
            out.append(r)
    return out


# --------------------------------------------------------------------------------------------
# Where a cut falls relative to the guest ops

@dataclass
class CutContext:
    """For a cut at log index k: the last guest op whose flush had returned (f) and the last
    guest op that had started (j); versions of ops f+1..j may or may not have reached the disk."""

    f: int
    j: int


def cut_contexts(log: CrashLog) -> list[CutContext]:
    """CutContext for every cut 0..len(log.ops)."""
    f, j = -1, -1
    out = [CutContext(f, j)]
    for op in log.ops:
        if op.kind == "mark" and isinstance(op.label, tuple):
            if op.label[0] == "start":
                j = op.label[1]
            elif op.label[0] == "flushed":
                f = op.label[1]
        out.append(CutContext(f, j))
    return out


def header_reftable(data: bytes) -> tuple[int, int]:
    """(refcount_table_offset, refcount_table_clusters) from a qcow2 header."""
    return struct.unpack_from(">QI", data, 48)


def header_l1(data: bytes) -> tuple[int, int]:
    """(l1_size, l1_table_offset) from a qcow2 header."""
    return struct.unpack_from(">IQ", data, 36)


def digest(data: bytes) -> str:
    """Content key for de-duplicating identical crash states."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------
# Sweeping crash states and judging them (shared by every crash test)

def describe_cut(log: CrashLog, cut: int) -> str:
    """'cut 12/80 after write(disk.qcow2, off=0x1000, len=512)': where a cut falls in the log."""
    before = log.ops[cut - 1].describe() if cut else "nothing"
    return f"cut {cut}/{len(log.ops)} after {before}"


def guest_context(ops: Sequence[GuestOp], ctx: CutContext) -> str:
    """The guest side of a cut: the last flush that had returned and the last op started."""
    inflight = describe_guest_op(ctx.j, ops[ctx.j]) if ctx.j >= 0 else "none"
    flushed = describe_guest_op(ctx.f, ops[ctx.f]) if ctx.f >= 0 else "none (initial image)"
    return f"last completed flush {flushed}; last started guest op {inflight}"


def select_cuts(log: CrashLog, max_cuts: int, seed: int) -> list[int]:
    """Every cut if few; else the cuts around each fsync and each returned flush (the edges of
    the ordering rules), plus a random sample of the rest, up to max_cuts."""
    n = len(log.ops)
    if n + 1 <= max_cuts:
        return list(range(n + 1))
    rng = random.Random(seed)
    edges = sorted({k for i, op in enumerate(log.ops)
                    if op.kind == "fsync" or (op.kind == "mark" and op.label[0] == "flushed") for k in (i, i + 1)})
    if len(edges) > max_cuts // 2:
        edges = rng.sample(edges, max_cuts // 2)
    rest = sorted(set(range(n + 1)) - set(edges))
    return sorted(set(edges) | set(rng.sample(rest, min(len(rest), max_cuts - len(edges)))) | {n})


@dataclass
class CrashState:
    """The files as a power cut at log index `cut` left them, with `subset` of the unsynced ops
    surviving. `files` maps each path to its bytes; `key` names the contents (equal key, equal
    files), so a judge can examine each distinct set of files once."""

    cut: int
    subset: Subset
    pending: int
    files: dict[str, bytes]
    key: str

    @property
    def data(self) -> bytes:
        """The bytes of the first (usually the only) file."""
        return next(iter(self.files.values()))

    def write_to(self, directory: str) -> None:
        """Write every file into `directory` under its own base name."""
        for path, data in self.files.items():
            with open(os.path.join(directory, os.path.basename(path)), "wb") as f:
                f.write(data)


SubsetsAt = Sequence[Subset] | Callable[[int], Sequence[Subset]]
"""The subsets to materialise: the same at every cut, or chosen per cut."""


def crash_states(log: CrashLog, paths: Sequence[str], cuts: Iterable[int], subsets: SubsetsAt, *,
                 skip_unchanged: bool = True) -> Iterator[CrashState]:
    """Every (cut, subset) state of the files at `paths`, cuts in increasing order. With
    `skip_unchanged`, a random or torn subset is skipped where nothing is unsynced (it would be
    the "none" state again). A ("tear", i) subset is skipped where no file has that pattern
    (a file without one is taken with all its unsynced ops)."""
    walkers = {p: CutWalker(log, p) for p in paths}
    for cut in cuts:
        for w in walkers.values():
            w.advance(cut)
        pending = sum(len(w.pending) for w in walkers.values())
        for sub in subsets(cut) if callable(subsets) else subsets:
            if skip_unchanged and sub != "all" and sub != "none" and not pending:
                continue
            if isinstance(sub, tuple) and sub[0] == "tear":
                torn = {p: w.tear(sub[1]) for p, w in walkers.items()}
                if all(t is None for t in torn.values()):
                    continue  # no header write pending here, or fewer patterns: nothing new
                files = {p: t if t is not None else walkers[p].state("all") for p, t in torn.items()}
            else:
                files = {p: w.state(sub) for p, w in walkers.items()}
            if len(files) == 1:
                key = digest(next(iter(files.values())))
            else:
                key = digest(b"".join(digest(files[p]).encode() for p in sorted(files)))
            yield CrashState(cut, sub, pending, files, key)


@dataclass
class Tally:
    """Counts and findings of a sweep over crash states. Each finding is kept as a line
    '[CATEGORY] where: detail' (the first `KEEP`), and counted by category."""

    KEEP = 200

    cuts: int = 0
    states: int = 0
    images: int = 0
    findings: list[str] = field(default_factory=list)
    by_category: Counter[str] = field(default_factory=Counter)
    summary: str = ""  # the sweep's one-line report, set by the test that ran it
    keys: set[str] = field(default_factory=set)  # the distinct states judged (CrashState.key)

    def add(self, where: str, found: Iterable[Finding | str]) -> None:
        """Record the findings at one state; a plain-text finding's category is its first word."""
        for item in found:
            fd = item if isinstance(item, Finding) else Finding((item.split() or ["FINDING"])[0].rstrip(":"), item)
            self.by_category[fd.category] += 1
            if len(self.findings) < self.KEEP:
                self.findings.append(f"[{fd.category}] {where}: {fd.detail}")

    def counts(self, extra: str = "") -> str:
        """'cut points=N states checked=N distinct images=N [extra] findings={...}'."""
        return (f"cut points={self.cuts} states checked={self.states} distinct images={self.images} "
                f"{extra + ' ' if extra else ''}findings={dict(self.by_category) or 0}")

    def failure(self, summary: str | None = None, examples: int = 6) -> str:
        """`summary` (default: the tally's own), then one example finding per category (the
        first lines tell the most), then up to `examples` more."""
        summary = self.summary if summary is None else summary
        firsts: dict[str, str] = {}
        for line in self.findings:
            firsts.setdefault(line.split("]")[0], line)
        rest = [x for x in self.findings if x not in firsts.values()]
        return "\n".join([summary, *firsts.values(), *rest[:examples]])

    def assert_none(self, summary: str | None = None, examples: int = 6) -> None:
        """Fail the test with `failure(summary)` if anything was found."""
        if self.by_category:
            import pytest
            pytest.fail(self.failure(summary, examples), pytrace=False)


def judge_states(states: Iterable[CrashState], cache: dict[str, Any], examine: Callable[[CrashState], Any],
                 judge: Callable[[Any, CrashState], Iterable[Finding | str]],
                 where: Callable[[CrashState], str], totals: Counter[str] | None = None) -> Tally:
    """Judge every state: `examine` runs once per distinct key (its result cached in `cache`,
    which may be shared between sweeps), `judge` turns that result and the state's place into
    findings, `where` names the place in a finding. Counts cut points, states and the images
    examined anew, and adds them to `totals`."""
    t = Tally()
    before = len(cache)
    last_cut = None
    for st in states:
        if st.cut != last_cut:
            t.cuts += 1
            last_cut = st.cut
        if st.key not in cache:
            cache[st.key] = examine(st)
        t.states += 1
        t.keys.add(st.key)
        found = list(judge(cache[st.key], st))
        if found:
            t.add(where(st), found)
    t.images = len(cache) - before
    if totals is not None:
        totals.update(cuts=t.cuts, states=t.states, images=t.images)
    return t


def recording_fixture(record: Callable[[Any, str], Any]) -> Any:
    """A module-scoped pytest fixture giving `get(wl)`: `record(wl, workdir)` run once per
    workload (by name) and module run, in a fresh temporary directory, since several tests judge
    the same log. Assign it to a module-level name: `recorded = recording_fixture(record)`."""
    import pytest

    @pytest.fixture(scope="module")
    def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Any], Any]]:
        cache: dict[str, Any] = {}

        def get(wl: Any) -> Any:
            if wl.name not in cache:
                cache[wl.name] = record(wl, str(tmp_path_factory.mktemp(wl.name)))
            return cache[wl.name]
        yield get
        cache.clear()
    return recorded


def totals_fixture(totals: Counter[str], line: Callable[[Counter[str]], str]) -> Any:
    """An autouse module fixture that prints `line(totals)` after the module's tests (visible
    with -s): how much crash space the module covered. Assign it to a module-level name."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def print_totals() -> Iterator[None]:
        yield
        if totals:
            print(f"\n{line(totals)}")
    return print_totals


# The checks of one crashed image

CHECK_KEYS = ("returncode", "corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed",
              "compressed-clusters")


def qemu_check(path: str, cwd: str | None = None) -> dict[str, Any]:
    """`qemu-img check --output=json` of a crashed image, with its exit code as 'returncode'. In
    `cwd` if given (QEMU 7.2 opens a relative data file name from the working directory); output
    that is not JSON (the image did not even open) comes back as {'error': stderr}."""
    name = os.path.relpath(path, cwd) if cwd else path
    p = subprocess.run(["qemu-img", "check", "--output=json", name], cwd=cwd, capture_output=True, text=True,
                       check=False)
    result: dict[str, Any] = json.loads(p.stdout) if p.stdout.strip().startswith("{") else {"error": p.stderr}
    result["returncode"] = p.returncode
    return result


def check_summary(r: dict[str, Any]) -> str:
    """The counts of a qemu_check result, for a finding's text."""
    return ", ".join(f"{k}={r[k]}" for k in (*CHECK_KEYS, "error") if k in r)


def check_findings(r: dict[str, Any], *, repaired: bool = False, what: str = "qemu-img check") -> list[Finding]:
    """qemu-img check's verdict on a crashed image: a corruption or an internal error is a
    CORRUPTION finding, leaks are allowed. A `repaired` image (a dirty lazy-refcount one after a
    read-write open rebuilt its counts) must be entirely clean: leaks are findings too."""
    bad = r["returncode"] not in ((0,) if repaired else (0, 3)) or r.get("corruptions", 0) \
        or r.get("check-errors", 0) or (repaired and r.get("leaks", 0))
    return [Finding("CORRUPTION", f"{what}: {check_summary(r)}")] if bad else []


def repair_on_open(path: str) -> list[Finding]:
    """Open the image read-write and close it (qcowdisk rebuilds a dirty image's refcounts; an
    image with persistent bitmaps opened as resize/amend open it); a failure, or a dirty bit
    still set afterwards, is a finding."""
    from qcowdisk import QcowFile
    try:
        QcowFile.open_keeping_bitmaps(path).close()
    except Exception as e:  # noqa: BLE001 - any failure to repair a crash state is a finding
        return [Finding("REPAIR-FAILED", f"read-write open of the dirty image: {type(e).__name__}: {e}")]
    with open(path, "rb") as f:
        if int.from_bytes(f.read(80)[72:80], "big") & 1:
            return [Finding("STILL-DIRTY", "dirty bit still set after a read-write open and close")]
    return []


def qemu_export(path: str, raw: str, *options: str, cwd: str | None = None) -> str | None:
    """`qemu-img convert -O raw` of the image (or of a snapshot, with `-l ...` options) into
    `raw`; returns None, or QEMU's error text if it could not read the image."""
    p = subprocess.run(["qemu-img", "convert", *options, "-O", "raw", path, raw], cwd=cwd, capture_output=True,
                       text=True, check=False)
    return p.stderr.strip()[:300] if p.returncode else None


def intern_chunk(pool: dict[bytes, bytes] | None, got: bytes) -> bytes:
    """`got`, or the pool's object with the same content (added to the pool if new): a judge
    keeping many views stores each distinct chunk content once (see GuestJudge.pool)."""
    if pool is None:
        return got
    data = bytes(got)  # the same object if it already is bytes; hashable either way
    return pool.setdefault(data, data)


def read_raw_chunks(raw_path: str, model: GuestModel, static: list[Finding], name: str = "qemu view",
                    pool: dict[bytes, bytes] | None = None) -> dict[int, bytes]:
    """The model's chunks from a raw export of the guest disk; data anywhere else must read as
    zeros (a STRAY-DATA finding otherwise). Chunks are interned in `pool` if given."""
    interest = model.all_chunks()
    view: dict[int, bytes] = {}
    with open(raw_path, "rb") as f:
        fd = f.fileno()
        for c in interest:
            view[c] = intern_chunk(pool, os.pread(fd, model.chunk_len(c), c * CHUNK))
        # Anything allocated outside the chunks the workload ever touched: must read as zeros.
        pos, end = 0, os.fstat(fd).st_size
        while pos < end:
            try:
                data_start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data_start, os.SEEK_HOLE)
            for c in range(data_start // CHUNK, (hole - 1) // CHUNK + 1):
                if c not in interest and c * CHUNK < model.virtual_size:
                    got = os.pread(fd, model.chunk_len(c), c * CHUNK)
                    if got.count(0) != len(got):
                        static.append(Finding("STRAY-DATA", f"{name}: chunk at {c * CHUNK:#x} was never "
                                              "written by the guest but holds non-zero data"))
            pos = hole
    return view


def read_qemu_chunks(path: str, model: GuestModel, static: list[Finding], name: str = "qemu view",
                     pool: dict[bytes, bytes] | None = None) -> dict[int, bytes] | None:
    """QEMU's guest view of the model's chunks (through qemu-img convert), or None with a
    QEMU-READ-ERROR finding if QEMU cannot read the image."""
    raw = path + ".raw"
    err = qemu_export(path, raw)
    if err is not None:
        static.append(Finding("QEMU-READ-ERROR", f"{name}: qemu-img convert failed: {err}"))
        return None
    try:
        return read_raw_chunks(raw, model, static, name, pool)
    finally:
        os.unlink(raw)


def read_qcow_chunks(path: str, model: GuestModel, static: list[Finding], name: str = "qcowdisk view",
                     pool: dict[bytes, bytes] | None = None) -> dict[int, bytes] | None:
    """qcowdisk's read-only view of the model's chunks (None if it cannot even open the image);
    every failure is a finding."""
    from qcowdisk import QcowFile
    try:
        disk = QcowFile.open(path, readonly=True)
    except Exception as e:  # noqa: BLE001 - any failure to open a crash state is a finding
        static.append(Finding("QCOWDISK-OPEN-ERROR", f"{name}: {type(e).__name__}: {e}"))
        return None
    view: dict[int, bytes] = {}
    try:
        for c in sorted(model.all_chunks()):
            try:
                view[c] = intern_chunk(pool, disk.read_at(c * CHUNK, model.chunk_len(c)))
            except Exception as e:  # noqa: BLE001
                static.append(Finding("QCOWDISK-READ-ERROR", f"{name}: read_at({c * CHUNK:#x}): "
                                      f"{type(e).__name__}: {e}"))
    finally:
        disk.close()
    return view


@dataclass
class GuestExam:
    """What one distinct crashed image shows, independent of where the cut fell: findings that
    hold at any cut (check, read errors), the guest views by name, and the qemu-img check result."""

    static: list[Finding]
    views: dict[str, dict[int, bytes]]
    check: dict[str, Any]
    verdicts: dict[tuple[int, int], list[Finding]] = field(default_factory=dict)


@dataclass
class GuestJudge:
    """Judges crashed images of a guest workload against its GuestModel.

    Each image is examined once (`examine`): qcowdisk's read-only view, `qemu-img check` (leaks
    allowed) and QEMU's view. A `lazy` (lazy-refcount) image is dirty after a crash: QEMU's view
    is read before the repair, then qcowdisk's read-write open repairs it, after which the check
    must be entirely clean, the dirty bit clear, and QEMU's view is read again. `judge` applies
    the data rules of check_view to every view for a cut's (last flush, last started op).

    `pool` interns the views' chunks: one image meets many cut contexts (the same "none" state
    at every cut up to the next fsync) and each needs its own judgement, so the views are kept;
    as read they would cost ~10 MiB per image and the exhaustive runs see thousands. Almost every
    chunk read back is byte-identical to a version the model already holds and the views mostly
    agree, so each chunk is stored as the pool's object with equal content: every check still
    gets exactly the bytes that were read, and each distinct chunk content costs memory once."""

    model: GuestModel
    lazy: bool = False
    pool: dict[bytes, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.model.all_chunks():  # seeded with the model's versions of every chunk
            for v in (self.model.base(c), *self.model.history.get(c, ((), ()))[1]):
                self.pool.setdefault(v, v)

    def examine(self, path: str) -> GuestExam:
        """Run the expensive checks on the image at `path` (it may be modified: repaired)."""
        static: list[Finding] = []
        views: dict[str, dict[int, bytes] | None] = {
            "qcowdisk view": read_qcow_chunks(path, self.model, static, "qcowdisk read-only view", self.pool)}
        if self.lazy:
            views["qemu view"] = read_qemu_chunks(path, self.model, static, "qemu view", self.pool)
            static += repair_on_open(path)
            r = qemu_check(path)
            static += check_findings(r, repaired=True, what="after qcowdisk's repair-on-open, qemu-img check")
            views["qemu view after repair"] = read_qemu_chunks(path, self.model, static, "qemu view after repair",
                                                               self.pool)
        else:
            r = qemu_check(path)
            static += check_findings(r)
            views["qemu view"] = read_qemu_chunks(path, self.model, static, "qemu view", self.pool)
        return GuestExam(static, {k: v for k, v in views.items() if v is not None}, r)

    def judge(self, exam: GuestExam, ctx: CutContext) -> list[Finding]:
        """Static findings plus the data rules for this cut's (last flush, last started op)."""
        k = (ctx.f, ctx.j)
        if k not in exam.verdicts:
            out = list(exam.static)
            for name, view in exam.views.items():
                out += check_view(self.model, view, ctx.f, ctx.j, name)
            exam.verdicts[k] = out
        return exam.verdicts[k]

    def examine_bytes(self, data: bytes, workdir: str) -> GuestExam:
        """Write a crashed image into `workdir` and examine it."""
        path = os.path.join(workdir, "state.qcow2")
        with open(path, "wb") as f:
            f.write(data)
        return self.examine(path)


@dataclass
class GuestRecording:
    """A guest workload run through a RecordingHost, plus everything needed to judge its crash
    states. `wl` is the test's workload description (it has a `name` and a `lazy` flag)."""

    wl: Any
    workdir: str
    image: str
    log: CrashLog
    ops: list[GuestOp]
    model: GuestModel
    contexts: list[CutContext]
    initial: bytes
    final: bytes
    exams: dict[str, GuestExam] = field(default_factory=dict)
    judge: GuestJudge = field(init=False)

    def __post_init__(self) -> None:
        self.judge = GuestJudge(self.model, self.wl.lazy)

    def examine(self, data: bytes, key: str) -> GuestExam:
        """The checks of one crashed image, run once per distinct content (`key`)."""
        if key not in self.exams:
            self.exams[key] = self.judge.examine_bytes(data, self.workdir)
        return self.exams[key]

    def where(self, cut: int, subset: Subset, pending: int) -> str:
        """Failure location: workload, cut point, subset, guest context."""
        return (f"{self.wl.name} {describe_cut(self.log, cut)}, subset={subset} ({pending} unsynced ops); "
                f"{guest_context(self.ops, self.contexts[cut])}")

    def sweep(self, cuts: Iterable[int], subsets: SubsetsAt, totals: Counter[str] | None = None) -> Tally:
        """Materialise and judge every (cut, subset) state of the image."""
        return judge_states(crash_states(self.log, [self.image], cuts, subsets), self.exams,
                            lambda st: self.judge.examine_bytes(st.data, self.workdir),
                            lambda exam, st: self.judge.judge(exam, self.contexts[st.cut]),
                            lambda st: self.where(st.cut, st.subset, st.pending), totals)

    def assert_uncrashed_matches_model(self) -> GuestExam:
        """Without a crash all is right, so the findings at cut points are about ordering, not
        plain write bugs: the log reproduces the live file (no write bypassed the HostFile
        seam), qemu-img check finds it entirely clean, and it reads back as the model after the
        last op. Returns the final image's exam."""
        assert materialise(self.initial, self.log.ops, self.image, len(self.log.ops), "all") == self.final, \
            "the log does not reproduce the live file: some write bypassed the HostFile seam"
        clean = check_findings(qemu_check(self.image), repaired=True)
        assert not clean, f"{self.image}: {clean}"
        exam = self.examine(self.final, "final")
        last = len(self.ops) - 1
        found = self.judge.judge(exam, CutContext(last, last))
        assert not found, "the uncrashed image differs from the model:\n" + "\n".join(map(str, found[:8]))
        return exam

    def log_counts(self) -> str:
        """'log=N ops (N host ops, N fsyncs, N guest ops)'."""
        n_fsync = sum(1 for op in self.log.ops if op.kind == "fsync")
        n_host = sum(1 for op in self.log.ops if op.kind != "mark")
        return f"log={len(self.log.ops)} ops ({n_host} host ops, {n_fsync} fsyncs, {len(self.ops)} guest ops)"


def unsynced_when(log: CrashLog, paths: Sequence[str], mark: str) -> Iterator[tuple[int, Any, list[Op]]]:
    """At every marker (mark, j) in the log (e.g. "flushed": a flush returned), the host ops on
    `paths` still waiting for an fsync: (log index, j, those ops). An operation that is durable
    when it returns has none."""
    walkers = [CutWalker(log, p) for p in paths]
    for i, op in enumerate(log.ops):
        if op.kind == "mark" and isinstance(op.label, tuple) and op.label[0] == mark:
            for w in walkers:
                w.advance(i)
            yield i, op.label[1], [p for w in walkers for p in w.pending]


# --------------------------------------------------------------------------------------------
# SIGKILL child

def child_command(module: str, *args: str) -> list[str]:
    """The command line of a child Python process running `module.child_main(*args)` (module
    from tests/, args as strings)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, sys.argv[1]); import {module}; "
            f"{module}.child_main(*sys.argv[2:])", tests_dir, *args]


@dataclass
class Killed:
    """What a SIGKILLed child left: every line it printed, its exit status, its stderr."""

    lines: list[str]
    returncode: int
    stderr: str

    @property
    def ok(self) -> bool:
        """Killed, or finished normally (anything else: the child failed by itself)."""
        return self.returncode in (0, -signal.SIGKILL)


def run_and_kill(argv: Sequence[str], kill_after: Callable[[list[str]], bool], delay: float,
                 timeout: float = 60) -> Killed:
    """Run a child, reading its stdout line by line; once `kill_after(lines so far)` says so,
    wait `delay` seconds (so it dies mid-operation as often as not) and SIGKILL it. Lines it
    printed before the kill landed are collected too."""
    p = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    lines: list[str] = []
    for line in p.stdout:
        lines.append(line.rstrip("\n"))
        if kill_after(lines):
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            break
    # Not communicate(): it reads the pipe's descriptor, and the lines p.stdout had already
    # read ahead into its buffer (the child printed them before the kill: a slow parent finds
    # several waiting) would be lost, leaving the child's last reported flushes unknown. The
    # child is dead or done, so reading stdout to its end cannot block on a full stderr.
    lines += p.stdout.read().splitlines()
    err = p.stderr.read()
    p.wait(timeout=timeout)
    return Killed(lines, p.returncode, err)


def report_line(text: str) -> None:
    """A killed child's progress report: one line on stdout, flushed at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def child_main(image: str, params: str) -> None:
    """Entry point of the killed child: the image and json params for make_guest_ops. Prints
    'FLUSHED j' after each flush() returns and 'DONE' at the end (see kill_guest_writer)."""
    from qcowdisk import QcowFile

    ops = make_guest_ops(**json.loads(params))
    disk = QcowFile.open(image)
    run_guest_ops(disk, ops, on_flush=lambda j: report_line(f"FLUSHED {j}"))
    report_line("DONE")


@dataclass
class KilledWriter:
    """A guest writer SIGKILLed after a reported flush: what it reported, and the cut context
    its image must satisfy (the last reported flush; the child may have completed the next
    flush without getting to print it, never more)."""

    killed: Killed
    flushed: list[int]
    done: bool
    ctx: CutContext

    def failure(self) -> str | None:
        """Why the child's run proves nothing (it failed by itself), or None."""
        if not self.killed.ok or (self.killed.returncode == 0 and not self.done):
            return f"child failed (exit {self.killed.returncode}) before the kill:\n{self.killed.stderr[-2000:]}"
        return None


def kill_guest_writer(argv: Sequence[str], ops: Sequence[GuestOp], target: int, delay: float) -> KilledWriter:
    """Run a child that follows child_main's protocol on `ops` and SIGKILL it `delay` seconds
    after its `target`-th reported flush."""
    count = itertools.count(1)
    killed = run_and_kill(argv, lambda lines: lines[-1].startswith("FLUSHED ") and next(count) >= target, delay)
    flushed = [int(line.split()[1]) for line in killed.lines if line.startswith("FLUSHED ")]
    f = flushed[-1] if flushed else -1
    later = [j for j, op in enumerate(ops) if op[0] in ("flush", "close") and j > f]
    return KilledWriter(killed, flushed, "DONE" in killed.lines, CutContext(f, later[0] if later else len(ops) - 1))


__all__ = ["Op", "CrashLog", "RecordingHost", "Subset", "apply_op", "surviving", "durable_parts",
           "materialise", "CutWalker", "TEAR_PATTERNS", "HEADER_TEARS", "tear_patterns",
           "header_cluster_size", "Tear", "find_tear", "tear_state", "GuestOp", "guest_data", "make_guest_ops", "run_guest_ops",
           "describe_guest_op", "GuestModel", "Finding", "check_chunk", "check_view", "CutContext",
           "cut_contexts", "header_reftable", "header_l1", "digest", "child_main", "CHUNK", "SECTOR",
           "describe_cut", "guest_context", "select_cuts", "CrashState", "SubsetsAt", "crash_states", "Tally",
           "judge_states", "CHECK_KEYS", "qemu_check", "check_summary", "check_findings", "repair_on_open",
           "qemu_export", "intern_chunk", "read_raw_chunks", "read_qemu_chunks", "read_qcow_chunks", "GuestExam",
           "GuestJudge", "child_command", "Killed", "run_and_kill", "report_line", "KilledWriter",
           "kill_guest_writer", "recording_fixture", "totals_fixture", "GuestRecording", "unsynced_when",
           "stray_byte"]
