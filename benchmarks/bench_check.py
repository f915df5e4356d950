#!/usr/bin/env python3
"""`qcowdisk check` against `qemu-img check`, side by side on the same images (not a test).

Images (built with qemu-img / qemu-io in a scratch directory):
  sparse-1T     1 TiB virtual, a few MiB written at the start, the middle and the end
  full-4G       4 GiB, preallocation=falloc: every cluster allocated (8 full L2 tables, 65536 data clusters)
  written-1G    1 GiB written by qemu-io in 1 MiB pieces, with a snapshot (shared clusters, two L1 tables)
  c512-64M      64 MiB with 512-byte clusters, fully written (131072 data clusters, 1024 L2 tables)

For each: qemu-img check (process wall time), the `qcowdisk check` command (process wall time, see cleanpython.py;
interpreter start-up included), `QcowFile.open` + `check()` + close and `check()` alone in this
process, the best of --repeat interleaved rounds each. Prints one table; asserts nothing.
`check_rows()` returns the rows benchmarks/run_benchmarks.py prints.

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

from cleanpython import CleanPython  # noqa: E402 - after the path set-up above
from qcowdisk import QcowFile  # noqa: E402


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


def measure(p: Path, repeat: int, clean: CleanPython) -> dict[str, float | bool | int]:
    """One image: the best of `repeat` interleaved rounds of qemu-img check (process), the
    `qcowdisk check` command (process, see cleanpython.py), QcowFile open + check + close and
    check() alone (in-process)."""

    def qemu() -> None:
        subprocess.run(["qemu-img", "check", str(p)], capture_output=True, check=False)

    def cli() -> None:
        subprocess.run([clean.qcowdisk, "check", str(p)], capture_output=True, env=clean.env, check=False)

    def whole() -> None:
        with QcowFile.open(p, readonly=True) as disk:
            disk.check()

    with QcowFile.open(p, readonly=True) as disk:
        result = disk.check()
        times: dict[str, list[float]] = {"qemu": [], "cli": [], "open_check": [], "check": []}
        for _ in range(repeat):  # interleaved, so load from elsewhere hits every side alike
            for name, fn in (("qemu", qemu), ("cli", cli), ("open_check", whole), ("check", disk.check)):
                times[name].append(best(fn, 1))
    q = subprocess.run(["qemu-img", "check", "--output=json", str(p)], capture_output=True, text=True, check=False)
    return {**{k: min(v) for k, v in times.items()}, "same": q.stdout == result.to_json() + "\n",
            "allocated": result.allocated_clusters, "size": os.path.getsize(p)}


def check_rows(kinds: tuple[str, ...] = ("sparse-1T", "full-4G", "c512-64M"), repeat: int = 5,
               workdir: str | None = None) -> list[tuple[str, float, float, float]]:
    """(name, qcowdisk seconds, qemu-img seconds, ratio = qemu-img / qcowdisk time: above 1 means
    qcowdisk is faster) for each image: `check()` in-process against the qemu-img process, and
    the `qcowdisk check` process (interpreter start-up included, see cleanpython.py) against it."""
    d = Path(tempfile.mkdtemp(prefix="bench-check-", dir=workdir))
    rows = []
    try:
        clean = CleanPython(d / "python")
        for kind in kinds:
            m = measure(build(kind, d), repeat, clean)
            qemu, api, cli = float(m["qemu"]), float(m["check"]), float(m["cli"])
            rows.append((f"check {kind}: QcowFile.check() in-process", api, qemu, qemu / api))
            rows.append((f"check {kind}: qcowdisk check process", cli, qemu, qemu / cli))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", default="sparse-1T,full-4G,written-1G,c512-64M")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench-check-", dir=args.workdir))
    rows = []
    try:
        for kind in args.only.split(","):
            m = measure(build(kind, d), args.repeat)
            rows.append((kind, m))
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    print(f"{'image':<12} {'file MiB':>9} {'allocated':>10} {'qemu-img':>10} {'qcowdisk':>10} {'open+chk':>10} "
          f"{'check()':>10} {'qemu/cli':>9} {'qemu/api':>9}  same JSON")
    for kind, m in rows:
        qemu, cli, whole, api = (float(m[k]) for k in ("qemu", "cli", "open_check", "check"))
        print(f"{kind:<12} {int(m['size']) / 2**20:>9.1f} {m['allocated']:>10} {qemu * 1e3:>8.2f}ms {cli * 1e3:>8.1f}ms "
              f"{whole * 1e3:>8.2f}ms {api * 1e3:>8.2f}ms {qemu / cli:>9.2f} {qemu / api:>9.2f}  {m['same']}")
    print(f"(best of {args.repeat} interleaved rounds; qemu-img and qcowdisk check as processes, open+chk and check() "
          "in-process; ratios are qemu-img time / qcowdisk time: above 1, qcowdisk is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
