"""Crash safety of amend: a power cut during `QcowFile.amend` leaves an image that `qemu-img
check` finds free of corruption (leaks allowed), whose guest view is unchanged, and whose
options are the old ones or the new ones.

The simulator is tests/crashsim.py's: every host op of the amend is recorded at the HostFile
seam, and at each cut point the image is rebuilt as the disk would hold it (last fsync, plus
all / none / a random subset / a random subset torn into 512-byte sectors of the writes issued
since). Amends that do not resize keep the guest view, so the oracle is the view before.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import crashsim as cs
from crashsim import CrashLog
from qcowdisk import QcowFile
from qemutools import create, qemu_io


@dataclass(frozen=True)
class Case:
    name: str
    options: str | None          # creation options
    io: tuple[str, ...]          # qemu-io commands writing the input
    amend: dict[str, Any]        # QcowFile.amend keywords
    fields: tuple[str, ...]      # format-specific keys that must be old or new
    after_snapshot: tuple[str, ...] = ()  # if any: a snapshot is taken, then these commands run
    backing: bool = False        # an overlay over a raw backing file with a long name (586 bytes)


CASES = [
    Case("downgrade-zeros", None, ("write -P 1 0 64k", "write -z 1M 1M", "write -P 2 3M 100k"),
         {"compat": "0.10"}, ("compat",)),
    Case("downgrade-prealloc", "preallocation=metadata,cluster_size=4096",
         ("write -P 5 0 64k", "write -z 8k 64k"), {"compat": "0.10"}, ("compat",)),
    # two switches, as QEMU: the upgrade, then lazy refcounts (a v3 image without them between)
    Case("upgrade-lazy", "compat=0.10", ("write -P 1 0 64k",), {"compat": "1.1", "lazy_refcounts": True},
         ("compat",)),
    Case("lazy-off", "lazy_refcounts=on", ("write -P 1 0 64k",), {"lazy_refcounts": False}, ("lazy-refcounts",)),
    Case("refcount-1", "cluster_size=4096", ("write -P 1 0 300k", "write -P 2 2M 64k"), {"refcount_bits": 1},
         ("refcount-bits",)),
    Case("downgrade-snapshot-zeros", None, ("write -P 1 0 128k", "write -P 2 1M 64k"), {"compat": "0.10"},
         ("compat",), ("write -z 0 64k", "write -z 1M 64k", "write -P 3 64k 64k")),
    # with this backing name the header spans two sectors (three with v3's feature table): a
    # torn header write must not lose it
    Case("upgrade-overlay", "compat=0.10", ("write -P 1 0 64k", "write -z 1M 64k"), {"compat": "1.1"},
         ("compat",), backing=True),
    Case("downgrade-overlay", None, ("write -P 1 0 64k", "write -z 1M 64k"), {"compat": "0.10"},
         ("compat",), backing=True),
    Case("refcount-64", "cluster_size=4096", ("write -P 1 0 300k",), {"refcount_bits": 64}, ("refcount-bits",)),
]


def _view(path: str, out: str) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out], check=True, capture_output=True)
    return Path(out).read_bytes()


def _snapshot_view(path: str, out: str) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-l", "snapshot.name=s1", "-O", "raw", path, out],
                   check=True, capture_output=True)
    return Path(out).read_bytes()


def _specific(path: str) -> dict[str, Any]:
    p = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True, text=True, check=True)
    data: dict[str, Any] = json.loads(p.stdout)["format-specific"]["data"]
    return data


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_power_cut_during_amend(tmp_path: Path, case: Case) -> None:
    image = str(tmp_path / "img.qcow2")
    if case.backing:
        base = "/".join(["b" * 200] * 2 + ["b" * 180 + ".raw"])  # 586 bytes: the header spans two sectors
        (tmp_path / base).parent.mkdir(parents=True)
        (tmp_path / base).write_bytes(bytes(range(256)) * (4 * 4096))
        create(image, "4M", options=case.options, backing=base, backing_fmt="raw")
    else:
        create(image, "4M", options=case.options)
    qemu_io(image, *case.io)
    if case.after_snapshot:
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", image], check=True)
        qemu_io(image, *case.after_snapshot)
    before_snapshot = _snapshot_view(image, str(tmp_path / "snap.raw")) if case.after_snapshot else None
    before_view = _view(image, str(tmp_path / "before.raw"))
    before = _specific(image)
    log = CrashLog()
    log.snapshot_initial(image)
    with QcowFile.open(image, host_factory=log.factory()) as disk:
        disk.amend(**case.amend)
    after = _specific(image)
    assert any(before.get(k) != after.get(k) for k in case.fields)
    cut_image = str(tmp_path / "cut.qcow2")

    def examine(st: cs.CrashState) -> list[str]:
        Path(cut_image).write_bytes(st.data)
        found = cs.check_findings(cs.qemu_check(cut_image))
        if found:
            return [f"{f.category}: {f.detail}" for f in found]
        problems: list[str] = []
        if _view(cut_image, str(tmp_path / "cut.raw")) != before_view:
            problems.append("guest view changed")
        if before_snapshot is not None and _snapshot_view(cut_image, str(tmp_path / "cut.raw")) != before_snapshot:
            problems.append("snapshot view changed")
        spec = _specific(cut_image)
        for k in case.fields:
            if spec.get(k) not in (before.get(k), after.get(k)):
                problems.append(f"{k} = {spec.get(k)!r}, neither {before.get(k)!r} nor {after.get(k)!r}")
        return problems
    judged: dict[str, list[str]] = {}
    t = cs.judge_states(cs.crash_states(log, [image], range(len(log.ops) + 1), ["all", "none", ("random", 1), ("torn", 2),
                                                                          *cs.HEADER_TEARS]),
                        judged, examine, lambda problems, st: problems,
                        lambda st: f"cut {st.cut}/{len(log.ops)} subset={st.subset}")
    print(f"[amend crash {case.name}] log={len(log.ops)} images={len(judged)}")
    t.assert_none(f"[amend crash {case.name}]", examples=8)
    os.remove(cut_image)
