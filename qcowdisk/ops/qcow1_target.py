"""Writing guest data into a qcow (v1) image: what `qcowdisk.commit` needs of a qcow base.

QEMU's qcow driver (block/qcow.c, 7.2) writes in place into allocated clusters and appends new
ones at the end of the file (rounded up to the cluster size), new L2 tables too; a compressed
cluster that is written to is decompressed into a new cluster first. It has no write_zeroes:
the block layer writes a buffer of zeros instead, so zeros become allocated clusters of zeros.
The image cannot be resized. This module does the same, in runs: each `write_at` appends all
the clusters it needs in one pwritev, then points the L2 entries at them.

Order (qcow v1 has no refcounts, so a cut can at worst leave unreferenced clusters at the end
of the file): a new L2 table is written zeroed and synced before the L1 entry names it; new data
clusters are written and synced before the L2 entries name them (QEMU writes the L1 entry
first). A partly written new cluster is completed with what the guest read there before (the
image's own backing file, zeros, or the decompressed cluster), read through a read-only open
of the image that is never asked about a cluster this writer has changed.
"""

from __future__ import annotations

import threading
from array import array

from .. import formats
from ..errors import CorruptImageError
from ..hostio import ZERO_BLOCK_LENGTH, HostFactory, zero_block
from ..locking import ImageLock, lock_image
from ..qcow1 import COMPRESSED_FLAG, HEADER_LENGTH, parse_header
from ..qcow2.entries import TableCodec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..hostio import Buffer
    from ..image import Image

L2_TABLES_KEPT = 16  # L2 tables kept in memory (a commit walks the disk in order)


class Qcow1Target:
    """A qcow v1 image opened for writing under QEMU's write lock (see the module docstring)."""

    def __init__(self, path: str, host_factory: HostFactory) -> None:
        """Open `path` read-write, lock it, read its header and L1 table."""
        self.path = path
        self._write_lock = threading.Lock()
        self.host = host_factory(path, True)
        self._lock: ImageLock | None = None
        self._reader: Image | None = None
        try:
            self._lock = lock_image(self.host.fd, path, write=True)
            file_size = self.host.size()
            header = parse_header(self.host.pread(HEADER_LENGTH, 0), file_size, path)
            self.virtual_size = header.size
            self.cluster_size = header.cluster_size
            self.l2_count = 1 << header.l2_bits
            self.l1_table_offset = header.l1_table_offset
            self.l1 = TableCodec(64, header.l1_size * 8).decode(self.host.pread(header.l1_size * 8,
                                                                               header.l1_table_offset))
            self.file_end = -(-file_size // self.cluster_size) * self.cluster_size
            self.known_end = file_size  # offsets named by the image must lie below it
            self.l2: dict[int, array[int]] = {}
            self._reader = formats.open_image(path, "qcow", formats.OpenOptions(
                readonly=True, force_share=True, host_factory=host_factory))
        except BaseException:
            self.close()
            raise

    def resize(self, new_size: int) -> None:
        """qcow images cannot be resized (the caller refuses before writing anything)."""
        raise CorruptImageError(f"{self.path}: qcow images cannot be resized (to {new_size})")

    def _check_offset(self, offset: int, what: str) -> None:
        if offset % self.cluster_size or offset + self.cluster_size > self.known_end:
            raise CorruptImageError(f"{self.path}: {what} offset {offset:#x} is unaligned or past the end of the "
                                    f"file (cluster size {self.cluster_size}, file size {self.known_end})")

    def _table(self, l1_index: int) -> array[int]:
        """The L2 table of `l1_index`, made (zeroed, synced, then named by L1) if it has none."""
        table = self.l2.get(l1_index)
        if table is not None:
            return table
        l2_offset = self.l1[l1_index]
        l2_bytes = self.l2_count * 8
        if l2_offset:
            if l2_offset % self.cluster_size or l2_offset + l2_bytes > self.known_end:
                raise CorruptImageError(f"{self.path}: L2 table offset {l2_offset:#x} (L1 index {l1_index}) is "
                                        f"unaligned or runs past the end of the file (size {self.known_end})")
            table = TableCodec(64, l2_bytes).decode(self.host.pread(l2_bytes, l2_offset))
        else:
            table = TableCodec(64, l2_bytes).decode(bytes(l2_bytes))
            l2_offset = self.file_end
            self.file_end += -(-l2_bytes // self.cluster_size) * self.cluster_size
            self.host.pwrite(bytes(l2_bytes), l2_offset)
            self.host.fsync()  # the table before the pointer to it
            self.host.pwrite(l2_offset.to_bytes(8, "big"), self.l1_table_offset + 8 * l1_index)
            self.l1[l1_index] = l2_offset
        if len(self.l2) >= L2_TABLES_KEPT:
            del self.l2[next(iter(self.l2))]
        self.l2[l1_index] = table
        return table

    def write_at(self, offset: int, data: Buffer) -> int:
        """Write `data` at guest `offset`: in place where clusters are allocated, into new
        clusters appended at the end of the file elsewhere. One writer at a time (the commit's
        worker threads share the tables and the file's end)."""
        mv = memoryview(data).cast("B")
        cs = self.cluster_size
        pos, end = offset, offset + len(mv)
        with self._write_lock:
            while pos < end:
                l1_index = pos // cs // self.l2_count
                table_end = min(end, (l1_index + 1) * self.l2_count * cs)
                self._write_in_table(l1_index, pos, mv[pos - offset:table_end - offset])
                pos = table_end
        return len(mv)

    def _write_in_table(self, l1_index: int, offset: int, mv: memoryview) -> None:
        cs = self.cluster_size
        table = self._table(l1_index)
        l2_offset = self.l1[l1_index]
        new_pieces: list[Buffer] = []
        new_indices: list[int] = []
        in_place: list[memoryview] = []  # one run of host-contiguous allocated clusters
        in_place_at = in_place_end = -1
        pos, end = offset, offset + len(mv)
        while pos < end:
            cluster_start = pos // cs * cs
            piece_end = min(end, cluster_start + cs)
            piece = mv[pos - offset:piece_end - offset]
            l2_index = (pos // cs) % self.l2_count
            entry = table[l2_index]
            if entry and not entry & COMPRESSED_FLAG:
                self._check_offset(entry, "data cluster")
                host_offset = entry + pos - cluster_start
                if host_offset != in_place_end:
                    if in_place:
                        self.host.pwritev(in_place, in_place_at)
                    in_place, in_place_at = [], host_offset
                in_place.append(piece)
                in_place_end = host_offset + len(piece)
            else:
                if len(piece) == cs:
                    new_pieces.append(piece)
                else:  # complete it with what the guest read there before
                    assert self._reader is not None
                    whole = bytearray(cs)
                    self._reader.readinto_at(whole, cluster_start)
                    whole[pos - cluster_start:piece_end - cluster_start] = piece
                    new_pieces.append(whole)
                new_indices.append(l2_index)
            pos = piece_end
        if in_place:
            self.host.pwritev(in_place, in_place_at)
        if not new_indices:
            return
        first = self.file_end
        self.host.pwritev(new_pieces, first)
        self.file_end += cs * len(new_indices)
        self.host.fsync()  # the data before the entries that name it
        for k, l2_index in enumerate(new_indices):
            table[l2_index] = first + k * cs
        lo, hi = new_indices[0], new_indices[-1] + 1
        self.host.pwrite(TableCodec(64, self.l2_count * 8).encode(table, lo, hi), l2_offset + 8 * lo)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros as data (qcow has no zero clusters: QEMU's fallback writes a zero buffer)."""
        end = offset + length
        while offset < end:
            n = min(ZERO_BLOCK_LENGTH, end - offset)
            self.write_at(offset, zero_block(n))
            offset += n

    def flush(self) -> None:
        """fsync the file."""
        self.host.fsync()

    def start_writeback(self) -> None:
        """Start writing what was written back to the disk, without waiting (a hint)."""
        self.host.start_writeback()

    def close(self) -> None:
        """Release the reader, the lock and the file."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        self.host.close()


__all__ = ["Qcow1Target"]
