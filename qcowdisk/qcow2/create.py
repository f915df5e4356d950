"""Creating images: option checks as qemu-img does them, the initial layout, preallocation.

Layout of a new image (QEMU's): cluster 0 header, then the refcount table, the refcount
block(s) counting the metadata, then the L1 table (not padded to a cluster). `create_image`
writes that layout and nothing else; the caller opens the result, and preallocation then goes
through the ordinary allocator of the opened image (`preallocate`).
"""

from __future__ import annotations

import os

from .. import formats
from ..hostio import HostFactory, HostFile
from .entries import OFLAG_COPIED, TableCodec
from .format import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    CRYPT_NONE,
    HEADER_V3_LENGTH,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    MAX_BACKING_FORMAT_LENGTH,
    MAX_BACKING_NAME_LENGTH,
    MAX_L1_BYTES,
    Header,
    feature_table_extension,
    min_l1_size,
    serialize_header,
)
from .ordering import flush
from .state import Qcow2State
from .writing import l2_for_write

_COMPAT = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
_PREALLOC = ("off", "metadata", "falloc", "full")


def check_options(size: int, cluster_size: int, refcount_bits: int, compat: str, lazy_refcounts: bool,
                  extended_l2: bool, compression_type: str, preallocation: str, data_file: str | None,
                  data_file_raw: bool, backing_file: str | None, backing_format: str | None) -> int:
    """Refuse what qemu-img create refuses (ValueError); returns the qcow2 version."""
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"Image size must be a non-negative integer, got {size!r}")
    if size > (1 << 63) - 512:
        raise ValueError(f"Image size {size} too large (limit 2^63 - 512)")
    if cluster_size < 512 or cluster_size > (2 << 20) or cluster_size & (cluster_size - 1):
        raise ValueError(f"Cluster size must be a power of two between 512 and 2M bytes, got {cluster_size}")
    if compat not in _COMPAT:
        raise ValueError(f"Invalid compatibility level: {compat!r} (expected '0.10' or '1.1')")
    version = _COMPAT[compat]
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise ValueError(f"Refcount width must be a power of two and may not exceed 64 bits, got {refcount_bits}")
    if version < 3:
        if refcount_bits != 16:
            raise ValueError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                             f"(refcount_bits {refcount_bits})")
        if lazy_refcounts:
            raise ValueError("Lazy refcounts only supported with compatibility level 1.1 and above")
        if extended_l2:
            raise ValueError("Extended L2 entries are only supported with compatibility level 1.1 and above")
        if compression_type != "zlib":
            raise ValueError(f"Compression type {compression_type!r} requires compatibility level 1.1 or above")
        if data_file:
            raise ValueError("data-file requires compatibility level 1.1 or above")
    if compression_type not in ("zlib", "zstd"):
        raise ValueError(f"Unknown compression type {compression_type!r} (expected 'zlib' or 'zstd')")
    if extended_l2 and cluster_size < 16384:
        raise ValueError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes "
                         f"(cluster_size {cluster_size})")
    if preallocation not in _PREALLOC:
        raise ValueError(f"Invalid preallocation mode {preallocation!r} (expected one of {', '.join(_PREALLOC)})")
    if backing_file and preallocation != "off" and not extended_l2:
        raise ValueError("Backing file and preallocation can only be used at the same time if extended_l2 is on")
    if data_file_raw and not data_file:
        raise ValueError("data-file-raw requires data-file")
    if data_file_raw and backing_file:
        raise ValueError("Backing file and data-file-raw cannot be used at the same time")
    if backing_file is not None and len(backing_file.encode()) > MAX_BACKING_NAME_LENGTH:
        raise ValueError(f"Backing file name too long: {len(backing_file.encode())} bytes > {MAX_BACKING_NAME_LENGTH}")
    if backing_format is not None and len(backing_format) > MAX_BACKING_FORMAT_LENGTH:
        raise ValueError(f"backing format name {backing_format!r} too long (limit {MAX_BACKING_FORMAT_LENGTH})")
    return version


def create_image(path: str, size: int, *, cluster_size: int, refcount_bits: int, compat: str,
                 lazy_refcounts: bool, extended_l2: bool, compression_type: str, preallocation: str,
                 data_file: str | None, data_file_raw: bool, backing_file: str | None, backing_format: str | None,
                 host_factory: HostFactory | None) -> None:
    """Write a new empty image at `path` (refusing to overwrite a file)."""
    version = check_options(size, cluster_size, refcount_bits, compat, lazy_refcounts, extended_l2,
                            compression_type, preallocation, data_file, data_file_raw, backing_file, backing_format)
    size = -(-size // 512) * 512
    cluster_bits = cluster_size.bit_length() - 1
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    l1_size = min_l1_size(size, cluster_bits, l2_entries)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError(f"Image size {size} too large for cluster size {cluster_size}: L1 table of "
                         f"{l1_size * 8} bytes exceeds {MAX_L1_BYTES}")
    if backing_file and not backing_format:
        bpath = formats.resolve_backing_path(path, backing_file)
        if not os.path.exists(bpath):
            raise FileNotFoundError(f"backing file {bpath!r} does not exist")
        backing_format = formats.probe_format(bpath, host_factory)
    if os.path.exists(path):
        raise FileExistsError(f"refusing to overwrite existing file {path!r}")

    h = Header(version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cluster_bits, size=size,
               crypt_method=CRYPT_NONE, l1_size=l1_size, l1_table_offset=0, refcount_table_offset=0,
               refcount_table_clusters=0, nb_snapshots=0, snapshots_offset=0)
    h.refcount_order = refcount_bits.bit_length() - 1
    h.header_length = HEADER_V3_LENGTH if version >= 3 else 72
    h.backing_file = backing_file or None
    h.backing_format = backing_format if backing_file else None
    if version >= 3:
        if extended_l2:
            h.incompatible_features |= INCOMPAT_EXTL2
        if compression_type == "zstd":
            h.incompatible_features |= INCOMPAT_COMPRESSION
            h.compression_type = COMPRESSION_ZSTD
        else:
            h.compression_type = COMPRESSION_ZLIB
        if lazy_refcounts:
            h.compatible_features |= COMPAT_LAZY_REFCOUNTS
        if data_file:
            h.incompatible_features |= INCOMPAT_DATA_FILE
            h.data_file = data_file
            if data_file_raw:
                h.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
        h.extensions.append(feature_table_extension())

    # Metadata layout: header | refcount table | refcount blocks | L1, sized to a fixed point.
    entries_per_block = cluster_size * 8 // refcount_bits
    l1_clusters = -(-l1_size * 8 // cluster_size)  # none for an empty disk, as QEMU
    rt_clusters, rb_count = 1, 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters
        need_rb = -(-total // entries_per_block)
        need_rt = -(-need_rb * 8 // cluster_size)
        if (need_rb, need_rt) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
    h.refcount_table_offset = cluster_size
    h.refcount_table_clusters = rt_clusters
    rb_first = 1 + rt_clusters
    h.l1_table_offset = (rb_first + rb_count) * cluster_size if l1_size else 0
    total = rb_first + rb_count + l1_clusters

    header_bytes = serialize_header(h)
    reftable = TableCodec(64, rt_clusters * cluster_size)
    rt_entries = reftable.new()
    for i in range(rb_count):
        rt_entries[i] = (rb_first + i) * cluster_size
    codec = TableCodec(refcount_bits, cluster_size)
    blocks = []
    for i in range(rb_count):
        b = codec.new()
        for c in range(i * entries_per_block, min(total, (i + 1) * entries_per_block)):
            b[c - i * entries_per_block] = 1
        blocks.append(codec.encode(b, 0, len(b)))

    if data_file:
        dpath = formats.resolve_backing_path(path, data_file)
        if not os.path.exists(dpath):
            # as file-posix creates it: the guest size, its first block written (allocate_first_block)
            new = HostFile.create(dpath)
            try:
                new.truncate(size)
                if size:
                    new.pwrite(bytes(min(size, 4096)), 0)
            finally:
                new.close()
        if data_file_raw:
            with open(dpath, "r+b") as f:
                if os.fstat(f.fileno()).st_size < size:
                    f.truncate(size)
    host = HostFile.create(path) if host_factory is None else _create_with(host_factory, path)
    try:
        # the whole header cluster, as qcow2_co_create writes it: the file is allocated there
        # (what `qemu-img info` counts as disk size, and what block status sees of the file)
        host.pwrite(header_bytes + bytes(max(0, cluster_size - len(header_bytes))), 0)
        host.pwrite(reftable.encode(rt_entries, 0, len(rt_entries)), cluster_size)
        host.pwritev(blocks, rb_first * cluster_size)
        if l1_size:  # written, not left a hole, as qcow2_grow_l1_table writes it: the file's
            # allocated blocks (QEMU's metadata preallocation heuristic counts them) match QEMU's
            host.write_zeros(h.l1_table_offset, l1_size * 8)
        else:
            host.truncate(total * cluster_size)
        host.fsync()
    finally:
        host.close()


def _create_with(host_factory: HostFactory, path: str) -> HostFile:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.close(fd)
    return host_factory(path, True)


def preallocate(s: Qcow2State, mode: str) -> None:
    """Map every guest cluster to a host cluster (metadata), and allocate/zero the space (falloc/full)."""
    rc = s.refcounts
    assert rc is not None
    cbits = s.cluster_bits
    clusters = -(-s.virtual_size // s.cluster_size)
    bitmap = 0  # as QEMU: allocated clusters whose subclusters are all unallocated (they read as zeros)
    first_data: int | None = None
    last_end = 0
    for l1i in range(len(s.l1.entries)):
        first = l1i * s.l2_entries
        n = min(s.l2_entries, clusters - first)
        if n <= 0:
            break
        table = l2_for_write(s, l1i)
        if s.has_data_file:
            hosts = [(first + i) << cbits for i in range(n)]
        else:
            hosts = []
            for c, k in rc.alloc_clusters(n):
                hosts.extend((c + i) << cbits for i in range(k))
        e = table.entries
        for i, host in enumerate(hosts):
            if s.extended_l2:
                e[2 * i] = host | OFLAG_COPIED
                e[2 * i + 1] = bitmap
            else:
                e[i] = host | OFLAG_COPIED
            if first_data is None or host < first_data:
                first_data = host
            last_end = max(last_end, host + s.cluster_size)
        table.mark(0, 2 * n if s.extended_l2 else n)
    target = s.data_host
    if s.has_data_file:
        end = s.virtual_size
    else:
        end = max(last_end, s.alloc_limit)
        s.grow_alloc_limit(end)
    if target.size() < end:
        target.truncate(end)
    if mode in ("falloc", "full") and first_data is not None:
        start = 0 if s.has_data_file else first_data
        target.allocate(start, end - start)  # (False where the file system cannot: the space is mapped anyway)
    flush(s)
