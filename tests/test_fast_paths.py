"""The per-request fast paths: lock-free reads on read-write images, `readinto_at`, extended L2
images, and allocating writes that do not read the zero padding of a new cluster.

Reads: every fast read is checked against QEMU's view (`qemu-img convert -O raw`); the
lock-free path of a read-write image is raced, deterministically (a host seam runs a writer in
the middle of the fast path's pread) and statistically (threads), against writes that free a
host cluster and hand it to another guest cluster: a stale lookup would then read that other
cluster's bytes. Writes: host reads and writes are counted at the HostFile seam; a new
cluster with nothing beneath is allocated as zeros and gets only the data (zero padding, still
without a read, where the file system cannot), one with something beneath (a backing file, an
existing cluster) its copy-on-write, a reused cluster holding old bytes reads zeros around the
data; power cuts at every host op leave what was flushed.
"""

from __future__ import annotations

import mmap
import os
import random
import sys
import threading
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import crashsim as cs
from crashsim import CrashLog, CutWalker, GuestModel
from qcowdisk import QcowFile
from qcowdisk.errors import CorruptImageError
from qcowdisk.hostio import HostFile
from qemutools import assert_clean, assert_no_corruption, compare, create, pattern, qemu_img, qemu_io, to_raw, write_raw

KiB = 1024
MiB = 1024 * KiB
CS = 64 * KiB


# --------------------------------------------------------------------------------------------
# Host seams

class CountingHost(HostFile):
    """Counts the bytes written through it (all instances of a test share `log`)."""

    log: list[tuple[int, int]]
    reads: list[int] = [0]  # noqa: RUF012 - one counter shared by the test's files
    zeros: list[tuple[int, int]] = []  # noqa: RUF012 - ranges allocated as zeros, all files

    def pread(self, length: int, offset: int) -> bytes:
        """Count, then read."""
        CountingHost.reads[0] += 1
        return super().pread(length, offset)

    def preadv(self, buffers: Sequence[Any], offset: int) -> int:
        """Count, then read."""
        CountingHost.reads[0] += 1
        return super().preadv(buffers, offset)

    def pwritev(self, buffers: Sequence[Any], offset: int) -> None:
        """Record (offset, length), then write."""
        self.log.append((offset, sum(memoryview(b).nbytes for b in buffers)))
        super().pwritev(buffers, offset)

    def zero_alloc(self, offset: int, length: int) -> bool:
        """Record ("zero", offset, length) in `zeros` if done."""
        ok = super().zero_alloc(offset, length)
        if ok:
            CountingHost.zeros.append((offset, length))
        return ok


def counting_factory() -> tuple[Callable[[str, bool], HostFile], list[tuple[int, int]]]:
    """A host factory whose files append every write to the returned list."""
    log: list[tuple[int, int]] = []

    def make(path: str, writable: bool) -> HostFile:
        h = CountingHost(path, writable)
        h.log = log
        return h
    return make, log


class NoPunchHost(HostFile):
    """A file system without hole punching: freed clusters keep their old bytes."""

    def punch_hole(self, offset: int, length: int) -> bool:
        """Refuse, as a file system without FALLOC_FL_PUNCH_HOLE does."""
        return False


class NoFallocateHost(NoPunchHost):
    """Nor can it allocate a range as zeros: new clusters get their zero padding written."""

    def zero_alloc(self, offset: int, length: int) -> bool:
        """Refuse, as a file system without FALLOC_FL_ZERO_RANGE or hole punching does."""
        return False


class HookHost(HostFile):
    """Runs `hook` once inside the next data read (after the fast path's lookup, before the
    bytes come back): the place where a concurrent writer can change what was looked up."""

    hook: Callable[[HookHost], None] | None = None

    def _fire(self) -> None:
        hook, HookHost.hook = HookHost.hook, None
        if hook is not None:
            hook(self)

    def pread(self, length: int, offset: int) -> bytes:
        """Hook, then read."""
        self._fire()
        return os.pread(self.fd, length, offset)

    def preadv(self, buffers: Sequence[Any], offset: int) -> int:
        """Hook, then read."""
        self._fire()
        return os.preadv(self.fd, list(buffers), offset)


def in_thread(fn: Callable[[], object]) -> None:
    """Run fn in another thread and wait (it needs the image lock, which the caller may not hold)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the writer thread hung: the fast read path held the image lock"
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------
# Reads: correctness against QEMU's view

def _buffers(n: int) -> list[tuple[str, Any, Callable[[Any], bytes]]]:
    """Writable buffers of n bytes of every kind readinto_at takes, with how to read them back."""
    out: list[tuple[str, Any, Callable[[Any], bytes]]] = [
        ("bytearray", bytearray(n), bytes), ("memoryview", memoryview(bytearray(n)), bytes),
        ("mmap", mmap.mmap(-1, n), lambda b: b[:])]
    if n % 4 == 0:
        out += [("array-I", array("I", bytes(n)), lambda b: b.tobytes()),
                ("memoryview-I", memoryview(array("I", bytes(n))), lambda b: b.tobytes())]
    return out


@pytest.fixture(scope="module")
def extl2_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """An extended-L2 image (64 KiB clusters, 2 KiB subclusters) with every subcluster state:
    allocated data, zero, unallocated (no backing), fully and partly allocated clusters."""
    d = tmp_path_factory.mktemp("extl2")
    img = create(str(d / "x.qcow2"), "8M", options="cluster_size=65536,extended_l2=on")
    qemu_io(img, "write -P 0x11 0 1M",                 # whole clusters: bitmap all allocated
            "write -P 0x22 1M 2K", "write -P 0x23 1052672 6K",  # partly allocated clusters
            "write -z 1179648 4K",                     # zero subclusters in an allocated cluster
            "write -P 0x24 2M 64K", "write -z 2162688 2K",
            "write -P 0x25 3M 1K")                     # a partial subcluster (copy-on-write)
    return img, to_raw(img, str(d / "x.raw"))


def _offsets(size: int) -> list[tuple[int, int]]:
    """Requests inside one cluster (the fast paths' shape) and across clusters."""
    rng = random.Random(7)
    out = [(o, 4096) for o in range(0, 4 * MiB, 4096)]
    out += [(rng.randrange(size - 70000), rng.choice([1, 512, 2048, 3000, 65536, 70000])) for _ in range(300)]
    return out


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
def test_extended_l2_reads_match_qemu(extl2_image: tuple[str, bytes], readonly: bool) -> None:
    """read_at and readinto_at (every buffer kind) on an extended-L2 image equal QEMU's view,
    each request twice: the first may load the L2 table, the second takes the fast path."""
    img, raw = extl2_image
    with QcowFile.open(img, readonly=readonly) as disk:
        for off, n in _offsets(len(raw)):
            for _ in range(2):
                assert disk.read_at(off, n) == raw[off:off + n], (off, n)
            for name, buf, back in _buffers(n):
                assert disk.readinto_at(buf, off) == n
                assert back(buf) == raw[off:off + n], (name, off, n)


def test_extended_l2_fast_path_still_refuses_a_bad_bitmap(tmp_path: Path) -> None:
    """A bitmap marking a subcluster both allocated and zero is refused by a read that would be
    fast otherwise (its L2 table is cached), as by the checked path."""
    img = create(str(tmp_path / "b.qcow2"), "1M", options="cluster_size=65536,extended_l2=on")
    qemu_io(img, "write -P 1 0 128K")
    with QcowFile.open(img, readonly=True) as disk:
        l1 = disk.header.l1_table_offset
    head = Path(img).read_bytes()
    l2_offset = int.from_bytes(head[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    with open(img, "r+b") as f:  # cluster 1's bitmap: all allocated, and subcluster 0 zero too
        f.seek(l2_offset + 16 + 8)
        f.write((0xFFFFFFFF | 1 << 32).to_bytes(8, "big"))
    for readonly in (True, False):
        with QcowFile.open(img, readonly=readonly) as disk:
            assert disk.read_at(0, 4096) == b"\1" * 4096  # cluster 0: fine, and caches the table
            with pytest.raises(CorruptImageError, match="both allocated and zero"):
                disk.read_at(CS, 4096)
            with pytest.raises(CorruptImageError, match="both allocated and zero"):
                disk.readinto_at(bytearray(4096), CS)


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
def test_readinto_at_fast_path_edges(tmp_path: Path, readonly: bool) -> None:
    """readinto_at's fast path: clipped at the disk's end, across clusters, read-only buffers
    refused with TypeError (a read-only mmap too), the count returned is in bytes."""
    size = 4 * CS + 1024
    data = pattern(size, 3)
    raw = write_raw(str(tmp_path / "s.raw"), data)
    img = str(tmp_path / "s.qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, img)
    with QcowFile.open(img, readonly=readonly) as disk:
        disk.read_at(0, 1)
        buf = bytearray(4096)
        assert disk.readinto_at(buf, size - 100) == 100 and buf[:100] == data[-100:]
        assert disk.readinto_at(buf, CS - 10) == 4096 and buf == data[CS - 10:CS + 4086]
        a = array("I", bytes(4096))
        assert disk.readinto_at(a, 8) == 4096 and a.tobytes() == data[8:4104]
        with pytest.raises(TypeError, match="writable"):
            disk.readinto_at(memoryview(bytes(4096)), 0)
        ro_map = mmap.mmap(os.open(raw, os.O_RDONLY), 4096, access=mmap.ACCESS_READ)
        with pytest.raises(TypeError, match="writable"):
            disk.readinto_at(ro_map, 0)
        assert ro_map[:] == data[:4096]  # untouched
        assert disk.readinto_at(bytearray(), 0) == 0


# --------------------------------------------------------------------------------------------
# Reads on read-write images: nothing stale

def _reuse_setup(tmp_path: Path) -> tuple[str, int]:
    """A read-write image whose guest cluster 0 will be discarded and its host cluster reused."""
    img = str(tmp_path / "r.qcow2")
    with QcowFile.create(img, 16 * CS) as disk:
        disk.write_at(0, b"\x11" * CS)
        disk.write_at(8 * CS, b"\x22" * CS)
    return img, 8 * CS


def _discard_and_reuse(disk: QcowFile) -> Callable[[], None]:
    """Discard guest cluster 0, flush (its host cluster is freed), write guest cluster 5, which
    gets that host cluster: a stale lookup of cluster 0 now reads 0x55 bytes."""
    def run() -> None:
        disk.discard(0, CS)
        disk.flush()
        disk.write_at(5 * CS, b"\x55" * CS)
    return run


@pytest.mark.parametrize("method", ["read_at", "readinto_at"])
def test_rw_fast_read_racing_a_reuse_is_redone(tmp_path: Path, method: str) -> None:
    """A fast read whose cluster is discarded and its host cluster given to other data between
    the lookup and the pread returns what the disk holds now (zeros), never the other data."""
    img, _ = _reuse_setup(tmp_path)
    with QcowFile.open(img, host_factory=HookHost) as disk:
        assert disk.read_at(0, 4096) == b"\x11" * 4096  # caches the table: fast from now on
        host0 = disk.layer_status(0, CS)[0].host_offset
        HookHost.hook = lambda h: in_thread(_discard_and_reuse(disk))
        if method == "read_at":
            got = disk.read_at(100, 4096)
        else:
            buf = bytearray(4096)
            assert disk.readinto_at(buf, 100) == 4096
            got = bytes(buf)
        assert HookHost.hook is None, "the hook did not run: the read took no host read"
        assert disk.layer_status(5 * CS, CS)[0].host_offset == host0, "the host cluster was not reused"
        assert got == bytes(4096), f"stale read: {got[:8]!r}"
        assert disk.read_at(5 * CS, 4096) == b"\x55" * 4096


def test_rw_fast_read_racing_an_overwrite_sees_it(tmp_path: Path) -> None:
    """An in-place overwrite that lands between lookup and pread: the read is done again under
    the lock and returns the new bytes as a whole."""
    img, _ = _reuse_setup(tmp_path)
    with QcowFile.open(img, host_factory=HookHost) as disk:
        disk.read_at(0, 1)

        def overwrite(h: HookHost) -> None:
            in_thread(lambda: disk.write_at(0, b"\x77" * CS))
        HookHost.hook = overwrite
        assert disk.read_at(0, 4096) == b"\x77" * 4096


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
def test_readinto_racing_close_leaves_no_foreign_bytes(tmp_path: Path, readonly: bool) -> None:
    """close() in another thread while readinto_at's fast path is in its read, and the
    descriptor number reused at once by another file: ValueError, and the caller's buffer holds
    none of the other file's bytes."""
    img, _ = _reuse_setup(tmp_path)
    foreign = write_raw(str(tmp_path / "foreign.bin"), b"\xee" * (4 * MiB))
    disk = QcowFile.open(img, readonly=readonly, host_factory=HookHost)
    disk.read_at(0, 1)

    def close_and_reuse(h: HookHost) -> None:
        fd = h.fd
        in_thread(disk.close)
        other = os.open(foreign, os.O_RDONLY)
        if other != fd:
            os.dup2(other, fd)
            os.close(other)
        h.fd = fd  # the read goes on with the (reused) number it had
    HookHost.hook = close_and_reuse
    buf = bytearray(4096)
    try:
        with pytest.raises(ValueError, match="closed"):
            disk.readinto_at(buf, 0)
    finally:
        os.close(disk._state.host.fd)  # (the reused number)
    assert b"\xee" not in buf


def test_rw_fast_reads_with_threads_never_stale(tmp_path: Path) -> None:
    """Writer threads keep discarding, flushing and rewriting their own clusters, each 4 KiB
    block tagged with its guest block number, so freed host clusters move between guest
    clusters all the time; reader threads on the lock-free path must only ever see a block's
    own tag or zeros."""
    nclusters = 64
    img = str(tmp_path / "t.qcow2")
    size = nclusters * CS

    def block(b: int, version: int) -> bytes:
        return (b.to_bytes(4, "big") + version.to_bytes(4, "big")) * 512

    def cluster_bytes(c: int, version: int) -> bytes:
        return b"".join(block(c * 16 + i, version) for i in range(16))

    with QcowFile.create(img, size) as disk:
        for c in range(nclusters):
            disk.write_at(c * CS, cluster_bytes(c, 0))
    errors: list[str] = []
    stop = threading.Event()
    reads = [0]

    def writer(w: int) -> None:
        rng = random.Random(w)
        mine = [c for c in range(nclusters) if c % 4 == w]
        version = 1
        while not stop.is_set():
            c = rng.choice(mine)
            if rng.random() < 0.5:
                disk.discard(c * CS, CS)
            else:
                disk.write_at(c * CS, cluster_bytes(c, version))
                version += 1
            if rng.random() < 0.3:
                disk.flush()

    def reader(r: int) -> None:
        rng = random.Random(100 + r)
        buf = bytearray(4096)
        while not stop.is_set():
            b = rng.randrange(nclusters * 16)
            if r % 2:
                got = disk.read_at(b * 4096, 4096)
            else:
                disk.readinto_at(buf, b * 4096)
                got = bytes(buf)
            reads[0] += 1
            if got != bytes(4096) and (got[:4] != b.to_bytes(4, "big") or got[:8] * 512 != got):
                errors.append(f"block {b}: read {got[:8].hex()} (tag of block {int.from_bytes(got[:4], 'big')})")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with QcowFile.open(img) as disk:
            threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
            threads += [threading.Thread(target=reader, args=(r,)) for r in range(4)]
            for t in threads:
                t.start()
            threading.Event().wait(3)
            stop.set()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
    finally:
        sys.setswitchinterval(old)
    assert reads[0] > 1000, reads
    assert not errors, f"{len(errors)} stale reads of {reads[0]}: {errors[:5]}"
    assert_clean(img)


# --------------------------------------------------------------------------------------------
# Allocating writes without zero padding

def test_small_allocating_writes_write_only_the_data(tmp_path: Path) -> None:
    """Sequential 4 KiB writes into a fresh image (qemu-img bench -w -s 4096): with nothing
    beneath a new cluster it is allocated as zeros (fallocate ZERO_RANGE over the cluster, as
    QEMU's handle_alloc_space) and each request writes its 4 KiB and nothing else, reading
    nothing; the image reads as written, QEMU agrees, and qemu-img check is clean."""
    make, log = counting_factory()
    img = str(tmp_path / "w.qcow2")
    data = pattern(40 * 4096 + 1000, 1)
    with QcowFile.create(img, 4 * MiB, host_factory=make) as disk:
        del log[:]
        reads = CountingHost.reads = [0]
        zeros = CountingHost.zeros = []
        new_clusters = 0
        for i in range(40):
            before, zeros_before = len(log), len(zeros)
            start = i * 4096 + 3000
            disk.write_at(start, data[i * 4096:(i + 1) * 4096])
            assert log[before:] == [(log[before][0], 4096)], log[before:]  # the data, once
            fresh = (start + 4095) // CS + 1 - max(new_clusters, start // CS)  # clusters it allocates
            new_clusters += fresh
            assert len(zeros) - zeros_before == (1 if fresh else 0), zeros[zeros_before:]
            if fresh:
                assert zeros[-1][1] == fresh * CS and zeros[-1][0] % CS == 0, zeros[-1]
        reads[0] = 0
        disk.write_at(CS * 10 + 5, b"x")  # a lone byte in a new cluster: one byte written, no read
        assert log[-1][1] == 1 and zeros[-1] == (log[-1][0] - 5, CS)
        assert reads[0] == 0, "an allocating write read its copy-on-write parts"
        expect = bytearray(4 * MiB)
        expect[3000:3000 + 40 * 4096] = data[:40 * 4096]
        expect[CS * 10 + 5] = ord("x")
        assert disk.read_at(0, 4 * MiB) == expect
    assert_clean(img)
    compare(img, write_raw(str(tmp_path / "e.raw"), bytes(expect)), fmt_a="qcow2", fmt_b="raw")


@pytest.mark.parametrize("host", [NoPunchHost, NoFallocateHost], ids=["zero-range", "no-fallocate"])
def test_reused_cluster_below_the_end_gets_its_padding(tmp_path: Path, host: type[HostFile]) -> None:
    """A new cluster that is not past the end of the file (a freed cluster the file system could
    not punch, holding old bytes) is allocated as zeros, or written whole where the file system
    cannot: the bytes around a small write read zeros."""
    img = str(tmp_path / "p.qcow2")
    with QcowFile.create(img, 4 * MiB, host_factory=host) as disk:
        disk.write_at(0, b"\xab" * CS)
        disk.write_at(CS, b"\xcd" * CS)
        host0 = disk.layer_status(0, CS)[0].host_offset
        disk.discard(0, CS)
        disk.flush()  # host0 freed, not punched: it still holds 0xab bytes
        disk.write_at(7 * CS + 100, b"\x01" * 100)
        assert disk.layer_status(7 * CS, CS)[0].host_offset == host0, "the freed cluster was not reused"
        got = disk.read_at(7 * CS, CS)
        assert got == bytes(100) + b"\x01" * 100 + bytes(CS - 200)
    qemu_io(img, f"read -P 0 {7 * CS} 100", f"read -P 1 {7 * CS + 100} 100", f"read -P 0 {7 * CS + 200} {CS - 200}")
    assert_clean(img)


@pytest.mark.parametrize("case", ["backing", "zero-flag-over-backing", "extended-l2-backing"])
def test_padding_still_copies_what_lies_beneath(tmp_path: Path, case: str) -> None:
    """Over a backing file the copy-on-write parts are the backing file's bytes; over a zero
    flag they are zeros whatever the backing file holds. Same image as qemu-io makes."""
    base = write_raw(str(tmp_path / "b.raw"), pattern(2 * MiB, 9))
    opts = "cluster_size=65536" + (",extended_l2=on" if case.startswith("extended") else "")
    ours = create(str(tmp_path / "q.qcow2"), "2M", options=opts, backing=base, backing_fmt="raw")
    theirs = create(str(tmp_path / "r.qcow2"), "2M", options=opts, backing=base, backing_fmt="raw")
    cmds = []
    if case == "zero-flag-over-backing":
        cmds.append(f"write -z {CS} {CS}")
    cmds += [f"write -P 7 {CS + 5000} 3000", "write -P 8 5000 3000", f"write -P 9 {3 * CS - 100} 200"]
    qemu_io(theirs, *cmds)
    with QcowFile.open(ours) as disk:
        for c in cmds:
            parts = c.split()
            if parts[1] == "-z":
                disk.write_zeroes(int(parts[2]), int(parts[3]))
            else:
                disk.write_at(int(parts[3]), bytes([int(parts[2])]) * int(parts[4]))
    assert_clean(ours)
    compare(ours, theirs, fmt_a="qcow2", fmt_b="qcow2")


def _walk_cuts(log: CrashLog, image: str, ops: list[cs.GuestOp], model: GuestModel, cuts: list[int],
               subsets: list[cs.Subset], workdir: Path) -> int:
    """Materialise every (cut, subset) state; qcowdisk and QEMU must read what the model allows
    and qemu-img check must find no corruption. Returns the number of states judged."""
    contexts = cs.cut_contexts(log)
    walker = CutWalker(log, image)
    seen: set[bytes] = set()
    state = str(workdir / "state.qcow2")
    judged = 0
    for cut in cuts:
        walker.advance(cut)
        for subset in subsets:
            data = walker.state(subset)
            if data in seen:
                continue
            seen.add(data)
            Path(state).write_bytes(data)
            ctx = contexts[cut]
            assert_no_corruption(state)
            with QcowFile.open(state, readonly=True) as disk:
                view = {c: disk.read_at(c * cs.CHUNK, model.chunk_len(c)) for c in model.all_chunks()}
            findings = cs.check_view(model, view, ctx.f, ctx.j, f"cut {cut} {subset}")
            raw = to_raw(state, str(workdir / "state.raw"))
            qview = {c: raw[c * cs.CHUNK:c * cs.CHUNK + model.chunk_len(c)] for c in model.all_chunks()}
            findings += cs.check_view(model, qview, ctx.f, ctx.j, f"qemu, cut {cut} {subset}")
            assert not findings, [str(f) for f in findings[:3]]
            judged += 1
    return judged


def _small_write_ops(seed: int, count: int) -> list[cs.GuestOp]:
    """Sequential small allocating writes (some in the same cluster), a flush every few."""
    rng = random.Random(seed)
    ops: list[cs.GuestOp] = []
    pos = 3000
    for i in range(count):
        n = rng.choice([512, 4096, 4096, 10000])
        ops.append(("write", pos, n, seed * 1000 + i))
        pos += n + rng.choice([0, 0, 512, CS])
        if rng.random() < 0.35:
            ops.append(("flush", 0, 0, 0))
    ops.append(("flush", 0, 0, 0))
    return ops


@pytest.mark.parametrize("extended_l2", [False, True], ids=["standard", "extended-l2"])
@pytest.mark.parametrize("subsets,every", [(["all", "none", ("torn", 2)], 3)], ids=["sampled"])
def test_power_cut_during_small_allocating_writes(tmp_path: Path, subsets: list[cs.Subset], every: int,
                                                  extended_l2: bool) -> None:
    """Power cuts during small allocating writes (new clusters, and with extended L2 new
    subclusters of allocated ones, allocated as zeros before the data lands): at every third
    host op (and every op in the slow variant below), with all / none / torn unsynced writes
    and zero ranges surviving, what was flushed reads back and nothing is corrupt."""
    _power_cut_case(tmp_path, subsets, every, count=24, extended_l2=extended_l2)


@pytest.mark.slow
def test_power_cut_during_small_allocating_writes_exhaustive(tmp_path: Path) -> None:
    """The same at every host op, more ops, more subsets."""
    _power_cut_case(tmp_path, ["all", "none", ("random", 1), ("random", 3), ("torn", 2), ("torn", 4)], 1, count=60)


def _power_cut_case(tmp_path: Path, subsets: list[cs.Subset], every: int, count: int,
                    extended_l2: bool = False) -> None:
    image = str(tmp_path / "c.qcow2")
    QcowFile.create(image, 16 * MiB, extended_l2=extended_l2).close()
    ops = _small_write_ops(5, count)
    log = CrashLog()
    log.snapshot_initial(image)
    disk = QcowFile.open(image, host_factory=log.factory())
    cs.run_guest_ops(disk, ops, log)
    disk.close()
    assert any(op.kind == "zero" for op in log.ops), "no cluster was allocated as zeros"
    model = GuestModel(16 * MiB).apply_all(ops)
    cuts = list(range(0, len(log.ops) + 1, every))
    if cuts[-1] != len(log.ops):
        cuts.append(len(log.ops))
    assert _walk_cuts(log, image, ops, model, cuts, subsets, tmp_path) >= len(cuts)
    assert_clean(image)


# --------------------------------------------------------------------------------------------
# The fast path's memo of guest cluster -> host offset

def test_memo_never_outlives_a_mapping_change(tmp_path: Path) -> None:
    """Every read goes through the memo once it knows the cluster; each operation that moves,
    frees or rewrites clusters must leave later reads seeing the new guest view (a bytearray
    model), through read_at and readinto_at alike."""
    import qcowdisk.qcow2.file as qfile
    path = tmp_path / "m.qcow2"
    size = 4 * MiB
    rnd = random.Random(5)
    disk = QcowFile.create(path, size)
    model = bytearray(size)

    def write(off: int, data: bytes) -> None:
        disk.write_at(off, data)
        model[off:off + len(data)] = data

    def check_all() -> None:
        for c in range(0, len(model), CS):  # twice: the second read of each cluster hits the memo
            for _ in range(2):
                off = c + rnd.randrange(0, CS - 4 * KiB)
                assert disk.read_at(off, 4 * KiB) == model[off:off + 4 * KiB], hex(off)
                buf = bytearray(512)
                assert disk.readinto_at(buf, off) == 512 and buf == model[off:off + 512], hex(off)
        fast = disk._fast
        assert fast is not None and fast[17], "the memo was not used"

    for c in range(0, size, CS):
        write(c, rnd.randbytes(CS))
    check_all()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("overwrite in place", lambda: write(3 * CS + 100, b"\x11" * 5000)),
        ("zeroize", lambda: (disk.zeroize(5 * CS, 2 * CS), model.__setitem__(slice(5 * CS, 7 * CS), bytes(2 * CS)))),
        ("discard", lambda: (disk.discard(9 * CS, CS), model.__setitem__(slice(9 * CS, 10 * CS), bytes(CS)))),
        ("snapshot then copy-on-write", lambda: (disk.create_snapshot("s1"), write(11 * CS + 7, b"\x22" * 9000))),
        ("write into freed clusters", lambda: [write(c, rnd.randbytes(CS)) for c in (5 * CS, 9 * CS)]),
        ("apply the snapshot", lambda: (disk.apply_snapshot("s1"), model.__setitem__(slice(0, size), saved))),
    ]
    saved = b""
    for name, op in steps:
        if name.startswith("snapshot"):
            saved = bytes(model)
        op()
        check_all()
    disk.resize(size - 2 * CS, shrink=True)
    del model[size - 2 * CS:]
    assert disk.read_at(size - 2 * CS - 4 * KiB, 8 * KiB) == model[-4 * KiB:]  # clipped at the new end
    check_all()
    disk.close()
    assert_clean(str(path))
    to = tmp_path / "m.raw"
    to_raw(str(path), str(to))
    assert to.read_bytes() == bytes(model)
    # the memo is bounded
    ro = QcowFile.open(path, readonly=True)
    limit = qfile.FAST_MEMO_ENTRIES
    qfile.FAST_MEMO_ENTRIES = 8
    try:
        for c in range(0, len(model), CS):
            ro.read_at(c, 512)
            assert ro._fast is not None and len(ro._fast[17]) <= 8
    finally:
        qfile.FAST_MEMO_ENTRIES = limit
        ro.close()


def test_memo_remembers_what_an_l2_miss_found(tmp_path: Path) -> None:
    """A read that misses the L2 cache reads the one entry, not the slice (cachesize.py); the
    memo keeps what it found, so reading the cluster again is one pread, without the lock's
    lookup, for read_at and readinto_at alike; the bytes are QEMU's."""
    path = str(tmp_path / "miss.qcow2")
    create(path, "64M", options="cluster_size=4096")
    qemu_io(path, *(f"write -P {i + 1} {i * 2 * MiB} 4k" for i in range(32)))
    want = to_raw(path, str(tmp_path / "miss.raw"))
    CountingHost.reads[0] = 0
    disk = QcowFile.open(path, readonly=True, l2_cache_size=4096, host_factory=CountingHost)
    try:
        for i in range(32):
            off = i * 2 * MiB
            before = CountingHost.reads[0]
            assert disk.read_at(off + 512, 1024) == want[off + 512:off + 1536]
            assert CountingHost.reads[0] - before == 2  # the L2 entry, then the data
            buf = bytearray(4096)
            before = CountingHost.reads[0]
            assert disk.readinto_at(buf, off) == 4096 and buf == want[off:off + 4096]
            assert disk.read_at(off + 100, 7) == want[off + 100:off + 107]
            assert CountingHost.reads[0] - before == 2  # the data alone, twice
    finally:
        disk.close()
