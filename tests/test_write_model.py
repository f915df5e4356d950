"""Model-based tests of the write engine: random operation sequences checked against a mirror.

Every sequence of write_at / write_zeroes / punch_hole / read_at / readinto_at / flush is applied
both to a QcowFile and to a sparse bytearray mirror of the guest disk; reads must agree at once.
After each sequence the image is closed and QEMU is the judge: `qemu-img check` must be clean and
`qemu-img compare` must find the image identical to the mirror written out as a raw file.
The same image is then reopened by qcowdisk, continued by qemu-io, and continued by qcowdisk
again, so each engine has to accept what the other wrote. Random choices come from seeded
`random.Random` instances (the seed is in every failure message) or from hypothesis.

The number of random sequences and operations run is printed at the end of the module
(the lead quotes it), and kept in STATS.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from qcowdisk import QcowFile
from qemutools import assert_clean, check, compare, create, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Counters the lead quotes in the closing note; printed when the module finishes.
STATS: dict[str, int] = {"sequences": 0, "operations": 0, "qemu_sequences": 0, "qemu_operations": 0,
                         "hypothesis_examples": 0, "hypothesis_steps": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: pytest.FixtureRequest) -> Any:
    """Print how many random sequences and operations this module ran."""
    yield
    line = ("write-model counts: {sequences} qcowdisk random sequences / {operations} operations; "
            "{qemu_sequences} qemu-io sequences / {qemu_operations} operations; "
            "hypothesis {hypothesis_examples} examples / {hypothesis_steps} steps").format(**STATS)
    # Output during teardown is captured; print past the capture so the count shows in every run.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n{line}")
    else:
        print(line)


# --------------------------------------------------------------------------- the mirror

class Mirror:
    """Sparse model of a guest disk: 64 KiB bytearray chunks; absent chunks read as zeros."""

    CHUNK = 64 * KiB

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunks: dict[int, bytearray] = {}

    def resized(self, size: int) -> Mirror:
        """A copy of this disk cut or zero-extended to `size` (an overlay over a shorter backing)."""
        m = Mirror(size)
        for idx, chunk in self.chunks.items():
            m.chunks[idx] = bytearray(chunk)
        if size < self.size:
            m.zero(size, self.size - size)  # past the new end nothing survives
            m.chunks = {i: c for i, c in m.chunks.items() if i * self.CHUNK < size}
        return m

    def write(self, offset: int, data: Any) -> None:
        """Store `data` at `offset`."""
        mv = memoryview(data).cast("B")
        pos = 0
        while pos < len(mv):
            idx, within = divmod(offset + pos, self.CHUNK)
            n = min(self.CHUNK - within, len(mv) - pos)
            chunk = self.chunks.get(idx)
            if chunk is None:
                chunk = self.chunks[idx] = bytearray(self.CHUNK)
            chunk[within:within + n] = mv[pos:pos + n]
            pos += n

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros."""
        pos, end = offset, offset + length
        while pos < end:
            idx, within = divmod(pos, self.CHUNK)
            n = min(self.CHUNK - within, end - pos)
            chunk = self.chunks.get(idx)
            if chunk is not None:
                if n == self.CHUNK:
                    del self.chunks[idx]
                else:
                    chunk[within:within + n] = bytes(n)
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        """Read like QcowFile.read_at: clipped at the end of the disk."""
        length = max(0, min(length, self.size - offset))
        out = bytearray(length)
        pos = 0
        while pos < length:
            idx, within = divmod(offset + pos, self.CHUNK)
            n = min(self.CHUNK - within, length - pos)
            chunk = self.chunks.get(idx)
            if chunk is not None:
                out[pos:pos + n] = chunk[within:within + n]
            pos += n
        return bytes(out)

    def to_file(self, path: str | os.PathLike[str]) -> str:
        """Write the disk as a sparse raw file; returns the path."""
        with open(path, "wb") as f:
            f.truncate(self.size)
            for idx in sorted(self.chunks):
                start = idx * self.CHUNK
                if start >= self.size:
                    continue
                f.seek(start)
                f.write(self.chunks[idx][:min(self.CHUNK, self.size - start)])
        return str(path)


def assert_same(got: bytes, want: bytes, context: str) -> None:
    """Compare two byte strings, reporting the first difference (never a giant diff)."""
    if got == want:
        return
    if len(got) != len(want):
        raise AssertionError(f"{context}: length {len(got)} != expected {len(want)}")
    first = next(i for i in range(len(got)) if got[i] != want[i])
    raise AssertionError(f"{context}: first difference at +{first:#x}: got {got[first:first + 16].hex()} "
                         f"want {want[first:first + 16].hex()}")


# --------------------------------------------------------------------------- configurations

@dataclass(frozen=True, eq=False)
class Config:
    """One way to create an image: create() options plus backing-file and size choices."""

    name: str
    cluster_size: int = 64 * KiB
    opts: dict[str, Any] = field(default_factory=dict)
    backing: str | None = None          # "raw" or "qcow2": an overlay over a file qemu-img made
    backing_cluster_size: int = 64 * KiB
    backing_shorter: int = 0            # the backing file is this many bytes shorter than the overlay
    backing_relative: bool = False      # name the backing file relative to the overlay's directory
    from_backing: bool = False          # create with create_from_backing (size from the backing)
    data_file: bool = False             # external data file (opts may add data_file_raw)
    size: int | None = None             # default: spans two L2 boundaries and ends mid-cluster

    @property
    def extended_l2(self) -> bool:
        return bool(self.opts.get("extended_l2"))

    @property
    def l2_span(self) -> int:
        """Guest bytes one L2 table maps."""
        return self.cluster_size * (self.cluster_size // (16 if self.extended_l2 else 8))

    @property
    def virtual_size(self) -> int:
        if self.size is not None:
            return self.size
        # Two L2 boundaries, then a tail that does not end on a cluster boundary (when it can't, 3 sectors).
        return 2 * self.l2_span + 3 * self.cluster_size + 1536

    @property
    def v2(self) -> bool:
        return self.opts.get("compat") == "0.10"

    def hotspots(self) -> list[int]:
        """Guest offsets where interesting things happen: start, L2 boundaries, the end."""
        size = self.virtual_size
        spots = [0, size]
        b = self.l2_span
        while b < size and len(spots) < 6:
            spots.append(b)
            b += self.l2_span
        return spots

    def __str__(self) -> str:
        return self.name


def _cfg(name: str, cs: int = 64 * KiB, **kw: Any) -> Config:
    opts = kw.pop("opts", {})
    if cs != 64 * KiB:
        opts = {"cluster_size": cs, **opts}
    return Config(name=name, cluster_size=cs, opts=opts, **kw)


CONFIGS: list[Config] = [
    _cfg("c512", 512),
    _cfg("c4k", 4 * KiB),
    _cfg("c64k"),
    _cfg("c2M", 2 * MiB),
    _cfg("c512-rc64-reftable-growth", 512, opts={"refcount_bits": 64}),
    _cfg("c4k-rc1", 4 * KiB, opts={"refcount_bits": 1}),
    _cfg("c4k-rc2", 4 * KiB, opts={"refcount_bits": 2}),
    _cfg("c4k-rc4", 4 * KiB, opts={"refcount_bits": 4}),
    _cfg("c4k-rc8", 4 * KiB, opts={"refcount_bits": 8}),
    _cfg("c64k-rc32", opts={"refcount_bits": 32}),
    _cfg("c64k-rc64", opts={"refcount_bits": 64}),
    _cfg("v2-c64k", opts={"compat": "0.10"}),
    _cfg("v2-c4k-rawbacking", 4 * KiB, opts={"compat": "0.10"}, backing="raw"),
    _cfg("v2-c512-qcow2backing", 512, opts={"compat": "0.10"}, backing="qcow2", backing_cluster_size=4 * KiB),
    _cfg("lazy-c64k", opts={"lazy_refcounts": True}),
    _cfg("lazy-c4k-rc2-rawbacking", 4 * KiB, opts={"lazy_refcounts": True, "refcount_bits": 2}, backing="raw"),
    _cfg("extl2-16k", 16 * KiB, opts={"extended_l2": True}),
    _cfg("extl2-64k", opts={"extended_l2": True}),
    _cfg("extl2-16k-rawbacking", 16 * KiB, opts={"extended_l2": True}, backing="raw"),
    _cfg("extl2-64k-qcow2backing", opts={"extended_l2": True}, backing="qcow2", backing_cluster_size=4 * KiB),
    _cfg("zstd-c64k", opts={"compression_type": "zstd"}),
    _cfg("prealloc-metadata-c4k", 4 * KiB, opts={"preallocation": "metadata"}),
    _cfg("prealloc-falloc-c4k", 4 * KiB, opts={"preallocation": "falloc"}),
    _cfg("prealloc-full-c4k", 4 * KiB, opts={"preallocation": "full"}),
    _cfg("extl2-16k-prealloc-metadata-rawbacking", 16 * KiB,
         opts={"extended_l2": True, "preallocation": "metadata"}, backing="raw"),
    _cfg("datafile-c64k", data_file=True),
    _cfg("datafile-raw-c64k", data_file=True, opts={"data_file_raw": True}),
    _cfg("datafile-c4k-rawbacking", 4 * KiB, data_file=True, backing="raw"),
    _cfg("datafile-raw-extl2-16k", 16 * KiB, data_file=True, opts={"data_file_raw": True, "extended_l2": True}),
    _cfg("c64k-rawbacking", backing="raw"),
    _cfg("c64k-qcow2backing", backing="qcow2", backing_cluster_size=4 * KiB),
    _cfg("c4k-qcow2backing-shorter-relative", 4 * KiB, backing="qcow2", backing_shorter=3 * 4 * KiB + 512,
         backing_relative=True),
    _cfg("c64k-rawbacking-from-backing", backing="raw", from_backing=True),
]


# --------------------------------------------------------------------------- random operations

def random_range(rng: random.Random, cfg: Config) -> tuple[int, int]:
    """A guest range near a hotspot (or anywhere), with mixed alignments and lengths."""
    size, cs = cfg.virtual_size, cfg.cluster_size
    offset = rng.choice(cfg.hotspots()) + rng.randint(-3 * cs, 3 * cs) if rng.random() < 0.8 else rng.randrange(size)
    a = rng.random()
    if a < 0.3:
        offset = offset // cs * cs
    elif a < 0.5:
        offset = offset // 512 * 512
    offset = min(max(offset, 0), size - 1)
    r = rng.random()
    if r < 0.05:
        # long requests: with small clusters one request spans several L2 tables
        length = rng.randint(1, min(4 * MiB, 2 * cfg.l2_span + cs))
        if rng.random() < 0.5:
            offset = max(0, offset - length // 2)
    elif r < 0.15:
        length = 1
    elif r < 0.4:
        length = rng.randint(1, 700)
    elif r < 0.6:
        length = rng.randint(1, max(1, 3 * cs // 512)) * 512
    elif r < 0.8:
        length = cs * rng.randint(1, 3)
    else:
        length = rng.randint(1, 3 * cs + 777)
    return offset, min(length, size - offset)


def compressible(rng: random.Random, length: int) -> bytes:
    """Random-looking data that zlib/zstd shrink (so qemu really stores compressed clusters)."""
    unit = rng.randbytes(rng.randint(7, 97))
    return (unit * (length // len(unit) + 1))[:length]


def _as_buffer(rng: random.Random, data: bytes) -> Any:
    """The same bytes as one of the buffer types write_at must accept."""
    kind = rng.randrange(4)
    if kind == 0:
        return data
    if kind == 1:
        return bytearray(data)
    if kind == 2:
        return memoryview(bytearray(data))
    return array("B", data)


def run_ops(disk: QcowFile, mirror: Mirror, rng: random.Random, cfg: Config, count: int, label: str) -> None:
    """Apply `count` random operations to disk and mirror, checking every read at once."""
    history: list[str] = []
    kinds = ["write"] * 45 + ["zero"] * 12 + ["punch"] * 12 + ["read"] * 22 + ["readinto"] * 4 + ["flush"] * 5
    for i in range(count):
        kind = rng.choice(kinds)
        offset, length = random_range(rng, cfg)
        history.append(f"{kind}({offset:#x}, {length})")
        ctx = f"[{cfg.name} {label}] op {i} {history[-1]}; recent: {history[-8:-1]}"
        if kind == "write":
            data = rng.randbytes(length) if rng.random() < 0.8 else compressible(rng, length)
            n = disk.write_at(offset, _as_buffer(rng, data))
            assert n == length, f"{ctx}: write_at returned {n}"
            mirror.write(offset, data)
        elif kind == "zero":
            disk.write_zeroes(offset, length)
            mirror.zero(offset, length)
        elif kind == "punch":
            disk.punch_hole(offset, length)
            mirror.zero(offset, length)
        elif kind == "read":
            # Sometimes read past the end: read_at clips.
            extra = rng.choice([0, 0, 0, cfg.cluster_size])
            assert_same(disk.read_at(offset, length + extra), mirror.read(offset, length + extra), ctx)
        elif kind == "readinto":
            buf = bytearray(length)
            n = disk.readinto_at(memoryview(buf), offset)
            assert n == length, f"{ctx}: readinto_at returned {n}"
            assert_same(bytes(buf), mirror.read(offset, length), ctx)
        else:
            disk.flush()
        STATS["operations"] += 1
    STATS["sequences"] += 1


def verify_hotspots(disk: QcowFile, mirror: Mirror, cfg: Config, label: str) -> None:
    """Read every hotspot neighbourhood back and compare with the mirror."""
    span = 4 * cfg.cluster_size
    for spot in cfg.hotspots():
        start = max(0, spot - span)
        assert_same(disk.read_at(start, 2 * span), mirror.read(start, 2 * span),
                    f"[{cfg.name} {label}] hotspot {spot:#x}")


def verify_with_qemu(image: Path, mirror: Mirror, cfg: Config, work: Path, label: str,
                     data_file: Path | None = None) -> None:
    """qemu-img check clean, and qemu-img compare identical to the mirror (and the raw data file)."""
    assert_clean(str(image))
    raw = mirror.to_file(work / "mirror.raw")
    try:
        compare(str(image), raw, fmt_a="qcow2", fmt_b="raw")
    except AssertionError as e:
        raise AssertionError(f"[{cfg.name} {label}] {e}") from None
    if data_file is not None and cfg.opts.get("data_file_raw"):
        # data_file_raw promises the data file itself is the guest disk.
        compare(str(data_file), raw, fmt_a="raw", fmt_b="raw")


def qemu_continue(image: Path, mirror: Mirror, rng: random.Random, cfg: Config, work: Path, count: int) -> None:
    """Let qemu-io write to the image (random data, -z zeroes, -z -u, discards) and mirror it."""
    cs = cfg.cluster_size
    # v2 with a backing file un-allocates discarded clusters (the backing shows through); skip it there.
    discard_ok = not (cfg.v2 and cfg.backing)
    cmds: list[str] = []
    for _ in range(count):
        offset, length = random_range(rng, cfg)
        r = rng.random()
        if r < 0.6:
            data = rng.randbytes(length)
            p = work / f"qio{len(cmds)}.bin"
            p.write_bytes(data)
            cmds.append(f"write -q -s {p} {offset} {length}")
            mirror.write(offset, data)
        elif r < 0.75:
            cmds.append(f"write -q -z {offset} {length}")
            mirror.zero(offset, length)
        elif r < 0.85:
            cmds.append(f"write -q -z -u {offset} {length}")
            mirror.zero(offset, length)
        elif discard_ok:
            # discard only whole clusters: qemu ignores partial ones (their content stays)
            start = -(-offset // cs) * cs
            end = (offset + length) // cs * cs
            if end > start:
                cmds.append(f"discard -q {start} {end - start}")
                mirror.zero(start, end - start)
        STATS["qemu_operations"] += 1
    if cmds:
        qemu_io(str(image), *cmds)
    STATS["qemu_sequences"] += 1


def qemu_compress(image: Path, mirror: Mirror, rng: random.Random, cfg: Config, work: Path, count: int) -> None:
    """qemu-io `write -c` of compressible data onto distinct, never-written whole clusters.

    QEMU only compresses into unallocated clusters (over allocated ones it fails with EIO), so this
    runs first on a fresh image."""
    cs, size = cfg.cluster_size, cfg.virtual_size
    used: set[int] = set()
    cmds: list[str] = []
    for _ in range(count):
        offset, _length = random_range(rng, cfg)
        start = offset // cs * cs
        n = rng.randint(1, 3)
        clusters = set(range(start // cs, start // cs + n))
        if start + n * cs > size or clusters & used:
            continue
        used |= clusters
        data = compressible(rng, n * cs)
        p = work / f"qc{len(cmds)}.bin"
        p.write_bytes(data)
        cmds.append(f"write -q -c -s {p} {start} {n * cs}")
        mirror.write(start, data)
        STATS["qemu_operations"] += 1
    if cmds:
        qemu_io(str(image), *cmds)
    STATS["qemu_sequences"] += 1


# --------------------------------------------------------------------------- image setup

def make_backing(cfg: Config, work: Path, rng: random.Random) -> tuple[str, Mirror]:
    """A backing file with random (partly compressible) data around the hotspots, made by qemu-img."""
    size = cfg.virtual_size - cfg.backing_shorter
    m = Mirror(size)
    cs = cfg.cluster_size
    for spot in cfg.hotspots():
        for k in range(-4, 4):
            start = spot + k * cs
            if start < 0 or start >= size or rng.random() < 0.3:
                continue  # leave some holes
            # sometimes only a part of the cluster, at an unaligned position
            a = rng.randrange(0, cs, 512) if rng.random() < 0.3 else 0
            b = cs - (rng.randrange(0, cs // 2) if rng.random() < 0.3 else 0)
            length = min(b - a, size - start - a)
            if length > 0:
                m.write(start + a, rng.randbytes(length) if rng.random() < 0.7 else compressible(rng, length))
    raw = m.to_file(work / "backing.raw")
    if cfg.backing == "raw":
        # qemu-img makes the raw file (a resize-copy through qemu-img convert keeps it byte-identical)
        path = work / "base.img"
        qemu_img("convert", "-f", "raw", "-O", "raw", raw, str(path))
        return str(path), m
    path = work / "base.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cfg.backing_cluster_size}",
             raw, str(path))
    return str(path), m


def create_image(cfg: Config, work: Path, rng: random.Random) -> tuple[QcowFile, Path, Mirror, Path | None]:
    """Create the image under test with QcowFile; returns (open disk, path, mirror, data file)."""
    image = work / "disk.qcow2"
    opts = dict(cfg.opts)
    data_file = None
    if cfg.data_file:
        data_file = work / "data.raw"
        opts["data_file"] = str(data_file)
    if cfg.backing:
        backing, bmirror = make_backing(cfg, work, rng)
        name = os.path.basename(backing) if cfg.backing_relative else backing
        fmt = cfg.backing
        if cfg.from_backing:
            disk = QcowFile.create_from_backing(str(image), name, backing_format=fmt, **opts)
            mirror = bmirror
        else:
            disk = QcowFile.create(str(image), cfg.virtual_size, backing_file=name, backing_format=fmt, **opts)
            mirror = bmirror.resized(cfg.virtual_size)
    else:
        disk = QcowFile.create(str(image), cfg.virtual_size, **opts)
        mirror = Mirror(cfg.virtual_size)
    assert disk.virtual_size == mirror.size
    assert disk.cluster_size == cfg.cluster_size
    return disk, image, mirror, data_file


# --------------------------------------------------------------------------- the model tests

OPS_PER_SEQUENCE = 120


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_model_sequence(cfg: Config, tmp_path: Path) -> None:
    """qcowdisk writes, closes, reopens and writes; qemu-io continues; qcowdisk continues again."""
    _model_run(cfg, tmp_path, seed=zlib.crc32(cfg.name.encode()), ops=OPS_PER_SEQUENCE)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_model_sequence_soak(cfg: Config, seed: int, tmp_path: Path) -> None:
    """The same, with longer sequences and more seeds."""
    _model_run(cfg, tmp_path, seed=zlib.crc32(cfg.name.encode()) + 1000 * (seed + 1), ops=300)


def _model_run(cfg: Config, work: Path, seed: int, ops: int) -> None:
    rng = random.Random(seed)
    label = f"seed={seed}"
    disk, image, mirror, data_file = create_image(cfg, work, rng)
    with disk:
        run_ops(disk, mirror, rng, cfg, ops, f"{label} create")
        verify_hotspots(disk, mirror, cfg, f"{label} create")
    verify_with_qemu(image, mirror, cfg, work, f"{label} after create+close", data_file)

    with QcowFile.open(str(image)) as disk:
        verify_hotspots(disk, mirror, cfg, f"{label} reopen")
        run_ops(disk, mirror, rng, cfg, ops, f"{label} reopen")
    verify_with_qemu(image, mirror, cfg, work, f"{label} after reopen+close", data_file)

    qemu_continue(image, mirror, rng, cfg, work, max(4, ops // 3))
    verify_with_qemu(image, mirror, cfg, work, f"{label} after qemu-io (mirror check of the test itself)",
                     data_file)

    with QcowFile.open(str(image)) as disk:
        verify_hotspots(disk, mirror, cfg, f"{label} after qemu-io")
        run_ops(disk, mirror, rng, cfg, ops, f"{label} after qemu-io")
    verify_with_qemu(image, mirror, cfg, work, f"{label} after qemu-io+qcowdisk", data_file)

    with QcowFile.open(str(image), readonly=True) as disk:
        verify_hotspots(disk, mirror, cfg, f"{label} final read-only")


# Images QEMU wrote (compressed clusters, zero clusters, discards) that qcowdisk then writes over.
QEMU_CONFIGS: list[tuple[Config, str]] = [
    (_cfg("q-c64k"), ""),
    (_cfg("q-c512", 512), "cluster_size=512"),
    (_cfg("q-c4k-rc1", 4 * KiB), "cluster_size=4096,refcount_bits=1"),
    (_cfg("q-v2-c64k", opts={"compat": "0.10"}), "compat=0.10"),
    (_cfg("q-extl2-64k", opts={"extended_l2": True}), "extended_l2=on"),
    (_cfg("q-extl2-16k-rawbacking", 16 * KiB, opts={"extended_l2": True}, backing="raw"),
     "extended_l2=on,cluster_size=16384"),
    (_cfg("q-zstd-c4k", 4 * KiB, opts={"compression_type": "zstd"}), "compression_type=zstd,cluster_size=4096"),
    (_cfg("q-lazy-c64k", opts={"lazy_refcounts": True}), "lazy_refcounts=on"),
    (_cfg("q-c64k-qcow2backing", backing="qcow2", backing_cluster_size=4 * KiB), ""),
    (_cfg("q-v2-c4k-rawbacking", 4 * KiB, opts={"compat": "0.10"}, backing="raw"), "compat=0.10,cluster_size=4096"),
]


@pytest.mark.parametrize("cfg,options", QEMU_CONFIGS, ids=[c.name for c, _ in QEMU_CONFIGS])
def test_qcowdisk_continues_qemu_image(cfg: Config, options: str, tmp_path: Path) -> None:
    """qemu-io writes (incl. -c compressed, -z zero clusters, discard); qcowdisk writes over them."""
    rng = random.Random(zlib.crc32(cfg.name.encode()))
    image = tmp_path / "qemu.qcow2"
    if cfg.backing:
        backing, bmirror = make_backing(cfg, tmp_path, rng)
        create(str(image), cfg.virtual_size, options=options or None, backing=backing, backing_fmt=cfg.backing)
        mirror = bmirror.resized(cfg.virtual_size)
    else:
        create(str(image), cfg.virtual_size, options=options or None)
        mirror = Mirror(cfg.virtual_size)
    # compressed clusters first (QEMU compresses only into unallocated clusters), then plain writes,
    # zero writes and discards, twice so that later commands land on what the first ones left
    qemu_compress(image, mirror, rng, cfg, tmp_path, 12)
    assert check(str(image)).get("compressed-clusters", 0) > 0, "test premise: qemu stored no compressed cluster"
    qemu_continue(image, mirror, rng, cfg, tmp_path, 25)
    qemu_continue(image, mirror, rng, cfg, tmp_path, 25)
    verify_with_qemu(image, mirror, cfg, tmp_path, "qemu-io only (mirror check of the test itself)")

    with QcowFile.open(str(image)) as disk:
        verify_hotspots(disk, mirror, cfg, "qemu image, before writing")
        run_ops(disk, mirror, rng, cfg, OPS_PER_SEQUENCE, "over qemu image")
    verify_with_qemu(image, mirror, cfg, tmp_path, "after qcowdisk wrote over qemu image")

    qemu_continue(image, mirror, rng, cfg, tmp_path, 10)
    verify_with_qemu(image, mirror, cfg, tmp_path, "qemu-io after qcowdisk")


# --------------------------------------------------------------------------- hypothesis stateful

HYP_CONFIGS = [c for c in CONFIGS if c.name in (
    "c512", "c4k-rc2", "extl2-16k", "v2-c4k-rawbacking", "c64k-rawbacking", "lazy-c4k-rc2-rawbacking",
    "extl2-16k-rawbacking", "datafile-raw-c64k")]


class WriteMachine(RuleBasedStateMachine):
    """Hypothesis drives writes, zeroes, holes, reads, flushes and reopens; the mirror judges."""

    def __init__(self) -> None:
        super().__init__()
        self.work = Path(tempfile.mkdtemp(prefix="qcowdisk-hyp-"))
        self.disk: QcowFile | None = None
        self.cfg: Config | None = None
        self.mirror: Mirror | None = None
        self.image: Path | None = None
        self.data_file: Path | None = None
        self.last: tuple[int, int] = (0, 1)
        self.steps = 0

    @initialize(cfg=st.sampled_from(HYP_CONFIGS), seed=st.integers(0, 2**16))
    def setup(self, cfg: Config, seed: int) -> None:
        self.cfg = cfg
        self.disk, self.image, self.mirror, self.data_file = create_image(cfg, self.work, random.Random(seed))

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        assert self.cfg is not None
        cs, size = self.cfg.cluster_size, self.cfg.virtual_size
        spot = data.draw(st.sampled_from(self.cfg.hotspots()), label="hotspot")
        delta = data.draw(st.integers(-3 * cs, 3 * cs), label="delta")
        if data.draw(st.booleans(), label="align"):
            delta = delta // 512 * 512
        offset = min(max(spot + delta, 0), size - 1)
        length = data.draw(st.one_of(st.integers(1, 600), st.sampled_from([cs, 2 * cs, cs // 2 or 1, 512]),
                                     st.integers(1, 3 * cs + 100)), label="length")
        self.last = (offset, min(length, size - offset))
        return self.last

    def _count(self) -> None:
        self.steps += 1
        STATS["hypothesis_steps"] += 1

    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def write(self, data: st.DataObject, seed: int) -> None:
        assert self.disk is not None and self.mirror is not None
        offset, length = self._range(data)
        payload = random.Random(seed).randbytes(length)
        assert self.disk.write_at(offset, payload) == length
        self.mirror.write(offset, payload)
        self._count()

    @rule(data=st.data())
    def write_zeroes(self, data: st.DataObject) -> None:
        assert self.disk is not None and self.mirror is not None
        offset, length = self._range(data)
        self.disk.write_zeroes(offset, length)
        self.mirror.zero(offset, length)
        self._count()

    @rule(data=st.data())
    def punch_hole(self, data: st.DataObject) -> None:
        assert self.disk is not None and self.mirror is not None
        offset, length = self._range(data)
        self.disk.punch_hole(offset, length)
        self.mirror.zero(offset, length)
        self._count()

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        assert self.disk is not None and self.mirror is not None
        offset, length = self._range(data)
        assert_same(self.disk.read_at(offset, length), self.mirror.read(offset, length), "hypothesis read")
        self._count()

    @rule()
    def flush(self) -> None:
        assert self.disk is not None
        self.disk.flush()
        self._count()

    @precondition(lambda self: self.disk is not None)
    @rule()
    def reopen(self) -> None:
        assert self.disk is not None and self.image is not None
        self.disk.close()
        self.disk = None
        self.disk = QcowFile.open(str(self.image))
        self._count()

    @invariant()
    def last_range_reads_back(self) -> None:
        """The neighbourhood of the last operation reads as the mirror says."""
        assert self.disk is not None and self.mirror is not None and self.cfg is not None
        cs = self.cfg.cluster_size
        offset, length = self.last
        start = max(0, offset - cs)
        assert_same(self.disk.read_at(start, length + 2 * cs), self.mirror.read(start, length + 2 * cs),
                    "hypothesis invariant")

    def teardown(self) -> None:
        try:
            if self.disk is not None:
                self.disk.close()
                self.disk = None
                assert self.cfg is not None and self.mirror is not None and self.image is not None
                verify_with_qemu(self.image, self.mirror, self.cfg, self.work, "hypothesis teardown",
                                 self.data_file)
            STATS["hypothesis_examples"] += 1
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


_HYP_COMMON = {"deadline": None, "database": None, "derandomize": False,
               "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much]}


def test_stateful_writes() -> None:
    """A bounded hypothesis run (the unmarked suite)."""
    run_state_machine_as_test(WriteMachine, settings=settings(max_examples=25, stateful_step_count=20,
                                                              **_HYP_COMMON))


@pytest.mark.slow
def test_stateful_writes_soak() -> None:
    """A long hypothesis run."""
    run_state_machine_as_test(WriteMachine, settings=settings(max_examples=300, stateful_step_count=60,
                                                              **_HYP_COMMON))
