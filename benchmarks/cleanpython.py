"""The `qcowdisk` command as an installed user runs it, for timing whole processes.

A user installs qcowdisk into a venv (or a distribution's Python) and runs the `qcowdisk`
console script. Timing `sys.executable -m qcowdisk` instead charges qcowdisk with whatever the
benchmarking interpreter's site-packages run at start-up: `.pth` hooks (a container's CA
injection importing certifi, editable-install finders) cost 50-100 ms on some machines, more
than qcowdisk's own imports. So the command runs from a throwaway venv (no pip, no system
site-packages) whose one `.pth` line puts this source tree and the benchmarking interpreter's
site-packages (for zstandard and filelock) on sys.path: paths named in a `.pth` file are added,
their own `.pth` files are not run. Its script is what pip writes for a console script, and
bytecode is cached (PYTHONPYCACHEPREFIX), as an installed package has it.

    python3 benchmarks/cleanpython.py      # prints the start-up of each interpreter
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# what pip writes for the `qcowdisk = qcowdisk.cli:main` console script
_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from qcowdisk.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


class CleanPython:
    """A venv under `where` that imports qcowdisk from this tree: `python` (its interpreter),
    `qcowdisk` (the console script) and `env` (the environment to run either with)."""

    def __init__(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        root = where / "venv"
        venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(root)
        self.python = str(root / "bin" / "python")
        purelib = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
        Path(purelib, "qcowdisk-bench.pth").write_text("\n".join([str(REPO), *deps]) + "\n")
        self.qcowdisk = str(root / "bin" / "qcowdisk")
        Path(self.qcowdisk).write_text(_SCRIPT.format(python=self.python))
        os.chmod(self.qcowdisk, 0o755)
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
        self.env["PYTHONPYCACHEPREFIX"] = str(where / "pycache")
        # compile every module once, untimed (an installed package ships its bytecode)
        subprocess.run([self.python, "-c", "import qcowdisk.cli, qcowdisk.cli.convert"], env=self.env, check=True)


def startup_ms(cmd: list[str], env: dict[str, str] | None = None, repeat: int = 20) -> float:
    """The fastest of `repeat` runs of `cmd`, in milliseconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


MEASURE = ["measure", "--size", "1G"]  # a whole command that needs no image


def main() -> int:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        clean = CleanPython(Path(d))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        rows = [("this interpreter: python -c pass", startup_ms([sys.executable, "-c", "pass"])),
                ("clean venv: python -c pass", startup_ms([clean.python, "-c", "pass"], clean.env)),
                ("clean venv: qcowdisk measure --size 1G", startup_ms([clean.qcowdisk, *MEASURE], clean.env)),
                ("this interpreter: python -m qcowdisk measure --size 1G",
                 startup_ms([sys.executable, "-m", "qcowdisk", *MEASURE], env)),
                ("qemu-img measure --size 1G", startup_ms(["qemu-img", *MEASURE]))]
    for name, ms in rows:
        print(f"{ms:7.1f} ms  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
