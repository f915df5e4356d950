#!/usr/bin/env python3
"""qcowdisk convert against qemu-img convert: wall time of each on the same source, and the ratio.

    PYTHONPATH=. python3 benchmarks/bench_convert.py [--size 1G] [--dir DIR]

The source is a raw file of --size bytes: three quarters data (half of it random, half text-like
and compressible), one quarter holes, in 1 MiB pieces. Cases: raw->qcow2, qcow2->raw, and
`-c -m 8 -W` with zlib and zstd. Each tool runs as a subprocess (`python3 -m qcowdisk convert`
and `qemu-img convert`), page cache hot; the output sizes are printed too. A ratio above 1 means
qcowdisk took longer.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].lower()]) if text[-1].lower() in units else int(text)


def make_source(path: Path, size: int) -> None:
    rng = random.Random(1)
    words = b"the quick brown fox jumps over the lazy dog 0123456789 qcow2 cluster refcount "
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            kind = (off // MiB) % 4
            if kind == 3:
                continue  # a hole
            f.seek(off)
            if kind == 0:
                f.write(rng.randbytes(MiB))
            else:
                f.write((words * (MiB // len(words) + 1))[:MiB - 7] + rng.randbytes(7))


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        raw = tmp / "src.raw"
        make_source(raw, size)
        qcow = tmp / "src.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
        cases = [
            ("raw -> qcow2", raw, ["-O", "qcow2"], "qcow2"),
            ("qcow2 -> raw", qcow, ["-O", "raw"], "raw"),
            ("-c zlib -m 8 -W", raw, ["-O", "qcow2", "-c", "-o", "compression_type=zlib", "-m", "8", "-W"], "qcow2"),
            ("-c zstd -m 8 -W", raw, ["-O", "qcow2", "-c", "-o", "compression_type=zstd", "-m", "8", "-W"], "qcow2"),
        ]
        print(f"source: {size / MiB:.0f} MiB, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        print(f"{'case':<18} {'qcowdisk s':>10} {'qemu-img s':>10} {'ratio':>6} {'qcowdisk MiB':>13} {'qemu-img MiB':>13}")
        for name, src, opts, ext in cases:
            ours, theirs = tmp / f"ours.{ext}", tmp / f"theirs.{ext}"
            t_ours = timed([sys.executable, "-m", "qcowdisk", "convert", *opts, str(src), str(ours)])
            t_theirs = timed(["qemu-img", "convert", *opts, str(src), str(theirs)])
            same = subprocess.run(["qemu-img", "compare", "-q", str(ours), str(theirs)], check=False).returncode == 0
            s_ours, s_theirs = ours.stat().st_blocks * 512 / MiB, theirs.stat().st_blocks * 512 / MiB
            print(f"{name:<18} {t_ours:10.2f} {t_theirs:10.2f} {t_ours / t_theirs:6.2f} {s_ours:13.1f} {s_theirs:13.1f}"
                  + ("" if same else "  CONTENT DIFFERS"))
            ours.unlink()
            theirs.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
