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
