"""Shared pytest configuration: the --runslow flag for long soak and fuzz runs."""

from __future__ import annotations

import os
import shutil

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
