"""Serving an image over NBD: the nbdkit command line that runs qcowdisk's plugin (`qcowdisk serve`).

nbdkit's Python plugin embeds the system's Python (Debian: /usr/bin/python3's libpython), which
need not be the interpreter qcowdisk is installed in. The plugin (qcowdisk/nbdplugin.py, run by
path) imports qcowdisk and its dependencies, so nbdkit gets a PYTHONPATH naming this package's
parent directory, the site-packages directories of the running interpreter and the directories
the dependencies were imported from. That works only if both interpreters have the same
major.minor version (compiled extensions such as zstandard's are built for one), which is
checked first (`nbdkit python --dump-plugin` says which Python the plugin embeds).
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from .record import FrozenRecord

__all__ = ["ServeError", "ServeOptions", "plugin_path", "embedded_python", "python_path", "nbdkit_command", "check_nbdkit",
           "wait_ready", "serve"]

# What qcowdisk imports at run time, beyond the standard library (pyproject's dependencies).
_DEPENDENCIES = ("zstandard", "filelock")


class ServeError(Exception):
    """The server cannot be started: nbdkit or its Python plugin is missing or incompatible."""


class ServeOptions(FrozenRecord):
    """What `qcowdisk serve` takes: the image and where and how to export it."""

    __slots__ = ("bind", "confine_to", "export_name", "image", "port", "readonly", "socket")
    image: str
    readonly: bool
    socket: str | None     # a Unix socket path; else TCP
    port: int | None       # TCP port (nbdkit's default: 10809)
    bind: str | None       # TCP address to listen on (default: all)
    export_name: str | None  # the one export name served (default: any name)
    confine_to: str | None  # backing and data files must resolve inside this directory

    def __init__(self, image: str, readonly: bool = False, socket: str | None = None, port: int | None = None,
                 bind: str | None = None, export_name: str | None = None, confine_to: str | None = None) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "image", image)
        setattr_(self, "readonly", readonly)
        setattr_(self, "socket", socket)
        setattr_(self, "port", port)
        setattr_(self, "bind", bind)
        setattr_(self, "export_name", export_name)
        setattr_(self, "confine_to", confine_to)


def plugin_path() -> str:
    """The plugin file nbdkit runs (this package's nbdplugin.py)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbdplugin.py")


def embedded_python(nbdkit: str = "nbdkit") -> tuple[int, int]:
    """(major, minor) of the Python that nbdkit's python plugin embeds."""
    try:
        p = subprocess.run([nbdkit, "python", "--dump-plugin"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ServeError(f"{nbdkit} not found: install nbdkit and its Python plugin "
                         f"(Debian: apt-get install nbdkit nbdkit-plugin-python)") from None
    for line in p.stdout.splitlines():
        if line.startswith("python_version="):
            parts = line.split("=", 1)[1].split(".")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                return int(parts[0]), int(parts[1])
    raise ServeError(f"nbdkit's Python plugin is not available ({nbdkit} python --dump-plugin: "
                     f"{(p.stderr.strip() or p.stdout.strip() or 'no python_version')}); "
                     f"Debian: apt-get install nbdkit-plugin-python")


def python_path() -> list[str]:
    """Directories nbdkit's Python needs on its path to import qcowdisk and its dependencies."""
    dirs = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    dirs += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    for name in _DEPENDENCIES:  # wherever they were really imported from (a venv, --target, ...)
        module = sys.modules.get(name) or _import(name)
        where = getattr(module, "__file__", None)
        if where:
            dirs.append(os.path.dirname(os.path.dirname(os.path.abspath(where))))
    out: list[str] = []
    for d in dirs:
        if d not in out and os.path.isdir(d):
            out.append(d)
    return out


def _import(name: str) -> object:
    try:
        return __import__(name)
    except ImportError:
        return None


def nbdkit_command(options: ServeOptions, nbdkit: str = "nbdkit",
                   environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The nbdkit command line (in the foreground) and its environment for `options`."""
    if options.socket is not None and (options.port is not None or options.bind is not None):
        raise ValueError("--socket cannot be combined with --port or --bind")
    argv = [nbdkit, "-f"]
    if options.readonly:
        argv.append("--readonly")
    if options.socket is not None:
        argv += ["--unix", options.socket]
    else:
        if options.port is not None:
            argv += ["--port", str(options.port)]
        if options.bind is not None:
            argv += ["--ipaddr", options.bind]
    if options.export_name is not None:
        argv += ["--exportname", options.export_name]
    argv += ["python", plugin_path(), f"file={os.path.abspath(options.image)}",
             f"readonly={'true' if options.readonly else 'false'}"]
    if options.confine_to is not None:
        argv.append(f"confine-to={os.path.abspath(options.confine_to)}")
    if options.export_name is not None:
        argv.append(f"export={options.export_name}")
    env = dict(os.environ if environ is None else environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(python_path() + [p for p in inherited if p not in python_path()])
    return argv, env


def check_nbdkit(nbdkit: str = "nbdkit") -> str:
    """The nbdkit executable's path, after checking its Python plugin can run qcowdisk."""
    found = shutil.which(nbdkit)
    if found is None:
        raise ServeError(f"{nbdkit} not found: install nbdkit and its Python plugin "
                         f"(Debian: apt-get install nbdkit nbdkit-plugin-python)")
    embedded = embedded_python(found)
    here = sys.version_info[:2]
    if embedded != here:
        raise ServeError(
            f"nbdkit's Python plugin embeds Python {embedded[0]}.{embedded[1]}, but qcowdisk runs under "
            f"Python {here[0]}.{here[1]} ({sys.executable}): their compiled modules are not interchangeable. "
            f"Install qcowdisk for Python {embedded[0]}.{embedded[1]} and run 'qcowdisk serve' with that interpreter")
    return found


def wait_ready(address: str | tuple[str, int], timeout: float = 60.0,
               proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll an NBD server (a Unix socket path, or a (host, port)) until it sends NBD's greeting:
    True; False if `proc` exits first; TimeoutError after `timeout` seconds."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
            try:
                s.connect(address)
                if s.recv(8) == b"NBDMAGIC":
                    return True
            except OSError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"no NBD server answered at {address!r} within {timeout} s")


def serve(options: ServeOptions, nbdkit: str = "nbdkit", extra_args: Sequence[str] = ()) -> int:
    """Run nbdkit serving the image until it exits; returns its exit status (0 after a clean stop).

    nbdkit alone, on SIGTERM, stops accepting connections but then waits for every connected
    client to hang up, however long that takes. So this process stays in front of it: on
    SIGTERM, SIGINT or SIGHUP it closes its end of a pipe whose other end the plugin watches
    (`shutdown-fd=`), and the plugin asks nbdkit to shut down and disconnects the clients; nbdkit
    then closes the image (flushed, dirty bit cleared, lock released) and exits 0. The pipe also
    closes if this process is killed, so nbdkit never outlives it.
    """
    path = check_nbdkit(nbdkit)
    argv, env = nbdkit_command(options, path)
    argv[1:1] = list(extra_args)
    r, w = os.pipe()
    argv.append(f"shutdown-fd={r}")
    pipe = [w]

    def stop(signum: int, frame: object) -> None:
        if pipe:
            os.close(pipe.pop())

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        try:
            proc = subprocess.Popen(argv, env=env, pass_fds=(r,))
        finally:
            os.close(r)
        rc = proc.wait()
    finally:
        stop(0, None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return rc if rc >= 0 else 128 - rc
