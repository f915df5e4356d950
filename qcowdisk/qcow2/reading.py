"""The read path: serve the runs of a request straight into the caller's buffer.

One `preadv` per host-contiguous data run into a slice of the caller's memoryview, zero runs
filled at C speed, unallocated runs from the backing image, compressed clusters decoded (decoding.py).
Everything here expects the caller to hold the image lock.
"""

from __future__ import annotations

from ..image import fill_zeros
from .chain import owning_layer
from .decoding import Piece, read_compressed
from .entries import SUBCLUSTER_ALL
from .mapping import RUN_BACKING, RUN_DATA, RUN_ZERO, Run, get_host_runs, plain_host
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
    runs last, all together (decoding.py)."""
    pos = 0
    goff = guest_offset
    pieces: list[Piece] = []
    for run in runs:
        kind, length = run.kind, run.length
        if kind == RUN_DATA:
            got = s.data_host.preadv([mv[pos:pos + length]], run.host)
            if got < length:  # a cluster cut short by the end of the file reads as zeros
                fill_zeros(mv, pos + got, pos + length)
        elif kind == RUN_ZERO:
            fill_zeros(mv, pos, pos + length)
        elif kind == RUN_BACKING:
            _read_backing(s, mv[pos:pos + length], goff)
        else:
            pieces.append(Piece(pos, length, goff & s.cluster_mask, run.host, run.guest_cluster))
        pos += length
        goff += length
    if pieces:
        read_compressed(s, mv, pieces)


def read_bytes(s: Qcow2State, guest_offset: int, length: int) -> bytes:
    """Guest bytes (inside the disk) as a new bytes object; one data run is one pread, no copy."""
    if (guest_offset & s.cluster_mask) + length <= s.cluster_size:  # as readinto's fast path
        host = plain_host(s, guest_offset)
        if host is not None:
            if host < 0:
                if s.backing is None:
                    return bytes(length)
                buf = bytearray(length)
                _read_backing(s, memoryview(buf), guest_offset)
                return bytes(buf)
            data = s.data_host.pread(length, host)
            if len(data) == length:
                return data
    runs = get_host_runs(s, guest_offset, length)
    if len(runs) == 1 and runs[0].kind == RUN_DATA:
        data = s.data_host.pread(length, runs[0].host)
        if len(data) == length:
            return data
    buf = bytearray(length)
    execute_runs(s, memoryview(buf), guest_offset, runs)
    return bytes(buf)


def read_copy(s: Qcow2State, guest_offset: int, length: int) -> bytes:
    """Guest bytes as they read now (copy-on-write sources)."""
    buf = bytearray(length)
    readinto(s, memoryview(buf), guest_offset)
    return bytes(buf)
