"""Zeroing as QEMU's write_zeroes with BDRV_REQ_MAY_UNMAP leaves it (qcow2_subcluster_zeroize,
zero_in_l2_slice): what `qemu-img convert -n` does to an existing target's zero ranges.

Every whole cluster of the range becomes a zero cluster whatever it was before: the zero flag
(extended L2: no host offset and an all-zeroes subcluster bitmap), its host cluster or
compressed payload freed. Unallocated clusters get the flag too, with an L2 table allocated
for them if they had none, so `qemu-img map` shows the range as zeros present in this layer
("present": true, "zero": true), as QEMU's does. In a partial cluster at an edge, with extended
L2, whole subclusters get their zero bits (the host cluster stays, as QEMU leaves it); the rest
is zeroed by the ordinary path (writing.zero).

`writing.zero` differs on purpose where no backing file shows through: it deallocates (the
cheapest way to read zeros), which is what a guest's write_zeroes without a backing file needs.

Where the zero flag cannot be used (a version 2 image, an external data file whose raw view
must read zeros), this is `writing.zero`. Expects the image lock held.
"""

from __future__ import annotations

from .entries import (
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
    SUBCLUSTER_ALL,
    bitmap_allocated,
    bitmap_zero,
    make_bitmap,
    subcluster_range_mask,
)
from .mapping import compressed_location, data_offset
from .state import Qcow2State
from .writing import free_entry, l2_for_write, zero


def zeroize(s: Qcow2State, guest_offset: int, length: int) -> None:
    """Make [guest_offset, +length) read as zeros with zero clusters, as QEMU's MAY_UNMAP zeroing."""
    if s.v2 or s.has_data_file:
        zero(s, guest_offset, length, False)
        return
    cs = s.cluster_size
    end = guest_offset + length
    first = -(-guest_offset // cs) * cs
    # the disk's last, partial cluster counts as whole when the range runs to the end
    last = end if end == s.virtual_size else end // cs * cs
    if first >= last:
        _partial(s, guest_offset, end)
        return
    _partial(s, guest_offset, first)
    _partial(s, last, end)
    step = 2 if s.extended_l2 else 1
    gc, gc_end = first // cs, -(-last // cs)
    while gc < gc_end:
        l1i = gc // s.l2_entries
        chunk_end = min(gc_end, (l1i + 1) * s.l2_entries)
        table = l2_for_write(s, l1i)
        entries = table.entries
        for c in range(gc, chunk_end):
            i = step * (c % s.l2_entries)
            old = entries[i]
            if step == 1:
                if old == OFLAG_ZERO:
                    continue
                _check_entry(s, old, c)
                entries[i] = OFLAG_ZERO
            else:
                bitmap = make_bitmap(0, SUBCLUSTER_ALL)
                if old == 0 and entries[i + 1] == bitmap:
                    continue
                _check_entry(s, old, c)
                entries[i], entries[i + 1] = 0, bitmap
            table.mark(i, i + step)
            free_entry(s, old, 0)
        gc = chunk_end


def _partial(s: Qcow2State, start: int, end: int) -> None:
    """Zero [start, end) inside one cluster: with extended L2, whole subclusters get their
    zero bits and lose their allocation bits (QEMU's zero_l2_subclusters: the host cluster
    stays); the rest, and a compressed cluster, by the ordinary path."""
    g = 1 << s.subcluster_bits
    a, b = -(-start // g) * g, end // g * g
    if not s.extended_l2 or a >= b:
        zero(s, start, end - start, False)
        return
    gc = a >> s.cluster_bits
    table = l2_for_write(s, gc // s.l2_entries)
    i = 2 * (gc % s.l2_entries)
    old = table.entries[i]
    if old & OFLAG_COMPRESSED:
        zero(s, start, end - start, False)
        return
    _check_entry(s, old, gc)
    base = gc << s.cluster_bits
    mask = subcluster_range_mask((a - base) // g, (b - base) // g)
    bitmap = table.entries[i + 1]
    table.entries[i + 1] = make_bitmap(bitmap_allocated(bitmap) & ~mask, bitmap_zero(bitmap) | mask)
    table.mark(i, i + 2)
    zero(s, start, a - start, False)
    zero(s, b, end - b, False)


def _check_entry(s: Qcow2State, e: int, gc: int) -> None:
    """Validate an entry before its references are dropped (a corrupt one raises)."""
    if e & OFLAG_COMPRESSED:
        compressed_location(s, e, gc)
    else:
        data_offset(s, e, gc)


__all__ = ["zeroize"]
