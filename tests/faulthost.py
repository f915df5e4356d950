"""Fault injection at the host I/O seam, and a guest mirror that knows what a flush promised.

`FaultPlan` hands out `FaultHost`s (a `HostFile` subclass, via `plan.factory()`) for
`QcowFile.open/create(host_factory=...)`. Every mutating host op (write, fsync, truncate, punch, zero)
is recorded in `plan.ops`, with its outcome, before anything is decided about it. Failures are
planned with `plan.arm(...)`: the n-th matching op from now on raises `OSError(errno)`, once or
for good, optionally after landing a prefix of the write for real (a short write followed by an
error, cut at an 8-byte boundary of the file). `plan.limit_size(...)` makes the file unable to
grow past a length, as a full file system does (the part that fits is written, then ENOSPC).

`Mirror` is the oracle for "what must read back": bytes written before the last flush() that
returned, and not touched since, are promised; everything touched since (including a write or
zeroing that failed half-way) is uncertain and not compared.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qcowdisk.hostio import HostFile

MUTATING = ("write", "fsync", "truncate", "punch", "zero", "allocate", "writeback")


@dataclass
class HostOp:
    """One mutating host op as the engine asked for it."""

    kind: str                 # write | fsync | truncate | punch | zero (fallocate ZERO_RANGE) | allocate | writeback
    path: str
    offset: int = 0
    length: int = 0
    data: bytes = b""
    pid: int = 0
    error: int | None = None  # errno it failed with (None: performed)
    landed: int | None = None  # for a failed write: bytes that reached the file

    def describe(self) -> str:
        """Short form for failure messages."""
        what = f"{self.kind}({os.path.basename(self.path)}, off={self.offset:#x}, len={self.length})"
        if self.error is not None:
            what += f" -> {errno_mod.errorcode.get(self.error, self.error)}"
            if self.landed:
                what += f" after {self.landed} bytes"
        return what


def half_at_8(offset: int, length: int) -> int:
    """Prefix length for a torn write: about half, ending on an 8-byte boundary of the file."""
    end = (offset + length // 2) // 8 * 8
    return max(0, min(length, end - offset))


@dataclass
class Fault:
    """A planned failure: the `nth` op (0-based, counted from arming) that `matches` fails."""

    kind: str
    err: int = errno_mod.EIO
    nth: int = 0
    matches: Callable[[HostOp], bool] | None = None
    prefix: Callable[[int, int], int] | None = None  # (offset, length) -> bytes to land first
    persistent: bool = False  # after the first hit, every later matching op fails too
    kills_host: bool = False  # after the first hit, every later mutating op of any kind fails too
    seen: int = 0
    raised: list[OSError] = field(default_factory=list)

    @property
    def fired(self) -> bool:
        """Whether the failure has been injected at least once."""
        return bool(self.raised)


class FaultPlan:
    """Shared state of every FaultHost one test opens: the op log and the planned failures."""

    def __init__(self) -> None:
        self.ops: list[HostOp] = []
        self.hosts: list[FaultHost] = []
        self.faults: list[Fault] = []
        self.size_limits: dict[str, int] = {}
        self._lock = threading.Lock()

    def factory(self) -> Callable[[str, bool], FaultHost]:
        """A host_factory for QcowFile.open/create."""
        def make(path: str, writable: bool) -> FaultHost:
            h = FaultHost(path, writable, self)
            self.hosts.append(h)
            return h
        return make

    def arm(self, kind: str, err: int = errno_mod.EIO, *, nth: int = 0,
            matches: Callable[[HostOp], bool] | None = None,
            prefix: Callable[[int, int], int] | None = None, persistent: bool = False,
            kills_host: bool = False) -> Fault:
        """Make the `nth` next `kind` op (that `matches`) fail with `err`; returns the Fault.

        `persistent`: later matching ops fail too; `kills_host`: after the first hit every
        mutating op (any kind, any file of this plan) fails with `err`, as on a dead disk.
        """
        assert kind in MUTATING
        f = Fault(kind, err, nth, matches, prefix, persistent, kills_host)
        self.faults.append(f)
        return f

    def limit_size(self, path: str, max_length: int) -> None:
        """`path` cannot grow past `max_length`: a write beyond lands what fits, then ENOSPC."""
        self.size_limits[os.path.abspath(path)] = max_length

    def mark(self) -> int:
        """Position in the op log, for `mutations_since`."""
        return len(self.ops)

    def mutations_since(self, mark: int) -> list[HostOp]:
        """Mutating ops the engine attempted since `mark` (performed or failed)."""
        return self.ops[mark:]

    def count(self, kind: str) -> int:
        """How many ops of `kind` were attempted so far."""
        return sum(1 for op in self.ops if op.kind == kind)

    def open_hosts(self) -> list[FaultHost]:
        """FaultHosts whose descriptor is still open."""
        return [h for h in self.hosts if h.fd >= 0]

    # --- called by FaultHost -------------------------------------------------------------
    def _decide(self, op: HostOp) -> tuple[Fault | None, int]:
        """Record `op`; return (fault to inject or None, bytes of a write to land first)."""
        with self._lock:
            self.ops.append(op)
            for f in self.faults:
                if f.kills_host and f.fired:
                    return f, 0
            for f in self.faults:
                if f.kind != op.kind or (f.matches is not None and not f.matches(op)):
                    continue
                if f.fired and f.persistent:
                    return f, 0
                if f.fired:
                    continue
                if f.seen == f.nth:
                    f.seen += 1
                    land = f.prefix(op.offset, op.length) if (f.prefix and op.kind == "write") else 0
                    return f, land
                f.seen += 1
            if op.kind in ("write", "zero"):
                limit = self.size_limits.get(op.path)
                if limit is not None and op.offset + op.length > limit:
                    nofit = Fault(op.kind, errno_mod.ENOSPC)
                    return nofit, max(0, limit - op.offset)
        return None, 0


def _fail(fault: Fault, op: HostOp) -> OSError:
    e = OSError(fault.err, os.strerror(fault.err), op.path)
    op.error = fault.err
    fault.raised.append(e)
    return e


class FaultHost(HostFile):
    """A HostFile that records every mutating op in its plan and fails the ones planned to."""

    def __init__(self, path: str, writable: bool, plan: FaultPlan) -> None:
        super().__init__(path, writable)
        self.plan = plan
        self.key = os.path.abspath(path)

    def pwrite(self, data: Any, offset: int) -> None:
        """One op, whatever the base class delegates to."""
        self.pwritev([data], offset)

    def pwritev(self, buffers: Sequence[Any], offset: int) -> None:
        """Write for real unless planned to fail (then land the planned prefix for real)."""
        joined = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        if not joined:
            return
        op = HostOp("write", self.key, offset, len(joined), joined, os.getpid())
        fault, land = self.plan._decide(op)
        if fault is not None:
            if land:
                os.pwrite(self.fd, joined[:land], offset)
            op.landed = land
            raise _fail(fault, op)
        HostFile.pwritev(self, [joined], offset)

    def fsync(self) -> None:
        """fsync for real unless planned to fail."""
        op = HostOp("fsync", self.key, pid=os.getpid())
        fault, _ = self.plan._decide(op)
        if fault is not None:
            raise _fail(fault, op)
        HostFile.fsync(self)

    def allocate(self, offset: int, length: int) -> bool:
        """posix_fallocate for real unless planned to fail (ENOSPC: the space is not there)."""
        op = HostOp("allocate", self.key, offset, length, pid=os.getpid())
        fault, _ = self.plan._decide(op)
        if fault is not None:
            raise _fail(fault, op)
        return HostFile.allocate(self, offset, length)

    def start_writeback(self) -> None:
        """Start the writeback for real unless planned to fail (sync_file_range's EIO)."""
        op = HostOp("writeback", self.key, pid=os.getpid())
        fault, _ = self.plan._decide(op)
        if fault is not None:
            raise _fail(fault, op)
        HostFile.start_writeback(self)

    def truncate(self, length: int) -> None:
        """Truncate for real unless planned to fail."""
        op = HostOp("truncate", self.key, length=length, pid=os.getpid())
        fault, _ = self.plan._decide(op)
        if fault is not None:
            raise _fail(fault, op)
        HostFile.truncate(self, length)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Punch for real unless planned to fail."""
        op = HostOp("punch", self.key, offset, length, pid=os.getpid())
        fault, _ = self.plan._decide(op)
        if fault is not None:
            raise _fail(fault, op)
        return HostFile.punch_hole(self, offset, length)

    def zero_alloc(self, offset: int, length: int) -> bool:
        """Allocate as zeros for real unless planned to fail (or past a size limit: ENOSPC,
        nothing allocated)."""
        op = HostOp("zero", self.key, offset, length, pid=os.getpid())
        fault, _ = self.plan._decide(op)
        if fault is not None:
            raise _fail(fault, op)
        return HostFile.zero_alloc(self, offset, length)


# --------------------------------------------------------------------------------------------
# The oracle: what a returned flush() promised

class Mirror:
    """The guest disk as written, and which bytes the last returned flush() made promises about."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current = bytearray(size)   # what the guest wrote, in order
        self.flushed = bytearray(size)   # as of the last flush() that returned
        self.touched = bytearray(size)   # 1 where written/zeroed since that flush (uncertain)

    def write(self, offset: int, data: bytes) -> None:
        """Record a write (call before write_at: a failing write may land in part)."""
        self.current[offset:offset + len(data)] = data
        self.touched[offset:offset + len(data)] = b"\1" * len(data)

    def zero(self, offset: int, length: int) -> None:
        """Record write_zeroes / punch_hole."""
        self.write(offset, bytes(length))

    def flush_returned(self) -> None:
        """flush() returned: everything written so far is promised."""
        self.flushed[:] = self.current
        self.touched = bytearray(self.size)

    def untouched_run(self, length: int) -> int | None:
        """Offset of a `length`-byte run untouched since the last flush (None if there is none)."""
        zero = bytes(length)
        i = self.touched.find(zero)
        return i if i >= 0 and i + length <= self.size else None

    def mismatches(self, raw: bytes, limit: int = 8) -> list[str]:
        """Promised byte ranges that `raw` (the guest view read back) gets wrong."""
        out: list[str] = []
        if len(raw) != self.size:
            out.append(f"guest view is {len(raw)} bytes, expected {self.size}")
            raw = raw[:self.size].ljust(self.size, b"\0")
        chunk = 1 << 16
        for a in range(0, self.size, chunk):
            b = min(self.size, a + chunk)
            if raw[a:b] == self.flushed[a:b]:
                continue
            t = self.touched[a:b]
            if not t.count(0):
                continue
            bad = [i for i in range(a, b) if not self.touched[i] and raw[i] != self.flushed[i]]
            if bad:
                out.append(f"guest bytes {bad[0]:#x}..{bad[-1]:#x} ({len(bad)} promised bytes) differ from "
                           f"what the last returned flush covered (e.g. at {bad[0]:#x}: read "
                           f"{raw[bad[0]]:#04x}, flushed {self.flushed[bad[0]]:#04x})")
                if len(out) >= limit:
                    break
        return out


def fds_open_on(path: str) -> list[int]:
    """Descriptors of this process that refer to `path` (by device and inode)."""
    st = os.stat(path)
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            s = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            found.append(int(name))
    return found
