"""Crash safety of internal snapshots: create, apply and delete under simulated power cuts
(tests/crashsim.py: a cut at every log point, unsynced writes dropped: all, none, random
subsets, random subsets torn into sectors) and under a real SIGKILL.

A workload is a list of operations on one open image: guest writes (each followed by a
flush), `create_snapshot`, `apply_snapshot`, `delete_snapshot`, and a close. The model keeps
the state after every operation (the active disk and every snapshot's disk). Every operation
is durable when it returns, so a cut after operation k completed and while k+1 was running
must leave state k or state k+1:

- the snapshot list is exactly that of state k or of state k+1, and every listed snapshot reads
  (qcowdisk, and QEMU's export on a sample) as in that state;
- the active disk is state k's or state k+1's as a whole when k+1 is a snapshot operation (an
  apply switches it in one header write), and each 512-byte sector is one or the other when k+1
  is a guest write;
- `qemu-img check` finds no corruption beyond one known, harmless kind (next paragraph), at
  most leaks; a lazy-refcount image is repaired by a read-write qcowdisk open first and must then
  be entirely clean.

The known kind: a refcount and the COPIED flag of the entry naming that cluster live in
different clusters, so they cannot change in one write, and qemu-img check counts a mismatch
either way as a corruption. qcowdisk orders the writes so that the only mismatch a cut can
leave is COPIED set on an entry whose count is 2 while it has one reference (a leak): such a
state is accepted only if `qemu-img check -r leaks` turns it into an entirely clean image.
These states are counted and printed ("COPIED-window").
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import crashsim as cs
from crashsim import CrashLog
from qcowdisk import QcowFile
from qemutools import assert_clean, create, qemu_img, qemu_io, write_raw

SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("torn", 2), *cs.HEADER_TEARS]
SLOW_SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("random", 3), ("random", 5), ("torn", 2), ("torn", 4)]
SECTOR = 512

Op = tuple  # ("write", offset, length, seed) | ("create"|"apply"|"delete", name) | ("close",)


# --------------------------------------------------------------------------------------------
# Workloads and their model

@dataclass(frozen=True)
class Workload:
    name: str
    options: str
    size: int
    cluster: int
    seed: int
    lazy: bool = False
    rounds: int = 1       # repetitions of the operation pattern (bigger for the slow sweep)
    export_every: int = 4  # QEMU exports every snapshot of one distinct image in this many


WORKLOADS = [
    Workload("c4k", "cluster_size=4k", 8 * 1024 * 1024, 4096, seed=1),
    Workload("c64k-extl2-zstd", "cluster_size=64k,extended_l2=on,compression_type=zstd", 4 * 1024 * 1024, 65536, seed=2),
    Workload("lazy", "cluster_size=4k,lazy_refcounts=on", 8 * 1024 * 1024, 4096, seed=3, lazy=True),
    Workload("v2-c512", "compat=0.10,cluster_size=512", 1024 * 1024, 512, seed=4),
]
IDS = [w.name for w in WORKLOADS]


def make_ops(wl: Workload) -> list[Op]:
    """Writes across L2 tables (whole clusters and partial ones, which copy on write), and every
    snapshot operation: creates, applies of older and newer snapshots, deletes."""
    rng = random.Random(wl.seed)
    l2_span = wl.cluster * (wl.cluster // (16 if "extended_l2=on" in wl.options else 8))

    def write() -> Op:
        table = rng.randrange(max(1, min(4, wl.size // l2_span)))
        base = table * l2_span
        span = min(l2_span, wl.size - base)
        if rng.random() < 0.5:
            off = base + rng.randrange(span // wl.cluster) * wl.cluster
            length = min(rng.randint(1, 3) * wl.cluster, wl.size - off)
        else:
            off = base + rng.randrange(span - 1)
            length = min(rng.randint(1, 2 * wl.cluster), wl.size - off)
        return ("write", off, length, rng.getrandbits(32))

    ops: list[Op] = []
    for r in range(wl.rounds):
        a, b, c = f"a{r}", f"b{r}", f"c{r}"
        ops += [write(), ("create", a), write(), write(), ("create", b), write(), ("delete", a),
                write(), ("apply", b), write(), ("create", c), ("apply", b), ("delete", b), write()]
        if r + 1 < wl.rounds:
            ops.append(("delete", c))
    ops.append(("close",))
    return ops


@dataclass
class State:
    """The guest-visible state after an operation."""

    active: bytes
    snaps: dict[str, bytes]

    def names(self) -> list[str]:
        return list(self.snaps)


def model_states(initial: State, ops: list[Op]) -> list[State]:
    """states[i + 1] is the state after ops[i]; states[0] the initial one."""
    states = [initial]
    for op in ops:
        cur = states[-1]
        active, snaps = cur.active, dict(cur.snaps)
        if op[0] == "write":
            _, off, length, seed = op
            buf = bytearray(active)
            buf[off:off + length] = random.Random(seed).randbytes(length)
            active = bytes(buf)
        elif op[0] == "create":
            snaps[op[1]] = active
        elif op[0] == "apply":
            active = snaps[op[1]]
        elif op[0] == "delete":
            del snaps[op[1]]
        states.append(State(active, snaps))
    return states


def run_ops(disk: QcowFile, ops: list[Op], log: CrashLog | None = None, report=None) -> None:
    for i, op in enumerate(ops):
        if log is not None:
            log.mark(("start", i))
        if op[0] == "write":
            _, off, length, seed = op
            disk.write_at(off, random.Random(seed).randbytes(length))
            disk.flush()
        elif op[0] == "create":
            disk.create_snapshot(op[1])
        elif op[0] == "apply":
            disk.apply_snapshot(op[1])
        elif op[0] == "delete":
            disk.delete_snapshot(op[1])
        else:
            disk.close()
        if log is not None:
            log.mark(("end", i))
        if report is not None:
            report(i)


def make_image(wl: Workload, workdir: str) -> tuple[str, State]:
    """A QEMU-made image with data (compressed clusters too) and one QEMU-made snapshot."""
    image = os.path.join(workdir, "disk.qcow2")
    create(image, wl.size, options=wl.options)
    rng = random.Random(wl.seed * 7)
    data = rng.randbytes(3 * wl.cluster)
    write_raw(os.path.join(workdir, "d.bin"), data)
    cmds = [f"write -s {workdir}/d.bin {wl.cluster} {len(data)}"]
    comp = rng.randbytes(wl.cluster // 4) * 4
    write_raw(os.path.join(workdir, "c.bin"), comp)
    if "compat=0.10" not in wl.options:
        cmds.append(f"write -c -s {workdir}/c.bin {6 * wl.cluster} {wl.cluster}")
    qemu_io(image, *cmds)
    qemu_img("snapshot", "-c", "qemu", image)
    buf = bytearray(wl.size)
    buf[wl.cluster:wl.cluster + len(data)] = data
    if "compat=0.10" not in wl.options:
        buf[6 * wl.cluster:7 * wl.cluster] = comp
    assert_clean(image)
    return image, State(bytes(buf), {"qemu": bytes(buf)})


# --------------------------------------------------------------------------------------------
# Recording and judging

@dataclass
class Recorded:
    wl: Workload
    workdir: str
    image: str
    log: CrashLog
    ops: list[Op]
    states: list[State]
    exams: dict[str, Exam] = field(default_factory=dict)


@dataclass
class Exam:
    """What one distinct crashed image shows (independent of where the cut fell)."""

    findings: list[str]
    copied_window: bool
    names: list[str] | None
    active: bytes | None
    snaps: dict[str, bytes]


TOTALS: Counter = Counter()
_print_totals = cs.totals_fixture(TOTALS, lambda t: f"[snapshot crash totals] cut points={t['cuts']} states checked="
                                  f"{t['states']} distinct images={t['images']} COPIED-window states={t['copied_window']}")


def record(wl: Workload, workdir: str) -> Recorded:
    image, initial = make_image(wl, workdir)
    ops = make_ops(wl)
    log = CrashLog()
    log.snapshot_initial(image)
    disk = QcowFile.open(image, host_factory=log.factory())
    run_ops(disk, ops, log)
    return Recorded(wl, workdir, image, log, ops, model_states(initial, ops))


recorded = cs.recording_fixture(record)


_COPIED = re.compile(r"ERROR OFLAG_COPIED (?:data|L2) cluster: (?:l1_index=\d+ )?l[12]_entry=([0-9a-f]+) refcount=(\d+)")


def judge_check(path: str) -> tuple[list[str], bool]:
    """qemu-img check's verdict: (findings, whether the state is in the COPIED window)."""
    p = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True, check=False)
    if p.returncode in (0, 3):
        return [], False
    out = p.stdout + p.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("ERROR") or "check-errors" in ln or "failed" in ln]
    bad = []
    for ln in errors:
        m = _COPIED.match(ln)
        if m is None or not int(m.group(1), 16) >> 63 or int(m.group(2)) < 2:
            bad.append(ln)
    if bad or p.returncode != 2 or not errors:
        return [f"CORRUPTION: qemu-img check exit {p.returncode}: " + "; ".join((bad or errors or [out])[:4])], False
    fixed = path + ".fixed"
    shutil.copy(path, fixed)
    subprocess.run(["qemu-img", "check", "-q", "-r", "leaks", fixed], capture_output=True, check=False)
    after = subprocess.run(["qemu-img", "check", fixed], capture_output=True, text=True, check=False)
    os.unlink(fixed)
    if after.returncode != 0:
        return [f"CORRUPTION: COPIED mismatch that -r leaks does not cure: {(after.stdout + after.stderr)[:300]}"], False
    return [], True


def examine(rec: Recorded, data: bytes, key: str, export: bool) -> Exam:
    if key in rec.exams:
        return rec.exams[key]
    path = os.path.join(rec.workdir, "state.qcow2")
    with open(path, "wb") as f:
        f.write(data)
    findings: list[str] = []
    names: list[str] | None = None
    active: bytes | None = None
    snaps: dict[str, bytes] = {}
    try:
        with QcowFile.open(path, readonly=True) as disk:
            names = [s.name for s in disk.snapshots]
            active = disk.read_at(0, disk.virtual_size)
        for name in names:
            with QcowFile.open(path, readonly=True, snapshot=name) as disk:
                snaps[name] = disk.read_at(0, disk.virtual_size)
    except Exception as e:  # noqa: BLE001 - any failure to read a crash state is a finding
        findings.append(f"QCOWDISK-READ-ERROR: {type(e).__name__}: {e}")
    window = False
    if rec.wl.lazy and int.from_bytes(data[72:80], "big") & 1:
        found_static = cs.repair_on_open(path)
        found_static += cs.check_findings(cs.qemu_check(path), repaired=True,
                                          what="after qcowdisk's repair-on-open, qemu-img check")
        findings += [f"{f.category}: {f.detail}" for f in found_static]
    else:
        found, window = judge_check(path)
        findings += found
    if export and names is not None:
        raw = os.path.join(rec.workdir, "state.raw")
        for name in [None, *names]:
            err = cs.qemu_export(path, raw, *(() if name is None else ("-l", f"snapshot.name={name}")))
            if err is not None:
                findings.append(f"QEMU-READ-ERROR ({name or 'active'}): {err[:200]}")
                continue
            with open(raw, "rb") as f:
                got = f.read(rec.wl.size)
            want = active if name is None else snaps.get(name)
            if got != want:
                findings.append(f"QEMU-DIFFERS: QEMU reads {name or 'the active disk'} unlike qcowdisk")
            os.unlink(raw)
    exam = Exam(findings, window, names, active, snaps)
    rec.exams[key] = exam
    return exam


def context(rec: Recorded, cut: int) -> tuple[int, int | None]:
    """(operations completed before the cut, the operation running at the cut or None)."""
    done, running = 0, None
    for op in rec.log.ops[:cut]:
        if op.kind == "mark":
            if op.label[0] == "start":
                running = op.label[1]
            elif op.label[0] == "end":
                done, running = op.label[1] + 1, None
    return done, running


def judge(rec: Recorded, exam: Exam, cut: int) -> list[str]:
    done, running = context(rec, cut)
    out = list(exam.findings)
    if exam.names is None or exam.active is None:
        return out
    old = rec.states[done]
    new = rec.states[done + 1] if running is not None else None
    candidates = [old] + ([new] if new is not None else [])
    matching = [s for s in candidates if s.names() == exam.names]
    if not matching:
        return [*out, f"SNAPSHOT-LIST: {exam.names}, want {[c.names() for c in candidates]}"]
    op = rec.ops[running] if running is not None else ("none",)
    for st in matching:
        problems = [f"SNAPSHOT-DATA: {n} differs" for n in exam.names if exam.snaps.get(n) != st.snaps[n]]
        if op[0] == "write" and new is not None:
            if not sectors_old_or_new(exam.active, old.active, new.active):
                problems.append("ACTIVE: a sector is neither before nor after the running write")
        elif exam.active not in [c.active for c in candidates]:
            problems.append("ACTIVE: the active disk is neither the state before nor after "
                            f"{op[0]} (cut in an operation: {running is not None})")
        if not problems:
            return out
    return out + problems


def sectors_old_or_new(got: bytes, old: bytes, new: bytes) -> bool:
    if got in (old, new):
        return True
    for s in range(0, len(got), SECTOR):
        g = got[s:s + SECTOR]
        if g != old[s:s + SECTOR] and g != new[s:s + SECTOR]:
            return False
    return True


def run_cuts(rec: Recorded, cuts: list[int], subsets: list[cs.Subset], label: str) -> cs.Tally:
    """Materialise and judge every (cut, subset); returns the tally (its summary printed)."""
    window_keys: set[str] = set()

    def judge_state(exam: Exam, st: cs.CrashState) -> list[str]:
        if exam.copied_window:
            window_keys.add(st.key)
        return judge(rec, exam, st.cut)

    def where(st: cs.CrashState) -> str:
        done, running = context(rec, st.cut)
        op = rec.ops[running] if running is not None else None
        return f"{rec.wl.name} {cs.describe_cut(rec.log, st.cut)}, subset {st.subset}, {done} ops done, running {op}"
    t = cs.judge_states(cs.crash_states(rec.log, [rec.image], cuts, subsets), rec.exams,
                        lambda st: examine(rec, st.data, st.key, export=len(rec.exams) % rec.wl.export_every == 0),
                        judge_state, where, TOTALS)
    TOTALS.update(copied_window=len(window_keys))
    host = sum(1 for op in rec.log.ops if op.kind != "mark")
    fsyncs = sum(1 for op in rec.log.ops if op.kind == "fsync")
    t.summary = (f"[snapshot crash {rec.wl.name} {label}] {len(rec.ops)} operations, {host} host ops, {fsyncs} fsyncs; "
                 f"{t.counts(f'COPIED-window states={len(window_keys)}')}")
    print(t.summary)
    return t


# --------------------------------------------------------------------------------------------
# The tests

@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_uncrashed_run_matches_model(recorded, wl: Workload) -> None:
    """Without a crash the image is clean and every state reads as the model says."""
    rec = recorded(wl)
    assert cs.materialise(rec.log.initial[os.path.abspath(rec.image)], rec.log.ops, rec.image,
                          len(rec.log.ops), "all") == Path(rec.image).read_bytes()
    assert_clean(rec.image)
    exam = examine(rec, Path(rec.image).read_bytes(), "final", export=True)
    assert not exam.findings and exam.names == rec.states[-1].names()
    assert not judge(rec, exam, len(rec.log.ops))


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_snapshot_ops_durable_when_they_return(recorded, wl: Workload) -> None:
    """When create/apply/delete_snapshot returns, nothing it wrote is waiting for an fsync."""
    rec = recorded(wl)
    problems = [f"{rec.ops[j]}: {len(pending)} unsynced, first {pending[0].describe()}"
                for _, j, pending in cs.unsynced_when(rec.log, [rec.image], "end") if pending]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_every_point(recorded, wl: Workload) -> None:
    """A cut at every log point, with all / none / a random subset / a torn random subset of the
    unsynced writes surviving: the image is state k or k+1, and never corrupt."""
    rec = recorded(wl)
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), SUBSETS, "every cut")
    assert t.cuts == len(rec.log.ops) + 1
    t.assert_none(examples=12)


def test_checks_can_fail(recorded, tmp_path: Path) -> None:
    """The judge has teeth: a log without fsyncs loses a completed operation, and a snapshot
    whose L2 table is counted once too few is reported corrupt."""
    rec = recorded(WORKLOADS[0])
    log = CrashLog()
    log.initial = dict(rec.log.initial)
    log.ops = [op for op in rec.log.ops if op.kind != "fsync"]
    mutant = Recorded(rec.wl, str(tmp_path), rec.image, log, rec.ops, rec.states)
    t = run_cuts(mutant, [len(log.ops) - 2], ["none"], "mutant: fsyncs dropped")
    assert t.findings, "dropping every fsync went unnoticed"
    image = str(tmp_path / "m.qcow2")
    shutil.copy(rec.image, image)
    found, _ = judge_check(image)
    assert not found
    data = bytearray(Path(image).read_bytes())
    l1 = int.from_bytes(data[40:48], "big")
    l2 = int.from_bytes(data[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    rt = int.from_bytes(data[48:56], "big")
    block = int.from_bytes(data[rt:rt + 8], "big")
    idx = l2 // rec.wl.cluster
    count = int.from_bytes(data[block + 2 * idx:block + 2 * idx + 2], "big")
    data[block + 2 * idx:block + 2 * idx + 2] = (count - 1).to_bytes(2, "big")
    Path(image).write_bytes(bytes(data))
    found, _ = judge_check(image)
    assert found and "CORRUPTION" in found[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", IDS)
def test_power_cut_every_point_big(tmp_path: Path, name: str) -> None:
    """Three rounds of every operation, every cut, seven subsets, QEMU exports of every state."""
    base = next(w for w in WORKLOADS if w.name == name)
    wl = Workload(base.name + "-big", base.options, base.size, base.cluster, base.seed + 100, base.lazy,
                  rounds=3, export_every=1)
    rec = record(wl, str(tmp_path))
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), SLOW_SUBSETS, "every cut, big")
    t.assert_none(examples=12)


# --------------------------------------------------------------------------------------------
# Real SIGKILL

def child_main(image: str, params: str) -> None:
    """The killed child: run the workload (json Workload fields), print 'DONE i' as each
    operation returns."""
    wl = Workload(**json.loads(params))
    disk = QcowFile.open(image)
    run_ops(disk, make_ops(wl), report=lambda i: cs.report_line(f"DONE {i}"))


KILLS = [(WORKLOADS[0], 5, 0.0), (WORKLOADS[0], 9, 0.003), (WORKLOADS[1], 12, 0.001), (WORKLOADS[3], 7, 0.0)]


@pytest.mark.parametrize("wl,after,delay", KILLS, ids=[f"{w.name}-after{a}" for w, a, _ in KILLS])
def test_sigkill(tmp_path: Path, wl: Workload, after: int, delay: float) -> None:
    """SIGKILL a process doing snapshot operations after its n-th returned operation: the image
    is in the state after that operation or the next one, and not corrupt."""
    problems = sigkill_run(tmp_path, wl, after, delay)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(40))
def test_sigkill_many(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    wl = rng.choice(WORKLOADS)
    wl = Workload(wl.name, wl.options, wl.size, wl.cluster, wl.seed, wl.lazy, rounds=3)
    problems = sigkill_run(tmp_path, wl, rng.randrange(1, 40), rng.choice([0.0, 0.0005, 0.002, 0.01]))
    assert not problems, "\n".join(problems)


def sigkill_run(tmp_path: Path, wl: Workload, after: int, delay: float) -> list[str]:
    workdir = str(tmp_path)
    image, initial = make_image(wl, workdir)
    ops = make_ops(wl)
    states = model_states(initial, ops)
    params = {"name": wl.name, "options": wl.options, "size": wl.size, "cluster": wl.cluster, "seed": wl.seed,
              "lazy": wl.lazy, "rounds": wl.rounds}
    killed = cs.run_and_kill(cs.child_command("test_snapshot_crash", image, json.dumps(params)),
                             lambda lines: int(lines[-1].split()[1]) + 1 >= after, delay)
    done = int(killed.lines[-1].split()[1]) if killed.lines else -1
    if not killed.ok:
        return [f"child failed (exit {killed.returncode}):\n{killed.stderr[-2000:]}"]
    completed = done + 1
    # The child may have finished the next operation without printing it; never more.
    log = CrashLog()
    log.ops = [cs.Op("mark", label=("end", completed - 1))] if completed else []
    if completed < len(ops):
        log.ops.append(cs.Op("mark", label=("start", completed)))
    rec = Recorded(wl, workdir, image, log, ops, states)
    exam = examine(rec, Path(image).read_bytes(), "killed", export=True)
    found = judge(rec, exam, len(log.ops))
    print(f"[snapshot sigkill] {wl.name}: killed after {completed} returned operations "
          f"(next {ops[completed] if completed < len(ops) else 'none'}), delay {delay}s; "
          f"COPIED window: {exam.copied_window}; findings {len(found)}")
    return [f"{wl.name} killed after {completed} ops: {f}" for f in found]
