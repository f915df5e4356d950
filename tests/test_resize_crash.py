"""Crash safety of resize: a power cut or a SIGKILL during a resize leaves the old image or the
new one (size and contents), never corruption (leaks at most), and loses nothing a returned
flush() or resize() covered.

The simulator is tests/crashsim.py's (see tests/test_crash.py): every host op of a workload is
recorded at the HostFile seam, and at each cut point the files are rebuilt as the disk would
hold them (last fsync, plus all / none / a random subset / a random subset torn into 512-byte
sectors of the writes issued since). The oracle is a list of guest states, one after each step
of the workload; a step is a write, a flush or a resize, and every resize is preceded by a
flush, so while a resize is in flight exactly two images are acceptable: the state before it
and the state after it. While a write is in flight, the size is that of the last durable state
and each byte is a version written since (or the durable one).

Workloads cover: growth with each preallocation mode (metadata, falloc, full), growth of the L1
table (512-byte clusters: the table moves, three header switches), growth without it, shrinking
(partial last cluster, whole L2 tables dropped, the file cut), an overlay grown over a longer
backing file (zero clusters written before the size switch), a raw external data file (cut and
extended), lazy refcounts (repaired on open), and an image with an internal snapshot (shared L2
tables copied or dropped). Each judged image is checked by `qemu-img check`, read by `qemu-img
convert` and by a read-only QcowFile.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import crashsim as cs
from crashsim import CrashLog
from qcowdisk import QcowFile

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512

Step = tuple[str, int, int]
"""("write", offset, length) | ("flush", 0, 0) | ("resize", new_size, how): how is an index
into HOW (grow, shrink, or grow with a preallocation mode)."""
HOW = ("grow", "shrink", "grow-metadata", "grow-falloc", "grow-full")


# --------------------------------------------------------------------------------------------
# Workloads and the oracle

@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    options: str
    plan: tuple[tuple[str, int], ...]   # ("grow"/"shrink", new size) and ("write", seed) entries
    backing: bool = False               # an overlay over a longer qcow2 backing file
    data_file: bool = False             # a raw external data file (data_file_raw)
    lazy: bool = False
    snapshot: bool = False              # an internal snapshot taken by qemu-img first
    max_cuts: int = 120                 # sampled cuts for all / random / torn


def _writes(seed: int, size: int, count: int = 3) -> list[Step]:
    """A few seeded writes inside [0, size): unaligned, across cluster and L2 boundaries."""
    rng = random.Random(seed)
    out: list[Step] = []
    for _ in range(count):
        length = rng.choice([SECTOR, 3000, 65536, 200 * KiB])
        length = min(length, size)
        off = rng.randrange(0, size - length + 1)
        out.append(("write", off, length))
    return out


def make_steps(wl: Workload) -> list[Step]:
    """The deterministic step list (the SIGKILLed child rebuilds the same one)."""
    steps: list[Step] = []
    size = wl.size
    for kind, arg in wl.plan:
        if kind == "write":
            steps += _writes(arg, size)
            steps.append(("flush", 0, 0))
        else:
            steps.append(("flush", 0, 0))  # a resize never starts with unflushed writes in flight
            steps.append(("resize", arg, HOW.index(kind)))
            size = arg
    return steps


def step_data(j: int, length: int) -> bytes:
    return random.Random(1000 + j).randbytes(length)


def guest_states(initial: bytes, steps: list[Step]) -> list[bytes]:
    """states[j + 1] is the guest disk after step j; states[0] the initial one."""
    cur = bytearray(initial)
    states = [bytes(cur)]
    for j, (kind, a, b) in enumerate(steps):
        if kind == "write":
            cur[a:a + b] = step_data(j, b)
        elif kind == "resize":
            if a < len(cur):
                del cur[a:]
            else:
                cur.extend(bytes(a - len(cur)))
        states.append(bytes(cur))
    return states


def run_steps(disk: QcowFile, steps: list[Step], log: CrashLog | None = None,
              report: Callable[[int], None] | None = None) -> None:
    """Apply the steps, marking ("start", j) / ("flushed", j) / ("end", j); a resize counts as
    flushed when it returns (it is durable then)."""
    for j, (kind, a, b) in enumerate(steps):
        if log is not None:
            log.mark(("start", j))
        if kind == "write":
            disk.write_at(a, step_data(j, b))
        else:
            if kind == "flush":
                disk.flush()
            else:
                disk.resize(a, shrink=HOW[b] == "shrink", preallocation=HOW[b].partition("-")[2] or "off")
            if log is not None:
                log.mark(("flushed", j))
            if report is not None:
                report(j)
        if log is not None:
            log.mark(("end", j))


WORKLOADS = [
    Workload("c512-l1", 1 * MiB, "cluster_size=512",
             (("write", 1), ("grow", 6 * MiB), ("write", 2), ("shrink", 1 * MiB + 512 * 3), ("write", 3),
              ("grow", 4 * MiB), ("shrink", 700 * KiB))),
    Workload("c4k-l1", 2 * MiB, "cluster_size=4096",
             (("write", 4), ("grow", 9 * MiB), ("write", 5), ("shrink", 1 * MiB + 4096), ("grow", 3 * MiB),
              ("write", 6))),
    Workload("c64k", 2 * MiB, "cluster_size=65536",
             (("write", 15), ("grow", 7 * MiB + 512), ("write", 16), ("shrink", 1 * MiB + 4096), ("grow", 3 * MiB))),
    Workload("overlay-extl2", 1 * MiB, "extended_l2=on,cluster_size=65536",
             (("write", 7), ("grow", 1 * MiB + 100 * KiB), ("grow", 5 * MiB + 2048), ("write", 8),
              ("shrink", 2 * MiB + 512)), backing=True),
    Workload("data-file-raw", 1 * MiB, "cluster_size=4096",
             (("write", 9), ("grow", 3 * MiB), ("write", 10), ("shrink", 300 * KiB + 512), ("grow", 2 * MiB)),
             data_file=True),
    Workload("lazy", 1 * MiB, "cluster_size=4096,lazy_refcounts=on",
             (("write", 11), ("grow", 9 * MiB), ("write", 12), ("shrink", 2 * MiB + 512), ("grow", 3 * MiB)),
             lazy=True, max_cuts=60),
    Workload("prealloc-c4k", 1 * MiB, "cluster_size=4096",
             (("write", 17), ("grow-metadata", 5 * MiB + 512), ("write", 18), ("grow-falloc", 7 * MiB),
              ("shrink", 3 * MiB), ("grow-full", 4 * MiB)), max_cuts=80),
    Workload("prealloc-extl2-overlay", 1 * MiB, "extended_l2=on,cluster_size=65536",
             (("write", 19), ("grow-metadata", 3 * MiB + 1024), ("write", 20), ("grow-full", 4 * MiB)),
             backing=True, max_cuts=60),
    Workload("snapshot", 2 * MiB, "cluster_size=4096",
             (("write", 13), ("shrink", 1 * MiB + 1536), ("write", 14), ("grow", 5 * MiB)), snapshot=True),
]
IDS = [w.name for w in WORKLOADS]


@dataclass
class Recorded:
    wl: Workload
    workdir: str
    image: str
    data_file: str | None
    log: CrashLog
    steps: list[Step]
    states: list[bytes]
    contexts: list[cs.CutContext]
    exams: dict[str, tuple[list[str], int, bytes | None, bytes | None]] = field(default_factory=dict)


def qemu(cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A QEMU tool run in `cwd` (QEMU 7.2 opens a relative data file name from the working directory)."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=True)


def make_image(wl: Workload, workdir: str) -> tuple[str, str | None, bytes]:
    """The workload's starting image (made by QEMU): (image, data file or None, guest contents)."""
    image = os.path.join(workdir, "disk.qcow2")
    options = wl.options
    data_file = None
    below = bytes(wl.size)
    if wl.backing:
        qemu(workdir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M")
        qemu(workdir, "qemu-io", "-c", "write -P 0xbb 0 8M", "base.qcow2")
        qemu(workdir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "-b", "base.qcow2", "-F", "qcow2",
             "disk.qcow2", str(wl.size))
        below = b"\xbb" * wl.size
    else:
        if wl.data_file:
            options += ",data_file=disk.data,data_file_raw=on"
            data_file = os.path.join(workdir, "disk.data")
        qemu(workdir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "disk.qcow2", str(wl.size))
    qemu(workdir, "qemu-io", "-c", f"write -P 0x5a 0 {wl.size // 2}", "disk.qcow2")
    if wl.snapshot:
        qemu(workdir, "qemu-img", "snapshot", "-c", "s1", "disk.qcow2")
    return image, data_file, b"\x5a" * (wl.size // 2) + below[wl.size // 2:]


def record(wl: Workload, workdir: str) -> Recorded:
    image, data_file, initial = make_image(wl, workdir)
    steps = make_steps(wl)
    log = CrashLog()
    log.snapshot_initial(image)
    if data_file is not None:
        log.snapshot_initial(data_file)
    disk = QcowFile.open(image, host_factory=log.factory())
    run_steps(disk, steps, log)
    disk.close()
    log.mark(("closed",))
    return Recorded(wl, workdir, image, data_file, log, steps, guest_states(initial, steps), cs.cut_contexts(log))


TOTALS: Counter[str] = Counter()
_print_totals = cs.totals_fixture(TOTALS, lambda t: (
    f"[resize crash totals] cut points={t['cuts']} states checked={t['states']} distinct images={t['images']} "
    f"old={t['old']} new={t['new']} leaky={t['leaky']} sigkills={t['kills']} (during a resize: "
    f"{t['kill-in-resize']}, a write or flush: {t['kill-in-flush']}, after the end: {t['kill-in-none']})"))
recorded = cs.recording_fixture(record)


# --------------------------------------------------------------------------------------------
# Judging

def examine(rec: Recorded, files: dict[str, bytes], key: str) -> tuple[list[str], int, bytes | None, bytes | None]:
    """(static problems, virtual size, qemu view, qcowdisk view) of one crashed image (its files
    by path, written under their base names), cached."""
    if key in rec.exams:
        return rec.exams[key]
    d = os.path.join(rec.workdir, "state")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.mkdir(d)
    if rec.wl.backing:
        os.symlink(os.path.join(rec.workdir, "base.qcow2"), os.path.join(d, "base.qcow2"))
    for name, data in files.items():
        Path(d, os.path.basename(name)).write_bytes(data)
    path = os.path.join(d, "disk.qcow2")
    problems: list[cs.Finding] = []
    qcow_view = None
    try:
        with QcowFile.open(path, readonly=True) as disk:
            qcow_view = disk.read_at(0, disk.virtual_size)
    except Exception as e:  # noqa: BLE001 - any failure to read a crash state is a finding
        problems.append(cs.Finding("QCOWDISK-READ", f"{type(e).__name__}: {e}"))
    if rec.wl.lazy:
        problems += cs.repair_on_open(path)  # the dirty image's refcounts are rebuilt
    r = cs.qemu_check(path, cwd=d)
    problems += cs.check_findings(r, repaired=rec.wl.lazy)
    if r.get("leaks", 0):
        TOTALS["leaky"] += 1
    raw = os.path.join(rec.workdir, "state.raw")
    err = cs.qemu_export(path, raw, cwd=d)
    qemu_view = None
    if err is not None:
        problems.append(cs.Finding("QEMU-READ", err))
    else:
        qemu_view = Path(raw).read_bytes()
        os.unlink(raw)
    size = len(qemu_view) if qemu_view is not None else -1
    rec.exams[key] = ([f"{f.category}: {f.detail}" for f in problems], size, qemu_view, qcow_view)
    return rec.exams[key]


def judge_view(rec: Recorded, view: bytes, ctx: cs.CutContext, name: str, outcome: Counter[str] | None = None) -> list[str]:
    """The rules: a resize in flight -> exactly the state before or after it; otherwise the last
    durable state's size, with each byte some version written since. `outcome` counts which of
    the two a cut resize left ("old" / "new")."""
    f, j = ctx.f, ctx.j
    durable = rec.states[f + 1]
    if j == f + 1 and rec.steps[j][0] == "resize":  # a resize starts right after a flush
        after = rec.states[j + 1]
        for state, label in ((durable, "old"), (after, "new")):
            if view == state:
                if outcome is not None:
                    outcome[label] += 1
                return []
        return [f"{name}: resize #{j} in flight: the image ({len(view)} bytes) is neither the old one "
                f"({len(durable)}) nor the new one ({len(after)})"
                + _first_diff(view, durable if len(view) == len(durable) else after)]
    if len(view) != len(durable):
        return [f"{name}: size {len(view)}, the last durable state (step #{f}) has {len(durable)}"]
    if view == durable:
        return []
    versions = [rec.states[k + 1] for k in range(f, j + 1) if len(rec.states[k + 1]) == len(durable)]
    stray = cs.stray_byte(view, versions)
    if stray is None:
        return []
    i, allowed = stray
    kind = "LOST-FLUSHED" if len(allowed) == 1 else "GARBAGE"
    return [f"{name}: {kind} byte {i:#x} = {view[i]:#04x}, allowed {sorted(allowed)} "
            f"(durable step #{f}, last started #{j})"]


def _first_diff(a: bytes, b: bytes) -> str:
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return f"; first difference at {i:#x}"
    return ""


def run_cuts(rec: Recorded, cuts: list[int], subsets: list[cs.Subset], label: str = "") -> cs.Tally:
    """Materialise and judge every (cut, subset) of the image and its data file; with a
    `label`, print the sweep's counts."""
    def judge(exam: tuple[list[str], int, bytes | None, bytes | None], st: cs.CrashState) -> list[str]:
        problems, _size, qemu_view, qcow_view = exam
        ctx = rec.contexts[st.cut]
        found = list(problems)
        if qemu_view is not None:
            found += judge_view(rec, qemu_view, ctx, "qemu view", TOTALS)
        if qcow_view is not None:
            found += judge_view(rec, qcow_view, ctx, "qcowdisk view")
        return found
    paths = [rec.image] + ([rec.data_file] if rec.data_file else [])
    t = cs.judge_states(cs.crash_states(rec.log, paths, cuts, subsets), rec.exams,
                        lambda st: examine(rec, st.files, st.key), judge,
                        lambda st: f"{rec.wl.name} {cs.describe_cut(rec.log, st.cut)}, subset={st.subset}", TOTALS)
    t.summary = f"[resize crash {rec.wl.name} {label}] log={len(rec.log.ops)} cuts={t.cuts} states={t.states} images={t.images}"
    if label:
        print(t.summary)
    return t


def sample_cuts(rec: Recorded, max_cuts: int, seed: int) -> list[int]:
    """The cuts around every fsync and inside every resize, then random ones, up to max_cuts."""
    n = len(rec.log.ops)
    inside: set[int] = set()
    current = None
    for i, op in enumerate(rec.log.ops):
        if op.kind == "mark" and op.label[0] == "start":
            current = rec.steps[op.label[1]][0]
        if current == "resize" or op.kind == "fsync":
            inside.update((i, i + 1))
    rng = random.Random(seed)
    chosen = sorted(inside)
    if len(chosen) > max_cuts:
        chosen = sorted(rng.sample(chosen, max_cuts))
    rest = sorted(set(range(n + 1)) - set(chosen))
    return sorted(set(chosen) | set(rng.sample(rest, min(len(rest), max(0, max_cuts - len(chosen))))) | {n})


# --------------------------------------------------------------------------------------------
# Power cuts

@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_workload_sanity(recorded, wl: Workload) -> None:  # type: ignore[no-untyped-def]
    """The log reproduces the live files, and the uncrashed result is the last state."""
    rec = recorded(wl)
    for p in [rec.image] + ([rec.data_file] if rec.data_file else []):
        assert cs.materialise(rec.log.initial[os.path.abspath(p)], rec.log.ops, p, len(rec.log.ops), "all") == \
            Path(p).read_bytes(), f"a write to {p} bypassed the HostFile seam"
    assert sum(1 for s in rec.steps if s[0] == "resize") >= 2
    r = cs.qemu_check(rec.image, cwd=os.path.dirname(rec.image))
    assert r["returncode"] == 0 and not r.get("leaks"), r
    t = run_cuts(rec, [len(rec.log.ops)], ["all"])
    assert not t.findings, t.findings[:5]
    with QcowFile.open(rec.image, readonly=True) as d:
        assert d.read_at(0, d.virtual_size) == rec.states[-1]


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_resize_returns_only_when_durable(recorded, wl: Workload) -> None:  # type: ignore[no-untyped-def]
    """When resize() (or flush()) returns, nothing written to the image or its data file is
    still waiting for an fsync."""
    rec = recorded(wl)
    paths = [rec.image] + ([rec.data_file] if rec.data_file else [])
    problems = [f"step #{j} {rec.steps[j]}: {pending[0].describe()} unsynced"
                for _, j, pending in cs.unsynced_when(rec.log, paths, "flushed") if pending]
    assert not problems, problems[:5]


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_none_at_every_op(recorded, wl: Workload) -> None:  # type: ignore[no-untyped-def]
    """A cut at EVERY log index keeping none of the unsynced writes (only fsyncs change that
    state, so this is exhaustive)."""
    rec = recorded(wl)
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), ["none"], "none@every-op")
    t.assert_none(examples=8)


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_sampled(recorded, wl: Workload) -> None:  # type: ignore[no-untyped-def]
    """Cuts inside every resize and around every fsync, each with all / none / a random subset /
    a random subset torn into sectors of the unsynced writes."""
    rec = recorded(wl)
    cuts = sample_cuts(rec, wl.max_cuts, zlib.crc32(wl.name.encode()) & 0xFFFF)
    t = run_cuts(rec, cuts, ["all", "none", ("random", 1), ("torn", 2), *cs.HEADER_TEARS], "sampled")
    t.assert_none(examples=8)


@pytest.mark.slow
@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_exhaustive(recorded, wl: Workload) -> None:  # type: ignore[no-untyped-def]
    """Every cut point, seven subsets each."""
    rec = recorded(wl)
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)),
                 ["all", "none", ("random", 1), ("random", 3), ("random", 5), ("torn", 2), ("torn", 4)], "exhaustive")
    t.assert_none(examples=8)


def test_judge_has_teeth(recorded) -> None:  # type: ignore[no-untyped-def]
    """A size switched before the zeroing of the new area, or a shrink that drops data and is
    then cut before its size switch, is caught."""
    rec = recorded(WORKLOADS[0])
    j = next(i for i, s in enumerate(rec.steps) if s[0] == "resize" and not s[2])
    ctx = cs.CutContext(j - 1, j)
    mixed = rec.states[j + 1][:len(rec.states[j])]  # the new contents at the old size
    bad = bytearray(rec.states[j + 1])
    bad[len(rec.states[j]) + 5] = 1  # the new area not zeroed
    assert judge_view(rec, bytes(bad), ctx, "t")
    k = next(i for i, s in enumerate(rec.steps) if s[0] == "resize" and HOW[s[2]] == "shrink")
    cut_old = bytearray(rec.states[k])
    cut_old[len(rec.states[k + 1]) + 7] ^= 0xFF  # old size, data past the new end damaged
    assert judge_view(rec, bytes(cut_old), cs.CutContext(k - 1, k), "t")
    assert judge_view(rec, mixed + b"\x01", ctx, "t")  # neither size
    assert not judge_view(rec, rec.states[j], ctx, "t") and not judge_view(rec, rec.states[j + 1], ctx, "t")


# --------------------------------------------------------------------------------------------
# Real SIGKILL

def child_main(image: str, name: str) -> None:
    """Run a workload's steps, printing 'DONE j' after each flush or resize returns."""
    wl = next(w for w in KILL_WORKLOADS if w.name == name)
    disk = QcowFile.open(image)
    run_steps(disk, make_steps(wl), report=lambda j: cs.report_line(f"DONE {j}"))
    disk.close()
    cs.report_line("END")


KILL_WORKLOADS = [
    Workload("kill-c512", 1 * MiB, "cluster_size=512",
             tuple(x for k in range(6) for x in (("write", 20 + k), ("grow", (k + 2) * 3 * MiB),
                                                  ("shrink", (k + 1) * 1 * MiB + 1536)))),
    Workload("kill-c4k", 2 * MiB, "cluster_size=4096",
             tuple(x for k in range(6) for x in (("write", 40 + k), ("grow", (k + 2) * 5 * MiB + 512),
                                                  ("shrink", (k + 1) * MiB + 4096)))),
]


def sigkill_once(tmp_path: Path, wl: Workload, seed: int) -> tuple[str, list[str]]:
    image, _, initial = make_image(wl, str(tmp_path))
    steps = make_steps(wl)
    states = guest_states(initial, steps)
    rng = random.Random(seed)
    durable_steps = [j for j, s in enumerate(steps) if s[0] != "write"]
    # Aim at a resize: kill a seeded moment after the flush just before it returned.
    resizes = [j for j, s in enumerate(steps) if s[0] == "resize"]
    target_step = rng.choice(resizes) - 1
    delay = rng.choice([0.0, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.01])
    killed = cs.run_and_kill(cs.child_command("test_resize_crash", image, wl.name),
                             lambda lines: lines[-1].startswith("DONE ") and int(lines[-1].split()[1]) >= target_step,
                             delay, timeout=120)
    reports = [int(line.split()[1]) for line in killed.lines if line.startswith("DONE ")]
    done = reports[-1] if reports else -1
    if not killed.ok:
        return "", [f"child failed ({killed.returncode}): {killed.stderr[-2000:]}"]
    # The child may have finished steps it did not get to report: any up to the next durable one.
    later = [j for j in durable_steps if j > done]
    last = later[0] if later else len(steps) - 1
    rec = Recorded(wl, str(tmp_path), image, None, CrashLog(), steps, states, [])
    problems, _, qemu_view, qcow_view = examine(rec, {image: Path(image).read_bytes()}, "killed")
    found = list(problems)
    for view, name in ((qemu_view, "qemu view"), (qcow_view, "qcowdisk view")):
        if view is None:
            continue
        verdicts = [judge_view(rec, view, cs.CutContext(f, jj), name) for f in range(done, last + 1)
                    for jj in range(f, last + 1)]
        if all(verdicts):
            found.append(verdicts[0][0])
    in_flight = steps[last][0] if killed.returncode and last > done else "none (finished)"
    TOTALS[f"kill-in-{in_flight.split()[0]}"] += 1
    where = (f"{wl.name} seed {seed}: killed after step #{done} (delay {delay}s), next durable step #{last} "
             f"({in_flight})")
    return where, [f"{where}: {x}" for x in found]


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_during_resizes(tmp_path: Path, seed: int) -> None:
    """SIGKILL a process that alternates writes, flushes, grows and shrinks, at a seeded point:
    the image checks clean (leaks at most) and is exactly a state the steps it had started
    could leave."""
    wl = KILL_WORKLOADS[seed % len(KILL_WORKLOADS)]
    where, problems = sigkill_once(tmp_path, wl, seed)
    TOTALS["kills"] += 1
    print(f"[resize sigkill] {where}")
    assert not problems, "\n".join(problems[:5])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
def test_sigkill_many(tmp_path: Path, seed: int) -> None:
    wl = KILL_WORKLOADS[seed % len(KILL_WORKLOADS)]
    where, problems = sigkill_once(tmp_path, wl, seed)
    TOTALS["kills"] += 1
    print(f"[resize sigkill] {where}")
    assert not problems, "\n".join(problems[:5])


def test_child_steps_are_reproducible() -> None:
    """Parent and child rebuild the same steps from the workload alone."""
    for wl in KILL_WORKLOADS:
        assert make_steps(wl) == make_steps(wl)
        assert json.dumps(make_steps(wl))
