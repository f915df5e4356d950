"""Backing chains: find the layer that owns a range, then read it from that layer alone.

Reading an unallocated range through `backing.readinto_at` recurses: each layer takes its
lock, translates the range into runs and hands the unallocated part down again, so a 4 KiB
read from the base of a 20-deep chain does the whole request machinery 20 times. Here the
layers that surely do not own the range are skipped with one table lookup per cluster (an L1
entry of 0, or an L2 entry of 0 with no subcluster bits: "unallocated, ask the backing file"), and
only the owning layer serves the read. Anything less plain (a zero cluster, a range of which
the layer maps some cluster, a layer shorter than the range, a layer of another format) stops
the walk there, and that layer's own `readinto_at` handles it exactly as before.

Every table followed is validated as the read path validates it (`l2_table_offset`); an
entry of 0 needs no validation. Each lookup takes that layer's lock, as every use of its
state does.

The chain map (`chain_lookup`) goes further for the small reads of `QcowFile`'s fast path:
for each granule of the guest disk (the smallest cluster of the qcow2 layers) it remembers
which lower layer owns it and where its bytes lie in that layer's file, so a repeated 4 KiB read
from the base of a 20-deep chain is one dict lookup and one pread, not 20 layers' lookups.
It is filled lazily, one granule per first read, and it is valid as long as no layer's mapping
changes:
- the top image owns the map through its fast-path tuple, which every write-side method of the
  top (writes, discards, zeroing, commit into it, `set_backing_file`) throws away first, map
  and all;
- the layers below are read-only (backing files are opened read-only), so only closing one
  ends what they say; each entry keeps the owner's fast-path tuple, which closing replaces, and
  the reader checks it after the pread as it checks the top's;
- a map entry is made only for the plain case: every layer above the owner leaves the whole
  granule unallocated (entry 0, no subcluster bits), the owner maps all of it as plain data in
  its own file, and the granule lies inside every layer's virtual size. Anything else is recorded
  as None (take the checked path) and served as before.
"""

from __future__ import annotations

from ..errors import QcowError
from .mapping import l2_slice, l2_table_offset, plain_host
from .state import Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ..image import Image

    # A map entry: (host offset - guest offset, owning QcowFile, its fast-path tuple when looked up).
    ChainHit = tuple[int, Any, Any]

_WALK_CLUSTERS = 32  # clusters of one request that owning_layer looks at in each layer
CHAIN_MAP_LIMIT = 1 << 16  # granules remembered; the map starts afresh past this (bounded memory)

_UNSEEN: Any = object()


class ChainMap(dict[int, "ChainHit | None"]):
    """Granule index -> map entry (None: the checked path), for granules of 2**gbits bytes."""

    __slots__ = ("gbits",)

    def __init__(self, gbits: int) -> None:
        """An empty map of granules of 2**gbits bytes."""
        super().__init__()
        self.gbits = gbits


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
    """Whether this layer surely leaves every cluster of [guest_offset, +length) unallocated
    (False for more than _WALK_CLUSTERS clusters: its own run translation is cheaper then)."""
    first_gc = guest_offset >> s.cluster_bits
    last_gc = (guest_offset + length - 1) >> s.cluster_bits
    if last_gc - first_gc >= _WALK_CLUSTERS:
        return False
    with s.lock:
        if s.closed:
            return False  # its readinto_at raises what a closed image raises
        for gc in range(first_gc, last_gc + 1):
            l1i, l2i = divmod(gc, s.l2_entries)
            if l1i >= len(s.l1.entries) or not s.l1.entries[l1i]:
                continue
            entries, first = l2_slice(s, l2_table_offset(s, l1i), l2i)
            i = l2i - first
            if (entries[2 * i] or entries[2 * i + 1]) if s.extended_l2 else entries[i]:
                return False
        return True


def new_map(s: Qcow2State) -> ChainMap | None:
    """An empty chain map for the image of `s`, its granule the smallest cluster among the qcow2
    layers from it down; None when it has no backing image."""
    if s.backing is None:
        return None
    bits = s.cluster_bits
    layer: Image | None = s.backing
    while layer is not None:
        ls = getattr(layer, "_state", None)
        if type(ls) is not Qcow2State:
            break
        bits = min(bits, ls.cluster_bits)
        layer = ls.backing
    return ChainMap(bits)


def chain_lookup(cmap: ChainMap, top: Qcow2State, offset: int, length: int) -> ChainHit | None:
    """The map entry for a read of [offset, +length) from the top image of state `top`, looked
    up (under each layer's lock) on the granule's first read; None when the read is not inside
    one granule or the granule takes the checked path. The caller checks after reading that the
    top's and the owner's fast-path tuples are the ones the entry was made with."""
    gbits = cmap.gbits
    if (offset & ((1 << gbits) - 1)) + length > 1 << gbits:
        return None
    key = offset >> gbits
    hit = cmap.get(key, _UNSEEN)
    if hit is _UNSEEN:
        hit = _resolve(top, key << gbits, 1 << gbits)
        if len(cmap) >= CHAIN_MAP_LIMIT:
            cmap.clear()
        cmap[key] = hit
    return hit  # type: ignore[no-any-return]


def _resolve(top: Qcow2State, goff: int, gsize: int) -> ChainHit | None:
    """The map entry for granule [goff, +gsize) (see the module docstring), or None."""
    s = top
    layer: Any = None
    try:
        while True:
            if goff + gsize > s.virtual_size:
                return None
            with s.lock:
                if s.closed:
                    return None
                host = plain_host(s, goff)
            if host is None or (host >= 0 and s.has_data_file):  # (the owner's fast path reads the image file)
                return None
            if host >= 0:
                ofast = None if layer is None else layer._fast
                return None if ofast is None else (host - goff, layer, ofast)
            nxt = s.backing
            ns = getattr(nxt, "_state", None)
            if type(ns) is not Qcow2State or not ns.readonly:
                return None
            layer, s = nxt, ns
    except QcowError:
        return None  # the checked path raises it again, as it always has
