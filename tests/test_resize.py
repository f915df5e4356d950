"""Resizing (`QcowFile.resize`, `qcowdisk resize`) against QEMU 7.2, the oracle.

Every resize is checked the same ways: `qemu-img check` clean (no leaks, also after a shrink),
`qemu-img info` showing the new virtual size, and the guest view equal to a bytearray model,
both as `qemu-img compare` against the model written out raw and as qcowdisk reads it back.
The same operations are also run by `qemu-img resize` on a copy: the maps must agree (host
offsets aside) and so must the contents, except where qcowdisk deliberately differs (the stale
tail a QEMU shrink leaves behind, `test_grow_after_shrink_reads_zeros`). Refusals must carry
qemu-img's message and leave the file untouched; the command line must print what qemu-img
prints, with the same exit status. Header switches are torn at every 8-byte boundary.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from clirun import qcowdisk_in, qemu_img_in
from qcowdisk import ImageFailedError, QcowFile, ReadOnlyError, ResizeError
from qcowdisk.hostio import HostFile
from qemutools import assert_clean, check, create, info, pattern, qemu_img, qemu_io, write_raw

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# --------------------------------------------------------------------------------------------
# helpers

class Model:
    """The guest disk as a bytearray; resizing cuts or zero-extends it."""

    def __init__(self, size: int, data: bytes = b"") -> None:
        assert len(data) <= size
        self.data = bytearray(data) + bytes(size - len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data

    def resize(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))


def header_fields(path: str) -> dict[str, int]:
    """size, l1_size, l1_table_offset of a qcow2 header."""
    with open(path, "rb") as f:
        h = f.read(48)
    size, = struct.unpack_from(">Q", h, 24)
    l1_size, l1_offset = struct.unpack_from(">IQ", h, 36)
    return {"size": size, "l1_size": l1_size, "l1_table_offset": l1_offset}


def assert_image_is(path: str, model: Model, *, clean: bool = True) -> None:
    """QEMU and qcowdisk both see exactly the model (size and bytes); check clean."""
    if clean:
        assert_clean(path)
    assert info(path)["virtual-size"] == len(model.data)
    raw = write_raw(path + ".model", bytes(model.data))
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw, check=False)
    os.unlink(raw)
    assert p.returncode == 0, f"qemu-img compare: {p.stdout}{p.stderr}"
    with QcowFile.open(path, readonly=True) as d:
        assert d.virtual_size == len(d) == len(model.data)
        assert d.read_at(0, len(model.data) + 4096) == bytes(model.data)
        extents = list(d.block_status())
        assert sum(e.length for e in extents) == len(model.data)


def qemu_map(path: str) -> list[dict[str, Any]]:
    """qemu-img map --output=json without host offsets (the two tools place clusters differently)."""
    out = json.loads(qemu_img("map", "--output=json", path).stdout)
    return [{k: v for k, v in e.items() if k != "offset"} for e in out]


def qemu_resize(path: str, size: int, shrink: bool = False) -> subprocess.CompletedProcess[str]:
    return qemu_img("resize", *(["--shrink"] if shrink else []), path, str(size), check=False)


def our_resize(path: str, size: int, shrink: bool = False) -> None:
    with QcowFile.open(path) as d:
        d.resize(size, shrink=shrink)


Setup = Callable[[str], None]


def qemu_image(size: str | int, options: str = "", *commands: str, backing: str | None = None) -> Setup:
    def setup(path: str) -> None:
        create(path, size, options=options or None, backing=backing, backing_fmt="qcow2" if backing else None)
        if commands:
            qemu_io(path, *commands)
    return setup


def both_tools(tmp_path: Path, setup: Setup, ops: Sequence[tuple[int, bool]]) -> tuple[str, str]:
    """Apply the same resizes with qemu-img (q.qcow2) and qcowdisk (o.qcow2); returns both paths."""
    q, o = str(tmp_path / "q.qcow2"), str(tmp_path / "o.qcow2")
    setup(q)
    setup(o)
    for size, shrink in ops:
        p = qemu_resize(q, size, shrink)
        assert p.returncode == 0, p.stderr
        our_resize(o, size, shrink)
    return q, o


# --------------------------------------------------------------------------------------------
# growing and shrinking, checked against the model

@pytest.mark.parametrize("options", ["cluster_size=512", "cluster_size=65536", "compat=0.10,cluster_size=4096",
                                     "extended_l2=on,cluster_size=16384", "refcount_bits=1,cluster_size=2048",
                                     "lazy_refcounts=on"])
def test_grow_shrink_sequence_matches_model(tmp_path: Path, options: str) -> None:
    path = str(tmp_path / "t.qcow2")
    create(path, 1 * MiB, options=options)
    model = Model(1 * MiB)
    steps: list[tuple[str, int, int]] = [("write", 0, 1 * MiB), ("resize", 5 * MiB + 512, 0),
                                         ("write", 4 * MiB + 100, 300 * KiB), ("resize", 300 * KiB + 512, 1),
                                         ("resize", 2 * MiB, 0), ("write", 2 * MiB - 70000, 70000),
                                         ("resize", 1536, 1), ("resize", 64 * MiB, 0), ("write", 60 * MiB, 1 * MiB),
                                         ("resize", 64 * MiB, 1)]
    for n, (kind, a, b) in enumerate(steps):
        with QcowFile.open(path) as d:
            if kind == "write":
                data = pattern(b, seed=n)
                d.write_at(a, data)
                model.write(a, data)
            else:
                d.resize(a, shrink=bool(b))
                model.resize(a)
                assert d.virtual_size == len(d) == a
                assert d.read_at(0, a + 100) == bytes(model.data)  # clipped at the new end, in the open image
        assert_image_is(path, model)
        assert header_fields(path)["size"] == len(model.data)


def test_grow_across_l1_limit_with_512_byte_clusters(tmp_path: Path) -> None:
    """512-byte clusters: an L2 table maps 32 KiB, so 1 MiB needs 32 L1 entries (one cluster)
    and 256 MiB needs 8192 (128 clusters, contiguous): the table moves twice."""
    path = str(tmp_path / "t.qcow2")
    create(path, 1 * MiB, options="cluster_size=512")
    model = Model(1 * MiB)
    before = header_fields(path)
    assert before["l1_size"] == 32
    with QcowFile.open(path) as d:
        data = pattern(1 * MiB)
        d.write_at(0, data)
        model.write(0, data)
        d.resize(33 * KiB * 32)  # 33 entries: one cluster still, at a new place
        model.resize(33 * KiB * 32)
        assert d.header.l1_size == 33
        d.resize(256 * MiB)
        model.resize(256 * MiB)
        d.write_at(255 * MiB, pattern(4096, 1))
        model.write(255 * MiB, pattern(4096, 1))
    after = header_fields(path)
    assert after["l1_size"] == 8192 and after["l1_table_offset"] != before["l1_table_offset"]
    assert after["l1_table_offset"] % 512 == 0
    assert_image_is(path, model)  # no leaks: both old tables were freed


def test_grow_l1_to_qemus_limit_and_refuse_one_sector_more(tmp_path: Path) -> None:
    """The largest L1 table QEMU allows is 32 MiB (4 Mi entries): 128 GiB with 512-byte clusters."""
    q, o = str(tmp_path / "q.qcow2"), str(tmp_path / "o.qcow2")
    for p in (q, o):
        create(p, 1 * MiB, options="cluster_size=512")
    limit = 128 * GiB
    r = qemu_resize(q, limit + 512)
    with QcowFile.open(o) as d:
        with pytest.raises(ResizeError) as e:
            d.resize(limit + 512)
        assert r.returncode == 1 and r.stderr == f"qemu-img: {e.value}\n"
        assert str(e.value) == "Failed to grow the L1 table: File too large"
        d.resize(limit)
    assert header_fields(o)["l1_size"] == 4 << 20
    assert_clean(o)
    assert info(o)["virtual-size"] == limit


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_shrink_frees_everything_past_the_end(tmp_path: Path, cluster_size: int) -> None:
    """Data clusters and whole L2 tables past the new end are freed (check clean: no leaks)
    and the file is cut after its last used cluster, as QEMU cuts it."""
    q, o = both_tools(tmp_path, qemu_image(8 * MiB, f"cluster_size={cluster_size}", "write -P 0xaa 0 8M"),
                      [(1 * MiB + 512, True)])
    for p in (q, o):
        assert_clean(p)
        r = check(p)
        assert r.get("leaks", 0) == 0
    assert os.path.getsize(o) <= os.path.getsize(q) + cluster_size  # the L1 table may sit elsewhere
    assert header_fields(o)["l1_size"] == header_fields(q)["l1_size"]  # QEMU keeps l1_size
    model = Model(1 * MiB + 512, b"\xaa" * (1 * MiB + 512))
    assert_image_is(o, model)
    assert qemu_map(o) == qemu_map(q)


SCENARIOS: dict[str, tuple[Setup, list[tuple[int, bool]]]] = {
    "grow-64k": (qemu_image(1 * MiB, "", "write -P 1 0 1M"), [(3 * GiB, False)]),
    "grow-v2": (qemu_image(1 * MiB, "compat=0.10", "write -P 1 0 1M"), [(3 * GiB + 512, False)]),
    "shrink-aligned": (qemu_image(4 * MiB, "", "write -P 2 0 4M"), [(1 * MiB, True)]),
    "shrink-unaligned": (qemu_image(4 * MiB, "", "write -P 2 0 4M"), [(1 * MiB + 4608, True)]),
    "shrink-extl2": (qemu_image(4 * MiB, "extended_l2=on", "write -P 2 0 4M"), [(1 * MiB + 4608, True)]),
    "shrink-compressed": (qemu_image(4 * MiB, "", "write -c -P 3 0 64k", "write -c -P 3 2M 64k",
                                     "write -z 3M 64k"), [(1 * MiB, True)]),
    "shrink-prealloc-zero": (qemu_image(4 * MiB, "preallocation=metadata", "write -P 4 0 4M",
                                        "write -z 2M 1M"), [(2 * MiB + 512, True)]),
    "c512-up-down-up": (qemu_image(1 * MiB, "cluster_size=512", "write -P 5 0 1M"),
                        [(24 * MiB, False), (1000 * 512, True), (40 * MiB, False)]),
    "grow-from-empty": (qemu_image(0), [(1 * GiB, False)]),
    "same-size": (qemu_image(1 * MiB, "", "write -P 6 0 1M"), [(1 * MiB, False), (1 * MiB, True)]),
    "v3-snapshot": (qemu_image(1 * MiB, "", "write -P 7 0 1M"), []),  # snapshot added below
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_result_as_qemu_img_resize(tmp_path: Path, name: str) -> None:
    """qemu-img resize and QcowFile.resize on copies: same map (host offsets aside), same contents."""
    setup, ops = SCENARIOS[name]
    if name == "v3-snapshot":
        def with_snapshot(path: str, base: Setup = setup) -> None:
            base(path)
            qemu_img("snapshot", "-c", "s1", path)
            qemu_io(path, "write -P 8 256k 512k")
        setup = with_snapshot
        ops = [(256 * KiB, True), (5 * MiB, False)]
    q, o = both_tools(tmp_path, setup, ops)
    assert_clean(o)
    assert info(o)["virtual-size"] == info(q)["virtual-size"] == ops[-1][0]
    assert header_fields(o)["l1_size"] == header_fields(q)["l1_size"]
    assert qemu_img("compare", "-s", q, o, check=False).returncode == 0
    assert qemu_map(o) == qemu_map(q)
    if name == "v3-snapshot":  # the snapshot is intact and still has its own size
        raws = [to_snapshot_raw(p) for p in (q, o)]
        assert raws[0] == raws[1] and raws[1][:1 * MiB] == b"\x07" * MiB  # convert pads to the current size
        assert [s["disk_size"] for s in snapshot_sizes(o)] == [1 * MiB]


def to_snapshot_raw(path: str) -> bytes:
    out = path + ".s1.raw"
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=s1", path, out)
    return Path(out).read_bytes()


def snapshot_sizes(path: str) -> list[dict[str, int]]:
    with QcowFile.open(path, readonly=True) as d:
        return [{"disk_size": s.disk_size or 0} for s in d.snapshots]


def test_qemu_resized_images_read_right(tmp_path: Path) -> None:
    """What qemu-img resize made, qcowdisk reads: sizes, contents, block status = qemu-img map."""
    path = str(tmp_path / "t.qcow2")
    create(path, 1 * MiB, options="cluster_size=512")
    qemu_io(path, "write -P 0x11 0 1M")
    model = Model(1 * MiB, b"\x11" * MiB)
    for size, shrink in [(40 * MiB, False), (3 * MiB, True), (24 * MiB, False)]:
        assert qemu_resize(path, size, shrink).returncode == 0
        model.resize(size)
    qemu_io(path, "write -P 0x22 20M 64k")
    model.write(20 * MiB, b"\x22" * 65536)
    with QcowFile.open(path, readonly=True) as d:
        assert d.virtual_size == 24 * MiB
        assert d.read_at(0, 25 * MiB) == bytes(model.data)
        ours = [(e.start, e.length, e.depth, e.present, e.zero, e.data) for e in d.block_status()]
    theirs = [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"]) for e in qemu_map(path)]
    assert ours == theirs


# --------------------------------------------------------------------------------------------
# the new area reads as zeros

def test_grow_after_shrink_reads_zeros(tmp_path: Path) -> None:
    """A deliberate difference. QEMU's shrink keeps the last cluster whole, and a later grow
    shows its stale bytes again; qcowdisk zeroes them (at the shrink, and at a grow over an
    image shrunk by QEMU), so the grown area always reads as zeros."""
    cs = 65536
    new = 1 * MiB - 32 * KiB
    q, o = both_tools(tmp_path, qemu_image(1 * MiB, "", "write -P 0xaa 0 1M"), [(new, True), (1 * MiB, False)])
    with QcowFile.open(q, readonly=True) as d:  # QEMU: the old bytes are back (7.2's behaviour)
        assert d.read_at(new, 32 * KiB) == b"\xaa" * (32 * KiB)
    model = Model(1 * MiB, b"\xaa" * MiB)
    model.resize(new)
    model.resize(1 * MiB)
    assert_image_is(o, model)
    # shrunk by qcowdisk, grown by QEMU: zeros too
    mixed = str(tmp_path / "m.qcow2")
    qemu_image(1 * MiB, "", "write -P 0xaa 0 1M")(mixed)
    our_resize(mixed, new, shrink=True)
    assert qemu_resize(mixed, 1 * MiB).returncode == 0
    assert_image_is(mixed, model)
    # shrunk by QEMU, grown by qcowdisk: zeros
    other = str(tmp_path / "x.qcow2")
    qemu_image(1 * MiB, "", "write -P 0xaa 0 1M")(other)
    assert qemu_resize(other, new, True).returncode == 0
    our_resize(other, 1 * MiB + cs)
    model.resize(1 * MiB + cs)
    assert_image_is(other, model)


@pytest.mark.parametrize("options", ["", "extended_l2=on", "cluster_size=4096"])
def test_overlay_grown_over_a_longer_backing_file_reads_zeros(tmp_path: Path, options: str) -> None:
    """QEMU (since 5.0) zeroes the new area when the backing file reaches past the old end:
    explicit zeros to the next subcluster boundary, zero clusters after. Same map, same bytes."""
    base = str(tmp_path / "base.qcow2")
    create(base, 8 * MiB)
    qemu_io(base, "write -P 0xbb 0 8M")
    setup = qemu_image(1 * MiB, options, "write -P 1 0 100k", backing=base)
    q, o = both_tools(tmp_path, setup, [(1 * MiB + 100 * KiB, False), (3 * MiB + 3584, False), (7 * MiB, False)])
    model = Model(1 * MiB, b"\x01" * (100 * KiB) + b"\xbb" * (MiB - 100 * KiB))
    model.resize(7 * MiB)
    assert_image_is(o, model)
    assert qemu_map(o) == qemu_map(q)


def test_v2_overlay_over_a_longer_backing_file_is_refused_as_qemu_does(tmp_path: Path) -> None:
    """v2 has no zero flag: QEMU cannot zero whole new clusters, fails, and says why. Growing
    within the last cluster needs explicit zeros only, which QEMU (and qcowdisk) do."""
    base = str(tmp_path / "base.qcow2")
    create(base, 4 * MiB)
    qemu_io(base, "write -P 0xbb 0 4M")
    setup = qemu_image(1000 * KiB, "compat=0.10", backing=base)
    q, o = str(tmp_path / "q.qcow2"), str(tmp_path / "o.qcow2")
    setup(q)
    setup(o)
    r = qemu_resize(q, 2 * MiB)
    before = Path(o).read_bytes()
    with QcowFile.open(o) as d, pytest.raises(ResizeError) as e:
        d.resize(2 * MiB)
    assert r.returncode == 1 and r.stderr == f"qemu-img: {e.value}\n"
    assert str(e.value) == "Failed to zero out new clusters: Operation not supported"
    assert Path(o).read_bytes() == before
    assert qemu_resize(q, 1000 * KiB + 512).returncode == 0
    our_resize(o, 1000 * KiB + 512)
    assert qemu_img("compare", "-s", q, o, check=False).returncode == 0
    assert_clean(o)


def test_overlay_over_a_base_that_grew_or_shrank(tmp_path: Path) -> None:
    """An overlay reads its backing file up to the backing file's (new) end, zeros past it."""
    base, top = str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2")
    create(base, 2 * MiB)
    qemu_io(base, "write -P 0xbb 0 2M")
    create(top, 4 * MiB, backing=base, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x77 0 64k")
    top_model = Model(4 * MiB, b"\x77" * 65536 + b"\xbb" * (2 * MiB - 65536))
    assert_image_is(top, top_model)
    our_resize(base, 1 * MiB, shrink=True)
    top_model.data[1 * MiB:2 * MiB] = bytes(1 * MiB)
    assert_image_is(top, top_model)
    our_resize(base, 8 * MiB)  # the base's new area reads zeros: so does the overlay's view of it
    assert_image_is(top, top_model)
    with QcowFile.open(base) as b:
        b.write_at(3 * MiB, b"\x99" * 4096)
    top_model.write(3 * MiB, b"\x99" * 4096)
    assert_image_is(top, top_model)


# --------------------------------------------------------------------------------------------
# external data files

@pytest.mark.parametrize("raw", ["off", "on"])
@pytest.mark.parametrize("extl2", ["off", "on"])
def test_data_file_follows_the_size(tmp_path: Path, raw: str, extl2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data file is cut or extended to the new size (exactly, as QEMU does); with
    data_file_raw the new area is mapped onto it (QEMU preallocates its metadata)."""
    monkeypatch.chdir(tmp_path)  # QEMU 7.2 opens a relative data file name from the working directory

    def setup(path: str) -> None:
        create(path, 1 * MiB, options=f"data_file={os.path.basename(path)}.data,data_file_raw={raw},extended_l2={extl2}")
        qemu_io(path, "write -P 0xaa 0 1M")

    ops = [(3 * MiB, False), (300 * KiB + 512, True), (2 * MiB, False)]
    q, o = both_tools(tmp_path, setup, ops)
    assert os.path.getsize(o + ".data") == os.path.getsize(q + ".data") == 2 * MiB
    assert qemu_map(o) == qemu_map(q)
    model = Model(1 * MiB, b"\xaa" * MiB)
    for size, _ in ops:
        model.resize(size)
    assert_image_is(o, model)
    if raw == "on":
        assert Path(o + ".data").read_bytes() == bytes(model.data)


# --------------------------------------------------------------------------------------------
# refusals: qemu-img's words, nothing written

REFUSALS: dict[str, tuple[Setup, int, bool, str]] = {
    "shrink-without-flag": (qemu_image(1 * MiB), 512 * KiB, False,
                            "Use the --shrink option to perform a shrink operation."),
    "not-a-sector-multiple": (qemu_image(1 * MiB), 2 * MiB + 100, False, "The new size must be a multiple of 512"),
    "not-a-sector-multiple-shrink": (qemu_image(1 * MiB), 1000, True, "The new size must be a multiple of 512"),
    "past-bdrv-max": (qemu_image(1 * MiB, "cluster_size=2M"), (1 << 63) - 512, False,
                      "offset(9223372036854775296) exceeds maximum(9223372035781033984)"),
    "l1-too-large": (qemu_image(1 * MiB), 3 << 60, False, "Failed to grow the L1 table: File too large"),
    "v2-with-snapshots": (qemu_image(1 * MiB, "compat=0.10"), 2 * MiB, False,
                          "Can't resize a v2 image which has snapshots"),
    "v2-with-snapshots-same-size": (qemu_image(1 * MiB, "compat=0.10"), 1 * MiB, True,
                                    "Can't resize a v2 image which has snapshots"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_are_qemu_img_s(tmp_path: Path, name: str) -> None:
    setup, size, shrink, message = REFUSALS[name]
    q, o = str(tmp_path / "q.qcow2"), str(tmp_path / "o.qcow2")
    for p in (q, o):
        setup(p)
        if name.startswith("v2-with-snapshots"):
            qemu_img("snapshot", "-c", "s1", p)
    r = qemu_resize(q, size, shrink)
    assert r.returncode == 1
    before = Path(o).read_bytes()
    with QcowFile.open(o) as d:
        with pytest.raises(ResizeError) as e:
            d.resize(size, shrink=shrink)
        assert str(e.value) == message
        assert r.stderr.splitlines()[0] == f"qemu-img: {message}"
        assert d.virtual_size == 1 * MiB
    assert Path(o).read_bytes() == before


def test_api_refusals(tmp_path: Path) -> None:
    path = str(tmp_path / "t.qcow2")
    create(path, 1 * MiB)
    with QcowFile.open(path) as d:
        for bad in (0, -512):
            with pytest.raises(ResizeError, match=r"^New image size must be positive$"):
                d.resize(bad, shrink=True)
        with pytest.raises(TypeError, match="new_size must be an integer"):
            d.resize(2.0 * MiB)  # type: ignore[arg-type]
    with QcowFile.open(path, readonly=True) as d, pytest.raises(ReadOnlyError):
        d.resize(2 * MiB)
    d = QcowFile.open(path)
    d.close()
    with pytest.raises(ValueError, match="closed"):
        d.resize(2 * MiB)


def test_resize_refreshes_everything_that_knows_the_size(tmp_path: Path) -> None:
    """virtual_size, len(), reads clipped at the new end, writes refused past it, block status,
    qemu-img info: all follow, while the image stays open."""
    path = str(tmp_path / "t.qcow2")
    create(path, 1 * MiB)
    with QcowFile.open(path) as d:
        d.write_at(0, b"\x55" * MiB)
        d.resize(3 * MiB)
        assert len(d) == d.virtual_size == 3 * MiB
        assert d.read_at(3 * MiB - 10, 100) == bytes(10)
        buf = bytearray(100)
        assert d.readinto_at(buf, 3 * MiB - 10) == 10
        d.write_at(3 * MiB - 512, b"\x66" * 512)
        ext = list(d.block_status())
        assert ext[-1].start + ext[-1].length == 3 * MiB
        d.resize(512 * KiB, shrink=True)
        assert d.read_at(512 * KiB - 1, 100) == b"\x55"
        with pytest.raises(ValueError, match="past the virtual size"):
            d.write_at(512 * KiB, b"x")
        assert sum(e.length for e in d.block_status()) == 512 * KiB
        d.flush()
        assert info(path, "-U")["virtual-size"] == 512 * KiB
    assert_clean(path)


def test_lazy_refcounts_dirty_bit_cleared_on_close(tmp_path: Path) -> None:
    path = str(tmp_path / "t.qcow2")
    create(path, 1 * MiB, options="lazy_refcounts=on,cluster_size=512")
    with QcowFile.open(path) as d:
        d.write_at(0, b"\x12" * MiB)
        d.resize(64 * MiB)
        d.resize(100 * KiB, shrink=True)
        assert d.header.incompatible_features & 1
    assert not header_dirty(path)
    assert_image_is(path, Model(100 * KiB, b"\x12" * (100 * KiB)))


def header_dirty(path: str) -> bool:
    with open(path, "rb") as f:
        return bool(struct.unpack_from(">Q", f.read(80), 72)[0] & 1)


# --------------------------------------------------------------------------------------------
# a header write torn at every 8-byte boundary

class TearNthHeaderWrite(HostFile):
    """While `armed`, counts header writes (at offset 0) and lands only `cut` bytes of the
    `nth` one, then fails with EIO (the image enters the failed state: nothing more is written)."""

    armed = False
    nth = -1
    cut = 0
    seen = 0

    def pwritev(self, buffers: Sequence[Any], offset: int) -> None:
        cls = TearNthHeaderWrite
        if cls.armed and offset == 0:
            if cls.seen == cls.nth:
                cls.seen += 1
                data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
                os.pwrite(self.fd, data[:cls.cut], 0)
                raise OSError(errno.EIO, "injected: header write torn")
            cls.seen += 1
        super().pwritev(buffers, offset)


TEAR_CASES = {
    # name: (create options, size, data length, new size, shrink): the L1 table of the first
    # grows (offset, l1_size, size: three switches), the others switch the size only.
    "grow-l1": ("cluster_size=512", 1 * MiB, 1 * MiB, 8 * MiB, False),
    "grow": ("", 1 * MiB, 1 * MiB, 16 * MiB, False),
    "shrink": ("cluster_size=4096", 4 * MiB, 4 * MiB, 1 * MiB + 4096 + 512, True),
}


def _tear_run(tmp_path: Path, name: str, nth: int, cut: int) -> tuple[int, str]:
    options, size, length, new, shrink = TEAR_CASES[name]
    path = str(tmp_path / f"{name}-{nth}-{cut}.qcow2")
    create(path, size, options=options or None)
    data = pattern(length, seed=3)
    with QcowFile.open(path) as d:
        d.write_at(0, data)
    T = TearNthHeaderWrite
    T.armed, T.nth, T.cut, T.seen = True, nth, cut, 0
    try:
        d = QcowFile.open(path, host_factory=T)
        try:
            d.resize(new, shrink=shrink)
        except OSError:
            pass
        finally:
            with contextlib.suppress(ImageFailedError):
                d.close()
    finally:
        T.armed = False
    return T.seen, path


@pytest.mark.parametrize("name", list(TEAR_CASES))
def test_resize_header_switches_torn_at_every_8_byte_boundary(tmp_path: Path, name: str) -> None:
    """Tear each header write of a resize at every 8-byte boundary: the image is always the
    old one or the new one (size and contents), with no corruption (leaks allowed)."""
    _, size, length, new, _ = TEAR_CASES[name]
    writes, _ = _tear_run(tmp_path, name, -1, 0)  # count the header writes of an untorn resize
    assert writes == {"grow-l1": 3, "grow": 1, "shrink": 1}[name]
    data = pattern(length, seed=3)
    old_view = data + bytes(size - length)
    new_view = (old_view + bytes(max(0, new - size)))[:new]
    outcomes: dict[str, int] = {"old": 0, "new": 0}
    for nth in range(writes):
        for cut in range(0, 120, 8):
            _, path = _tear_run(tmp_path, name, nth, cut)
            r = check(path)
            assert r["returncode"] in (0, 3) and not r.get("corruptions") and not r.get("check-errors"), (nth, cut, r)
            got_size = info(path)["virtual-size"]
            view = old_view if got_size == size else new_view
            assert got_size in (size, new), (nth, cut, got_size)
            raw = str(tmp_path / "v.raw")
            qemu_img("convert", "-O", "raw", path, raw)
            assert Path(raw).read_bytes() == view, (nth, cut)
            with QcowFile.open(path) as d:  # writable again; and qcowdisk reads the same
                assert d.read_at(0, got_size) == view
            outcomes["old" if got_size == size else "new"] += 1
            os.unlink(path)
    assert outcomes["old"] and outcomes["new"]


# --------------------------------------------------------------------------------------------
# the command line against qemu-img resize

CLI_CASES = [
    ["IMG", "+1G"], ["IMG", "-512k"], ["--shrink", "IMG", "-512k"], ["IMG", "--", "-512k"],
    ["--shrink", "IMG", "--", "-512k"], ["--shrink", "--", "IMG", "-512k"], ["-q", "IMG", "2M"],
    ["-f", "qcow2", "IMG", "2M"], ["-fqcow2", "-q", "IMG", "4M"], ["--shr", "IMG", "2M"], ["IMG", "1.5M"],
    ["IMG", "+1.5k"], ["IMG", "+0"], ["IMG", "-0"], ["IMG", "1T"], ["IMG", " 2M"],
    # failures
    [], ["IMG"], ["IMG", "1M", "x"], ["-x", "IMG", "1M"], ["-qx", "IMG", "2M"], ["--bogus", "IMG", "2M"],
    ["--shrink=1", "IMG", "2M"], ["IMG", "-f", "2M"], ["-h"], ["-f", "nosuch", "IMG", "2M"],
    ["missing.qcow2", "2M"], ["--", "-q", "1M"], ["IMG", "1000"], ["--shrink", "IMG", "1000"], ["IMG", "0"],
    ["IMG", "bogus"], ["IMG", "2M "], ["IMG", "1e6"], ["IMG", "16E"], ["IMG", "9E"], ["IMG", "8E"], ["IMG", "7E"],
    ["IMG", "0x3M"], ["IMG", "9223372036854775296"], ["--shrink", "IMG", "-9E"], ["IMG", "+9E"],
    ["IMG", "18446744073709551615"], ["IMG", "18446744073709551616"], ["IMG", "-2M"],
]


@pytest.mark.parametrize("args", CLI_CASES, ids=lambda a: " ".join(a) or "no-args")
def test_cli_matches_qemu_img_resize(tmp_path: Path, args: list[str]) -> None:
    """Same stdout, stderr (program name aside) and exit status as qemu-img resize, and the
    same image afterwards."""
    qdir, odir = tmp_path / "q", tmp_path / "o"
    for d in (qdir, odir):
        d.mkdir()
        create(str(d / "IMG"), 1 * MiB)
    p = subprocess.run(["qemu-img", "resize", *args], cwd=qdir, capture_output=True, text=True, check=False)
    status, out, err = qcowdisk_in(odir, "resize", args)
    if args == ["-h"]:  # qemu-img needs two words before it looks at any
        assert (p.returncode, status) == (1, 1)
    assert (status, out, err.replace("qcowdisk", "qemu-img")) == (p.returncode, p.stdout, p.stderr)
    assert info(str(odir / "IMG"))["virtual-size"] == info(str(qdir / "IMG"))["virtual-size"]
    assert_clean(str(odir / "IMG"))


def test_cli_help_raw_and_qcow_v1(tmp_path: Path) -> None:
    status, out, _ = qcowdisk_in(tmp_path, "resize", ["-h", "IMG", "1M"])
    assert status == 0 and out.startswith("usage: qcowdisk resize")
    raw = write_raw(str(tmp_path / "disk.raw"), bytes(1 * MiB))  # (raw: see test_resize_raw.py)
    status, out, _ = qcowdisk_in(tmp_path, "resize", ["-f", "raw", raw, "2M"])
    assert (status, out) == (0, "Image resized.\n") and os.path.getsize(raw) == 2 * MiB
    qemu_img("create", "-q", "-f", "qcow", str(tmp_path / "v1.qcow"), "1M")
    assert qcowdisk_in(tmp_path, "resize", ["v1.qcow", "2M"], as_qemu_img=True) == \
        qemu_img_in(tmp_path, "resize", ["v1.qcow", "2M"])
    assert qemu_img_in(tmp_path, "resize", ["v1.qcow", "2M"])[0] == 1


def test_cli_confine_to(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    base = str(outside / "base.qcow2")
    create(base, 1 * MiB)
    top = str(inside / "top.qcow2")
    create(top, 1 * MiB, backing=base, backing_fmt="qcow2")
    status, _, err = qcowdisk_in(tmp_path, "resize", ["--confine-to", str(inside), top, "2M"])
    assert status == 1 and err.startswith(f"qcowdisk: Could not open '{top}'")
    assert info(top)["virtual-size"] == 1 * MiB
    status, out, _ = qcowdisk_in(tmp_path, "resize", ["--confine-to", str(tmp_path), top, "2M"])
    assert (status, out) == (0, "Image resized.\n")


def test_cli_entry_point_takes_a_negative_size(tmp_path: Path) -> None:
    """Through the console script's parser too: `-1M` as the last word is the size."""
    path = str(tmp_path / "t.qcow2")
    create(path, 4 * MiB)
    env = dict(os.environ)
    p = subprocess.run([shutil.which("python3") or "python3", "-m", "qcowdisk.cli", "resize", "--shrink", path, "-1M"],
                       capture_output=True, text=True, check=False, env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "Image resized.\n", "")
    assert info(path)["virtual-size"] == 3 * MiB
