"""Header switches torn at an 8-byte boundary leave an image free of corruption.

The refcount table moves with one header write of its offset (bytes 48..55) and cluster count
(56..59). A host that lands only the first 56 bytes of that write and then fails would leave
the new offset with the old count; qcowdisk grows the table early enough that this state is
consistent too (tests/test_failure.py tears every other kind of write).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from qcowdisk import ImageFailedError, QcowFile
from qcowdisk.hostio import HostFile


class TearReftableSwitch(HostFile):
    """Lands only the first `cut` bytes of the header write that moves the refcount table."""

    cut = 56
    torn = False

    def pwritev(self, buffers: Sequence[Any], offset: int) -> None:
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        if not TearReftableSwitch.torn and offset == 0 and len(data) >= 60:
            old = os.pread(self.fd, 60, 0)
            if old[48:56] != data[48:56] and old[56:60] != data[56:60]:
                TearReftableSwitch.torn = True
                os.pwrite(self.fd, data[:self.cut], 0)
                raise OSError(errno.EIO, "injected: header write torn after the refcount table offset")
        super().pwritev([data], offset)


@pytest.mark.parametrize("cut", [48, 56, 64])
def test_refcount_table_switch_torn_between_offset_and_count(tmp_path: Path, cut: int) -> None:
    path = str(tmp_path / "t.qcow2")
    # 512-byte clusters with 64-bit refcounts: one table cluster covers 4096 clusters (2 MiB).
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
                    path, "64M"], check=True)
    TearReftableSwitch.torn = False
    TearReftableSwitch.cut = cut
    model = bytearray(64 << 20)
    flushed = bytes(model)
    disk = QcowFile.open(path, host_factory=TearReftableSwitch)
    failed: OSError | None = None
    for i, offset in enumerate(range(0, 8 << 20, 4096)):
        block = bytes([i % 251 + 1]) * 4096
        try:
            disk.write_at(offset, block)
            model[offset:offset + 4096] = block
            if i % 64 == 63:
                disk.flush()
                flushed = bytes(model)
        except OSError as e:
            failed = e
            break
    assert failed is not None and failed.errno == errno.EIO and TearReftableSwitch.torn
    with pytest.raises(ImageFailedError):
        disk.close()
    check = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True, check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # leaks at worst
    raw = tmp_path / "t.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", path, str(raw)], check=True)
    got = raw.read_bytes()
    end = max(i for i in range(0, len(flushed), 4096) if flushed[i]) + 4096
    assert got[:end] == flushed[:end], "data covered by a returned flush() was lost"
