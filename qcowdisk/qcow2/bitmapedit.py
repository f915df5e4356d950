"""Editing an image's persistent bitmaps: what `qemu-img bitmap --add / --remove / --clear /
--enable / --disable / --merge` does (QEMU 7.2, qemu-img.c img_bitmap and the QMP commands it
calls, block/monitor/bitmap-qmp-cmds.c).

A `BitmapEditor` loads the directory; each operation changes its list in memory, holding the
contents of the bitmaps it changes (QEMU holds every bitmap in memory the same way; sizes are
bounded by the disk's size, checked as qcow2-bitmap.c checks them); `commit` stores the result
with one directory switch (bitmaps.switch_directory: new tables and data for the changed
bitmaps, the others' tables kept, what was dropped freed after the switch). So a power cut
leaves the bitmaps as they were or as the operations left them. As qemu-img, operations that
succeeded before one that failed are stored too (`commit` is the caller's, in a `finally`).

Guest writes while bitmaps are open (`track_writes`; `QcowFile` starts it at every read-write
open of an image with bitmaps): QEMU 7.2's protocol (qcow2_load_dirty_bitmaps at open,
qcow2_store_persistent_dirty_bitmaps at close). Every consistent bitmap, enabled or not, is
marked in use on disk first (one directory switch), and the contents of the enabled ones are
loaded into memory; the writer calls `marker()`'s function for each write, which sets the bits
of the granules it touches in the enabled bitmaps; `commit` (at close) stores the bitmaps that
changed, the others' tables kept, with the marks cleared. A crash in between leaves them in
use: inconsistent, which QEMU and qcowdisk refuse to use, never stale and trusted. A bitmap
already in use at open (a crash of the program that had it open) is left so, as QEMU leaves it.
A bitmap added while tracking records writes from its commit on (then tracking starts again).

Refusals are QEMU's, with its messages (BitmapError): an unknown name ("Dirty bitmap 'x' not
found"), an inconsistent (in-use) bitmap for anything but --remove, bitmaps of different sizes
for --merge, and what `bitmaps.check_new` refuses for --add. Bitmaps of different granularity
merge as QEMU merges them: a destination bit is set when any byte of guest disk it covers is
dirty in the source.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

from ..errors import BitmapError
from ..hostio import Buffer
from ..record import Record
from .bitmaps import (
    NewBitmap,
    bitmap_bytes,
    check_new,
    encode_entry,
    load_directory,
    load_table,
    read_chunk,
    rechunk,
    store,
    switch_directory,
    used_clusters,
)
from .format import BME_FLAG_AUTO, BME_FLAG_IN_USE, Bitmap
from .state import Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypeVar

    from .file import QcowFile

    _T = TypeVar("_T")
Marker = Callable[[int, int], None]
"""Records a guest write of (offset, length) in the tracked bitmaps (`BitmapEditor.marker`)."""
_EMPTY: tuple[bytes, ...] = ()  # the contents of a new bitmap with every bit clear
_RUNS = re.compile(rb"\xff+|[^\x00\xff]")  # whole set bytes as runs, mixed bytes one at a time


class _Entry(Record):
    __slots__ = ("data", "disk", "flags", "granularity_bits", "name", "tracked")
    name: str
    flags: int
    granularity_bits: int
    disk: Bitmap | None           # its entry on disk (the table it has), None for a new bitmap
    data: bytearray | Iterable[Buffer] | None  # new contents (chunks, streamed by the
    # commit unless an operation needs them in memory); None: the table on disk stands
    tracked: bool          # marked in use on disk while guest writes may happen

    def __init__(self, name: str, flags: int, granularity_bits: int, disk: Bitmap | None,
                 data: bytearray | Iterable[Buffer] | None = None, tracked: bool = False) -> None:
        self.name = name
        self.flags = flags
        self.granularity_bits = granularity_bits
        self.disk = disk
        self.data = data
        self.tracked = tracked

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits


def default_granularity(cluster_size: int) -> int:
    """QEMU's bdrv_get_default_bitmap_granularity: the cluster size, within 4 KiB..64 KiB."""
    return min(65536, max(4096, cluster_size))


class BitmapEditor:
    """The persistent bitmaps of one image open for editing (`QcowFile.edit_bitmaps`); each
    method takes the image's lock. Nothing reaches the disk before `commit`."""

    def __init__(self, state: Qcow2State, check: Callable[[], None],
                 after_commit: Callable[[], None] = lambda: None,
                 on_marker: Callable[[Marker | None], None] = lambda marker: None) -> None:
        """Load the directory of `state`'s image; `check()` is called before every operation,
        `after_commit()` after a commit that stored something, `on_marker(marker)` whenever the
        function recording writes changes (`marker`)."""
        self._s = state
        self._check = check
        self._after_commit = after_commit
        self._on_marker = on_marker
        self.tracking = False
        """Whether guest writes are being recorded (`track_writes` until `commit`)."""
        self.reset()

    def reset(self) -> None:
        """Forget the operations not committed yet (the bitmaps as the image has them)."""
        def run() -> None:
            assert not self.tracking, "reset would lose the writes the marker recorded"
            self._entries = [_Entry(b.name, b.flags, b.granularity_bits, b) for b in load_directory(self._s)]
            self._dropped: list[Bitmap] = []
            self._changed = False
        self._locked(run)

    def _locked(self, op: Callable[[], _T], remark: bool = False) -> _T:
        """Run `op` under the image lock; `remark`: it may change which buffers the marker
        sets bits in (tell `on_marker` of the new one)."""
        with self._s.lock:
            self._check()
            try:
                return op()
            finally:
                if remark and self.tracking:
                    self._on_marker(self.marker())

    def _find(self, name: str) -> _Entry:
        for e in self._entries:
            if e.name == name:
                return e
        raise BitmapError(f"Dirty bitmap '{name}' not found")

    @staticmethod
    def _usable(e: _Entry) -> None:
        if e.flags & BME_FLAG_IN_USE:
            raise BitmapError(f"Bitmap '{e.name}' is inconsistent and cannot be used\n"
                              f"Try block-dirty-bitmap-remove to delete this bitmap from disk")

    def _contents(self, e: _Entry) -> bytearray:
        """The contents of `e` in memory (read from its table, or its chunks, on first use)."""
        if e.data is None:
            assert e.disk is not None
            table = load_table(self._s, e.disk)
            e.data = bytearray(b"".join(read_chunk(self._s, e.disk, table, i) for i in range(len(table))))
        elif not isinstance(e.data, bytearray):
            total = bitmap_bytes(self._s.virtual_size, e.granularity)
            e.data = bytearray(total) if e.data is _EMPTY else bytearray(b"".join(rechunk(e.data, total, total, e.name)))
        return e.data

    def _drop_disk(self, e: _Entry) -> None:
        """Its table on disk is replaced or gone: freed at the commit."""
        if e.disk is not None:
            self._dropped.append(e.disk)
            e.disk = None
        self._changed = True

    @property
    def pending(self) -> bool:
        """Whether operations are waiting for `commit`."""
        return self._changed

    # --- the operations ---------------------------------------------------------------------
    def names(self) -> list[str]:
        """The bitmaps' names as the directory will list them."""
        return [e.name for e in self._entries]

    def add(self, name: str, granularity: int | None = None, *, enabled: bool = True,
            data: Iterable[Buffer] | None = None) -> None:
        """--add [-g GRANULARITY]: a new bitmap (default granularity: QEMU's, from the cluster
        size), empty or with the contents `data` (as `NewBitmap.data`, read at the commit)."""
        def run() -> None:
            g = default_granularity(self._s.cluster_size) if granularity is None else granularity
            existing = [Bitmap(e.name, e.flags, e.granularity_bits, 0, 0) for e in self._entries]
            check_new(self._s, existing, [NewBitmap(name, g, enabled)])
            self._entries.append(_Entry(name, BME_FLAG_AUTO if enabled else 0, g.bit_length() - 1, None,
                                        _EMPTY if data is None else data))
            self._changed = True
        self._locked(run)

    def check(self, new: list[NewBitmap]) -> None:
        """Raise what `add` would raise for adding `new` (in that order), adding nothing."""
        def run() -> None:
            existing = [Bitmap(e.name, e.flags, e.granularity_bits, 0, 0) for e in self._entries]
            check_new(self._s, existing, new)
        self._locked(run)

    def track_writes(self) -> None:
        """Before guest writes: mark every consistent bitmap in use on disk (one directory
        switch), as QEMU does while it has an image open, so that a crash leaves them
        inconsistent rather than stale; load the enabled ones (tables and contents checked, as
        QEMU's load_bitmap checks them; the disabled ones' tables too). Each write must then be
        reported to the `marker()` function; `commit` stores the bitmaps
        with those bits set and the marks cleared."""
        def run() -> None:
            assert not self._changed and not self.tracking, "track_writes comes first"
            tracked = [e for e in self._entries if not e.flags & BME_FLAG_IN_USE]
            if not tracked:
                return  # no bitmap to keep true: writes need not be reported
            for e in tracked:
                assert e.disk is not None
                if e.flags & BME_FLAG_AUTO:
                    self._contents(e)
                else:
                    load_table(self._s, e.disk)
            for e in tracked:
                e.tracked = True
            self.tracking = True
            switch_directory(self._s, self._directory())
            self._on_marker(self.marker())
        self._locked(run)

    def marker(self) -> Marker | None:
        """The function recording a guest write of [offset, offset+length) in the enabled
        tracked bitmaps (None: there is none, writes need not be reported). Call it with the
        image lock held. It changes with every operation (`on_marker` hears of it)."""
        if not self.tracking:
            return None
        targets = [e for e in self._entries if e.tracked and e.flags & BME_FLAG_AUTO]
        if not targets:
            return None
        bits = [(e.granularity, self._contents(e)) for e in targets]
        fresh = [e for e in targets if e.disk is not None]  # stored again at the commit once written
        size = self._s.virtual_size

        def mark(offset: int, length: int) -> None:
            if fresh:
                for e in fresh:
                    self._drop_disk(e)
                fresh.clear()
            end = min(offset + length, size)
            for g, buf in bits:
                lo, hi = offset // g, -(-end // g)
                if hi - lo == 1:  # one granule: the common small write
                    buf[lo >> 3] |= 1 << (lo & 7)
                else:
                    _set_bits(buf, lo, hi)
        return mark

    def remove(self, name: str) -> None:
        """--remove (an inconsistent bitmap too)."""
        def run() -> None:
            e = self._find(name)
            if e.disk is not None:
                used_clusters(self._s, e.disk)  # a table QEMU could not free is refused here too
            self._drop_disk(e)
            self._entries.remove(e)
        self._locked(run, remark=True)

    def clear(self, name: str) -> None:
        """--clear: every bit clear."""
        def run() -> None:
            e = self._find(name)
            self._usable(e)
            self._drop_disk(e)
            e.data = bytearray(bitmap_bytes(self._s.virtual_size, e.granularity))
        self._locked(run, remark=True)

    def enable(self, name: str, enabled: bool = True) -> None:
        """--enable (or --disable with `enabled=False`): QEMU's auto flag."""
        def run() -> None:
            e = self._find(name)
            self._usable(e)
            flags = (e.flags | BME_FLAG_AUTO) if enabled else (e.flags & ~BME_FLAG_AUTO)
            self._changed = self._changed or flags != e.flags
            e.flags = flags
        self._locked(run, remark=True)

    def merge(self, name: str, source_name: str, source: QcowFile | None = None) -> None:
        """--merge SOURCE [-b SRC_FILE]: set in bitmap `name` every bit the bitmap `source_name`
        (of this image, or of `source`, an open image) has set."""
        def run() -> None:
            e = self._find(name)
            self._usable(e)
            if source is None:
                src = self._find(source_name)
                self._usable(src)
                granularity, src_size = src.granularity, self._s.virtual_size
                chunks: Iterable[bytes] = [bytes(self._contents(src))]
            else:
                found = next((b for b in source.bitmaps if b.name == source_name), None)
                if found is None:
                    raise BitmapError(f"Dirty bitmap '{source_name}' not found")
                if found.flags & BME_FLAG_IN_USE:
                    raise BitmapError(f"Bitmap '{source_name}' is inconsistent and cannot be used\n"
                                      f"Try block-dirty-bitmap-remove to delete this bitmap from disk")
                granularity, src_size = found.granularity, len(source)
                chunks = source.read_bitmap(source_name)
            if src_size != self._s.virtual_size:
                raise BitmapError(f"Bitmaps are of different sizes (destination size is {self._s.virtual_size}, "
                                  f"source size is {src_size}) and can't be merged")
            dst = self._contents(e)
            before = bytes(dst)
            _merge_into(dst, e.granularity, chunks, granularity, self._s.virtual_size)
            if dst != before:
                self._drop_disk(e)
        self._locked(run, remark=True)

    def commit(self) -> None:
        """Store the bitmaps as the operations left them (nothing when nothing changed), and
        end `track_writes` (its in-use marks cleared)."""
        def run() -> None:
            if not self._changed and not self.tracking:
                return
            s = self._s
            freed: list[int] = []
            for b in self._dropped:
                freed += used_clusters(s, b)
            for e in self._entries:
                if e.disk is None:
                    data = e.data
                    table_offset, table_size = store(s, e.name, e.granularity, [bytes(data)] if isinstance(
                        data, bytearray) else None if data is _EMPTY else data)
                    e.disk = Bitmap(e.name, e.flags, e.granularity_bits, table_offset, table_size)
                e.data = None  # (read again from the disk when needed)
                e.tracked = False
            self.tracking = False
            self._on_marker(None)
            switch_directory(s, self._directory(), freed)
            self._dropped.clear()
            self._changed = False
            self._after_commit()
        self._locked(run)

    def _directory(self) -> list[bytes]:
        """The directory entries (tracked bitmaps marked in use), every bitmap having a table."""
        out = []
        for e in self._entries:
            assert e.disk is not None
            flags = e.flags | BME_FLAG_IN_USE if e.tracked else e.flags
            out.append(encode_entry(e.name, flags, e.granularity_bits, e.disk.table_offset, e.disk.table_size))
        return out


def _set_runs(chunks: Iterable[bytes]) -> Iterator[tuple[int, int]]:
    """Runs [first, end) of set bits in serialized bitmap bytes given as chunks."""
    base = 0
    for chunk in chunks:
        for m in _RUNS.finditer(chunk):
            first = (base + m.start()) * 8
            if m.group()[0] == 0xFF:
                yield first, (base + m.end()) * 8
            else:
                byte = m.group()[0]
                for bit in range(8):
                    if byte >> bit & 1:
                        yield first + bit, first + bit + 1
        base += len(chunk)


def _merge_into(dst: bytearray, dst_granularity: int, chunks: Iterable[bytes], src_granularity: int,
                size: int) -> None:
    """OR the source bits into `dst`: each run of set source bits marks the guest bytes it covers
    (up to the disk's end), and every destination bit covering any of them is set."""
    bits = -(-size // dst_granularity)
    for first, end in _set_runs(chunks):
        lo = first * src_granularity // dst_granularity
        hi = min(bits, -(-min(end * src_granularity, size) // dst_granularity))
        _set_bits(dst, lo, hi)


def _set_bits(buf: bytearray, lo: int, hi: int) -> None:
    """Set bits [lo, hi) of serialized bitmap bytes (bit i in byte i // 8 at bit i % 8)."""
    while lo < hi and lo % 8:
        buf[lo // 8] |= 1 << (lo % 8)
        lo += 1
    whole = (hi - lo) // 8
    if whole > 0:
        buf[lo // 8:lo // 8 + whole] = b"\xff" * whole
        lo += whole * 8
    while lo < hi:
        buf[lo // 8] |= 1 << (lo % 8)
        lo += 1


__all__ = ["BitmapEditor", "Marker", "default_granularity"]
