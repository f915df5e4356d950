#!/usr/bin/env python3
"""Side-by-side speed of qcowdisk against plain host I/O and `qemu-img bench`, from one run.

Usage:  python3 benchmarks/run_benchmarks.py [--size 1G] [--repeat 3] [--read-repeat 5] [--workdir DIR]
                                             [--json OUT] [--keep] [--only abcdefghij]

Every comparison is made on the same machine, in the same run, on the same data:

READ  (one fully allocated qcow2 image, 64 KiB clusters, made by `qemu-img convert -O qcow2` of a raw
       file of random-ish data; that raw file is the host-I/O reference; both are page-cache hot)
  a) sequential 1 MiB `disk.readinto_at(buf, off)`  vs `os.preadv(fd, [buf], off)` on the raw file
  b) sequential 1 MiB `disk.read_at(off, 1 MiB)`     vs `os.pread(fd, 1 MiB, off)` on the raw file
  c) 4 KiB reads at a 1 MiB + 4 KiB stride with read_at vs os.pread on the raw file, and vs
     `qemu-img bench -f qcow2 -d 1 -t writeback -s 4096 -S 1052672 -c N` (requests/second)
     (plus, for reference only, `qemu-img bench` doing the sequential 1 MiB reads)
     4 KiB random reads (seeded), CPU seconds: read_at on the image opened read-write, readinto_at,
     and read_at on an extended-L2 copy, each vs read_at on the image opened read-only
WRITE
  d) 64 KiB and 4 KiB sequential allocating writes over a fresh image (timed from the open image
     to after flush() + close(), and without flush + close) vs `qemu-img bench -w ... -s 65536`
     (`-s 4096`) on a fresh `qemu-img create` image; also CPU seconds of both
  e) the same 64 KiB writes over an already fully allocated image, vs the same `qemu-img bench -w`
  f) `QcowFile.create` + close of a 4 TiB sparse image: time and file size; `qemu-img create` for reference
NBD
  g) `nbdcopy` out of `qcowdisk serve --readonly` vs out of `qemu-nbd` serving the same image
     (benchmarks/bench_nbd.py: a mixed image of --size; to null: and to a file; best of --repeat)
CHECK
  h) `QcowFile.check()` in-process, and the `qcowdisk check` process (clean venv, cleanpython.py), vs the `qemu-img check`
     process, on a sparse 1 TiB, a fully allocated 4 GiB and a 64 MiB 512 B-cluster image (bench_check.py)
CONVERT (benchmarks/bench_convert.py: half /usr files, half zeros, --size bytes; whole processes)
  i) raw -> qcow2, qcow2 -> raw, -c zlib and -c zstd with -m 8 -W, against `qemu-img convert`, like
     with like: neither side fsyncs ("no sync", qemu-img's default cache=unsafe), or both do
     ("synced", qemu-img -t writeback); the note gives each side's CPU time (user + system).
     raw -> qcow2 and qcow2 -> raw also as the library call `qcowdisk.convert()` in-process (the
     target, >= 1.0, as h) does for check) against the same qemu-img process; their whole-process
     rows (interpreter start-up included) are for reference, as h)'s
COMMIT / REBASE (benchmarks/bench_commit.py: a --size chain of /usr data, zeros and holes)
  j) `qcowdisk commit` (qcow2 and raw base) and safe `qcowdisk rebase` vs qemu-img's, whole processes

Method: reads run one untimed warm-up round, then --read-repeat timed rounds (page-cache hot);
in each round every contender (qcowdisk, raw, qemu-img bench) runs once in turn, so load from
elsewhere on the machine hits all sides alike; the best time of each is reported. Writes: best
of --repeat runs, each started after `os.sync()` so earlier dirty pages are not charged to it,
qcowdisk and qemu-img runs interleaved.

About `qemu-img bench` timing (QEMU 7.2 qemu-img.c, img_bench): the clock stops when the last
request completes; the image is closed (blk_unref -> bdrv_close, which flushes: fdatasync with
-t writeback) *after* "Run completed in X seconds." is printed. So the reported time EXCLUDES the
final flush, while the qcowdisk write timings INCLUDE flush() and close(). Each write case
therefore has two informational rows besides the main one: qcowdisk's write phase alone (no
flush/close) against the reported time, and qcowdisk's full time against qemu-img's whole process
wall time (which does include the final flush, plus process start and image open).

The table is informational: nothing here asserts. Ratios are always "qcowdisk throughput /
reference throughput" (for times: reference time / qcowdisk time), so > 1 means qcowdisk is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import mmap
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

CLUSTER = 64 * KiB
SEQ_CHUNK = MiB
STRIDE_LEN = 4 * KiB
STRIDE_STEP = MiB + 4 * KiB          # 1052672: each 4 KiB read lands in a different L2 slice region
RANDOM_READS = 50000                 # 4 KiB random reads (seeded, 4 KiB aligned) of case c)
WRITE_CHUNK = 64 * KiB
SMALL_WRITE_CHUNK = 4 * KiB
SMALL_WRITE_SPAN = 256 * MiB        # 4 KiB allocating writes cover at most this much (65536 requests)
WRITE_PATTERN = 0xA5                 # the same byte qemu-img bench gets via --pattern
CREATE_SIZE = 4 * TiB

# Fall back to the checkout this script lives in when qcowdisk is not installed (`pip install -e .`);
# appended, so an installed or PYTHONPATH copy wins.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.append(_REPO)


def load_engine() -> tuple[Any, str | None]:
    """Import qcowdisk.QcowFile; returns (QcowFile or None, error text or None)."""
    try:
        from qcowdisk import QcowFile
    except Exception as exc:  # the engine may be half-written; references still run
        return None, f"{type(exc).__name__}: {exc}"
    return QcowFile, None


# ---------------------------------------------------------------------------------------------
# Data and image preparation (shared with the pytest-benchmark files)
# ---------------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'1G', '256M', '64MiB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 256M, 1G")
    unit = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}[m.group(2).lower()]
    return int(m.group(1)) * unit


def write_random_raw(path: str, size: int) -> None:
    """Write `size` bytes of random-ish data: one random block, rotated differently per chunk.

    os.urandom for a whole GiB costs seconds; rotating a 64 MiB random block keeps every chunk
    distinct (no repeated clusters, nothing compressible, no zero runs) at memcpy speed.
    """
    block_len = min(size, 64 * MiB)
    block = os.urandom(block_len)
    with open(path, "wb") as f:
        done, i = 0, 0
        while done < size:
            k = (i * 4099) % block_len
            chunk = block[k:] + block[:k]
            n = min(block_len, size - done)
            f.write(memoryview(chunk)[:n])
            done += n
            i += 1


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    """Run qemu-img, raising with its output on failure."""
    p = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"qemu-img {' '.join(args)} exited {p.returncode}: {p.stdout}{p.stderr}")
    return p


def make_read_images(workdir: str, size: int) -> tuple[str, str]:
    """Random raw file and its fully allocated qcow2 (64 KiB clusters) conversion; returns (qcow2, raw)."""
    raw = os.path.join(workdir, "read.raw")
    img = os.path.join(workdir, "read.qcow2")
    write_random_raw(raw, size)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, img)
    return img, raw


_RUN_RE = re.compile(r"Run completed in\s+([0-9.]+)\s+seconds")


def qemu_img_bench(image: str, *, count: int, bufsize: int, step: int | None = None,
                   write: bool = False, fmt: str = "qcow2") -> tuple[float, float]:
    """Run `qemu-img bench -d 1 -t writeback`; returns (reported seconds, process wall seconds).

    The reported time excludes image open and the final flush at close; the wall time includes both.
    """
    args = ["qemu-img", "bench", "-f", fmt, "-d", "1", "-t", "writeback", "-s", str(bufsize), "-c", str(count)]
    if step is not None:
        args += ["-S", str(step)]
    if write:
        args += ["-w", f"--pattern={WRITE_PATTERN}"]
    args.append(image)
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    m = _RUN_RE.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stdout}{p.stderr}")
    return float(m.group(1)), wall


def aligned_buffer(length: int) -> mmap.mmap:
    """A page-aligned writable buffer, shared by both sides of case a).

    Alignment matters: on the reference machine os.preadv of 1 MiB into a (16-byte aligned)
    bytearray ran at ~8 GB/s, into a page-aligned mmap at ~17 GB/s. Both sides get this buffer.
    """
    return mmap.mmap(-1, length)


def stride_offsets(size: int) -> range:
    """Offsets 0, 1052672, 2105344, ... for the N = size // 1052672 strided 4 KiB reads."""
    return range(0, (size // STRIDE_STEP) * STRIDE_STEP, STRIDE_STEP)


# ---------------------------------------------------------------------------------------------
# The measured loops. Bound methods are hoisted into locals on both sides so that neither side
# pays attribute lookups the other does not.
# ---------------------------------------------------------------------------------------------

def seq_readinto_qcow(disk: Any, size: int, buf: Any) -> None:
    """a) qcowdisk: sequential readinto_at of len(buf) bytes over the whole disk."""
    readinto_at = disk.readinto_at
    for off in range(0, size, len(buf)):
        readinto_at(buf, off)


def seq_readinto_threads(read_part: Callable[[int, int, Any], None], size: int, threads: int) -> None:
    """a) the same sequential 1 MiB reads from `threads` threads, each over its own part of the
    disk with its own buffer: read_part(start, end, buf)."""
    import threading
    part = size // threads // SEQ_CHUNK * SEQ_CHUNK
    ts = [threading.Thread(target=read_part, args=(i * part, size if i == threads - 1 else (i + 1) * part,
                                                   aligned_buffer(SEQ_CHUNK))) for i in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()


def seq_preadv_raw(fd: int, size: int, buf: Any) -> None:
    """a) reference: sequential os.preadv into one buffer over the whole raw file."""
    preadv = os.preadv
    bufs = [buf]
    for off in range(0, size, len(buf)):
        preadv(fd, bufs, off)


def seq_read_qcow(disk: Any, size: int, chunk: int) -> None:
    """b) qcowdisk: sequential read_at returning bytes."""
    read_at = disk.read_at
    for off in range(0, size, chunk):
        read_at(off, chunk)


def seq_pread_raw(fd: int, size: int, chunk: int) -> None:
    """b) reference: sequential os.pread returning bytes."""
    pread = os.pread
    for off in range(0, size, chunk):
        pread(fd, chunk, off)


def stride_read_qcow(disk: Any, offsets: range) -> None:
    """c) qcowdisk: 4 KiB read_at at each strided offset."""
    read_at = disk.read_at
    for off in offsets:
        read_at(off, STRIDE_LEN)


def random_read_qcow(disk: Any, offsets: list[int]) -> None:
    """c) qcowdisk: 4 KiB read_at at each random offset."""
    read_at = disk.read_at
    for off in offsets:
        read_at(off, STRIDE_LEN)


def random_readinto_qcow(disk: Any, offsets: list[int], buf: bytearray) -> None:
    """c) qcowdisk: 4 KiB readinto_at at each random offset, into one bytearray."""
    readinto_at = disk.readinto_at
    for off in offsets:
        readinto_at(buf, off)


def stride_pread_raw(fd: int, offsets: range | list[int]) -> None:
    """c) reference: 4 KiB os.pread at each strided offset."""
    pread = os.pread
    for off in offsets:
        pread(fd, STRIDE_LEN, off)


def write_all_qcow(disk: Any, size: int, buf: bytes) -> float:
    """d/e) qcowdisk: write `buf` over the whole disk, then flush and close; returns the flush+close seconds."""
    write_at = disk.write_at
    for off in range(0, size, len(buf)):
        write_at(off, buf)
    t = time.perf_counter()
    disk.flush()
    disk.close()
    return time.perf_counter() - t


def write_all_raw(fd: int, size: int, buf: bytes) -> None:
    """Write reference for the pytest files: os.pwrite over the whole raw file, then fsync and close."""
    pwrite = os.pwrite
    for off in range(0, size, len(buf)):
        pwrite(fd, buf, off)
    os.fsync(fd)
    os.close(fd)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One line of the table. Values are in `unit`; `ratio` is qcowdisk-better-when-above-1."""

    case: str
    unit: str
    reference_name: str
    qcowdisk: float | None = None
    reference: float | None = None
    ratio: float | None = None
    target: str = "-"
    passed: bool | None = None
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def status(self) -> str:
        """PASS / FAIL against the target, 'info' when there is none, ERROR when qcowdisk has no figure."""
        if self.qcowdisk is None:
            return "ERROR"
        if self.passed is None:
            return "info"
        return "PASS" if self.passed else "FAIL"


def throughput_row(case: str, unit: str, ref_name: str, q: float | None, r: float | None,
                   min_ratio: float | None, strict: bool = False) -> Row:
    """Row for a higher-is-better figure; passes when qcowdisk/ref >= min_ratio (> when strict)."""
    row = Row(case, unit, ref_name, q, r)
    if q is not None and r:
        row.ratio = q / r
        if min_ratio is not None:
            row.passed = row.ratio > min_ratio if strict else row.ratio >= min_ratio
    if min_ratio is not None:
        row.target = f"{'>' if strict else '>='} {min_ratio:.2f}"
    return row


def best(times: list[float]) -> float:
    """Best (smallest) of the timed passes."""
    return min(times)


@contextmanager
def guarded(rows: list[Row], case: str, unit: str, ref_name: str) -> Iterator[None]:
    """Turn an exception inside one case into an ERROR row instead of aborting the run."""
    try:
        yield
    except Exception as exc:
        rows.append(Row(case, unit, ref_name, note=f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
        if os.environ.get("QCOWDISK_BENCH_TRACEBACK"):
            traceback.print_exc()


def timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> Callable[[], float]:
    """Wrap fn so that calling it returns its wall time in seconds (or `clock`'s)."""
    def run() -> float:
        t0 = clock()
        fn()
        return clock() - t0
    return run


def cpu_timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """Wrap fn so that calling it returns the CPU seconds (user + system) it used."""
    return timed(fn, time.process_time)


def interleaved_best(runners: dict[str, Callable[[], float] | None], repeat: int) -> dict[str, float | str | None]:
    """Best seconds of each runner over `repeat` rounds, after one untimed warm-up round.

    Runners return their own elapsed seconds (so qemu-img bench can report its internal time).
    Each round runs every runner once, in turn, so a burst of load elsewhere on the machine hits
    all sides alike instead of one side's whole series. A runner that is None, or raises, yields
    None or the error text; the others carry on.
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    errors: dict[str, str] = {}
    for rnd in range(repeat + 1):
        for name, run in runners.items():
            if run is None or name in errors:
                continue
            try:
                t = run()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                continue
            if rnd:  # round 0 is the warm-up
                times[name].append(t)
    out: dict[str, float | str | None] = {}
    for name in runners:
        out[name] = errors.get(name) or (best(times[name]) if times[name] else None)
    return out


def log(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def bench_reads(QcowFile: Any, engine_error: str | None, workdir: str, size: int, repeat: int,
                rows: list[Row]) -> None:
    """Cases a), b), c) and the qemu-img bench sequential reference."""
    log(f"making {size // MiB} MiB random raw + qcow2 (convert)")
    img, raw = make_read_images(workdir, size)
    mib = size / MiB
    fd = os.open(raw, os.O_RDONLY)
    disk = None
    why_not = engine_error or ""   # why qcowdisk figures are missing
    data_note = ""                 # set if qcowdisk returns different bytes than the raw file
    try:
        if QcowFile is not None:
            try:
                disk = QcowFile.open(img, readonly=True)
            except Exception as exc:
                why_not = f"open: {type(exc).__name__}: {exc}"
        if disk is not None:
            # Not an assertion, a flag on the figures: a fast wrong answer is worthless.
            try:
                for off in (0, size // 2, size - MiB):
                    if disk.read_at(off, MiB) != os.pread(fd, MiB, off):
                        data_note = f"DATA MISMATCH at guest offset {off}"
                        break
            except Exception as exc:
                data_note = f"read check: {type(exc).__name__}: {exc}"

        def q_runner(fn: Callable[[], Any]) -> Callable[[], float] | None:
            return timed(fn) if disk is not None else None

        def q_result(v: float | str | None, work: float) -> tuple[float | None, str]:
            """(throughput, note) from an interleaved_best result for qcowdisk."""
            if isinstance(v, float) and v > 0:
                return work / v, data_note
            return None, v if isinstance(v, str) else why_not

        def ref_value(v: float | str | None, work: float, floor: float = 1e-9) -> float:
            """Reference throughput; `floor` guards qemu-img's "%3.3f" seconds (0.000 is possible)."""
            if isinstance(v, str) or v is None:
                raise RuntimeError(v or "no reference figure")
            return work / max(v, floor)

        buf = aligned_buffer(SEQ_CHUNK)
        count = size // SEQ_CHUNK

        def q_part(lo: int, hi: int, b: Any) -> None:
            readinto_at = disk.readinto_at
            for off in range(lo, hi, SEQ_CHUNK):
                readinto_at(b, off)

        def raw_part(lo: int, hi: int, b: Any) -> None:
            for off in range(lo, hi, SEQ_CHUNK):
                os.preadv(fd, [b], off)

        log("a) sequential 1 MiB readinto_at vs os.preadv; 2 threads vs 1")
        with guarded(rows, "a) seq 1M readinto_at", "MiB/s", "os.preadv raw"):
            res = interleaved_best({"q": q_runner(lambda: seq_readinto_qcow(disk, size, buf)),
                                    "raw": timed(lambda: seq_preadv_raw(fd, size, buf)),
                                    "q2": q_runner(lambda: seq_readinto_threads(q_part, size, 2)),
                                    "raw2": timed(lambda: seq_readinto_threads(raw_part, size, 2))}, repeat)
            q, note = q_result(res["q"], mib)
            row = throughput_row("a) seq 1M readinto_at", "MiB/s", "os.preadv raw", q, ref_value(res["raw"], mib), 0.8)
            row.note = note
            rows.append(row)
        # The same reads from 2 threads (each over half the disk) against one thread: the image
        # lock is not held across host reads. The note gives the raw file's own 2-thread scaling.
        case = "a) seq 1M readinto_at, 2 threads vs 1"
        with guarded(rows, case, "MiB/s", "qcowdisk 1 thread"):
            q2, note2 = q_result(res["q2"], mib)
            row = throughput_row(case, "MiB/s", "qcowdisk 1 thread", q2, q, 1.5)
            raw_scaling = ref_value(res["raw2"], mib) / ref_value(res["raw"], mib)
            row.note = "; ".join(x for x in (f"os.preadv raw: 2 threads {raw_scaling:.2f}x 1", note2) if x)
            rows.append(row)

        log("b) sequential 1 MiB read_at vs os.pread vs qemu-img bench")
        res = interleaved_best({"q": q_runner(lambda: seq_read_qcow(disk, size, SEQ_CHUNK)),
                                "raw": timed(lambda: seq_pread_raw(fd, size, SEQ_CHUNK)),
                                "qemu": lambda: qemu_img_bench(img, count=count, bufsize=SEQ_CHUNK)[0]}, repeat)
        q_seq, note_seq = q_result(res["q"], mib)
        with guarded(rows, "b) seq 1M read_at", "MiB/s", "os.pread raw"):
            row = throughput_row("b) seq 1M read_at", "MiB/s", "os.pread raw", q_seq, ref_value(res["raw"], mib), 0.8)
            row.note = note_seq
            rows.append(row)
        # The same 1 MiB sequential requests through qemu-img bench (depth 1): reference only.
        case = "   seq 1M read_at vs qemu-img bench"
        with guarded(rows, case, "MiB/s", "qemu-img bench"):
            row = throughput_row(case, "MiB/s", "qemu-img bench", q_seq, ref_value(res["qemu"], mib, 0.001), None)
            row.note = "; ".join(x for x in ("reference only", note_seq) if x)
            row.extra["qemu_img_reported_s"] = res["qemu"]
            rows.append(row)

        offsets = stride_offsets(size)
        n = len(offsets)
        log(f"c) {n} x 4 KiB strided reads: read_at vs os.pread vs qemu-img bench")
        res = interleaved_best({"q": q_runner(lambda: stride_read_qcow(disk, offsets)),
                                "raw": timed(lambda: stride_pread_raw(fd, offsets)),
                                "qemu": lambda: qemu_img_bench(img, count=n, bufsize=STRIDE_LEN, step=STRIDE_STEP)[0]},
                               repeat)
        q_c, note_c = q_result(res["q"], n)
        case = "c) 4K stride read_at vs os.pread"
        with guarded(rows, case, "req/s", "os.pread raw"):
            row = throughput_row(case, "req/s", "os.pread raw", q_c, ref_value(res["raw"], n), 0.5)
            row.note = note_c
            rows.append(row)
        case = "c) 4K stride read_at vs qemu-img bench"
        with guarded(rows, case, "req/s", "qemu-img bench"):
            row = throughput_row(case, "req/s", "qemu-img bench", q_c, ref_value(res["qemu"], n, 0.001), 1.0, strict=True)
            row.note = "; ".join(x for x in (f"N={n}", note_c) if x)
            row.extra["qemu_img_reported_s"] = res["qemu"]
            rows.append(row)

        # c) 4 KiB random reads, the same requests four ways: read_at on the image opened
        # read-only, read_at on it opened read-write, readinto_at (read-only open), and read_at
        # on the same data in an extended-L2 image. (The read-write open needs the read-only
        # opens to share: force_share, as qemu-img -U.)
        if disk is not None:
            disk.close()
            disk = None
        ext = os.path.join(workdir, "read-extl2.qcow2")
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER},extended_l2=on", raw, ext)
        rng = random.Random(1)
        roffs = [rng.randrange(size // STRIDE_LEN) * STRIDE_LEN for _ in range(RANDOM_READS)]
        n = len(roffs)
        log(f"c) {n} x 4 KiB random reads: read-write vs read-only open, readinto_at vs read_at, extended L2")
        opened: list[Any] = []
        try:
            if QcowFile is not None:
                ro = QcowFile.open(img, readonly=True, force_share=True)
                opened.append(ro)
                rw = QcowFile.open(img)
                opened.append(rw)
                xro = QcowFile.open(ext, readonly=True)
                opened.append(xro)
            b4k = bytearray(STRIDE_LEN)

            # CPU seconds: the five contenders differ by microseconds a request, less than what
            # a loaded machine's scheduling moves wall time by.
            def q_opened(fn: Callable[[], Any]) -> Callable[[], float] | None:
                return cpu_timed(fn) if opened else None
            res = interleaved_best({
                "ro": q_opened(lambda: random_read_qcow(opened[0], roffs)),
                "rw": q_opened(lambda: random_read_qcow(opened[1], roffs)),
                "into": q_opened(lambda: random_readinto_qcow(opened[0], roffs, b4k)),
                "ext": q_opened(lambda: random_read_qcow(opened[2], roffs)),
                "raw": cpu_timed(lambda: stride_pread_raw(fd, roffs))}, repeat)
            q_ro, note_ro = q_result(res["ro"], n)
            for case, key, ref_name in (("c) 4K random read_at rw open vs ro open", "rw", "read_at, ro open"),
                                        ("c) 4K random readinto_at vs read_at", "into", "read_at, ro open"),
                                        ("c) 4K random read_at extended L2 vs standard", "ext", "read_at, standard")):
                with guarded(rows, case, "req/s", ref_name):
                    q_k, note_k = q_result(res[key], n)
                    if q_ro is None:
                        raise RuntimeError(note_ro or "no read-only figure")
                    row = throughput_row(case, "req/s", ref_name, q_k, q_ro, 0.9)
                    row.note = "; ".join(x for x in ("CPU time", note_k) if x)
                    rows.append(row)
            case = "   c) 4K random read_at vs os.pread"
            with guarded(rows, case, "req/s", "os.pread raw"):
                row = throughput_row(case, "req/s", "os.pread raw", q_ro, ref_value(res["raw"], n), None)
                row.note = "; ".join(x for x in ("reference only, CPU time", note_ro) if x)
                rows.append(row)
        finally:
            for d in opened:
                with suppress(Exception):
                    d.close()
            _unlink(ext)
    finally:
        os.close(fd)
        if disk is not None:
            with suppress(Exception):
                disk.close()
        for p in (img, raw):
            _unlink(p)


def _unlink(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def _check_note(image: str) -> str:
    """'check ok' or a one-line summary of what `qemu-img check` found."""
    p = subprocess.run(["qemu-img", "check", "--output=json", image], capture_output=True, text=True, check=False)
    if p.returncode == 0:
        return "qemu-img check ok"
    return f"qemu-img check exit {p.returncode}: {(p.stdout + p.stderr).strip().splitlines()[-1][:120]}"


@dataclasses.dataclass
class WriteSeries:
    """The timed runs of one write case, both sides."""

    q_times: list[float] = dataclasses.field(default_factory=list)    # open -> after close (s)
    q_flush: list[float] = dataclasses.field(default_factory=list)    # of which flush + close
    q_cpu: list[float] = dataclasses.field(default_factory=list)      # process CPU, open -> close
    ref_rep: list[float] = dataclasses.field(default_factory=list)    # qemu-img's reported time
    ref_wall: list[float] = dataclasses.field(default_factory=list)   # its whole process
    ref_cpu: list[float] = dataclasses.field(default_factory=list)    # its process CPU (user + sys)
    note: str = ""
    check: str = ""


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _qcow_write_run(series: WriteSeries, open_disk: Callable[[], Any], size: int, buf: bytes,
                    check_path: str | None) -> None:
    """One qcowdisk run (after os.sync()); an error ends the series with a note."""
    if series.note:
        return
    try:
        os.sync()
        c0 = time.process_time()
        disk = open_disk()
        t0 = time.perf_counter()
        fl = write_all_qcow(disk, size, buf)
        series.q_times.append(time.perf_counter() - t0)
        series.q_cpu.append(time.process_time() - c0)
        series.q_flush.append(fl)
        if check_path is not None:
            series.check = _check_note(check_path)
    except Exception as exc:
        series.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _qemu_write_run(series: WriteSeries, path: str, count: int, chunk: int) -> None:
    """One `qemu-img bench -w` run (after os.sync())."""
    try:
        os.sync()
        c0 = _child_cpu()
        rep, wall = qemu_img_bench(path, count=count, bufsize=chunk, write=True)
        series.ref_cpu.append(_child_cpu() - c0)
        series.ref_rep.append(rep)
        series.ref_wall.append(wall)
    except Exception as exc:
        log(f"qemu-img bench -w failed: {exc}")


def bench_writes(QcowFile: Any, engine_error: str | None, workdir: str, size: int, repeat: int,
                 rows: list[Row]) -> None:
    """Cases d) and e)."""
    count = size // WRITE_CHUNK
    mib = size / MiB
    buf = bytes([WRITE_PATTERN]) * WRITE_CHUNK
    # d) allocating writes on fresh images, 64 KiB and 4 KiB requests (sequential, as qemu-img
    # bench -w sends them: with 4 KiB, one request in 16 allocates a cluster and the other 15
    # write into it); qcowdisk and qemu-img runs interleaved.
    for chunk, span in ((WRITE_CHUNK, size), (SMALL_WRITE_CHUNK, min(size, SMALL_WRITE_SPAN))):
        _bench_alloc_writes(QcowFile, engine_error, workdir, span, chunk, repeat, rows)

    # e) overwrites of allocated clusters: one fully allocated image, used by both sides in turn.
    log(f"e) {count} x 64 KiB overwrites of allocated clusters (+flush+close), {repeat} runs each side")
    full = os.path.join(workdir, "full.qcow2")
    series = WriteSeries(note="" if QcowFile is not None else (engine_error or ""))
    try:
        raw = os.path.join(workdir, "full.raw")
        write_random_raw(raw, size)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}", raw, full)
        _unlink(raw)
        for i in range(repeat):
            _qcow_write_run(series, lambda: QcowFile.open(full), size, buf, full if i == repeat - 1 else None)
            _qemu_write_run(series, full, count, WRITE_CHUNK)
    finally:
        _unlink(full)
    _write_rows(rows, "e) 64K overwrite", mib, series, 0.7)


def _bench_alloc_writes(QcowFile: Any, engine_error: str | None, workdir: str, size: int, chunk: int,
                        repeat: int, rows: list[Row]) -> None:
    """Case d) for one request size: `size // chunk` sequential allocating writes on fresh images."""
    count = size // chunk
    buf = bytes([WRITE_PATTERN]) * chunk
    name = f"d) {chunk // KiB}K alloc write"
    log(f"{name}: {count} x {chunk // KiB} KiB allocating writes (+flush+close), {repeat} runs each side")
    series = WriteSeries(note="" if QcowFile is not None else (engine_error or ""))
    for i in range(repeat):
        path = os.path.join(workdir, f"alloc-q{i}.qcow2")
        try:
            _qcow_write_run(series, functools.partial(QcowFile.create, path, size), size, buf,
                            path if i == repeat - 1 else None)
        finally:
            _unlink(path)
        path = os.path.join(workdir, f"alloc-ref{i}.qcow2")
        try:
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, str(size))
            _qemu_write_run(series, path, count, chunk)
        except Exception as exc:
            log(f"qemu-img create failed: {exc}")
        finally:
            _unlink(path)
    _write_rows(rows, name, size / MiB, series, 1.0)


def _write_rows(rows: list[Row], case: str, mib: float, series: WriteSeries, min_ratio: float) -> None:
    """The target row (qcowdisk's writes without flush+close against qemu-img's reported time,
    which stops before its final flush: both timed the same way) plus informational rows: with
    qcowdisk's flush+close, against qemu-img's whole process, and CPU seconds (open to close)."""
    s = series
    note = s.note or s.check
    r = mib / best(s.ref_rep) if s.ref_rep else None
    if s.q_times:
        i = s.q_times.index(best(s.q_times))
        qw = mib / (s.q_times[i] - s.q_flush[i]) if s.q_times[i] > s.q_flush[i] else None
        row1 = throughput_row(f"{case} (no flush) vs qemu-img", "MiB/s", "qemu-img bench -w (reported)",
                              qw, r, min_ratio)
        row1.note = "; ".join(x for x in (note, "both exclude the final flush") if x)
        row1.extra.update(qcowdisk_s=s.q_times[i], qcowdisk_flush_close_s=s.q_flush[i])
        if s.ref_rep:
            row1.extra["qemu_img_reported_s"] = best(s.ref_rep)
        rows.append(row1)
    q = mib / best(s.q_times) if s.q_times else None
    row = throughput_row(f"   {case} +flush vs qemu-img bench", "MiB/s", "qemu-img bench -w (reported)", q, r, None)
    row.note = note + ("; ref excludes its final flush" if r else "; qemu-img bench failed")
    rows.append(row)
    w = mib / best(s.ref_wall) if s.ref_wall else None
    row2 = throughput_row(f"   {case} vs qemu-img wall", "MiB/s", "qemu-img bench -w (process wall)", q, w, None)
    row2.note = "ref incl. start, open, final flush"
    if s.ref_wall:
        row2.extra["qemu_img_wall_s"] = best(s.ref_wall)
    rows.append(row2)
    # CPU seconds do not wait for the disk or for other processes' turn on a loaded machine.
    qc = mib / best(s.q_cpu) if s.q_cpu else None
    rc = mib / best(s.ref_cpu) if s.ref_cpu and best(s.ref_cpu) > 0 else None
    row3 = throughput_row(f"   {case} CPU vs qemu-img CPU", "MiB/s", "qemu-img bench -w (process CPU)", qc, rc, None)
    row3.note = "MiB per CPU second; both incl. open, flush, close (ref: its whole process)"
    rows.append(row3)


def bench_create(QcowFile: Any, engine_error: str | None, workdir: str, repeat: int, rows: list[Row]) -> None:
    """Case f): 4 TiB sparse create time and resulting file size."""
    log("f) create a 4 TiB sparse image")
    q_times: list[float] = []
    q_size: int | None = None
    note = "" if QcowFile is not None else (engine_error or "")
    if QcowFile is not None:
        for i in range(repeat + 1):  # the first is a warm-up (imports, first file creation)
            path = os.path.join(workdir, f"create-q{i}.qcow2")
            try:
                t0 = time.perf_counter()
                disk = QcowFile.create(path, CREATE_SIZE)
                disk.close()
                t = time.perf_counter() - t0
                if i:
                    q_times.append(t)
                q_size = os.stat(path).st_size
            except Exception as exc:
                note = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                break
            finally:
                _unlink(path)
    r_times: list[float] = []
    r_size: int | None = None
    for i in range(repeat):
        path = os.path.join(workdir, f"create-ref{i}.qcow2")
        try:
            t0 = time.perf_counter()
            qemu_img("create", "-q", "-f", "qcow2", path, str(CREATE_SIZE))
            r_times.append(time.perf_counter() - t0)
            r_size = os.stat(path).st_size
        finally:
            _unlink(path)
    q_ms = best(q_times) * 1000 if q_times else None
    r_ms = best(r_times) * 1000 if r_times else None
    row = Row("f) create 4 TiB: time (create+close)", "ms", "qemu-img create (process wall)", q_ms, r_ms,
              target="< 50 ms")
    if q_ms is not None:
        row.passed = q_ms < 50
        row.ratio = r_ms / q_ms if r_ms and q_ms > 0 else None
    row.note = note or "ref includes process start"
    rows.append(row)
    row = Row("f) create 4 TiB: file size", "KiB", "qemu-img create", q_size / KiB if q_size is not None else None,
              r_size / KiB if r_size is not None else None, target="< 1 MiB")
    if q_size is not None:
        row.passed = q_size < MiB
    row.note = note
    rows.append(row)


def bench_nbd(workdir: str, size: int, repeat: int, rows: list[Row]) -> None:
    """Case g): nbdcopy out of `qcowdisk serve` against qemu-nbd serving the same image (bench_nbd.py)."""
    log("g) nbdcopy out of qcowdisk serve vs qemu-nbd")
    with guarded(rows, "g) nbdcopy out of an NBD server", "MiB/s", "qemu-nbd + nbdcopy"):
        from bench_nbd import nbd_rows  # needs nbdkit, nbdcopy and qemu-nbd: an ERROR row without them
        for r in nbd_rows(size, repeat, workdir):
            row = throughput_row(f"g) {r.case}", "MiB/s", f"{r.reference} + nbdcopy", r.qcowdisk_mibs,
                                 r.reference_mibs, None)
            row.note = r.note
            rows.append(row)


def bench_commit_rebase(workdir: str, size: int, repeat: int, rows: list[Row]) -> None:
    """Case j): bench_commit.py's rows (whole process wall, the library call in-process wall,
    then CPU); the wall rows have the target >= 1.0x qemu-img, the CPU rows are shown."""
    log("j) commit / rebase against qemu-img")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_commit import bench_rows
    for case, q, r, ratio in bench_rows(size, workdir, repeat):
        if "(cpu" in case:  # what each side burns, not the target's wall time
            note = "cpu: user + sys" + (", less start-up" if "start-up" in case else "")
            rows.append(Row(f"j) {case.strip()}", "s", "qemu-img (whole process)", q, r, ratio, note=note))
        else:
            rows.append(Row(f"j) {case.strip()}", "s", "qemu-img (whole process)", q, r, ratio, ">= 1.00",
                            ratio >= 1.0, "wall, in-process" if "in-process" in case else "wall"))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
# h) check (rows from benchmarks/bench_check.py)

def bench_check(workdir: str, repeat: int, rows: list[Row]) -> None:
    """qcowdisk check against qemu-img check: in-process check() (target >= 1.0) and the whole
    `qcowdisk check` process (interpreter start-up included; for reference)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_check import check_rows
    with guarded(rows, "h) check", "ms", "qemu-img check (process)"):
        for name, q, r, ratio in check_rows(repeat=max(repeat, 5), workdir=workdir):
            in_process = "in-process" in name
            rows.append(Row(f"h) {name}", "ms", "qemu-img check (process)", q * 1e3, r * 1e3, ratio,
                            target=">= 1.00" if in_process else "-", passed=ratio >= 1.0 if in_process else None))


# ---------------------------------------------------------------------------------------------

def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("MiB/s", "req/s", "KiB"):
        return f"{v:,.0f} {unit}"
    return f"{v:,.2f} {unit}"


def render_table(rows: list[Row]) -> str:
    """Fixed-width text table: case, qcowdisk, reference, ratio, target, pass/fail, note."""
    head = ("case", "qcowdisk", "reference", "ratio", "target", "result", "note / reference")
    lines = [head]
    for r in rows:
        lines.append((r.case, _fmt(r.qcowdisk, r.unit), _fmt(r.reference, r.unit),
                      f"{r.ratio:.2f}" if r.ratio is not None else "-", r.target, r.status(),
                      f"[{r.reference_name}] {r.note}".strip()))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    out = []
    for j, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])] + [line[i].rjust(widths[i]) for i in range(1, len(widths))]
        out.append("  ".join([*cells, line[-1]]))
        if j == 0:
            out.append("-" * (sum(widths) + 2 * len(widths) + 20))
    return "\n".join(out)


def bench_convert(workdir: str, size: int, repeat: int, rows: list[Row]) -> None:
    """i) convert cases from bench_convert.py (median of `repeat` runs a side: whole processes, and
    the library call in-process for raw -> qcow2 and qcow2 -> raw)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_convert
    with guarded(rows, "i) convert", "s", "qemu-img convert"):
        for r in bench_convert.convert_rows(size, workdir, repeat):
            # plain copies: the library call has the target; the whole process is shown (as h)
            plain = r.case.startswith(("raw -> qcow2", "qcow2 -> raw"))
            target = 1.0 if "in-process" in r.case or not (plain or "synced" in r.case) else None
            row = throughput_row(f"i) convert {r.case}", "s", "qemu-img convert", 1 / r.ours_s, 1 / r.qemu_s, target)
            row.qcowdisk, row.reference = r.ours_s, r.qemu_s
            row.note = f"cpu {r.ours_cpu:.2f} s vs {r.qemu_cpu:.2f} s" + ("" if r.same else "; CONTENT DIFFERS")
            rows.append(row)


def machine_info() -> dict[str, Any]:
    """Where the numbers came from."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    qv = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": model,
            "cpus": os.cpu_count(), "qemu_img": qv[0] if qv else ""}


def main(argv: list[str] | None = None) -> int:
    """Run every case, print the table, optionally write JSON. Always exits 0 unless setup fails."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=GiB, help="image size for read/write cases (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="timed write/create runs per side; best is kept (default 3)")
    ap.add_argument("--read-repeat", type=int, default=5,
                    help="timed read rounds after the warm-up round; best is kept (default 5)")
    ap.add_argument("--workdir", default=None, help="parent directory for scratch files (default: /tmp)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write results as JSON to this path")
    ap.add_argument("--keep", action="store_true", help="do not delete the scratch directory")
    ap.add_argument("--only", default="abcdefghijklmn", help="subset of cases to run, e.g. 'abc' or 'f' (default all)")
    args = ap.parse_args(argv)
    if args.size < 2 * MiB or args.size % MiB:
        ap.error("--size must be a whole number of MiB, at least 2M")
    if shutil.which("qemu-img") is None:
        ap.error("qemu-img is required (apt-get install qemu-utils)")

    QcowFile, engine_error = load_engine()
    if engine_error:
        log(f"qcowdisk not importable, running references only: {engine_error}")
    parent = args.workdir or "/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="qcowdisk-bench-", dir=parent)
    rows: list[Row] = []
    t_start = time.perf_counter()
    try:
        only = set(args.only.lower())
        if only & set("abc"):
            bench_reads(QcowFile, engine_error, workdir, args.size, args.read_repeat, rows)
        if only & set("de"):
            bench_writes(QcowFile, engine_error, workdir, args.size, args.repeat, rows)
        if "f" in only:
            bench_create(QcowFile, engine_error, workdir, args.repeat, rows)
        if "g" in only:
            bench_nbd(workdir, args.size, args.repeat, rows)
        if "h" in only and not engine_error:
            bench_check(workdir, args.repeat, rows)
        if "i" in only:
            bench_convert(workdir, args.size, args.repeat, rows)
        if "j" in only:
            with guarded(rows, "j) commit / rebase", "s", "qemu-img"):
                bench_commit_rebase(workdir, args.size, args.repeat, rows)
        bench_engine_more(QcowFile, engine_error, workdir, args.read_repeat, only, rows)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start

    info = machine_info()
    print(f"qcowdisk benchmarks: size {args.size // MiB} MiB, reads best of {args.read_repeat} after a warm-up, "
          f"writes best of {args.repeat}, "
          f"{info['cpus']} CPUs ({info['cpu']}), {info['qemu_img']}, Python {info['python']}")
    print(render_table(rows))
    print(f"(ratio = qcowdisk / reference throughput; informational, nothing asserted; run took {elapsed:.1f} s)")
    if args.json_out:
        doc = {"size": args.size, "repeat": args.repeat, "read_repeat": args.read_repeat, "elapsed_s": elapsed, "machine": info,
               "engine_error": engine_error,
               "rows": [dict(dataclasses.asdict(r), status=r.status()) for r in rows]}
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


# ---------------------------------------------------------------------------------------------
# Engine cases, second part (issue 10): compressed images, backing chains, L2 cache misses,
# read-write open of a large image. Letters k..n for --only.
#   k) compressed (zlib, zstd) sequential 1 MiB readinto_at vs `qemu-img bench -s 1M`; and the
#      same reads from 2 threads (each half of the disk) vs 1 thread
#   l) 3-deep and 20-deep backing chains, 4 KiB strided reads vs `qemu-img bench -d 1`
#   m) L2 working set larger than the cache: 4 KiB reads, each in another L2 table and on data,
#      with a small `l2_cache_size` (the same `l2-cache-size` for qemu-img bench); 64 KiB and 4 KiB
#      clusters (128 tables; with 4 KiB clusters also 512, more than libqcow's caches hold); with
#      4 KiB clusters also libqcow (pyqcow under the system python3) when installed
#   n) opening a 1 TiB image with 4 KiB clusters read-write vs read-only (ratio: ro / rw time)
# ---------------------------------------------------------------------------------------------

def _bench_opts(image_opts: str, *, count: int, bufsize: int, step: int | None = None) -> float:
    """`qemu-img bench --image-opts ... -d 1`; its reported seconds."""
    args = ["qemu-img", "bench", "--image-opts", "-d", "1", "-t", "writeback", "-s", str(bufsize), "-c", str(count)]
    if step is not None:
        args += ["-S", str(step)]
    p = subprocess.run([*args, image_opts], capture_output=True, text=True, check=False)
    m = _RUN_RE.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stdout}{p.stderr}")
    return float(m.group(1))


def _strided(size: int, step: int, count: int) -> list[int]:
    """The offsets qemu-img bench visits: +step each request, back to 0 past the end."""
    out, off = [], 0
    for _ in range(count):
        if off + 4096 > size:
            off = 0
        out.append(off)
        off += step
    return out


def _reads_4k(disk: Any, offsets: list[int]) -> None:
    read = disk.read_at
    for off in offsets:
        read(off, 4096)


def _compressible_raw(path: str, size: int) -> None:
    """Half random, half text-like bytes in every 4 KiB: compresses about 2:1."""
    import random
    rng = random.Random(1)
    words = [rng.randbytes(rng.randint(2, 9)) for _ in range(300)]
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            chunk = bytearray()
            while len(chunk) < MiB:
                chunk += rng.randbytes(2048) + b" ".join(rng.choice(words) for _ in range(500))[:2048]
            f.write(chunk[:MiB])


def bench_compressed(QcowFile: Any, workdir: str, repeat: int, rows: list[Row]) -> None:
    """k) compressed images, sequential 1 MiB reads, 1 and 2 threads; and the same with one
    decoder per request (qcowdisk.qcow2.decoding.MAX_DECODERS = 1), where 2 threads show what
    decoding outside the image lock gives when one request does not already use every core."""
    import threading

    from qcowdisk.qcow2 import decoding
    size = 128 * MiB
    raw = os.path.join(workdir, "c.raw")
    _compressible_raw(raw, size)
    for ctype in ("zlib", "zstd"):
        img = os.path.join(workdir, f"c-{ctype}.qcow2")
        case = f"k) {ctype} compressed, seq 1 MiB readinto_at"
        with guarded(rows, case, "MiB/s", "qemu-img bench -s 1M"):
            qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}", raw, img)
            disk = QcowFile.open(img, readonly=True)
            buf = aligned_buffer(MiB)

            def one(lo: int, hi: int, buf: Any = buf, disk: Any = disk) -> None:
                readinto = disk.readinto_at
                for off in range(lo, hi, MiB):
                    readinto(buf, off)

            def two(disk: Any = disk) -> None:
                half = size // 2
                ts = [threading.Thread(target=lambda lo=lo: one_buf(disk, lo, lo + half)) for lo in (0, half)]
                for th in ts:
                    th.start()
                for th in ts:
                    th.join()

            def one_buf(disk: Any, lo: int, hi: int) -> None:
                b = aligned_buffer(MiB)
                for off in range(lo, hi, MiB):
                    disk.readinto_at(b, off)

            def serial(fn: Callable[[], Any]) -> Callable[[], float]:
                """fn timed with one decoder per request (the calling thread; no decoding pool)."""
                def run() -> float:
                    before, decoding.MAX_DECODERS = decoding.MAX_DECODERS, 1
                    try:
                        return timed(fn)()
                    finally:
                        decoding.MAX_DECODERS = before
                return run

            def cores(fn: Callable[[], Any]) -> float:
                """CPU seconds over wall seconds of one run of fn: the cores it kept busy."""
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                return (time.process_time() - c0) / (time.perf_counter() - t0)

            res = interleaved_best({
                "q": timed(lambda: one(0, size)),
                "q2": timed(two),
                "s1": serial(lambda: one(0, size)),
                "s2": serial(two),
                "ref": lambda img=img: qemu_img_bench(img, count=size // MiB, bufsize=MiB)[0],
            }, repeat)
            busy = cores(lambda: one(0, size))
            disk.close()
            q, q2, s1, s2, r = (size / MiB / v if isinstance(v, float) else None
                                for v in (res["q"], res["q2"], res["s1"], res["s2"], res["ref"]))
            rows.append(throughput_row(case, "MiB/s", "qemu-img bench -s 1M", q, r, 1.0))
            row = throughput_row(f"k) {ctype} compressed, 2 threads vs 1", "MiB/s", "qcowdisk 1 thread", q2, q, 1.6)
            # One request already decodes its clusters on every core (as QEMU does): with
            # `busy` cores taken by one thread, 2 threads on 2 cores gain at most 2 / busy.
            row.note = f"1 thread keeps {busy:.2f} cores busy: bound {max(1.0, (os.cpu_count() or 1) / busy):.2f}x"
            rows.append(row)
            rows.append(throughput_row(f"k) {ctype} compressed, 2 threads vs 1, one decoder per request", "MiB/s",
                                       "qcowdisk 1 thread, one decoder", s2, s1, 1.6))
        _unlink(img)
    _unlink(raw)


def make_chain(workdir: str, base_qcow2: str, size: int, depth: int, write_step: int) -> dict[int, str]:
    """Layers over `base_qcow2` (depth 1), each writing 64 KiB of its own at i * write_step;
    {depth: path of the top image of that depth}."""
    prev = base_qcow2
    layers = {1: prev}
    for i in range(1, depth):
        path = os.path.join(workdir, f"chain{i}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", prev, "-F", "qcow2", path, str(size))
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {i} {i * write_step} 65536", path],
                       capture_output=True, check=True)
        prev = path
        layers[i + 1] = path
    return layers


def bench_chains(QcowFile: Any, workdir: str, repeat: int, rows: list[Row]) -> None:
    """l) 3-deep and 20-deep chains, 4 KiB strided reads (most land in the base). Both sides use
    default caches: every layer's L2 tables fit (256 MiB, 64 KiB clusters: one 32 KiB table)."""
    size = 256 * MiB
    base_raw = os.path.join(workdir, "chain.raw")
    write_random_raw(base_raw, size)
    base = os.path.join(workdir, "chain0.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", base_raw, base)
    _unlink(base_raw)
    layers = make_chain(workdir, base, size, 20, 7 * MiB)
    offsets = _strided(size, STRIDE_STEP, 20000)
    for depth in (3, 20):
        case = f"l) {depth}-deep chain, 4 KiB strided read_at"
        with guarded(rows, case, "req/s", "qemu-img bench -d 1 -s 4K"):
            disk = QcowFile.open(layers[depth], readonly=True)
            res = interleaved_best({
                "q": timed(lambda disk=disk: _reads_4k(disk, offsets)),
                "ref": lambda p=layers[depth]: qemu_img_bench(p, count=len(offsets), bufsize=4096, step=STRIDE_STEP)[0],
            }, repeat)
            disk.close()
            q, r = (len(offsets) / v if isinstance(v, float) else None for v in (res["q"], res["ref"]))
            rows.append(throughput_row(case, "req/s", "qemu-img bench -d 1 -s 4K", q, r, 1.0))


_LIBQCOW_LOOP = """
import sys, time, pyqcow
f = pyqcow.file(); f.open(sys.argv[1])
size, step, count = (int(x) for x in sys.argv[2:5])
offs, off = [], 0
for _ in range(count):
    if off + 4096 > size:
        off = 0
    offs.append(off)
    off += step
for o in offs[:1000]:
    f.seek(o); f.read(4096)
t = time.perf_counter()
for o in offs:
    f.seek(o); f.read(4096)
print(time.perf_counter() - t)
"""


def _libqcow_seconds(image: str, size: int, step: int, count: int) -> float | None:
    """pyqcow (libqcow's Python binding, system python3) doing the strided reads of `_strided`;
    None if it is not installed."""
    py = "/usr/bin/python3"
    if not os.path.exists(py) or subprocess.run([py, "-c", "import pyqcow"], capture_output=True, check=False).returncode:
        return None
    p = subprocess.run([py, "-c", _LIBQCOW_LOOP, image, str(size), str(step), str(count)], capture_output=True,
                       text=True, check=True)
    return float(p.stdout.strip())


def make_l2miss_image(path: str, cluster: int, tables: int, count: int) -> list[int]:
    """An image of `tables` L2 tables' span with data (4 KiB at least) exactly where each of
    the `count` strided reads lands, each read in another L2 table than the last; the offsets."""
    span = cluster * (cluster // 8)
    offsets = _strided(tables * span, span + 4096 if cluster == 4096 else span, count)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, str(tables * span))
    cmds: list[str] = []
    for k, off in enumerate(sorted(set(offsets))):
        cmds += ["-c", f"write -P {k % 250 + 1} {off} {max(cluster, 4096)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, path], capture_output=True, check=True)
    return offsets


def no_memo(run: Callable[[], float]) -> Callable[[], float]:
    """`run` with the fast read path's memo of guest cluster -> host offset off
    (qcowdisk.qcow2.file.FAST_MEMO_ENTRIES = 0), so every read walks L1 and the L2 cache."""
    def wrapped() -> float:
        from qcowdisk.qcow2 import file
        before, file.FAST_MEMO_ENTRIES = file.FAST_MEMO_ENTRIES, 0
        try:
            return run()
        finally:
            file.FAST_MEMO_ENTRIES = before
    return wrapped


def bench_l2_misses(QcowFile: Any, workdir: str, repeat: int, rows: list[Row]) -> None:
    """m) every 4 KiB read in another L2 table than the last, with a cache too small to hold them.
    Against qemu-img (same l2-cache-size) the L2 path is measured with the fast path's memo off:
    it holds the few data clusters a pass reads (one per table) and skips the L2 cache. Against
    libqcow, whose data-cluster cache serves the 128-table case from memory, each engine runs
    with all its caches (memo on), and a row with the memo off follows.

    libqcow (20201213, what pyqcow runs) has fixed caches of 64 L2 tables and 128 data clusters;
    with 4 KiB clusters its L2 cache is 256 KiB against the 64 KiB given to qcowdisk and qemu-img.
    With 128 tables the 127 data clusters of a pass fit its data cache (it serves them from
    memory, the others from the page cache); with 512 tables nothing any side caches is hit
    again before it is evicted: every read loads an L2 table and reads its data.
    """
    for cluster, tables in ((65536, 128), (4096, 128), (4096, 512)):
        img = os.path.join(workdir, f"l2miss-{cluster}-{tables}.qcow2")
        offsets = make_l2miss_image(img, cluster, tables, 20000)
        span = cluster * (cluster // 8)
        cache = 16 * 4096  # 16 slices of 4 KiB
        case = f"m) L2 misses, {cluster // 1024} KiB clusters, {tables} tables, l2_cache_size={cache // 1024}K"
        with guarded(rows, case, "req/s", "qemu-img bench, same l2-cache-size"):
            disk = QcowFile.open(img, readonly=True, l2_cache_size=cache)
            disk2 = QcowFile.open(img, readonly=True, l2_cache_size=cache)  # (its memo fills; disk's stays empty)
            runners: dict[str, Callable[[], float] | None] = {
                "q": no_memo(timed(lambda disk=disk, offsets=offsets: _reads_4k(disk, offsets))),
                "memo": timed(lambda disk=disk2, offsets=offsets: _reads_4k(disk, offsets)),
                "ref": lambda img=img, offsets=offsets, cache=cache: _bench_opts(
                    f"driver=qcow2,file.filename={img},l2-cache-size={cache}", count=len(offsets), bufsize=4096,
                    step=offsets[1] - offsets[0]),
            }
            if cluster == 4096:
                runners["libqcow"] = lambda img=img, offsets=offsets, span=span, tables=tables: _libqcow_seconds(
                    img, tables * span, offsets[1] - offsets[0], len(offsets)) or float("nan")
            res = interleaved_best(runners, repeat)
            disk.close()
            disk2.close()
            q, r = (len(offsets) / v if isinstance(v, float) else None for v in (res["q"], res["ref"]))
            rows.append(throughput_row(case, "req/s", "qemu-img bench, same l2-cache-size", q, r, None))
            memo = res["memo"]
            if isinstance(memo, float):
                row = throughput_row(f"   {case}, memo on", "req/s", "memo off", len(offsets) / memo, q, None)
                row.note = f"the fast path's memo holds all {tables} data clusters"
                rows.append(row)
            lq = res.get("libqcow")
            if isinstance(lq, float) and lq == lq:
                # each engine with all its caches: libqcow's data-cluster cache, qcowdisk's memo
                q_all = len(offsets) / memo if isinstance(memo, float) else None
                rows.append(throughput_row(f"m) L2 misses, {cluster // 1024} KiB clusters, {tables} tables", "req/s",
                                           "libqcow (pyqcow; its own caches)", q_all, len(offsets) / lq, 1.0))
                rows.append(throughput_row("   m) the same, qcowdisk's memo off", "req/s",
                                           "libqcow (pyqcow; its own caches)", q, len(offsets) / lq, None))
        _unlink(img)


def bench_rw_open(QcowFile: Any, workdir: str, repeat: int, rows: list[Row]) -> None:
    """n) opening (and closing) a fresh 1 TiB image with 4 KiB clusters, read-write vs read-only."""
    img = os.path.join(workdir, "open1t.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, str(TiB))
    case = "n) open+close 1 TiB, 4 KiB clusters, read-write"
    with guarded(rows, case, "opens/s", "read-only open"):
        def opens(readonly: bool, n: int = 20) -> None:
            for _ in range(n):
                QcowFile.open(img, readonly=readonly).close()
        res = interleaved_best({"rw": timed(lambda: opens(False)), "ro": timed(lambda: opens(True))}, repeat)
        q, r = (20 / v if isinstance(v, float) else None for v in (res["rw"], res["ro"]))
        rows.append(throughput_row(case, "opens/s", "read-only open", q, r, 0.5))
    _unlink(img)


def bench_engine_more(QcowFile: Any, engine_error: str | None, workdir: str, repeat: int, only: set[str],
                      rows: list[Row]) -> None:
    """Cases k..n (see the section comment)."""
    if engine_error:
        return
    for letter, fn in (("k", bench_compressed), ("l", bench_chains), ("m", bench_l2_misses), ("n", bench_rw_open)):
        if letter in only:
            log(f"case {letter}")
            fn(QcowFile, workdir, repeat, rows)


if __name__ == "__main__":
    sys.exit(main())
