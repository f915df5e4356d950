"""Shared pytest configuration: the --runslow flag for long soak and fuzz runs; a small tmpfs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Child Python processes (fuzz workers, crash writers, fork scenarios) must import qcowdisk from
# this checkout, not from wherever an editable install of the package points.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the long soak / fuzz tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long run: use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        raise pytest.UsageError("qemu-img and qemu-io are required (apt-get install -y qemu-utils)")


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A real 4 MiB tmpfs (root only); skipped where mount is not permitted. Yields (dir, resize)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True,
                       check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)

    try:
        yield mnt, grow
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture(autouse=True)
def _cwd_restored():
    """Every test leaves the working directory where it found it: passing tests' tmp dirs are
    deleted (tmp_path_retention_policy), so a leaked chdir would leave later tests in a
    directory that no longer exists."""
    before = os.getcwd()
    yield
    try:
        after = os.getcwd()
    except FileNotFoundError:
        after = "<deleted>"
    if after != before:
        os.chdir(before)
        pytest.fail(f"the test changed the working directory to {after} and did not restore it")
