#!/usr/bin/env python3
"""Deterministic per-request profiles of the hot paths: bytecodes, Python calls and host I/O.

Usage:  python3 benchmarks/profile_paths.py [--requests 200] [--workdir DIR]

Times on a loaded machine are noise; these counts are not. For each path it prints, per
request (after warm-up requests that fill the caches):
  - bytecodes: opcode events of `sys.settrace` with `f_trace_opcodes` (every Python frame,
    qcowdisk's and the standard library's; C functions count as nothing, which is the point),
  - calls: Python function calls (settrace 'call' events),
  - host syscalls and bytes written: counted at the HostFile seam (`host_factory`), one count
    per pread/preadv/pwrite/pwritev/fsync/truncate/punch/zero_range/zero_alloc (fallocate) call.

Paths: 4 KiB read_at and readinto_at on a fully allocated image opened read-only and read-write,
the same on an extended-L2 image, and 4 KiB / 64 KiB sequential allocating writes into a fresh
image (what `qemu-img bench -w -d 1 -s 4096 / 65536` does); 4 KiB read_at through a 20-deep
backing chain landing in the base (case l of run_benchmarks.py), and 4 KiB read_at with 4 KiB
clusters where every request needs another L2 table than the 16 cached (case m).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, ClassVar

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.append(_REPO)

from qcowdisk import QcowFile  # noqa: E402
from qcowdisk.hostio import Buffer, HostFile  # noqa: E402
from run_benchmarks import make_chain, make_l2miss_image  # noqa: E402  (this script's directory)

KiB = 1024
MiB = 1024 * KiB


class CountingHost(HostFile):
    """A HostFile that counts its system calls and the bytes it writes (class-wide)."""

    calls: ClassVar[Counter[str]] = Counter()
    written = 0

    def pread(self, length: int, offset: int) -> bytes:
        """Count, then read."""
        CountingHost.calls["pread"] += 1
        return super().pread(length, offset)

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Count, then read."""
        CountingHost.calls["preadv"] += 1
        return super().preadv(buffers, offset)

    def pwritev(self, buffers: Sequence[Buffer], offset: int) -> None:
        """Count (pwrite goes through here too), then write."""
        CountingHost.calls["pwritev"] += 1
        CountingHost.written += sum(memoryview(b).nbytes for b in buffers)
        super().pwritev(buffers, offset)

    def fsync(self) -> None:
        """Count, then sync."""
        CountingHost.calls["fsync"] += 1
        super().fsync()

    def truncate(self, length: int) -> None:
        """Count, then truncate."""
        CountingHost.calls["truncate"] += 1
        super().truncate(length)

    def punch_hole(self, offset: int, length: int) -> bool:
        """Count, then punch."""
        CountingHost.calls["punch"] += 1
        return super().punch_hole(offset, length)

    def zero_range(self, offset: int, length: int) -> None:
        """Count, then punch (or write zeros)."""
        CountingHost.calls["zero_range"] += 1
        super().zero_range(offset, length)

    def zero_alloc(self, offset: int, length: int) -> bool:
        """Count, then fallocate (ZERO_RANGE)."""
        CountingHost.calls["zero_alloc"] += 1
        return super().zero_alloc(offset, length)

    def size(self) -> int:
        """Count, then fstat."""
        CountingHost.calls["fstat"] += 1
        return super().size()


def count_bytecodes(fn: Callable[[], Any]) -> tuple[int, int]:
    """(opcodes, calls) executed by fn() in Python frames."""
    ops = 0
    calls = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal ops, calls
        if event == "call":
            if frame.f_code.co_filename == __file__:
                return None  # this script's own request wrappers
            calls += 1
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            ops += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return ops, calls


def profile(name: str, open_disk: Callable[[type[HostFile]], Any], request: Callable[[Any, int], Any],
            n: int, warm: int = 20) -> dict[str, Any]:
    """Per-request counts of request(disk, i) for i in [warm, warm + n): bytecodes and calls on
    a disk opened with the plain HostFile (what users run), host calls on one opened with
    CountingHost (whose own Python code would inflate the bytecodes)."""
    ops = calls = 0
    disk = open_disk(HostFile)
    try:
        for i in range(warm):
            request(disk, i)
        for i in range(warm, warm + n):
            o, c = count_bytecodes(lambda i=i: request(disk, i))
            ops += o
            calls += c
    finally:
        disk.close()
    disk = open_disk(CountingHost)
    try:
        for i in range(warm):
            request(disk, i)
        CountingHost.calls.clear()
        CountingHost.written = 0
        for i in range(warm, warm + n):
            request(disk, i)
        sc = {k: v / n for k, v in sorted(CountingHost.calls.items())}
        written = CountingHost.written / n
    finally:
        disk.close()
    out = {"path": name, "bytecodes": ops / n, "calls": calls / n, "syscalls": sum(sc.values()),
           "by_call": sc, "written_bytes": written}
    print(f"{name:36s} {out['bytecodes']:7.1f} bytecodes {out['calls']:6.2f} calls "
          f"{out['syscalls']:6.3f} host calls/req ({', '.join(f'{k} {v:.3f}' for k, v in sc.items()) or '-'})"
          f"  {written / KiB:6.2f} KiB written/req")
    return out


def qemu_img(*args: str) -> None:
    """Run qemu-img (checked)."""
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    """Make the images, print one line per path."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--only", default="rwcm", help="r: reads, w: allocating writes, c: chain, m: L2 misses")
    args = ap.parse_args(argv)
    n = args.requests
    size = 64 * MiB
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        raw = os.path.join(d, "src.raw")
        with open(raw, "wb") as f:
            f.write(os.urandom(size))
        images = {}
        for name, opts in (("std", "cluster_size=65536"), ("extl2", "cluster_size=65536,extended_l2=on")):
            images[name] = os.path.join(d, f"{name}.qcow2")
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", opts, raw, images[name])
        step = MiB + 4 * KiB
        offs = [(i * step) % (size - 4 * KiB) for i in range(n + 100)]
        buf = bytearray(4 * KiB)

        def read_at(disk: Any, i: int) -> Any:
            return disk.read_at(offs[i], 4096)

        def readinto_at(disk: Any, i: int) -> Any:
            return disk.readinto_at(buf, offs[i])

        for img_name, path in images.items() if "r" in args.only else ():
            for ro in (True, False):
                def open_disk(host: type[HostFile], path: str = path, ro: bool = ro) -> Any:
                    return QcowFile.open(path, readonly=ro, host_factory=host)
                mode = "ro" if ro else "rw"
                profile(f"4K read_at {img_name} {mode}", open_disk, read_at, n)
                profile(f"4K readinto_at {img_name} {mode}", open_disk, readinto_at, n)
                if img_name == "std":  # clusters read before: the fast path's memo (file.py)
                    profile(f"4K read_at {img_name} {mode}, again", open_disk,
                            lambda disk, i: disk.read_at(offs[i % 50], 4096), n, warm=50)
                    profile(f"4K readinto_at {img_name} {mode}, again", open_disk,
                            lambda disk, i: disk.readinto_at(buf, offs[i % 50]), n, warm=50)
        for bs in (4 * KiB, 64 * KiB) if "w" in args.only else ():
            data = b"\xa5" * bs
            def create(host: type[HostFile], bs: int = bs) -> Any:
                return QcowFile.create(os.path.join(d, f"fresh{bs}-{host.__name__}.qcow2"), 1 << 30,
                                       host_factory=host)

            def write_at(disk: Any, i: int, bs: int = bs, data: bytes = data) -> Any:
                return disk.write_at(i * bs, data)
            # sequential, as qemu-img bench -w: with 4 KiB requests every 16th allocates a cluster
            profile(f"{bs // KiB}K sequential allocating write", create, write_at, max(n, 64 * KiB // bs * 16))
        if "c" in args.only:
            profile_chain(d, raw, size, offs, n)
        if "m" in args.only:
            profile_l2_misses(d, n)
    return 0


def profile_chain(d: str, raw: str, size: int, offs: list[int], n: int) -> None:
    """4 KiB read_at through a 20-deep chain (each layer one 64 KiB write of its own), from the base."""
    base = os.path.join(d, "chain0.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, base)
    top = make_chain(d, base, size, 20, 3 * MiB)[20]

    def open_disk(host: type[HostFile]) -> Any:
        return QcowFile.open(top, readonly=True, host_factory=host)
    # first reads of each granule, then reads of granules read before (what a benchmark's later rounds do)
    profile("4K read_at 20-deep chain ro, 1st", open_disk, lambda disk, i: disk.read_at(offs[i], 4096), n)
    profile("4K read_at 20-deep chain ro, again", open_disk, lambda disk, i: disk.read_at(offs[i % 50], 4096), n,
            warm=50)


def profile_l2_misses(d: str, n: int) -> None:
    """4 KiB read_at, 4 KiB clusters, 512 L2 tables visited in turn (each read on data),
    l2_cache_size 64 KiB (16 tables): case m of run_benchmarks.py."""
    img = os.path.join(d, "l2miss.qcow2")
    offs = make_l2miss_image(img, 4 * KiB, 512, n + 100)

    def open_disk(host: type[HostFile]) -> Any:
        return QcowFile.open(img, readonly=True, l2_cache_size=64 * KiB, host_factory=host)
    profile("4K read_at L2 miss 4K clusters ro", open_disk, lambda disk, i: disk.read_at(offs[i], 4096), n)

if __name__ == "__main__":
    sys.exit(main())
