"""The read path: serve the runs of a request straight into the caller's buffer.

One `preadv` per host-contiguous data run into a slice of the caller's memoryview, zero runs
filled at C speed, unallocated runs from the backing image, compressed clusters decoded (decoding.py).
Everything here expects the caller to hold the image lock, except a `ReadPlan`'s host reads:
the public read methods resolve the mapping under the lock and read without it (see ReadPlan).
"""

from __future__ import annotations

from ..image import fill_zeros
from .chain import owning_layer
from .decoding import Piece, cache_clusters, plan_compressed
from .entries import SUBCLUSTER_ALL
from .mapping import NO_HOST, RUN_BACKING, RUN_COMPRESSED, RUN_DATA, RUN_ZERO, Run, get_host_runs, plain_host
from .state import Qcow2State


def readinto(s: Qcow2State, mv: memoryview, guest_offset: int) -> None:
    """Fill all of `mv` (already clipped to the disk) with guest data from `guest_offset`."""
    n = len(mv)
    if n == 0:
        return
    # Fast path: one cluster of plain data or of nothing (the common small read), its L2 slice
    # loaded on a miss without translating the request into runs.
    if (guest_offset & s.cluster_mask) + n <= s.cluster_size:
        host = plain_host(s, guest_offset)
        if host is not None:
            if host < 0:
                _read_backing(s, mv, guest_offset)
                return
            got = s.data_host.preadv([mv], host)
            if got < n:
                fill_zeros(mv, got, n)
            return
    execute_runs(s, mv, guest_offset, get_host_runs(s, guest_offset, n))


def _read_backing(s: Qcow2State, mv: memoryview, guest_offset: int) -> None:
    """Fill mv with what the backing chain holds at `guest_offset` (zeros without one, and
    past its end), from the layer that owns it, skipping those that do not."""
    got = 0
    if s.backing is not None:
        got = owning_layer(s.backing, guest_offset, len(mv)).readinto_at(mv, guest_offset)
    if got < len(mv):
        fill_zeros(mv, got, len(mv))


def subclusters_allocated(bitmap: int, first: int, last: int) -> bool:
    """Whether an extended L2 `bitmap` is consistent and marks subclusters [first, last] as
    allocated data (the fast read paths' test; anything else takes the checked path)."""
    if bitmap == SUBCLUSTER_ALL:
        return True
    want = (2 << last) - (1 << first)
    return bitmap & (want | want << 32) == want and not bitmap & (bitmap >> 32)


def execute_runs(s: Qcow2State, mv: memoryview, guest_offset: int, runs: list[Run]) -> None:
    """Serve runs into mv: one preadv per data run, zero fills, backing reads; the compressed
    runs last, all together (decoding.py). The caller holds the lock throughout."""
    plan = ReadPlan(s, mv, guest_offset, runs)
    cache_clusters(s, plan.serve())


class ReadPlan:
    """A request whose mapping is resolved (under the lock) and whose host reads and decoding
    may run without it: see `serve_outside_lock`.

    Why that is safe. A run names host ranges that held this request's data when the mapping
    was resolved. Until one of them is freed (its refcount reaching zero, after which the
    allocator may hand it to another guest cluster), punched, truncated away, or its file
    closed, it keeps this guest range's data: only writes to this very range change it in
    place, and a read racing a write of the same bytes may see either (as a disk would). Every
    one of those events happens under the lock after `s.remap_epoch` is raised (file.py
    `_guarded` and `close`, ordering.flush when it frees); so a read that finds the epoch
    unchanged after its host I/O read nothing stale, and one that finds it changed is done
    again under the lock.
    """

    __slots__ = ("compressed", "epoch", "guest_offset", "mv", "runs", "s")

    def __init__(self, s: Qcow2State, mv: memoryview, guest_offset: int, runs: list[Run]) -> None:
        """Plan `runs` (from get_host_runs for `mv`'s range at `guest_offset`); the caller holds the lock."""
        self.s = s
        self.mv = mv
        self.guest_offset = guest_offset
        self.runs = runs
        self.epoch = s.remap_epoch
        pieces: list[Piece] = []
        pos = 0
        for run in runs:
            if run.kind == RUN_COMPRESSED:
                goff = guest_offset + pos
                pieces.append(Piece(pos, run.length, goff & s.cluster_mask, run.host, run.guest_cluster))
            pos += run.length
        self.compressed = plan_compressed(s, mv, pieces) if pieces else None

    def serve(self) -> list[tuple[int, bytes]]:
        """Do the host reads, zero fills, backing reads and decoding; returns the compressed
        clusters decoded aside, for the cache. Reads only state that is fixed while the image
        is open, or that the epoch guards (the backing image)."""
        s = self.s
        mv = self.mv
        pos = 0
        goff = self.guest_offset
        for run in self.runs:
            kind, length = run.kind, run.length
            if kind == RUN_DATA:
                got = s.data_host.preadv([mv[pos:pos + length]], run.host)
                if got < length:  # a cluster cut short by the end of the file reads as zeros
                    fill_zeros(mv, pos + got, pos + length)
            elif kind == RUN_ZERO:
                fill_zeros(mv, pos, pos + length)
            elif kind == RUN_BACKING:
                got = 0
                backing = s.backing
                if backing is not None:  # from the layer that owns it, skipping those that do not
                    got = owning_layer(backing, goff, length).readinto_at(mv[pos:pos + length], goff)
                if got < length:
                    fill_zeros(mv, pos + got, pos + length)
            pos += length
            goff += length
        return self.compressed.run() if self.compressed is not None else []


# `_runs`' host argument when plain_host has not been asked yet.
NOT_LOOKED_UP = -2


def _runs(s: Qcow2State, guest_offset: int, length: int, host: int | None = NOT_LOOKED_UP) -> list[Run]:
    """The runs of a request; a read inside one cluster of plain data or of nothing (the common
    small read) skips the run translation, its L2 slice loaded on a miss (mapping.plain_host).
    `host` is plain_host's answer when the caller already has it (asking twice would count as
    two misses of the slice)."""
    if host == NOT_LOOKED_UP:
        host = plain_host(s, guest_offset) if (guest_offset & s.cluster_mask) + length <= s.cluster_size else None
    if host is not None:
        gc = guest_offset >> s.cluster_bits
        return [Run(RUN_DATA, length, host, gc) if host >= 0 else Run(RUN_BACKING, length, NO_HOST, gc)]
    return get_host_runs(s, guest_offset, length)


def plan_read(s: Qcow2State, mv: memoryview, guest_offset: int, host: int | None = NOT_LOOKED_UP) -> ReadPlan:
    """The plan of a read of all of `mv` (inside the disk) at `guest_offset`; the caller holds
    the lock. `host`: plain_host's answer for a one-cluster read, when already asked."""
    return ReadPlan(s, mv, guest_offset, _runs(s, guest_offset, len(mv), host))


def serve_outside_lock(plan: ReadPlan) -> bool:
    """Serve a plan without the image lock (see ReadPlan). False when the mapping may have
    changed meanwhile: then what `plan.mv` holds is meaningless and the caller reads again
    under the lock. Takes the lock only to cache clusters decoded aside."""
    s = plan.s
    try:
        aside = plan.serve()
    except Exception:
        if s.remap_epoch == plan.epoch:
            raise
        return False  # (a freed payload that no longer decodes, a closed descriptor, ...)
    if s.remap_epoch != plan.epoch:
        return False
    if aside:
        with s.lock:
            if s.remap_epoch == plan.epoch:
                cache_clusters(s, aside)
    return True


# The buffer of a plan for bytes that one data run serves: one pread makes the bytes, no copy.
_NO_BUFFER = memoryview(b"")


def plan_bytes(s: Qcow2State, guest_offset: int, length: int, host: int | None = NOT_LOOKED_UP) -> ReadPlan:
    """The plan of a read of [guest_offset, +length) (inside the disk) into new bytes; the caller
    holds the lock. `host`: plain_host's answer for a one-cluster read, when already asked."""
    runs = _runs(s, guest_offset, length, host)
    single = len(runs) == 1 and runs[0].kind == RUN_DATA
    return ReadPlan(s, _NO_BUFFER if single else memoryview(bytearray(length)), guest_offset, runs)


def bytes_outside_lock(plan: ReadPlan) -> bytes | None:
    """The bytes of a `plan_bytes` plan read without the lock, or None when the mapping may
    have changed meanwhile (or one data run came back short): the caller reads under the lock."""
    if plan.mv is not _NO_BUFFER:
        return bytes(plan.mv) if serve_outside_lock(plan) else None
    s = plan.s
    run = plan.runs[0]
    try:
        data = s.data_host.pread(run.length, run.host)
    except OSError:
        if s.remap_epoch == plan.epoch:
            raise
        return None
    return data if len(data) == run.length and s.remap_epoch == plan.epoch else None


def read_copy(s: Qcow2State, guest_offset: int, length: int) -> bytes:
    """Guest bytes as they read now (copy-on-write sources)."""
    buf = bytearray(length)
    readinto(s, memoryview(buf), guest_offset)
    return bytes(buf)
