"""qcowdisk's command line run in-process next to qemu-img's, from the same working directory.

The CLI tests compare the two tools' exit status, stdout and stderr for the same arguments:
`qemu_img_in` runs `qemu-img COMMAND ARGS` as a process, `qcowdisk_in` runs `qcowdisk COMMAND
ARGS` through `qcowdisk.cli.main` in this process, and `same_as_qemu_img` asserts that both
answer alike (qcowdisk's program name in its messages read as qemu-img's).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from qcowdisk import cli

Result = tuple[int, str, str]
"""(exit status, stdout, stderr)."""


def qemu_img_in(cwd: str | Path, command: str, args: Sequence[str]) -> Result:
    """`qemu-img COMMAND ARGS` run in `cwd` (QEMU 7.2 opens relative file names from there)."""
    p = subprocess.run(["qemu-img", command, *args], cwd=cwd, capture_output=True, text=True, check=False)
    return p.returncode, p.stdout, p.stderr


def qcowdisk_in(cwd: str | Path, command: str, args: Sequence[str], *, as_qemu_img: bool = False) -> Result:
    """`qcowdisk COMMAND ARGS` in this process, in `cwd`, with stdout and stderr captured; with
    `as_qemu_img`, the program name in stderr reads as qemu-img's."""
    out, err = _capture(), _capture()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main([command, *args])
    finally:
        os.chdir(old)
    text = _text(err)
    return status, _text(out), text.replace("qcowdisk", "qemu-img") if as_qemu_img else text


def same_as_qemu_img(cwd: str | Path, command: str, args: Sequence[str]) -> Result:
    """Both tools answer `COMMAND ARGS` in `cwd` with the same exit status, stdout and stderr
    (qcowdisk's program name read as qemu-img's); returns qemu-img's answer."""
    expected = qemu_img_in(cwd, command, args)
    assert qcowdisk_in(cwd, command, args, as_qemu_img=True) == expected, \
        f"qemu-img {command} {' '.join(args)} in {cwd}"
    return expected


def _capture() -> io.TextIOWrapper:
    # A text stream with a binary .buffer underneath, as sys.stdout has (a StringIO has none).
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="", write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode("utf-8")
