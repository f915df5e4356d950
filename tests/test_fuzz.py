"""Random-mutation fuzzing of the read path: only QcowError may escape, no hang, bounded memory.

Real qemu-made images (v2, v3, extended L2, zlib- and zstd-compressed, with snapshots, with a
backing file, 512-byte clusters) get bytes flipped or overwritten in their metadata (header
cluster, L1, L2, refcount table and blocks, snapshot table and L1s, compressed payloads) or
anywhere in the file, or get truncated. Each mutant is opened read-only and the whole disk read.

Cases run in a worker subprocess (this file run as a script) so that a runaway allocation hits
RLIMIT_AS there instead of taking the test run down, and a crash is attributable. Inside the
worker each case runs under a SIGALRM time bound and a tracemalloc peak bound. The parent
computes every mutation from a seed (printed on failure) and sends explicit byte patches, so
a failure is reproducible from its report alone:
    QCOWDISK_FUZZ_SEED=<seed> pytest tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER_FLAG = "--qcowdisk-fuzz-worker"
CASE_TIMEOUT = 10.0  # seconds per case inside the worker (SIGALRM)
PARENT_GRACE = 30.0  # extra seconds the parent waits before declaring the worker stuck
READ_CAP = 8 << 20  # read at most this much from the start of a mutant (sizes may be mutated huge)
READ_CHUNK = 1 << 20
MEMORY_BUDGET = 64 << 20  # tracemalloc peak per case, plus the image's size
AS_HEADROOM = 1 << 30  # RLIMIT_AS: the worker's size after imports plus this


# ================================================================ worker side (a subprocess)

class _CaseTimeout(BaseException):
    """Raised by SIGALRM in the worker; BaseException so `except Exception` in the engine cannot eat it."""


class _BadRead(AssertionError):
    """read_at returned the wrong number of bytes."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _CaseTimeout()


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _exercise(disk: Any) -> None:
    """Touch every public read-side property and read the whole (capped) disk."""
    size = disk.virtual_size
    if not isinstance(size, int) or size < 0:
        raise _BadRead(f"virtual_size {size!r}")
    _ = disk.cluster_size, disk.header, disk.snapshots, disk.backing
    cap = min(size, READ_CAP)
    pos = 0
    while pos < cap:
        n = min(READ_CHUNK, cap - pos)
        data = disk.read_at(pos, n)
        if len(data) != n:
            raise _BadRead(f"read_at({pos}, {n}) returned {len(data)} bytes (virtual size {size})")
        pos += n
    if size > cap:  # the far end, whose L1/L2 indices are the largest
        start = max(cap, size - 65536 - 100)
        data = disk.read_at(start, 65536)
        if len(data) != min(65536, size - start):
            raise _BadRead(f"read_at({start}, 65536) returned {len(data)} bytes (virtual size {size})")
    buf = bytearray(4096)
    n = disk.readinto_at(buf, 0)
    if n != min(4096, size):
        raise _BadRead(f"readinto_at(4096 bytes, 0) returned {n} (virtual size {size})")


def _run_case(job: dict[str, Any], qcow_file: Any, qcow_error: type, tracemalloc: Any) -> dict[str, Any]:
    scratch = job["scratch"]
    shutil.copyfile(job["image"], scratch)
    with open(scratch, "r+b") as f:
        for offset, hexdata in job["patches"]:
            f.seek(offset)
            f.write(bytes.fromhex(hexdata))
        if job.get("truncate") is not None:
            f.truncate(job["truncate"])
    image_size = os.path.getsize(scratch)
    result: dict[str, Any] = {"status": "ok", "detail": ""}
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    started = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, job.get("timeout", CASE_TIMEOUT))
        try:
            disk = qcow_file.open(scratch, readonly=True)
            try:
                _exercise(disk)
            finally:
                disk.close()
        except qcow_error as err:
            result = {"status": "qcowerror", "detail": f"{type(err).__name__}: {err}"}
        except _CaseTimeout:
            result = {"status": "hang", "detail": f"no answer within {job.get('timeout', CASE_TIMEOUT)} s"}
        except BaseException as err:  # noqa: BLE001 - the whole point: anything else is a finding
            result = {"status": "escaped", "detail": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _CaseTimeout:  # the alarm fired between the handlers and the reset
        result = {"status": "hang", "detail": "alarm during cleanup"}
    peak = tracemalloc.get_traced_memory()[1] - base
    result["peak"] = peak
    result["seconds"] = round(time.monotonic() - started, 3)
    if peak > MEMORY_BUDGET + image_size and result["status"] in ("ok", "qcowerror"):
        result = {**result, "status": "memory",
                  "detail": f"allocation peak {peak} bytes > budget {MEMORY_BUDGET + image_size} "
                            f"(then: {result['status']} {result['detail']})"}
    return result


def _worker_main() -> None:
    """Serve cases: one JSON job per stdin line, one JSON result per line on the original stdout."""
    import resource
    import tracemalloc

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the engine prints must not corrupt the result stream
    sys.stdout = sys.stderr
    from qcowdisk import QcowError, QcowFile

    limit = _vm_size() + AS_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGALRM, _on_alarm)
    tracemalloc.start()
    for line in sys.stdin:
        if not line.strip():
            continue
        result = _run_case(json.loads(line), QcowFile, QcowError, tracemalloc)
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    _worker_main()
    sys.exit(0)


# ================================================================ parent side (pytest)

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import imagepatch as ip  # noqa: E402
from qemutools import create, pattern, qemu_img, qemu_io, write_raw  # noqa: E402

REGION_KINDS = ["header", "l1", "l2", "reftable", "refblock", "snapshot_table", "snapshot_l1",
                "compressed", "anywhere"]
REGION_WEIGHTS = {"header": 4, "l1": 2, "l2": 3, "reftable": 1, "refblock": 1, "snapshot_table": 2,
                  "snapshot_l1": 1, "compressed": 2, "anywhere": 2}


class FuzzWorker:
    """A persistent worker subprocess; restarted when a case kills or wedges it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._start()

    def _start(self) -> None:
        self.starts += 1
        self.stderr_path = self.log_dir / f"worker-{self.starts}.stderr"
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER_FLAG],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=env, cwd=str(self.log_dir))
        self._buf = b""

    def _stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _readline(self, timeout: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one case; a dead or stuck worker becomes a 'crash'/'hang' result and is restarted."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
            line = self._readline(job.get("timeout", CASE_TIMEOUT) + PARENT_GRACE)
        except BrokenPipeError:
            line = None
        if line is not None:
            return json.loads(line)
        alive = self.proc.poll() is None
        exit_code = self.proc.returncode
        self.close()
        detail = self._stderr_tail()
        self._start()
        if alive:
            return {"status": "hang", "detail": "worker stuck past the SIGALRM bound (killed)\n" + detail}
        return {"status": "crash", "detail": f"worker died (exit {exit_code})\n{detail}"}

    def close(self) -> None:
        """Stop the worker process (it is ours: kill by its own pid)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@dataclass
class Target:
    """One pristine image to mutate, with its metadata map."""

    name: str
    path: str
    size: int
    regions: dict[str, list[tuple[int, int]]]

    def ranges(self, kind: str) -> list[tuple[int, int]]:
        """Byte ranges of a region kind ('anywhere' = the whole file)."""
        if kind == "anywhere":
            return [(0, self.size)]
        return self.regions.get(kind, [])


def _build_images(d: Path) -> dict[str, str]:
    """The pristine image set: every on-disk shape the read path knows."""
    def p(name: str) -> str:
        return str(d / f"{name}.qcow2")

    mixed = write_raw(str(d / "mixed.bin"), pattern(256 << 10, seed=5))
    images: dict[str, str] = {}

    images["v2"] = create(p("v2"), "2M", options="compat=0.10,cluster_size=4k")
    qemu_io(images["v2"], "write -P 0x11 0 64k", "write -P 0x12 1M 12k", f"write -s {mixed} 1536k 64k")

    images["v3"] = create(p("v3"), "4M", options="lazy_refcounts=on")
    qemu_io(images["v3"], "write -P 0x21 0 192k", "write -z 256k 64k", "write -P 0x22 1M 4k",
            "discard 64k 64k", f"write -s {mixed} 2M 256k")

    images["extl2"] = create(p("extl2"), "4M", options="extended_l2=on,cluster_size=64k")
    qemu_io(images["extl2"], "write -P 0x31 4k 4k", "write -P 0x32 64k 64k", "write -z 512k 8k",
            f"write -s {mixed} 1M 100k")

    for kind in ("zlib", "zstd"):
        img = create(p(kind), "2M", options=f"compression_type={kind},cluster_size=4k")
        qemu_io(img, "write -c -P 0x41 0 64k", f"write -c -s {mixed} 64k 64k", "write -P 0x42 512k 8k")
        images[kind] = img

    images["snapshot"] = create(p("snapshot"), "2M", options="cluster_size=4k")
    qemu_io(images["snapshot"], "write -P 0x51 0 64k", "write -P 0x52 1M 8k")
    qemu_img("snapshot", "-c", "first", images["snapshot"])
    qemu_io(images["snapshot"], "write -P 0x53 32k 16k")
    qemu_img("snapshot", "-c", "second", images["snapshot"])
    qemu_io(images["snapshot"], "write -P 0x54 1M 4k")

    base = create(str(d / "backing-base.qcow2"), "4M")
    qemu_io(base, "write -P 0x61 0 1M", f"write -s {mixed} 2M 256k")
    images["backing"] = create(p("backing"), "4M", backing=base, backing_fmt="qcow2")
    qemu_io(images["backing"], "write -P 0x62 64k 64k", "write -P 0x63 2M 4k")

    images["tiny"] = create(p("tiny"), "1M", options="cluster_size=512,refcount_bits=1")
    qemu_io(images["tiny"], "write -P 0x71 0 8k", "write -P 0x72 300k 3k", "write -P 0x73 900k 512")
    return images


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory):
    """(targets, worker, scratch dir) shared by the fuzz tests of this module."""
    d = tmp_path_factory.mktemp("fuzz")
    targets = []
    for name, path in _build_images(d).items():
        targets.append(Target(name, path, ip.file_size(path), ip.metadata_regions(path)))
    scratch = d / "scratch"
    scratch.mkdir()
    worker = FuzzWorker(scratch)
    try:
        yield targets, worker, scratch
    finally:
        worker.close()


# ---------------------------------------------------------------- mutation generation

def _interesting_u64(rng: random.Random, old: int, file_size: int) -> int:
    cluster_like = rng.randrange(0, max(1, 2 * file_size)) & ~0x1FF
    choices = [
        0, 1, (1 << 64) - 1, 1 << 63, 1 << 62, rng.getrandbits(64), old ^ (1 << rng.randrange(64)),
        cluster_like, cluster_like | 1 << 63, cluster_like + 0x200, (old & ~0x1FF) + 0x200,
        1 << 62 | rng.getrandbits(62), (1 << 56) - 512, file_size, file_size + 512, old + 1, old - 1,
    ]
    return rng.choice(choices) & ((1 << 64) - 1)


def _interesting_u32(rng: random.Random, old: int) -> int:
    choices = [0, 1, 2, 3, 4, 7, 8, 9, 21, 22, 64, 104, 108, 112, 1023, 1024, 65535, 65536, 65537,
               0x7FFFFFFF, 0xFFFFFFFF, rng.getrandbits(32), old + 1, old - 1, old ^ (1 << rng.randrange(32)),
               1 << rng.randrange(32)]
    return rng.choice(choices) & 0xFFFFFFFF


def _read(path: str, offset: int, length: int) -> bytes:
    data = ip.read_bytes(path, offset, length)
    return data + bytes(length - len(data))


def mutate(rng: random.Random, target: Target) -> tuple[list[tuple[int, bytes]], int | None, list[str]]:
    """Patches (offset, bytes), an optional truncation length, and a human description."""
    patches: list[tuple[int, bytes]] = []
    notes: list[str] = []
    truncate = None
    kinds = [k for k in REGION_KINDS if target.ranges(k)]
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        if rng.random() < 0.03:
            truncate = rng.randrange(0, target.size)
            notes.append(f"truncate to {truncate}")
            continue
        if rng.random() < 0.2:  # a named header field, the riskiest bytes of all
            name = rng.choice(list(ip.HEADER_FIELDS))
            offset, fmt = ip.HEADER_FIELDS[name]
            if fmt == "Q":
                old = int.from_bytes(_read(target.path, offset, 8), "big")
                value = _interesting_u64(rng, old, target.size).to_bytes(8, "big")
            elif fmt == "I":
                old = int.from_bytes(_read(target.path, offset, 4), "big")
                value = _interesting_u32(rng, old).to_bytes(4, "big")
            else:
                value = bytes([rng.getrandbits(8)]) if fmt == "B" else rng.randbytes(4)
            patches.append((offset, value))
            notes.append(f"header.{name} = 0x{value.hex()}")
            continue
        kind = rng.choices(kinds, weights=[REGION_WEIGHTS[k] for k in kinds])[0]
        start, length = rng.choice(target.ranges(kind))
        op = rng.choice(["bitflip", "byte", "u64", "u64", "u32", "chunk"])
        pos = start + rng.randrange(length)
        if op == "bitflip":
            old = _read(target.path, pos, 1)[0]
            value = bytes([old ^ (1 << rng.randrange(8))])
        elif op == "byte":
            value = bytes([rng.getrandbits(8)])
        elif op == "u64":
            pos = start + (rng.randrange(length) & ~7)
            old = int.from_bytes(_read(target.path, pos, 8), "big")
            value = _interesting_u64(rng, old, target.size).to_bytes(8, "big")
        elif op == "u32":
            pos = start + (rng.randrange(length) & ~3)
            old = int.from_bytes(_read(target.path, pos, 4), "big")
            value = _interesting_u32(rng, old).to_bytes(4, "big")
        else:
            value = rng.randbytes(rng.randrange(1, 65))
        patches.append((pos, value))
        notes.append(f"{kind}/{op} @0x{pos:x} = 0x{value.hex()[:32]}")
    return patches, truncate, notes


def _job(target: Target, scratch: Path, patches: list[tuple[int, bytes]], truncate: int | None) -> dict[str, Any]:
    return {"image": target.path, "scratch": str(scratch / f"mutant-{target.name}.qcow2"),
            "patches": [(off, data.hex()) for off, data in patches], "truncate": truncate,
            "timeout": CASE_TIMEOUT}


BAD = ("escaped", "hang", "crash", "memory")


def _run_campaign(fuzz_env, count: int, seed: int) -> None:
    targets, worker, scratch = fuzz_env
    failures = []
    stats: dict[str, int] = {}
    for i in range(count):
        target = targets[i % len(targets)]
        rng = random.Random(f"{seed}:{i}")
        patches, truncate, notes = mutate(rng, target)
        result = worker.run(_job(target, scratch, patches, truncate))
        stats[result["status"]] = stats.get(result["status"], 0) + 1
        if result["status"] in BAD:
            failures.append(f"[seed {seed} case {i}] image {target.name}: {result['status']}\n"
                            f"  mutations: {'; '.join(notes)}\n  {result['detail'].strip()}")
        if stats.get("crash", 0) == i + 1 >= 3:
            # The worker never survived a case (import error, ...): no point continuing.
            pytest.fail(f"fuzz worker dies on every case:\n{result['detail']}")
    print(f"fuzz seed {seed}: {count} mutations, outcomes {stats}")
    if failures:
        shown = "\n\n".join(failures[:12])
        pytest.fail(f"{len(failures)} of {count} mutants escaped the QcowError contract "
                    f"(seed {seed}; outcomes {stats}):\n\n{shown}", pytrace=False)


def _seed(default: int) -> int:
    return int(os.environ.get("QCOWDISK_FUZZ_SEED", default))


def test_fuzz_pristine_images_read(fuzz_env) -> None:
    """Sanity: every unmutated image opens and reads cleanly through the worker (else fuzzing proves nothing)."""
    targets, worker, scratch = fuzz_env
    for t in targets:
        result = worker.run(_job(t, scratch, [], None))
        assert result["status"] == "ok", f"pristine {t.name}: {result}"


def test_fuzz_random_mutations(fuzz_env) -> None:
    """~300 seeded mutations across all images (bounded, < 60 s)."""
    started = time.monotonic()
    _run_campaign(fuzz_env, 300, _seed(20240611))
    assert time.monotonic() - started < 120, "bounded fuzz run took too long"


@pytest.mark.slow
def test_fuzz_random_mutations_long(fuzz_env) -> None:
    """20,000 mutations (use --runslow); set QCOWDISK_FUZZ_SEED to explore other seeds."""
    _run_campaign(fuzz_env, 20_000, _seed(int(time.time())))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_hypothesis(fuzz_env, data: st.DataObject) -> None:
    """Hypothesis picks the image, the regions, the positions and the bytes (and shrinks failures)."""
    targets, worker, scratch = fuzz_env
    target = data.draw(st.sampled_from(targets), label="image")
    kinds = [k for k in REGION_KINDS if target.ranges(k)]
    edits = data.draw(st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 1 << 24),
                                         st.binary(min_size=1, max_size=8)), min_size=1, max_size=4),
                      label="edits")
    patches = []
    for kind, where, value in edits:
        ranges = target.ranges(kind)
        start, length = ranges[where % len(ranges)]
        patches.append((start + (where // len(ranges)) % length, value))
    result = worker.run(_job(target, scratch, patches, None))
    assert result["status"] not in BAD, (
        f"image {target.name}, patches {[(hex(o), v.hex()) for o, v in patches]}: "
        f"{result['status']}\n{result['detail']}")
