"""The engine's second set of fast paths (issue 10): L2 slices and the cache-size options,
compressed clusters read in batches and decoded in parallel, lean header reads at open, the
L1 scan of a read-write open. Every result is checked against QEMU or a model; nothing here
is timed (counts only: bytes read at open, preads per request).
"""

from __future__ import annotations

import json
import os
import random
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import zstandard

from imagefactory import make_image, mixed_raw, read_cluster0, write_cluster0
from qcowdisk import CorruptImageError, QcowFile
from qcowdisk.hostio import Buffer, HostFile
from qcowdisk.qcow2 import compressed, decoding
from qcowdisk.qcow2.cachesize import l2_cache_geometry
from qcowdisk.qcow2.entries import nonzero_entries
from qcowdisk.qcow2.file import _fast_lookup
from qemutools import qemu_img, run, to_raw

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class CountingHost(HostFile):
    """A HostFile that records every pread (length, offset)."""

    reads: ClassVar[list[tuple[str, int, int]]] = []

    def pread(self, length: int, offset: int) -> bytes:
        """Record, then read."""
        CountingHost.reads.append((self.path, length, offset))
        return super().pread(length, offset)

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Record, then read."""
        CountingHost.reads.append((self.path, sum(len(memoryview(b)) for b in buffers), offset))
        return super().preadv(buffers, offset)


@pytest.fixture
def counting() -> list[tuple[str, int, int]]:
    CountingHost.reads = []
    return CountingHost.reads


# --- L2 slices and the cache options -------------------------------------------------------
class SparseModel:
    """What a sequence of qemu-io writes leaves: zeros, overlaid by each write in order."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def write(self, off: int, data: bytes) -> None:
        """Record a write."""
        self.writes.append((off, data))

    def read(self, off: int, n: int) -> bytes:
        """The bytes at [off, off+n)."""
        out = bytearray(n)
        for w_off, data in self.writes:
            lo, hi = max(off, w_off), min(off + n, w_off + len(data))
            if lo < hi:
                out[lo - off:hi - off] = data[lo - w_off:hi - w_off]
        return bytes(out)


def _scattered_image(path: Path, cluster_size: int, extended_l2: bool = False) -> tuple[str, SparseModel]:
    """Data and zeros scattered over 16 L2 tables by qemu-io, and the model of what it wrote."""
    rng = random.Random(7)
    cmds = []
    model = SparseModel()
    span = cluster_size * cluster_size // (16 if extended_l2 else 8)
    tables = 16
    for t in range(tables):
        base = t * span
        for _ in range(3):
            off = base + rng.randrange(0, span - 2 * cluster_size, 512)
            n, pat = rng.choice([512, 4096, cluster_size + 4096]), rng.randrange(1, 255)
            cmds.append(f"write -P {pat} {off} {n}")
            model.write(off, bytes([pat]) * n)
        cmds.append(f"write -z {base + span // 2} {2 * cluster_size}")
        model.write(base + span // 2, bytes(2 * cluster_size))
    opts = f"cluster_size={cluster_size}" + (",extended_l2=on" if extended_l2 else "")
    return make_image(str(path), tables * span, opts, commands=cmds), model


@pytest.mark.parametrize(("cluster_size", "extended_l2", "entry_size"), [
    (65536, False, None), (65536, False, 512), (65536, True, 4096), (4096, False, 1024)])
def test_slices_read_what_qemu_wrote(tmp_path: Path, cluster_size: int, extended_l2: bool,
                                     entry_size: int | None) -> None:
    """A cache of a few slices (missing all the time) reads what QEMU wrote, and block status
    is the same as with whole tables."""
    img, model = _scattered_image(tmp_path / "img.qcow2", cluster_size, extended_l2)
    rng = random.Random(3)
    with QcowFile.open(img, readonly=True, l2_cache_size=2048, l2_cache_entry_size=entry_size) as d, \
            QcowFile.open(img, readonly=True) as whole:
        s = d._state
        assert s.l2_slices is not None
        assert s.l2_slice_entries == (entry_size or min(cluster_size, 4096)) // (16 if extended_l2 else 8)
        for off, data in model.writes:  # around every write
            lo = max(0, off - rng.randrange(0, 3 * cluster_size))
            n = min(len(data) + 2 * cluster_size, d.virtual_size - lo)
            assert d.read_at(lo, n) == model.read(lo, n)
        for _ in range(300):
            off = rng.randrange(0, d.virtual_size)
            n = min(rng.choice([1, 512, 4096, 65536, 1 << 20]), d.virtual_size - off)
            assert d.read_at(off, n) == model.read(off, n)
        assert list(d.block_status()) == list(whole.block_status())


def test_slices_whole_image_matches_qemu_convert(tmp_path: Path) -> None:
    img = make_image(str(tmp_path / "s.qcow2"), 8 * MiB, "cluster_size=4096",
                     commands=[f"write -P {i + 1} {i * 97 * 512} 3000" for i in range(100)])
    want = to_raw(img, str(tmp_path / "s.raw"))
    with QcowFile.open(img, readonly=True, l2_cache_size=1024, l2_cache_entry_size=512) as d:
        assert d._state.l2_slices is not None
        got = b"".join(d.read_at(off, 12345) for off in range(0, d.virtual_size, 12345))
    assert got == want


def test_slice_miss_reads_one_slice(tmp_path: Path, counting: list[tuple[str, int, int]]) -> None:
    """A miss reads the slice (4 KiB by default when the cache cannot map the disk), not the
    table; a slice's first miss reads only the entry (8 bytes) and its second the slice, which
    serves the next reads with no L2 read (cachesize.py's admission)."""
    img, _ = _scattered_image(tmp_path / "img.qcow2", 65536)
    with QcowFile.open(img, readonly=True, l2_cache_size=65536, host_factory=CountingHost) as d:
        counting.clear()
        d.read_at(5 * 512 * MiB + 7 * 65536, 4096)  # (unallocated there: no data read)
        assert [n for _, n, _ in counting] == [8]
        counting.clear()
        d.read_at(5 * 512 * MiB + 8 * 65536, 4096)
        assert [n for _, n, _ in counting] == [4096]
        counting.clear()
        d.read_at(5 * 512 * MiB + 9 * 65536, 4096)
        assert counting == []


@pytest.mark.parametrize("extended_l2", [False, True])
def test_thrashing_reads_read_one_entry(tmp_path: Path, counting: list[tuple[str, int, int]],
                                        extended_l2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads going round more slices than the cache and its window of recent misses hold each
    read one entry (16 bytes with extended L2) and the data, never a slice; the bytes are
    what qemu-io wrote. Slices read again within the window are cached as before. (The fast
    path's memo, off here, would remember the clusters: see the end.)"""
    import qcowdisk.qcow2.file as qfile
    monkeypatch.setattr(qfile, "FAST_MEMO_ENTRIES", 0)
    cs = 16384 if extended_l2 else 4096
    span = cs * cs // (16 if extended_l2 else 8)  # (one slice of each table is read)
    img = make_image(str(tmp_path / "t.qcow2"), 64 * span, f"cluster_size={cs}" + (",extended_l2=on" * extended_l2),
                     commands=[f"write -P {t + 1} {t * span + t * cs} {cs}" for t in range(64)])
    with QcowFile.open(img, readonly=True, l2_cache_size=16 * 1024, host_factory=CountingHost) as d:
        assert d._state.l2_recent is not None
        for _ in range(3):
            for t in range(64):
                counting.clear()
                assert d.read_at(t * span + t * cs, 4096) == bytes([t + 1]) * 4096
                assert [n for _, n, _ in counting] == [16 if extended_l2 else 8, 4096]
        seen = []
        for _ in range(3):  # again within the window: the second miss caches the slice
            counting.clear()
            assert d.read_at(span + cs, 4096) == b"\2" * 4096
            seen.append([n for _, n, _ in counting])
        assert seen == [[16 if extended_l2 else 8, 4096], [4096, 4096], [4096]]
        monkeypatch.undo()  # the memo: after one more round, every read is the data alone
        for rnd in range(3):
            for t in range(64):
                counting.clear()
                assert d.read_at(t * span + t * cs, 4096) == bytes([t + 1]) * 4096
                if rnd:
                    assert [n for _, n, _ in counting] == [4096]


def test_default_cache_maps_small_disks_whole(tmp_path: Path) -> None:
    img = make_image(str(tmp_path / "d.qcow2"), 1 * GiB)
    with QcowFile.open(img, readonly=True) as d:
        assert d._state.l2_slices is None  # the cache maps the whole disk: whole tables, as QEMU
    assert l2_cache_geometry(1 << 40, 4096, False, None, None) == (32 * MiB // 4096, 4096)
    assert l2_cache_geometry(1 << 40, 65536, False, None, None) == (32 * MiB // 4096, 4096)
    assert l2_cache_geometry(1 << 30, 65536, False, None, None) == (2, 65536)
    assert l2_cache_geometry(1 << 30, 65536, False, 0, None) == (2, 4096)
    assert l2_cache_geometry(1 << 30, 65536, False, 1 << 40, None) == (2, 65536)  # cut to max_l2_cache


@pytest.mark.parametrize("entry_size", [256, 1000, 131072, 3 * 512])
def test_entry_size_refused_like_qemu(tmp_path: Path, entry_size: int) -> None:
    img = make_image(str(tmp_path / "e.qcow2"), 64 * MiB)
    p = run("qemu-io", "-r", "--image-opts", f"driver=qcow2,file.filename={img},l2-cache-entry-size={entry_size}",
            "-c", "quit", check=False)
    qemu_message = (p.stdout + p.stderr).strip().split("can't open: ")[-1]
    with pytest.raises(ValueError, match="L2 cache entry size") as e:
        QcowFile.open(img, readonly=True, l2_cache_entry_size=entry_size)
    assert str(e.value) == qemu_message
    with pytest.raises(ValueError, match="L2 cache entry size"):
        QcowFile.open(img, l2_cache_entry_size=entry_size)  # read-write opens check it too
    with QcowFile.open(img):  # nothing stayed locked or open
        pass


@pytest.mark.parametrize("value", [-1, 1.5, "4096"])
def test_cache_size_must_be_bytes(tmp_path: Path, value: object) -> None:
    img = make_image(str(tmp_path / "v.qcow2"), 64 * MiB)
    with pytest.raises(ValueError, match="l2_cache_size"):
        QcowFile.open(img, readonly=True, l2_cache_size=value)  # type: ignore[arg-type]


def test_cache_options_do_not_reach_backing_files(tmp_path: Path) -> None:
    base = make_image(str(tmp_path / "base.qcow2"), 64 * MiB, commands=["write -P 5 0 1M"])
    top = make_image(str(tmp_path / "top.qcow2"), 64 * MiB, backing=base, backing_fmt="qcow2")
    with QcowFile.open(top, readonly=True, l2_cache_size=0, l2_cache_entry_size=512) as d:
        assert d._state.l2_slices is not None
        backing = d.backing
        assert isinstance(backing, QcowFile) and backing._state.l2_slices is None
        assert d.read_at(0, 4096) == b"\5" * 4096


# --- compressed clusters -------------------------------------------------------------------
@pytest.fixture(params=["zlib", "zstd"])
def compressed_image(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, bytes]:
    data = mixed_raw(8 * MiB, 40000, seed=11)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={request.param}", str(src), img)
    return img, data


def test_compressed_reads_batch_preads(compressed_image: tuple[str, bytes],
                                       counting: list[tuple[str, int, int]]) -> None:
    """A 1 MiB read of packed compressed clusters: one pread per decoder for all their payloads
    (plus the L2 table), the right bytes."""
    img, data = compressed_image
    with QcowFile.open(img, readonly=True, host_factory=CountingHost) as d:
        d.read_at(0, 4096)  # loads the L2 table
        counting.clear()
        off = 2 * MiB
        assert d.read_at(off, MiB) == data[off:off + MiB]
        # (a zero or uncompressible cluster may split a stretch once)
        assert len(counting) <= decoding.MAX_DECODERS + 1


def test_compressed_reads_any_shape(compressed_image: tuple[str, bytes]) -> None:
    img, data = compressed_image
    rng = random.Random(5)
    with QcowFile.open(img, readonly=True) as d:
        for _ in range(200):
            off = rng.randrange(0, len(data))
            n = rng.choice([1, 511, 4096, 65536, 65537, 300000, MiB])
            assert d.read_at(off, n) == data[off:off + n]
            buf = bytearray(n)
            got = d.readinto_at(buf, off)
            assert bytes(buf[:got]) == data[off:off + got]


def test_threaded_compressed_reads_match_the_model(compressed_image: tuple[str, bytes]) -> None:
    """Readers on several threads at once (the decoders run in parallel): every read right."""
    img, data = compressed_image
    errors: list[BaseException] = []
    with QcowFile.open(img, readonly=True) as d:
        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    off = rng.randrange(0, len(data))
                    n = rng.choice([4096, 65536, MiB, 2 * MiB])
                    got = d.read_at(off, n)
                    if got != data[off:off + n]:
                        raise AssertionError(f"read at {off} (+{n}) differs from the model")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


def test_corrupt_payload_in_a_batch_is_reported(tmp_path: Path, compressed_image: tuple[str, bytes]) -> None:
    """A broken payload among many decoded in parallel raises CorruptImageError naming it."""
    img, _ = compressed_image
    with QcowFile.open(img, readonly=True) as d:
        s = d._state
        runs = list(s.l2_cache.get(s.l1.entries[0] & 0x00FFFFFFFFFFFE00).entries[:16])
        compressed = [i for i, e in enumerate(runs) if e >> 62 & 1]
    victim = compressed[len(compressed) // 2]
    with QcowFile.open(img, readonly=True) as d:
        off, _ = d._state.descriptor.decode(runs[victim])
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * 64)
    with QcowFile.open(img, readonly=True) as d, pytest.raises(CorruptImageError, match=f"guest cluster {victim}"):
        d.read_at(0, MiB)


def test_zstd_cluster_of_several_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's decoder reads a zstd cluster stored as several frames, and so do we."""
    data = b"".join(bytes([i]) * 4096 + os.urandom(4096) for i in range(16))  # 2 clusters of 64 KiB
    img = tmp_path / "f.qcow2"

    def two_frames(cluster: bytes, ctype: int) -> bytes:
        c = zstandard.ZstdCompressor()
        return c.compress(cluster[:1000]) + c.compress(cluster[1000:])

    QcowFile.create(img, MiB, compression_type="zstd").close()
    monkeypatch.setattr(compressed, "compress_cluster", two_frames)
    with QcowFile.open(img) as d:
        d.write_compressed(0, data)
    with QcowFile.open(img, readonly=True) as d:
        assert next(iter(d.block_status(0, 1))).compressed
        assert d.read_at(0, len(data)) == data
    assert to_raw(str(img), str(tmp_path / "f.raw"), "qcow2")[:len(data)] == data  # QEMU reads it so too


def test_decoder_pool_after_fork(compressed_image: tuple[str, bytes]) -> None:
    """A forked child decodes with a pool of its own (the parent's threads are not there)."""
    img, data = compressed_image
    with QcowFile.open(img, readonly=True) as d:
        assert d.read_at(0, MiB) == data[:MiB]  # the pool exists now
        assert decoding._pool
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = False
        try:
            with QcowFile.open(img, readonly=True) as d:
                ok = d.read_at(MiB, MiB) == data[MiB:2 * MiB]
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- opening -------------------------------------------------------------------------------
def test_open_reads_4k_of_a_2m_cluster_header(tmp_path: Path, counting: list[tuple[str, int, int]]) -> None:
    """A chain of images with 2 MiB clusters opens without reading 2 MiB of each header."""
    prev = None
    for i in range(4):
        path = str(tmp_path / f"l{i}.qcow2")
        make_image(path, 64 * MiB, "cluster_size=2M", backing=prev, backing_fmt="qcow2" if prev else None,
                   commands=[f"write -P {i + 1} {i * MiB} 4096"])
        prev = path
    assert prev is not None
    with QcowFile.open(prev, readonly=True, host_factory=CountingHost) as d:
        header_reads = [n for _, n, off in counting if off == 0]
        assert max(header_reads) <= 4096
        assert d.read_at(2 * MiB, 4096) == b"\3" * 4096


def test_header_past_4k_still_opens(tmp_path: Path) -> None:
    """A backing name beyond the first 4 KiB (legal within cluster 0) is read as before."""
    make_image(str(tmp_path / "b.qcow2"), 16 * MiB, commands=["write -P 9 0 4096"])
    # pad the backing file name with a long relative path: ./././...b.qcow2 (> 500 bytes), and
    # put an unknown 4 KiB header extension before it so the name lies past 4 KiB
    top = str(tmp_path / "t.qcow2")
    name = "./" * 300 + "b.qcow2"
    make_image(top, 16 * MiB, backing=name, backing_fmt="qcow2")
    c0 = read_cluster0(top)
    c0.extensions.insert(0, (0x12345678, b"\0" * 4000))
    write_cluster0(top, c0)
    with QcowFile.open(top, readonly=True) as d:
        assert d.backing_file == name
        assert d.read_at(0, 4096) == b"\x09" * 4096
    assert qemu_img("info", top).returncode == 0


def test_nonzero_entries() -> None:
    a = array("Q", bytes(8 * 10000))
    a[5], a[4096], a[9999] = 7, 1, 3
    assert list(nonzero_entries(a)) == [7, 1, 3]
    assert list(nonzero_entries(array("Q"))) == []
    b = array("Q", range(1, 5000))
    assert list(nonzero_entries(b)) == list(b)


def test_read_write_open_collects_l2_tables_of_a_sparse_l1(tmp_path: Path) -> None:
    """The metadata set of a read-write open still holds every L2 table (after zero stretches)."""
    img = make_image(str(tmp_path / "m.qcow2"), 1 << 40, "cluster_size=4096",
                     commands=["write 0 4096", f"write {(1 << 40) - 4096} 4096", f"write {300 << 30} 4096"])
    with QcowFile.open(img) as d:
        s = d._state
        tables = {(e & 0x00FFFFFFFFFFFE00) >> 12 for e in s.l1.entries if e}
        assert len(tables) == 3 and tables <= s.metadata


# --- backing chains ------------------------------------------------------------------------
def _mixed_chain(tmp_path: Path, depth: int) -> str:
    """raw <- qcow (v1) <- qcow2 layers of different cluster sizes, extended L2, zero clusters,
    discarded ranges and a layer shorter than the disk; each layer writes somewhere."""
    rng = random.Random(depth)
    base = str(tmp_path / "base.raw")
    Path(base).write_bytes(mixed_raw(8 * MiB, 8192, seed=1))
    v1 = make_image(str(tmp_path / "v1.qcow"), 8 * MiB, backing=base, backing_fmt="raw", fmt="qcow",
                    commands=["write -P 0x11 1M 64k"])
    prev, prev_fmt = v1, "qcow"
    for i in range(depth):
        size = 6 * MiB if i == 1 else 8 * MiB  # a short layer: what lies past it reads as zeros
        opts = rng.choice(["cluster_size=65536", "cluster_size=4096", "cluster_size=65536,extended_l2=on",
                           "cluster_size=512"])
        cmds = [f"write -P {i + 0x20} {rng.randrange(0, size - 200000, 512)} {rng.randrange(512, 200000, 512)}",
                f"write -z {rng.randrange(0, size - 70000, 512)} {rng.randrange(512, 70000, 512)}"]
        if i % 3 == 2:
            cmds.append(f"discard {rng.randrange(0, size - MiB, 65536)} {MiB}")
        path = make_image(str(tmp_path / f"l{i}.qcow2"), size, opts, backing=prev, backing_fmt=prev_fmt,
                          commands=cmds)
        prev, prev_fmt = path, "qcow2"
    if depth > 1:
        qemu_img("resize", "-q", prev, str(8 * MiB))
    return prev


@pytest.mark.parametrize("depth", [1, 3, 20])
def test_chain_reads_match_qemu_convert(tmp_path: Path, depth: int) -> None:
    top = _mixed_chain(tmp_path, depth)
    want = to_raw(top, str(tmp_path / "want.raw"))
    rng = random.Random(9)
    with QcowFile.open(top, readonly=True) as d:
        assert b"".join(d.read_at(off, 4096) for off in range(0, d.virtual_size, 4096)) == want
        for _ in range(400):
            off = rng.randrange(0, d.virtual_size)
            n = rng.choice([1, 512, 4096, 5000, 65536, 300000])
            assert d.read_at(off, n) == want[off:off + n]
    with QcowFile.open(top, readonly=True, l2_cache_size=0, l2_cache_entry_size=512) as d:
        for _ in range(200):
            off = rng.randrange(0, d.virtual_size)
            assert d.read_at(off, 4096) == want[off:off + 4096]


def test_chain_read_skips_layers_that_do_not_own_the_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           counting: list[tuple[str, int, int]]) -> None:
    """A 4 KiB read from the base of a 20-deep chain is served by the base alone: no layer in
    between runs its read path, and the data is read once, from the base. Inside a granule the
    chain map read before serves it with no layer's read path at all; a read across clusters
    (which the map leaves to the checked path) runs the base's alone."""
    prev = make_image(str(tmp_path / "b.qcow2"), 64 * MiB, commands=["write -P 7 0 64M"])
    for i in range(20):
        prev = make_image(str(tmp_path / f"c{i}.qcow2"), 64 * MiB, backing=prev, backing_fmt="qcow2",
                          commands=[f"write -P {i} {i * MiB} 4096"])
    served: list[str] = []
    original = QcowFile.readinto_at

    def spy(self: QcowFile, buffer: Buffer, offset: int) -> int:
        served.append(Path(self.filename).name)
        return original(self, buffer, offset)
    monkeypatch.setattr(QcowFile, "readinto_at", spy)
    with QcowFile.open(prev, readonly=True, host_factory=CountingHost) as d:
        assert d.read_at(40 * MiB, 4096) == b"\7" * 4096
        counting.clear()
        served.clear()
        assert d.read_at(40 * MiB + 8192, 4096) == b"\7" * 4096
        assert served == []
        assert [(Path(p).name, n) for p, n, _ in counting] == [("b.qcow2", 4096)]
        counting.clear()
        assert d.read_at(41 * MiB - 4096, 8192) == b"\7" * 8192  # spans two clusters
        assert served == ["b.qcow2"]
        assert [(Path(p).name, n) for p, n, _ in counting] == [("b.qcow2", 8192)]
        assert d.read_at(3 * MiB, 4096) == b"\3" * 4096  # owned half-way down
        assert d.read_at(3 * MiB + 4096, 4096) == b"\7" * 4096


@pytest.mark.parametrize("entry", [(1 << 63) | (1 << 40), (1 << 63) | 0x10000 | 0x200, 0x20000 | (1 << 56)])
def test_single_entry_reads_refuse_what_the_slice_path_refuses(tmp_path: Path, entry: int) -> None:
    """A broken L2 entry read alone on a first miss (past the end of the file, unaligned,
    reserved bits) raises what the checked path raises with the whole table cached."""
    span = 4096 * 512
    img = make_image(str(tmp_path / "b.qcow2"), 8 * span, "cluster_size=4096",
                     commands=[f"write -P {t + 1} {t * span} 4096" for t in range(8)])
    with open(img, "r+b") as f:
        f.seek(40)
        l1_offset = int.from_bytes(f.read(8), "big")
        f.seek(l1_offset + 3 * 8)
        l2_offset = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        f.write(entry.to_bytes(8, "big"))
    errors = []
    for cache in (None, 4096):
        with QcowFile.open(img, readonly=True, l2_cache_size=cache) as d:
            assert (d._state.l2_recent is None) == (cache is None)
            assert d.read_at(2 * span, 4096) == b"\3" * 4096
            with pytest.raises(CorruptImageError) as e:
                d.read_at(3 * span, 4096)
            errors.append(str(e.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("extended_l2", [False, True])
def test_fast_lookup_finds_the_slice_qemu_maps(tmp_path: Path, extended_l2: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock-free lookup (speed10's `_fast_lookup`, also serving extended L2) keys slices as
    the checked path does: for clusters in several slices of one table, cached by a first read,
    it gives the host offset `qemu-img map` gives (a key off by the entry width would miss, or
    hit a neighbouring slice). (The memo is off: it would serve the second read, and no slice
    would be cached.)"""
    import qcowdisk.qcow2.file as qfile
    monkeypatch.setattr(qfile, "FAST_MEMO_ENTRIES", 0)
    cs = 65536
    per_slice = 4096 // (16 if extended_l2 else 8)
    clusters = [k * per_slice + 7 for k in (0, 1, 2, 3, 5)]
    img = make_image(str(tmp_path / "img.qcow2"), 512 * MiB,
                     f"cluster_size={cs}" + (",extended_l2=on" if extended_l2 else ""),
                     commands=[f"write -P {i + 1} {c * cs} {cs}" for i, c in enumerate(clusters)])
    where = {m["start"]: m["offset"] for m in json.loads(qemu_img("map", "--output=json", img).stdout)
             if m["data"] and "offset" in m}
    with QcowFile.open(img, readonly=True, l2_cache_size=32 * KiB, l2_cache_entry_size=4096) as d:
        assert d._state.l2_slices is not None
        for i, c in enumerate(clusters):
            for _ in range(2):  # (the second miss caches the slice)
                assert d.read_at(c * cs + 100, 4096) == bytes([i + 1]) * 4096
        fast = d._fast
        assert fast is not None
        for i, c in enumerate(clusters):
            assert _fast_lookup(fast, c * cs + 100, 4096) == where[c * cs] + 100
            assert d.read_at(c * cs + 100, 4096) == bytes([i + 1]) * 4096
