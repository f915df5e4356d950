"""Block status of one qcow2 layer (QEMU's qcow2_co_block_status), for qcowdisk.blockstatus.

One `LayerExtent` per run, by QEMU's (sub)cluster types: data (NORMAL) is allocated, data, with
its host offset; a zero cluster or subcluster is allocated and zero, with its host offset when
it has one (ZERO_ALLOC: a preallocated zero cluster, a zero subcluster of an allocated cluster),
without it otherwise (ZERO_PLAIN); a compressed cluster is allocated data without an offset;
an unallocated range is not allocated, with the host offset of its cluster when that is
allocated (UNALLOCATED_ALLOC, extended L2). The host file is the external data file (named as
stored in the header) when there is one.

Host holes (QEMU's BDRV_BLOCK_RECURSE into file-posix): when the image looks
metadata-preallocated (`metadata_preallocated`, detected once per open as QEMU does), the parts
of data runs that are holes in the file holding them read as zero and data, and from a hole
that reaches the end of that file (or from its end) to the end of the run, the same.
Everything here expects the caller to hold the image lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ..errors import QcowError
from ..hostio import host_extent
from ..image import LayerExtent
from .entries import REFT_OFFSET_MASK, TableCodec, decode_u64_table
from .mapping import NO_HOST, RUN_COMPRESSED, RUN_DATA, RUN_ZERO, get_host_runs
from .state import Qcow2State

SECTOR = 512


def layer_status(s: Qcow2State, guest_offset: int, length: int) -> list[LayerExtent]:
    """What this layer alone says about [guest_offset, +length) (inside the disk)."""
    path = s.header.data_file if s.has_data_file else s.filename
    out: list[LayerExtent] = []
    for run in get_host_runs(s, guest_offset, length):
        n, kind, host = run.length, run.kind, run.host
        if kind == RUN_DATA:
            if metadata_preallocated(s):
                out.extend(_split_by_host_holes(s, n, host, path))
            else:
                out.append(LayerExtent(n, True, False, True, host, False, path))
        elif kind == RUN_COMPRESSED:
            out.append(LayerExtent(n, True, False, True, None, True))
        elif host == NO_HOST:
            out.append(LayerExtent(n, kind == RUN_ZERO, kind == RUN_ZERO, False))
        else:
            out.append(LayerExtent(n, kind == RUN_ZERO, kind == RUN_ZERO, False, host, False, path))
    return out


def _split_by_host_holes(s: Qcow2State, length: int, host_offset: int, path: str | None) -> Iterator[LayerExtent]:
    """A data run split by the holes of the file holding it (holes read as zero, stay data)."""
    fd = s.data_host.fd
    try:
        total = -(-os.fstat(fd).st_size // SECTOR) * SECTOR
    except OSError:  # QEMU ignores a failed probe: plain data
        yield LayerExtent(length, True, False, True, host_offset, False, path)
        return
    p = 0
    while p < length:
        off = host_offset + p
        if off >= total:
            break
        k, is_data = host_extent(fd, off, min(length - p, total - off))
        if not is_data and off + k == total:
            break
        yield LayerExtent(k, True, not is_data, True, off, False, path)
        p += k
    if p < length:
        yield LayerExtent(length - p, True, True, True, host_offset + p, False, path)


def metadata_preallocated(s: Qcow2State) -> bool:
    """QEMU's qcow2_detect_metadata_preallocation, once per open: are clearly more clusters
    refcounted than the image file occupies on the host?

    With `real` = host bytes allocated (st_blocks * 512) // cluster size, true when at least
    max(real * 10 // 9, real + 2) clusters below the end of the file (its length rounded up to
    512, in whole clusters) have a nonzero refcount. Counts the refcounts of the image file
    itself (never an external data file); false when a refcount block cannot be read.
    """
    if s.metadata_preallocated is None:
        s.metadata_preallocated = _detect_metadata_preallocation(s)
    return s.metadata_preallocated


def _detect_metadata_preallocation(s: Qcow2State) -> bool:
    cs = s.cluster_size
    try:
        st = os.fstat(s.host.fd)
        real_clusters = st.st_blocks * SECTOR // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-(-(-st.st_size // SECTOR) * SECTOR) // cs)
        width = s.header.refcount_bits
        per_block = cs * 8 // width
        codec = TableCodec(width, cs)
        rc = s.refcounts  # read-write: counts may be cached and not yet written
        if rc is not None:
            reftable = rc.reftable
        else:
            h = s.header
            raw = s.host.pread(h.refcount_table_clusters * cs, h.refcount_table_offset)
            reftable = decode_u64_table(raw[:len(raw) // 8 * 8])
        count = 0
        for ri in range(min(len(reftable), -(-end_cluster // per_block))):
            block = reftable[ri] & REFT_OFFSET_MASK
            if not block:
                continue
            if block & (cs - 1):
                return False
            cached = rc.cache.peek(block) if rc is not None else None
            if cached is not None:
                entries = cached.entries
            else:
                data = s.host.pread(cs, block)
                entries = codec.decode(data + bytes(cs - len(data)))
            n = min(per_block, end_cluster - ri * per_block)
            count += n - entries[:n].count(0)
            if count >= threshold:
                return True
        return False
    except (OSError, ValueError, QcowError):
        return False
