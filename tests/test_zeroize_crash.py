"""Crash safety of QcowFile.zeroize (QEMU's MAY_UNMAP zeroing, what `convert -n` does).

Every host op of a zeroize workload is recorded at the HostFile seam (tests/crashsim.py); at every
cut the image is rebuilt as the disk would hold it (last fsync + all / none / random / torn
subsets of the unsynced writes) and judged: `qemu-img check` finds no corruption (leaks are
allowed), and each sector of the guest view (read by qemu-img convert) is a version the guest
may see: what the last returned flush made durable, or a later one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import crashsim as cs
from crashsim import CrashLog, CutWalker
from qcowdisk import QcowFile
from qemutools import create, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB
CHUNK = 512  # judged per sector: a partial cluster is zeroed in place, and a torn write tears sectors apart
SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("torn", 2)]
# (offset, length) zeroized, each followed by a flush: allocated, compressed, unallocated and
# preallocated-zero clusters, partial clusters at both edges, a range to the end of the disk
OPS = [(60 * KiB, 200 * KiB), (1 * MiB, 1 * MiB + 3 * KiB), (3 * MiB + 512, SIZE - 3 * MiB - 512)]


def guest(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    qemu_img("convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


@pytest.mark.parametrize("options", ["", "extended_l2=on", "lazy_refcounts=on"])
def test_zeroize_survives_every_cut(tmp_path: Path, options: str) -> None:
    img = tmp_path / "img.qcow2"
    create(str(img), SIZE, options=options or None)
    qemu_io(str(img), "write -P 1 0 1M", "write -c -P 2 1M 128k", "write -z 1216k 64k", "write -P 3 2M 1M",
            "write -P 4 3M 1M")
    versions = [guest(img)]
    for off, n in OPS:
        v = bytearray(versions[-1])
        v[off:off + n] = bytes(n)
        versions.append(bytes(v))
    log = CrashLog()
    log.snapshot_initial(str(img))
    with QcowFile.open(img, host_factory=log.factory()) as disk:
        for j, (off, n) in enumerate(OPS):
            log.mark(("start", j))
            disk.zeroize(off, n)
            disk.flush()
            log.mark(("flushed", j))
    assert guest(img) == versions[-1]
    assert subprocess.run(["qemu-img", "check", "-q", str(img)], check=False).returncode == 0
    contexts = cs.cut_contexts(log)
    walker = CutWalker(log, str(img))
    cut_img = tmp_path / "cut.qcow2"
    for k in range(len(log.ops) + 1):
        walker.advance(k)
        ctx = contexts[k]
        allowed = versions[ctx.f + 1:ctx.j + 2]
        for subset in SUBSETS:
            cut_img.write_bytes(walker.state(subset))
            rc = subprocess.run(["qemu-img", "check", "-q", str(cut_img)], capture_output=True, check=False)
            assert rc.returncode in (0, 3), (k, subset, rc.stdout, rc.stderr)  # clean, or leaks only
            view = guest(cut_img)
            if view in allowed:
                continue
            for c in range(0, SIZE, CHUNK):
                assert any(view[c:c + CHUNK] == v[c:c + CHUNK] for v in allowed), (k, subset, c, ctx)
