"""Compressed writes (`QcowFile.write_compressed`, `qcowdisk write -c`) against QEMU 7.2.

QEMU is the oracle: `qemu-img convert -O raw` must read back every cluster qcowdisk wrote
(compared with a bytearray model), `qemu-img check` must find the image clean with exactly the
compressed clusters written, and `qemu-img map` must show them as data without a host offset.
Payloads are inspected straight from the file (imagefactory.l2_entries) with the descriptor
codec of qcowdisk.qcow2.entries.
"""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest

from imagefactory import CLUSTER_SIZES, l2_entries, make_image, map_at, qemu_map
from qcowdisk import QcowFile, ReadOnlyError, UnsupportedFeatureError
from qcowdisk.cli import main as cli_main
from qcowdisk.qcow2 import ordering
from qcowdisk.qcow2.compress import compress_cluster
from qcowdisk.qcow2.entries import CompressedDescriptor
from qcowdisk.qcow2.format import COMPRESSION_ZLIB, COMPRESSION_ZSTD
from qemutools import check, qemu_img, qemu_io, run, to_raw, write_raw

KiB = 1024
MiB = 1024 * KiB
TYPES = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}


# --------------------------------------------------------------------------- helpers

def guest_view(image: str | Path) -> bytes:
    """What QEMU reads: the image converted to raw."""
    return to_raw(str(image), str(image) + ".raw")


def payloads(image: str | Path) -> dict[int, tuple[int, int]]:
    """{guest cluster: (host byte offset, bytes the descriptor covers)} of every compressed entry."""
    path = str(image)
    with open(path, "rb") as f:
        cluster_bits = int.from_bytes(f.read(24)[20:24], "big")
    desc = CompressedDescriptor(cluster_bits)
    return {e.guest_cluster: desc.decode(e.entry) for e in l2_entries(path) if e.compressed}


def assert_checks(image: str | Path, compressed: int) -> dict:
    """qemu-img check: clean, no leaks, exactly `compressed` compressed clusters."""
    r = check(str(image))
    assert r["returncode"] == 0 and not r.get("leaks") and not r.get("corruptions") and not r.get("check-errors"), r
    assert r.get("compressed-clusters", 0) == compressed, r
    return r


def assert_map_compressed(image: str | Path, cluster_size: int, clusters: list[int], uncompressed: list[int]) -> None:
    """qemu-img map: compressed clusters are data without an offset, the others carry one."""
    m = qemu_map(str(image))
    for gc in clusters:
        e = map_at(m, gc * cluster_size)
        assert e["data"] and "offset" not in e, (gc, e)
    for gc in uncompressed:
        e = map_at(m, gc * cluster_size)
        assert e["data"] and "offset" in e, (gc, e)


def qemu_io_output(image: str, *commands: str) -> str:
    """qemu-io output of COMMANDS in one process, errors included (qemutools.qemu_io fails on them)."""
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    p = run(*args, image, check=False)
    return p.stdout + p.stderr


_WORDS = [b"cluster", b"refcount", b"table", b"guest", b"host", b"offset", b"qcow2", b"backing",
          b"snapshot", b"zero", b"data", b"the", b"of", b"and", b"\n", b"0x1f00", b"L2"]


def text(n: int, seed: int) -> bytes:
    """Compressible, seeded, non-repeating bytes (imagefactory.text_like's vocabulary, faster)."""
    out = b" ".join(random.Random(seed).choices(_WORDS, k=n // 4 + 1))
    return out[:n]


def noise(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- every cluster size

@pytest.mark.parametrize("ctype", list(TYPES))
@pytest.mark.parametrize("cs", CLUSTER_SIZES, ids=[f"c{c}" for c in CLUSTER_SIZES])
def test_every_cluster_size(tmp_path: Path, cs: int, ctype: str) -> None:
    """Packed payloads, an incompressible cluster, a zero cluster, a padded short last cluster
    and a replaced cluster: QEMU reads them all, counts them, maps them without offsets."""
    short = cs // 2 if cs > 512 else 0
    size = 8 * cs + short
    img = str(tmp_path / "c.qcow2")
    model = bytearray(size)
    with QcowFile.create(img, size, cluster_size=cs, compression_type=ctype) as d:
        first = text(3 * cs, 1) + noise(cs, 2) + bytes(cs)   # clusters 0-2 text, 3 noise, 4 zeros
        d.write_compressed(0, first)
        model[:5 * cs] = first
        d.flush()
        p = payloads(img)
        assert sorted(p) == [0, 1, 2, 4], "the incompressible cluster 3 must be stored uncompressed"
        lengths = [len(compress_cluster(first[g * cs:(g + 1) * cs], TYPES[ctype])) for g in (0, 1, 2)]
        # packed: each payload starts where the one before it ended
        assert p[1][0] == p[0][0] + lengths[0] and p[2][0] == p[1][0] + lengths[1], (p, lengths)
        tail = text(2 * cs + short, 3)[:cs + short] if short else text(cs, 3)
        d.write_compressed(7 * cs, tail)  # ends at the disk's end (short last cluster)
        model[7 * cs:] = tail
        d.write_compressed(6 * cs, text(cs, 4))
        model[6 * cs:7 * cs] = text(cs, 4)
        d.write_compressed(cs, text(cs, 5))  # replace a compressed cluster
        model[cs:2 * cs] = text(cs, 5)
        assert d.read_at(0, size) == bytes(model)
    assert guest_view(img) == bytes(model)
    compressed = [0, 1, 2, 4, 6, 7] + ([8] if short else [])
    assert_checks(img, len(compressed))
    assert_map_compressed(img, cs, compressed, [3])
    with QcowFile.open(img, readonly=True) as d:
        assert d.read_at(0, size) == bytes(model)


@pytest.mark.parametrize("cs", [4096, 65536])
def test_zlib_payload_is_what_qemu_writes(tmp_path: Path, cs: int) -> None:
    """At QEMU's level: for the same cluster, the zlib payload is byte for byte QEMU's (both link
    the system zlib); zstd payloads decode in QEMU whatever libzstd version wrote them."""
    data = text(cs, 7)
    src = write_raw(str(tmp_path / "src"), data)
    theirs = make_image(str(tmp_path / "q.qcow2"), 4 * cs, f"cluster_size={cs}", commands=[f"write -c -s {src} 0 {cs}"])
    with QcowFile.create(str(tmp_path / "o.qcow2"), 4 * cs, cluster_size=cs) as d:
        d.write_compressed(0, data)
    qoff, qlen = payloads(theirs)[0]
    ooff, olen = payloads(tmp_path / "o.qcow2")[0]
    assert qlen == olen
    if zlib.ZLIB_RUNTIME_VERSION == zlib.ZLIB_VERSION:  # Python's zlib is the system one
        with open(theirs, "rb") as f, open(tmp_path / "o.qcow2", "rb") as g:
            assert os.pread(f.fileno(), qlen, qoff) == os.pread(g.fileno(), olen, ooff)


# --------------------------------------------------------------------------- packing, crossing, widths

def test_payloads_cross_into_the_next_contiguous_cluster(tmp_path: Path) -> None:
    """512-byte clusters, payloads of a few hundred bytes: some cross a host cluster boundary,
    both clusters count them (qemu-img check clean), and QEMU decodes them all."""
    cs = 512
    img = str(tmp_path / "x.qcow2")
    data = b"".join(text(160, s) + noise(160, s) + bytes(192) for s in range(64))
    with QcowFile.create(img, len(data), cluster_size=cs) as d:
        d.write_compressed(0, data)
    p = payloads(img)
    assert len(p) == 64
    crossing = [g for g, (off, _) in p.items()
                if off // cs != (off + len(compress_cluster(data[g * cs:(g + 1) * cs], 0)) - 1) // cs]
    assert crossing, "no payload crossed into the next host cluster"
    assert guest_view(img) == data
    assert_checks(img, 64)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 64])
def test_refcount_width_limits_payloads_per_cluster(tmp_path: Path, refcount_bits: int) -> None:
    """A host cluster takes payloads only while its count is below the width's maximum."""
    cs = 65536
    img = str(tmp_path / "w.qcow2")
    data = b"".join(text(cs, s) for s in range(12))
    with QcowFile.create(img, 16 * cs, cluster_size=cs, refcount_bits=refcount_bits) as d:
        d.write_compressed(0, data)
    starts: dict[int, int] = {}
    for off, _ in payloads(img).values():
        starts[off // cs] = starts.get(off // cs, 0) + 1
    assert max(starts.values()) <= (1 << refcount_bits) - 1
    if refcount_bits >= 4:
        assert max(starts.values()) > 1, "payloads were not packed"
    assert guest_view(img)[:len(data)] == data
    assert_checks(img, 12)


# --------------------------------------------------------------------------- mixing with QEMU

@pytest.mark.parametrize("ctype", list(TYPES))
def test_mixed_with_qemu_write_c(tmp_path: Path, ctype: str) -> None:
    """QEMU's write -c and qcowdisk's in one image, in turns; qcowdisk replaces one of QEMU's
    compressed clusters; QEMU reads everything, check is clean, counts match."""
    cs = 65536
    img = make_image(str(tmp_path / "m.qcow2"), 32 * cs, f"compression_type={ctype}")
    model = bytearray(32 * cs)
    src = write_raw(str(tmp_path / "q1"), text(2 * cs, 10))
    qemu_io(img, f"write -c -s {src} 0 {2 * cs}", f"write -c -P 0x11 {4 * cs} {cs}")
    model[0:2 * cs] = text(2 * cs, 10)
    model[4 * cs:5 * cs] = b"\x11" * cs
    with QcowFile.open(img) as d:
        assert d.read_at(0, 32 * cs) == bytes(model)
        d.write_compressed(2 * cs, text(2 * cs, 11))
        model[2 * cs:4 * cs] = text(2 * cs, 11)
        d.write_compressed(cs, text(cs, 12))  # replaces QEMU's payload
        model[cs:2 * cs] = text(cs, 12)
    src2 = write_raw(str(tmp_path / "q2"), text(cs, 13))
    qemu_io(img, f"write -c -s {src2} {8 * cs} {cs}")
    model[8 * cs:9 * cs] = text(cs, 13)
    with QcowFile.open(img) as d:
        d.write_compressed(9 * cs, text(cs, 14))
        model[9 * cs:10 * cs] = text(cs, 14)
        assert d.read_at(0, 32 * cs) == bytes(model)
    assert guest_view(img) == bytes(model)
    assert_checks(img, 7)
    assert_map_compressed(img, cs, [0, 1, 2, 3, 4, 8, 9], [])


def test_extended_l2(tmp_path: Path) -> None:
    """Extended L2: the compressed entry's bitmap is 0 (as QEMU writes it), also over a cluster
    with some subclusters allocated; QEMU and qcowdisk read each other's compressed clusters."""
    cs = 65536
    img = make_image(str(tmp_path / "e.qcow2"), 16 * cs, "extended_l2=on",
                     commands=["write -c -P 0x21 0 64k", "write -P 0x22 128k 4k"])
    model = bytearray(16 * cs)
    model[0:cs] = b"\x21" * cs
    model[2 * cs:2 * cs + 4096] = b"\x22" * 4096
    with QcowFile.open(img) as d:
        d.write_compressed(cs, text(cs, 20))
        model[cs:2 * cs] = text(cs, 20)
        d.write_compressed(2 * cs, text(cs, 21))  # over a partly allocated cluster
        model[2 * cs:3 * cs] = text(cs, 21)
        assert d.read_at(0, 16 * cs) == bytes(model)
    entries = {e.guest_cluster: e for e in l2_entries(img)}
    for gc in (0, 1, 2):
        assert entries[gc].compressed and entries[gc].bitmap == 0, entries[gc]
    assert guest_view(img) == bytes(model)
    assert_checks(img, 3)


def test_version2_image_and_overlay(tmp_path: Path) -> None:
    """compat=0.10 images take compressed clusters; on an overlay a compressed cluster hides
    the backing file's cluster entirely."""
    cs = 65536
    base = make_image(str(tmp_path / "base.qcow2"), 8 * cs, "compat=0.10", commands=["write -P 0x5a 0 512k"])
    top = str(tmp_path / "top.qcow2")
    with QcowFile.create_from_backing(top, base, compat="0.10") as d:
        d.write_compressed(cs, text(cs, 30))
    model = bytearray(b"\x5a" * 8 * cs)
    model[cs:2 * cs] = text(cs, 30)
    assert guest_view(top) == bytes(model)
    assert_checks(top, 1)


def test_lazy_refcounts(tmp_path: Path) -> None:
    """With lazy refcounts the counts are rebuilt from the payloads on a dirty open."""
    cs = 65536
    img = str(tmp_path / "l.qcow2")
    with QcowFile.create(img, 8 * cs, lazy_refcounts=True) as d:
        d.write_compressed(0, text(3 * cs, 40))
        d.write_compressed(cs, text(cs, 41))
    assert guest_view(img)[:3 * cs] == text(cs, 40)[:cs] + text(cs, 41) + text(3 * cs, 40)[2 * cs:]
    assert_checks(img, 3)


# --------------------------------------------------------------------------- replacing and freeing

def test_replace_every_kind_of_cluster(tmp_path: Path) -> None:
    """Over a data cluster, a preallocated zero cluster, a zero cluster, a compressed cluster and
    a cluster shared with an internal snapshot: replaced, nothing leaked, the snapshot intact."""
    cs = 65536
    img = make_image(str(tmp_path / "r.qcow2"), 16 * cs, commands=[
        "write -P 0x31 0 64k", "write -z 64k 64k", "write -c -P 0x33 192k 64k", "write -P 0x34 256k 64k"])
    qemu_img("snapshot", "-c", "snap", img)
    qemu_io(img, "write -z -u 320k 64k")  # not shared: a plain zero cluster now
    model = bytearray(16 * cs)
    for gc in range(6):
        model[gc * cs:(gc + 1) * cs] = text(cs, 50 + gc)
    with QcowFile.open(img) as d:
        d.write_compressed(0, bytes(model[:6 * cs]))
        assert d.read_at(0, 16 * cs) == bytes(model)
    assert guest_view(img) == bytes(model)
    assert_checks(img, 6)
    snap = str(tmp_path / "snap.raw")
    qemu_img("convert", "-l", "snapshot.name=snap", "-O", "raw", img, snap)
    with open(snap, "rb") as f:
        old = f.read()
    assert old[:cs] == b"\x31" * cs and old[3 * cs:4 * cs] == b"\x33" * cs and old[4 * cs:5 * cs] == b"\x34" * cs


def test_ordinary_write_over_compressed_and_last_payload_frees_host_cluster(tmp_path: Path) -> None:
    """An ordinary write over a compressed cluster goes to a new cluster; once the last payload
    of a shared host cluster is gone (overwritten, zeroed, punched), that cluster is freed."""
    cs = 65536
    img = str(tmp_path / "f.qcow2")
    with QcowFile.create(img, 16 * cs) as d:
        d.write_compressed(0, text(4 * cs, 60))  # four payloads, one host cluster
    shared = {off // cs for off, _ in payloads(img).values()}
    assert len(shared) == 1
    host = shared.pop()
    with QcowFile.open(img) as d:
        d.write_at(0, noise(cs, 61))
        d.write_zeroes(cs, cs)
        d.punch_hole(2 * cs, cs)
    assert_checks(img, 1)
    with QcowFile.open(img) as d:
        d.write_at(3 * cs + 100, b"x" * 10)  # copy-on-write of the last payload
    assert_checks(img, 0)
    with open(img, "rb") as f:
        assert not any(os.pread(f.fileno(), cs, host * cs)), "the freed cluster was not handed back"
    expect = noise(cs, 61) + bytes(2 * cs) + text(4 * cs, 60)[3 * cs:3 * cs + 100] + b"x" * 10
    assert guest_view(img)[:len(expect)] == expect
    assert_checks(img, 0)


def test_freed_byte_cluster_is_not_packed_into_after_reuse(tmp_path: Path) -> None:
    """The byte allocator forgets its cluster when the cluster is freed: QEMU 7.2 does not, and
    packs the next payload into whatever the freed cluster became (a data cluster here)."""
    cs = 65536
    img = str(tmp_path / "b.qcow2")
    with QcowFile.create(img, 16 * cs) as d:
        d.write_compressed(0, b"\1" * cs)
        d.write_at(0, b"\2" * cs)
        d.flush()  # the payload's cluster is free now
        d.write_at(2 * cs, b"\3" * cs)  # ... and reused whole
        d.write_compressed(4 * cs, b"\4" * cs)
        assert d.read_at(2 * cs, cs) == b"\3" * cs
    qemu_io(img, "read -P 2 0 64k", "read -P 3 128k 64k", "read -P 4 256k 64k")
    assert_checks(img, 1)


@pytest.mark.parametrize("flush_every", [1, 7, 0], ids=["flush1", "flush7", "noflush"])
def test_repeated_replacement_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flush_every: int) -> None:
    """Rewriting the same compressed clusters over and over keeps the file small: with flushes,
    and without any (the compressed writes then flush once enough frees are queued; the bound is
    lowered here so 300 rewrites cross it several times)."""
    monkeypatch.setattr(ordering, "FREE_PILE_BYTES", 1 << 20)  # 64 queued frees at 64 KiB
    cs = 65536
    img = str(tmp_path / "g.qcow2")
    blobs = [text(2 * cs, i) for i in range(10)]
    model = bytearray(64 * cs)
    with QcowFile.create(img, 64 * cs) as d:
        for i in range(300):
            data = blobs[i % 10]
            d.write_compressed((i % 8) * cs, data)
            model[(i % 8) * cs:(i % 8 + 2) * cs] = data
            if flush_every and i % flush_every == 0:
                d.flush()
    size = os.path.getsize(img)
    # 300 rewrites of two ~30 KiB payloads each (~18 MiB in all) must not accumulate
    assert size < 96 * cs, f"file grew to {size} bytes"
    assert guest_view(img) == bytes(model)
    assert_checks(img, 9)


# --------------------------------------------------------------------------- refusals

def test_alignment_and_bounds_are_checked(tmp_path: Path) -> None:
    """Misaligned offsets and partial clusters (except at the disk's end) raise ValueError, as
    QEMU answers EINVAL; a zero-length write does nothing; nothing is written by a refusal."""
    cs = 65536
    img = str(tmp_path / "a.qcow2")
    size = 4 * cs + 4096
    with QcowFile.create(img, size) as d:
        with pytest.raises(ValueError, match="multiple of the cluster size"):
            d.write_compressed(512, text(cs, 1))
        with pytest.raises(ValueError, match="unless the write ends at the end of the disk"):
            d.write_compressed(0, text(cs + 4096, 1))
        with pytest.raises(ValueError, match="past the virtual size"):
            d.write_compressed(4 * cs, text(cs, 1))
        assert d.write_compressed(123, b"") == 0
        assert d.write_compressed(3 * cs, text(cs + 4096, 2)) == cs + 4096  # ends at the end
        d.write_compressed(4 * cs, text(4096, 3))  # only the short last cluster
    # QEMU answers the same requests EINVAL, and accepts the last two
    q = make_image(str(tmp_path / "q.qcow2"), size)
    for cmd in (f"write -c 512 {cs}", f"write -c 0 {cs + 4096}"):
        out = qemu_io_output(q, cmd)
        assert "Invalid argument" in out, out
    assert "wrote" in qemu_io_output(q, f"write -c {4 * cs} 4096")
    assert_checks(img, 2)
    assert guest_view(img)[3 * cs:] == text(cs + 4096, 2)[:cs] + text(4096, 3)


def test_refusals(tmp_path: Path) -> None:
    """External data file: refused as QEMU refuses it; read-only: ReadOnlyError."""
    cs = 65536
    img = str(tmp_path / "d.qcow2")
    with QcowFile.create(img, 4 * cs, data_file=str(tmp_path / "d.raw")) as d:
        with pytest.raises(UnsupportedFeatureError, match="external data file"):
            d.write_compressed(0, text(cs, 1))
        d.write_at(0, b"still writable")
    assert "Operation not supported" in qemu_io_output(img, "write -c 0 64k")
    plain = str(tmp_path / "p.qcow2")
    QcowFile.create(plain, 4 * cs).close()
    with QcowFile.open(plain, readonly=True) as d, pytest.raises(ReadOnlyError):
        d.write_compressed(0, text(cs, 1))


# --------------------------------------------------------------------------- CLI

def test_cli_write_c(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`qcowdisk write -c` writes compressed; misaligned or partial requests exit 1 (qemu-io's
    write -c fails them with EINVAL and exit 1 too)."""
    cs = 65536
    img = str(tmp_path / "cli.qcow2")
    QcowFile.create(img, 8 * cs).close()
    src = write_raw(str(tmp_path / "src"), text(2 * cs, 70))
    assert cli_main(["write", "-c", img, "64k", src]) == 0
    assert cli_main(["write", "-c", "-q", img, "0", "--pattern", "0x41", "--length", "64k"]) == 0
    assert "wrote 131072/131072 bytes at offset 65536" in capsys.readouterr().out
    assert cli_main(["write", "-c", img, "512", "--pattern", "1", "--length", "64k"]) == 1
    assert "write failed: Invalid argument" in capsys.readouterr().err  # qemu-io write -c's words
    assert cli_main(["write", "-c", img, "0", "--pattern", "1", "--length", "4k"]) == 1
    assert_checks(img, 3)
    assert_map_compressed(img, cs, [0, 1, 2], [])
    assert guest_view(img)[:3 * cs] == b"A" * cs + text(2 * cs, 70)


def test_qemu_7_2_packs_into_a_freed_byte_cluster(tmp_path: Path) -> None:
    """Why qcowdisk's byte allocator forgets a freed cluster: QEMU 7.2 does not (its
    free_byte_offset survives the free), so its next compressed payload lands in the tail of the
    data cluster that reused it. This pins the oracle's behaviour the test above departs from."""
    img = make_image(str(tmp_path / "q.qcow2"), "1M")
    out = qemu_io_output(img, "write -c -P 1 0 64k", "write -P 2 0 64k", "write -P 3 128k 64k",
                           "write -c -P 4 256k 64k", "read -P 3 128k 64k")
    assert "Pattern verification failed at offset 131072" in out, out
    r = check(img)
    assert r["returncode"] == 2 and r["corruptions"] == 1, r

