"""Start-up: `import qcowdisk` and a `qcowdisk` command import only what they use.

A short command's time is mostly the interpreter's start and the imports, so the package
imports its engine on first use (a module `__getattr__`), the command line imports only the
subcommand it runs, and the rarer parts (threads, zstandard, ctypes, the amend / resize /
snapshot / check code) are imported where they are used. Each test runs a fresh interpreter
and looks at `sys.modules` after the work, so a new eager import shows up here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qemutools import qemu_img, qemu_io

ROOT = Path(__file__).resolve().parent.parent

# Never needed to import qcowdisk or to convert without compression (ctypes is: allocating
# clusters uses fallocate; `import qcowdisk` must not load it).
HEAVY = ("concurrent.futures", "logging", "zstandard", "socket", "subprocess", "asyncio", "json")
# Slow to import and not needed by a command (about 50 ms of start-up together on a small VM):
# typing and dataclasses (with inspect) are replaced by qcowdisk.record / generic and
# TYPE_CHECKING; shutil is what argparse's default help formatter imports.
STARTUP_HEAVY = ("typing", "dataclasses", "inspect", "shutil", "datetime", "json", "base64")
# The engine's parts for other operations.
ENGINE_ELSEWHERE = ("qcowdisk.qcow2.amend", "qcowdisk.qcow2.resize", "qcowdisk.qcow2.snapshot",
                    "qcowdisk.qcow2.check", "qcowdisk.qcow2.repair", "qcowdisk.nbdserve", "qcowdisk.nbdplugin",
                    "qcowdisk.pytest_plugin", "qcowdisk.stream")
OTHER_COMMANDS = tuple(f"qcowdisk.cli.{c}" for c in ("info", "create", "write", "map", "snapshot", "check", "read",
                                                        "compare", "measure", "commit", "rebase", "amend", "resize",
                                                        "serve"))


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported once `code` has run."""
    script = f"{code}\nimport sys\n_loaded = sorted(sys.modules)\nimport json\nprint(json.dumps(_loaded))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    return set(json.loads(out.splitlines()[-1]))


def added_by(code: str) -> set[str]:
    """The modules `code` imports beyond what the interpreter loads by itself (site hooks of the
    environment, such as a .pth importing certifi, load typing or shutil before any code runs)."""
    return modules_after(code) - modules_after("pass")


def test_import_qcowdisk_imports_the_errors_only() -> None:
    loaded = modules_after("import qcowdisk")
    assert sorted(m for m in loaded if m.startswith("qcowdisk")) == ["qcowdisk", "qcowdisk.errors"]
    assert [m for m in (*HEAVY, "ctypes") if m in loaded] == []


def test_public_names_resolve_on_first_use() -> None:
    loaded = modules_after(
        "import qcowdisk\n"
        "from qcowdisk.qcow2.file import QcowFile\n"
        "from qcowdisk.ops import convert\n"
        "assert qcowdisk.QcowFile is QcowFile and qcowdisk.convert is convert\n"
        "assert set(qcowdisk.__all__) <= set(dir(qcowdisk))\n"
        "ns = {}\n"
        "exec('from qcowdisk import *', ns)\n"
        "assert all(name in ns for name in qcowdisk.__all__)\n"
        "try:\n"
        "    qcowdisk.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert str(e) == \"module 'qcowdisk' has no attribute 'no_such_name'\"\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n")
    assert "qcowdisk.stream" in loaded  # `from qcowdisk import *` resolved qcowdisk.open


def test_opening_an_image_registers_every_format(tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    (tmp_path / "b.raw").write_bytes(bytes(4096))
    loaded = modules_after(
        "import qcowdisk.formats as f\n"
        f"assert f.open_image({str(tmp_path / 'a.qcow2')!r}).format_name == 'qcow2'\n"
        f"assert f.open_image({str(tmp_path / 'b.raw')!r}).format_name == 'raw'\n"
        "assert f.format_names() == ['qcow', 'qcow2', 'raw'], f.format_names()\n")
    assert "qcowdisk.qcow1" in loaded


@pytest.mark.parametrize("out_format", ["qcow2", "raw"])
def test_convert_command_imports_what_it_uses(tmp_path: Path, out_format: str) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), "4M")
    qemu_io(str(src), "write -P 7 0 64k", "write -z 1M 64k")
    dst = tmp_path / f"dst.{out_format}"
    loaded = added_by(
        "import sys\n"
        "from qcowdisk.cli import main\n"
        f"assert main(['convert', '-O', {out_format!r}, {str(src)!r}, {str(dst)!r}]) == 0\n")
    assert qemu_img("compare", str(src), str(dst)).returncode == 0
    assert "qcowdisk.cli.convert" in loaded and "qcowdisk.ops.convert" in loaded
    assert [m for m in (*HEAVY, *STARTUP_HEAVY, *ENGINE_ELSEWHERE, *OTHER_COMMANDS) if m in loaded] == []


@pytest.mark.parametrize("output", ["human", "json"])
def test_info_command_imports_no_slow_module(tmp_path: Path, output: str) -> None:
    """`qcowdisk info` (the shortest common command: start-up is nearly all of it) loads none
    of the slow modules, the other operations or the Image protocol (which needs typing)."""
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "4M")
    loaded = added_by(
        "from qcowdisk.cli import main\n"
        f"assert main(['info', '--output', {output!r}, {str(img)!r}]) == 0\n")
    others = ("qcowdisk.ops.convert", "qcowdisk.ops.commit", "qcowdisk.ops.rebase", "qcowdisk.ops.compare",
              "qcowdisk.ops.measure", "qcowdisk.imageprotocol")
    unwanted = [m for m in (*HEAVY, *STARTUP_HEAVY, *others, *ENGINE_ELSEWHERE) if m in loaded]
    assert [m for m in unwanted if not (output == "json" and m == "json")] == []


def test_help_still_lists_every_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "qcowdisk", "--help"], capture_output=True, text=True, check=True,
                         env=env).stdout
    for command in ("info", "create", "convert", "commit", "rebase", "amend", "resize", "serve", "check"):
        assert f"    {command}" in out
