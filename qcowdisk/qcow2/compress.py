"""Decoding compressed clusters (zlib raw deflate, zstd) with hard output bounds.

Both codecs are C and release the GIL. Output is capped at one cluster, so a hostile payload
can never make us allocate more than `cluster_size` bytes.
"""

from __future__ import annotations

import io
import threading
import zlib

import zstandard

from ..errors import CorruptImageError
from .format import COMPRESSION_ZLIB, COMPRESSION_ZSTD

_zstd = zstandard.ZstdDecompressor()
# One zstd compression context per thread: making one costs about as much as compressing a
# cluster, and a context may not be shared between threads. Reusing it changes no output byte.
_local = threading.local()


def decompress_cluster(payload: bytes, cluster_size: int, compression_type: int, where: str) -> bytes:
    """Decode one compressed cluster to exactly `cluster_size` bytes or raise CorruptImageError.

    `where` names the cluster for the error message (e.g. "guest cluster 5 at host offset 0x...").
    Trailing bytes after the stream are tolerated (the descriptor counts whole sectors).
    """
    try:
        if compression_type == COMPRESSION_ZLIB:
            d = zlib.decompressobj(-12)
            out = d.decompress(payload, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            out = _decompress_zstd(payload, cluster_size)
        else:  # parse_header refuses unknown types; keep the guard for safety
            raise CorruptImageError(f"unknown compression_type {compression_type}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptImageError(f"compressed cluster ({where}) does not decompress: {e}") from None
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"compressed cluster ({where}) decompresses to {len(out)} bytes, expected cluster size {cluster_size}")
    return out


def _decompress_zstd(payload: bytes, cluster_size: int) -> bytes:
    # QEMU writes one or more plain frames with no length prefix. stream_reader caps the output
    # of a frame at what we ask for (a bomb stops at one cluster); only when a frame ends short
    # do we need its compressed length, and then decompressobj's output is already bounded.
    out = bytearray()
    data = payload
    while len(out) < cluster_size and data:
        need = cluster_size - len(out)
        reader = _zstd.stream_reader(io.BytesIO(data), read_across_frames=False)
        chunk = reader.read(need)
        out += chunk
        if len(chunk) == need or not chunk:
            break
        dobj = _zstd.decompressobj()
        dobj.decompress(data)
        if not dobj.eof:
            break
        data = dobj.unused_data
    return bytes(out)


def compress_cluster(data: bytes, compression_type: int) -> bytes:
    """Encode one cluster as QEMU does (raw deflate with a 4 KiB window, or one zstd frame)."""
    if compression_type == COMPRESSION_ZLIB:
        c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    if compression_type == COMPRESSION_ZSTD:
        cctx = getattr(_local, "zstd", None)
        if cctx is None:
            cctx = _local.zstd = zstandard.ZstdCompressor()
        return cctx.compress(data)
    raise ValueError(f"unknown compression_type {compression_type}")
