"""Backing chains: find the layer that owns a range, then read it from that layer alone.

Reading an unallocated range through `backing.readinto_at` recurses: each layer takes its
lock, translates the range into runs and hands the unallocated part down again, so a 4 KiB
read from the base of a 20-deep chain does the whole request machinery 20 times. Here the
layers that surely do not own the range are skipped with one table lookup each (an L1 entry
of 0, or an L2 entry of 0 with no subcluster bits: "unallocated, ask the backing file"), and
only the owning layer serves the read. Anything less plain (a zero cluster, a range that
spans clusters, a layer shorter than the range, a layer of another format) stops the walk
there, and that layer's own `readinto_at` handles it exactly as before.

Every table followed is validated as the read path validates it (`l2_table_offset`); an
entry of 0 needs no validation. Each lookup takes that layer's lock, as every use of its
state does.
"""

from __future__ import annotations

from ..image import Image
from .mapping import l2_slice, l2_table_offset
from .state import Qcow2State


def owning_layer(backing: Image, guest_offset: int, length: int) -> Image:
    """The first layer from `backing` down that may own [guest_offset, +length): the layers
    above it surely leave the whole range unallocated (read through to their backing file)."""
    layer = backing
    while True:
        s = getattr(layer, "_state", None)  # a QcowFile's; other formats stop the walk
        if type(s) is not Qcow2State:
            return layer
        nxt = s.backing
        if nxt is None or guest_offset + length > s.virtual_size or not _unallocated(s, guest_offset, length):
            return layer
        layer = nxt


def _unallocated(s: Qcow2State, guest_offset: int, length: int) -> bool:
    """Whether this layer surely leaves [guest_offset, +length), inside one cluster, unallocated."""
    gc = guest_offset >> s.cluster_bits
    if (guest_offset + length - 1) >> s.cluster_bits != gc:
        return False
    l1i, l2i = divmod(gc, s.l2_entries)
    with s.lock:
        if s.closed:
            return False  # its readinto_at raises what a closed image raises
        if l1i >= len(s.l1.entries) or not s.l1.entries[l1i]:
            return True
        entries, first = l2_slice(s, l2_table_offset(s, l1i), l2i)
        i = l2i - first
        if s.extended_l2:
            return not entries[2 * i] and not entries[2 * i + 1]
        return not entries[i]
