"""The package as users get it: `python -m build` output, the sdist's contents, a wheel in a fresh venv.

The build runs with `--no-isolation` (the test extra installs `build` and a setuptools new
enough for PEP 639), so the suite needs no network. It builds a copy of the source tree, as a
fresh clone has it, so the checkout gets no build/ or egg-info directories.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import build  # noqa: F401  (the test extra installs it: `python -m build` below needs it)
import pytest

ROOT = Path(__file__).resolve().parent.parent
JUNK = {"__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", "build", "dist", ".git"}
# Directories whose every file the sdist must hold: what the tests import and run, and the docs.
SHIPPED_DIRS = ("tests", "benchmarks", "tools", "docs")


def source_files() -> list[str]:
    """The files a fresh clone has: git's tracked and unignored files, or (in an unpacked sdist) all."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
        return [name for name in out.splitlines() if (ROOT / name).is_file()]
    found = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in JUNK and not d.endswith(".egg-info")]
        found += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files if f != "PKG-INFO"]
    return found


def clean_env() -> dict[str, str]:
    """The environment without what would change the build or the installed package's imports."""
    env = dict(os.environ)
    # PYTHONDONTWRITEBYTECODE makes setuptools warn that byte-compiling is disabled; PYTHONPATH
    # (set by conftest to this checkout) would import qcowdisk from here instead of the wheel.
    for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH"):
        env.pop(name, None)
    return env


class Built:
    """What `python -m build` made from a copy of the tree, and everything it printed."""

    def __init__(self, output: str, sdist: Path, wheel: Path) -> None:
        self.output, self.sdist, self.wheel = output, sdist, wheel


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tree = tmp_path_factory.mktemp("tree")
    for name in source_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(tree)],
                          capture_output=True, text=True, env=clean_env(), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    return Built(output, sdist, wheel)


def test_build_makes_sdist_and_wheel_without_warnings(built: Built) -> None:
    warnings = [line for line in built.output.splitlines() if re.search(r"warn|deprecat", line, re.IGNORECASE)]
    assert warnings == [], "\n".join(warnings)
    assert built.sdist.name == "qcowdisk-0.1.0.tar.gz" and built.wheel.name == "qcowdisk-0.1.0-py3-none-any.whl"


def test_metadata_license_and_entry_points(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as whl:
        names = whl.namelist()
        metadata = whl.read("qcowdisk-0.1.0.dist-info/METADATA").decode()
        entry_points = whl.read("qcowdisk-0.1.0.dist-info/entry_points.txt").decode()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()
    assert "qcowdisk-0.1.0.dist-info/licenses/LICENSE" in names
    assert "[pytest11]\nqcowdisk = qcowdisk.pytest_plugin" in entry_points
    assert "[console_scripts]\nqcowdisk = qcowdisk.cli:main" in entry_points
    assert "qcowdisk/py.typed" in names and "qcowdisk/pytest_plugin.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "tools/"))], "the wheel is the package only"


def test_sdist_holds_what_the_tests_need(built: Built) -> None:
    with tarfile.open(built.sdist) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    expected = {name for name in source_files() if name.split("/", 1)[0] in SHIPPED_DIRS}
    expected |= {"README.md", "LICENSE", "pyproject.toml", "MANIFEST.in", ".ci/run"}
    assert expected - shipped == set(), "missing from the sdist"
    for helper in ("conftest.py", "qemutools.py", "crashsim.py", "faulthost.py", "imagefactory.py", "imagepatch.py",
                   "test_packaging.py", "test_pytest_plugin.py"):
        assert f"tests/{helper}" in shipped
    assert {"docs/guide.md", "tools/quickstart.py", "benchmarks/run_benchmarks.py"} <= shipped
    assert not [n for n in shipped if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_in_a_fresh_venv(built: Built, tmp_path: Path) -> None:
    """A venv that sees the installed dependencies (and pytest) but gets qcowdisk only from the wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python, env = venv / "bin" / "python", clean_env()
    # pip from the base environment (seen through --system-site-packages) installs into the venv;
    # --no-index: nothing is downloaded, the dependencies must already be there.
    install = subprocess.run([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
                              str(built.wheel)], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert install.returncode == 0, install.stdout + install.stderr

    def run(*args: str | Path) -> str:
        proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
        assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    where = run(python, "-c", "import qcowdisk; print(qcowdisk.__file__)")
    assert where.startswith(str(venv)), where
    qcowdisk = venv / "bin" / "qcowdisk"
    assert run(qcowdisk, "--version") == "qcowdisk version 0.1.0\n"
    assert run(qcowdisk, "create", "-f", "qcow2", "-o", "cluster_size=4k", "disk.qcow2", "1G").startswith(
        "Formatting 'disk.qcow2', fmt=qcow2 cluster_size=4096")
    info = run(qcowdisk, "info", "disk.qcow2")
    assert "virtual size: 1 GiB (1073741824 bytes)" in info and "cluster_size: 4096" in info

    # The pytest11 entry point: the fixtures are there with no -p option or conftest line.
    (tmp_path / "test_fixtures.py").write_text(textwrap.dedent("""
        def test_fixture(qcow_image, assert_image_sound):
            assert_image_sound(qcow_image("1M", data={0: b"x"}))
    """))
    out = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_fixtures.py")
    assert "1 passed" in out
