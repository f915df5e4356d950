"""Decoding compressed clusters (zlib raw deflate, zstd) with hard output bounds.

Both codecs are C and release the GIL while they decode: zlib's inflate, and zstandard's
one-shot `decompress` (used for a cluster stored as one frame, what QEMU writes); its
`stream_reader`, needed only for a cluster of several frames, holds the GIL. Output is capped at one cluster, so a hostile
payload can never make us allocate more than `cluster_size` bytes.
"""

from __future__ import annotations

import threading
import zlib

from ..errors import CorruptImageError
from ..hostio import Buffer
from .format import COMPRESSION_ZLIB, COMPRESSION_ZSTD

TYPE_CHECKING = False
if TYPE_CHECKING:  # zstandard is imported where a zstd cluster is met: most runs meet none
    import zstandard

# zstd contexts may not be shared between threads: one decompressor and one compressor per
# thread (attributes `zstd_d`, `zstd_c`). Making a compressor costs about as much as compressing
# a cluster; reusing it changes no output byte.
_local = threading.local()


def _zstd() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "zstd_d", None)
    if d is None:
        import zstandard
        d = _local.zstd_d = zstandard.ZstdDecompressor()
    return d


def decompress_cluster(payload: Buffer, cluster_size: int, compression_type: int, where: str) -> bytes:
    """Decode one compressed cluster to exactly `cluster_size` bytes or raise CorruptImageError.

    `where` names the cluster for the error message (e.g. "guest cluster 5 at host offset 0x...").
    Trailing bytes after the stream are tolerated (the descriptor counts whole sectors).
    """
    out = bytearray(cluster_size)
    decompress_into(payload, memoryview(out), compression_type, where)
    return bytes(out)


def decompress_into(payload: Buffer, out: memoryview, compression_type: int, where: str) -> None:
    """Decode one compressed cluster into all of `out` (one cluster's bytes), or raise
    CorruptImageError. zstd decodes straight into `out`; zlib's Python API has no such call, so
    its output (capped at one cluster) is copied once. Needs no lock."""
    cluster_size = len(out)
    if compression_type == COMPRESSION_ZLIB:
        try:
            data = zlib.decompressobj(-12).decompress(payload, cluster_size)
        except zlib.error as e:
            raise _undecodable(where, e) from None
        got = len(data)
        out[:got] = data
    elif compression_type == COMPRESSION_ZSTD:
        import zstandard
        try:
            got = _decompress_zstd(payload, out)
        except zstandard.ZstdError as e:
            raise _undecodable(where, e) from None
    else:  # parse_header refuses unknown types; keep the guard for safety
        raise CorruptImageError(f"unknown compression_type {compression_type}")
    if got != cluster_size:
        raise CorruptImageError(
            f"compressed cluster ({where}) decompresses to {got} bytes, expected cluster size {cluster_size}")


def _undecodable(where: str, e: Exception) -> CorruptImageError:
    return CorruptImageError(f"compressed cluster ({where}) does not decompress: {e}")


def _decompress_zstd(payload: Buffer, out: memoryview) -> int:
    # QEMU writes one or more plain frames with no length prefix. stream_reader's readinto caps
    # the output of a frame at the room left in `out` (a bomb stops at one cluster); only when a
    # frame ends short do we need its compressed length, and then decompressobj's output is
    # already bounded by that short frame.
    import zstandard
    zstd = _zstd()
    # One frame of the whole cluster (what QEMU writes): the one-shot call, which releases the
    # GIL, so threads decode at once (stream_reader holds it). Its output is bounded by the
    # cluster when the frame does not declare its size, and by the declared size, checked
    # first, when it does; a frame that would run past the cluster is an error there (as in
    # QEMU, which fails a frame not flushed within the cluster).
    declared = zstandard.frame_content_size(payload)  # -1: not in the header
    if declared > len(out):
        raise zstandard.ZstdError(f"frame declares {declared} bytes of content, past the cluster's {len(out)}")
    whole = zstd.decompress(payload, max_output_size=len(out))
    if len(whole) == len(out):
        out[:] = whole
        return len(out)
    got = 0  # several frames: decoded again frame by frame
    data: Buffer = payload
    while got < len(out) and len(memoryview(data)):
        reader = zstd.stream_reader(data, read_across_frames=False)
        n = 0
        while got < len(out):  # readinto may stop short of the frame's end; read until it says 0
            n = reader.readinto(out[got:])
            if not n:
                break
            got += n
        if got == len(out) or (not n and got == 0):
            break
        dobj = zstd.decompressobj()
        dobj.decompress(data)
        if not dobj.eof:
            break
        data = dobj.unused_data
    return got


def compress_cluster(data: bytes, compression_type: int) -> bytes:
    """Encode one cluster as QEMU does (raw deflate with a 4 KiB window, or one zstd frame)."""
    if compression_type == COMPRESSION_ZLIB:
        c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    if compression_type == COMPRESSION_ZSTD:
        cctx = getattr(_local, "zstd_c", None)
        if cctx is None:
            import zstandard
            cctx = _local.zstd_c = zstandard.ZstdCompressor()
        return cctx.compress(data)
    raise ValueError(f"unknown compression_type {compression_type}")
