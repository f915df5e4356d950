"""Helpers that drive the real QEMU tools (the oracle) from tests."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise with its output on failure when `check`."""
    p = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `qemu-img ARGS`."""
    return run("qemu-img", *args, check=check)


def qemu_io(image: str, *commands: str, fmt: str | None = "qcow2", extra: tuple[str, ...] = ()) -> str:
    """Run qemu-io with each command as a -c; fail if any command reports an error."""
    args = ["qemu-io"]
    if fmt:
        args += ["-f", fmt]
    args += list(extra)
    for c in commands:
        args += ["-c", c]
    args.append(image)
    p = run(*args)
    out = p.stdout + p.stderr
    for line in out.splitlines():
        low = line.lower()
        if "error" in low or "failed" in low or "not found" in low or "invalid" in low:
            raise AssertionError(f"qemu-io reported: {line}\nfull output:\n{out}")
    return out


def create(path: str, size: str | int, fmt: str = "qcow2", options: str | None = None,
           backing: str | None = None, backing_fmt: str | None = None) -> str:
    """qemu-img create; returns path."""
    args = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", options]
    if backing:
        args += ["-b", backing]
        if backing_fmt:
            args += ["-F", backing_fmt]
    args += [path, str(size)]
    qemu_img(*args)
    return path


def to_raw(image: str, out: str, fmt: str | None = None) -> bytes:
    """The guest view according to QEMU: `qemu-img convert -O raw`, returned as bytes."""
    args = ["convert"]
    if fmt:
        args += ["-f", fmt]
    args += ["-O", "raw", image, out]
    qemu_img(*args)
    with open(out, "rb") as f:
        return f.read()


def check(image: str) -> dict[str, Any]:
    """`qemu-img check --output=json`, parsed; includes the exit code as 'returncode'."""
    p = qemu_img("check", "--output=json", image, check=False)
    try:
        result = json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"qemu-img check failed to run: {p.stdout}\n{p.stderr}") from e
    result["returncode"] = p.returncode
    return result


def assert_clean(image: str) -> None:
    """qemu-img check finds no corruption and no leaks."""
    r = check(image)
    assert r["returncode"] == 0, f"qemu-img check {image}: {r}"
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0, r
    assert r.get("check-errors", 0) == 0, r


def assert_no_corruption(image: str) -> None:
    """qemu-img check finds no corruption (leaks allowed)."""
    r = check(image)
    assert r["returncode"] in (0, 3), f"qemu-img check {image}: {r}"
    assert r.get("corruptions", 0) == 0 and r.get("check-errors", 0) == 0, r


def compare(a: str, b: str, fmt_a: str | None = None, fmt_b: str | None = None, strict: bool = False) -> None:
    """`qemu-img compare` must find the two images identical."""
    args = ["compare", "-q"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    if strict:
        args.append("-s")
    args += [a, b]
    p = qemu_img(*args, check=False)
    assert p.returncode == 0, f"qemu-img compare {a} {b}: exit {p.returncode} {p.stdout}{p.stderr}"


def info(image: str, *extra: str) -> dict[str, Any]:
    """`qemu-img info --output=json`, parsed."""
    return json.loads(qemu_img("info", "--output=json", *extra, image).stdout)


def copy_sparse(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a file keeping its holes (shutil.copy writes every zero: 64 MiB per raw backing file
    per test adds up to gigabytes over a suite run)."""
    subprocess.run(["cp", "--sparse=always", os.fspath(src), os.fspath(dst)], check=True)


def write_raw(path: str, data: bytes) -> str:
    """Write bytes to a raw file; returns path."""
    with open(path, "wb") as f:
        f.write(data)
    return path


def pattern(length: int, seed: int = 0) -> bytes:
    """Deterministic non-repeating test data (os.urandom would make failures irreproducible)."""
    import random
    return random.Random(seed).randbytes(length)


__all__ = ["run", "qemu_img", "qemu_io", "create", "to_raw", "check", "assert_clean",
           "assert_no_corruption", "compare", "info", "write_raw", "pattern", "os"]


@contextlib.contextmanager
def qemu_io_holding(image: str, fmt: str = "qcow2") -> Iterator[subprocess.Popen[bytes]]:
    """An interactive qemu-io with the image open for writing (its locks held) until the block
    ends; `qemu_io_send` runs commands in it."""
    p = subprocess.Popen(["qemu-io", "-f", fmt, image], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    assert p.stdin is not None and p.stdout is not None
    try:
        # Its first prompt comes once the image is open. (Not polled with qemu-img info: that
        # takes a shared lock, and qemu-io's open fails if it comes in between.)
        _until_prompt(p)
        yield p
    finally:
        p.stdin.close()  # end of input: qemu-io quits
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            p.send_signal(signal.SIGKILL)
            p.wait()
        p.stdout.close()


def _until_prompt(p: subprocess.Popen[bytes]) -> str:
    """qemu-io's output up to its next prompt (which is left out)."""
    assert p.stdout is not None
    seen = b""
    deadline = time.monotonic() + 30
    while not seen.endswith(b"qemu-io> "):
        assert select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0], seen
        chunk = p.stdout.read1(4096)
        assert chunk, f"qemu-io exited: {seen!r}"
        seen += chunk
    return seen[:-len(b"qemu-io> ")].decode()


def qemu_io_send(p: subprocess.Popen[bytes], command: str) -> str:
    """Run one command in a `qemu_io_holding` qemu-io; its output, failing if it reports an error."""
    assert p.stdin is not None
    p.stdin.write(command.encode() + b"\n")
    p.stdin.flush()
    out = _until_prompt(p)
    low = out.lower()
    assert "error" not in low and "failed" not in low and "pattern verification" not in low, out
    return out
