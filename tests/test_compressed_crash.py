"""Crash safety of compressed writes: after flush() returns, a power cut or a kill loses nothing
written before it, and `qemu-img check` finds no corruption (leaks at most).

Same attack as tests/test_crash.py, with compressed writes in the workload: every host op of a
seeded guest workload is recorded at the HostFile seam (tests/crashsim.py); at the cut points
the image is rebuilt as the disk would hold it (last fsync + all / none / random / torn subsets
of the unsynced writes) and judged by qemu-img check, qemu-img convert (QEMU's guest view) and a
read-only QcowFile, against a model of the guest disk. The workloads write compressed clusters
fresh (packed several per host cluster, crossing host clusters with 512-byte clusters, a padded
short last cluster), replace them again and again, and mix them with ordinary writes,
write_zeroes and punch_hole over the same clusters; with lazy refcounts, extended L2, zstd, and
with the automatic release of queued frees made frequent. A mutant without the L2 cache's
ordering edges shows the judge catches a payload or refcount that is not durable before its
entry. Real SIGKILLs of a child writing the same workloads complete the picture.

Every failure names the workload, the cut (log index, the host op before it), the subset, the
last guest flush that had returned and the guest op in flight. Run with -s to see the counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import crashsim as cs
from crashsim import CrashLog, GuestModel, GuestOp
from qcowdisk import QcowFile
from qemutools import assert_clean

SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("torn", 2)]
SLOW_SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("random", 3), ("random", 5), ("torn", 2), ("torn", 4)]

_WORDS = [b"cluster", b"refcount", b"table", b"guest", b"host", b"offset", b"qcow2", b"payload",
          b"deflate", b"zstd", b"zero", b"the", b"of", b"\n", b"0x1f00", b"L2"]


# --------------------------------------------------------------------------------------------
# Workloads: crashsim's guest ops plus "cwrite" (a compressed write of whole clusters)

def cluster_data(seed: int, length: int, cluster_size: int) -> bytes:
    """Bytes for a compressed write: per cluster text (compresses well), noise (stored
    uncompressed), zeros or one repeated byte (tiny payloads), seeded."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < length:
        kind = rng.random()
        if kind < 0.6:
            piece = b" ".join(rng.choices(_WORDS, k=cluster_size // 4 + 1))[:cluster_size]
        elif kind < 0.75:
            piece = rng.randbytes(cluster_size)
        elif kind < 0.85:
            piece = bytes(cluster_size)
        else:
            piece = bytes([rng.randrange(256)]) * cluster_size
        out += piece
    return bytes(out[:length])


def op_data(op: GuestOp, cluster_size: int) -> bytes:
    """What a write or cwrite op writes (both processes regenerate it from the seed)."""
    if op[0] == "cwrite":
        return cluster_data(op[3], op[2], cluster_size)
    return cs.guest_data(op)


@dataclass(frozen=True)
class CWorkload:
    """A seeded guest workload with compressed writes on a freshly created image."""

    name: str
    cluster_size: int
    virtual_size: int
    seed: int
    count: int
    max_cuts: int
    weights: tuple[float, float, float, float] = (0.55, 0.25, 0.1, 0.1)  # cwrite, write, zero, punch
    span_clusters: int = 24          # clusters the ops concentrate on (so they replace each other)
    lazy: bool = False
    extended_l2: bool = False
    compression_type: str = "zlib"
    refcount_bits: int = 16
    auto_release_frees: int = 0      # > 0: compressed writes flush once this many frees are queued


def make_ops(wl: CWorkload, count: int | None = None, close: bool = True) -> list[GuestOp]:
    """Compressed writes (aligned, 1-4 clusters, sometimes the disk's short last cluster),
    ordinary writes (unaligned: copy-on-write of compressed clusters), write_zeroes, punch_hole,
    concentrated on a few regions (the start, an L2 table boundary, the end of the disk); a
    flush every 1-4 ops, a final flush and a close."""
    rng = random.Random(wl.seed)
    cs_, vsize = wl.cluster_size, wl.virtual_size
    entries = cs_ // (16 if wl.extended_l2 else 8)
    l2_reach = cs_ * entries
    span = wl.span_clusters * cs_
    regions = [(0, min(span, vsize))]
    if l2_reach < vsize:
        regions.append((max(0, l2_reach - span // 2), min(span, vsize - l2_reach + span // 2)))
    last_cluster = (vsize - 1) // cs_ * cs_
    regions.append((max(0, last_cluster + cs_ - span // 2), vsize - max(0, last_cluster + cs_ - span // 2)))
    ops: list[GuestOp] = []
    until_flush = rng.randint(1, 4)
    for _ in range(wl.count if count is None else count):
        start, length_span = regions[rng.randrange(len(regions))]
        kind = rng.choices(["cwrite", "write", "zero", "punch"], wl.weights)[0]
        if kind == "cwrite":
            first = -(-start // cs_) * cs_
            off = first + rng.randrange(max(1, (start + length_span - first) // cs_)) * cs_
            off = min(off, last_cluster)
            length = min(rng.randint(1, 4) * cs_, vsize - off)  # a short tail only at the disk's end
        else:
            off = start + rng.randrange(length_span)
            length = rng.randint(1, 3 * cs_) if rng.random() < 0.7 else rng.randint(1, 4) * cs_
            off = min(off, vsize - 1)
            length = max(1, min(length, vsize - off))
        ops.append((kind, off, length, rng.getrandbits(64)))
        until_flush -= 1
        if until_flush == 0:
            ops.append(("flush", 0, 0, 0))
            until_flush = rng.randint(1, 4)
    if not ops or ops[-1][0] != "flush":
        ops.append(("flush", 0, 0, 0))
    if close:
        ops.append(("close", 0, 0, 0))
    return ops


class CModel(GuestModel):
    """crashsim's guest model, also applying cwrite ops (with their compressible data)."""

    def __init__(self, virtual_size: int, cluster_size: int) -> None:
        super().__init__(virtual_size)
        self.cluster_size = cluster_size

    def writes(self, op: GuestOp) -> bool:
        """cwrite writes too."""
        return op[0] == "cwrite" or super().writes(op)

    def op_data(self, op: GuestOp) -> bytes | None:
        """cwrite leaves op_data's bytes."""
        return op_data(op, self.cluster_size) if op[0] == "cwrite" else super().op_data(op)


def run_ops(disk: QcowFile, ops: Sequence[GuestOp], cluster_size: int, log: CrashLog | None = None,
            on_flush: Callable[[int], None] | None = None) -> None:
    """crashsim.run_guest_ops, with cwrite -> write_compressed."""
    def cwrite(d: QcowFile, op: GuestOp) -> None:
        d.write_compressed(op[1], op_data(op, cluster_size))
    cs.run_guest_ops(disk, ops, log, on_flush, handlers={"cwrite": cwrite})


WORKLOADS = [
    # fresh payloads only, packed; 512-byte clusters cross host clusters and L2 tables often
    CWorkload("fresh-c512", 512, (2 << 20) + 3 * 512, seed=21, count=28, max_cuts=36,
              weights=(1.0, 0, 0, 0), span_clusters=400),
    # the same clusters compressed over and over (and their old payloads freed at flushes)
    CWorkload("replace-c4k", 4096, 16 << 20, seed=22, count=28, max_cuts=36, weights=(0.9, 0.1, 0, 0),
              span_clusters=10),
    # compressed, ordinary, zeroing and punching over the same clusters
    CWorkload("mixed-c64k", 65536, (64 << 20) + 32768, seed=23, count=24, max_cuts=36),
    CWorkload("mixed-c512-zstd", 512, 4 << 20, seed=24, count=28, max_cuts=30, compression_type="zstd",
              span_clusters=64),
    CWorkload("mixed-extl2", 16384, 32 << 20, seed=25, count=24, max_cuts=30, extended_l2=True),
    CWorkload("mixed-lazy", 4096, 16 << 20, seed=26, count=24, max_cuts=30, lazy=True),
    # queued frees released by the compressed writes themselves, several times per workload
    CWorkload("autorelease", 4096, 8 << 20, seed=27, count=26, max_cuts=30, weights=(0.85, 0.15, 0, 0),
              span_clusters=8, auto_release_frees=3),
    CWorkload("refcount2", 4096, 8 << 20, seed=28, count=20, max_cuts=24, refcount_bits=2, span_clusters=12),
]
IDS = [w.name for w in WORKLOADS]
BIG = {w.name: CWorkload(w.name + "-big", w.cluster_size, w.virtual_size, w.seed + 100, w.count * 4, max_cuts=10**9,
                         weights=w.weights, span_clusters=w.span_clusters, lazy=w.lazy, extended_l2=w.extended_l2,
                         compression_type=w.compression_type, refcount_bits=w.refcount_bits,
                         auto_release_frees=w.auto_release_frees) for w in WORKLOADS}


# --------------------------------------------------------------------------------------------
# Recording

@contextlib.contextmanager
def auto_release(wl: CWorkload) -> Iterator[None]:
    """Make the compressed writes release queued frees (a flush) after `wl.auto_release_frees`."""
    from qcowdisk.qcow2 import ordering
    saved = ordering.FREE_PILE_MIN, ordering.FREE_PILE_BYTES
    if wl.auto_release_frees:
        ordering.FREE_PILE_MIN, ordering.FREE_PILE_BYTES = wl.auto_release_frees, 0
    try:
        yield
    finally:
        ordering.FREE_PILE_MIN, ordering.FREE_PILE_BYTES = saved


def create_image(wl: CWorkload, image: str) -> None:
    QcowFile.create(image, wl.virtual_size, cluster_size=wl.cluster_size, lazy_refcounts=wl.lazy,
                    extended_l2=wl.extended_l2, compression_type=wl.compression_type,
                    refcount_bits=wl.refcount_bits).close()


def record_workload(wl: CWorkload, workdir: str) -> cs.GuestRecording:
    """Create the image (outside the log), then run the ops with every host op recorded."""
    image = os.path.join(workdir, "disk.qcow2")
    create_image(wl, image)
    assert_clean(image)
    initial = Path(image).read_bytes()
    ops = make_ops(wl)
    log = CrashLog()
    log.snapshot_initial(image)
    with auto_release(wl):
        disk = QcowFile.open(image, host_factory=log.factory())
        run_ops(disk, ops, wl.cluster_size, log)
    model = CModel(wl.virtual_size, wl.cluster_size).apply_all(ops)
    return cs.GuestRecording(wl, workdir, image, log, ops, model, cs.cut_contexts(log), initial, Path(image).read_bytes())


TOTALS: Counter = Counter()
_print_totals = cs.totals_fixture(TOTALS, lambda t: f"[compressed crash totals] cut points={t['cuts']} states checked="
                                  f"{t['states']} distinct images={t['images']} sigkills={t['kills']}")
recorded = cs.recording_fixture(record_workload)


# --------------------------------------------------------------------------------------------
# Judging crashed images (crashsim.GuestJudge: qemu-img check, QEMU's and qcowdisk's views)

def compressed_clusters(exam: cs.GuestExam) -> int:
    """How many compressed clusters qemu-img check counted in the image."""
    return int(exam.check.get("compressed-clusters", 0))


def run_cuts(rec: cs.GuestRecording, cuts: list[int], subsets: list[cs.Subset], label: str) -> cs.Tally:
    """Materialise and judge every (cut, subset); returns the tally (its summary printed)."""
    t = rec.sweep(cuts, subsets, TOTALS)
    most = max((compressed_clusters(rec.exams[k]) for k in t.keys), default=0)  # in one state
    t.summary = (f"[compressed crash {rec.wl.name} {label}] {rec.log_counts()} "
                 f"{t.counts(f'max compressed clusters={most}')}")
    print(t.summary)
    return t


# --------------------------------------------------------------------------------------------
# Simulated power cuts

@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_workload_sanity(recorded, wl: CWorkload) -> None:
    """The log reproduces the file, the uncrashed image matches the model, checks clean and
    holds compressed clusters (so the findings below are about ordering, not plain bugs)."""
    rec = recorded(wl)
    exam = rec.assert_uncrashed_matches_model()
    assert compressed_clusters(exam) > 0, "the workload left no compressed cluster"
    assert sum(1 for op in rec.ops if op[0] == "cwrite") >= 8
    # Freed clusters are punched when queued frees are released: inside a compressed write only
    # by its automatic release (a flush of its own).
    inner = 0
    in_cwrite = False
    for op in rec.log.ops:
        if op.kind == "mark":
            in_cwrite = op.label[0] == "start" and rec.ops[op.label[1]][0] == "cwrite"
        elif op.kind == "punch" and in_cwrite:
            inner += 1
    assert (inner > 0) == bool(wl.auto_release_frees), f"{inner} clusters released inside compressed writes"


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_flush_returns_only_when_durable(recorded, wl: CWorkload) -> None:
    """When flush()/close() returns, no write to the image is still waiting for an fsync."""
    rec = recorded(wl)
    problems = [f"after guest #{j} (log {i}): {len(pending)} unsynced ops, first {pending[0].describe()}"
                for i, j, pending in cs.unsynced_when(rec.log, [rec.image], "flushed") if pending]
    assert not problems, f"{wl.name}: " + "\n".join(problems[:8])


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_none_at_every_op(recorded, wl: CWorkload) -> None:
    """A cut at EVERY log index keeping none of the unsynced writes (exhaustive: only fsyncs
    change this state): nothing flushed is lost, the image is never corrupt."""
    rec = recorded(wl)
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), ["none"], "none@every-op")
    assert t.cuts == len(rec.log.ops) + 1
    t.assert_none()


@pytest.mark.parametrize("wl", WORKLOADS, ids=IDS)
def test_power_cut_sampled(recorded, wl: CWorkload) -> None:
    """Cuts around every fsync and returned flush plus random ones, each with all / none / a
    random subset / a random subset torn into sectors."""
    rec = recorded(wl)
    t = run_cuts(rec, cs.select_cuts(rec.log, wl.max_cuts, wl.seed), SUBSETS, "sampled")
    assert t.states >= 2 * t.cuts
    t.assert_none()


@pytest.mark.slow
@pytest.mark.parametrize("name", IDS)
def test_power_cut_exhaustive(tmp_path, name: str) -> None:
    """Bigger workloads, every cut point, seven subsets each."""
    rec = record_workload(BIG[name], str(tmp_path))
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), SLOW_SUBSETS, "exhaustive")
    t.assert_none()


def test_judge_catches_missing_ordering_edges(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: the L2 cache loses its edges to guest data and refcounts, so a descriptor may be
    written before its payload and counts are durable. The same judge must find that."""
    from qcowdisk.qcow2 import ordering

    def without_l2_edges(state: Any, refcounts: Any) -> None:
        state.l1.depend_on(state.l2_cache)
        refcounts.frees_depend_on(state.l2_cache)
        refcounts.frees_depend_on(state.l1)
    monkeypatch.setattr(ordering, "declare_write_order", without_l2_edges)
    wl = CWorkload("mutant", 4096, 8 << 20, seed=29, count=12, max_cuts=10**9, weights=(1.0, 0, 0, 0), span_clusters=16)
    rec = record_workload(wl, str(tmp_path))
    monkeypatch.undo()
    t = run_cuts(rec, list(range(len(rec.log.ops) + 1)), [("random", 1), ("random", 3), "none"], "mutant")
    assert t.by_category, "the judge found nothing wrong with L2 tables that outran their payloads and counts: " \
        + t.summary


# --------------------------------------------------------------------------------------------
# Real SIGKILL

def child_main(image: str, fields_json: str) -> None:
    """The killed child: the image and the json CWorkload fields. Prints 'FLUSHED j' after each
    flush() returns and 'DONE' at the end (crashsim.kill_guest_writer's protocol)."""
    fields = json.loads(fields_json)
    wl = CWorkload(**{**fields, "weights": tuple(fields["weights"])})
    disk = QcowFile.open(image)
    with auto_release(wl):
        run_ops(disk, make_ops(wl), wl.cluster_size, on_flush=lambda j: cs.report_line(f"FLUSHED {j}"))
    cs.report_line("DONE")


def sigkill_run(tmp_path: Path, wl: CWorkload, kill_seed: int) -> list[str]:
    """Kill a writer after a seeded number of reported flushes (and a seeded delay, so it dies
    mid-write as often as not); judge the image as the crash states above."""
    image = str(tmp_path / "k.qcow2")
    create_image(wl, image)
    ops = make_ops(wl)
    model = CModel(wl.virtual_size, wl.cluster_size).apply_all(ops)
    rng = random.Random(kill_seed)
    target = rng.randint(1, sum(1 for op in ops if op[0] in ("flush", "close")) - 1)
    delay = rng.choice([0.0, 0.0005, 0.002, 0.005, 0.02])
    fields = {k: getattr(wl, k) for k in wl.__dataclass_fields__}
    w = cs.kill_guest_writer(cs.child_command("test_compressed_crash", image, json.dumps(fields)), ops, target, delay)
    if w.failure():
        return [w.failure() or ""]
    judge = cs.GuestJudge(model, wl.lazy)
    exam = judge.examine(image)
    found = judge.judge(exam, w.ctx)
    TOTALS.update(kills=1)
    ctx = f"{wl.name} kill seed {kill_seed}: killed after {len(w.flushed)} reported flushes (#{w.ctx.f}), delay {delay}s"
    print(f"[compressed sigkill] {ctx}; child {'finished' if w.done else 'killed'}; "
          f"compressed clusters {compressed_clusters(exam)}")
    return [f"{ctx}: {x}" for x in found]


KILL_CASES = [(WORKLOADS[1], 1), (WORKLOADS[3], 3), (WORKLOADS[6], 4)]


@pytest.mark.parametrize("wl,kill_seed", KILL_CASES, ids=[f"{w.name}-{k}" for w, k in KILL_CASES])
def test_sigkill_loses_nothing_flushed(tmp_path, wl: CWorkload, kill_seed: int) -> None:
    """SIGKILL a compressed writer after its n-th reported flush: no corruption (leaks at most),
    everything up to the last reported flush reads back in QEMU and qcowdisk."""
    problems = sigkill_run(tmp_path, BIG[wl.name], kill_seed)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.slow
@pytest.mark.parametrize("kill_seed", range(100, 124))
def test_sigkill_many(tmp_path, kill_seed: int) -> None:
    """Two dozen more kills over every workload shape."""
    wl = BIG[WORKLOADS[kill_seed % len(WORKLOADS)].name]
    problems = sigkill_run(tmp_path, wl, kill_seed)
    assert not problems, "\n".join(problems[:10])
