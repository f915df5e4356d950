"""`qcowdisk commit` / `qcowdisk rebase` and `qcowdisk.commit` / `qcowdisk.rebase` against qemu-img 7.2.

QEMU is the oracle: each chain is built with qemu-img/qemu-io in one directory and copied
whole (relative backing names) to a second; qemu-img commits or rebases the first, qcowdisk the
second, and then every image of both must read the same (`qemu-img compare`), be clean for
`qemu-img check`, and name the same backing file and format (`qemu-img info`). The CLI's
messages and exit statuses are compared with qemu-img's on the same inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qcowdisk
from qcowdisk import QcowFile
from qcowdisk.cli import main as cli_main
from qemutools import assert_clean, compare, create, info, qemu_img, qemu_io
from test_alloc_space import layout

KiB, MiB = 1 << 10, 1 << 20

LAYOUTS = {
    "default": "",
    "small-clusters": "cluster_size=4096",
    "extended-l2": "extended_l2=on,cluster_size=65536",
    "compat-0.10": "compat=0.10",
}


def build(d: Path, opts: str, depth: int = 2) -> None:
    """base.qcow2 <- mid.qcow2 (depth 3) <- top.qcow2, with data, zeros and compressed clusters."""
    d.mkdir(parents=True, exist_ok=True)
    o = opts or None
    create(str(d / "base.qcow2"), 4 * MiB, options=o)
    qemu_io(str(d / "base.qcow2"), "write -P 0x11 0 1M", "write -P 0x12 2M 1M")
    below = "base.qcow2"
    if depth == 3:
        create(str(d / "mid.qcow2"), 4 * MiB, options=o, backing=below, backing_fmt="qcow2")
        qemu_io(str(d / "mid.qcow2"), "write -P 0x21 256k 300k", "write -z 2M 64k")
        below = "mid.qcow2"
    create(str(d / "top.qcow2"), 6 * MiB, options=o, backing=below, backing_fmt="qcow2")
    cmds = ["write -P 0x31 4k 70k", "write -z 512k 128k", "write -P 0x32 3M 100k", "write -P 0x33 5M 1k"]
    if "compat=0.10" not in opts:
        cmds.append("write -c -P 0x34 1M 64k")
    qemu_io(str(d / "top.qcow2"), *cmds)
    create(str(d / "new.qcow2"), 3 * MiB, options=o)
    qemu_io(str(d / "new.qcow2"), "write -P 0x11 0 512k", "write -P 0x42 300k 512", "write -P 0x41 1M 1M")


def twins(tmp_path: Path, opts: str, depth: int = 2) -> tuple[Path, Path]:
    q, o = tmp_path / "qemu", tmp_path / "ours"
    build(q, opts, depth)
    shutil.copytree(q, o)
    return q, o


def same_images(q: Path, o: Path) -> None:
    for name in sorted(os.listdir(q)):
        a, b = str(q / name), str(o / name)
        compare(a, b)
        if not name.endswith((".raw", ".qcow")):  # qemu-img checks only qcow2 here
            assert_clean(b)
        ia, ib = info(a), info(b)
        assert ia.get("backing-filename") == ib.get("backing-filename"), name
        assert ia.get("backing-filename-format") == ib.get("backing-filename-format"), name
        assert ia["virtual-size"] == ib["virtual-size"], name


def allocated_ranges(path: Path) -> list[tuple[int, int]]:
    """The merged ranges the image itself allocates (qemu-img map: depth 0, present)."""
    out: list[tuple[int, int]] = []
    for e in json.loads(qemu_img("map", "--output=json", str(path)).stdout):
        if e["depth"] == 0 and e["present"]:
            if out and out[-1][1] == e["start"]:
                out[-1] = (out[-1][0], e["start"] + e["length"])
            else:
                out.append((e["start"], e["start"] + e["length"]))
    return out


def top_allocated(path: Path) -> bool:
    m = json.loads(qemu_img("map", "--output=json", str(path)).stdout)
    return any(e["depth"] == 0 and e["present"] for e in m)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_commit_matches_qemu(tmp_path: Path, layout: str) -> None:
    q, o = twins(tmp_path, LAYOUTS[layout])
    before = qemu_img("convert", "-O", "raw", str(o / "top.qcow2"), str(tmp_path / "before.raw"))
    assert before.returncode == 0
    qemu_img("commit", "-q", str(q / "top.qcow2"))
    seen: list[tuple[int, int]] = []
    qcowdisk.commit(o / "top.qcow2", progress=lambda d, t: seen.append((d, t)))
    same_images(q, o)
    compare(str(o / "top.qcow2"), str(tmp_path / "before.raw"), fmt_b="raw")
    assert not top_allocated(o / "top.qcow2")
    assert seen[0] == (0, 6 * MiB) and seen[-1] == (6 * MiB, 6 * MiB)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def check_figures(path: Path) -> dict[str, object]:
    """`qemu-img check --output=json` of an image, its file name left out."""
    figures: dict[str, object] = json.loads(qemu_img("check", "--output=json", str(path)).stdout)
    figures.pop("filename")
    return figures


EMPTIED = {**LAYOUTS, "lazy-refcounts": "lazy_refcounts=on", "refcount-bits-1": "cluster_size=4096,refcount_bits=1",
           "big-l1": "cluster_size=512,refcount_bits=64"}


@pytest.mark.parametrize("layout", EMPTIED)
def test_commit_empties_the_overlay_as_qemu(tmp_path: Path, layout: str) -> None:
    """qemu-img 7.2 empties a committed version 3 overlay with make_completely_empty: the file
    is rebuilt as small as a fresh image (header, refcount table, refcount block, empty L1,
    truncated after it); a version 2 one has every cluster discarded (its L2 tables stay). The
    emptied overlays match: file size, check figures (image end included), nothing mapped,
    and byte for byte where rebuilt."""
    q, o = twins(tmp_path, EMPTIED[layout])
    qemu_img("commit", "-q", str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2")
    same_images(q, o)
    assert check_figures(o / "top.qcow2") == check_figures(q / "top.qcow2")
    assert (o / "top.qcow2").stat().st_size == (q / "top.qcow2").stat().st_size
    assert not top_allocated(o / "top.qcow2") and not top_allocated(q / "top.qcow2")
    if layout != "compat-0.10":
        assert (o / "top.qcow2").read_bytes() == (q / "top.qcow2").read_bytes()


@pytest.mark.slow  # two commits that allocate 5120 L2 tables, each evicted with a sync (qemu-img's too)
def test_commit_discards_when_the_l1_table_does_not_fit_one_refcount_block(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: a refcount block counts 64 clusters, fewer than a
    160 MiB disk's L1 table plus 3, so qemu-img discards instead of rebuilding: the L2 tables
    stay, and one is allocated for every L1 entry (QEMU's get_cluster_table), 2.6 MiB here."""
    q, o = tmp_path / "qemu", tmp_path / "ours"
    q.mkdir()
    opts = "cluster_size=512,refcount_bits=64"
    create(str(q / "base.qcow2"), 160 * MiB, options=opts)
    create(str(q / "top.qcow2"), 160 * MiB, options=opts, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(q / "top.qcow2"), "write -P 0x31 4k 70k", "write -z 1M 64k", "write -P 0x32 150M 8k")
    shutil.copytree(q, o)
    qemu_img("commit", "-q", str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2")
    same_images(q, o)
    ours, theirs = check_figures(o / "top.qcow2"), check_figures(q / "top.qcow2")
    # QEMU reuses each data cluster the moment its entry is dropped (for the next L2 table);
    # here a dropped reference frees the cluster only once the table is durable, so the file
    # ends a little later
    end, qemu_end = ours.pop("image-end-offset"), theirs.pop("image-end-offset")
    assert ours == theirs
    assert qemu_end <= end <= qemu_end * 1.05, (end, qemu_end)
    assert not top_allocated(o / "top.qcow2") and not top_allocated(q / "top.qcow2")


@pytest.mark.parametrize("layout", ["default", "small-clusters", "compat-0.10"])
@pytest.mark.parametrize("depth", [2, 3])
def test_committed_zeros_are_zero_clusters_as_qemu(tmp_path: Path, layout: str, depth: int) -> None:
    """The mirror job writes the overlay's zeros into a qcow2 base with write_zeroes(MAY_UNMAP):
    zero clusters present in the base, whether or not it has a backing file (a version 2 base
    cannot have them: unallocated, or zeros written over its backing file). qemu-img map of the
    bases agree on present / zero / data, whole clusters here (host offsets left out)."""
    q, o = twins(tmp_path, LAYOUTS[layout], depth)
    for d in (q, o):
        qemu_io(str(d / "top.qcow2"), "write -z 2M 192k", "write -z -u 3584k 128k", "write -z 4M 64k")
    args = ["-b", "base.qcow2"] if depth == 3 else []
    qemu_img("commit", "-q", *args, str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2", base=(o / "base.qcow2") if depth == 3 else None, drop=depth == 3)
    same_images(q, o)
    assert merged_allocation(o / "base.qcow2") == merged_allocation(q / "base.qcow2")
    if depth == 3:
        assert merged_allocation(o / "mid.qcow2") == merged_allocation(q / "mid.qcow2")


def build_raw(d: Path, opts: str, depth: int = 2) -> None:
    """base.raw (4 MiB: data, a hole, data, a hole) <- mid.qcow2 (depth 3) <- top.qcow2 (6 MiB):
    data over data and over the hole, zeros over data and over the hole, compressed data, and
    data past the base's end (the base grows)."""
    d.mkdir(parents=True, exist_ok=True)
    o = opts or None
    create(str(d / "base.raw"), 4 * MiB, fmt="raw")
    qemu_io(str(d / "base.raw"), "write -P 0x11 0 1M", "write -P 0x12 2M 1M", fmt="raw")
    below, below_fmt = "base.raw", "raw"
    if depth == 3:
        create(str(d / "mid.qcow2"), 4 * MiB, options=o, backing=below, backing_fmt=below_fmt)
        qemu_io(str(d / "mid.qcow2"), "write -P 0x21 256k 300k", "write -z 2M 64k")
        below, below_fmt = "mid.qcow2", "qcow2"
    create(str(d / "top.qcow2"), 6 * MiB, options=o, backing=below, backing_fmt=below_fmt)
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 4k 70k", "write -z 512k 128k", "write -P 0x32 1200k 100k",
            "write -z 1600k 128k", "write -z 2M 192k", "write -c -P 0x34 3M 64k", "write -P 0x33 5M 1k")


def raw_twins(tmp_path: Path, opts: str, depth: int = 2) -> tuple[Path, Path]:
    """Built twice rather than copied: a copy would fill the raw base's holes."""
    q, o = tmp_path / "qemu", tmp_path / "ours"
    build_raw(q, opts, depth)
    build_raw(o, opts, depth)
    return q, o


def qemu_map_json(path: Path, *extra: str) -> list[dict[str, object]]:
    maps: list[dict[str, object]] = json.loads(qemu_img("map", "--output=json", *extra, str(path)).stdout)
    return maps


@pytest.mark.parametrize("layout", ["default", "small-clusters"])
def test_commit_into_raw_base_matches_qemu(tmp_path: Path, layout: str) -> None:
    """The raw base grows and takes the data; the overlay's zeros become holes in it, as the
    mirror job's write_zeroes(MAY_UNMAP) punches them: `qemu-img map` of the bases agree."""
    q, o = raw_twins(tmp_path, LAYOUTS[layout])
    before = str(tmp_path / "before.raw")
    qemu_img("convert", "-O", "raw", str(o / "top.qcow2"), before)
    qemu_img("commit", "-q", str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2")
    same_images(q, o)
    compare(str(o / "base.raw"), before, fmt_a="raw", fmt_b="raw")
    assert not top_allocated(o / "top.qcow2")
    assert (o / "base.raw").stat().st_size == 6 * MiB
    if layout == "default":  # qemu's mirror copies in 64 KiB chunks: the same as these clusters
        assert qemu_map_json(o / "base.raw", "-f", "raw") == qemu_map_json(q / "base.raw", "-f", "raw")


def test_commit_into_raw_base_through_a_middle_layer(tmp_path: Path) -> None:
    q, o = raw_twins(tmp_path, "", depth=3)
    qemu_img("commit", "-q", "-b", "base.raw", str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2", base="base.raw", drop=True)
    same_images(q, o)
    assert qemu_map_json(o / "base.raw", "-f", "raw") == qemu_map_json(q / "base.raw", "-f", "raw")
    for case in [("commit", "mid.qcow2"), ("commit", "-d", "top.qcow2")]:
        assert cli(o, *case) == oracle(q, *case), case
        same_images(q, o)


def merged_allocation(path: Path) -> list[tuple[int, int, bool, bool, bool]]:
    """qemu-img map's (start, end, present, zero, data) runs, host offsets left out."""
    out: list[tuple[int, int, bool, bool, bool]] = []
    for e in json.loads(qemu_img("map", "--output=json", str(path)).stdout):
        key = (e["present"], e["zero"], e["data"])
        if out and out[-1][1] == e["start"] and out[-1][2:] == key:
            out[-1] = (out[-1][0], e["start"] + e["length"], *key)
        else:
            out.append((e["start"], e["start"] + e["length"], *key))
    return out


def build_qcow_v1(d: Path) -> None:
    """base.qcow (4 MiB, data and a compressed cluster) <- top.qcow2 (4 KiB clusters) with partial
    clusters, zeros, data over the compressed cluster; grow.qcow2 is 6 MiB over the same base."""
    d.mkdir()
    create(str(d / "base.qcow"), 4 * MiB, fmt="qcow")
    qemu_io(str(d / "base.qcow"), "write -P 0x11 0 1M", "write -c -P 0x15 1M 4k", fmt="qcow")
    create(str(d / "top.qcow2"), 4 * MiB, options="cluster_size=4096", backing="base.qcow", backing_fmt="qcow")
    qemu_io(str(d / "top.qcow2"), "write -z 2M 128k", "write -P 0x31 3M 1k", "write -P 0x32 1M 1k",
            "write -P 0x33 100k 3k", "write -P 0x34 2000k 200k")
    create(str(d / "grow.qcow2"), 6 * MiB, backing="base.qcow", backing_fmt="qcow")
    qemu_io(str(d / "grow.qcow2"), "write -P 0x31 4k 70k")


def test_commit_into_qcow_v1_base(tmp_path: Path) -> None:
    """qemu-img commits into a qcow (v1) base (zeros become clusters of zeros, a compressed
    cluster is rewritten whole): the same guest view and allocation; growing one its job
    refuses ("Block job failed: Operation not supported", nothing written): the same."""
    q, o = tmp_path / "qemu", tmp_path / "ours"
    build_qcow_v1(q)
    build_qcow_v1(o)
    assert cli(o, "commit", "grow.qcow2") == oracle(q, "commit", "grow.qcow2")
    same_images(q, o)
    assert (o / "base.qcow").read_bytes() == (q / "base.qcow").read_bytes()
    before = str(tmp_path / "before.raw")
    qemu_img("convert", "-O", "raw", str(o / "top.qcow2"), before)
    assert cli(o, "commit", "top.qcow2") == oracle(q, "commit", "top.qcow2")
    same_images(q, o)
    compare(str(o / "base.qcow"), before, fmt_b="raw")
    assert merged_allocation(o / "base.qcow") == merged_allocation(q / "base.qcow")
    assert (o / "base.qcow").stat().st_size == (q / "base.qcow").stat().st_size


def test_commit_drop_and_deeper_base(tmp_path: Path) -> None:
    q, o = twins(tmp_path, "", depth=3)
    qemu_img("commit", "-q", "-b", "base.qcow2", str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2", base="base.qcow2", drop=True)
    same_images(q, o)
    assert top_allocated(o / "top.qcow2")  # -b implies -d: the image keeps its clusters
    qemu_img("commit", "-q", "-d", str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2", drop=True)
    same_images(q, o)


@pytest.mark.parametrize("layout", ["default", "extended-l2", "compat-0.10"])
@pytest.mark.parametrize("target", ["new.qcow2", ""])
def test_rebase_safe_matches_qemu(tmp_path: Path, layout: str, target: str) -> None:
    q, o = twins(tmp_path, LAYOUTS[layout], depth=3)
    qemu_img("rebase", "-b", target, *(["-F", "qcow2"] if target else []), str(q / "top.qcow2"))
    seen: list[int] = []
    qcowdisk.rebase(o / "top.qcow2", target, backing_format="qcow2" if target else None,
                    progress=lambda d, t: seen.append(d))
    same_images(q, o)
    assert info(str(o / "top.qcow2")).get("backing-filename") == (target or None)
    assert seen and seen[-1] == 6 * MiB
    # One differing sector allocates its whole cluster (subcluster with extended L2), as qemu-img's
    # sector-wise writes do; nothing else is allocated.
    assert allocated_ranges(o / "top.qcow2") == allocated_ranges(q / "top.qcow2")


def test_rebase_unsafe_only_renames(tmp_path: Path) -> None:
    q, o = twins(tmp_path, "")
    for d in (q, o):
        shutil.copy(d / "base.qcow2", d / "copy.qcow2")
    qemu_img("rebase", "-u", "-b", "copy.qcow2", "-F", "qcow2", str(q / "top.qcow2"))
    qcowdisk.rebase(o / "top.qcow2", "copy.qcow2", backing_format="qcow2", unsafe=True)
    same_images(q, o)
    qemu_img("rebase", "-u", "-b", "", str(q / "top.qcow2"))
    qcowdisk.rebase(o / "top.qcow2", "", unsafe=True)
    same_images(q, o)


def test_progress_exception_propagates_and_closes(tmp_path: Path) -> None:
    _, o = twins(tmp_path, "")

    def boom(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qcowdisk.commit(o / "top.qcow2", progress=boom)
    with pytest.raises(KeyboardInterrupt):
        qcowdisk.rebase(o / "top.qcow2", "new.qcow2", backing_format="qcow2", progress=boom)
    for name in ("top.qcow2", "base.qcow2", "new.qcow2"):
        QcowFile.open(o / name).close()  # nothing left open (no lock held)
        assert_clean(str(o / name))
    assert info(str(o / "top.qcow2"))["backing-filename"] == "base.qcow2"


def cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    p = subprocess.run([sys.executable, "-m", "qcowdisk", *args], cwd=cwd, capture_output=True, text=True,
                       check=False)
    return p.returncode, p.stdout, p.stderr.replace("qcowdisk", "qemu-img")


def oracle(cwd: Path, *args: str) -> tuple[int, str, str]:
    p = subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return p.returncode, p.stdout, p.stderr


CLI_CASES = [
    ("commit", "base.qcow2"),
    ("commit", "-b", "nonexist", "top.qcow2"),
    ("commit", "-b", "top.qcow2", "top.qcow2"),
    ("commit", "nothere"),
    ("commit", "top.qcow2"),
    ("commit", "-q", "-d", "top.qcow2"),
    ("commit", "-b", "base.qcow2", "top.qcow2"),
    ("rebase", "top.qcow2"),
    ("rebase", "-b", "x", "top.qcow2"),
    ("rebase", "-b", "x", "-F", "qcow2", "top.qcow2"),
    ("rebase", "-u", "-b", "new.qcow2", "top.qcow2"),
    ("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"),
    ("rebase", "-u", "-b", "", "top.qcow2"),
]


def test_cli_matches_qemu(tmp_path: Path) -> None:
    q, o = twins(tmp_path, "")
    for case in CLI_CASES:
        assert cli(o, *case) == oracle(q, *case), case
        same_images(q, o)


@pytest.mark.parametrize("opts", ["", "cluster_size=4096", "extended_l2=on,cluster_size=65536"])
def test_rebase_progress_line_matches_qemu(tmp_path: Path, opts: str) -> None:
    """-p prints what qemu-img prints: one step per chunk (at most 2 MiB, and never across an L2
    table) of the image's unallocated runs, in single-precision percent; 0 and 100 in unsafe mode."""
    for d in (tmp_path / "q", tmp_path / "o"):
        d.mkdir()
        create(str(d / "b.qcow2"), 10 * MiB + 512)
        qemu_io(str(d / "b.qcow2"), "write -P 1 0 3M")
        create(str(d / "t.qcow2"), 10 * MiB + 512, options=opts or None, backing="b.qcow2", backing_fmt="qcow2")
        qemu_io(str(d / "t.qcow2"), "write -P 2 1M 1M", "write -P 3 5M 64k", "write -P 4 2044k 8k")
    for case in [("rebase", "-p", "-u", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"),
                 ("rebase", "-p", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"),
                 ("rebase", "-p", "-b", "", "t.qcow2")]:
        assert cli(tmp_path / "o", *case) == oracle(tmp_path / "q", *case), case
        same_images(tmp_path / "q", tmp_path / "o")


@pytest.mark.parametrize("opts", ["", "cluster_size=4096"])
def test_rebase_progress_line_onto_a_layer_of_the_chain(tmp_path: Path, opts: str) -> None:
    """Rebasing onto a deeper layer, qemu-img reports only the chunks the layers in between
    allocate (its prefix chain): the same line."""
    for d in (tmp_path / "q", tmp_path / "o"):
        d.mkdir()
        create(str(d / "b.qcow2"), 12 * MiB)
        qemu_io(str(d / "b.qcow2"), "write -P 1 0 3M")
        create(str(d / "m.qcow2"), 12 * MiB, options=opts or None, backing="b.qcow2", backing_fmt="qcow2")
        qemu_io(str(d / "m.qcow2"), "write -P 5 1536k 1M", "write -P 6 6M 3M", "write -z 11M 64k")
        create(str(d / "t.qcow2"), 12 * MiB, options=opts or None, backing="m.qcow2", backing_fmt="qcow2")
        qemu_io(str(d / "t.qcow2"), "write -P 2 1M 1M", "write -P 3 7M 64k")
    case = ("rebase", "-p", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2")
    assert cli(tmp_path / "o", *case) == oracle(tmp_path / "q", *case)
    same_images(tmp_path / "q", tmp_path / "o")


def test_commit_empties_an_image_with_snapshots(tmp_path: Path) -> None:
    """Emptying frees only what the snapshot does not share; the snapshot still reads as before."""
    q, o = twins(tmp_path, "lazy_refcounts=on")
    for d in (q, o):
        qemu_img("snapshot", "-c", "s1", str(d / "top.qcow2"))
        qemu_io(str(d / "top.qcow2"), "write -P 0x51 64k 64k", "write -P 0x52 4M 64k")
    qemu_img("commit", "-q", str(q / "top.qcow2"))
    qcowdisk.commit(o / "top.qcow2")
    same_images(q, o)
    for d in (q, o):
        qemu_img("snapshot", "-a", "s1", str(d / "top.qcow2"))
    same_images(q, o)


def test_set_backing_file(tmp_path: Path) -> None:
    """The QcowFile method under rebase: the new backing file is opened and read through; a
    missing one leaves the image clean on disk and read-only until reopened."""
    _, o = twins(tmp_path, "lazy_refcounts=on")
    with QcowFile.open(o / "top.qcow2") as disk:
        disk.write_at(4 * MiB, b"x" * 5000)
        disk.set_backing_file("new.qcow2", "qcow2")
        assert disk.read_at(1 * MiB + 512 * KiB, 4) == b"\x41" * 4  # from new.qcow2 now
        assert disk.backing is not None and disk.backing_file == "new.qcow2"
        disk.write_at(0, b"y")  # still writable
        disk.set_backing_file("missing.qcow2", "qcow2")
        assert disk.read_at(1 * MiB + 512 * KiB, 4) == bytes(4)
        with pytest.raises(qcowdisk.ReadOnlyError):
            disk.write_at(0, b"z")
    create(str(o / "missing.qcow2"), 6 * MiB)  # qemu-img opens the chain to check it
    assert_clean(str(o / "top.qcow2"))
    i = info(str(o / "top.qcow2"))
    assert i["backing-filename"] == "missing.qcow2" and i["backing-filename-format"] == "qcow2"
    assert not i["format-specific"]["data"].get("corrupt")
    with QcowFile.open(o / "top.qcow2", backing=False) as disk:
        assert disk.read_at(0, 1) == b"y" and disk.read_at(4 * MiB, 5000) == b"x" * 5000
        disk.set_backing_file(None)
        assert disk.backing_file is None
        disk.write_at(0, b"w")
    assert_clean(str(o / "top.qcow2"))
    assert "backing-filename" not in info(str(o / "top.qcow2"))


def test_cli_missing_backing_file(tmp_path: Path) -> None:
    q, o = twins(tmp_path, "")
    for d in (q, o):
        (d / "base.qcow2").unlink()
    for case in [("commit", "top.qcow2"), ("rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2")]:
        assert cli(o, *case) == oracle(q, *case), case
    status, out, err = oracle(tmp_path, "commit", "qemu/top.qcow2")  # names joined to the image's directory
    assert cli(tmp_path, "commit", "ours/top.qcow2") == (status, out, err.replace("qemu/", "ours/"))


def _opened_direct(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Record, per file name, whether the kernel has O_DIRECT on each file os.open opens
    (/proc/self/fdinfo's flags: what the open really did, as in test_convert)."""
    seen: dict[str, bool] = {}
    real_open = os.open

    def recording_open(path: str, flags: int, *args: int, **kw: int) -> int:
        fd = real_open(path, flags, *args, **kw)
        with open(f"/proc/self/fdinfo/{fd}") as f:
            got = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        name = os.path.basename(path)
        seen[name] = seen.get(name, False) or bool(got & os.O_DIRECT)
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    return seen


# qemu-img 7.2 (strace): -t is the image's mode, inherited by its old backing chain; -T opens the
# new backing file, unless it is already in the chain (then its chain node is reused, with -t's mode).
@pytest.mark.parametrize("opts,target,direct", [
    (["-T", "none"], "new.qcow2", {"top.qcow2": False, "mid.qcow2": False, "base.qcow2": False, "new.qcow2": True}),
    (["-T", "directsync"], "new.qcow2", {"top.qcow2": False, "mid.qcow2": False, "new.qcow2": True}),
    (["-t", "none"], "new.qcow2", {"top.qcow2": True, "mid.qcow2": True, "base.qcow2": True, "new.qcow2": False}),
    (["-t", "directsync", "-T", "none"], "new.qcow2", {"top.qcow2": True, "base.qcow2": True, "new.qcow2": True}),
    (["-T", "none"], "base.qcow2", {"top.qcow2": False, "mid.qcow2": False, "base.qcow2": False}),
])
def test_rebase_cache_modes_open_as_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opts: list[str],
                                         target: str, direct: dict[str, bool]) -> None:
    """rebase -T SRC_CACHE reads the new backing file with O_DIRECT for none/directsync, -t the
    image and its old chain, as qemu-img opens them; the rebased images are qemu-img's."""
    q, o = twins(tmp_path, "", depth=3)
    seen = _opened_direct(monkeypatch)
    rc = cli_main(["rebase", *opts, "-b", target, "-F", "qcow2", str(o / "top.qcow2")])
    monkeypatch.undo()
    assert rc == 0
    assert {name: seen.get(name) for name in direct} == direct
    qemu_img("rebase", *opts, "-b", target, "-F", "qcow2", str(q / "top.qcow2"))
    same_images(q, o)
    assert allocated_ranges(o / "top.qcow2") == allocated_ranges(q / "top.qcow2")


@pytest.mark.parametrize("opts", ["", "cluster_size=4096", "extended_l2=on"])
def test_commit_punches_the_data_file_as_qemu(tmp_path: Path, opts: str) -> None:
    """Committing an overlay with an external data file empties it as qemu-img 7.2 does: its
    discards reach the data file, whose clusters become holes (du 0), offset 0 included; the
    overlay, the data file and the base end byte for byte as qemu-img leaves them."""
    q, o = tmp_path / "qemu", tmp_path / "ours"
    q.mkdir()
    with contextlib.chdir(q):  # (QEMU 7.2 creates and opens a relative data file name from the working directory)
        create("base.qcow2", 4 * MiB)
        qemu_io("base.qcow2", "write -P 0x11 0 4M")
        create("top.qcow2", 4 * MiB, options=",".join(x for x in ("data_file=top.data", opts) if x),
               backing="base.qcow2", backing_fmt="qcow2")
        qemu_io("top.qcow2", "write -P 0x33 0 1M", "write -P 0x34 2M 512k", "write -z 3M 64k", "write -P 0x35 3900k 4k")
    subprocess.run(["cp", "-a", "--sparse=always", str(q), str(o)], check=True)  # (copytree fills holes)
    assert layout(str(o / "top.data")) == layout(str(q / "top.data"))
    with contextlib.chdir(q):
        qemu_img("commit", "top.qcow2")
    assert cli_main(["commit", "-q", str(o / "top.qcow2")]) == 0
    assert layout(str(o / "top.data")) == layout(str(q / "top.data"))  # (the same holes: du, SEEK_DATA)
    for name in ("top.data", "top.qcow2"):
        assert (o / name).read_bytes() == (q / name).read_bytes(), name
    compare(str(q / "base.qcow2"), str(o / "base.qcow2"))
    with contextlib.chdir(o):
        assert_clean("top.qcow2")


def test_discarded_data_file_cluster_written_again_keeps_the_data(tmp_path: Path) -> None:
    """A data file cluster a discard queued for punching and a write then maps again (the same
    host offset: guest == host in a data file) is punched before the write, never after it."""
    with contextlib.chdir(tmp_path):
        create("top.qcow2", 1 * MiB, options="data_file=top.data")
        qemu_io("top.qcow2", "write -P 0x33 0 128k")
    with QcowFile.open(tmp_path / "top.qcow2") as img:
        img.make_empty()
        img.write_at(0, b"\x77" * 4096)
    with contextlib.chdir(tmp_path):
        out = qemu_io("top.qcow2", "read -P 0x77 0 4k", "read -P 0 4k 124k")
    assert "Pattern verification failed" not in out
