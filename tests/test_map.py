"""`qcowdisk map` prints what `qemu-img map` (QEMU 7.2) prints, and `block_status` is its source.

QEMU is the oracle: every image is built with qemu-img/qemu-io, then both tools map it from the
same working directory (file names are relative, as users type them) and stdout, stderr (with
the program name normalised) and the exit status must be identical, in the human and the JSON
format, over the whole disk and over sub-ranges. qemu-img always runs first: what the host says
of unwritten extents can depend on the page cache, and neither tool reads guest data.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clirun import qcowdisk_in, qemu_img_in, same_as_qemu_img
from imagefactory import extents_as_qemu_json, raw_qcow2_qcow2_chain, sparse_file
from qcowdisk import Extent, QcowFile
from qcowdisk.blockstatus import block_status
from qcowdisk.qcow1 import Qcow1File
from qcowdisk.qcow2.status import metadata_preallocated
from qcowdisk.raw import RawImage
from qemutools import create, qemu_img, qemu_io

KiB = 1 << 10
MiB = 1 << 20

# --------------------------------------------------------------------------- image zoo
# Each builder makes its images under `d` and returns (working directory, map arguments).


def _qcow2_mixed(d: Path, compressed: bool = True) -> tuple[Path, list[str]]:
    cmds = ["write -P 1 0 192k", "write -z 64k 64k",  # zero over data: keeps its host offset
            "discard 128k 64k", "write -z 512k 128k",  # plain zero clusters
            "write -P 3 2M 100k",  # a partial cluster: its tail is a host hole
            "write -P 4 3M 64k", "write -P 5 3136k 64k"]
    if compressed:
        cmds.append("write -c -P 2 1M 128k")
    create(str(d / "img.qcow2"), "4M")
    qemu_io(str(d / "img.qcow2"), *cmds)
    return d, ["img.qcow2"]


def _qcow2_plain(d: Path) -> tuple[Path, list[str]]:
    return _qcow2_mixed(d, compressed=False)


def _chain(d: Path) -> tuple[Path, list[str]]:
    """raw (holes, odd size) <- qcow2 (larger) <- qcow2 (larger still), relative names in sub/."""
    sub = d / "sub"
    sub.mkdir()
    raw_qcow2_qcow2_chain(sub, ["write -z 960k 64k"])
    return d, ["sub/top.qcow2"]


def _chain_absolute(d: Path) -> tuple[Path, list[str]]:
    _chain(d)
    return d, [str(d / "sub" / "top.qcow2")]


def _short_backing(d: Path) -> tuple[Path, list[str]]:
    """The overlay is larger than its backing file; an unallocated run straddles the backing's end."""
    create(str(d / "base.qcow2"), "1M")
    qemu_io(str(d / "base.qcow2"), "write -P 1 0 64k", "write -P 2 960k 64k")
    create(str(d / "top.qcow2"), "2M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "top.qcow2"), "write -P 3 64k 64k", "write -P 4 1536k 64k")
    return d, ["top.qcow2"]


def _qcow1_base(d: Path) -> tuple[Path, list[str]]:
    """qcow2 over a legacy qcow (v1) image holding data and compressed clusters."""
    create(str(d / "base.qcow"), "2M", fmt="qcow")
    qemu_io(str(d / "base.qcow"), "write -P 1 0 8k", "write -c -P 2 64k 4k", "write -P 3 1M 64k", fmt="qcow")
    create(str(d / "top.qcow2"), "2M", backing="base.qcow", backing_fmt="qcow")
    qemu_io(str(d / "top.qcow2"), "write -P 4 1M 4k")
    return d, ["top.qcow2"]


def _qcow1_plain(d: Path) -> tuple[Path, list[str]]:
    """A qcow (v1) image with backing file, no compressed clusters (the human format works)."""
    create(str(d / "base.qcow2"), "1M")
    qemu_io(str(d / "base.qcow2"), "write -P 1 0 64k", "write -z 128k 64k")
    create(str(d / "top.qcow"), "2M", fmt="qcow", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "top.qcow"), "write -P 2 4k 4k", "write -P 3 1536k 8k", fmt="qcow")
    return d, ["top.qcow"]


def _extl2(d: Path) -> tuple[Path, list[str]]:
    create(str(d / "e.qcow2"), "1M", options="extended_l2=on")
    qemu_io(str(d / "e.qcow2"), "write -P 1 0 4k", "write -z 8k 4k", "write -P 2 64k 2k",
            "write -z 128k 64k", "write -P 3 200k 8k", "discard 204k 4k", "write -c -P 4 256k 64k")
    return d, ["e.qcow2"]


def _extl2_backing(d: Path) -> tuple[Path, list[str]]:
    """Unallocated subclusters of allocated clusters read through to the backing file."""
    create(str(d / "base.qcow2"), "1M", options="extended_l2=on,cluster_size=128k")
    qemu_io(str(d / "base.qcow2"), "write -P 9 0 1M")
    create(str(d / "ov.qcow2"), "1M", options="extended_l2=on,cluster_size=128k",
           backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "ov.qcow2"), "write -P 1 0 4k", "write -z 8k 4k", "write -P 2 128k 2k",
            "discard 136k 4k", "write -z 512k 128k")
    return d, ["ov.qcow2"]


def _data_file(d: Path) -> tuple[Path, list[str]]:
    create(str(d / "dd.qcow2"), "1M", options="data_file=d.raw")
    qemu_io(str(d / "dd.qcow2"), "write -P 1 64k 4k", "write -z 256k 64k", "write -P 3 512k 64k")
    return d, ["dd.qcow2"]


def _data_file_raw(d: Path) -> tuple[Path, list[str]]:
    create(str(d / "dr.qcow2"), "1M", options="data_file=d2.raw,data_file_raw=on")
    qemu_io(str(d / "dr.qcow2"), "write -P 1 64k 4k", "write -z 256k 64k", "write -P 3 512k 64k")
    return d, ["dr.qcow2"]


def _data_file_extl2(d: Path) -> tuple[Path, list[str]]:
    """Guest cluster 0 lives at data-file offset 0: its other subclusters still show offsets."""
    create(str(d / "dx.qcow2"), "1M", options="data_file=dx.raw,extended_l2=on")
    qemu_io(str(d / "dx.qcow2"), "write -P 1 0 2k", "write -z 8k 2k", "write -P 2 128k 64k")
    return d, ["dx.qcow2"]


def _prealloc(mode: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def build(d: Path) -> tuple[Path, list[str]]:
        create(str(d / "p.qcow2"), "1M", options=f"preallocation={mode}")
        qemu_io(str(d / "p.qcow2"), "write -P 1 64k 4k", "write -z 256k 64k", "write -P 2 700k 100k")
        return d, ["p.qcow2"]
    return build


def _sparse_copy(d: Path) -> tuple[Path, list[str]]:
    """Clusters of zeros written as data become host holes in a `cp --sparse=always` copy."""
    create(str(d / "s.qcow2"), "4M")
    qemu_io(str(d / "s.qcow2"), "write -P 1 0 1M", "write -P 0 1M 1M", "write -P 2 2M 4k", "write -P 0 3M 64k")
    subprocess.run(["cp", "--sparse=always", str(d / "s.qcow2"), str(d / "sp.qcow2")], check=True)
    return d, ["sp.qcow2"]


def _v2(d: Path) -> tuple[Path, list[str]]:
    create(str(d / "b.qcow2"), "1M", options="compat=0.10")
    qemu_io(str(d / "b.qcow2"), "write -P 1 0 256k")
    create(str(d / "v2.qcow2"), "2M", options="compat=0.10", backing="b.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "v2.qcow2"), "write -P 2 64k 64k", "write -z 128k 64k", "discard 192k 64k",
            "write -P 3 1536k 100k")
    return d, ["v2.qcow2"]


def _raw(d: Path) -> tuple[Path, list[str]]:
    sparse_file(d / "r.raw", 3 * 65536 + 1000, [(65536, b"x" * 100), (3 * 65536 + 500, b"y" * 500)])
    return d, ["-f", "raw", "r.raw"]


def _raw_probed(d: Path) -> tuple[Path, list[str]]:
    sparse_file(d / "r.img", 70000, [(0, b"z" * 1000)])
    return d, ["r.img"]


def _small_clusters(d: Path) -> tuple[Path, list[str]]:
    create(str(d / "c512.qcow2"), "256k", options="cluster_size=512")
    qemu_io(str(d / "c512.qcow2"), *[f"write -P {i} {i * 3 * 512} 512" for i in range(1, 40)],
            "write -z 100k 2k", "write -P 9 120k 60k")
    return d, ["c512.qcow2"]


def _huge(d: Path) -> tuple[Path, list[str]]:
    """1 TiB over a 1 GiB backing file: a few extents, found without walking every cluster."""
    create(str(d / "b.qcow2"), "1G")
    qemu_io(str(d / "b.qcow2"), "write -P 1 512M 64k")
    create(str(d / "big.qcow2"), "1T", options="cluster_size=2M", backing="b.qcow2", backing_fmt="qcow2")
    qemu_io(str(d / "big.qcow2"), "write -P 2 0 4k", "write -P 3 700G 64k")
    return d, ["big.qcow2"]


ZOO: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {
    "qcow2-mixed": _qcow2_mixed, "qcow2-plain": _qcow2_plain, "chain": _chain,
    "chain-absolute": _chain_absolute, "short-backing": _short_backing, "qcow1-base": _qcow1_base,
    "qcow1-top": _qcow1_plain, "extl2": _extl2, "extl2-backing": _extl2_backing,
    "data-file": _data_file, "data-file-raw": _data_file_raw, "data-file-extl2": _data_file_extl2,
    "prealloc-metadata": _prealloc("metadata"), "prealloc-falloc": _prealloc("falloc"),
    "prealloc-full": _prealloc("full"), "sparse-copy": _sparse_copy, "v2": _v2, "raw": _raw,
    "raw-probed": _raw_probed, "small-clusters": _small_clusters, "huge": _huge,
}

RANGES = [[], ["--start-offset=100", "--max-length=300k"], ["--start-offset=65537"], ["--max-length=1000000"]]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("mapzoo")
    built = {}
    for name, build in ZOO.items():
        d = root / name
        d.mkdir()
        with contextlib.chdir(d):  # QEMU 7.2 opens a relative data file name from the working directory
            built[name] = build(d)
    return built


@pytest.mark.parametrize("name", list(ZOO))
def test_map_matches_qemu(name: str, zoo: dict[str, tuple[Path, list[str]]]) -> None:
    cwd, image_args = zoo[name]
    for extra in RANGES:
        for output in ("json", "human"):
            status, out, _ = same_as_qemu_img(cwd, "map", [f"--output={output}", *extra, *image_args])
            if output == "json":
                assert status == 0 and json.loads(out), out


def test_zoo_covers_the_interesting_answers(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    """The zoo really shows what the comparisons are meant to cover (else they prove little)."""
    def entries(name: str) -> list[dict[str, Any]]:
        cwd, args = zoo[name]
        result: list[dict[str, Any]] = json.loads(qemu_img_in(cwd, "map", ["--output=json", *args])[1])
        return result

    assert any(e["zero"] and e["data"] for e in entries("prealloc-metadata"))  # host holes, RECURSE
    assert any(e["zero"] and e["data"] for e in entries("sparse-copy"))
    assert any(e["zero"] and e["data"] for e in entries("qcow2-mixed"))  # the partial cluster's tail
    assert any(e["zero"] and not e["data"] and "offset" in e for e in entries("qcow2-mixed"))  # zero, allocated
    assert any(not e["present"] and "offset" in e for e in entries("extl2"))  # unallocated subcluster
    assert any(e["depth"] == 2 for e in entries("chain"))
    assert any(e["depth"] == 0 and not e["present"] for e in entries("short-backing"))
    assert any(e["data"] and "offset" not in e for e in entries("qcow1-base"))  # compressed in qcow v1
    assert any(e.get("offset") == 2048 and e["zero"] for e in entries("data-file-extl2"))
    assert qemu_img_in(zoo["qcow2-mixed"][0], "map", zoo["qcow2-mixed"][1])[0] == 1  # human: compressed


@pytest.mark.parametrize("args", [
    ["--start-offset=5M"], ["--max-length=0"], ["--start-offset=1.5k"], ["-s", "5", "-l", "70k"],
    ["--start-offset", "4k", "--max-length", "64k"], ["--start-offset=9223372036854775807"],
    ["--start-offset=1k", "--max-length=9223372036854775807"],  # qemu-img's sum wraps: nothing mapped
    ["--start-offset=-1"], ["--start-offset=abc"], ["--max-length=99999999999999999999"],
    ["--output=foo"], ["-U"],
    # qemu_strtosz's corners: hex (and its deprecated suffix), fractions, signs, spaces, overflow
    ["--start-offset=0x10"], ["--start-offset=0x10k"], ["--start-offset=1.0"], ["--start-offset=1.k"],
    ["--start-offset=0.7k"], ["--start-offset=+5"], ["--start-offset=5 k"], ["--start-offset=1.5"],
    ["--max-length=99999999999999999999k"], ["--start-offset=7.99999E"], ["--start-offset=1e3"],
])


def test_map_options_and_errors_match_qemu(args: list[str], zoo: dict[str, tuple[Path, list[str]]]) -> None:
    cwd, image_args = zoo["qcow2-plain"]
    for output in (["--output=json"], ["--output=human"], []):
        same_as_qemu_img(cwd, "map", [*output, *args, *image_args])


def test_map_argument_count_errors(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    cwd, image_args = zoo["qcow2-plain"]
    status, _, err = same_as_qemu_img(cwd, "map", [])
    assert status == 1 and "Expecting one image file name" in err
    same_as_qemu_img(cwd, "map", [*image_args, *image_args])


def test_map_compressed_human_fails_after_earlier_lines(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    cwd, image_args = zoo["qcow2-mixed"]
    status, out, err = qcowdisk_in(cwd, "map", image_args, as_qemu_img=True)
    assert status == 1
    assert err == "qemu-img: File contains external, encrypted or compressed clusters.\n"
    assert out.splitlines()[0].split() == ["Offset", "Length", "Mapped", "to", "File"]
    assert len(out.splitlines()) > 1  # the data before the compressed clusters was printed


# --------------------------------------------------------------------------- block_status API


def _mergeable(a: Extent, b: Extent) -> bool:
    """img_map's entry_mergeable, on two adjacent extents."""
    return (a.depth, a.present, a.zero, a.data, a.filename, a.offset is None) == \
        (b.depth, b.present, b.zero, b.data, b.filename, b.offset is None) and \
        (a.offset is None or b.offset is None or a.offset + a.length == b.offset)


def assert_covers(extents: list[Extent], start: int, end: int) -> None:
    """In order, no gap, no overlap, exactly [start, end), merged."""
    assert extents, "no extents"
    assert extents[0].start == start
    for a, b in itertools.pairwise(extents):
        assert a.start + a.length == b.start
        assert not _mergeable(a, b), (a, b)
    assert extents[-1].start + extents[-1].length == end
    assert all(e.length > 0 for e in extents)


def test_block_status_equals_qemu_json(zoo: dict[str, tuple[Path, list[str]]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, _ = zoo["chain"]
    monkeypatch.chdir(cwd)
    expected = json.loads(qemu_img("map", "--output=json", "sub/top.qcow2").stdout)
    with QcowFile.open("sub/top.qcow2", readonly=True) as img:
        extents = list(img.block_status())
    assert extents_as_qemu_json(extents) == expected
    assert_covers(extents, 0, 3 * MiB)
    by_depth = {e.depth: e.filename for e in extents if e.offset is not None}
    assert by_depth == {0: "sub/top.qcow2", 1: "sub/mid.qcow2", 2: "sub/base.raw"}
    assert all((e.filename is None) == (e.offset is None) for e in extents)


def test_block_status_subrange_is_exact(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    cwd, args = zoo["qcow2-mixed"]
    path = str(cwd / args[-1])
    expected = json.loads(qemu_img("map", "--output=json", "--start-offset=100", "--max-length=3000000",
                                   path).stdout)
    with QcowFile.open(path, readonly=True) as img:
        sub = list(img.block_status(100, 3000000))
        whole = list(img.block_status())
        past_end = list(img.block_status(3 * MiB, 10 * MiB))
        assert list(img.block_status(4 * MiB)) == []
        assert list(img.block_status(5, 0)) == []
        with pytest.raises(ValueError, match="offset must not be negative"):
            img.block_status(-1)
        with pytest.raises(ValueError, match="length must not be negative"):
            img.block_status(0, -1)
    assert_covers(sub, 100, 3000100)
    assert extents_as_qemu_json(sub) == expected
    assert_covers(whole, 0, 4 * MiB)
    assert_covers(past_end, 3 * MiB, 4 * MiB)  # clipped at the end of the disk
    compressed = [e for e in whole if e.compressed]
    assert [(e.start, e.length, e.data, e.offset, e.filename) for e in compressed] == [(MiB, 128 * KiB, True, None, None)]
    assert all(e.filename == path for e in whole if e.offset is not None)
    zero_alloc = [e for e in whole if e.zero and not e.data and e.offset is not None]
    assert [(e.start, e.length, e.present) for e in zero_alloc] == [(64 * KiB, 64 * KiB, True)]


def test_block_status_closed_image_refuses(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    cwd, args = zoo["qcow2-plain"]
    img = QcowFile.open(str(cwd / args[-1]), readonly=True)
    extents = img.block_status()
    img.close()
    with pytest.raises(ValueError, match="closed"):
        next(extents)
    with pytest.raises(ValueError, match="closed"):
        img.block_status()


def test_block_status_on_writable_image_sees_unflushed_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "w.qcow2")
    create(path, "2M")
    with QcowFile.open(path) as img:
        img.write_at(64 * KiB, b"\x01" * 64 * KiB)
        img.write_at(MiB, b"\x02" * 128 * KiB)
        img.write_zeroes(MiB, 64 * KiB)
        ours = [(e.start, e.length, e.present, e.zero, e.data) for e in img.block_status()]
    theirs = [(e["start"], e["length"], e["present"], e["zero"], e["data"])
              for e in json.loads(qemu_img("map", "--output=json", path).stdout)]
    assert ours == theirs
    assert (64 * KiB, 64 * KiB, True, False, True) in ours and (MiB + 64 * KiB, 64 * KiB, True, False, True) in ours


def test_block_status_qcow1_and_raw(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    cwd, args = zoo["qcow1-top"]
    path = str(cwd / args[-1])
    with Qcow1File.open(path) as q1:
        extents = list(q1.block_status())
    assert_covers(extents, 0, 2 * MiB)
    assert extents_as_qemu_json(extents) == json.loads(qemu_img("map", "--output=json", path).stdout)
    assert {e.depth for e in extents} == {0, 1}

    cwd, args = zoo["raw"]
    path = str(cwd / args[-1])
    raw = RawImage(path)
    try:
        extents = list(raw.block_status())
    finally:
        raw.close()
    size = os.path.getsize(path)
    assert_covers(extents, 0, -(-size // 512) * 512)  # QEMU rounds a raw file up to whole sectors
    assert extents_as_qemu_json(extents) == json.loads(qemu_img("map", "--output=json", "-f", "raw", path).stdout)
    assert [e.data for e in extents] == [False, True, False, True, False]


def test_metadata_preallocation_detection(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    def detected(name: str) -> bool:
        cwd, args = zoo[name]
        with QcowFile.open(str(cwd / args[-1]), readonly=True) as img:
            return metadata_preallocated(img._state)

    assert detected("prealloc-metadata") and detected("sparse-copy")
    assert not detected("prealloc-falloc") and not detected("prealloc-full") and not detected("data-file-raw")


def test_block_status_memory_is_bounded_on_huge_images(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    """layer_status is asked about bounded windows, never about the whole 1 TiB at once."""
    cwd, args = zoo["huge"]
    with QcowFile.open(str(cwd / args[-1]), readonly=True) as img:
        asked: list[int] = []
        original = img.layer_status

        def spy(guest_offset: int, length: int) -> list[Any]:
            asked.append(length)
            return original(guest_offset, length)

        img.layer_status = spy  # type: ignore[method-assign]
        extents = list(block_status(img))
    assert_covers(extents, 0, 1 << 40)
    assert len(extents) == 7
    assert max(asked) <= 16384 * (2 * MiB) and len(asked) < 100


def test_map_relative_names_follow_qemu(zoo: dict[str, tuple[Path, list[str]]]) -> None:
    """The File column: the image as given, backing files joined to the naming image's directory."""
    cwd, _ = zoo["chain"]
    _, out, _ = same_as_qemu_img(cwd / "sub", "map", ["../sub/./top.qcow2"])
    files = {line.split()[-1] for line in out.splitlines()[1:]}
    assert files == {"../sub/./top.qcow2", "../sub/./mid.qcow2", "../sub/./base.raw"}
    assert re.match(r"^0 {15}0x10000 {9}0 {15}\.\./sub/\./base\.raw$", out.splitlines()[1]), out


def test_map_corrupt_entry_fails_after_the_ranges_before_it(tmp_path: Path) -> None:
    """An unaligned data cluster offset: both tools print what precedes it, then fail (exit 1)."""
    create(str(tmp_path / "c.qcow2"), "1M")
    qemu_io(str(tmp_path / "c.qcow2"), "write -P 1 0 64k", "write -P 2 128k 64k", "write -P 3 256k 64k")
    with open(tmp_path / "c.qcow2", "r+b") as f:
        f.seek(0x40000 + 8 * 2)  # the first L2 table, guest cluster 2
        entry = int.from_bytes(f.read(8), "big")
        assert entry & 0x00FFFFFFFFFFFE00
        f.seek(0x40000 + 8 * 2)
        f.write((entry | 0x200).to_bytes(8, "big"))
    for output in ("--output=json", "--output=human"):
        expected = qemu_img_in(tmp_path, "map", [output, "c.qcow2"])
        status, out, err = qcowdisk_in(tmp_path, "map", [output, "c.qcow2"], as_qemu_img=True)
        assert (status, out) == expected[:2] == (1, out)
        assert "Could not read file metadata" in err and "Could not read file metadata" in expected[2]
    assert out.count("\n") == 2  # the header and the first cluster


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
def test_extended_l2_preallocation_maps_as_qemus(tmp_path: Path, mode: str) -> None:
    """qcowdisk preallocates extended-L2 images as QEMU does: allocated clusters whose
    subclusters are all unallocated ("present": false), not zero subclusters."""
    ours, theirs = str(tmp_path / "ours.qcow2"), str(tmp_path / "theirs.qcow2")
    QcowFile.create(ours, 1 << 20, extended_l2=True, preallocation=mode).close()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"extended_l2=on,preallocation={mode}",
                    theirs, "1M"], check=True)
    maps = [json.loads(subprocess.run(["qemu-img", "map", "--output=json", p], capture_output=True, text=True,
                                      check=True).stdout) for p in (ours, theirs)]
    assert maps[0] == maps[1]
