"""Reads do their host I/O outside the image lock, and never return stale bytes.

A read resolves its mapping under the lock and reads (and decodes) without it, so other threads
may write, discard, flush and allocate meanwhile. What such a read may return: for each cluster,
what the cluster held when the read started or what a write, zeroing or discard that overlapped
the read gave it (bytes of both where a write rewrote the cluster in place while it was read),
never the bytes of a host cluster that was freed and handed to another guest cluster, punched or
truncated away, nor another file's bytes after close.

The seam: a `HostFile` subclass that pauses a read of a chosen host range until the test has
done its damage (deterministic), or yields inside every large read (the stress tests), to widen
the race windows. Every test here fails when the remap check of reading.ReadPlan is disabled
(the unlocked read then returns what the reused cluster holds).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qcowdisk import QcowFile
from qcowdisk.hostio import Buffer, HostFile
from qcowdisk.qcow2.mapping import get_host_runs
from qemutools import assert_clean, qemu_img

KiB = 1024
CS = 64 * KiB
_R = TypeVar("_R")
PAUSE_LIMIT = 20.0  # seconds a paused read waits for the test (never reached when it works)


class PausingHost(HostFile):
    """Pauses the first read that covers `trap` (a host offset, once armed) until `go` is set:
    before the read reaches the file, or with `after`, once it has read it."""

    def __init__(self, path: str, writable: bool) -> None:
        super().__init__(path, writable)
        self.trap = -1
        self.after = False
        self.entered = threading.Event()
        self.go = threading.Event()
        self.timed_out = False

    def _around(self, length: int, offset: int, read: Callable[[], _R]) -> _R:
        hit = self.trap >= 0 and offset <= self.trap < offset + length
        if hit:
            self.trap = -1  # once
            if not self.after:
                self._pause()
        result = read()
        if hit and self.after:
            self._pause()
        return result

    def _pause(self) -> None:
        self.entered.set()
        self.timed_out = not self.go.wait(PAUSE_LIMIT)

    def pread(self, length: int, offset: int) -> bytes:
        return self._around(length, offset, lambda: super(PausingHost, self).pread(length, offset))

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        return self._around(sum(memoryview(b).nbytes for b in buffers), offset,
                            lambda: super(PausingHost, self).preadv(buffers, offset))


def _factory(hosts: list[PausingHost]) -> Callable[[str, bool], HostFile]:
    def make(path: str, writable: bool) -> HostFile:
        h = PausingHost(path, writable)
        hosts.append(h)
        return h
    return make


def _pattern(tag: int, length: int = CS) -> bytes:
    return tag.to_bytes(8, "little") * (length // 8)


def _host_offset(disk: QcowFile, guest_offset: int) -> int:
    ext = next(e for e in disk.block_status(guest_offset, 1))
    assert ext.offset is not None, ext
    return ext.offset + guest_offset - ext.start


def _paused_read(disk: QcowFile, host: PausingHost, trap: int, read: Callable[[], Any],
                 damage: Callable[[], None]) -> tuple[Any, BaseException | None]:
    """Run `read` in a thread, pause it inside the host read of `trap`, run `damage` meanwhile
    (it must not wait for the reader: the lock is free), then let the read finish."""
    out: list[Any] = []
    err: list[BaseException] = []

    def reader() -> None:
        try:
            out.append(read())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            err.append(e)

    host.trap = trap
    t = threading.Thread(target=reader)
    t.start()
    try:
        assert host.entered.wait(PAUSE_LIMIT), "the read never reached the trapped host range"
        damage()
    finally:
        host.go.set()
        t.join(PAUSE_LIMIT)
    assert not t.is_alive()
    assert not host.timed_out, "the damage waited for the paused read: the lock was held across host I/O"
    return (out[0] if out else None), (err[0] if err else None)


def _image(tmp_path: Path, hosts: list[PausingHost], **create: Any) -> tuple[QcowFile, PausingHost]:
    path = tmp_path / "a.qcow2"
    QcowFile.create(path, 32 * CS, **create).close()
    disk = QcowFile.open(path, host_factory=_factory(hosts))
    return disk, hosts[0]


READERS: dict[str, Callable[[QcowFile, int, int], bytes]] = {
    "read_at": lambda d, off, n: d.read_at(off, n),
    "readinto_at": lambda d, off, n: (lambda b: (d.readinto_at(b, off), bytes(b))[1])(bytearray(n)),
}


@pytest.mark.parametrize("how", ["discard", "punch_hole", "write_zeroes"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_freed_and_reused_cluster_is_not_read(tmp_path: Path, how: str, reader: str) -> None:
    """A cluster freed (discard, punch, zeroing; then flush) and reallocated to another guest
    cluster while a read of it is in its host I/O: the read returns the old bytes or the new
    zeros, never the other guest cluster's data."""
    disk, host = _image(tmp_path, [])
    with disk:
        disk.write_at(0, _pattern(0xA0) + _pattern(0xA1) + _pattern(0xA2))
        disk.flush()
        x = _host_offset(disk, CS)

        def damage() -> None:
            getattr(disk, how)(CS, CS)
            disk.flush()  # the deferred free is applied: the allocator may hand it out
            disk.write_at(20 * CS, _pattern(0xB0))
            assert _host_offset(disk, 20 * CS) == x, "precondition: the freed cluster was reused"

        got, err = _paused_read(disk, host, x, lambda: READERS[reader](disk, 0, 3 * CS), damage)
        assert err is None
        assert got[:CS] == _pattern(0xA0) and got[2 * CS:] == _pattern(0xA2)
        assert got[CS:2 * CS] in (_pattern(0xA1), bytes(CS)), "read the reused cluster's new data"
        assert disk.read_at(CS, CS) == bytes(CS)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_compressed_payload_freed_and_reused_is_not_decoded(tmp_path: Path, reader: str) -> None:
    """The same with a compressed cluster: its payload's host cluster freed and reused while the
    read has it in flight (the decode of the reused bytes must not reach the caller, nor fail it)."""
    disk, host = _image(tmp_path, [])
    with disk:
        disk.write_at(0, _pattern(0xA0))
        disk.write_compressed(CS, _pattern(0xA1) + _pattern(0xA2))
        disk.flush()
        assert next(e for e in disk.block_status(CS, 1)).compressed
        trap = os.path.getsize(disk.filename) - 1  # the payloads end the file
        x = trap // CS * CS

        def damage() -> None:
            disk.discard(CS, 2 * CS)
            disk.flush()
            disk.write_at(20 * CS, os.urandom(CS))  # incompressible junk where the payloads were
            assert _host_offset(disk, 20 * CS) == x, "precondition: the freed cluster was reused"

        got, err = _paused_read(disk, host, trap, lambda: READERS[reader](disk, 0, 3 * CS), damage)
        assert err is None, err
        assert got[:CS] == _pattern(0xA0)
        assert got[CS:2 * CS] in (_pattern(0xA1), bytes(CS))
        assert got[2 * CS:] in (_pattern(0xA2), bytes(CS))


@pytest.mark.parametrize("reader", sorted(READERS))
def test_compressed_cluster_rewritten_by_write_at(tmp_path: Path, reader: str) -> None:
    """An ordinary write over a compressed cluster moves it to a new cluster without raising the
    epoch itself; the flush that frees the old payload's cluster does, before it can be reused."""
    disk, host = _image(tmp_path, [])
    with disk:
        disk.write_at(0, _pattern(0xA0))
        disk.write_compressed(CS, _pattern(0xA1))
        disk.flush()
        trap = os.path.getsize(disk.filename) - 1
        x = trap // CS * CS

        def damage() -> None:
            disk.write_at(CS, _pattern(0xB1))
            disk.flush()
            disk.write_at(20 * CS, os.urandom(CS))
            assert _host_offset(disk, 20 * CS) == x, "precondition: the payload's cluster was reused"

        got, err = _paused_read(disk, host, trap, lambda: READERS[reader](disk, 0, 2 * CS), damage)
        assert err is None, err
        assert got[:CS] == _pattern(0xA0)
        assert got[CS:] in (_pattern(0xA1), _pattern(0xB1))


def _descriptors(disk: QcowFile, guest_offset: int, length: int) -> list[int]:
    s = disk._state  # (white box: the L2 entries themselves)
    with s.lock:
        return [r.host for r in get_host_runs(s, guest_offset, length)]


def test_compressed_partial_read_does_not_cache_reused_bytes(tmp_path: Path) -> None:
    """A part of a compressed cluster is decoded aside and cached by descriptor. When the read
    has the payload's bytes and the cluster is then freed and filled with another guest
    cluster's payload under the same descriptor, the old cluster must not enter the cache: a
    later read of the new payload would find it there."""
    disk, host = _image(tmp_path, [])
    with disk:
        disk.write_compressed(0, _pattern(0xA0) + _pattern(0xA1))
        disk.flush()
        old = _descriptors(disk, 0, 2 * CS)

        def damage() -> None:
            disk.discard(0, 2 * CS)
            disk.flush()
            disk.write_compressed(5 * CS, _pattern(0xD5) + _pattern(0xD6))
            assert _descriptors(disk, 5 * CS, 2 * CS) == old, "precondition: the same descriptors again"

        host.after = True
        trap = os.path.getsize(disk.filename) - 1  # the last payload ends the file
        got, err = _paused_read(disk, host, trap, lambda: disk.read_at(CS + 8, 4096 - 8), damage)
        assert err is None, err
        assert got in (_pattern(0xA1)[8:4096], bytes(4096 - 8))
        assert disk.read_at(6 * CS + 8, 4096 - 8) == _pattern(0xD6)[8:4096]
        assert disk.read_at(CS, CS) == bytes(CS)


@pytest.mark.parametrize("reader", sorted(READERS))
def test_shrink_and_regrow_under_a_read(tmp_path: Path, reader: str) -> None:
    """A read in flight while the disk shrinks (its clusters freed, the file cut) and grows
    again, the freed clusters going to other guest clusters: each cluster reads as it was, as
    zeros, or as its own new data."""
    disk, host = _image(tmp_path, [])
    with disk:
        disk.write_at(0, b"".join(_pattern(0xA0 + c) for c in range(8)))
        disk.flush()
        old4 = _host_offset(disk, 4 * CS)

        def damage() -> None:
            disk.resize(4 * CS, shrink=True)
            disk.resize(8 * CS)
            disk.write_at(7 * CS, _pattern(0xB7))
            assert _host_offset(disk, 7 * CS) == old4, "precondition: guest 4's old cluster went to guest 7"

        got, err = _paused_read(disk, host, old4, lambda: READERS[reader](disk, 3 * CS, 5 * CS), damage)
        assert err is None, err
        assert got[:CS] == _pattern(0xA3)
        for c in range(4, 7):
            assert got[(c - 3) * CS:(c - 2) * CS] in (_pattern(0xA0 + c), bytes(CS)), c
        assert got[4 * CS:] in (_pattern(0xA7), bytes(CS), _pattern(0xB7))


def test_close_under_a_read_leaves_no_other_files_bytes(tmp_path: Path) -> None:
    """The image is closed while a read is in its host I/O, and the descriptor number goes to
    another file: the read raises ValueError (closed), no OSError, and the buffer holds
    zeros, not that file's bytes."""
    other = tmp_path / "other"
    other.write_bytes(b"\x5a" * (64 * CS))
    disk, host = _image(tmp_path, [])
    disk.write_at(0, _pattern(0xA0, 4 * CS))
    disk.flush()
    fds: list[int] = []
    buf = bytearray(3 * CS)

    def damage() -> None:
        fd = host.fd
        disk.close()
        fds.append(os.open(other, os.O_RDONLY))
        assert fds[0] == fd, "precondition: the descriptor number was reused"

    try:
        _, err = _paused_read(disk, host, _host_offset(disk, CS), lambda: disk.readinto_at(buf, 0), damage)
    finally:
        for fd in fds:
            os.close(fd)
    assert isinstance(err, ValueError) and "closed" in str(err)
    assert b"\x5a" not in buf


def test_reads_do_not_wait_for_each_other(tmp_path: Path) -> None:
    """Two multi-cluster reads are in their host I/O at the same time (the lock is released
    around it): the second completes while the first is paused inside its pread."""
    disk, host = _image(tmp_path, [])
    with disk:
        disk.write_at(0, _pattern(0xA0, 4 * CS) + _pattern(0xA1, 4 * CS))
        disk.flush()
        seen: list[bytes] = []
        got, err = _paused_read(disk, host, _host_offset(disk, CS), lambda: disk.read_at(0, 4 * CS),
                                lambda: seen.append(disk.read_at(4 * CS, 4 * CS)))
        assert err is None and got == _pattern(0xA0, 4 * CS) and seen == [_pattern(0xA1, 4 * CS)]


# ---------------------------------------------------------------------- stress
class YieldingHost(HostFile):
    """Sleeps briefly before most large reads: the other threads run inside the window."""

    def _nap(self, length: int) -> None:
        if length >= 4096 and random.random() < 0.5:
            time.sleep(random.choice((0, 0.0002, 0.001)))

    def pread(self, length: int, offset: int) -> bytes:
        self._nap(length)
        return super().pread(length, offset)

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        self._nap(sum(memoryview(b).nbytes for b in buffers))
        return super().preadv(buffers, offset)


class History:
    """Every version each guest cluster had, with the sequence numbers its write started and
    ended at (each cluster has one writer thread, so its versions are ordered)."""

    def __init__(self, clusters: int) -> None:
        self.seq = itertools.count(1)
        self.versions: list[list[list[int]]] = [[[0, 0, 0]] for _ in range(clusters)]  # [word, start, end]

    def begin(self, cluster: int, word: int) -> list[int]:
        v = [word, next(self.seq), 1 << 62]
        self.versions[cluster].append(v)
        return v

    def end(self, v: list[int]) -> None:
        v[2] = next(self.seq)

    def legal(self, cluster: int, t0: int, t1: int) -> set[int]:
        """Words cluster may read as by a read that started at t0 and ended at t1."""
        vs = list(self.versions[cluster])
        out = set()
        for i, (word, start, _) in enumerate(vs):
            superseded = i + 1 < len(vs) and vs[i + 1][2] < t0
            if start < t1 and not superseded:
                out.add(word)
        return out


def _check_read(hist: History, data: bytes, guest_offset: int, t0: int, t1: int, where: str) -> None:
    mv = memoryview(data)
    pos = 0
    while pos < len(data):
        c = (guest_offset + pos) // CS
        n = min(len(data) - pos, (c + 1) * CS - guest_offset - pos)
        words = set(mv[pos:pos + n].cast("Q"))
        legal = hist.legal(c, t0, t1)
        if not words <= legal:
            bad = words - legal
            # a word torn between two legal versions is legal byte by byte
            torn_ok = all(all(any((w >> (8 * k)) & 0xFF == (x >> (8 * k)) & 0xFF for x in legal) for k in range(8))
                          and (w >> 32) in {x >> 32 for x in legal} | {0} for w in bad)
            if not torn_ok:
                raise AssertionError(f"{where}: guest cluster {c} read words {sorted(map(hex, bad))[:4]}; "
                                     f"legal {sorted(map(hex, legal))}")
        pos += n


def _stress(tmp_path: Path, seconds: float, compressed: bool, seed: int) -> None:
    clusters = 48
    path = tmp_path / "s.qcow2"
    QcowFile.create(path, clusters * CS).close()
    hist = History(clusters)
    errors: list[BaseException] = []
    stop = threading.Event()
    reads = [0]
    with QcowFile.open(path, host_factory=YieldingHost) as disk:
        def writer(k: int, writers: int) -> None:
            rng = random.Random(seed * 100 + k)
            mine = list(range(k, clusters, writers))
            version = 0
            try:
                while not stop.is_set():
                    c = rng.choice(mine)
                    version += 1
                    word = (c + 1) << 32 | k << 24 | version
                    r = rng.random()
                    if r < 0.25:
                        v = hist.begin(c, 0)
                        rng.choice((disk.discard, disk.punch_hole, disk.write_zeroes))(c * CS, CS)
                    elif compressed and r < 0.55:
                        v = hist.begin(c, word)
                        disk.write_compressed(c * CS, _pattern(word))
                    else:
                        v = hist.begin(c, word)
                        disk.write_at(c * CS, _pattern(word))
                    hist.end(v)
                    if rng.random() < 0.3:
                        disk.flush()  # apply the deferred frees: freed clusters get reused
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def reader(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            try:
                while not stop.is_set():
                    off = rng.randrange(0, clusters * CS, 8)
                    n = min(clusters * CS - off, rng.choice((CS, 2 * CS, 3 * CS + 8, 5 * CS)))
                    t0 = next(hist.seq)
                    if rng.random() < 0.5:
                        data = disk.read_at(off, n)
                    else:
                        b = bytearray(n)
                        disk.readinto_at(b, off)
                        data = bytes(b)
                    t1 = next(hist.seq)
                    _check_read(hist, data, off, t0, t1, f"reader {k} [{off:#x}, +{n:#x})")
                    reads[0] += 1
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(k, 2)) for k in range(2)]
        threads += [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not errors:
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(60)
        if errors:
            raise errors[0]
        assert reads[0] > 20
        for c in range(clusters):
            assert set(memoryview(disk.read_at(c * CS, CS)).cast("Q")) == {hist.versions[c][-1][0]}
    # QEMU judges the image the race left: no corruption or leak, and its guest view is the model
    assert_clean(str(path))
    model = tmp_path / "model.raw"
    model.write_bytes(b"".join(_pattern(hist.versions[c][-1][0]) for c in range(clusters)))
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(model))


@pytest.mark.parametrize("compressed", [False, True])
def test_stress_reads_racing_rewrites_and_frees(tmp_path: Path, compressed: bool) -> None:
    """Readers of multi-cluster ranges against writers that rewrite clusters in place, discard,
    punch and zero them, write them compressed and flush (so freed clusters are reused): every
    read returns, cluster by cluster, a version that cluster could legally have."""
    _stress(tmp_path, 3.0, compressed, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 6))
@pytest.mark.parametrize("compressed", [False, True])
def test_stress_reads_racing_rewrites_and_frees_soak(tmp_path: Path, compressed: bool, seed: int) -> None:
    """The same, longer, with more seeds."""
    _stress(tmp_path, 15.0, compressed, seed)
