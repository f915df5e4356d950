"""Metadata overlap checks: no guest data write may land on the image's own metadata.

`collect_metadata` records every host cluster holding metadata at a read-write open (header,
active and snapshot L1 tables, the L2 tables they name, the snapshot table, bitmap structures;
refcount.py adds the refcount table and blocks). Before guest data is written to a host cluster,
`check_not_metadata` makes sure it is none of those; if the image's tables say otherwise the
corrupt bit is set and the write refused with the metadata untouched (QEMU: "Preventing invalid
write on metadata"). The caller holds the image lock.
"""

from __future__ import annotations

import contextlib

from ..errors import CorruptImageError
from .entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK, decode_u64_table, nonzero_entries
from .format import EXT_BITMAPS, INCOMPAT_CORRUPT
from .ordering import switch_header
from .state import Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def collect_metadata(state: Qcow2State) -> None:
    """Fill `state.metadata` with the host clusters of the header, L1/L2 tables and snapshots."""
    cbits, cs = state.cluster_bits, state.cluster_size
    h = state.header
    meta = state.metadata
    if h.l1_size:
        first = h.l1_table_offset >> cbits
        meta.update(range(first, first + max(1, -(-h.l1_size * 8 // cs))))
    l1 = state.l1.entries
    meta.update((e & L1E_OFFSET_MASK) >> cbits for e in nonzero_entries(l1))
    meta.add(0)  # the header (and where an entry with only reserved bits set would point)
    if h.nb_snapshots:
        first = h.snapshots_offset >> cbits
        meta.update(range(first, first + max(1, -(-state.snapshot_table_length // cs))))
    for s in state.snapshots:
        if s.l1_size:
            first = s.l1_table_offset >> cbits
            meta.update(range(first, first + -(-s.l1_size * 8 // cs)))
            raw = state.host.pread(s.l1_size * 8, s.l1_table_offset)
            snap_l1 = decode_u64_table(raw[:len(raw) // 8 * 8])
            meta.update((e & L1E_OFFSET_MASK) >> cbits for e in nonzero_entries(snap_l1))
    for ext in h.extensions:
        if ext.ext_type == EXT_BITMAPS and len(ext.data) >= 24:
            size, off = int.from_bytes(ext.data[8:16], "big"), int.from_bytes(ext.data[16:24], "big")
            meta.update(range(off >> cbits, (off + size + cs - 1) >> cbits))


def check_not_metadata(state: Qcow2State, host_offset: int, length: int) -> None:
    """Refuse to write guest data over metadata; marks the image corrupt if it would."""
    if state.has_data_file:
        return
    cbits = state.cluster_bits
    meta = state.metadata
    first = host_offset >> cbits
    if first and first == (host_offset + length - 1) >> cbits and first not in meta:
        return  # one cluster, not metadata: the common data write
    for c in range(first, ((host_offset + length - 1) >> cbits) + 1):
        if c in meta or c == 0:
            mark_corrupt(state, f"Preventing invalid write on metadata: guest data write to host offset "
                                f"0x{c << cbits:x} overlaps {describe_metadata(state, c)}")


def describe_metadata(state: Qcow2State, host_cluster: int) -> str:
    """What the metadata in `host_cluster` is, for error messages."""
    h, cbits = state.header, state.cluster_bits
    off = host_cluster << cbits
    if host_cluster == 0:
        return "the header"
    if h.l1_table_offset <= off < h.l1_table_offset + max(h.l1_size * 8, 1):
        return "the active L1 table"
    rc = state.refcounts
    if rc is not None:
        if rc.reftable_offset <= off < rc.reftable_offset + rc.reftable_clusters * state.cluster_size:
            return "the refcount table"
        if any((e & REFT_OFFSET_MASK) == off for e in rc.reftable):
            return "a refcount block"
    if any((e & L1E_OFFSET_MASK) == off for e in state.l1.entries):
        return "an active L2 table"
    if h.nb_snapshots and h.snapshots_offset <= off < h.snapshots_offset + max(state.snapshot_table_length, 1):
        return "the snapshot table"
    return "snapshot or other metadata"


def mark_corrupt(state: Qcow2State, message: str) -> NoReturn:
    """Set the corrupt bit on disk, refuse further writes, raise CorruptImageError."""
    state.corrupt = True
    with contextlib.suppress(OSError):  # the refusal stands in memory; the error below says why
        switch_header(state, incompatible_features=state.header.incompatible_features | INCOMPAT_CORRUPT)
    raise CorruptImageError(f"{message}; image {state.filename!r} marked corrupt")
