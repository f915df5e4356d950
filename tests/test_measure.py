"""`qcowdisk measure` and `qcowdisk.measure` print and return what `qemu-img measure` (QEMU 7.2) does.

QEMU is the oracle: both tools measure the same thing from the same working directory (a
--size with a matrix of creation options, or a source image built with qemu-img/qemu-io:
qcow2 with data, zero and compressed clusters, raw files with holes, chains, subclusters,
preallocation, qcow v1, persistent bitmaps) and stdout, stderr (program name normalised) and
the exit status must be identical, in the human and the JSON format, for qcow2 and raw targets;
option refusals are compared message by message.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import qcowdisk
from clirun import qcowdisk_in, qemu_img_in, same_as_qemu_img
from imagefactory import raw_qcow2_qcow2_chain, sparse_file
from qcowdisk import QcowFile
from qcowdisk.ops.measure import calc_prealloc_size
from qcowdisk.ops.qemuopts import OptionError, split_option_list, strtou64, valid_option_list
from qemutools import create, qemu_img, qemu_io

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

SOURCES = ["data.qcow2", "empty.qcow2", "holes.raw", "odd.raw", "top.qcow2", "short-top.qcow2", "ext.qcow2",
           "pre-meta.qcow2", "pre-full.qcow2", "sparse-copy.qcow2", "q1.qcow", "v2.qcow2", "bitmaps.qcow2",
           "df.qcow2", "small-clusters.qcow2", "odd.qcow2", "big.qcow2"]


def build_sources(d: Path) -> None:
    with contextlib.chdir(d):
        create("data.qcow2", "6M")
        qemu_io("data.qcow2", "write -P 1 0 192k", "write -z 64k 64k", "write -c -P 2 1M 128k",
                "write -P 3 2M 100k", "write -z 3M 64k", "write -P 0 4M 64k", "write -P 4 5M 4k")
        create("empty.qcow2", "1G")
        sparse_file(d / "holes.raw", 5 * MiB + 1000, [(4096, b"x" * 100), (MiB + 60 * KiB, b"y" * 8192),
                                              (5 * MiB + 999, b"z")])
        sparse_file(d / "odd.raw", 70000, [(0, b"z" * 1000)])
        raw_qcow2_qcow2_chain(d)
        create("sb.qcow2", "1M")
        qemu_io("sb.qcow2", "write -P 1 0 64k", "write -P 2 960k 64k")
        create("short-top.qcow2", "2M", backing="sb.qcow2", backing_fmt="qcow2")
        qemu_io("short-top.qcow2", "write -P 3 1536k 64k")
        create("ext.qcow2", "1M", options="extended_l2=on")
        qemu_io("ext.qcow2", "write -P 1 0 4k", "write -z 8k 4k", "write -P 2 64k 2k", "write -c -P 4 256k 64k")
        create("pre-meta.qcow2", "2M", options="preallocation=metadata")
        qemu_io("pre-meta.qcow2", "write -P 1 64k 4k", "write -z 256k 64k", "write -P 2 700k 100k")
        create("pre-full.qcow2", "2M", options="preallocation=full")
        qemu_io("pre-full.qcow2", "write -P 1 64k 4k")
        create("s.qcow2", "4M")
        qemu_io("s.qcow2", "write -P 1 0 1M", "write -P 0 1M 1M", "write -P 2 2M 4k", "write -P 0 3M 64k")
        subprocess.run(["cp", "--sparse=always", "s.qcow2", "sparse-copy.qcow2"], check=True)
        create("q1.qcow", "2M", fmt="qcow")
        qemu_io("q1.qcow", "write -P 1 0 8k", "write -c -P 2 64k 4k", "write -P 3 1M 64k", fmt="qcow")
        create("v2.qcow2", "2M", options="compat=0.10")
        qemu_io("v2.qcow2", "write -P 1 0 64k", "write -P 3 1536k 100k")
        create("bitmaps.qcow2", "100M")
        qemu_io("bitmaps.qcow2", "write -P 1 0 1M")
        qemu_img("bitmap", "--add", "bitmaps.qcow2", "b0")
        qemu_img("bitmap", "--add", "-g", "512k", "bitmaps.qcow2", "a-longer-bitmap-name")
        qemu_img("bitmap", "--add", "-g", "512", "--disable", "bitmaps.qcow2", "fine")
        create("df.qcow2", "1M", options="data_file=df.bin")
        qemu_io("df.qcow2", "write -P 1 64k 4k", "write -z 256k 64k", "write -P 3 512k 64k")
        create("small-clusters.qcow2", "256k", options="cluster_size=512")
        qemu_io("small-clusters.qcow2", *[f"write -P {i} {i * 3 * 512} 512" for i in range(1, 20)])
        create("odd.qcow2", "1000")
        qemu_io("odd.qcow2", "write -P 1 0 512")
        create("big.qcow2", "100G")
        qemu_io("big.qcow2", "write -P 1 0 4k", "write -P 2 40G 1M", "write -P 3 99G 64k")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("measurezoo")
    build_sources(d)
    return d

# --------------------------------------------------------------------------- sources

SOURCE_OPTIONS = [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=2M"], ["-o", "backing_file=x"],
                  ["-o", "preallocation=falloc"], ["-o", "preallocation=metadata"], ["-o", "compat=0.10"],
                  ["-o", "extended_l2=on,refcount_bits=64"], ["-o", "cluster_size=512,refcount_bits=1"]]


@pytest.mark.parametrize("source", SOURCES)
def test_measure_source_matches_qemu(source: str, zoo: Path) -> None:
    for options in SOURCE_OPTIONS:
        for output in ("--output=json", "--output=human"):
            status, out, _ = same_as_qemu_img(zoo, "measure", ["-O", "qcow2", *options, output, source])
            assert status == 0, out
    for args in (["-O", "raw"], [], ["--output=json"], ["-O", "raw", "-o", "preallocation=full"]):
        same_as_qemu_img(zoo, "measure", [*args, source])


def test_sources_show_what_they_are_meant_to(zoo: Path) -> None:
    """The sources really differ where it matters (else the comparisons above prove little)."""
    def required(source: str, *options: str) -> int:
        result: int = json.loads(qemu_img_in(zoo, "measure", ["-O", "qcow2", "--output=json", *options, source])[1])["required"]
        return result

    assert json.loads(qemu_img_in(zoo, "measure", ["-O", "qcow2", "--output=json", "bitmaps.qcow2"])[1])["bitmaps"] > 0
    assert "bitmaps" not in json.loads(qemu_img_in(zoo, "measure", ["-O", "qcow2", "--output=json", "v2.qcow2"])[1])
    assert "bitmaps" not in json.loads(qemu_img_in(zoo, "measure", ["-O", "qcow2", "--output=json", "holes.raw"])[1])
    assert required("holes.raw") < required("holes.raw", "-o", "backing_file=x")
    assert required("sparse-copy.qcow2") < required("s.qcow2")  # host holes in data clusters: zeros
    assert required("big.qcow2") < 20 * MiB  # 100 GiB (16 MiB of L2 tables), three small data ranges


@pytest.mark.parametrize("args", [["-f", "raw", "data.qcow2"], ["-f", "qcow2", "-O", "qcow2", "top.qcow2"],
                                  ["-U", "-O", "qcow2", "data.qcow2"], ["-f", "qcow", "-O", "qcow2", "q1.qcow"],
                                  ["-O", "qcow2", "-f", "raw", "holes.raw", "--output=json"]])


def test_measure_source_options_match_qemu(args: list[str], zoo: Path) -> None:
    same_as_qemu_img(zoo, "measure", args)


# --------------------------------------------------------------------------- --size and -o

SIZES = ["0", "1", "512", "1000", "64k", "1G", "1.5G", "100T", "4P", "9223372036854775807"]


@pytest.mark.parametrize("cluster_size", ["512", "4k", "16k", "64k", "2M"])
def test_measure_size_matrix_matches_qemu(cluster_size: str, zoo: Path) -> None:
    """Every refcount width and L2 format at every size, with compat, preallocation, lazy
    refcounts, compression, data file and backing options cycled through the combinations."""
    extras = itertools.cycle(["", ",compat=0.10", ",compat=1.1,preallocation=metadata", ",preallocation=full",
                              ",preallocation=falloc,lazy_refcounts=on", ",backing_file=b.qcow2,backing_fmt=qcow2",
                              ",data_file=d.raw,data_file_raw=on", ",compression_type=zstd",
                              ",lazy_refcounts=on,compat=0.10", ",preallocation=off,nocow=on,extent_size_hint=1M"])
    for refcount_bits, extended_l2 in itertools.product(["1", "2", "8", "16", "32", "64"], ["off", "on"]):
        options = f"cluster_size={cluster_size},refcount_bits={refcount_bits},extended_l2={extended_l2}" + next(extras)
        for size in SIZES:
            output = "--output=json" if len(size) % 2 else "--output=human"
            same_as_qemu_img(zoo, "measure", ["-O", "qcow2", "-o", options, "--size", size, output])


@pytest.mark.parametrize("args", [
    # argument checks, in qemu-img's order
    [], ["--size", "1G", "data.qcow2"], ["data.qcow2", "empty.qcow2"], ["-f", "qcow2"], ["-f", "qcow2", "--size", "1G"],
    ["--output=xml", "--size", "1G"], ["--size", "1Q", "--output=xml"], ["--output=xml", "--size", "1Q"],
    ["--size", "-1"], ["--size", "8E"], ["--size", "99999999999999999999"], ["--size", "0x1k"], ["--size", "1.5"],
    ["-O", "qcow2", "-o", "size=2G"], ["--size", "1G", "-o", ","], ["--size", "1G", "-o", "a,"], ["--size", "1G", "-o", ""],
    ["--size", "1G", "-o", "size=1,,"], ["-o", ",", "--size", "1Q"],
    # target formats
    ["--size", "1G", "-O", "foo"], ["--size", "1G", "-O", "qcow"], ["--size", "1G", "-O", "vmdk"],
    ["--size", "1G", "-O", "file"], ["--size", "1G", "-O", "blkdebug"], ["--size", "1G", "-O", "raw"],
    ["--size", "1000", "-O", "raw"], ["--size", "1G", "-O", "raw", "-o", "cluster_size=64k"],
    ["--size", "1G", "-O", "raw", "-o", "preallocation=bogus,nocow=on"], ["--size", "1G", "-o", "size=4k"],
    # option values qemu-img refuses, and ones it takes
    *[["--size", "1G", "-O", "qcow2", "-o", o] for o in [
        "cluster_size=1000", "cluster_size=4M", "cluster_size=abc", "cluster_size=", "cluster_size=0",
        "cluster_size=1.5k", "cluster_size=0x10000", "cluster_size=0x1k", "cluster_size=99999999999999999999",
        "cluster_size=4294967296", "cluster_size=4295032832", "cluster_size=64k,,x",
        "cluster_size=64k,cluster_size=128k", "refcount_bits=3", "refcount_bits=x", "refcount_bits=-16",
        "refcount_bits=0x10", "refcount_bits=010", "refcount_bits=08", "refcount_bits=0", "refcount_bits=128",
        "refcount_bits=99999999999999999999", "refcount_bits=16k", "refcount_bits=8,compat=0.10", "compat=1.2",
        "compat=v3", "compat=", "preallocation=foo", "preallocation=", "lazy_refcounts=foo", "lazy_refcounts=ON",
        "data_file_raw=maybe", "extended_l2=", "extended_l2", "noextended_l2", "extended_l2=on,cluster_size=4k",
        "extended_l2=on,cluster_size=4k,compat=1.2", "compat=1.2,cluster_size=1000", "compat=1.2,refcount_bits=3",
        "refcount_bits=3,preallocation=foo", "compat=0.10,extended_l2=on", "foo=bar", "foo", "nofoo", "=x",
        "a,,b=1", "help", "id=x,cluster_size=4k", "compression_type=foo", "encryption=on", "encrypt.format=aes",
        "encrypt.format=luks", "encrypt.format=luks,encrypt.key-secret=sec0", "encrypt.iter-time=x",
        "backing_file=", "nocow=maybe", "extent_size_hint=x", "size=x"]],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k", "-o", "cluster_size=2M"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=0x1k", "-o", "foo=1"],
    ["--size", "100P", "-O", "qcow2"], ["--size", "100P", "-O", "qcow2", "-o", "cluster_size=2M"],
    ["--size", "9223372036854775807", "-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on"],
    ["-O", "qcow2", "-o", "cluster_size=512", "big.qcow2"],  # the size check uses -o size (none): passes
    ["nothere.qcow2"], ["-f", "foo", "data.qcow2"], ["-O", "foo", "data.qcow2"], ["-f", "qcow2", "holes.raw"],
])


def test_measure_arguments_and_options_match_qemu(args: list[str], zoo: Path) -> None:
    expected = qemu_img_in(zoo, "measure", args)
    ours = qcowdisk_in(zoo, "measure", args, as_qemu_img=True)
    if "Could not open" in expected[2]:  # the reason is each tool's own wording
        assert (ours[0], ours[1]) == (expected[0], expected[1]) == (1, "")
        assert ours[2].startswith(expected[2][:expected[2].index(": ", len("qemu-img: ")) + 2]), ours[2]
    else:
        assert ours == expected


# --------------------------------------------------------------------------- the library


def qemu_json(zoo: Path, *args: str) -> dict[str, int]:
    p = qemu_img_in(zoo, "measure", ["--output=json", *args])
    assert p[0] == 0, p
    result: dict[str, int] = json.loads(p[1])
    return result


def test_library_measure_by_size_and_options(zoo: Path) -> None:
    expected = qemu_json(zoo, "-O", "qcow2", "--size", "10G", "-o", "cluster_size=2M,refcount_bits=8,extended_l2=on")
    for options in ("cluster_size=2M,refcount_bits=8,extended_l2=on",
                    {"cluster_size": "2M", "refcount_bits": 8, "extended_l2": True}):
        r = qcowdisk.measure(size=10 * GiB, options=options)
        assert (r.required, r.fully_allocated, r.bitmaps) == (expected["required"], expected["fully-allocated"], None)
    raw = qcowdisk.measure(size=1000, out_format="raw")
    assert (raw.required, raw.fully_allocated) == (1024, 1024)


def test_library_measure_of_a_source(zoo: Path) -> None:
    expected = qemu_json(zoo, "-O", "qcow2", "-o", "cluster_size=4k", "bitmaps.qcow2")
    r = qcowdisk.measure(src=zoo / "bitmaps.qcow2", options={"cluster_size": 4096})
    assert (r.required, r.fully_allocated, r.bitmaps) == (expected["required"], expected["fully-allocated"],
                                                          expected["bitmaps"])
    with QcowFile.open(zoo / "top.qcow2", readonly=True) as img:  # an opened image is left open
        expected = qemu_json(zoo, "-O", "qcow2", "top.qcow2")
        r = qcowdisk.measure(src=img)
        assert (r.required, r.fully_allocated) == (expected["required"], expected["fully-allocated"])
        assert img.read_at(1536 * KiB, 2) == b"\x03\x03"
    r = qcowdisk.measure(src=str(zoo / "data.qcow2"), src_format="raw", out_format="raw")
    assert r.required == r.fully_allocated == qemu_json(zoo, "-f", "raw", "data.qcow2")["required"]


@pytest.mark.parametrize("kwargs,message", [
    ({}, "either size or src"), ({"size": 1, "src": "x"}, "either size or src"),
    ({"size": -1}, "Must be between 0 and"), ({"size": 1, "options": "cluster_size=1000"}, "Cluster size must be"),
    ({"size": 1, "options": {"refcount_bits": "x"}}, "Parameter 'refcount_bits' expects a number"),
    ({"size": 1, "out_format": "vmdk"}, "does not support size measurement"),
    ({"size": 1, "out_format": "nope"}, "Unknown file format 'nope'"),
])


def test_library_refusals(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        qcowdisk.measure(**kwargs)


def test_option_errors_carry_qemus_hint() -> None:
    with pytest.raises(OptionError, match="expects a non-negative number") as info:
        qcowdisk.measure(size=1, options="cluster_size=big")
    assert info.value.hint.startswith("Optional suffix k, M, G")


def test_prealloc_size_against_qemu_formula() -> None:
    """qcow2_calc_prealloc_size for a few shapes (the numbers qemu-img measure --size prints)."""
    assert calc_prealloc_size(GiB, 65536, 4, False) == 1074135040
    assert calc_prealloc_size(GiB, 512, 4, False) == 1095127040
    assert calc_prealloc_size(GiB, 512, 0, False) == 1091053056
    assert calc_prealloc_size(GiB, 65536, 4, True) == 1074266112


# --------------------------------------------------------------------------- option syntax


@pytest.mark.parametrize("text,pairs", [
    ("a=1", [("a", "1")]), ("a=1,b=2", [("a", "1"), ("b", "2")]), ("a=1,,2,b=3", [("a", "1,2"), ("b", "3")]),
    ("flag", [("flag", "on")]), ("noflag", [("flag", "off")]), ("a=,b", [("a", ""), ("b", "on")]),
    ("a=x=y", [("a", "x=y")]), ("a=1,", [("a", "1")]), ("=x", [("", "x")]),
])


def test_split_option_list(text: str, pairs: list[tuple[str, str]]) -> None:
    assert split_option_list(text) == pairs


@pytest.mark.parametrize("text,ok", [("a=1", True), ("", False), (",a", False), ("a,", False), ("a,,", True),
                                     ("a,,,", False)])


def test_valid_option_list(text: str, ok: bool) -> None:
    assert valid_option_list(text) == ok


@pytest.mark.parametrize("text,value", [("16", 16), ("0x10", 16), ("010", 8), (" 7", 7), ("+3", 3),
                                        ("-1", (1 << 64) - 1), ("18446744073709551615", (1 << 64) - 1)])


def test_strtou64(text: str, value: int) -> None:
    assert strtou64(text) == value


@pytest.mark.parametrize("text", ["", "x", "08", "0x", "1 ", "1k"])
def test_strtou64_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a number"):
        strtou64(text)
