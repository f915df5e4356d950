"""The guest disk as a Python file object: `qcowdisk.open` and `qcowdisk.QcowIO`.

Used the way people use files: shutil.copyfileobj in and out, tarfile, zipfile, readline and
peek, hashlib.file_digest, TextIOWrapper. Then the file-object contract one point at a time:
seek/tell (SEEK_END, past the end, negative), writes past the end refused whole (ENOSPC),
truncate refused, fileno refused, modes and buffering as built-in open() treats them, who
closes the image, closed streams, read-only streams. QEMU (qemu-img, qemu-io) is the oracle for
what the image holds afterwards.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import os
import shutil
import tarfile
import warnings
import zipfile
from array import array
from pathlib import Path
from typing import Any

import pytest

import qcowdisk
from qcowdisk import BackingChainError, QcowFile, QcowIO
from qcowdisk.hostio import HostFile
from qcowdisk.stream import DEFAULT_BUFFER_SIZE
from qemutools import assert_clean, compare, create, info, pattern, qemu_io, to_raw, write_raw

KiB = 1024
MiB = 1024 * KiB
SIZE = 8 * MiB


def disk_bytes() -> bytes:
    """8 MiB of random data with zero regions: cluster-aligned, unaligned, and the tail."""
    data = bytearray(pattern(SIZE, seed=7))
    data[1 * MiB:2 * MiB] = bytes(MiB)
    data[3 * MiB + 1234:3 * MiB + 1234 + 100_000] = bytes(100_000)
    data[SIZE - 300 * KiB:] = bytes(300 * KiB)
    return bytes(data)


class AtMost:
    """A file's `write` that fails once more than `limit` bytes arrive: a stream that never
    reports EOF must fail the test, not fill the host's disk."""

    def __init__(self, f: Any, limit: int) -> None:
        self.f, self.left = f, limit

    def write(self, data: Any) -> int:
        self.left -= memoryview(data).nbytes
        assert self.left >= 0, "the stream gave more bytes than the disk holds"
        return int(self.f.write(data))


@pytest.fixture
def img(tmp_path: Path) -> str:
    """An empty 8 MiB qcow2 image made by qcowdisk."""
    path = str(tmp_path / "disk.qcow2")
    QcowFile.create(path, SIZE).close()
    return path


@pytest.fixture
def qemu_img_with_data(tmp_path: Path) -> str:
    """An 8 MiB image QEMU wrote patterns into (data, a zeroed range, unallocated rest)."""
    path = create(str(tmp_path / "q.qcow2"), SIZE)
    qemu_io(path, "write -P 0x11 0 192k", "write -P 0x22 1000k 300k", "write -z 64k 64k",
            f"write -P 0x33 {SIZE - 64 * KiB} 64k")
    return path


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("buffering", [-1, 0, 3000])
def test_copyfileobj_in_and_out(tmp_path: Path, img: str, buffering: int) -> None:
    raw = write_raw(str(tmp_path / "raw.img"), disk_bytes())
    with open(raw, "rb") as src, qcowdisk.open(img, "r+b", buffering=buffering) as dst:
        shutil.copyfileobj(src, dst)
        assert dst.tell() == SIZE
    out = str(tmp_path / "out.img")
    with qcowdisk.open(img, "rb", buffering=buffering) as src, open(out, "wb") as fout:
        shutil.copyfileobj(src, AtMost(fout, SIZE))
    assert Path(out).read_bytes() == Path(raw).read_bytes()
    assert_clean(img)
    compare(raw, img, fmt_a="raw", fmt_b="qcow2")


def test_tarfile_written_and_read_through_the_stream(tmp_path: Path, img: str) -> None:
    members = {"empty": b"", "one": b"x", "text.txt": b"hello tar\n" * 1000, "big.bin": pattern(3 * MiB + 17, 1)}
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    for name, data in members.items():
        (src / "dir" / name).write_bytes(data)
    os.symlink("text.txt", src / "dir" / "link")
    start = MiB + 512  # not cluster-aligned: tarfile starts at the stream's position
    with qcowdisk.open(img, "r+b") as f:
        f.seek(start)
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(src / "dir", arcname="dir")
        end = f.tell()
    assert end > start + 3 * MiB

    expected = {"dir", "dir/link"} | {f"dir/{n}" for n in members}
    with qcowdisk.open(img, "rb") as f:
        f.seek(start)
        with tarfile.open(fileobj=f) as tar:  # "r:*": probes the compressions, seeking back each time
            assert set(tar.getnames()) == expected
            for name, data in members.items():
                member = tar.extractfile(f"dir/{name}")
                assert member is not None and member.read() == data
            tar.extractall(tmp_path / "out", filter="data")
    for name, data in members.items():
        assert (tmp_path / "out" / "dir" / name).read_bytes() == data
    assert os.readlink(tmp_path / "out" / "dir" / "link") == "text.txt"
    # QEMU's view of the guest holds the same archive.
    guest = to_raw(img, str(tmp_path / "guest.raw"))
    with tarfile.open(fileobj=io.BytesIO(guest[start:end])) as tar:
        assert set(tar.getnames()) == expected


@pytest.mark.parametrize("buffering", [-1, 0])
def test_zipfile_at_the_end_of_the_disk(tmp_path: Path, img: str, buffering: int) -> None:
    # zipfile finds its directory by seeking from the end, so the archive must end at the
    # disk's end: write it at SEEK_END - length (what comes before it is ignored, as for SFX).
    members = {"a.txt": (b"zip text\n" * 5000, zipfile.ZIP_DEFLATED),
               "b.bin": (pattern(MiB + 3, 2), zipfile.ZIP_STORED),
               "c/empty": (b"", zipfile.ZIP_STORED)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, (data, method) in members.items():
            z.writestr(name, data, compress_type=method)
    archive = buf.getvalue()
    with qcowdisk.open(img, "r+b", buffering=buffering) as f:
        assert f.seek(-len(archive), io.SEEK_END) == SIZE - len(archive)
        assert f.write(archive) == len(archive)
        assert f.tell() == SIZE
    with qcowdisk.open(img, "rb", buffering=buffering) as f, zipfile.ZipFile(f) as z:
        assert z.namelist() == list(members)
        assert z.testzip() is None  # every member's CRC checks
        for name, (data, _) in members.items():
            assert z.read(name) == data
    guest = to_raw(img, str(tmp_path / "guest.raw"))
    assert guest[SIZE - len(archive):] == archive


def test_peek_readline_and_text_wrapper(img: str) -> None:
    lines = [f"line {i}: {'é' * (i % 7)} {'x' * (i * 37 % 300)}\n".encode() for i in range(2000)]
    text = b"".join(lines)
    start = 2 * MiB - 100  # straddles clusters
    with qcowdisk.open(img, "r+b") as f:
        f.seek(start)
        f.write(text)
    with qcowdisk.open(img, "rb") as f:
        assert isinstance(f, io.BufferedReader)
        f.seek(start)
        peeked = f.peek(1)
        assert peeked.startswith(lines[0]) and f.tell() == start  # peek does not move
        assert f.readline(4) == lines[0][:4]
        assert f.readline() == lines[0][4:]
        assert [f.readline() for _ in range(len(lines) - 1)] == lines[1:]
        assert f.read(16) == bytes(16)  # zeros after the text, up to the end of the disk
    with qcowdisk.open(img, "rb") as f:
        f.seek(start)
        t = io.TextIOWrapper(f, encoding="utf-8", newline="")
        assert [t.readline() for _ in range(len(lines))] == [line.decode() for line in lines]
        t.close()
        assert f.closed


@pytest.mark.parametrize("buffering", [-1, 0])
def test_file_digest_matches_qemu_convert(tmp_path: Path, qemu_img_with_data: str, buffering: int) -> None:
    guest = to_raw(qemu_img_with_data, str(tmp_path / "guest.raw"))
    with qcowdisk.open(qemu_img_with_data, "rb", buffering=buffering) as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == hashlib.sha256(guest).hexdigest()
        assert f.tell() == SIZE


def test_overlay_reads_through_the_chain_and_writes_the_top(tmp_path: Path) -> None:
    base = create(str(tmp_path / "base.qcow2"), SIZE)
    qemu_io(base, "write -P 0xaa 0 1M", "write -P 0xbb 3M 2M")
    top = create(str(tmp_path / "top.qcow2"), SIZE, backing=base, backing_fmt="qcow2")
    qemu_io(top, "write -P 0xcc 512k 64k", "write -z 4M 64k")
    base_before = to_raw(base, str(tmp_path / "base.raw"))
    expected = bytearray(to_raw(top, str(tmp_path / "top.raw")))
    assert expected[0] == 0xaa and expected[512 * KiB] == 0xcc and expected[3 * MiB] == 0xbb

    with qcowdisk.open(top, "rb") as f:
        assert f.read() == expected
        f.seek(4 * MiB - 10)
        assert f.read(20) == bytes(expected[4 * MiB - 10:4 * MiB + 10])
    with qcowdisk.open(top, "rb", buffering=0) as f:
        assert hashlib.file_digest(f, "sha256").digest() == hashlib.sha256(expected).digest()

    # Partial-cluster writes into the overlay copy the rest of the cluster up from the base.
    edits = [(100, b"top!" * 10), (3 * MiB + 65530, pattern(70_000, 3)), (SIZE - 7, b"theend!")]
    with qcowdisk.open(top, "r+b") as f:
        for offset, data in edits:
            f.seek(offset)
            f.write(data)
            expected[offset:offset + len(data)] = data
    assert to_raw(top, str(tmp_path / "top2.raw")) == expected
    assert to_raw(base, str(tmp_path / "base2.raw")) == base_before
    assert_clean(top)


# --------------------------------------------------------------------------- position

@pytest.mark.parametrize("buffering", [-1, 0])
def test_seek_and_tell(tmp_path: Path, qemu_img_with_data: str, buffering: int) -> None:
    guest = to_raw(qemu_img_with_data, str(tmp_path / "guest.raw"))
    with qcowdisk.open(qemu_img_with_data, "rb", buffering=buffering) as f:
        assert f.tell() == 0 and f.seekable()
        assert f.seek(0, io.SEEK_END) == SIZE and f.tell() == SIZE
        assert f.read() == b"" and f.read(10) == b""
        assert f.seek(-10, io.SEEK_END) == SIZE - 10
        assert f.read() == guest[-10:]
        assert f.seek(1000) == 1000
        assert f.seek(5, io.SEEK_CUR) == 1005
        assert f.read(3) == guest[1005:1008]
        assert f.seek(-8, io.SEEK_CUR) == 1000
        assert f.read(20) == guest[1000:1020]
        # Past the end: allowed, and reads there find nothing.
        assert f.seek(SIZE + 12345) == SIZE + 12345 and f.tell() == SIZE + 12345
        assert f.read(10) == b"" and f.read() == b"" and f.readinto(bytearray(10)) == 0
        assert f.seek(10, io.SEEK_END) == SIZE + 10
        # A negative result is refused as FileIO refuses it, and the position stays.
        f.seek(777)
        for args in [(-1,), (-SIZE - 1, io.SEEK_END), (-778, io.SEEK_CUR)]:
            with pytest.raises(OSError, match="negative position") as e:
                f.seek(*args)
            assert e.value.errno == errno.EINVAL
            assert f.tell() == 777
        with pytest.raises(TypeError):
            f.seek(1.5)  # type: ignore[arg-type]
    with qcowdisk.open(qemu_img_with_data, "rb", buffering=0) as raw:
        with pytest.raises(ValueError, match="invalid whence"):
            raw.seek(0, 7)


def test_raw_read_and_readinto_edges(qemu_img_with_data: str, tmp_path: Path) -> None:
    guest = to_raw(qemu_img_with_data, str(tmp_path / "guest.raw"))
    with qcowdisk.open(qemu_img_with_data, "rb", buffering=0) as f:
        assert isinstance(f, QcowIO)
        assert f.read(0) == b"" and f.tell() == 0
        f.seek(SIZE - 5)
        assert f.read(100) == guest[-5:]  # short only at the end
        f.seek(1000 * KiB - 4)
        words = array("I", bytes(64))
        assert f.readinto(words) == 64  # a typed buffer counts bytes
        assert words.tobytes() == guest[1000 * KiB - 4:1000 * KiB + 60]
        f.seek(SIZE - 3)
        assert f.readinto(bytearray(8)) == 3 and f.tell() == SIZE
        f.seek(100)
        assert f.read(None) == guest[100:]  # type: ignore[arg-type]


def test_readinto_fills_the_callers_buffer_and_readall_is_one_call(qemu_img_with_data: str) -> None:
    with QcowFile.open(qemu_img_with_data, readonly=True) as disk:
        seen: list[Any] = []
        calls: list[tuple[int, int]] = []
        real_readinto, real_read = disk.readinto_at, disk.read_at

        def readinto_at(buffer: Any, offset: int) -> int:
            seen.append(buffer)
            return real_readinto(buffer, offset)

        def read_at(offset: int, length: int) -> bytes:
            calls.append((offset, length))
            return real_read(offset, length)

        disk.readinto_at = readinto_at  # type: ignore[method-assign]
        disk.read_at = read_at  # type: ignore[method-assign]
        s = QcowIO(disk)
        buf = bytearray(300 * KiB)
        assert s.readinto(buf) == len(buf)
        assert seen == [buf] and seen[0] is buf  # the caller's own buffer, not a temporary
        assert buf == real_read(0, len(buf))
        s.seek(MiB + 1)
        assert s.readall() == real_read(MiB + 1, SIZE)
        assert calls == [(MiB + 1, SIZE - MiB - 1)]  # one engine call, not 8 KiB at a time


# --------------------------------------------------------------------------- writes and size

def test_raw_write_past_the_end_writes_nothing(tmp_path: Path, qemu_img_with_data: str) -> None:
    before = to_raw(qemu_img_with_data, str(tmp_path / "before.raw"))
    with qcowdisk.open(qemu_img_with_data, "r+b", buffering=0) as f:
        f.seek(SIZE - 10)
        with pytest.raises(OSError, match="past") as e:
            f.write(b"A" * 20)  # starts inside, runs past: refused whole
        assert e.value.errno == errno.ENOSPC and e.value.filename == qemu_img_with_data
        assert f.tell() == SIZE - 10
        f.seek(SIZE + 100)
        with pytest.raises(OSError, match="past") as e:
            f.write(b"B")
        assert e.value.errno == errno.ENOSPC
        assert f.write(b"") == 0
        f.seek(SIZE)
        with pytest.raises(OSError, match="past"):
            f.write(b"C")
        f.seek(SIZE - 8)
        assert f.write(array("H", [0x4443] * 4)) == 8  # exactly to the end: fine (a typed buffer counts bytes)
        assert f.tell() == SIZE
    after = to_raw(qemu_img_with_data, str(tmp_path / "after.raw"))
    assert after == before[:-8] + b"CD" * 4
    assert_clean(qemu_img_with_data)


def test_buffered_write_past_the_end_fails_loudly_and_writes_nothing(tmp_path: Path, qemu_img_with_data: str) -> None:
    before = to_raw(qemu_img_with_data, str(tmp_path / "before.raw"))
    f = qcowdisk.open(qemu_img_with_data, "r+b")
    f.seek(SIZE - 10)
    f.write(b"A" * 20)  # small: still in the buffer, so the refusal comes at flush
    with pytest.raises(OSError, match="past") as e:
        f.flush()
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="past"):
        f.close()  # flushing again fails again; the image is closed regardless
    assert f.closed and f.raw.disk.closed  # type: ignore[attr-defined]
    # A write bigger than the buffer goes to the raw stream at once and is refused there.
    with qcowdisk.open(qemu_img_with_data, "r+b") as g:
        g.seek(SIZE - DEFAULT_BUFFER_SIZE)
        with pytest.raises(OSError, match="past") as e:
            g.write(b"B" * (2 * DEFAULT_BUFFER_SIZE))
        assert e.value.errno == errno.ENOSPC
    assert to_raw(qemu_img_with_data, str(tmp_path / "after.raw")) == before
    assert_clean(qemu_img_with_data)


def test_truncate_refused_unless_a_no_op(qemu_img_with_data: str) -> None:
    with qcowdisk.open(qemu_img_with_data, "r+b", buffering=0) as f:
        f.seek(4096)
        for size in (None, 0, SIZE - 512, SIZE + 512):
            with pytest.raises(io.UnsupportedOperation):
                f.truncate(size)
        assert f.tell() == 4096
        assert f.truncate(SIZE) == SIZE  # nothing to change
        f.seek(SIZE)
        assert f.truncate() == SIZE
    with qcowdisk.open(qemu_img_with_data, "r+b") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.truncate(100)
    with qcowdisk.open(qemu_img_with_data, "rb") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.truncate(SIZE)
    assert info(qemu_img_with_data)["virtual-size"] == SIZE


@pytest.mark.parametrize("buffering", [-1, 0])
def test_fileno_is_unsupported(img: str, buffering: int) -> None:
    with qcowdisk.open(img, "rb", buffering=buffering) as f:
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()
        assert f.isatty() is False


@pytest.mark.parametrize("buffering", [-1, 0])
def test_read_only_stream_refuses_writes(img: str, buffering: int) -> None:
    with qcowdisk.open(img, "rb", buffering=buffering) as f:
        assert f.readable() and not f.writable()
        assert f.mode == "rb" and f.name == img
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        f.flush()  # nothing to flush: fine
    with QcowFile.open(img, readonly=True) as disk:
        s = QcowIO(disk)
        assert not s.writable()
        with pytest.raises(io.UnsupportedOperation):
            s.write(b"x")
    with qcowdisk.open(img, "r+b") as f:
        assert f.writable() and f.mode == "rb+"


# --------------------------------------------------------------------------- modes and buffering

@pytest.mark.parametrize("mode,kind", [("rb", io.BufferedReader), ("br", io.BufferedReader),
                                       ("r+b", io.BufferedRandom), ("rb+", io.BufferedRandom),
                                       ("+rb", io.BufferedRandom)])
def test_mode_picks_the_object_open_would(img: str, mode: str, kind: type) -> None:
    with qcowdisk.open(img, mode) as f:
        assert type(f) is kind
        assert isinstance(f.raw, QcowIO) and f.raw.close_disk
        assert f.raw.disk.readonly == (kind is io.BufferedReader)
    with qcowdisk.open(img, mode, buffering=0) as f:
        assert type(f) is QcowIO
        assert f.writable() == (kind is io.BufferedRandom)


@pytest.mark.parametrize("mode", ["r", "rt", "r+", "w", "wb", "w+b", "ab", "a+b", "xb", "rwb", "rbt", "rbb", "rb++", "",
                                  "b", "+b", "rU", "rq"])
def test_bad_modes_raise_value_error_and_leave_the_image_alone(img: str, mode: str) -> None:
    before = Path(img).read_bytes()
    with pytest.raises(ValueError, match="invalid mode"):
        qcowdisk.open(img, mode)
    assert Path(img).read_bytes() == before  # "w" did not truncate, nothing was opened
    with qcowdisk.open(img, "r+b"):  # and no lock was left behind
        pass


def test_mode_must_be_str_and_readonly_comes_from_the_mode(img: str) -> None:
    with pytest.raises(TypeError):
        qcowdisk.open(img, b"rb")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        qcowdisk.open(img, "rb", readonly=False)


def test_buffer_sizes(img: str) -> None:
    with qcowdisk.open(img, "rb") as f:
        assert len(f.peek(1)) == DEFAULT_BUFFER_SIZE == 64 * KiB  # one fill is the whole buffer
    with qcowdisk.open(img, "rb", buffering=5000) as f:
        assert len(f.peek(1)) == 5000
    with qcowdisk.open(img, "r+b", buffering=5000) as f:
        assert len(f.peek(1)) == 5000


def test_line_buffering_warns_and_uses_the_default_like_open(tmp_path: Path, img: str) -> None:
    with warnings.catch_warnings(record=True) as builtin_warnings:
        warnings.simplefilter("always")
        with open(img, "rb", buffering=1):
            pass
    with pytest.warns(RuntimeWarning, match="line buffering") as ours:
        f = qcowdisk.open(img, "rb", buffering=1)
    with f:
        assert type(f) is io.BufferedReader and len(f.peek(1)) == DEFAULT_BUFFER_SIZE
    assert [w.category for w in builtin_warnings] == [RuntimeWarning]
    assert str(ours[0].message) == str(builtin_warnings[0].message)
    assert ours[0].filename == __file__  # points at the caller, as open()'s does


def test_open_options_reach_qcowfile_open(tmp_path: Path) -> None:
    base = create(str(tmp_path / "base.qcow2"), SIZE)
    top = create(str(tmp_path / "top.qcow2"), SIZE, backing=base, backing_fmt="qcow2")
    with pytest.raises(BackingChainError):
        qcowdisk.open(top, "rb", max_nesting_depth=0)
    opened: list[tuple[str, bool]] = []

    def factory(path: str, writable: bool) -> HostFile:
        opened.append((os.path.basename(path), writable))
        return HostFile(path, writable)

    with qcowdisk.open(top, "rb", host_factory=factory):
        pass
    with qcowdisk.open(top, "r+b", host_factory=factory):
        pass
    assert opened == [("top.qcow2", False), ("base.qcow2", False), ("top.qcow2", True), ("base.qcow2", False)]


# --------------------------------------------------------------------------- closing

@pytest.mark.parametrize("buffering", [-1, 0])
def test_closing_the_stream_closes_the_image_it_opened(img: str, buffering: int) -> None:
    f = qcowdisk.open(img, "r+b", buffering=buffering)
    raw = f if isinstance(f, QcowIO) else f.raw
    assert isinstance(raw, QcowIO)
    f.close()
    assert f.closed and raw.closed and raw.disk.closed  # type: ignore[attr-defined]
    f.close()  # idempotent
    with QcowFile.open(img):  # the write lock was released
        pass


def test_a_forgotten_stream_releases_the_image(img: str) -> None:
    f = qcowdisk.open(img, "r+b")
    f.write(b"kept")
    del f
    gc.collect()
    with QcowFile.open(img) as disk:  # would raise ImageLockedError if still held
        assert disk.read_at(0, 4) == b"kept"


def test_closing_the_stream_leaves_a_handed_disk_open(img: str) -> None:
    with QcowFile.open(img) as disk:
        s = QcowIO(disk)
        assert not s.close_disk and s.name == img and s.mode == "rb+"
        s.write(b"abc")
        s.close()
        assert s.closed and not disk.closed
        assert disk.read_at(0, 3) == b"abc"
        with io.BufferedRandom(QcowIO(disk)) as b:  # wrapping in a buffer changes nothing
            b.seek(3)
            b.write(b"def")
        assert not disk.closed and disk.read_at(0, 6) == b"abcdef"
        owned = QcowIO(disk, close_disk=True)
        owned.close()
        assert disk.closed


def test_flush_flushes_the_disk_when_writable(img: str) -> None:
    for readonly in (False, True):
        with QcowFile.open(img, readonly=readonly) as disk:
            flushes: list[None] = []
            real_flush = disk.flush
            disk.flush = lambda flushes=flushes, real_flush=real_flush: flushes.append(real_flush())  # type: ignore[method-assign, func-returns-value, misc]
            s = QcowIO(disk)
            s.flush()
            assert len(flushes) == (0 if readonly else 1)
            s.close()  # close flushes too
            assert len(flushes) == (0 if readonly else 2)


def test_stream_over_a_disk_closed_elsewhere_closes_quietly(img: str) -> None:
    disk = QcowFile.open(img)
    s = QcowIO(disk)
    disk.close()
    s.close()
    assert s.closed


@pytest.mark.parametrize("buffering", [-1, 0])
def test_closed_stream_raises_value_error(img: str, buffering: int) -> None:
    f = qcowdisk.open(img, "r+b", buffering=buffering)
    f.close()
    calls: dict[str, tuple[Any, ...]] = {
        "read": (10,), "read1": (10,), "peek": (1,), "readinto": (bytearray(10),), "readall": (), "readline": (),
        "seek": (0,), "tell": (), "write": (b"x",), "flush": (), "readable": (), "writable": (), "seekable": (),
        "fileno": (), "truncate": (SIZE,)}
    tried = []
    for name, args in calls.items():
        method = getattr(f, name, None)
        if method is None:  # read1/peek are buffered-only, readall raw-only
            continue
        with pytest.raises(ValueError, match="closed"):
            method(*args)
        tried.append(name)
    assert len(tried) >= 13


def test_stream_follows_a_resize_of_its_disk(tmp_path: Path) -> None:
    """The stream asks the disk for its size each time: after disk.resize, SEEK_END and the
    write limit follow the new size (a cached size would refuse writes past the old end)."""
    path = str(tmp_path / "grow.qcow2")
    with QcowFile.create(path, 1 << 20) as disk:
        f = QcowIO(disk)
        disk.resize(2 << 20)
        assert f.seek(0, io.SEEK_END) == 2 << 20
        f.seek((1 << 20) + 10)
        assert f.write(b"abc") == 3
    assert to_raw(path, str(tmp_path / "grow.raw"))[(1 << 20) + 10:(1 << 20) + 13] == b"abc"
