"""Persistent bitmaps across a resize: what `qemu-img resize` does to them (QEMU 7.2: the bitmaps
are truncated or grown with the disk, bits past the new end dropped, the grown area clean, and
stored again at close), made part of the resize's size switch.

`prepare` (before anything is written) refuses what QEMU refuses: an inconsistent (in-use)
bitmap, with qcow2_truncate_bitmaps_check's message, and a bitmap that would outgrow QEMU's
limits at the new size. `store` writes each bitmap's new contents, table and the new directory
to new clusters and syncs them (bitmaps.write_directory); the caller's size switch then sets the
new size and the bitmaps extension naming the new directory in the same header write, so a power
cut leaves the old size with the old bitmaps or the new size with the new ones. The old tables,
data and directory are freed after the switch (`bitmaps.free_after_switch`).
The caller holds the image lock.
"""

from __future__ import annotations

from ..errors import BitmapError, ResizeError
from ..record import Record
from . import bitmaps
from .format import BME_FLAG_IN_USE, Bitmap, Header
from .state import Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Plan(Record):
    """The bitmaps of an image about to be resized, with their contents at the new size."""

    __slots__ = ("contents", "freed", "new_size", "old_header")
    new_size: int
    contents: list[tuple[Bitmap, bytes]]
    freed: list[int]
    old_header: Header | None

    def __init__(self, new_size: int, contents: list[tuple[Bitmap, bytes]], freed: list[int] | None = None,
                 old_header: Header | None = None) -> None:
        self.new_size = new_size
        self.contents = contents
        self.freed = [] if freed is None else freed
        self.old_header = old_header


def prepare(s: Qcow2State, new_size: int) -> Plan | None:
    """Read and check the bitmaps (None: the image has none); writes nothing."""
    directory = bitmaps.load_directory(s)
    if not directory:
        return None
    for bm in directory:
        if bm.flags & BME_FLAG_IN_USE:
            raise ResizeError(f"Bitmap '{bm.name}' is inconsistent and cannot be used\n"
                              f"Try block-dirty-bitmap-remove to delete this bitmap from disk")
    plan = Plan(new_size, [])
    for bm in directory:
        length = bitmaps.bitmap_bytes(new_size, bm.granularity)
        if length > bitmaps.BME_MAX_PHYS_SIZE or -(-length // s.cluster_size) > 1 << 30:
            raise ResizeError(f"Can't resize bitmap '{bm.name}': too much space would be occupied by the bitmap "
                              f"at {new_size} bytes. Use larger granularity")
        table = bitmaps.load_table(s, bm)
        old = b"".join(bitmaps.read_chunk(s, bm, table, i) for i in range(len(table)))
        # bits past the new end are dropped (store clears those of the last byte), the grown area clean
        plan.contents.append((bm, old[:length] + bytes(max(0, length - len(old)))))
        plan.freed += bitmaps.used_clusters(s, bm)
    return plan


def store(s: Qcow2State, plan: Plan) -> dict[str, Any]:
    """Write the resized bitmaps and their directory, synced; the header fields the size switch
    must also set."""
    entries = []
    for bm, data in plan.contents:
        try:
            offset, size = bitmaps.store(s, bm.name, bm.granularity, [data], plan.new_size)
        except ValueError as e:  # (the contents were cut to the right length above)
            raise BitmapError(str(e)) from e
        entries.append(bitmaps.encode_entry(bm.name, bm.flags, bm.granularity_bits, offset, size))
    plan.old_header = s.header
    return bitmaps.write_directory(s, entries)


def release(s: Qcow2State, plan: Plan) -> None:
    """After the size switch: free the old tables, data and directory."""
    assert plan.old_header is not None
    bitmaps.free_after_switch(s, plan.old_header, plan.freed)


__all__ = ["Plan", "prepare", "store", "release"]
