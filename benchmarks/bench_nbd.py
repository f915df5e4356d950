#!/usr/bin/env python3
"""nbdcopy out of `qcowdisk serve` against the same out of qemu-nbd, serving the same image.

    PYTHONPATH=. python3 benchmarks/bench_nbd.py [--size 1G] [--repeat 3] [--dir DIR]

The image is a qcow2 (64 KiB clusters) made by `qemu-img convert` of bench_convert.py's source:
a raw file with mixed content in 1 MiB pieces, three quarters data (half random, half text-like)
and one quarter holes, so block status matters (a few hundred extents per GiB). Both
servers export it read-only over a Unix socket (`qcowdisk serve --readonly`, and
`qemu-nbd --read-only --persistent --shared=8 -f qcow2`, or qemu-storage-daemon's NBD export
when qemu-nbd is missing); both advertise multi-conn, so nbdcopy uses its default 4 connections.
Cases: `nbdcopy URL null:` (the server's read and block-status path alone) and
`nbdcopy URL out.raw` (a real copy), and `--connections=1`. Each round runs every case against
both servers in turn (page cache hot after an untimed first round); the best wall time of
each is kept. Ratio = qcowdisk MiB/s / qemu-nbd MiB/s (above 1: qcowdisk faster).
Requires nbdkit with its Python plugin, nbdcopy (libnbd-bin) and qemu-nbd (qemu-utils).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench_convert import make_source, parse_size  # noqa: E402  (after the fallback path above)
from qcowdisk.nbdserve import wait_ready  # noqa: E402

MiB = 1 << 20

# (case name, nbdcopy options, destination: None for null:, else a file name)
CASES = [
    ("nbdcopy -> null:", [], None),
    ("nbdcopy -> file", [], "out.raw"),
    ("nbdcopy -C 1 -> null:", ["--connections=1"], None),
]


def make_image(tmp: Path, size: int) -> Path:
    """The mixed-content qcow2 image (see the module docstring)."""
    raw = tmp / "src.raw"
    make_source(raw, size)
    img = tmp / "img.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(img)], check=True)
    raw.unlink()
    return img


def qemu_server_command(img: Path, sock: str) -> list[str]:
    """qemu-nbd (or qemu-storage-daemon) exporting the image read-only on a Unix socket."""
    if shutil.which("qemu-nbd"):
        return ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "-f", "qcow2", "--socket", sock, str(img)]
    if shutil.which("qemu-storage-daemon"):
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={img},read-only=on",
                "--blockdev", "driver=qcow2,node-name=disk0,file=file0,read-only=on",
                "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=8",
                "--export", "type=nbd,id=exp0,node-name=disk0,name=,writable=off"]
    raise RuntimeError("neither qemu-nbd nor qemu-storage-daemon is installed")


@contextlib.contextmanager
def server(cmd: list[str], sock: str) -> Iterator[str]:
    """Run a server until the block ends; yields its nbd+unix URL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if not wait_ready(sock, 60, proc):
            raise RuntimeError(f"{cmd[0]} exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nbdcopy_seconds(url: str, options: list[str], dest: Path | None) -> float:
    """Wall time of one nbdcopy run (the destination file removed first)."""
    if dest is not None and dest.exists():
        dest.unlink()
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", *options, url, str(dest) if dest else "null:"], check=True)
    return time.perf_counter() - t0


@dataclass
class NbdRow:
    """One case's result: MiB/s out of each server (best run), and the server compared against."""

    case: str
    qcowdisk_mibs: float
    reference_mibs: float
    reference: str
    note: str

    @property
    def ratio(self) -> float:
        """qcowdisk throughput / the reference's (above 1: qcowdisk faster)."""
        return self.qcowdisk_mibs / self.reference_mibs


def nbd_rows(size: int = 1 << 30, repeat: int = 3, workdir: str | None = None) -> list[NbdRow]:
    """Run the comparison; one row per case."""
    with tempfile.TemporaryDirectory(prefix="qcowdisk-nbd-", dir=workdir) as d:
        tmp = Path(d)
        img = make_image(tmp, size)
        ours_cmd = [sys.executable, "-m", "qcowdisk", "serve", "--readonly", "--socket", str(tmp / "q.sock"), str(img)]
        theirs_cmd = qemu_server_command(img, str(tmp / "r.sock"))
        times: dict[tuple[str, str], list[float]] = {}
        env_path = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env_path) if p)
        try:
            with server(ours_cmd, str(tmp / "q.sock")) as ours, server(theirs_cmd, str(tmp / "r.sock")) as theirs:
                for rnd in range(repeat + 1):  # round 0 warms the page cache and both servers
                    for name, options, dest in CASES:
                        for side, url in (("qcowdisk", ours), ("reference", theirs)):
                            t = nbdcopy_seconds(url, options, tmp / dest if dest else None)
                            if rnd:
                                times.setdefault((name, side), []).append(t)
        finally:
            os.environ["PYTHONPATH"] = env_path
        return [NbdRow(name, size / MiB / min(times[(name, "qcowdisk")]), size / MiB / min(times[(name, "reference")]),
                       theirs_cmd[0], f"best of {repeat}, {size // MiB} MiB mixed image")
                for name, _options, _dest in CASES]


def main() -> int:
    """Print the table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    rows = nbd_rows(parse_size(args.size), args.repeat, args.dir)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, reference: {rows[0].reference}")
    print(f"{'case':<24} {'qcowdisk MiB/s':>15} {'reference MiB/s':>16} {'ratio':>6}")
    for r in rows:
        print(f"{r.case:<24} {r.qcowdisk_mibs:>15,.0f} {r.reference_mibs:>16,.0f} {r.ratio:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
