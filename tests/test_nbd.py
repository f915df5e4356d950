"""Serving an image over NBD through nbdkit (qcowdisk/nbdplugin.py, `qcowdisk serve`).

Real clients talk to the server: qemu-io, qemu-img, nbdinfo and nbdcopy, over a Unix socket and
over loopback TCP; afterwards the image is checked with qemu-img and read with qcowdisk. The
request handlers' errno mapping is also tested in-process, with a stand-in for nbdkit's module.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from faulthost import FaultPlan
from qcowdisk import ImageLockedError, QcowFile
from qcowdisk import nbdplugin as plugin
from qcowdisk.nbdserve import ServeError, ServeOptions, check_nbdkit, nbdkit_command, wait_ready
from qemutools import (
    assert_clean,
    assert_no_corruption,
    create,
    info,
    pattern,
    qemu_img,
    qemu_io,
    qemu_io_holding,
    qemu_io_send,
    run,
)

MiB = 1 << 20
SERVE = [sys.executable, "-m", "qcowdisk", "serve"]


def _nbdkit_problem() -> str | None:
    try:
        check_nbdkit()
    except ServeError as e:
        return str(e)
    for tool in ("nbdinfo", "nbdcopy"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install libnbd-bin)"
    return None


_PROBLEM = _nbdkit_problem()
needs_nbdkit = pytest.mark.skipif(_PROBLEM is not None, reason=f"cannot serve over NBD here: {_PROBLEM}")


# ---------------------------------------------------------------------- the server
@dataclass
class Server:
    """A running `qcowdisk serve` and how to reach it."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    address: str | tuple[str, int]
    stopped: int | None = field(default=None)

    def output(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then its exit status."""
        if self.stopped is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.stopped = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"the server ignored SIGTERM for 60 s:\n{self.output()}")
        return self.stopped


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(image: Path, *, tcp: bool = False, readonly: bool = False, export_name: str | None = None,
            extra: tuple[str, ...] = ()) -> Iterator[Server]:
    """`qcowdisk serve` the image until the block ends (then SIGTERM, and SIGKILL if that hangs)."""
    sockdir = tempfile.mkdtemp(prefix="qd-nbd-")  # short: a Unix socket path has ~107 bytes
    log = Path(sockdir) / "server.log"
    server: Server | None = None
    try:
        for _attempt in range(5):  # a TCP port picked free may be taken before nbdkit binds it
            args = [*SERVE, *extra]
            if readonly:
                args.append("--readonly")
            if export_name is not None:
                args += ["--export-name", export_name]
            path = "/" + (export_name or "")
            address: str | tuple[str, int]
            if tcp:
                port = _free_port()
                args += ["--port", str(port), "--bind", "127.0.0.1"]
                address, url = ("127.0.0.1", port), f"nbd://127.0.0.1:{port}{path}"
            else:
                address = os.path.join(sockdir, "sock")
                args += ["--socket", address]
                url = f"nbd+unix://{path}?socket={address}"
            args.append(str(image))
            with open(log, "wb") as out:
                proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
            server = Server(proc, url, log, address)
            try:
                if wait_ready(address, 60, proc):
                    break
            except TimeoutError:
                pytest.fail(f"the server was not ready within 60 s:\n{server.output()}")
            if not (tcp and "in use" in server.output()):
                pytest.fail(f"the server exited with {proc.returncode}:\n{server.output()}")
        else:  # pragma: no cover
            pytest.fail("no free TCP port in 5 attempts")
        yield server
    finally:
        if server is not None and server.proc.poll() is None:
            server.stop()  # SIGTERM: gone, image closed, when this returns (else SIGKILL and fail)
        shutil.rmtree(sockdir, ignore_errors=True)


# ---------------------------------------------------------------------- images and views
def mixed_image(tmp_path: Path, size: str = "64M") -> Path:
    """An overlay on a backing file, holding every kind of range: data (also unaligned), zero
    clusters, compressed clusters, discarded clusters, ranges read through from the backing file."""
    base = Path(create(str(tmp_path / "base.qcow2"), size))
    qemu_io(str(base), "write -P 0x11 0 4M", "write -P 0x22 12M 2M", "write -c -P 0x33 20M 1M")
    top = Path(create(str(tmp_path / "top.qcow2"), size, options="lazy_refcounts=on",
                      backing="base.qcow2", backing_fmt="qcow2"))
    qemu_io(str(top), "write -P 0x44 1M 1M", "write -P 0x55 5000 70000", "write -z 2M 512k", "write -z -u 12M 1M",
            "write -c -P 0x66 30M 256k", "discard 3M 64k", "write -P 0x77 40M 3M")
    return top


def guest_view(image: Path) -> bytes:
    """The guest disk as qcowdisk reads it."""
    with QcowFile.open(image, readonly=True) as disk:
        return disk.read_at(0, disk.virtual_size)


def runs(entries: list[tuple[int, int, bool, bool]]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) entries merged where neighbours agree."""
    out: list[tuple[int, int, bool, bool]] = []
    for start, length, data, zero in entries:
        if out and out[-1][2:] == (data, zero) and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, data, zero)
        else:
            out.append((start, length, data, zero))
    return out


def nbd_map(url: str) -> list[tuple[int, int, bool, bool]]:
    """`nbdinfo --map` as (start, length, data, zero) runs: data = not a hole."""
    got = json.loads(run("nbdinfo", "--map", "--json", url).stdout)
    return runs([(e["offset"], e["length"], not e["type"] & 1, bool(e["type"] & 2)) for e in got])


def qemu_map(image: Path, *extra: str) -> list[tuple[int, int, bool, bool]]:
    """`qemu-img map --output=json` as (start, length, data, zero) runs."""
    got = json.loads(qemu_img("map", "--output=json", *extra, str(image)).stdout)
    return runs([(e["start"], e["length"], e["data"], e["zero"]) for e in got])


def status_at(m: list[tuple[int, int, bool, bool]], offset: int) -> tuple[bool, bool]:
    """(data, zero) of the run covering `offset`."""
    return next((d, z) for start, n, d, z in m if start <= offset < start + n)


def refused_writer(image: Path) -> str:
    """A qemu-io writer on the image file must be refused: its message."""
    p = run("qemu-io", "-f", "qcow2", "-c", "write 0 512", str(image), check=False)
    assert p.returncode != 0, f"qemu-io could write the served image:\n{p.stdout}{p.stderr}"
    assert 'Failed to get "write" lock' in p.stderr, p.stderr
    return p.stderr


# ---------------------------------------------------------------------- through real clients
@needs_nbdkit
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_io_writes_and_reads(tmp_path: Path, tcp: bool) -> None:
    """qemu-io writes (aligned, unaligned, zeroes with and without unmap, discard) and reads
    back through NBD; after the server stops, qcowdisk reads what was written and the image
    checks clean (its dirty bit cleared: lazy refcounts)."""
    img = mixed_image(tmp_path)
    expect = bytearray(guest_view(img))
    data = pattern(300_000, seed=7)
    with serving(img, tcp=tcp) as srv:
        qemu_io(srv.url, "write -P 0x5a 8M 256k", "write -z 9M 128k", "write -z -u 40M 1M", "discard 12M 2M",
                "read -P 0x5a 8M 256k", "read -P 0 9M 128k", "read -P 0 40M 1M", "read -P 0x77 41M 2M", fmt="raw")
        write_raw = tmp_path / "data.bin"
        write_raw.write_bytes(data)
        qemu_io(srv.url, f"write -s {write_raw} 123457 {len(data)}", "flush", fmt="raw")
        out = qemu_io(srv.url, "read -v 123457 16", fmt="raw")
        assert data[:16].hex(" ") in out.replace("  ", " "), out
        assert srv.stop() == 0, srv.output()
    expect[8 * MiB:8 * MiB + 256 * 1024] = b"\x5a" * (256 * 1024)
    expect[9 * MiB:9 * MiB + 128 * 1024] = bytes(128 * 1024)
    expect[40 * MiB:41 * MiB] = bytes(MiB)
    expect[12 * MiB:14 * MiB] = bytes(2 * MiB)
    expect[123457:123457 + len(data)] = data
    assert guest_view(img) == expect
    assert_clean(str(img))
    assert info(str(img))["dirty-flag"] is False
    # The zeroes without unmap stay allocated; with unmap and discard they are not.
    m = qemu_map(img)
    assert status_at(m, 9 * MiB)[0] is True, m
    assert status_at(m, 40 * MiB) == status_at(m, 12 * MiB) == (False, True), m


@needs_nbdkit
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_img_convert_and_compare_through_nbd(tmp_path: Path, tcp: bool) -> None:
    """What qemu-img reads through NBD equals the image (read-only export, so qemu-img may open the
    image beside it; and read-write, compared with -U)."""
    img = mixed_image(tmp_path)
    with serving(img, tcp=tcp, readonly=True) as srv:
        qemu_img("convert", "-f", "raw", "-O", "raw", srv.url, str(tmp_path / "out.raw"))
        qemu_img("compare", "-f", "raw", "-F", "qcow2", srv.url, str(img))
        assert srv.stop() == 0
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "out.raw"), str(img))
    assert (tmp_path / "out.raw").read_bytes() == guest_view(img)
    with serving(img, tcp=tcp) as srv:
        qemu_img("convert", "-f", "raw", "-O", "qcow2", srv.url, str(tmp_path / "out.qcow2"))
        qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", srv.url, str(img))
        assert srv.stop() == 0
    qemu_img("compare", str(tmp_path / "out.qcow2"), str(img))


@needs_nbdkit
def test_nbdinfo_map_agrees_with_qemu_img_map(tmp_path: Path) -> None:
    """base:allocation through NBD says what qemu-img map says of the image: data, zero, holes;
    also for a sub-range, and the export's flags tell the truth."""
    img = mixed_image(tmp_path)
    expected = qemu_map(img)
    assert {(d, z) for _s, _n, d, z in expected} >= {(True, False), (False, True)}, expected
    with serving(img, readonly=True) as srv:
        assert nbd_map(srv.url) == expected
        shown = run("nbdinfo", srv.url).stdout
        assert "can_multi_conn: true" in shown and "is_read_only: true" in shown, shown
    with serving(img) as srv:
        assert nbd_map(srv.url) == qemu_map(img, "-U")
        part = json.loads(run("nbdinfo", "--map", "--json", "--totals", srv.url).stdout)
        assert sum(e["size"] for e in part) == 64 * MiB, part
        shown = run("nbdinfo", srv.url).stdout
        for flag in ("can_multi_conn", "can_trim", "can_zero", "can_fast_zero", "can_fua", "can_flush"):
            assert f"{flag}: true" in shown, shown
        assert "is_read_only: false" in shown, shown


@needs_nbdkit
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdcopy_out_and_in(tmp_path: Path, tcp: bool) -> None:
    """nbdcopy copies the disk out (several connections: multi-conn) and a sparse raw file in."""
    img = mixed_image(tmp_path)
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:  # data, a hole, data that is all zeros, more data
        f.truncate(64 * MiB)
        f.seek(MiB + 17)
        f.write(pattern(3 * MiB, seed=3))
        f.seek(20 * MiB)
        f.write(bytes(2 * MiB))
        f.seek(60 * MiB)
        f.write(pattern(MiB, seed=4))
    before = guest_view(img)
    with serving(img, tcp=tcp) as srv:
        run("nbdcopy", "--connections=4", srv.url, str(tmp_path / "out.raw"))
        assert (tmp_path / "out.raw").read_bytes() == before
        run("nbdcopy", "--flush", str(src), srv.url)
        assert srv.stop() == 0, srv.output()
    assert guest_view(img) == src.read_bytes()
    assert_clean(str(img))
    # nbdcopy zeroes what reads as zeros (holes, and the zero-filled data): nothing stays allocated there.
    m = qemu_map(img)
    assert all(not data for start, n, data, _z in m if start >= 30 * MiB and start + n <= 60 * MiB), m


@needs_nbdkit
def test_readonly_export_refuses_writes(tmp_path: Path) -> None:
    """--readonly: the export is read-only (writers are refused), the image stays as it was, and
    other readers may open the image meanwhile (a shared read lock), writers may not."""
    img = mixed_image(tmp_path)
    before = img.read_bytes()
    with serving(img, readonly=True) as srv:
        p = run("qemu-io", "-f", "raw", "-c", "write 0 512", srv.url, check=False)
        assert p.returncode != 0 and "Permission denied" in p.stderr, p.stderr
        p = run("nbdcopy", str(tmp_path / "base.qcow2"), srv.url, check=False)
        assert p.returncode != 0 and "read-only" in p.stderr, p.stderr
        qemu_io(srv.url, "read -P 0x44 1M 1M", fmt="raw", extra=("-r",))
        info(str(img))  # a reader beside the server
        refused_writer(img)
        assert srv.stop() == 0
    assert img.read_bytes() == before


@needs_nbdkit
def test_two_clients_at_once(tmp_path: Path) -> None:
    """Two connected clients see each other's writes (one engine, multi-conn)."""
    img = Path(create(str(tmp_path / "a.qcow2"), "16M"))
    with serving(img) as srv, qemu_io_holding(srv.url, fmt="raw") as a, qemu_io_holding(srv.url, fmt="raw") as b:
        qemu_io_send(a, "write -P 0xa1 0 64k")
        qemu_io_send(a, "flush")
        qemu_io_send(b, "read -P 0xa1 0 64k")
        qemu_io_send(b, "write -P 0xb2 1M 100000")
        qemu_io_send(b, "flush")
        qemu_io_send(a, "read -P 0xb2 1M 100000")
        qemu_io(srv.url, "read -P 0xa1 0 64k", "read -P 0xb2 1M 100000", fmt="raw")  # a third
    with QcowFile.open(img, readonly=True) as disk:
        assert disk.read_at(0, 65536) == b"\xa1" * 65536
        assert disk.read_at(MiB, 100000) == b"\xb2" * 100000


@needs_nbdkit
def test_image_stays_locked_while_serving(tmp_path: Path) -> None:
    """The server holds the image's write lock from start to exit, with and without a client."""
    img = Path(create(str(tmp_path / "a.qcow2"), "16M"))
    with serving(img) as srv:
        refused_writer(img)                  # no client connected
        with pytest.raises(ImageLockedError):
            QcowFile.open(img)
        with qemu_io_holding(srv.url, fmt="raw") as client:
            qemu_io_send(client, "write -P 0x42 0 4096")
            refused_writer(img)              # a client connected
        time.sleep(0.2)
        refused_writer(img)                  # and after it left
        assert srv.stop() == 0
    qemu_io(str(img), "read -P 0x42 0 4096", "write 4096 512")  # released on exit


@needs_nbdkit
def test_sigterm_stops_cleanly_with_everything_flushed(tmp_path: Path) -> None:
    """SIGTERM while a client is still connected: exit status 0; the write acknowledged with a
    flush is in the image, so is a write that was not flushed, and the image was closed cleanly
    (dirty bit cleared, no leaks)."""
    img = Path(create(str(tmp_path / "a.qcow2"), "16M", options="lazy_refcounts=on"))
    with serving(img) as srv, qemu_io_holding(srv.url, fmt="raw") as client:
        qemu_io_send(client, "write -P 0x61 64k 192k")
        qemu_io_send(client, "flush")
        qemu_io_send(client, "write -P 0x62 2M 64k")
        assert info(str(img), "-U")["dirty-flag"] is True
        assert srv.stop() == 0, srv.output()
    assert info(str(img))["dirty-flag"] is False
    assert_clean(str(img))
    qemu_io(str(img), "read -P 0x61 64k 192k", "read -P 0x62 2M 64k", "read -P 0 0 64k")


@needs_nbdkit
def test_enospc_reaches_the_client(small_tmpfs, tmp_path: Path) -> None:
    """The file system fills up: the client's write fails with ENOSPC, later writes with EIO (the
    failed state), reads go on working; the image has no corruption and keeps what was flushed."""
    mnt, grow = small_tmpfs
    img = Path(create(str(mnt / "a.qcow2"), "64M"))
    with serving(img) as srv:
        qemu_io(srv.url, "write -P 0x71 0 1M", "flush", fmt="raw")
        p = run("qemu-io", "-f", "raw", "-c", "write -P 0x72 8M 8M", srv.url, check=False)
        assert "write failed: No space left on device" in p.stdout + p.stderr, p.stdout + p.stderr
        p = run("qemu-io", "-f", "raw", "-c", "write -P 0x73 0 4k", srv.url, check=False)
        assert "write failed: Input/output error" in p.stdout + p.stderr, p.stdout + p.stderr
        qemu_io(srv.url, "read -P 0x71 0 1M", fmt="raw")
        status, out = srv.stop(), srv.output()
    assert status == 1 and "failed state" in out, (status, out)  # no clean close claimed
    grow()
    assert_no_corruption(str(img))
    qemu_io(str(img), "read -P 0x71 0 1M")


@needs_nbdkit
def test_nbdkit_does_not_outlive_serve(tmp_path: Path) -> None:
    """`qcowdisk serve` killed outright (SIGKILL): nbdkit notices (the pipe closes), disconnects
    its client, closes the image cleanly and exits, releasing the lock."""
    img = Path(create(str(tmp_path / "a.qcow2"), "16M", options="lazy_refcounts=on"))
    with serving(img) as srv, qemu_io_holding(srv.url, fmt="raw") as client:
        qemu_io_send(client, "write -P 0x63 0 64k")
        srv.proc.kill()
        srv.proc.wait()
        deadline = time.monotonic() + 60
        while True:
            p = run("qemu-io", "-f", "qcow2", "-c", "read -P 0x63 0 64k", str(img), check=False)
            if p.returncode == 0:
                break
            assert "lock" in p.stderr and time.monotonic() < deadline, p.stderr
            time.sleep(0.1)
    assert info(str(img))["dirty-flag"] is False
    assert_clean(str(img))


@needs_nbdkit
def test_export_name_and_refusals(tmp_path: Path) -> None:
    """--export-name: that name (and the default, "") is served, others are refused; a missing
    image or one already locked stops the server at once with a one-line message."""
    img = Path(create(str(tmp_path / "a.qcow2"), "16M"))
    with serving(img, export_name="disk0") as srv:
        assert srv.url.endswith("/disk0?socket=" + str(srv.address))
        qemu_io(srv.url, "write -P 0x10 0 4k", fmt="raw")
        p = run("nbdinfo", srv.url.replace("/disk0?", "/other?"), check=False)
        assert p.returncode != 0 and "other" in p.stderr, p.stderr
        listed = run("nbdinfo", "--list", "--json", srv.url).stdout
        assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["disk0"], listed
    p = run(*SERVE, "--socket", str(tmp_path / "s"), str(tmp_path / "missing"), check=False)
    assert p.returncode == 1 and p.stderr.startswith("qcowdisk: Could not open"), p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    with qemu_io_holding(str(img)):
        p = run(*SERVE, "--socket", str(tmp_path / "s"), str(img), check=False)
    assert p.returncode == 1 and "lock" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------- the handlers, in-process
class FakeNbdkit:
    """What the plugin uses of nbdkit's module: set_error (recorded) and the export name."""

    def __init__(self) -> None:
        self.errors: list[int] = []

    def set_error(self, err: int) -> None:
        self.errors.append(err)

    def export_name(self) -> str:
        return ""


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNbdkit]:
    """The plugin's module state, with a stand-in nbdkit, restored afterwards."""
    f = FakeNbdkit()
    monkeypatch.setattr(plugin, "nbdkit", f)
    monkeypatch.setattr(plugin, "_server", plugin._Server(plugin.Settings()))
    monkeypatch.setattr(plugin, "_settings", plugin._server.settings)
    yield f
    if plugin._server.export is not None:  # not plugin.cleanup(): on a failed close it ends the process
        with contextlib.suppress(Exception):
            plugin._server.export.close()


def test_errors_carry_the_right_errno(tmp_path: Path, fake: FakeNbdkit) -> None:
    """ENOSPC from the host reaches the client as ENOSPC, later writes as EIO (the failed state);
    reading still works; a range outside the disk is EINVAL."""
    path = str(tmp_path / "a.qcow2")
    QcowFile.create(path, 16 * MiB).close()
    plan = FaultPlan()
    plugin._server.export = plugin.Export(QcowFile.open(path, host_factory=plan.factory()))
    plugin.pwrite(None, memoryview(b"\x01" * 4096), 0, 0)
    plan.arm("write", errno.ENOSPC, persistent=True)
    with pytest.raises(OSError, match="No space"):
        plugin.pwrite(None, memoryview(b"\x02" * 65536), 4 * MiB, 0)
    with pytest.raises(Exception, match="failed state"):
        plugin.flush(None, 0)
    assert fake.errors == [errno.ENOSPC, errno.EIO]
    buf = bytearray(4096)
    plugin.pread(None, memoryview(buf), 0, 0)
    assert buf == b"\x01" * 4096
    with pytest.raises(ValueError, match="past the virtual size"):
        plugin.pread(None, memoryview(bytearray(4096)), 16 * MiB - 100, 0)
    assert fake.errors[-1] == errno.EINVAL
    with pytest.raises(Exception, match="failed state"):
        plugin._server.export.close()  # close refuses to claim a clean close (cleanup: exit 1)


def test_read_only_image_refuses_writes_with_erofs(tmp_path: Path, fake: FakeNbdkit) -> None:
    """An image opened read-only: every write-side request is EROFS (nbdkit sends EPERM), the
    can_* answers say so, flush is harmless."""
    path = str(tmp_path / "a.qcow2")
    QcowFile.create(path, MiB).close()
    plugin.config("file", path)
    plugin.config("readonly", "true")
    plugin.config_complete()
    plugin.get_ready()
    assert (plugin.can_write(None), plugin.can_trim(None), plugin.can_zero(None)) == (False, False, False)
    assert plugin.can_multi_conn(None) and plugin.can_extents(None)
    for call in (lambda: plugin.pwrite(None, memoryview(b"x"), 0, 0), lambda: plugin.trim(None, 512, 0, 0),
                 lambda: plugin.zero(None, 512, 0, plugin.FLAG_MAY_TRIM)):
        with pytest.raises(Exception, match="read-only"):
            call()
    plugin.flush(None, 0)
    assert fake.errors == [errno.EROFS] * 3
    with pytest.raises(ValueError, match="unknown parameter"):
        plugin.config("size", "1G")


def test_zero_trim_fua_and_extents(tmp_path: Path, fake: FakeNbdkit) -> None:
    """zero punches only with may-trim (else EOPNOTSUPP: nbdkit writes zero bytes); fast zero is
    refused where zeroing writes data (a v2 image with a backing file); FUA flushes; extents
    give holes and zeros, one with REQ_ONE."""
    base = str(tmp_path / "base.qcow2")
    QcowFile.create(base, 4 * MiB).close()
    path = str(tmp_path / "a.qcow2")
    QcowFile.create(path, 4 * MiB, compat="0.10", backing_file="base.qcow2", backing_format="qcow2").close()
    plan = FaultPlan()
    plugin._server.export = plugin.Export(QcowFile.open(path, host_factory=plan.factory()))
    plugin.pwrite(None, memoryview(b"\x07" * 3 * 65536), 0, 0)
    mark = plan.mark()
    plugin.pwrite(None, memoryview(b"\x08" * 512), 0, plugin.FLAG_FUA)
    assert any(op.kind == "fsync" for op in plan.mutations_since(mark))
    with pytest.raises(OSError, match="without may-trim"):
        plugin.zero(None, 65536, 0, 0)
    with pytest.raises(OSError, match="not fast"):
        plugin.zero(None, 65536, 0, plugin.FLAG_MAY_TRIM | plugin.FLAG_FAST_ZERO)
    assert fake.errors == [errno.EOPNOTSUPP, errno.EOPNOTSUPP]
    plugin.zero(None, 65536, 65536, plugin.FLAG_MAY_TRIM)  # v2 with backing: written as zero bytes
    mark = plan.mark()
    plugin.trim(None, 65536, 2 * 65536, plugin.FLAG_FUA)
    assert any(op.kind == "fsync" for op in plan.mutations_since(mark))
    got = plugin.extents(None, 4 * MiB, 0, 0)
    # (v2 with a backing file: the zeroed and trimmed clusters hold zero bytes, so they are data)
    assert got == [(0, 3 * 65536, 0), (3 * 65536, 4 * MiB - 3 * 65536, plugin.EXTENT_HOLE | plugin.EXTENT_ZERO)], got
    assert plugin.extents(None, 4 * MiB - 65536, 65536, 0)[0] == (65536, 2 * 65536, 0)
    assert plugin.extents(None, 4 * MiB - 65536, 65536, plugin.FLAG_REQ_ONE) == [(65536, 2 * 65536, 0)]
    buf = bytearray(3 * 65536)
    plugin.pread(None, memoryview(buf), 0, 0)
    assert buf == b"\x08" * 512 + b"\x07" * (65536 - 512) + bytes(2 * 65536)


# ---------------------------------------------------------------------- starting nbdkit
def fake_nbdkit(tmp_path: Path, script: str) -> str:
    """An executable standing in for nbdkit (what `--dump-plugin` prints decides the checks)."""
    path = tmp_path / "nbdkit"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


def test_nbdkit_checks(tmp_path: Path) -> None:
    """serve refuses, with a message saying what to install, when nbdkit or its Python plugin is
    missing, and when the plugin embeds another Python version than the running one."""
    with pytest.raises(ServeError, match="apt-get install nbdkit nbdkit-plugin-python"):
        check_nbdkit(str(tmp_path / "no-such-nbdkit"))
    missing = fake_nbdkit(tmp_path, "echo 'nbdkit: error: cannot open plugin' >&2; exit 1")
    with pytest.raises(ServeError, match="nbdkit-plugin-python"):
        check_nbdkit(missing)
    major, minor = sys.version_info[:2]
    other = fake_nbdkit(tmp_path, f"echo python_version={major}.{minor + 1}.0")
    with pytest.raises(ServeError, match=rf"embeds Python {major}\.{minor + 1}, but qcowdisk runs under Python {major}\.{minor}"):
        check_nbdkit(other)
    same = fake_nbdkit(tmp_path, f"echo python_version={major}.{minor}.99; echo python_pep_384_abi_version=3")
    assert check_nbdkit(same) == same


def test_nbdkit_command_line(tmp_path: Path) -> None:
    """The nbdkit command line and environment: foreground, read-only on both sides, the plugin
    by path, absolute paths, qcowdisk's and its dependencies' directories first on PYTHONPATH."""
    import zstandard

    import qcowdisk
    argv, env = nbdkit_command(ServeOptions("d.qcow2", readonly=True, port=10811, bind="127.0.0.1",
                                            export_name="x", confine_to="imgs"), "nbdkit",
                               environ={"PYTHONPATH": "/elsewhere", "PATH": "/bin"})
    assert argv[:2] == ["nbdkit", "-f"] and "--readonly" in argv
    assert argv[argv.index("--port") + 1] == "10811" and argv[argv.index("--ipaddr") + 1] == "127.0.0.1"
    plugin_at = argv.index("python") + 1
    assert argv[plugin_at] == plugin.__file__
    assert argv[plugin_at + 1:] == [f"file={os.path.abspath('d.qcow2')}", "readonly=true",
                                    f"confine-to={os.path.abspath('imgs')}", "export=x"]
    path = env["PYTHONPATH"].split(os.pathsep)
    assert path[0] == os.path.dirname(os.path.dirname(qcowdisk.__file__)) and path[-1] == "/elsewhere"
    assert os.path.dirname(os.path.dirname(zstandard.__file__)) in path
    assert env["PATH"] == "/bin"
    with pytest.raises(ValueError, match="--socket cannot be combined"):
        nbdkit_command(ServeOptions("d.qcow2", socket="s", port=1))
