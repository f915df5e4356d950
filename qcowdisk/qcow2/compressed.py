"""Compressed writes: whole guest clusters compressed and packed into shared host clusters.

What QEMU 7.2 does (`qcow2_co_pwritev_compressed_part` / `_task`,
`qcow2_alloc_compressed_cluster_offset`, `qcow2_alloc_bytes`), and where this differs:

- A request covers whole clusters at a cluster-aligned offset; only a request that ends at the
  end of the disk may end inside a cluster, and that last cluster is padded with zeros before
  it is compressed. Anything else raises ValueError (QEMU: EINVAL).
- Each cluster is compressed with the image's compression_type at QEMU's level (zlib: raw
  deflate, level 6, window 2^12; zstd: level 3, one frame). A cluster whose payload is not
  smaller than a cluster (QEMU's output buffer is `cluster_size - 1` bytes) is written by the
  ordinary write path instead, as QEMU does.
- Payloads are placed by the allocator's byte allocator (`Refcounts.alloc_bytes`): packed
  byte-contiguously, +1 refcount on every host cluster a payload touches. The file ends where
  the last payload ends (QEMU does not pad it either).
- Over an allocated cluster QEMU refuses (EIO). Here the cluster is replaced: the new payload
  is written, its refcounts raised, then the L2 entry switched, and the old cluster's
  references (a data cluster, a preallocated zero cluster, or the host clusters of an old
  payload) go to the deferred-free queue, so they are dropped only once the L2 entry that no
  longer names them is on disk. Since every replacement allocates new bytes, a write that
  leaves many frees queued flushes by itself (ordering.release_frees_if_piling, shared with
  ordinary writes and discards): rewriting clusters without ever calling flush() does not grow
  the file without bound.
- Extended L2: a compressed entry's subcluster bitmap is 0, as QEMU writes it.
- Images with an external data file are refused, as QEMU refuses them (ENOTSUP): compressed
  clusters cannot live in a raw-mapped data file.

Ordering is declared in ordering.py, not placed here: the L2 cache depends on guest data (the
image file is synced) and on the refcount cache, so an L2 table holding a new descriptor reaches
the disk only after the payload and its counts. Here the only rule is to write every payload
before its entry changes in memory.

Compression runs without the image lock (zlib and zstandard release the GIL);
`compress_clusters` takes no state. Everything else here expects the caller to hold the lock.
"""

from __future__ import annotations

import errno

from ..errors import UnsupportedFeatureError
from ..hostio import Buffer
from ..record import FrozenRecord
from .compress import compress_cluster
from .entries import OFLAG_COMPRESSED
from .mapping import compressed_location, data_offset
from .ordering import release_frees_if_piling
from .overlap import check_not_metadata
from .refcount import Refcounts
from .state import Qcow2State
from .writing import free_entry, l2_for_write, write

# A request is compressed and written in pieces of this many bytes (at least one cluster), so
# the lock is never held across compressing a large request, and its payloads are never all in
# memory at once.
CHUNK_BYTES = 4 << 20


def check_request(s: Qcow2State, guest_offset: int, length: int) -> None:
    """Refuse what QEMU refuses (bounds already checked): an external data file, a request
    that does not cover whole clusters from a cluster boundary, unless it ends at the disk's end."""
    if s.has_data_file:
        raise UnsupportedFeatureError(
            f"image {s.filename!r} has an external data file: compressed writes are not supported "
            f"with external data files (QEMU refuses them too)")
    if length == 0:
        return
    if guest_offset & s.cluster_mask:
        raise ValueError(
            f"compressed write at offset {guest_offset}: the offset must be a multiple of the cluster size "
            f"{s.cluster_size}")
    if length & s.cluster_mask and guest_offset + length != s.virtual_size:
        raise ValueError(
            f"compressed write of {length} bytes at offset {guest_offset}: the length must be a multiple of the "
            f"cluster size {s.cluster_size}, unless the write ends at the end of the disk ({s.virtual_size})")


def compress_clusters(mv: memoryview, cluster_size: int, compression_type: int) -> list[bytes | None]:
    """The payload of each cluster of `mv` (the last may be short: zero-padded), or None for a
    cluster that compression does not make smaller. Needs no lock."""
    out: list[bytes | None] = []
    for pos in range(0, len(mv), cluster_size):
        piece: Buffer = mv[pos:pos + cluster_size]
        if len(piece) < cluster_size:
            piece = bytes(piece) + bytes(cluster_size - len(piece))
        payload = compress_cluster(piece, compression_type)
        out.append(payload if len(payload) < cluster_size else None)
    return out


class CompressedClusters(FrozenRecord):
    """Whole clusters of guest data compressed for one write (`QcowFile.compress_clusters`),
    waiting to be written by `QcowFile.write_compressed_clusters`."""

    __slots__ = ("cluster_size", "compression_type", "data", "offset", "payloads")
    offset: int  # guest offset of the first cluster
    data: memoryview  # the clusters' data (for those stored uncompressed)
    payloads: list[bytes | None]  # cluster i compressed, or None: stored uncompressed
    cluster_size: int
    compression_type: int

    def __init__(self, offset: int, data: memoryview, payloads: list[bytes | None], cluster_size: int,
                 compression_type: int) -> None:
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "payloads", payloads)
        object.__setattr__(self, "cluster_size", cluster_size)
        object.__setattr__(self, "compression_type", compression_type)


def check_prepared(s: Qcow2State, clusters: CompressedClusters) -> None:
    """Refuse clusters compressed for another image shape (cluster size, compression type)."""
    n = len(clusters.data)
    if (clusters.cluster_size != s.cluster_size or clusters.compression_type != s.header.compression_type
            or len(clusters.payloads) != -(-n // s.cluster_size)
            or any(p is not None and len(p) >= s.cluster_size for p in clusters.payloads)):
        raise ValueError(f"compressed clusters at offset {clusters.offset} were not prepared for image "
                         f"{s.filename!r} (cluster size {s.cluster_size}, compression type "
                         f"{s.header.compression_type})")
    check_request(s, clusters.offset, n)


def _refcounts(s: Qcow2State) -> Refcounts:
    rc = s.refcounts
    assert rc is not None, "compressed write on an image opened read-only"
    return rc


def write_compressed(s: Qcow2State, guest_offset: int, mv: memoryview, payloads: list[bytes | None]) -> None:
    """Write the clusters of `mv` at `guest_offset` (checked by `check_request`), `payloads[i]`
    being cluster i compressed (None: stored uncompressed)."""
    cbits = s.cluster_bits
    first = guest_offset >> cbits
    i = 0
    while i < len(payloads):
        # one L2 table at a time
        l1i = (first + i) // s.l2_entries
        end = min(len(payloads), (l1i + 1) * s.l2_entries - first)
        # Incompressible clusters first, by the ordinary write path (runs of them at once).
        j = i
        while j < end:
            if payloads[j] is not None:
                j += 1
                continue
            k = j
            while k < end and payloads[k] is None:
                k += 1
            write(s, (first + j) << cbits, mv[j << cbits:min(len(mv), k << cbits)])
            j = k
        todo = [(first + k, payload) for k, payload in enumerate(payloads[i:end], i) if payload is not None]
        if todo:
            _write_in_table(s, l1i, todo)
        i = end
    release_frees_if_piling(s)  # replacements allocate anew every time: keep the file bounded


def _write_in_table(s: Qcow2State, l1_index: int, todo: list[tuple[int, bytes]]) -> None:
    """Compressed clusters [(guest_cluster, payload)] that all lie in one L2 table."""
    rc = _refcounts(s)
    table = l2_for_write(s, l1_index)
    entries = table.entries
    step = 2 if s.extended_l2 else 1
    # Validate what is replaced before anything is allocated: a corrupt entry must not make us
    # drop a reference it never held.
    for gc, _ in todo:
        old = entries[step * (gc % s.l2_entries)]
        if old & OFLAG_COMPRESSED:
            compressed_location(s, old, gc)
        else:
            data_offset(s, old, gc)
    # Allocate (refcounts raised in the cache) and write every payload, one pwritev per
    # host-contiguous run; only then do the entries change.
    placed: list[tuple[int, int, int]] = []  # (guest_cluster, host_offset, length)
    run: list[Buffer] = []
    run_start = run_end = -1
    for gc, payload in todo:
        host_offset = rc.alloc_bytes(len(payload))
        if host_offset + len(payload) - 1 > s.descriptor.offset_mask:
            raise OSError(errno.EFBIG, f"compressed cluster at host offset 0x{host_offset:x} lies beyond what a "
                                       f"compressed descriptor can address (0x{s.descriptor.offset_mask:x})")
        check_not_metadata(s, host_offset, len(payload))
        if run and host_offset == run_end:
            run.append(payload)
            run_end += len(payload)
        else:
            if run:
                _write_run(s, run, run_start, run_end)
            run, run_start, run_end = [payload], host_offset, host_offset + len(payload)
        placed.append((gc, host_offset, len(payload)))
    if run:
        _write_run(s, run, run_start, run_end)
    for gc, host_offset, length in placed:
        l2i = gc % s.l2_entries
        new_e = s.descriptor.encode(host_offset, length)
        old = entries[step * l2i]
        entries[step * l2i] = new_e
        if step == 2:
            entries[2 * l2i + 1] = 0  # compressed clusters have no subcluster bitmap
        table.mark(step * l2i, step * l2i + step)
        s.compressed_cache.pop(new_e, None)  # a freed payload's descriptor may come back
        free_entry(s, old, 0)


def _write_run(s: Qcow2State, bufs: list[Buffer], host_start: int, host_end: int) -> None:
    s.host.pwritev(bufs, host_start)
    s.grow_alloc_limit(host_end)
