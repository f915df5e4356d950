#!/usr/bin/env python3
"""qcowdisk convert against qemu-img convert: wall time of each on the same source, and the ratio.

    PYTHONPATH=. python3 benchmarks/bench_convert.py [--size 1G] [--dir DIR]

The source is a raw file of --size bytes: half of it files from /usr concatenated, half zeros
(holes and written zeros), in 2 MiB pieces. Cases: raw->qcow2, qcow2->raw, and
`-c -m 8 -W` with zlib and zstd. Each tool runs as a subprocess (`python3 -m qcowdisk convert`
and `qemu-img convert`), page cache hot; the output sizes are printed too. A ratio above 1 means
qcowdisk took longer.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].lower()]) if text[-1].lower() in units else int(text)


def usr_files() -> Iterator[Path]:
    """Regular files under /usr (lib, share, bin), in a fixed order."""
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if path.is_file() and not path.is_symlink():
                    yield path


def make_source(path: Path, size: int) -> None:
    """A raw disk of `size` bytes: half of it files from /usr concatenated (real data, with the
    zero runs binaries have), half zeros, in alternating 2 MiB pieces; of the zero pieces, one in
    two is a hole and the other written zeros (both tools must read those to find them zero)."""
    piece = 2 * MiB
    files = usr_files()
    pending = bytearray()
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, piece)):
            n = min(piece, size - off)
            if i % 4 == 1:
                continue  # a hole
            f.seek(off)
            if i % 4 == 3:
                f.write(bytes(n))
                continue
            while len(pending) < n:
                try:
                    pending += next(files).read_bytes()
                except PermissionError:
                    continue
                except StopIteration:
                    pending += bytes(n)  # /usr ran out: cannot happen on a normal system
            f.write(pending[:n])
            del pending[:n]


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
