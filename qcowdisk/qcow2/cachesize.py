"""The L2 cache's size and entry (slice) size, chosen as QEMU 7.2 chooses them.

QEMU's `l2-cache-size` and `l2-cache-entry-size` options (`read_cache_sizes` and
`qcow2_update_options_prepare` in block/qcow2.c):

- The cache never needs more than what maps the whole disk (`max_l2_cache`: one L2 entry per
  guest cluster, rounded up to a cluster); the default is that, capped at 32 MiB, and a larger
  setting is cut down to it.
- When the cache cannot map the whole disk and no entry size is given, entries are 4 KiB slices
  of an L2 table (the cluster size if smaller): a miss then reads and decodes 4 KiB, not a
  whole table.
- The entry size must be a power of two between 512 and the cluster size (QEMU's message).
- The cache holds at least 2 entries; more than INT_MAX entries is refused (QEMU's message).
- `cache-size` is shared: what `l2-cache-size` or `refcount-cache-size` leaves of it goes to
  the other; with neither given, the L2 cache gets what maps the whole disk if the refcount
  cache can keep its minimum of 4 clusters, else the refcount cache takes (up to) those.
  qcowdisk sizes its L2 cache so; its refcount blocks are not cached by size, so the refcount
  share is only checked as QEMU checks it (at most INT_MAX clusters).

Here slices serve the read path of read-only opens (`Qcow2State.l2_slices`); the write side,
check, amend and snapshots keep whole tables, with as many of them as the size allows.

A read-only open whose cache cannot map the whole disk admits a table (or slice) to the cache
on its second miss within the last `capacity` misses (`Qcow2State.l2_recent`); a first miss of
a small read reads just the one entry (mapping.plain_host). A working set larger than the
cache then costs an 8-byte read per request instead of loading, decoding and evicting a whole
table that is evicted again before its next use; what is used again soon is cached as before.
The cache never holds more than the size given, the window only keys.
"""

from __future__ import annotations

from ..formats import OpenOptionError

DEFAULT_L2_CACHE_MAX_SIZE = 32 << 20   # QEMU on Linux
MIN_L2_CACHE_ENTRIES = 2               # QEMU's MIN_L2_CACHE_SIZE
MIN_ENTRY_SIZE = 512                   # 1 << MIN_CLUSTER_BITS
_INT_MAX = (1 << 31) - 1


def whole_disk_l2_bytes(virtual_size: int, cluster_size: int, extended_l2: bool) -> int:
    """QEMU's `max_l2_cache`: the L2 bytes mapping the whole disk, rounded up to a cluster."""
    entry_bytes = 16 if extended_l2 else 8
    return -(-(-(-virtual_size // cluster_size) * entry_bytes) // cluster_size) * cluster_size


MIN_REFCOUNT_CACHE_CLUSTERS = 4        # QEMU's MIN_REFCOUNT_CACHE_SIZE


def l2_cache_geometry(virtual_size: int, cluster_size: int, extended_l2: bool, l2_cache_size: int | None,
                      l2_cache_entry_size: int | None, *, cache_size: int | None = None,
                      refcount_cache_size: int | None = None) -> tuple[int, int]:
    """(entries the cache holds, bytes per entry) for these options (`cache_size` and
    `refcount_cache_size` too: QEMU's `cache-size` and `refcount-cache-size`); ValueError with
    QEMU's message for a value QEMU refuses."""
    for name, value in (("l2_cache_size", l2_cache_size), ("l2_cache_entry_size", l2_cache_entry_size),
                        ("cache_size", cache_size), ("refcount_cache_size", refcount_cache_size)):
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"{name} must be a non-negative integer number of bytes, not {value!r}")
    max_l2_cache = whole_disk_l2_bytes(virtual_size, cluster_size, extended_l2)
    size = min(max_l2_cache, DEFAULT_L2_CACHE_MAX_SIZE if l2_cache_size is None else l2_cache_size)
    refcount = refcount_cache_size or 0
    if cache_size is not None:
        size, refcount = _split_cache(cache_size, size, l2_cache_size, refcount_cache_size,
                                      max_l2_cache, MIN_REFCOUNT_CACHE_CLUSTERS * cluster_size)
    entry_size = cluster_size if l2_cache_entry_size is None else l2_cache_entry_size
    if size < max_l2_cache and l2_cache_entry_size is None:
        entry_size = min(cluster_size, 4096)
    if not MIN_ENTRY_SIZE <= entry_size <= cluster_size or entry_size & (entry_size - 1):
        raise OpenOptionError(f"L2 cache entry size must be a power of two between {MIN_ENTRY_SIZE} and the cluster "
                         f"size ({cluster_size})")
    entries = max(MIN_L2_CACHE_ENTRIES, size // entry_size)
    if entries > _INT_MAX:
        raise OpenOptionError("L2 cache size too big")
    if refcount // cluster_size > _INT_MAX:
        raise OpenOptionError("Refcount cache size too big")
    return entries, entry_size


def _split_cache(combined: int, l2: int, l2_given: int | None, refcount_given: int | None, max_l2_cache: int,
                 min_refcount: int) -> tuple[int, int]:
    """read_cache_sizes with `cache-size`: (L2 bytes, refcount bytes). (Its refusals of
    conflicting values do not depend on the image: the option parser makes them.)"""
    if l2_given is not None and refcount_given is not None:
        raise OpenOptionError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
    if l2_given is not None and l2_given > combined:
        raise OpenOptionError("l2-cache-size may not exceed cache-size")
    if refcount_given is not None and refcount_given > combined:
        raise OpenOptionError("refcount-cache-size may not exceed cache-size")
    if l2_given is not None:
        return l2, combined - l2
    if refcount_given is not None:
        return combined - refcount_given, refcount_given  # (QEMU does not cap this share)
    if combined >= max_l2_cache + min_refcount:
        return max_l2_cache, combined - max_l2_cache
    refcount = min(combined, min_refcount)
    return combined - refcount, refcount
