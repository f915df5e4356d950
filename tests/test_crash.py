"""Crash safety: after flush() returns, a kill or a power cut loses nothing written before it,
and `qemu-img check` reports no corruption (leaks at most).

Two attacks:
- Simulated power cuts (tests/crashsim.py): every host op of a seeded guest workload is
  recorded at the HostFile seam; at sampled cut points the image is rebuilt as it would be on
  disk (last fsync + all / none / random / torn subsets of the unsynced writes) and checked by
  qemu-img check, qemu-img convert (the oracle's guest view) and a read-only QcowFile.
- Real SIGKILLs of a child process writing through QcowFile and reporting each completed flush.

Every failure names the workload, the cut point (log index and the host op before it), the
subset, the last guest flush that had returned and the guest op in flight.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import crashsim as cs
from crashsim import CHUNK, CrashLog, CutWalker, GuestModel, RecordingHost
from qcowdisk import QcowFile
from qemutools import assert_clean, check, qemu_img, write_raw

SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("torn", 2)]
SLOW_SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("random", 3), ("random", 5),
                                 ("torn", 2), ("torn", 4)]
MAX_EXAMPLES = 6


# --------------------------------------------------------------------------------------------
# Workloads

@dataclass(frozen=True)
class Workload:
    """A seeded guest workload on a freshly created image."""

    name: str
    cluster_size: int
    virtual_size: int
    seed: int
    count: int
    max_cuts: int                  # sampled cut points in the unmarked run
    refcount_bits: int = 16
    lazy: bool = False
    overlay: bool = False
    grow_reftable: bool = False    # write enough to outgrow the first refcount table


WORKLOADS = [
    Workload("c64k", 65536, 1 << 30, seed=11, count=36, max_cuts=80),
    Workload("c512", 512, 4 << 20, seed=12, count=50, max_cuts=80),
    Workload("c512-reftable", 512, 8 << 20, seed=13, count=12, max_cuts=60, refcount_bits=64,
             grow_reftable=True),
    Workload("lazy", 65536, 1 << 30, seed=14, count=30, max_cuts=50, lazy=True),
    Workload("overlay", 65536, 64 << 20, seed=15, count=36, max_cuts=70, overlay=True),
]
BIG = {w.name: Workload(w.name + "-big", w.cluster_size, w.virtual_size, w.seed + 100,
                        w.count * 4, max_cuts=10**9, refcount_bits=w.refcount_bits, lazy=w.lazy,
                        overlay=w.overlay, grow_reftable=w.grow_reftable) for w in WORKLOADS}
IDS = [w.name for w in WORKLOADS]


def make_backing(workdir: str, size: int, seed: int) -> tuple[str, bytes]:
    """A qemu-made qcow2 backing file with data in a few regions; returns (path, raw bytes)."""
    raw = bytearray(size)
    rng = random.Random(seed)
    for start, length in [(0, 2 << 20), (5 << 20, 300 * 1024), (size - (512 << 10), 512 << 10)]:
        raw[start:start + length] = rng.randbytes(length)
    raw_path = write_raw(os.path.join(workdir, "base.raw"), bytes(raw))
    base = os.path.join(workdir, "base.qcow2")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", raw_path, base)
    os.unlink(raw_path)
    return base, bytes(raw)


def record_workload(wl: Workload, workdir: str) -> cs.GuestRecording:
    """Create the image (outside the log: a fresh, closed image is the durable start), then run
    the guest ops through QcowFile.open(host_factory=...) with every host op recorded."""
    image = os.path.join(workdir, "disk.qcow2")
    base_bytes = None
    kwargs: dict = {"cluster_size": wl.cluster_size, "refcount_bits": wl.refcount_bits,
                    "lazy_refcounts": wl.lazy}
    if wl.overlay:
        backing, base_bytes = make_backing(workdir, wl.virtual_size, wl.seed)
        kwargs.update(backing_file=backing, backing_format="qcow2")
    QcowFile.create(image, wl.virtual_size, **kwargs).close()
    assert_clean(image)
    initial = Path(image).read_bytes()

    big = 0
    if wl.grow_reftable:
        # Host bytes the first refcount table can describe: clusters * entries * counts/block * cluster.
        _, rt_clusters = cs.header_reftable(initial)
        per_block = wl.cluster_size * 8 // wl.refcount_bits
        reach = rt_clusters * (wl.cluster_size // 8) * per_block * wl.cluster_size
        big = reach - len(initial) + 128 * 1024
        assert 0 < big <= wl.virtual_size - (1 << 20), (
            f"the created image's refcount table reaches {reach} host bytes: too far to outgrow "
            f"in an {wl.virtual_size}-byte disk (refcount_table_clusters={rt_clusters})")
    ops = cs.make_guest_ops(wl.seed, wl.virtual_size, wl.cluster_size, wl.count,
                            big_write=big, big_write_at=0)
    log = CrashLog()
    log.snapshot_initial(image)
    disk = QcowFile.open(image, host_factory=log.factory())
    cs.run_guest_ops(disk, ops, log)
    model = GuestModel(wl.virtual_size, base_bytes).apply_all(ops)
    final = Path(image).read_bytes()
    return cs.GuestRecording(wl, workdir, image, log, ops, model, cs.cut_contexts(log), initial, final)


TOTALS: Counter = Counter()  # crash points / states / distinct images judged in this module run
_print_totals = cs.totals_fixture(TOTALS, lambda t: f"[crash totals] cut points={t['cuts']} states checked="
                                  f"{t['states']} distinct images={t['images']}")
recorded = cs.recording_fixture(record_workload)


# --------------------------------------------------------------------------------------------
# Judging crash states (crashsim.GuestJudge: qemu-img check, QEMU's and qcowdisk's views)

def run_cuts(rec: cs.GuestRecording, cuts: list[int], subsets: list[cs.Subset], label: str) -> cs.Tally:
    """Materialise and judge every (cut, subset); returns the tally (its summary printed)."""
    t = rec.sweep(cuts, subsets, TOTALS)
    t.summary = f"[crash {rec.wl.name} {label}] {rec.log_counts()} {t.counts()}"
    print(t.summary)
    return t


# --------------------------------------------------------------------------------------------
# The simulator itself (fast, independent of the engine's correctness)

def test_crashsim_materialise_semantics(tmp_path) -> None:
    """RecordingHost logs exactly what reaches the file, and cut states follow the fsync rules."""
    path = str(tmp_path / "f.bin")
    write_raw(path, b"A" * 1024)
    log = CrashLog()
    h = RecordingHost(path, True, log=log)
    h.pwrite(b"B" * 600, 100)            # 0: unsynced
    h.fsync()                            # 1
    h.pwritev([b"C" * 10, memoryview(b"D" * 1000)], 1000)  # 2: extends, crosses sectors 512..2047
    log.mark(("flushed", 0))             # 3
    h.truncate(1500)                     # 4
    punched = h.punch_hole(0, 512)       # 5 (if supported)
    h.close()
    live = Path(path).read_bytes()
    initial = b"A" * 1024
    assert log.initial[os.path.abspath(path)] == initial
    assert cs.materialise(initial, log.ops, path, len(log.ops), "all") == live
    after_sync = bytearray(initial)
    after_sync[100:700] = b"B" * 600
    assert cs.materialise(initial, log.ops, path, 1, "none") == initial  # write not yet synced
    assert cs.materialise(initial, log.ops, path, 1, "all") == bytes(after_sync)
    assert cs.materialise(initial, log.ops, path, len(log.ops), "none") == bytes(after_sync)
    out = str(tmp_path / "state")
    cs.materialise(initial, log.ops, path, 3, "all", out)
    three = Path(out).read_bytes()
    assert len(three) == 2010 and three[1000:1010] == b"C" * 10 and three[1010:] == b"D" * 1000
    # Random subsets: some whole subset of the unsynced ops (after the fsync: write, truncate,
    # punch), applied in issue order.
    pending = [op for op in log.ops[2:] if op.kind != "mark"]
    whole = set()
    for mask in range(1 << len(pending)):
        buf = bytearray(after_sync)
        for i, op in enumerate(pending):
            if mask >> i & 1:
                cs.apply_op(buf, op)
        whole.add(bytes(buf))
    seen = {cs.materialise(initial, log.ops, path, len(log.ops), ("random", seed)) for seed in range(40)}
    assert seen <= whole and len(seen) >= 3
    walker = CutWalker(log, path)
    for cut in range(len(log.ops) + 1):
        walker.advance(cut)
        for sub in ("all", "none", ("random", 7), ("torn", 8)):
            assert walker.state(sub) == cs.materialise(initial, log.ops, path, cut, sub)
    ctx = cs.cut_contexts(log)
    assert ctx[3] == cs.CutContext(-1, -1) and ctx[4] == cs.CutContext(0, -1)
    assert (log.ops[-1].kind == "punch") == punched  # only a real punch is logged


def test_crashsim_torn_writes_keep_whole_sectors(tmp_path) -> None:
    """A torn write survives sector by sector: every 512-byte sector is old or new, never mixed."""
    path = str(tmp_path / "t.bin")
    write_raw(path, b"A" * 4096)
    log = CrashLog()
    h = RecordingHost(path, True, log=log)
    h.pwrite(b"N" * 2048, 1024)
    h.close()
    states = {cs.materialise(b"A" * 4096, log.ops, path, 1, ("torn", seed)) for seed in range(60)}
    for s in states:
        assert len(s) == 4096 and s[:1024] == b"A" * 1024 and s[3072:] == b"A" * 1024
        for sec in range(1024, 3072, 512):
            assert s[sec:sec + 512] in (b"A" * 512, b"N" * 512)
    assert any(b"A" * 512 in s[1024:3072] and b"N" * 512 in s[1024:3072] for s in states), "never torn"
    assert len(states) >= 6


def test_guest_model_rules() -> None:
    """The oracle accepts old-or-new per byte after the last flush and nothing else."""
    ops = [("write", 100, 1000, 1), ("flush", 0, 0, 0), ("write", 600, 200, 2), ("zero", 650, 10, 0)]
    m = GuestModel(4 * CHUNK).apply_all(ops)
    flushed = m.at(0, 1)
    assert cs.check_chunk(m, 0, flushed, 1, 3, "t", m.touched_between(1, 3)) is None
    assert cs.check_chunk(m, 0, m.at(0, 3), 1, 3, "t", m.touched_between(1, 3)) is None
    mixed = bytearray(m.at(0, 2))
    mixed[650:660] = bytes(10)           # op 3 landed, op 2 partly: each byte is some version
    mixed[600:610] = flushed[600:610]
    assert cs.check_chunk(m, 0, bytes(mixed), 1, 3, "t", m.touched_between(1, 3)) is None
    bad = bytearray(flushed)
    bad[150] ^= 0xFF                     # flushed byte lost
    f = cs.check_chunk(m, 0, bytes(bad), 1, 3, "t", m.touched_between(1, 3))
    assert f is not None and f.category == "LOST-FLUSHED" and "0x96" in f.detail
    bad = bytearray(flushed)
    bad[700] = (flushed[700] + 1) % 256 if (flushed[700] + 1) % 256 != m.at(0, 2)[700] else (flushed[700] + 2) % 256
    f = cs.check_chunk(m, 0, bytes(bad), 1, 3, "t", m.touched_between(1, 3))
    assert f is not None and f.category == "UNFLUSHED-GARBAGE"
    # Before the flush the first write is not promised: zeros are fine, as is the new data.
    assert cs.check_chunk(m, 0, bytes(CHUNK), -1, 0, "t", m.touched_between(-1, 0)) is None


# --------------------------------------------------------------------------------------------
# Simulated power cuts

@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_workload_sanity(recorded, wl: Workload) -> None:
    """The recorder saw every byte, and the uncrashed result matches the model (so crash
    findings below are about ordering, not about plain write bugs)."""
    rec = recorded(wl)
    assert rec.log.file_ops(rec.image) > 0, "no host op went through host_factory"
    rec.assert_uncrashed_matches_model()
    assert int.from_bytes(rec.final[72:80], "big") & 1 == 0, "dirty bit set after close()"
    l1_size, l1_offset = cs.header_l1(rec.final)
    entries = [int.from_bytes(rec.final[l1_offset + 8 * i:l1_offset + 8 * i + 8], "big") for i in range(l1_size)]
    used = sum(1 for e in entries if e & 0x00FFFFFFFFFFFE00)
    if wl.virtual_size > wl.cluster_size * (wl.cluster_size // 8):
        assert used >= 2, f"workload touched only {used} L2 table(s): it should cross L2 boundaries"
    if wl.grow_reftable:
        _, before = cs.header_reftable(rec.initial)
        _, after = cs.header_reftable(rec.final)
        assert after > before, f"refcount table did not grow ({before} -> {after} clusters)"


def test_checks_can_fail(recorded, tmp_path) -> None:
    """Mutants prove the judge has teeth: a log with its fsyncs removed loses flushed data, and an
    image whose first refcount block is wiped is reported corrupt."""
    rec = recorded(WORKLOADS[0])
    log = CrashLog()
    log.initial = dict(rec.log.initial)
    log.ops = [op for op in rec.log.ops if op.kind != "fsync"]
    mutant = cs.GuestRecording(rec.wl, str(tmp_path), rec.image, log, rec.ops, rec.model, cs.cut_contexts(log),
                      rec.initial, rec.final)
    t = run_cuts(mutant, [len(log.ops)], ["none"], "mutant: fsyncs dropped")
    assert t.by_category["LOST-FLUSHED"] > 0, t.summary
    rt_offset, _ = cs.header_reftable(rec.final)
    block = int.from_bytes(rec.final[rt_offset:rt_offset + 8], "big")
    wiped = bytearray(rec.final)
    wiped[block:block + rec.wl.cluster_size] = bytes(rec.wl.cluster_size)
    exam = mutant.examine(bytes(wiped), "wiped")
    assert any(f.category == "CORRUPTION" for f in exam.static), exam.static


def test_create_is_durable_when_it_returns(tmp_path) -> None:
    """QcowFile.create goes through host_factory, and nothing it wrote is unsynced when it returns."""
    path = str(tmp_path / "new.qcow2")
    log = CrashLog()
    disk = QcowFile.create(path, 1 << 30, cluster_size=4096, host_factory=log.factory())
    mark = log.mark(("created",))
    assert log.file_ops(path) > 0, "create bypassed host_factory"
    walker = CutWalker(log, path)
    walker.advance(mark)
    assert not walker.pending, f"create returned with unsynced writes: {walker.pending[0].describe()}"
    state = str(tmp_path / "durable.qcow2")
    write_raw(state, walker.state("none"))
    assert_clean(state)
    disk.write_at(12345, b"x" * 5000)
    disk.close()


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_flush_returns_only_when_durable(recorded, wl: Workload) -> None:
    """Ordering rule at the seam: when flush()/close() returns, no write to the image is still
    waiting for an fsync (the 'none' cut equals the 'all' cut there)."""
    rec = recorded(wl)
    flushes = 0
    problems = []
    for i, j, pending in cs.unsynced_when(rec.log, [rec.image], "flushed"):
        flushes += 1
        if pending:
            problems.append(f"after guest {cs.describe_guest_op(j, rec.ops[j])} returned (log {i}): "
                            f"{len(pending)} unsynced ops, first {pending[0].describe()}")
    assert flushes == sum(1 for g in rec.ops if g[0] in ("flush", "close"))
    assert not problems, f"{wl.name}: " + "\n".join(problems[:8])


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_none_at_every_op(recorded, wl: Workload) -> None:
    """Cut at EVERY log index keeping none of the unsynced writes: nothing flushed is lost and
    the image is never corrupt. (Only fsyncs change this state, so it is exhaustive and cheap.)"""
    rec = recorded(wl)
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), ["none"], "none@every-op")
    assert t.states >= 20 and t.cuts == len(rec.log.ops) + 1
    t.assert_none(examples=MAX_EXAMPLES)


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_sampled(recorded, wl: Workload) -> None:
    """Cuts around every fsync / returned flush plus random ones, each with all / none / a
    random subset / a random subset with writes torn into sectors."""
    rec = recorded(wl)
    cuts = cs.select_cuts(rec.log, wl.max_cuts, wl.seed)
    t = run_cuts(rec, cuts, SUBSETS, "sampled")
    assert t.cuts >= min(wl.max_cuts, len(rec.log.ops) + 1) and t.states >= 2 * t.cuts
    t.assert_none(examples=MAX_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("name", IDS)
def test_power_cut_exhaustive(tmp_path, name: str) -> None:
    """Bigger workloads, every cut point, seven subsets each."""
    rec = record_workload(BIG[name], str(tmp_path))
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), SLOW_SUBSETS, "exhaustive")
    assert t.cuts == len(rec.log.ops) + 1 and t.states >= 2 * t.cuts
    t.assert_none(examples=MAX_EXAMPLES)


@pytest.mark.parametrize("wl", [w for w in WORKLOADS if not w.lazy], ids=[w.name for w in WORKLOADS if not w.lazy])
def test_crashed_image_stays_writable(recorded, wl: Workload, tmp_path) -> None:
    """A crashed (leaky) image opened read-write by qcowdisk takes new writes without turning
    leaks into corruption (a leaked cluster must not be handed out twice)."""
    rec = recorded(wl)
    rng = random.Random(wl.seed)
    walker = CutWalker(rec.log, rec.image)
    cuts = sorted(rng.sample(range(len(rec.log.ops) + 1), min(12, len(rec.log.ops) + 1)))
    problems = []
    tried = 0
    for n, cut in enumerate(cuts):
        walker.advance(cut)
        path = str(tmp_path / f"w{n}.qcow2")
        with open(path, "wb") as f:
            f.write(walker.state(("random", n)))
        before = check(path)
        if before["returncode"] not in (0, 3) or before.get("corruptions", 0):
            continue  # already corrupt: the power-cut tests report this state
        if tried == 6:
            break
        tried += 1
        data = random.Random(n).randbytes(3 * wl.cluster_size + 17)
        off = rng.randrange(0, min(wl.virtual_size, 4 << 20) - len(data))
        try:
            with QcowFile.open(path) as disk:
                disk.write_at(off, data)
                disk.flush()
                assert disk.read_at(off, len(data)) == data
        except Exception as e:  # noqa: BLE001
            problems.append(f"cut {cut}: {type(e).__name__}: {e}")
            continue
        r = check(path)
        if r["returncode"] not in (0, 3) or r.get("corruptions", 0):
            problems.append(f"{rec.where(cut, ('random', n), len(walker.pending))}: clean before "
                            f"({cs.check_summary(before)}), after a new write at {off:#x}: {cs.check_summary(r)}")
        qemu_img("convert", "-O", "raw", path, path + ".raw")
        with open(path + ".raw", "rb") as f:
            if os.pread(f.fileno(), len(data), off) != data:
                problems.append(f"cut {cut}: qemu-img does not read back the data written after the crash")
        os.unlink(path + ".raw")
    assert tried >= 3, "too few uncorrupted crash states to test"
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# Real SIGKILL

@dataclass(frozen=True)
class KillCase:
    seed: int
    cluster_size: int
    virtual_size: int
    lazy: bool = False


KILL_CASES = [KillCase(1, 65536, 1 << 30), KillCase(2, 65536, 1 << 30), KillCase(3, 512, 4 << 20),
              KillCase(4, 512, 4 << 20), KillCase(5, 65536, 1 << 30, lazy=True), KillCase(6, 4096, 64 << 20)]


def sigkill_run(tmp_path, case: KillCase, count: int, max_target: int = 25) -> tuple[int, list[str]]:
    """Kill a writer after a seeded number of reported flushes (plus a seeded delay, so it dies
    mid-write as often as not); returns (last flush reported, problems)."""
    image = str(tmp_path / "k.qcow2")
    QcowFile.create(image, case.virtual_size, cluster_size=case.cluster_size, lazy_refcounts=case.lazy).close()
    params = {"seed": case.seed * 1000, "virtual_size": case.virtual_size, "cluster_size": case.cluster_size,
              "count": count}
    ops = cs.make_guest_ops(**params)
    model = GuestModel(case.virtual_size).apply_all(ops)
    flushes = sum(1 for op in ops if op[0] in ("flush", "close"))
    rng = random.Random(case.seed)
    target = rng.randint(1, min(flushes - 1, max_target))
    delay = rng.choice([0.0, 0.0005, 0.002, 0.005, 0.02])
    w = cs.kill_guest_writer(cs.child_command("crashsim", image, json.dumps(params)), ops, target, delay)
    if w.failure():
        return -1, [w.failure() or ""]
    f = w.ctx.f
    ctx = f"seed={case.seed} cluster={case.cluster_size} lazy={case.lazy} killed after {len(w.flushed)} " \
          f"reported flushes (last guest op flushed #{f}, delay {delay}s)"
    judge = cs.GuestJudge(model, case.lazy)
    problems = [f"{ctx}: {x}" for x in judge.judge(judge.examine(image), w.ctx)]
    print(f"[sigkill] {ctx}; child {'finished' if w.done else 'killed'}; guest ops {len(ops)}, "
          f"{len(model.all_chunks())} chunks compared")
    return f, problems


def test_run_and_kill_keeps_the_lines_read_ahead() -> None:
    """Lines a killed child printed before the kill reach the parent, even those its reader had
    already buffered when the kill fired (a loaded machine makes the parent slow: several
    FLUSHED lines wait at once). Losing them made the sigkill tests judge an image against an
    older flush than the child had reported, with ops after the lost flush already done."""
    child = ("import sys, time\nfor i in range(5):\n    sys.stdout.write(f'L {i}\\n'); sys.stdout.flush()\n"
             "sys.stderr.write('printed'); sys.stderr.flush()\ntime.sleep(60)\n")
    ready = [False]

    def kill_after(lines: list[str]) -> bool:
        if not ready[0]:  # let all five lines reach the pipe before the first is taken
            time.sleep(0.5)
            ready[0] = True
        return lines[-1] == "L 1"
    killed = cs.run_and_kill([sys.executable, "-c", child], kill_after, 0.0)
    assert killed.returncode == -signal.SIGKILL
    assert killed.lines == [f"L {i}" for i in range(5)]
    assert killed.stderr == "printed"


@pytest.mark.parametrize("case", KILL_CASES,
                         ids=[f"seed{c.seed}-c{c.cluster_size}{'-lazy' if c.lazy else ''}" for c in KILL_CASES])
def test_sigkill_loses_nothing_flushed(tmp_path, case: KillCase) -> None:
    """SIGKILL a writer after its n-th reported flush: the image checks clean (leaks at most)
    and everything up to the last reported flush reads back."""
    _flushed, problems = sigkill_run(tmp_path, case, count=400)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
def test_sigkill_many(tmp_path, seed: int) -> None:
    """Forty more kills over all cluster shapes."""
    r = random.Random(seed)
    case = KillCase(seed, r.choice([512, 4096, 65536]), 64 << 20, lazy=r.random() < 0.3)
    _, problems = sigkill_run(tmp_path, case, count=1500, max_target=300)
    assert not problems, "\n".join(problems[:10])
