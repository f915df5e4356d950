"""Crash simulation at the host I/O seam.

`RecordingHost` is a `HostFile` that performs every operation for real and also appends it to a
shared `CrashLog`: write(offset, bytes), truncate(length), punch(offset, length), fsync. The
workload driver adds marker ops (a guest op started / ended, a `flush()` returned) to the same
log, so every host op has a known place relative to the guest's view.

A *power cut at point k* is the state after the first k log entries were issued. For each file,
what survives is the contents as of that file's last fsync before k, plus any subset of the
writes issued since (applied in issue order). `materialise` and `CutWalker` build those states:
subsets "all", "none", seeded random ones, and random ones whose writes are also torn into
independently surviving 512-byte sectors (the atomic unit of a disk).

`GuestModel` is the oracle side: a sparse, chunked model of the guest disk with the history of
every chunk, so a check can ask "what did this chunk hold when flush #F returned, and what
versions could it hold if the cut fell after guest op J?". `check_view` applies the two rules:
whatever was not touched after the last completed flush reads back exactly, and whatever was
touched since reads back, byte by byte, as one of the versions written since (or the flushed one).

The guest workloads are deterministic (`make_guest_ops`), so a SIGKILLed child process
(`child_main`) and the parent that checks its image agree on every byte without talking.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import struct
import sys
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from qcowdisk.hostio import HostFile

SECTOR = 512
CHUNK = 64 * 1024  # granularity of the guest model and of view comparisons


# --------------------------------------------------------------------------------------------
# The log and the recording host file

@dataclass(frozen=True)
class Op:
    """One log entry. kind: write | truncate | punch | fsync | mark."""

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
        if self.kind == "punch":
            return f"punch({name}, off={self.offset:#x}, len={self.length})"
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

    def fsync(self) -> None:
        """Sync for real, then record: only a completed fsync makes earlier ops durable."""
        HostFile.fsync(self)
        self._rec(Op("fsync", self.key))


# --------------------------------------------------------------------------------------------
# Materialising crash states

Subset = str | tuple[str, int]
""""all" | "none" | ("random", seed) | ("torn", seed): which unsynced ops survive the cut."""


def apply_op(buf: bytearray, op: Op, keep_sectors: Callable[[int, int], bool] | None = None) -> None:
    """Apply one file op to `buf` in place. With `keep_sectors`, a write survives only in the
    512-byte host sectors for which keep_sectors(sector_start, sector_end) is true (tearing)."""
    if op.kind == "write":
        pieces: Iterable[tuple[int, int]]
        end = op.offset + len(op.data)
        if keep_sectors is None:
            pieces = [(op.offset, end)]
        else:
            cuts = [op.offset, *range((op.offset // SECTOR + 1) * SECTOR, end, SECTOR), end]
            pieces = [(a, b) for a, b in itertools.pairwise(cuts) if keep_sectors(a, b)]
        for a, b in pieces:
            if b > len(buf):
                buf.extend(bytes(b - len(buf)))
            buf[a:b] = op.data[a - op.offset:b - op.offset]
    elif op.kind == "truncate":
        if op.length < len(buf):
            del buf[op.length:]
        else:
            buf.extend(bytes(op.length - len(buf)))
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
        if mode == "torn" and op.kind == "write" and len(op.data) > 0:
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
        """File bytes at the current cut under `subset`."""
        if subset == "none" or not self.pending:
            return bytes(self.base)
        buf = bytearray(self.base)
        for op, keep in surviving(self.pending, subset, self.pos):
            apply_op(buf, op, keep)
        return bytes(buf)


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
                  on_flush: Callable[[int], None] | None = None) -> None:
    """Apply `ops` to an open QcowFile, marking the log: ("start", j) / ("end", j) around every
    op and ("flushed", j) as soon as a flush() (or close()) returned."""
    for j, op in enumerate(ops):
        kind, off, length, _ = op
        if log is not None:
            log.mark(("start", j))
        if kind == "write":
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

    def apply(self, j: int, op: GuestOp) -> None:
        """Record the effect of guest op j (must be called in order)."""
        kind, off, length, _ = op
        touched: list[int] = []
        if kind in ("write", "zero", "punch"):
            data = guest_data(op) if kind == "write" else None
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
    if actual in vers:
        return None
    for s in range(0, len(actual), SECTOR):
        a = actual[s:s + SECTOR]
        if any(a == v[s:s + SECTOR] for v in vers):
            continue
        for i in range(s, s + len(a)):
            allowed = {v[i] for v in vers}
            if actual[i] not in allowed:
                cat = "LOST-FLUSHED" if len(allowed) == 1 else "UNFLUSHED-GARBAGE"
                return Finding(cat, f"{view}: guest byte {c * CHUNK + i:#x} = {actual[i]:#04x}, "
                               f"allowed {sorted(allowed)} (versions since last flush: {len(vers)})")
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
# SIGKILL child

def child_main(argv: Sequence[str]) -> None:
    """Entry point of the killed child: argv = [image, json params for make_guest_ops].
    Prints 'FLUSHED j' (stdout, flushed) after each flush() returns, 'DONE' at the end."""
    from qcowdisk import QcowFile

    image, params = argv[0], json.loads(argv[1])
    ops = make_guest_ops(**params)
    disk = QcowFile.open(image)

    def report(j: int) -> None:
        sys.stdout.write(f"FLUSHED {j}\n")
        sys.stdout.flush()
    run_guest_ops(disk, ops, on_flush=report)
    sys.stdout.write("DONE\n")
    sys.stdout.flush()


__all__ = ["Op", "CrashLog", "RecordingHost", "Subset", "apply_op", "surviving", "durable_parts",
           "materialise", "CutWalker", "GuestOp", "guest_data", "make_guest_ops", "run_guest_ops",
           "describe_guest_op", "GuestModel", "Finding", "check_chunk", "check_view", "CutContext",
           "cut_contexts", "header_reftable", "header_l1", "digest", "child_main", "CHUNK", "SECTOR"]
