#!/usr/bin/env python3
"""qcowdisk convert against qemu-img convert: wall and CPU time of each on the same source, and the ratios.

    PYTHONPATH=. python3 benchmarks/bench_convert.py [--size 1G] [--dir DIR] [--repeat 3]

The source is a raw file of --size bytes: half of it files from /usr concatenated, half zeros
(holes and written zeros), in 2 MiB pieces. Cases: raw->qcow2, qcow2->raw, and
`-c -m 8 -W` with zlib and zstd. Each side is a whole process (start-up included), page cache
hot, the two run in turn (A B A B ...) and the median of each is kept; CPU is user + system of
the child. A ratio above 1 means qcowdisk took longer. For raw->qcow2 and qcow2->raw there is
also the library call: `qcowdisk.convert(...)` timed inside this (already started) interpreter,
what a Python program choosing the library over running qemu-img pays, against the same
`qemu-img convert` process (CPU: this process's user + system during the call).

What each side syncs: `qemu-img convert` opens its target with cache=unsafe by default and never
fsyncs it; qcowdisk's library default (cache="writeback") fsyncs the target before returning.
`qcowdisk convert` takes qemu-img's -t with the same default (unsafe). So both sides get the same
options: none ("no sync": neither fsyncs) or `-t writeback` ("synced": both fsync the target at
the end). qcowdisk runs as the `qcowdisk` console script of a clean venv (benchmarks/cleanpython.py:
the interpreter starts as an installed user's does, without this one's site-packages hooks).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cleanpython import CleanPython

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


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def ours(clean: CleanPython, opts: list[str], src: Path, dst: Path) -> list[str]:
    """The `qcowdisk convert` command line (the console script of a clean venv, see cleanpython.py)."""
    return [clean.qcowdisk, "convert", *opts, str(src), str(dst)]


@dataclass
class Row:
    """One case: median wall and CPU seconds of each side, the ratios, the output sizes."""

    case: str
    ours_s: float
    qemu_s: float
    ours_cpu: float
    qemu_cpu: float
    ours_mib: float
    qemu_mib: float
    same: bool

    @property
    def ratio(self) -> float:
        """qcowdisk's wall time over qemu-img's (below 1: qcowdisk faster)."""
        return self.ours_s / self.qemu_s

    @property
    def cpu_ratio(self) -> float:
        """qcowdisk's CPU time over qemu-img's."""
        return self.ours_cpu / max(self.qemu_cpu, 1e-9)


def in_process(opts: list[str], src: Path, dst: Path) -> tuple[float, float]:
    """(wall, CPU seconds) of `qcowdisk.convert` in this interpreter, with the options of a
    plain case (-O FMT, no sync: cache="unsafe" as qemu-img's default)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import qcowdisk
    out_format = opts[opts.index("-O") + 1]
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    qcowdisk.convert(src, dst, out_format=out_format, cache="unsafe")
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cases(raw: Path, qcow: Path) -> list[tuple[str, Path, list[str], str]]:
    """(name, source, options for both tools, output extension)."""
    c = ["-O", "qcow2", "-c", "-m", "8", "-W"]
    return [
        ("raw -> qcow2: convert() in-process", raw, ["-O", "qcow2"], "qcow2"),
        ("raw -> qcow2 (no sync)", raw, ["-O", "qcow2"], "qcow2"),
        ("raw -> qcow2 (synced)", raw, ["-O", "qcow2", "-t", "writeback"], "qcow2"),
        ("qcow2 -> raw: convert() in-process", qcow, ["-O", "raw"], "raw"),
        ("qcow2 -> raw (no sync)", qcow, ["-O", "raw"], "raw"),
        ("qcow2 -> raw (synced)", qcow, ["-O", "raw", "-t", "writeback"], "raw"),
        ("-c zlib -m 8 -W", raw, [*c, "-o", "compression_type=zlib"], "qcow2"),
        ("-c zstd -m 8 -W", raw, [*c, "-o", "compression_type=zstd"], "qcow2"),
    ]


def convert_rows(size: int = 1 << 30, workdir: str | None = None, repeat: int = 3,
                 only: str | None = None) -> list[Row]:
    """Run every case (or those whose name contains `only`) `repeat` times a side, in turn."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        tmp = Path(d)
        raw = tmp / "src.raw"
        make_source(raw, size)
        qcow = tmp / "src.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
        clean = CleanPython(tmp / "python")
        env = clean.env
        for name, src, opts, ext in cases(raw, qcow):
            if only and only not in name:
                continue
            out_ours, out_qemu = tmp / f"ours.{ext}", tmp / f"theirs.{ext}"
            a: list[tuple[float, float]] = []
            b: list[tuple[float, float]] = []
            library = "in-process" in name
            if library:
                in_process(opts, src, out_ours)  # imports and first-call costs: not what is timed
            for _ in range(repeat):
                a.append(in_process(opts, src, out_ours) if library else timed(ours(clean, opts, src, out_ours), env))
                b.append(timed(["qemu-img", "convert", *opts, str(src), str(out_qemu)]))
            same = subprocess.run(["qemu-img", "compare", "-q", str(out_ours), str(out_qemu)],
                                  check=False).returncode == 0
            rows.append(Row(name, statistics.median(w for w, _ in a), statistics.median(w for w, _ in b),
                            statistics.median(c for _, c in a), statistics.median(c for _, c in b),
                            out_ours.stat().st_blocks * 512 / MiB, out_qemu.stat().st_blocks * 512 / MiB, same))
            out_ours.unlink()
            out_qemu.unlink()
    return rows


def render(rows: list[Row]) -> str:
    """The rows as a text table."""
    lines = [f"{'case':<34} {'qcowdisk s':>10} {'qemu-img s':>10} {'ratio':>6} {'cpu ours':>9} {'cpu qemu':>9} "
             f"{'cpu ratio':>9} {'ours MiB':>9} {'qemu MiB':>9}"]
    for r in rows:
        lines.append(f"{r.case:<34} {r.ours_s:10.2f} {r.qemu_s:10.2f} {r.ratio:6.2f} {r.ours_cpu:9.2f} "
                     f"{r.qemu_cpu:9.2f} {r.cpu_ratio:9.2f} {r.ours_mib:9.1f} {r.qemu_mib:9.1f}"
                     + ("" if r.same else "  CONTENT DIFFERS"))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = ap.parse_args()
    size = parse_size(args.size)
    print(f"source: {size / MiB:.0f} MiB (half /usr files, half zeros), {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}, median of {args.repeat} runs a side, taken in turn")
    print(render(convert_rows(size, args.dir, args.repeat, args.only)))
    print("(ratio: qcowdisk / qemu-img, wall and CPU = user + system; 'no sync': neither fsyncs, "
          "'synced': both fsync the target at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
