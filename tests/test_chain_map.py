"""The chain map (qcow2/chain.py): small reads through a backing chain go straight to the layer
that owns the granule, remembered from the first read. Every test reads a range (so the map
holds it), changes what the chain says about it, then reads again: a map that outlived the
change would serve stale bytes, or bytes of another file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagefactory import make_image
from qcowdisk import QcowFile
from qcowdisk.qcow2 import chain
from qemutools import assert_clean, qemu_img, to_raw

KiB = 1024
MiB = 1024 * KiB
X = 5 * MiB  # a cluster the base owns


def _chain(tmp_path: Path, depth: int = 4, fill: int = 7, name: str = "b") -> str:
    """A base filled with `fill` under `depth` qcow2 layers that each write one other cluster."""
    prev = make_image(str(tmp_path / f"{name}0.qcow2"), 16 * MiB, commands=[f"write -P {fill} 0 16M"])
    for i in range(1, depth + 1):
        prev = make_image(str(tmp_path / f"{name}{i}.qcow2"), 16 * MiB, backing=prev, backing_fmt="qcow2",
                          commands=[f"write -P {0x40 + i} {i * MiB} 64k"])
    return prev


def _reads(d: QcowFile, offset: int, length: int = 4096) -> list[bytes]:
    """The range read three times each way (the first read fills the map, the rest use it)."""
    out = [d.read_at(offset, length) for _ in range(3)]
    for _ in range(3):
        buf = bytearray(length)
        assert d.readinto_at(buf, offset) == length
        out.append(bytes(buf))
    return out


def _map(d: QcowFile) -> chain.ChainMap:
    fast = d._fast
    assert fast is not None and fast[16] is not None
    return fast[16]


def test_map_serves_repeated_reads_from_the_owner(tmp_path: Path) -> None:
    with QcowFile.open(_chain(tmp_path), readonly=True) as d:
        assert _reads(d, X + 8192) == [b"\7" * 4096] * 6
        hit = _map(d)[X >> 16]
        assert hit is not None and Path(hit[1].filename).name == "b0.qcow2"
        assert _reads(d, 2 * MiB + 100) == [b"\x42" * 4096] * 6  # owned by a layer in between


def test_writes_to_the_top_replace_the_map(tmp_path: Path) -> None:
    """Zeroing, discarding and writing the top image after the map holds the range: each read
    after the change sees it."""
    top = _chain(tmp_path)
    with QcowFile.open(top) as d:
        assert _reads(d, X) == [b"\7" * 4096] * 6
        d.write_zeroes(X, 64 * KiB)  # a zero cluster in the top
        assert _reads(d, X) == [bytes(4096)] * 6
        d.discard(X, 64 * KiB)  # unallocated again: the base's bytes
        assert _reads(d, X) == [b"\7" * 4096] * 6
        d.write_at(X + 4096, b"\x09" * 4096)
        assert _reads(d, X + 4096) == [b"\x09" * 4096] * 6
        assert _reads(d, X + 8192) == [b"\7" * 4096] * 6  # the rest of that cluster: copied from the base
        view = d.read_at(0, len(d))
    assert_clean(top)  # and QEMU reads the chain as qcowdisk last did
    assert to_raw(top, str(tmp_path / "top.raw")) == view


def test_new_backing_file_replaces_the_map(tmp_path: Path) -> None:
    """`set_backing_file` swaps the chain under an open top: reads come from the new chain."""
    top = _chain(tmp_path)
    other = _chain(tmp_path, depth=2, fill=5, name="o")
    with QcowFile.open(top) as d:
        assert _reads(d, X) == [b"\7" * 4096] * 6
        d.set_backing_file(other, "qcow2")
        assert _reads(d, X) == [b"\5" * 4096] * 6


def test_closed_owner_is_never_read_through_a_reused_descriptor(tmp_path: Path) -> None:
    """Closing a layer below the top (which closes the owner too) ends what the map says: a read
    raises as a closed image does, and never returns another file's bytes through the owner's
    descriptor number, reused by a file opened since."""
    other = tmp_path / "other"
    other.write_bytes(b"\xee" * (32 * MiB))
    with QcowFile.open(_chain(tmp_path), readonly=True) as d:
        assert _reads(d, X) == [b"\7" * 4096] * 6
        hit = _map(d)[X >> 16]
        assert hit is not None
        fd = hit[1]._state.host.fd
        backing = d.backing
        assert isinstance(backing, QcowFile)
        backing.close()
        held = []
        try:
            while not held or held[-1] != fd:
                held.append(os.open(other, os.O_RDONLY))
                if len(held) > 200:
                    pytest.skip("the descriptor number was not reused")
            with pytest.raises(ValueError, match="closed"):
                d.read_at(X, 4096)
            buf = bytearray(4096)
            with pytest.raises(ValueError, match="closed"):
                d.readinto_at(buf, X)
            assert b"\xee" not in buf
        finally:
            for h in held:
                os.close(h)


def test_map_matches_qemu_on_a_mixed_chain(tmp_path: Path) -> None:
    """Layers of 64 KiB and 4 KiB clusters, extended L2, a zero cluster and a discard in the
    middle, a compressed cluster in the base, a middle layer shorter than the disk: two passes
    of 4 KiB reads (the second served by the map where it holds an entry) read what qemu-img
    convert writes."""
    base = make_image(str(tmp_path / "base.qcow2"), 8 * MiB, "cluster_size=4096",
                      commands=["write -c -P 2 1M 4k", "write -P 1 0 1M", "write -P 1 1028k 7164k"])
    mid = make_image(str(tmp_path / "mid.qcow2"), 6 * MiB, "cluster_size=65536,extended_l2=on", backing=base,
                     backing_fmt="qcow2", commands=["write -P 3 2M 64k", "write -P 4 2200k 8k",
                                                    "write -z 3M 64k", "discard 3200k 64k"])
    top = make_image(str(tmp_path / "top.qcow2"), 6 * MiB, "cluster_size=65536", backing=mid, backing_fmt="qcow2",
                     commands=["write -P 5 4M 4k", "write -z 4160k 64k"])
    qemu_img("resize", "-q", top, str(8 * MiB))
    want = to_raw(top, str(tmp_path / "want.raw"))
    with QcowFile.open(top, readonly=True) as d:
        for _ in range(2):
            assert b"".join(d.read_at(off, 4096) for off in range(0, 8 * MiB, 4096)) == want
            buf = bytearray(4096)
            for off in range(2048, 8 * MiB - 4096, 4096 * 7):
                d.readinto_at(buf, off)
                assert buf == want[off:off + 4096]
        cmap = _map(d)
        assert cmap.gbits == 12
        assert any(v is not None for v in cmap.values()) and None in cmap.values()


def test_map_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "CHAIN_MAP_LIMIT", 8)
    with QcowFile.open(_chain(tmp_path), readonly=True) as d:
        for _ in range(2):
            for k in range(64):
                assert d.read_at(8 * MiB + k * 64 * KiB, 4096) == b"\7" * 4096
                assert len(_map(d)) <= 8
