#!/usr/bin/env python3
"""`qcowdisk check` against `qemu-img check`, side by side on the same images (not a test).

Images (built with qemu-img / qemu-io in a scratch directory):
  sparse-1T     1 TiB virtual, a few MiB written at the start, the middle and the end
  full-4G       4 GiB, preallocation=falloc: every cluster allocated (8 full L2 tables, 65536 data clusters)
  written-1G    1 GiB written by qemu-io in 1 MiB pieces, with a snapshot (shared clusters, two L1 tables)
  c512-64M      64 MiB with 512-byte clusters, fully written (131072 data clusters, 1024 L2 tables)

For each: qemu-img check (process wall time), `python -m qcowdisk check` (process wall time,
interpreter start-up included) and `QcowFile.check()` in this process (open excluded), the best
of --repeat runs each. Prints one table; asserts nothing.

    python3 benchmarks/bench_check.py [--repeat 5] [--workdir /tmp] [--keep] [--only sparse-1T,full-4G]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qcowdisk import QcowFile  # noqa: E402 - after the path set-up above


def run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def build(kind: str, d: Path) -> Path:
    p = d / f"{kind}.qcow2"
    if kind == "sparse-1T":
        run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1T")
        run("qemu-io", "-c", "write -P 1 0 4M", "-c", "write -P 2 500G 4M", "-c", "write -P 3 1023G 4M", str(p))
    elif kind == "full-4G":
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=falloc", str(p), "4G")
    elif kind == "written-1G":
        run("qemu-img", "create", "-q", "-f", "qcow2", str(p), "1G")
        run("qemu-io", "-c", "write -P 7 0 1G", str(p))
        run("qemu-img", "snapshot", "-c", "s1", str(p))
        run("qemu-io", "-c", "write -P 8 0 64M", str(p))
    elif kind == "c512-64M":
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(p), "64M")
        run("qemu-io", "-c", "write -P 9 0 64M", str(p))
    else:
        raise ValueError(kind)
    return p


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", default="sparse-1T,full-4G,written-1G,c512-64M")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench-check-", dir=args.workdir))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    try:
        for kind in args.only.split(","):
            p = build(kind, d)
            qemu = best(lambda p=p: subprocess.run(["qemu-img", "check", str(p)], capture_output=True, check=False),
                        args.repeat)
            cli = best(lambda p=p: subprocess.run([sys.executable, "-m", "qcowdisk", "check", str(p)],
                                                  capture_output=True, env=env, check=False), args.repeat)
            with QcowFile.open(p, readonly=True) as disk:
                result = disk.check()
                api = best(disk.check, args.repeat)
            q = subprocess.run(["qemu-img", "check", "--output=json", str(p)], capture_output=True, text=True,
                               check=False)
            same = q.stdout == result.to_json().replace(str(p), str(p)) + "\n"
            rows.append((kind, os.path.getsize(p), result.allocated_clusters, qemu, cli, api, same))
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    print(f"{'image':<12} {'file MiB':>9} {'allocated':>10} {'qemu-img':>10} {'qcowdisk':>10} {'check()':>10} "
          f"{'cli/qemu':>9} {'api/qemu':>9}  same JSON")
    for kind, size, alloc, qemu, cli, api, same in rows:
        print(f"{kind:<12} {size / 2**20:>9.1f} {alloc:>10} {qemu * 1e3:>8.1f}ms {cli * 1e3:>8.1f}ms {api * 1e3:>8.1f}ms "
              f"{cli / qemu:>9.2f} {api / qemu:>9.2f}  {same}")
    print("(times: best of", args.repeat, "runs; qemu-img and qcowdisk as processes, check() in-process without the open)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
