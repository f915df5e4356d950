"""A repair cut by a power failure leaves an image that checks no worse than before it.

`check -r all` runs through the crash simulator (tests/crashsim.py): every host op of the repair
is recorded, and at every cut point the image is rebuilt as the disk could hold it (last fsync
plus all, none, a random subset, or torn sectors of the unsynced writes). Each such image must:

- read the same guest data as before the repair (`qemu-img compare` with the broken original);
- make `qemu-img check` report no more internal errors and no more corruptions than it reported
  before the repair, not counting the one transient QEMU's repair has too: a cluster whose
  leaked reference was dropped to exactly 1 before its OFLAG_COPIED flag was set again
  (`ERROR OFLAG_COPIED ... refcount=1` on an entry without the flag). That state loses nothing
  (a writer copies such a cluster on write) and is counted and reported separately;
- leaks may come and go (a rebuilt refcount structure leaks the old one until it is dropped).

The counts of cut points, crash states and distinct images judged are printed with `-s`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import crashsim as cs
import qcowdisk
import test_check as tc
from crashsim import CrashLog
from qcowdisk import QcowFile
from qemutools import check

SUBSETS: list[cs.Subset] = ["all", "none", ("random", 1), ("torn", 2), *cs.HEADER_TEARS]
SLOW_SUBSETS: list[cs.Subset] = [*SUBSETS, ("random", 3), ("random", 5), ("torn", 4), ("torn", 6)]
CASES = ["leak-many", "refcount-too-low", "refcount-zero", "copied-clear-l2", "leak-after-snapshot-delete",
         "dirty-lazy", "corrupt-bit", "l2-on-refblock",
         # snapshot table rewrites: a new table, one header switch, the old table freed
         "snapshot-incomplete", "snapshot-extra-too-large", "snapshot-table-past-eof"]
TOTALS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _print_totals():
    yield
    if TOTALS:
        print(f"\n[repair crash totals] cut points={TOTALS['cuts']} states={TOTALS['states']} "
              f"distinct images={TOTALS['images']} benign OFLAG_COPIED transients={TOTALS['benign']}")


@dataclass
class Verdict:
    corruptions: int
    benign: int
    check_errors: int
    leaks: int


def judge(path: str) -> Verdict:
    """qemu-img check of one image: corruptions, the benign COPIED-clear-on-refcount-1 ones among them."""
    p = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True, check=False)
    r = json.loads(p.stdout) if p.stdout.strip() else {"check-errors": 1}
    benign = 0
    for line in p.stderr.splitlines():
        if line.startswith("ERROR OFLAG_COPIED") and line.endswith(" refcount=1"):
            entry = int(line.split("_entry=")[1].split()[0], 16)
            if not entry >> 63:
                benign += 1
    return Verdict(r.get("corruptions", 0), benign, r.get("check-errors", 0), r.get("leaks", 0))


def run_case(case: str, workdir: Path, subsets: list[cs.Subset]) -> None:
    path = tc.BROKEN[case](workdir)
    original = str(workdir / "original.qcow2")
    shutil.copyfile(path, original)
    before = judge(original)
    log = CrashLog()
    log.snapshot_initial(path)
    disk = QcowFile.open_for_check(path, repair=True, host_factory=log.factory())
    result = disk.check("all")
    disk.close()
    assert result.exit_status == check(path)["returncode"]
    writes = sum(1 for op in log.ops if op.kind == "write")
    assert writes, f"{case}: the repair wrote nothing"
    crashed = str(workdir / "crashed.qcow2")

    def examine(st: cs.CrashState) -> str | None:
        with open(crashed, "wb") as f:
            f.write(st.data)
        return verdict_problem(crashed, original, before)
    states = cs.crash_states(log, [path], range(len(log.ops) + 1), subsets, skip_unchanged=False)
    t = cs.judge_states(states, {}, examine, lambda problem, st: [] if problem is None else [problem],
                        lambda st: f"{cs.describe_cut(log, st.cut)}, subset {st.subset}", TOTALS)
    t.assert_none(f"{case}: {t.states} crash states, bad ones:", examples=10)


def verdict_problem(crashed: str, original: str, before: Verdict) -> str | None:
    v = judge(crashed)
    TOTALS["benign"] += v.benign
    if v.check_errors > before.check_errors:
        return f"qemu-img check: {v.check_errors} internal errors (before the repair: {before.check_errors})"
    if v.corruptions - v.benign > before.corruptions:
        return f"qemu-img check: {v.corruptions} corruptions ({v.benign} benign), before the repair {before.corruptions}"
    p = subprocess.run(["qemu-img", "compare", "-q", original, crashed], capture_output=True, text=True, check=False)
    if p.returncode == 2 and "Could not open" in p.stderr:
        # a snapshot table QEMU's open refuses (the original's, kept by a cut before the header
        # switch): compare the active layers with qcowdisk, which opens such images read-only
        if not qcowdisk.compare(original, crashed).identical:
            return "guest data changed (qcowdisk.compare)"
    elif p.returncode != 0:
        return f"guest data changed (qemu-img compare exit {p.returncode}: {p.stdout}{p.stderr})"
    return None


@pytest.mark.parametrize("case", CASES)
def test_repair_cut_by_a_crash_checks_no_worse(case: str, tmp_path: Path) -> None:
    run_case(case, tmp_path, SUBSETS)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_repair_cut_by_a_crash_checks_no_worse_more_subsets(case: str, tmp_path: Path) -> None:
    run_case(case, tmp_path, SLOW_SUBSETS)


def test_repair_then_crash_of_the_next_writer_is_ordinary(tmp_path: Path) -> None:
    """After a repair the image is an ordinary one: written, closed, checked clean."""
    path = tc.BROKEN["refcount-zero"](tmp_path)
    with QcowFile.open_for_check(path, repair=True) as disk:
        assert disk.check("all").exit_status == 0
    with QcowFile.open(path) as disk:
        disk.write_at(0, os.urandom(3 << 20))
    assert check(path)["returncode"] == 0
