#!/usr/bin/env python3
"""qcowdisk commit / rebase against qemu-img commit / rebase: wall time of each, same inputs.

    PYTHONPATH=. python3 benchmarks/bench_commit.py [--size 1G] [--dir DIR] [--repeat 3]

The chain is built with qemu-img and qemu-io only. base.qcow2 (--size) holds real data copied
from files under /usr in its first half; top.qcow2 is an overlay of it whose 4 MiB slots go
data (/usr files, at a different place in them), zeros (`write -z`), unallocated, data, in turn;
new.qcow2 is a base whose first quarter matches base.qcow2 and the rest holds other /usr data.

Cases, each tool as a whole process (the `qcowdisk` command of a clean venv, see cleanpython.py, and `qemu-img ...`) on a fresh
copy of the chain (the copy is not timed), page cache hot, best of --repeat, taken in turn;
wall time, then the library call (`qcowdisk.commit` / `qcowdisk.rebase`) timed inside this
interpreter against the same qemu-img process (as bench_check.py does for check), then CPU time
(user + system). The copy's dirty pages are synced before each timed run. Python runs with its bytecode cache
(as an installed package would), so compiling the package is not charged to it. A third row
takes from qcowdisk's CPU time the start-up (`python3 -c "import qcowdisk.cli"`, best of the
same rounds): what the operation itself costs, against qemu-img's whole process.
  commit               `commit top.qcow2` (into the qcow2 base, then empty the overlay)
  commit -d, raw base  `commit -d top-raw.qcow2`: the same overlay over base.raw
  rebase (safe)        `rebase -b new.qcow2 -F qcow2 top.qcow2`
The results are checked to read the same (`qemu-img compare`). ratio = qemu-img s / qcowdisk s,
so above 1 means qcowdisk is faster.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cleanpython import CleanPython

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SLOT = 4 * MiB
PIECE = 4 * MiB

Row = tuple[str, float, float, float]


def parse_size(text: str) -> int:
    """'1G', '256M', '4096' -> bytes."""
    units = {"k": 1 << 10, "m": MiB, "g": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].lower()]) if text[-1].lower() in units else int(text)


def usr_files() -> Iterator[Path]:
    """Regular files under /usr, in a stable order (real data: code, text, compressed)."""
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            if p.is_file() and not p.is_symlink():
                yield p


def make_usr_data(path: Path, size: int, skip: int = 0) -> None:
    """`size` bytes of /usr files concatenated, after skipping the first `skip` bytes of them."""
    with open(path, "wb") as out:
        need = size
        for p in usr_files():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            if skip:
                cut = min(skip, len(data))
                data, skip = data[cut:], skip - cut
            if data:
                out.write(data[:need])
                need -= min(need, len(data))
            if not need:
                return
    raise RuntimeError(f"/usr holds fewer than {size} bytes of files")


def run(*cmd: str) -> None:
    """Run a command, raising with its output on failure."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stdout}{p.stderr}")


def qemu_io(image: str, commands: list[str], fmt: str = "qcow2") -> None:
    """Run qemu-io with the commands in batches (one process per batch keeps argv short)."""
    for i in range(0, len(commands), 64):
        run("qemu-io", "-f", fmt, *[a for c in commands[i:i + 64] for a in ("-c", c)], image)


def build(d: Path, size: int) -> None:
    """base.qcow2, base.raw (the same disk, raw), top.qcow2 over base.qcow2, top-raw.qcow2 over
    base.raw, and new.qcow2, as the module docstring describes."""
    half = size // 2
    make_usr_data(d / "base-src.raw", half)
    with open(d / "base-src.raw", "r+b") as f:
        f.truncate(size)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(d / "base-src.raw"), str(d / "base.qcow2"))
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", str(d / "base-src.raw"), str(d / "base.raw"))
    os.unlink(d / "base-src.raw")
    make_usr_data(d / "new-src.raw", size - size // 4, skip=half)
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(d / "base.qcow2"), str(d / "new.raw"))
    with open(d / "new.raw", "r+b") as f, open(d / "new-src.raw", "rb") as src:
        f.seek(size // 4)
        shutil.copyfileobj(src, f, 16 * MiB)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(d / "new.raw"), str(d / "new.qcow2"))
    for p in ("new-src.raw", "new.raw"):
        os.unlink(d / p)
    pieces = []
    for i in range(8):
        piece = d / f"piece{i}.bin"
        make_usr_data(piece, PIECE, skip=size + i * 7 * PIECE)
        pieces.append(piece)
    cmds = []
    for n, off in enumerate(range(0, size, SLOT)):
        kind = n % 4
        if kind in (0, 3):
            cmds.append(f"write -q -s {pieces[n % len(pieces)]} {off} {SLOT}")
        elif kind == 1:
            cmds.append(f"write -q -z {off} {SLOT}")
    for top, base, fmt in (("top.qcow2", "base.qcow2", "qcow2"), ("top-raw.qcow2", "base.raw", "raw")):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, str(d / top))
        qemu_io(str(d / top), cmds)
    for piece in pieces:
        os.unlink(piece)


def library_call(key: str, d: Path) -> None:
    """The case as a call of the library in this interpreter (what the CLI runs, without
    interpreter start-up and imports)."""
    import qcowdisk
    if key == "commit":
        qcowdisk.commit(d / "top.qcow2")
    elif key == "commit-raw":
        qcowdisk.commit(d / "top-raw.qcow2", drop=True)
    else:
        qcowdisk.rebase(d / "top.qcow2", "new.qcow2", backing_format="qcow2")


CASES = {  # key: (row name, arguments of both tools, the chain ("=": only read, so linked), images that must then read the same)
    "commit": ("commit", ["commit", "-q", "top.qcow2"], ["base.qcow2", "top.qcow2"], ["base.qcow2", "top.qcow2"]),
    "commit-raw": ("commit -d, raw base", ["commit", "-q", "-d", "top-raw.qcow2"], ["base.raw", "top-raw.qcow2"],
                   ["base.raw"]),
    "rebase": ("rebase (safe)", ["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
               ["=base.qcow2", "top.qcow2", "=new.qcow2"], ["top.qcow2"]),
}


def fresh(src: Path, dst: Path, names: list[str]) -> None:
    """Copy the chain's files (sparse) into `dst`, replacing what is there; names starting with
    "=" are only read by the case, so they are linked, not copied."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    for name in names:
        if name.startswith("="):
            os.symlink(src / name[1:], dst / name[1:])
        else:
            run("cp", "--sparse=always", str(src / name), str(dst / name))
    # The copy's dirty pages written back now, untimed: otherwise their writeback lands on
    # whichever tool runs next, at random.
    os.sync()


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, user + system CPU seconds) of one whole process."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    t = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read() if p.stderr else b""
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {err.decode(errors='replace')}")
    return t, usage.ru_utime + usage.ru_stime


def bench_rows(size: int = 1 << 30, workdir: str | None = None, repeat: int = 3, inputs: str | None = None,
               only: str | None = None) -> list[Row]:
    """Build the inputs (or take them from `inputs`, made by --build-only), time each case (or
    the one named `only`) for both tools; rows (case, qcowdisk s, qemu-img s, ratio)."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t = Path(tmp)
        src = Path(inputs) if inputs else t / "src"
        if not inputs:
            src.mkdir()
            build(src, size)
        clean = CleanPython(t / "python")  # the qcowdisk command as installed (see cleanpython.py)
        for key, (name, args, chain, results) in CASES.items():
            if only and key != only:
                continue
            wall = {"qcowdisk": float("inf"), "qemu-img": float("inf"), "start-up": float("inf"),
                    "in-process": float("inf")}
            cpu = dict(wall)
            for _ in range(repeat):
                w, c = timed([clean.python, "-c", "import qcowdisk.cli"], t, clean.env)
                wall["start-up"], cpu["start-up"] = min(wall["start-up"], w), min(cpu["start-up"], c)
                for tool, cmd, env in (("qcowdisk", [clean.qcowdisk], clean.env), ("qemu-img", ["qemu-img"], None)):
                    fresh(src, t / tool, chain)
                    w, c = timed([*cmd, *args], t / tool, env)
                    wall[tool], cpu[tool] = min(wall[tool], w), min(cpu[tool], c)
                fresh(src, t / "in-process", chain)
                t0 = time.monotonic()
                library_call(key, t / "in-process")
                wall["in-process"] = min(wall["in-process"], time.monotonic() - t0)
            shutil.rmtree(t / "in-process")
            for r in results:
                fmt = "raw" if r.endswith(".raw") else "qcow2"
                run("qemu-img", "compare", "-f", fmt, "-F", fmt, str(t / "qcowdisk" / r), str(t / "qemu-img" / r))
            for tool in ("qcowdisk", "qemu-img"):
                shutil.rmtree(t / tool)
            rows.append((name, wall["qcowdisk"], wall["qemu-img"], wall["qemu-img"] / wall["qcowdisk"]))
            rows.append((f"  {name} (in-process)", wall["in-process"], wall["qemu-img"],
                         wall["qemu-img"] / wall["in-process"]))
            rows.append((f"  {name} (cpu)", cpu["qcowdisk"], cpu["qemu-img"], cpu["qemu-img"] / cpu["qcowdisk"]))
            own = max(cpu["qcowdisk"] - cpu["start-up"], 1e-3)  # the operation's share of the CPU time
            rows.append((f"  {name} (cpu, less start-up)", own, cpu["qemu-img"], cpu["qemu-img"] / own))
    return rows


def render(rows: list[Row]) -> str:
    """The rows as a small table."""
    lines = [f"{'case':<36} {'qcowdisk s':>10} {'qemu-img s':>10} {'ratio':>6}"]
    lines += [f"{c:<36} {q:>10.2f} {r:>10.2f} {x:>6.2f}" for c, q, r, x in rows]
    return "\n".join(lines)


def main() -> int:
    """Parse the options, run, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--build-only", metavar="DIR", help="only build the inputs into DIR (for profiling)")
    ap.add_argument("--inputs", metavar="DIR", help="use the inputs --build-only made in DIR")
    ap.add_argument("--only", metavar="CASE", help="run only one case: commit, commit-raw or rebase")
    args = ap.parse_args()
    size = parse_size(args.size)
    if args.build_only:
        os.makedirs(args.build_only, exist_ok=True)
        build(Path(args.build_only), size)
        return 0
    rows = bench_rows(size, args.dir, args.repeat, args.inputs, args.only)
    print(f"chain: {size / MiB:.0f} MiB, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          "ratio = qemu-img s / qcowdisk s")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
