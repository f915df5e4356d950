"""The host file's allocation matches QEMU's: a new image as `qemu-img create` lays it out
(every metadata cluster written, none left a hole), and an allocating write as QEMU 7.2's
`handle_alloc_space` does it: a new cluster with nothing beneath is allocated as zeros
(fallocate ZERO_RANGE) and only the caller's bytes are written, never its zero padding.

Why the allocation, not just the bytes: QEMU's `qcow2_detect_metadata_preallocation` compares
the file's allocated blocks with the clusters the refcounts reference, and when it fires
`qemu-img map` looks through data clusters into the host file's holes. An image qcowdisk made
or wrote must therefore be allocated as QEMU would have allocated it: same length, same
allocated blocks, same data/hole layout, same `qemu-img map`, same bytes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from qcowdisk import QcowFile
from qcowdisk.hostio import HostFile, host_extent
from qemutools import assert_clean, create, qemu_img, qemu_io, run

KiB = 1024
MiB = 1024 * KiB
FS_BLOCK_SECTORS = 8  # one 4 KiB file-system block, in st_blocks units


def layout(path: str) -> tuple[int, int, list[tuple[int, int, bool]]]:
    """(length, allocated 512-byte blocks, data/hole extents as SEEK_DATA/SEEK_HOLE see them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        extents: list[tuple[int, int, bool]] = []
        pos = 0
        while pos < st.st_size:
            n, is_data = host_extent(fd, pos, st.st_size - pos)
            extents.append((pos, n, is_data))
            pos += n
        return st.st_size, st.st_blocks, extents
    finally:
        os.close(fd)


def qemu_map(path: str) -> list[dict[str, object]]:
    """`qemu-img map --output=json`."""
    out: list[dict[str, object]] = json.loads(qemu_img("map", "--output=json", path).stdout)
    return out


# --------------------------------------------------------------------------------------------
# create

CREATE_CASES = [
    ("", "1G"),
    ("compat=0.10", "64M"),
    ("compat=v3,refcount_bits=8,lazy_refcounts=on", "64M"),
    ("cluster_size=16k,extended_l2=on,compression_type=zstd", "100M"),
    ("refcount_bits=64,cluster_size=2M", "5G"),
    ("preallocation=metadata", "8M"),
    ("preallocation=falloc,cluster_size=128k", "3M"),
    ("cluster_size=512", "1G"),
    ("cluster_size=4k", "1T"),
    ("", "16T"),
    ("", "0"),
]
# Where qcowdisk's bytes differ from qemu-img's (same allocation): falloc places the grown
# refcount table elsewhere; below 8 KiB clusters QEMU leaves out the feature table, and with
# more than one refcount block QEMU puts the later blocks after the L1 table.
_BYTES_DIFFER = {"preallocation=falloc,cluster_size=128k", "cluster_size=512", "cluster_size=4k"}


@pytest.mark.parametrize("opts,size", CREATE_CASES)
def test_create_allocates_the_file_as_qemu_img(tmp_path: Path, opts: str, size: str) -> None:
    """A new image has qemu-img's length, allocated blocks and data/hole layout: the L1 table is
    written (as qcow2_grow_l1_table writes it), not left a hole."""
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    o = ["-o", opts] if opts else []
    qemu_img("create", "-q", "-f", "qcow2", *o, theirs, size)
    run(sys.executable, "-m", "qcowdisk", "create", "-q", "-f", "qcow2", *o, ours, size)
    assert layout(ours) == layout(theirs)
    assert qemu_map(ours) == qemu_map(theirs)
    assert_clean(ours)
    if opts not in _BYTES_DIFFER:
        assert Path(ours).read_bytes() == Path(theirs).read_bytes()


# --------------------------------------------------------------------------------------------
# allocating writes

class WriteCounter(HostFile):
    """Counts the bytes written and the ranges allocated as zeros (class-wide)."""

    written = 0
    zeroed: list[tuple[int, int]] = []  # noqa: RUF012 - shared by the test's files

    def pwritev(self, buffers: list[object], offset: int) -> None:  # type: ignore[override]
        """Count, then write."""
        WriteCounter.written += sum(memoryview(b).nbytes for b in buffers)  # type: ignore[arg-type]
        super().pwritev(buffers, offset)

    def zero_alloc(self, offset: int, length: int) -> bool:
        """Allocate, then count what was."""
        ok = super().zero_alloc(offset, length)
        if ok:
            WriteCounter.zeroed.append((offset, length))
        return ok


# 4 KiB requests into fresh clusters: at the start, unaligned across clusters, in the middle,
# over a backing file's data and at the end of the disk
WRITES = [(0, 4 * KiB), (1 * MiB, 4 * KiB), (5000, 4 * KiB), (64 * KiB - 2048, 4 * KiB),
          (40 * MiB + 512, 4 * KiB), (3 * MiB + 100, 4 * KiB), (64 * MiB - 4 * KiB, 4 * KiB)]
BACKING_DATA = (3 * MiB, 1 * MiB)  # where the backing file holds data


@pytest.mark.parametrize("backing", ["", "raw", "qcow2"], ids=["alone", "raw-backing", "qcow2-backing"])
@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512", "compat=0.10",
                                  "cluster_size=65536,extended_l2=on", "cluster_size=32768,extended_l2=on"])
def test_allocating_writes_allocate_as_qemu_io(tmp_path: Path, opts: str, backing: str) -> None:
    """The same 4 KiB writes by qemu-io and by qcowdisk into twin fresh images leave the same
    bytes, length, `qemu-img map` and (to one file-system block: ext4's extent tree may need one
    more or less) allocated blocks. Where nothing is allocated beneath (no backing file, or a
    qcow2 backing file without data there) qcowdisk writes each request's 4 KiB and nothing
    else: the rest of a new cluster, or of new subclusters, is allocated as zeros. Over a raw
    backing file, allocated everywhere for QEMU, and over backing data, the copy-on-write is
    written."""
    b: dict[str, str] = {}
    if backing:
        base = str(tmp_path / f"base.{backing}")
        if backing == "raw":
            with open(base, "wb") as f:
                f.truncate(64 * MiB)
                f.seek(BACKING_DATA[0])
                f.write(b"\x55" * BACKING_DATA[1])
        else:
            create(base, "64M", options="cluster_size=65536")
            qemu_io(base, f"write -P 0x55 {BACKING_DATA[0]} {BACKING_DATA[1]}")
        b = {"backing": base, "backing_fmt": backing}
    theirs = create(str(tmp_path / "theirs.qcow2"), "64M", options=opts, **b)
    ours = create(str(tmp_path / "ours.qcow2"), "64M", options=opts, **b)
    qemu_io(theirs, *(f"write -P {i + 1} {off} {n}" for i, (off, n) in enumerate(WRITES)))
    WriteCounter.zeroed = []
    with QcowFile.open(ours, host_factory=WriteCounter) as disk:
        for i, (off, n) in enumerate(WRITES):
            WriteCounter.written = 0
            disk.write_at(off, bytes([i + 1]) * n)
            over_data = off < sum(BACKING_DATA) and off + n > BACKING_DATA[0]
            if not backing or (backing == "qcow2" and not over_data):
                assert WriteCounter.written == n, (off, WriteCounter.written)
    assert bool(WriteCounter.zeroed) == (backing != "raw"), WriteCounter.zeroed
    assert Path(ours).read_bytes() == Path(theirs).read_bytes()
    assert qemu_map(ours) == qemu_map(theirs)
    assert_clean(ours)
    qemu_img("compare", ours, theirs)
    (size_o, blocks_o, _), (size_t, blocks_t, _) = layout(ours), layout(theirs)
    assert size_o == size_t
    assert abs(blocks_o - blocks_t) <= FS_BLOCK_SECTORS, (blocks_o, blocks_t)
