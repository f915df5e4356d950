"""hostio.DirectHostFile (cache=none / directsync): O_DIRECT really set, unaligned requests
served through aligned ones, the file's length as QEMU leaves it, concurrent writers safe.

A model (a bytearray) checks every read and write against what a buffered file would hold.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from qcowdisk.hostio import DirectHostFile, HostFile


def _direct(fd: int) -> bool:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    return bool(flags & os.O_DIRECT)


@pytest.fixture
def direct(tmp_path: Path) -> DirectHostFile:
    path = tmp_path / "f"
    path.write_bytes(b"")
    try:
        host = DirectHostFile(str(path), True)
    except OSError as e:  # pragma: no cover - a tmp file system without O_DIRECT
        pytest.skip(f"no O_DIRECT here: {e}")
    return host


def test_unaligned_requests_match_a_buffered_file(direct: DirectHostFile) -> None:
    """Random unaligned writes, vectored writes, reads and preadv agree with a model; O_DIRECT is on."""
    assert _direct(direct.fd)
    rng = random.Random(9)
    model = bytearray()
    for _ in range(300):
        offset, length = rng.randrange(0, 40000), rng.randrange(1, 9000)
        data = rng.randbytes(length)
        if rng.random() < 0.3:
            cut = rng.randrange(0, length)
            direct.pwritev([data[:cut], memoryview(data)[cut:]], offset)
        else:
            direct.pwrite(data, offset)
        if len(model) < offset + length:
            model.extend(bytes(offset + length - len(model)))
        model[offset:offset + length] = data
        # QEMU's file grows to the write's end rounded up to the request alignment, with zeros
        grown = -(-(offset + length) // direct.request_alignment) * direct.request_alignment
        model.extend(bytes(max(0, grown - len(model))))
        assert direct.size() == len(model)
        r_off, r_len = rng.randrange(0, len(model) + 100), rng.randrange(0, 10000)
        assert direct.pread(r_len, r_off) == bytes(model[r_off:r_off + r_len])
        bufs = [bytearray(rng.randrange(1, 3000)) for _ in range(3)]
        n = direct.preadv(bufs, r_off)
        assert b"".join(bufs)[:n] == bytes(model[r_off:r_off + sum(map(len, bufs))])
    direct.zero_range(100, 5000)
    model[100:5100] = bytes(5000)
    direct.fsync()
    direct.close()
    assert Path(direct.path).read_bytes() == bytes(model)


def test_concurrent_writers_in_one_block(direct: DirectHostFile) -> None:
    """Writers sharing 4 KiB blocks (compressed clusters, -W) never lose each other's bytes."""
    pieces = [(i * 700, bytes([i % 251 + 1]) * 700) for i in range(64)]

    def write(part: list[tuple[int, bytes]]) -> None:
        for offset, data in part:
            direct.pwrite(data, offset)

    threads = [threading.Thread(target=write, args=(pieces[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert direct.pread(64 * 700, 0) == b"".join(data for _, data in pieces)


def test_refused_o_direct_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL at an O_DIRECT open, where the plain open works: QEMU's qemu_open message."""
    import errno

    from qcowdisk import hostio
    path = tmp_path / "f"
    path.write_bytes(b"x")
    real = os.open

    def no_direct(p: str, flags: int, *rest: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), p)
        return real(p, flags, *rest)

    monkeypatch.setattr(hostio.os, "open", no_direct)
    with pytest.raises(hostio.DirectIOUnsupportedError, match="filesystem does not support O_DIRECT"):
        DirectHostFile(str(path), False)
    HostFile(str(path), False).close()  # the buffered open is unaffected


def _pair(where: Path) -> None:
    """w.qcow2 (data) over wb.qcow2 (data), as qemu-img makes them, in `where`."""
    from qemutools import qemu_img, qemu_io
    where.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(where / "wb.qcow2"), "4M")
    qemu_io(str(where / "wb.qcow2"), "write -P 1 0 3M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "wb.qcow2", "-F", "qcow2", str(where / "w.qcow2"))
    qemu_io(str(where / "w.qcow2"), "write -P 9 1000k 1500k")


@pytest.mark.parametrize("args", [
    ["check", "-T", "none", "w.qcow2"], ["check", "-T", "directsync", "-r", "all", "w.qcow2"],
    ["check", "-T", "bogus", "w.qcow2"], ["check", "-T", "bogus", "-r", "all", "-U", "w.qcow2"],
    ["compare", "-T", "none", "w.qcow2", "wb.qcow2"], ["compare", "-T", "bogus", "w.qcow2", "wb.qcow2"],
    ["commit", "-t", "none", "w.qcow2"], ["commit", "-t", "directsync", "-d", "w.qcow2"],
    ["commit", "-t", "bogus", "w.qcow2"],
    ["rebase", "-t", "none", "-b", "", "w.qcow2"], ["rebase", "-t", "bogus", "-b", "", "w.qcow2"],
    ["rebase", "-T", "bogus", "-b", "", "w.qcow2"], ["rebase", "-T", "none", "-u", "-b", "", "w.qcow2"],
    ["amend", "-t", "none", "-o", "lazy_refcounts=on", "w.qcow2"], ["amend", "-t", "bogus", "-o", "lazy_refcounts=on", "w.qcow2"],
])
def test_cache_modes_beyond_convert(tmp_path: Path, args: list[str]) -> None:
    """check/compare -T, commit/rebase/amend -t: qemu-img's refusals, O_DIRECT for none and
    directsync (the image's descriptor), and the same resulting images as qemu-img's."""
    from clirun import qcowdisk_in, qemu_img_in
    from qcowdisk import hostio
    from qemutools import qemu_img
    _pair(tmp_path / "q")
    _pair(tmp_path / "o")
    direct_fds: list[bool] = []
    real = hostio.DirectHostFile.__init__

    def spy(self: DirectHostFile, path: str, writable: bool) -> None:
        real(self, path, writable)
        direct_fds.append(_direct(self.fd))

    expected = qemu_img_in(tmp_path / "q", args[0], args[1:])
    hostio.DirectHostFile.__init__ = spy  # type: ignore[method-assign]
    try:
        got = qcowdisk_in(tmp_path / "o", args[0], args[1:], as_qemu_img=True)
    finally:
        hostio.DirectHostFile.__init__ = real  # type: ignore[method-assign]
    assert got == expected
    # (rebase -T only checks its mode: qcowdisk's rebase reads the backing files as -t says)
    modes = {args[i + 1] for i, a in enumerate(args[:-1])
             if a == "-t" or (a == "-T" and args[0] != "rebase")} & {"none", "directsync"}
    assert bool(direct_fds) == bool(modes and expected[0] in (0, 1) and "bogus" not in args)
    assert all(direct_fds)
    for name in ("w.qcow2", "wb.qcow2"):
        qemu_img("compare", "-q", "-U", str(tmp_path / "q" / name), str(tmp_path / "o" / name))
