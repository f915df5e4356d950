"""`qcowdisk convert` and `qcowdisk.convert` do what `qemu-img convert` (QEMU 7.2) does.

QEMU is the oracle: every source is built with qemu-img/qemu-io (or written as a plain file),
both tools convert it with the same options, and then `qemu-img compare` must find qcowdisk's
output identical to the source, `qemu-img map` must show the same data/zero/unallocated ranges
in both outputs (host offsets aside), and `qemu-img check` must find qcowdisk's qcow2 clean.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

import qcowdisk
from qcowdisk import QcowFile, cli
from qcowdisk.ops.convert import ConvertError
from qcowdisk.ops.zeroscan import data_runs
from qemutools import assert_clean, compare, create, qemu_img, qemu_io, qemu_io_holding

REPO = Path(__file__).resolve().parent.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def layout(path: Path, fmt: str) -> list[tuple[int, int, int, bool, bool, bool]]:
    """qemu-img map's entries without host offsets, adjacent equal ones merged."""
    out: list[tuple[int, int, int, bool, bool, bool]] = []
    for e in json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path)).stdout):
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if out and out[-1][2:] == key:
            last = out.pop()
            out.append((last[0], last[1] + e["length"], *key))
        else:
            out.append((e["start"], e["length"], *key))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("src")
    with contextlib.chdir(d):  # the images name each other relatively; cwd goes back after
        return _build_sources(d)


def _build_sources(d: Path) -> dict[str, tuple[Path, str]]:
    # a qcow2 chain: base (data, compressed, zero clusters) under a top layer
    create("base.qcow2", "12M")
    qemu_io("base.qcow2", "write -P 1 0 300k", "write -c -P 2 1M 128k", "write -P 0 3M 64k", "write -P 3 5M 70k",
            "write -P 4 11M 1M")
    create("top.qcow2", "12M", backing="base.qcow2", backing_fmt="qcow2")
    qemu_io("top.qcow2", "write -P 9 100k 8k", "write -z 5M 64k", "write -P 7 7M 2M", "write -P 0 9M 128k")
    # extended L2 with subclusters and a small cluster size
    create("ext.qcow2", "4M", options="extended_l2=on,cluster_size=64k")
    qemu_io("ext.qcow2", "write -P 5 4k 4k", "write -P 6 100k 12k", "write -z 200k 64k")
    # qcow v1
    create("v1.qcow", "3M", fmt="qcow")
    qemu_io("v1.qcow", "write -P 1 0 8k", "write -P 3 1M 64k", fmt="qcow")
    # a raw file with holes, an odd size and a tail of sparse-ish data
    with open("plain.raw", "wb") as f:
        f.truncate(5 * MiB + 1000)
        f.seek(4096)
        f.write(b"\x11" * 10000)
        f.seek(2 * MiB)
        f.write(b"\x22" * 4096 + bytes(8192) + b"\x33" * 512 + bytes(70000) + b"\x44")
        f.seek(5 * MiB)
        f.write(b"\x55" * 1000)
    # internal snapshots
    create("snap.qcow2", "4M")
    qemu_io("snap.qcow2", "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "first", "snap.qcow2")
    qemu_io("snap.qcow2", "write -P 2 512k 1M")
    return {"top": (d / "top.qcow2", "qcow2"), "base": (d / "base.qcow2", "qcow2"), "ext": (d / "ext.qcow2", "qcow2"),
            "v1": (d / "v1.qcow", "qcow"), "raw": (d / "plain.raw", "raw"), "snap": (d / "snap.qcow2", "qcow2")}


def both(tmp: Path, src: Path, out_fmt: str, *args: str) -> tuple[Path, Path]:
    """Convert `src` with qemu-img and with `qcowdisk convert`, the same arguments; (ours, qemu's)."""
    ours, theirs = tmp / f"ours.{out_fmt}", tmp / f"qemu.{out_fmt}"
    qemu_img("convert", "-O", out_fmt, *args, str(src), str(theirs))
    assert cli.main(["convert", "-O", out_fmt, *args, str(src), str(ours)]) == 0
    return ours, theirs


def same_result(ours: Path, theirs: Path, src: Path, fmt: str, src_fmt: str) -> None:
    compare(str(src), str(ours), src_fmt, fmt)
    assert layout(ours, fmt) == layout(theirs, fmt)
    if fmt == "qcow2":
        assert_clean(str(ours))
    a, b = ours.stat().st_size, theirs.stat().st_size
    assert abs(a - b) <= max(b // 20, 64 * KiB), (a, b)  # the file sizes within 5%
    assert ours.stat().st_blocks <= theirs.stat().st_blocks * 1.05 + 128  # and no more space used


@pytest.mark.parametrize("name", ["top", "base", "ext", "v1", "raw"])
@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_every_source_kind(tmp_path: Path, sources: dict[str, tuple[Path, str]], name: str, out_fmt: str) -> None:
    src, fmt = sources[name]
    ours, theirs = both(tmp_path, src, out_fmt)
    same_result(ours, theirs, src, out_fmt, fmt)


@pytest.mark.parametrize("sparse", ["0", "512", "4k", "64k", "1M"])
@pytest.mark.parametrize("name", ["top", "raw"])
@pytest.mark.parametrize("out_fmt", ["qcow2", "raw"])
def test_sparse_sizes(tmp_path: Path, sources: dict[str, tuple[Path, str]], name: str, sparse: str,
                      out_fmt: str) -> None:
    src, fmt = sources[name]
    ours, theirs = both(tmp_path, src, out_fmt, "-S", sparse)
    same_result(ours, theirs, src, out_fmt, fmt)


@pytest.mark.parametrize("opts", ["cluster_size=4k", "cluster_size=2M", "compat=0.10", "refcount_bits=1",
                                  "extended_l2=on", "lazy_refcounts=on", "preallocation=metadata",
                                  "compression_type=zstd,cluster_size=128k", "data_file=ext.data",
                                  "data_file=ext.data,data_file_raw=on"])
def test_create_options(tmp_path: Path, sources: dict[str, tuple[Path, str]], opts: str) -> None:
    if "data_file" in opts:  # each tool its own data file
        (tmp_path / "ours").mkdir()
        (tmp_path / "theirs").mkdir()
        src, fmt = sources["top"]
        ours, theirs = tmp_path / "ours" / "out.qcow2", tmp_path / "theirs" / "out.qcow2"
        qemu_img("convert", "-O", "qcow2", "-o", opts.replace("ext.data", str(tmp_path / "theirs" / "ext.data")),
                 str(src), str(theirs))
        assert cli.main(["convert", "-O", "qcow2", "-o", opts.replace("ext.data", str(tmp_path / "ours" / "ext.data")),
                         str(src), str(ours)]) == 0
        compare(str(src), str(ours))
        assert layout(ours, "qcow2") == layout(theirs, "qcow2")
        assert_clean(str(ours))
        return
    src, fmt = sources["top"]
    ours, theirs = both(tmp_path, src, "qcow2", "-o", opts)
    same_result(ours, theirs, src, "qcow2", fmt)
    info_ours = json.loads(qemu_img("info", "--output=json", str(ours)).stdout)
    info_theirs = json.loads(qemu_img("info", "--output=json", str(theirs)).stdout)
    assert info_ours["cluster-size"] == info_theirs["cluster-size"]
    assert info_ours["format-specific"] == info_theirs["format-specific"]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("name", ["top", "raw"])
def test_compressed(tmp_path: Path, sources: dict[str, tuple[Path, str]], ctype: str, name: str) -> None:
    src, fmt = sources[name]
    ours, theirs = both(tmp_path, src, "qcow2", "-c", "-o", f"compression_type={ctype}", "-m", "4")
    compare(str(src), str(ours), fmt, "qcow2")
    assert_clean(str(ours))
    assert layout(ours, "qcow2") == layout(theirs, "qcow2")
    assert ours.stat().st_size <= theirs.stat().st_size * 1.02 + 64 * KiB
    info = json.loads(qemu_img("info", "--output=json", str(ours)).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    mapped = json.loads(qemu_img("map", "--output=json", str(ours)).stdout)
    assert any(e["data"] and "offset" not in e for e in mapped)  # compressed clusters have no offset


@pytest.mark.parametrize("sparse", ["0", "4k"])
def test_compressed_cluster_shared_by_hole_and_data(tmp_path: Path, sparse: str) -> None:
    """A 64 KiB cluster whose first half is a hole in a raw source and second half data."""
    src = tmp_path / "holes.raw"
    with open(src, "wb") as f:
        f.truncate(1 * MiB)
        for at in (32 * KiB, 200 * KiB, 300 * KiB + 4 * KiB):
            f.seek(at)
            f.write(b"\x5a" * 8 * KiB)
    ours, theirs = both(tmp_path, src, "qcow2", "-c", "-S", sparse)
    compare(str(src), str(ours), "raw", "qcow2")
    assert layout(ours, "qcow2") == layout(theirs, "qcow2")
    assert_clean(str(ours))


def test_backing_in_chain(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    src, _ = sources["top"]
    base = str(sources["base"][0])
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "qemu.qcow2"
    qemu_img("convert", "-O", "qcow2", "-B", base, "-F", "qcow2", str(src), str(theirs))
    assert cli.main(["convert", "-O", "qcow2", "-B", base, "-F", "qcow2", str(src), str(ours)]) == 0
    compare(str(src), str(ours))
    assert_clean(str(ours))
    assert layout(ours, "qcow2") == layout(theirs, "qcow2")
    assert json.loads(qemu_img("info", "--output=json", str(ours)).stdout)["backing-filename"] == base


def test_backing_deeper_in_chain(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    """-B naming the bottom of a three-image chain: both layers above it are copied (and only they)."""
    base = str(sources["base"][0])
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top3.qcow2"
    create(str(mid), "12M", backing=base, backing_fmt="qcow2")
    qemu_io(str(mid), "write -P 0x21 2M 256k", "write -z 0 64k")
    create(str(top), "12M", backing=str(mid), backing_fmt="qcow2")
    qemu_io(str(top), "write -P 0x31 2M 64k", "write -P 0x32 8M 64k")
    for extra in ([], ["-c"]):
        out = tmp_path / "out.qcow2"
        out.unlink(missing_ok=True)
        assert cli.main(["convert", "-O", "qcow2", *extra, "-B", base, "-F", "qcow2", str(top), str(out)]) == 0
        compare(str(top), str(out))
        assert_clean(str(out))
        with QcowFile.open(out, readonly=True) as disk:
            own = sum(e.length for e in disk.block_status() if e.depth == 0 and e.present)
        assert own == 64 * KiB + 256 * KiB + 64 * KiB  # mid's two writes, top's write outside them


def test_backing_not_in_chain(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    """A source that is not an overlay of BACKING: only the clusters that differ are written."""
    flat = tmp_path / "flat.qcow2"
    qemu_img("convert", "-O", "qcow2", str(sources["top"][0]), str(flat))
    base = str(sources["base"][0])
    out = tmp_path / "out.qcow2"
    qcowdisk.convert(flat, out, backing_file=base, backing_format="qcow2")
    compare(str(flat), str(out))
    assert_clean(str(out))
    with QcowFile.open(out, readonly=True) as disk:
        own = sum(e.length for e in disk.block_status() if e.depth == 0 and e.present)
    assert own <= 3 * MiB  # the top layer's writes (and the base's overwritten ranges), not the whole disk


@pytest.mark.parametrize("target_opts", ["", "extended_l2=on", "cluster_size=4k", "compat=0.10"])
def test_target_exists(tmp_path: Path, sources: dict[str, tuple[Path, str]], target_opts: str) -> None:
    src, fmt = sources["top"]
    for out_fmt in ("qcow2", "raw"):
        if out_fmt == "raw" and target_opts:
            continue
        target, theirs = tmp_path / f"t.{out_fmt}", tmp_path / f"qemu-t.{out_fmt}"
        for t in (target, theirs):
            create(str(t), "12M", fmt=out_fmt, options=target_opts or None)
            # stale data in most of it, a hole in the middle (no L2 table there with 4k clusters)
            qemu_io(str(t), "write -P 0xee 0 5M", "write -P 0xee 7M 5M", fmt=out_fmt)
        assert cli.main(["convert", "-n", "-O", out_fmt, str(src), str(target)]) == 0
        qemu_img("convert", "-n", "-O", out_fmt, str(src), str(theirs))
        compare(str(src), str(target), fmt, out_fmt)
        # QEMU zeroes a qcow2 cluster with MAY_UNMAP: a zero cluster "present" in the target,
        # freed if it was allocated, flagged even where it was not
        assert layout(target, out_fmt) == layout(theirs, out_fmt)
        if out_fmt == "qcow2":
            assert_clean(str(target))
            assert target.stat().st_size <= theirs.stat().st_size + 64 * KiB
    small = tmp_path / "small.qcow2"
    create(str(small), "1M")
    with pytest.raises(ConvertError, match="smaller"):
        qcowdisk.convert(src, small, target_exists=True)


@pytest.mark.parametrize("ref", ["snapshot.name=first", "snapshot.id=1"])
def test_snapshot(tmp_path: Path, sources: dict[str, tuple[Path, str]], ref: str) -> None:
    src, _ = sources["snap"]
    ours, theirs = both(tmp_path, src, "qcow2", "-l", ref)
    compare(str(theirs), str(ours))
    assert layout(ours, "qcow2") == layout(theirs, "qcow2")
    assert_clean(str(ours))


def test_snapshot_of_a_smaller_disk(tmp_path: Path) -> None:
    """qemu-img exports a snapshot at the active disk's size, zeros past the snapshot's end."""
    src = tmp_path / "grown.qcow2"
    create(str(src), "2M")
    qemu_io(str(src), "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s1", str(src))
    qemu_img("resize", "-q", str(src), "6M")
    qemu_io(str(src), "write -P 2 3M 1M")
    ours, theirs = both(tmp_path, src, "qcow2", "-l", "snapshot.name=s1")
    compare(str(theirs), str(ours), strict=True)
    assert layout(ours, "qcow2") == layout(theirs, "qcow2")


def test_cli_errors(tmp_path: Path, sources: dict[str, tuple[Path, str]], capsys: pytest.CaptureFixture[str]) -> None:
    src = str(sources["top"][0])
    out = str(tmp_path / "x.qcow2")
    cases = [
        (["convert", "-O", "qcow2", str(tmp_path / "missing"), out], "Could not open"),
        (["convert", "-O", "qcow2", "-S", "1000", src, out], "Invalid buffer size for sparse output"),
        (["convert", "-O", "raw", "-c", src, out], "Compression not supported"),
        (["convert", "-O", "qcow2", "-o", "bogus=1", src, out], "Invalid parameter 'bogus'"),
        (["convert", "-O", "qcow2", "-l", "snapshot.name=nope", str(sources["snap"][0]), out], "nope"),
        (["convert", "-O", "vmdk", src, out], "vmdk"),
        (["convert", "-O", "qcow2", src], "DST"),
        (["convert", "-O", "qcow2", src, src], "lock"),
        (["convert", "-O", "raw", src, str(sources["base"][0])], "lock"),
        (["convert", "-O", "qcow2", "-m", "0", "-c", src, out], "Invalid number of coroutines"),
    ]
    before = (Path(src).read_bytes(), sources["base"][0].read_bytes())
    for argv, text in cases:
        capsys.readouterr()
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("qcowdisk: ") and text in err, (argv, err)
        assert "Traceback" not in err
    assert (Path(src).read_bytes(), sources["base"][0].read_bytes()) == before


def test_replaced_target_is_a_new_file(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    """A file at the target's path is replaced (its name taken, not its contents written over),
    and the old file is gone when convert returns: its blocks are freed by a close in a thread
    of its own (joined: no thread is left behind), on success and on failure."""
    def closers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "qcowdisk-free-old-target"]

    src = sources["top"][0]
    for out_fmt in ("qcow2", "raw"):
        dst, keep = tmp_path / f"t.{out_fmt}", tmp_path / f"keep.{out_fmt}"
        dst.write_bytes(b"old" * 100000)
        os.link(dst, keep)
        qcowdisk.convert(src, dst, out_format=out_fmt)
        assert closers() == []
        assert keep.read_bytes() == b"old" * 100000 and keep.stat().st_nlink == 1  # the old file, unlinked
        compare(str(src), str(dst), "qcow2", out_fmt)
    with pytest.raises(ValueError, match="Cluster size"):  # failing once the old file went: joined too
        qcowdisk.convert(src, dst, options="cluster_size=3")
    assert closers() == [] and not dst.exists()


def test_target_in_use_is_refused(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    """A target file another process holds (here a qemu-io session) is left alone."""
    busy = tmp_path / "busy.qcow2"
    create(str(busy), "1M")
    before = busy.read_bytes()
    with qemu_io_holding(str(busy)):  # waits for its prompt: polling with qemu-img info races its open
        for out_fmt in ("qcow2", "raw"):
            with pytest.raises(qcowdisk.ImageLockedError):
                qcowdisk.convert(sources["top"][0], busy, out_format=out_fmt)
    assert busy.read_bytes() == before


def test_progress_and_failing_callback(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    src, _ = sources["top"]
    seen: list[tuple[int, int]] = []
    qcowdisk.convert(src, tmp_path / "p.qcow2", progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 12 * MiB) and seen[-1] == (12 * MiB, 12 * MiB)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(seen))

    def boom(done: int, total: int) -> None:
        if done:
            raise KeyboardInterrupt

    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        qcowdisk.convert(src, tmp_path / "q.qcow2", progress=boom)
    assert len(os.listdir("/proc/self/fd")) == fds
    with QcowFile.open(tmp_path / "q.qcow2"):  # not left locked
        pass


def test_huge_sparse_source_constant_memory(tmp_path: Path) -> None:
    src = tmp_path / "big.qcow2"
    create(str(src), "100G")
    qemu_io(str(src), "write -P 1 0 64k", "write -P 2 50G 1M", "write -P 3 99G 64k")
    for out_fmt in ("qcow2", "raw"):
        out = tmp_path / f"big-out.{out_fmt}"
        tracemalloc.start()
        qcowdisk.convert(src, out, out_format=out_fmt)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 32 * MiB, peak
        assert out.stat().st_blocks * 512 < 8 * MiB
        compare(str(src), str(out), "qcow2", out_fmt)


def test_progress_line_on_terminal(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    import pty
    src, _ = sources["top"]
    master, slave = pty.openpty()
    p = subprocess.run([sys.executable, "-m", "qcowdisk", "convert", "-p", "-O", "qcow2", str(src),
                        str(tmp_path / "pp.qcow2")], stdout=slave, stderr=subprocess.PIPE, check=False,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(slave)
    text = os.read(master, 65536).decode()
    os.close(master)
    assert p.returncode == 0, p.stderr
    assert "(0.00/100%)" in text and "(100.00/100%)" in text


def test_zero_detection_matches_qemu_rules() -> None:
    sec = bytes(512)
    d = b"\x01" * 512
    # data, 3 zero sectors (< min 8: kept as data), data, 16 zero sectors (a hole)
    buf = bytearray(d + sec * 3 + d + sec * 16 + d)
    runs = list(data_runs(buf, len(buf) // 512, 0, 8, 8))
    assert sum(n for _, n in runs) == len(buf) // 512
    assert runs[0][0] and not runs[1][0] and runs[-1][0]
    assert re.fullmatch(r"[01]+", "".join(str(int(a)) for a, _ in runs))


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
@pytest.mark.parametrize("sparse", ["4k", "0"])
@pytest.mark.parametrize("name", ["top", "raw"])
def test_raw_preallocation(tmp_path: Path, sources: dict[str, tuple[Path, str]], prealloc: str, sparse: str,
                           name: str) -> None:
    """A raw target maps as qemu-img's: falloc leaves unwritten extents (zero), full writes zeros (data)."""
    src, fmt = sources[name]
    ours, theirs = both(tmp_path, src, "raw", "-S", sparse, "-o", f"preallocation={prealloc}")
    # (mapped before anything reads the files: ext4 reports unwritten extents with pages in the
    # page cache as data)
    assert layout(ours, "raw") == layout(theirs, "raw")
    compare(str(src), str(ours), fmt, "raw")
    assert ours.stat().st_blocks <= theirs.stat().st_blocks * 1.05 + 16


def test_create_with_raw_data_file_preallocates_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img create -o data_file=F,data_file_raw=on maps every cluster 1:1 onto the data file."""
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=q.raw,data_file_raw=on", "q.qcow2", "4M")
    assert cli.main(["create", "-q", "-f", "qcow2", "-o", "data_file=o.raw,data_file_raw=on", "o.qcow2", "4M"]) == 0
    assert layout(Path("o.qcow2"), "qcow2") == layout(Path("q.qcow2"), "qcow2")
    info = [json.loads(qemu_img("info", "--output=json", f"{n}.qcow2").stdout) for n in "oq"]
    for i in info:
        i.pop("filename")
        i["format-specific"]["data"].pop("data-file")
    assert info[0] == info[1]
    checks = [json.loads(qemu_img("check", "--output=json", f"{n}.qcow2").stdout) for n in "oq"]
    for c in checks:
        c.pop("filename")
    assert checks[0] == checks[1]
    assert os.path.getsize("o.raw") == os.path.getsize("q.raw") == 4 * MiB


def test_target_is_zero(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    src, fmt = sources["top"]
    target, theirs = tmp_path / "t.qcow2", tmp_path / "q.qcow2"
    for t in (target, theirs):
        create(str(t), "12M")
    qcowdisk.convert(src, target, target_exists=True, target_is_zero=True)
    qemu_img("convert", "-n", "--target-is-zero", "-O", "qcow2", str(src), str(theirs))
    compare(str(src), str(target), fmt, "qcow2")
    assert layout(target, "qcow2") == layout(theirs, "qcow2")
    with pytest.raises(ConvertError, match=r"^--target-is-zero requires use of -n flag$"):
        qcowdisk.convert(src, tmp_path / "new.qcow2", target_is_zero=True)
    overlay = tmp_path / "overlay.qcow2"
    create(str(overlay), "12M", backing=str(target), backing_fmt="qcow2")
    with pytest.raises(ConvertError, match=r"^Cannot use --target-is-zero when the destination image has a backing"):
        qcowdisk.convert(src, overlay, target_exists=True, target_is_zero=True)


def test_cache_modes(tmp_path: Path, sources: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """unsafe never fsyncs (qemu-img convert's default), writeback syncs, writethrough syncs every write."""
    src, fmt = sources["top"]
    real_fsync = os.fsync
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    counts = {}
    for mode in ("unsafe", "writeback", "none", "writethrough", "directsync"):
        for out_fmt in ("qcow2", "raw"):
            calls.clear()
            out = tmp_path / f"{mode}.{out_fmt}"
            qcowdisk.convert(src, out, out_format=out_fmt, cache=mode, src_cache=mode)
            compare(str(src), str(out), fmt, out_fmt)
            counts[mode, out_fmt] = len(calls)
    for out_fmt in ("qcow2", "raw"):
        assert counts["unsafe", out_fmt] == 0
        assert counts["writeback", out_fmt] >= 1 and counts["none", out_fmt] >= 1
        assert counts["writethrough", out_fmt] > counts["writeback", out_fmt]
        assert counts["directsync", out_fmt] > counts["writeback", out_fmt]
    with pytest.raises(ConvertError, match=r"^Invalid cache option: bogus$"):
        qcowdisk.convert(src, tmp_path / "x.qcow2", cache="bogus")
    with pytest.raises(ConvertError, match=r"^Invalid source cache option: bogus$"):
        qcowdisk.convert(src, tmp_path / "x.qcow2", src_cache="bogus")
    assert not (tmp_path / "x.qcow2").exists()


def test_rate_limit(tmp_path: Path, sources: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """-r RATE: the writes are paced to RATE bytes a second (a fake clock: nothing really waits)."""
    from qcowdisk.ops import cachemode
    now = [100.0]
    slept: list[float] = []

    def sleep(t: float) -> None:
        slept.append(t)
        now[0] += t
    monkeypatch.setattr(cachemode.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(cachemode.time, "sleep", sleep)
    src, fmt = sources["raw"]
    qcowdisk.convert(src, tmp_path / "r.qcow2", rate_limit=MiB, sparse_size=0)
    compare(str(src), str(tmp_path / "r.qcow2"), fmt, "qcow2")
    size = -(-src.stat().st_size // 512) * 512  # the guest disk: whole sectors
    # every byte written counts: paced to RATE, less the tenth of a second QEMU's bucket lets through
    assert now[0] - 100.0 == pytest.approx(size / MiB - 0.1, abs=1e-6)
    assert slept and all(t > 0 for t in slept)
    slept.clear()
    qcowdisk.convert(src, tmp_path / "r2.qcow2", rate_limit=0)
    assert not slept
    with pytest.raises(ConvertError, match="negative"):
        qcowdisk.convert(src, tmp_path / "r3.qcow2", rate_limit=-1)


def test_force_share(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    """-U: a source another process holds for writing is read anyway, as qemu-img convert -U does."""
    src = tmp_path / "busy.qcow2"
    qemu_img("convert", "-O", "qcow2", str(sources["base"][0]), str(src))
    with qemu_io_holding(str(src)):
        with pytest.raises(qcowdisk.ImageLockedError):
            qcowdisk.convert(src, tmp_path / "a.qcow2")
        qcowdisk.convert(src, tmp_path / "b.qcow2", force_share=True)
    compare(str(src), str(tmp_path / "b.qcow2"))


@pytest.mark.parametrize("out_of_order", [False, True])
def test_compressed_threads_and_order(tmp_path: Path, out_of_order: bool) -> None:
    """Jobs compress in threads; in order (no -W) the payloads lie in the file in guest order."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(48):  # 3 MiB of compressible clusters, a zero one every 5th
            f.write(bytes(64 * KiB) if i % 5 == 4 else ((b"cluster %d " % i) * 7000)[:64 * KiB])
    out = tmp_path / "c.qcow2"
    qcowdisk.convert(src, out, compress=True, threads=4, out_of_order=out_of_order)
    compare(str(src), str(out), "raw", "qcow2")
    assert_clean(str(out))
    theirs = tmp_path / "q.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", str(src), str(theirs))
    assert layout(out, "qcow2") == layout(theirs, "qcow2")
    if not out_of_order:  # each cluster's payload (as the engine encodes it) lies after the previous one's
        from qcowdisk.qcow2.compress import compress_cluster
        from qcowdisk.qcow2.format import COMPRESSION_ZLIB
        raw, clusters = out.read_bytes(), src.read_bytes()
        at = [raw.find(compress_cluster(clusters[i * 64 * KiB:(i + 1) * 64 * KiB], COMPRESSION_ZLIB))
              for i in range(48) if i % 5 != 4]
        assert min(at) > 0 and at == sorted(at)


def test_compressed_cancel_leaves_target_closed(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    import threading
    src, _ = sources["top"]

    def boom(done: int, total: int) -> None:
        if done > MiB:
            raise KeyboardInterrupt
    before = threading.active_count()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(KeyboardInterrupt):
        qcowdisk.convert(src, tmp_path / "c.qcow2", compress=True, threads=3, progress=boom)
    assert threading.active_count() == before  # the workers are gone
    assert len(os.listdir("/proc/self/fd")) == fds
    with QcowFile.open(tmp_path / "c.qcow2"):  # closed, not locked, and it opens
        pass
    assert_clean(str(tmp_path / "c.qcow2"))


def test_compressed_clusters_api(tmp_path: Path) -> None:
    """compress_clusters then write_compressed_clusters is write_compressed; clusters prepared for
    another image shape are refused."""
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create(str(a), "1M")
    create(str(b), "1M", options="cluster_size=4k")
    data = b"compress me " * (128 * KiB // 12) + bytes(128 * KiB % 12)
    with QcowFile.open(a) as da, QcowFile.open(b) as db:
        prepared = da.compress_clusters(64 * KiB, data)
        with pytest.raises(ValueError, match="not prepared for image"):
            db.write_compressed_clusters(prepared)
        da.write_compressed_clusters(prepared)
        assert da.read_at(64 * KiB, len(data)) == data
        with pytest.raises(ValueError, match="multiple of the cluster size"):
            da.compress_clusters(1000, data)
    assert_clean(str(a))
    assert json.loads(qemu_img("check", "--output=json", str(a)).stdout)["compressed-clusters"] == 2


def test_bitmaps(tmp_path: Path, sources: dict[str, tuple[Path, str]]) -> None:
    """--bitmaps: what qemu-img refuses is refused with its message; a source without bitmaps
    converts, and so does one with bitmaps (copied: tests/test_bitmaps.py)."""
    src, fmt = sources["base"]
    qcowdisk.convert(src, tmp_path / "a.qcow2", bitmaps=True)
    compare(str(src), str(tmp_path / "a.qcow2"), fmt, "qcow2")
    for args, kw, message in [
            (["-O", "raw", str(src)], {"out_format": "raw"}, "Format driver 'raw' does not support bitmaps"),
            (["-O", "qcow2", "-o", "compat=0.10", str(src)], {"options": "compat=0.10"},
             "Format driver 'qcow2' does not support bitmaps"),
            (["-O", "qcow2", str(sources["raw"][0])], {"src": sources["raw"][0]}, "Source lacks bitmap support")]:
        r = qemu_img("convert", "--bitmaps", *args, str(tmp_path / "q.out"), check=False)
        assert r.returncode == 1 and message in r.stderr
        kw.setdefault("src", src)
        with pytest.raises(ConvertError, match=f"^{re.escape(message)}$"):
            qcowdisk.convert(kw.pop("src"), tmp_path / "o.out", bitmaps=True, **kw)  # type: ignore[arg-type]
        assert not (tmp_path / "o.out").exists()
    marked = tmp_path / "bm.qcow2"
    qemu_img("convert", "-O", "qcow2", str(src), str(marked))
    qemu_img("bitmap", "--add", str(marked), "b0")
    qcowdisk.convert(marked, tmp_path / "bm-out.qcow2", bitmaps=True)  # (tests/test_bitmaps.py: contents)
    assert json.loads(qemu_img("info", "--output=json", str(tmp_path / "bm-out.qcow2")).stdout)[
        "format-specific"]["data"]["bitmaps"] == [{"flags": ["auto"], "name": "b0", "granularity": 65536}]


@pytest.mark.parametrize("opts", [["-t", "bogus"], ["-T", "bogus"], ["-r", "-1"], ["-r", "abc"], ["-r", "1x"],
                                  ["-r", "99999999999999999999"], ["--target-is-zero"], ["-r", "1G"], ["-r", "0"],
                                  ["-t", "off"], ["-t", "none"], ["-t", "writeback"], ["-T", "directsync"],
                                  ["-t", "writethrough"], ["-U"], ["-W"], ["-W", "-c", "-m", "3"], ["--bitmaps"]])
def test_cli_options_as_qemu_img(tmp_path: Path, sources: dict[str, tuple[Path, str]],
                                 capsys: pytest.CaptureFixture[str], opts: list[str]) -> None:
    """-t, -T, -r, -U, -W, --target-is-zero, --bitmaps: the same messages and exit codes as qemu-img."""
    src, fmt = sources["base"]
    ours, theirs = tmp_path / "o.qcow2", tmp_path / "q.qcow2"
    q = qemu_img("convert", *opts, "-O", "qcow2", str(src), str(theirs), check=False)
    capsys.readouterr()
    rc = cli.main(["convert", *opts, "-O", "qcow2", str(src), str(ours)])
    err = capsys.readouterr().err
    assert rc == q.returncode
    assert err == q.stderr.replace("qemu-img: ", "qcowdisk: ")
    # (on a bad -t, qemu-img has created the target already and leaves it; qcowdisk creates nothing)
    assert not ours.exists() if rc else ours.exists()
    if rc == 0:
        compare(str(src), str(ours), fmt, "qcow2")
        assert layout(ours, "qcow2") == layout(theirs, "qcow2")


def _fd_direct(fd: int) -> bool:
    """Whether the kernel has O_DIRECT set on `fd` (/proc/self/fdinfo's octal flags)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    return bool(flags & os.O_DIRECT)


@pytest.mark.parametrize("mode", ["none", "directsync"])
@pytest.mark.parametrize("out_fmt,extra", [("qcow2", []), ("raw", []), ("qcow2", ["-c", "-W", "-m", "3"])])
def test_direct_io_modes(tmp_path: Path, sources: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch,
                         mode: str, out_fmt: str, extra: list[str]) -> None:
    """-t none / directsync and -T none / directsync read and write with O_DIRECT (as qemu-img opens
    them), every direct request aligned to 512 bytes, and the result is qemu-img's (its file length too)."""
    src, fmt = sources["top"]
    seen: list[tuple[str, bool, int, int]] = []
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        seen.append(("r", _fd_direct(fd), offset, sum(memoryview(b).nbytes for b in bufs)))
        return real_preadv(fd, bufs, offset)

    def pwritev(fd: int, bufs: list[memoryview], offset: int) -> int:
        seen.append(("w", _fd_direct(fd), offset, sum(memoryview(b).nbytes for b in bufs)))
        return real_pwritev(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)
    ours, theirs = tmp_path / f"o.{out_fmt}", tmp_path / f"q.{out_fmt}"
    rc = cli.main(["convert", "-t", mode, "-T", mode, *extra, "-O", out_fmt, str(src), str(ours)])
    monkeypatch.undo()
    assert rc == 0
    qemu_img("convert", "-t", mode, "-T", mode, *extra, "-O", out_fmt, str(src), str(theirs))
    assert any(kind == "r" and direct for kind, direct, _, _ in seen)
    assert any(kind == "w" and direct for kind, direct, _, _ in seen)
    assert [s for s in seen if s[1] and (s[2] % 512 or s[3] % 512)] == []
    compare(str(src), str(ours), fmt, out_fmt)
    assert ours.stat().st_size == theirs.stat().st_size
    if not extra:
        assert layout(ours, out_fmt) == layout(theirs, out_fmt)
    if out_fmt == "qcow2":
        assert_clean(str(ours))


def test_direct_io_refused(tmp_path: Path, sources: dict[str, tuple[Path, str]], monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """A file system that refuses O_DIRECT (EINVAL at open) fails -T none / -t none as QEMU's
    file-posix does (qemu_open's message)."""
    import errno

    from qcowdisk import hostio
    src, _ = sources["base"]
    real_open = hostio.os.open

    def no_direct(path: str, flags: int, *rest: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *rest)

    monkeypatch.setattr(hostio.os, "open", no_direct)
    for opt, shown in (("-T", str(src)), ("-t", str(tmp_path / "o.qcow2"))):
        rc = cli.main(["convert", opt, "none", "-O", "qcow2", str(src), str(tmp_path / "o.qcow2")])
        assert rc == 1
        assert capsys.readouterr().err == (f"qcowdisk: Could not open '{shown}': Could not open '{shown}': "
                                           "filesystem does not support O_DIRECT\n")
