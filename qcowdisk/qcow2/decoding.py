"""Reading compressed clusters: the payloads of a request in few preads, decoded in parallel.

QEMU splits a request into per-cluster tasks (up to 8 at once) and decodes each in its thread
pool, so `qemu-img bench -d 1` over a compressed image already decodes on every core. This does
the same for one request: its compressed clusters, in host order, are cut into one share per
decoder (the calling thread and a small shared pool; zlib and zstandard release the GIL); each
decoder reads its share's payloads with one `preadv` per host-contiguous stretch into its
thread's reused buffer (`qemu-img convert -c` packs them back to back) and decodes each whole
cluster straight into the caller's buffer. A request uses the pool only when no other is
decoding: concurrent requests already keep the cores busy. A cluster read only in part is
decoded once into the image's small cache (keyed by descriptor), since a sequence of small
reads comes back for the rest of it.

The mapping and the cache are used under the image lock (`plan_compressed`, `cache_clusters`);
reading and decoding (`CompressedWork.run`) need no lock, so concurrent requests decode at the
same time (the caller makes sure, see reading.py, that no payload it reads was freed meanwhile).
"""

from __future__ import annotations

import os
import threading

from ..errors import CorruptImageError
from ..hostio import HostFile
from ..record import Record
from .compress import decompress_into
from .mapping import compressed_location
from .state import COMPRESSED_CACHE_CLUSTERS, Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:  # (concurrent.futures, with logging, is imported with the first pool)
    from concurrent.futures import ThreadPoolExecutor

# One pread covers at most this many bytes of payloads (memory stays bounded per request).
MAX_BATCH_BYTES = 8 << 20
# Decoding threads shared by every image; never more than the machine's cores (QEMU's pool
# uses up to 64 threads; past the core count they only queue).
MAX_DECODERS = min(8, os.cpu_count() or 1)

# A thread's buffer for payloads, reused from request to request up to this size (a fresh
# buffer of a megabyte costs its page faults on every request).
REUSED_BUFFER_BYTES = 2 << 20

_pool: list[ThreadPoolExecutor] = []  # made on first use
_pool_lock = threading.Lock()
# Requests decoding right now, in every image (under _pool_lock). A request spreads over the
# pool only when it is alone: several at once already keep the cores busy, and handing half
# of each to the pool would only add thread switches.
_decoding = [0]
_local = threading.local()

# Its threads do not survive fork(): a child makes a new pool on first use.
os.register_at_fork(after_in_child=_pool.clear)


def _decoder_pool() -> ThreadPoolExecutor:
    with _pool_lock:
        if not _pool:
            from concurrent.futures import ThreadPoolExecutor
            _pool.append(ThreadPoolExecutor(MAX_DECODERS, thread_name_prefix="qcowdisk-decode"))
        return _pool[0]


class Piece(Record):
    """A compressed run of a request: `length` bytes at `pos` in the destination, from byte
    `inc` of the cluster that L2 entry `entry` describes (guest cluster `guest_cluster`)."""

    __slots__ = ("entry", "guest_cluster", "inc", "length", "pos")
    pos: int
    length: int
    inc: int
    entry: int
    guest_cluster: int

    def __init__(self, pos: int, length: int, inc: int, entry: int, guest_cluster: int) -> None:
        self.pos = pos
        self.length = length
        self.inc = inc
        self.entry = entry
        self.guest_cluster = guest_cluster


def read_compressed(s: Qcow2State, mv: memoryview, pieces: list[Piece]) -> None:
    """Fill the pieces of `mv` from their compressed clusters (the caller holds the lock throughout)."""
    work = plan_compressed(s, mv, pieces)
    if work is not None:
        cache_clusters(s, work.run())


class CompressedWork(Record):
    """The compressed clusters a request still has to read and decode once the cached ones
    are copied and every location is validated (`plan_compressed`, under the lock). `run`
    needs no lock: it reads only the image file and these validated values."""

    __slots__ = ("cluster_size", "compression_type", "host", "mv", "todo")
    host: HostFile
    compression_type: int
    cluster_size: int
    mv: memoryview
    todo: list[tuple[Piece, int, int]]  # (piece, host offset, payload bytes), validated

    def __init__(self, host: HostFile, compression_type: int, cluster_size: int, mv: memoryview,
                 todo: list[tuple[Piece, int, int]]) -> None:
        self.host = host
        self.compression_type = compression_type
        self.cluster_size = cluster_size
        self.mv = mv
        self.todo = todo

    def run(self) -> list[tuple[int, bytes]]:
        """Read and decode the payloads into `mv`; returns the clusters decoded aside (read
        only in part) as (descriptor, cluster bytes) for `cache_clusters`."""
        todo = sorted(self.todo, key=lambda t: t[1])  # host order: a share is one stretch
        with _pool_lock:
            _decoding[0] += 1
            alone = _decoding[0] == 1
        try:
            # One share of the payloads per decoder, each reading its own stretch of the file
            # and decoding it (the calling thread does the first): a few pool tasks per
            # request, not one per cluster, and the reads are parallel too.
            k = min(len(todo), MAX_DECODERS if alone else 1)
            step = -(-len(todo) // k)
            shares = [todo[i:i + step] for i in range(0, len(todo), step)]
            futures = [_decoder_pool().submit(self._read_and_decode, share) for share in shares[1:]]
            outcomes: list[Exception | tuple[list[tuple[int, CorruptImageError]], list[tuple[int, bytes]]]] = []
            try:
                outcomes.append(self._read_and_decode(shares[0]))
            except Exception as e:  # noqa: BLE001 - raised below, once every decoder is done
                outcomes.append(e)
            for f in futures:  # every decoder finishes before anything is raised or returned
                try:
                    outcomes.append(f.result())
                except Exception as e:  # noqa: BLE001 - as above
                    outcomes.append(e)
        finally:
            with _pool_lock:
                _decoding[0] -= 1
        failures: list[tuple[int, CorruptImageError]] = []
        aside: list[tuple[int, bytes]] = []
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
            failures += outcome[0]
            aside += outcome[1]
        if failures:
            raise min(failures, key=lambda pf: pf[0])[1]  # the first failure, in request order
        return aside

    def _read_and_decode(self, share: list[tuple[Piece, int, int]]
                         ) -> tuple[list[tuple[int, CorruptImageError]], list[tuple[int, bytes]]]:
        """Read a share's payloads (one pread per stretch, into this thread's buffer) and decode
        each cluster into `mv`, or aside when only a part is read (copying the part). Returns
        the failures as (position in the request, error) and the clusters decoded aside."""
        cs = self.cluster_size
        mv = self.mv
        ctype = self.compression_type
        failures: list[tuple[int, CorruptImageError]] = []
        aside: list[tuple[int, bytes]] = []
        batches = _batches(share)
        buf = _payload_buffer(sum(end - start for start, end, _ in batches))
        at = 0
        payloads: list[memoryview] = []
        for batch_start, batch_end, members in batches:
            raw = buf[at:at + batch_end - batch_start]
            at += len(raw)
            raw = raw[:self.host.preadv([raw], batch_start)]
            # A payload cut short by the end of the file decodes short: the decoder says so.
            payloads += [raw[off - batch_start:off - batch_start + n] for _, off, n in members]
        for i, (p, off, _) in enumerate(share):  # (the batches keep the share's order)
            in_place = p.inc == 0 and p.length == cs
            dest = mv[p.pos:p.pos + cs] if in_place else memoryview(bytearray(cs))
            try:
                decompress_into(payloads[i], dest, ctype, f"guest cluster {p.guest_cluster}, host offset 0x{off:x}")
            except CorruptImageError as e:
                failures.append((p.pos, e))
                continue
            if not in_place:  # decoded aside: copy the part, keep the cluster for the cache
                data = bytes(dest)
                mv[p.pos:p.pos + p.length] = memoryview(data)[p.inc:p.inc + p.length]
                aside.append((p.entry, data))
        return failures, aside


def _payload_buffer(length: int) -> memoryview:
    """`length` bytes of this thread's payload buffer (a new one past REUSED_BUFFER_BYTES).
    A request reads its payloads into it and decodes them before it returns, and the thread
    reads nothing else meanwhile."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) < length:
        buf = bytearray(length)
        if length <= REUSED_BUFFER_BYTES:
            _local.buf = buf
    return memoryview(buf)[:length]


def plan_compressed(s: Qcow2State, mv: memoryview, pieces: list[Piece]) -> CompressedWork | None:
    """Copy the pieces whose cluster is cached into `mv` and validate where the others lie;
    what is left to read and decode (None: nothing). The caller holds the lock."""
    cache = s.compressed_cache
    todo: list[tuple[Piece, int, int]] = []
    for p in pieces:
        data = cache.get(p.entry)
        if data is not None:
            cache.move_to_end(p.entry)
            mv[p.pos:p.pos + p.length] = memoryview(data)[p.inc:p.inc + p.length]
        else:
            off, n = compressed_location(s, p.entry, p.guest_cluster)
            todo.append((p, off, n))
    if not todo:
        return None
    return CompressedWork(s.host, s.header.compression_type, s.cluster_size, mv, todo)


def cache_clusters(s: Qcow2State, clusters: list[tuple[int, bytes]]) -> None:
    """Keep clusters decoded aside (descriptor, bytes) in the image's small cache, as read
    now: the caller holds the lock and knows no descriptor was freed since the decode."""
    cache = s.compressed_cache
    for entry, data in clusters:
        cache[entry] = data
        if len(cache) > COMPRESSED_CACHE_CLUSTERS:
            cache.popitem(last=False)


def _batches(todo: list[tuple[Piece, int, int]]) -> list[tuple[int, int, list[tuple[Piece, int, int]]]]:
    """Group payloads (sorted by host offset) whose host ranges touch or overlap into one read each."""
    out: list[tuple[int, int, list[tuple[Piece, int, int]]]] = []
    for item in todo:  # (in host order)
        _, off, n = item
        if out and off <= out[-1][1] and max(out[-1][1], off + n) - out[-1][0] <= MAX_BATCH_BYTES:
            start, end, members = out[-1]
            members.append(item)
            out[-1] = (start, max(end, off + n), members)
        else:
            out.append((off, off + n, [item]))
    return out
