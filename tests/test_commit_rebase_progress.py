"""Progress, cancellation and bounded memory of commit, rebase and compare.

`progress(done, total)` is called as each operation goes (never decreasing, ending at the total);
an exception raised from it stops the operation at that point, and then: every image is closed
and unlocked (a read-write open succeeds), each checks clean with `qemu-img check`, and the
guest view is the old one (commit: the image reads as before, its base may already hold the
copied data, as with qemu-img; rebase: the image still names its old backing file and reads as
before). A 100 GiB sparse chain is committed, rebased and compared in a subprocess whose peak
RSS (VmHWM) stays small and which reads only the allocated ranges (counted at the host I/O seam).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import qcowdisk
from qcowdisk.locking import lock_image
from qemutools import assert_clean, create, info, qemu_img, qemu_io, to_raw

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REPO = Path(__file__).resolve().parent.parent


class Stop(Exception):
    """Raised from a progress callback to cancel."""


def build(d: Path, raw_base: bool) -> None:
    """A chain whose copy takes several 2 MiB steps: base (qcow2 or raw, 8 MiB) <- top (10 MiB)."""
    d.mkdir()
    base, fmt = ("base.raw", "raw") if raw_base else ("base.qcow2", "qcow2")
    create(str(d / base), 8 * MiB, fmt=fmt)
    qemu_io(str(d / base), "write -P 0x11 0 3M", "write -P 0x12 5M 2M", fmt=fmt)
    create(str(d / "top.qcow2"), 10 * MiB, backing=base, backing_fmt=fmt)
    qemu_io(str(d / "top.qcow2"), "write -P 0x31 64k 3M", "write -z 4M 1M", "write -P 0x32 6M 2M",
            "write -P 0x33 9M 64k")
    create(str(d / "new.qcow2"), 10 * MiB)
    qemu_io(str(d / "new.qcow2"), "write -P 0x11 0 1M", "write -P 0x41 2M 6M")


def assert_unlocked_and_clean(d: Path) -> None:
    for p in sorted(d.iterdir()):
        if p.suffix == ".qcow2":
            qcowdisk.QcowFile.open(p).close()  # read-write: no lock left behind
            assert_clean(str(p))
        else:
            fd = os.open(p, os.O_RDWR)
            try:
                lock_image(fd, str(p), write=True).release()
            finally:
                os.close(fd)


Operation = Callable[[Path, Callable[[int, int], object]], object]
OPERATIONS: dict[str, Operation] = {
    "commit": lambda d, progress: qcowdisk.commit(d / "top.qcow2", progress=progress),
    "rebase": lambda d, progress: qcowdisk.rebase(d / "top.qcow2", "new.qcow2", backing_format="qcow2",
                                                  progress=progress),
    "rebase-standalone": lambda d, progress: qcowdisk.rebase(d / "top.qcow2", "", progress=progress),
    "compare": lambda d, progress: qcowdisk.compare(d / "top.qcow2", d / "top-copy.qcow2", progress=progress),
}


@pytest.mark.parametrize("raw_base", [False, True], ids=["qcow2-base", "raw-base"])
@pytest.mark.parametrize("op", OPERATIONS)
def test_progress_then_cancel_at_every_call(tmp_path: Path, op: str, raw_base: bool) -> None:
    if raw_base and op == "compare":
        pytest.skip("compare reads only: one base format is enough")
    src = tmp_path / "src"
    build(src, raw_base)
    shutil.copy(src / "top.qcow2", src / "top-copy.qcow2")
    view = to_raw(str(src / "top.qcow2"), str(tmp_path / "view.raw"))
    backing = info(str(src / "top.qcow2"))["backing-filename"]

    work = tmp_path / "full"
    shutil.copytree(src, work)
    calls: list[tuple[int, int]] = []
    OPERATIONS[op](work, lambda done, total: calls.append((done, total)))
    total = 10 * MiB
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert {t for _, t in calls} == {total}
    assert len(calls) >= 4, calls  # the operation reports as it goes, not only at both ends

    for k in range(len(calls) - 1):  # stop at each call but the last (then it is done anyway)
        work = tmp_path / f"cut{k}"
        shutil.copytree(src, work)
        seen = 0

        def stop_at_k(done: int, total: int, k: int = k) -> None:
            nonlocal seen
            seen += 1
            if seen > k:
                raise Stop
        with pytest.raises(Stop):
            OPERATIONS[op](work, stop_at_k)
        assert_unlocked_and_clean(work)
        assert to_raw(str(work / "top.qcow2"), str(tmp_path / "after.raw")) == view, k
        assert info(str(work / "top.qcow2"))["backing-filename"] == backing, k


SPARSE_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    import qcowdisk
    from qcowdisk import formats
    from qcowdisk.hostio import HostFile

    read = [0]
    class Counting(HostFile):
        def preadv(self, buffers, offset):
            n = super().preadv(buffers, offset)
            read[0] += n
            return n
        def pread(self, length, offset):
            data = super().pread(length, offset)
            read[0] += len(data)
            return data

    op, d = sys.argv[1], sys.argv[2]
    top = os.path.join(d, "top.qcow2")
    if op == "commit":
        qcowdisk.commit(top, host_factory=Counting)
    elif op == "rebase":
        qcowdisk.rebase(top, "new.qcow2", backing_format="qcow2", host_factory=Counting)
    else:
        opts = formats.OpenOptions(readonly=True, host_factory=Counting)
        a = formats.open_image(top, None, opts)
        b = formats.open_image(os.path.join(d, "copy.qcow2"), None, opts)
        assert qcowdisk.compare(a, b).identical
        a.close(); b.close()
    # VmHWM: this process image's own peak. ru_maxrss survives exec, so after a fork from a big
    # parent (pytest late in a run) it reports the parent's size; it is kept as a fallback.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    print(json.dumps({"peak_kib": peak, "read": read[0]}))
""")


@pytest.mark.parametrize("op", ["commit", "rebase", "compare"])
def test_sparse_100g_chain_in_bounded_memory(tmp_path: Path, op: str) -> None:
    size = 100 * GiB
    create(str(tmp_path / "base.qcow2"), size)
    qemu_io(str(tmp_path / "base.qcow2"), "write -P 1 0 1M", "write -P 2 50G 1M", f"write -P 3 {size - MiB} 1M")
    create(str(tmp_path / "top.qcow2"), size, backing="base.qcow2", backing_fmt="qcow2")
    qemu_io(str(tmp_path / "top.qcow2"), "write -P 4 512k 1M", "write -z 50G 64k", "write -P 5 70G 1M",
            f"write -P 6 {size - 64 * KiB} 64k")
    create(str(tmp_path / "new.qcow2"), size)
    qemu_io(str(tmp_path / "new.qcow2"), "write -P 1 0 1M", "write -P 7 30G 1M")
    if op == "compare":
        qemu_img("convert", "-O", "qcow2", str(tmp_path / "top.qcow2"), str(tmp_path / "copy.qcow2"))
    before = qemu_img("compare", str(tmp_path / "top.qcow2"), str(tmp_path / "new.qcow2"), check=False).stdout
    p = subprocess.run([sys.executable, "-c", SPARSE_SCRIPT, op, str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    figures = json.loads(p.stdout)
    assert figures["peak_kib"] < 100 * 1024, figures
    assert figures["read"] < 64 * MiB, figures  # the allocated ranges and metadata, never the holes
    for name in ("base.qcow2", "top.qcow2", "new.qcow2"):
        assert_clean(str(tmp_path / name))
    if op != "compare":
        after = qemu_img("compare", str(tmp_path / "top.qcow2"), str(tmp_path / "new.qcow2"), check=False).stdout
        assert after == before  # the same first difference: the guest view did not change
