"""Image locking compatible with QEMU's.

QEMU (block/file-posix.c, `raw_apply_lock_bytes` / `raw_check_lock_bytes`) advertises the block
permissions an open holds with shared read locks on single bytes of the image file itself:

- byte ``100 + i`` is locked while the holder *has* permission ``i``;
- byte ``200 + i`` is locked while the holder does *not share* permission ``i``.

An opener first locks its own bytes, then tests (F_GETLK with a write lock) that nobody else locks
``200 + i`` for a permission ``i`` it wants, nor ``100 + i`` for a permission it refuses to share.
Locking before testing means that of two racing openers at least one sees the other.

On Linux QEMU uses open-file-description (OFD) locks, which also conflict between two opens of
one file inside a single process; we use the same ones, so qemu-io/qemu-img refuse an image
qcowdisk holds for writing and qcowdisk refuses one QEMU holds. We take exactly what QEMU 7.2
takes (checked in /proc/locks against `qemu-io` and `qemu-io -r`):

- read-write open: has consistent-read, write, resize; unshares write, resize
  (bytes 100, 101, 103, 201, 203);
- read-only open: has consistent-read; unshares write, resize (bytes 100, 201, 203) -- so, as in
  QEMU, readers coexist with readers and with `-U`/force-share users, but not with writers.

Where OFD locks are unavailable (non-Linux, or a file system without them) we fall back to an
exclusive `filelock` on a ``<image>.lock`` side file. That cannot express shared locks, so a
read-only open there only checks that no writer holds the lock and then lets go of it.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import threading
from collections.abc import Callable

from .errors import ImageLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["ImageLock", "lock_image"]

# BLK_PERM_* bit numbers (include/block/block-common.h); 4 (the old GRAPH_MOD) is unused.
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}

LOCK_PERM_BASE = 100     # RAW_LOCK_PERM_BASE
LOCK_SHARED_BASE = 200   # RAW_LOCK_SHARED_BASE

# (permissions held, permissions not shared), as QEMU requests them for a plain qemu-io open.
WRITER_PERMS = ((PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE), (PERM_WRITE, PERM_RESIZE))
READER_PERMS = ((PERM_CONSISTENT_READ,), (PERM_WRITE, PERM_RESIZE))
# qemu-img resize of a raw image: raw passes its BlockBackend's "share everything" down to the file
# (no format metadata to protect), so it coexists with other raw writers and readers.
RAW_RESIZER_PERMS = ((PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE), ())

# Linux fcntl command numbers; the module names them from Python 3.9 on.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
# Native alignment gives the 4 bytes of padding after l_whence on LP64; the trailing 4x
# rounds the size up to the struct's 8-byte alignment (32 bytes on x86_64/aarch64).
_FLOCK = struct.Struct("hhqqi4x")

# errnos meaning "this file/kernel has no OFD locks" rather than "someone holds the lock".
_NO_OFD_ERRNOS = {errno.EINVAL, errno.ENOSYS, errno.ENOLCK, getattr(errno, "EOPNOTSUPP", -1),
                  getattr(errno, "ENOTSUP", -1)}
# errnos meaning the byte is locked by someone else.
_CONFLICT_ERRNOS = {errno.EAGAIN, errno.EACCES}

# Tests set this to False to exercise the side-file fallback on Linux.
USE_OFD = sys.platform.startswith("linux") and fcntl is not None


class ImageLock:
    """A lock held on one image; `release` drops it (idempotent, thread-safe).

    A process forked while the lock is held shares it with its parent (OFD locks belong to the
    open file description, which the child inherits): `release` in the child only lets go of the
    child's descriptors (`abandon_fn`), so the parent's lock stays intact.
    """

    def __init__(self, path: str, write: bool, release_fn: Callable[[], None] | None,
                 abandon_fn: Callable[[], None] | None = None) -> None:
        self.path = path
        self.write = write
        self._release_fn = release_fn
        self._abandon_fn = abandon_fn
        self._owner_pid = os.getpid()
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        """True until `release` has run."""
        return self._release_fn is not None

    def release(self) -> None:
        """Drop the lock. Calling it again does nothing."""
        with self._mutex:
            fn, self._release_fn = self._release_fn, None
            abandon, self._abandon_fn = self._abandon_fn, None
        if fn is not None:
            if os.getpid() != self._owner_pid:
                fn = abandon
            if fn is not None:
                fn()

    def __enter__(self) -> ImageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # A forgotten lock must not outlive its owner (and our dup'ed fd must not leak).
        # Not contextlib.suppress: at interpreter shutdown module globals may already be gone.
        try:  # noqa: SIM105
            self.release()
        except Exception:  # noqa: BLE001 # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"ImageLock({self.path!r}, write={self.write}, {state})"


class _NoOfdLocks(Exception):
    """OFD locks are not supported for this file; use the fallback."""


def lock_image(fd: int, path: str, *, write: bool,
               perms: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> ImageLock:
    """Lock the image open on `fd` as QEMU would for a read-write (`write`) or read-only open.

    Raises ImageLockedError at once (never waits) when another open of the image -- in this
    process or another, qcowdisk or QEMU -- holds a conflicting lock. Call `release()` on the
    result before or after closing `fd`; the lock works on its own duplicate of `fd`, so it never
    touches a descriptor number that has since been reused. Keep a reference to the result for
    as long as the image is open: a collected ImageLock releases itself. One lock per open
    file description (OFD locks are not counted, so a second lock on the same fd would be
    undone by the first one's release). `perms` (held, not shared) replaces the permissions of
    a plain read-write or read-only qemu-io open (e.g. RAW_RESIZER_PERMS).
    """
    path = os.fspath(path)
    if USE_OFD:
        try:
            return _lock_ofd(fd, path, write, perms)
        except _NoOfdLocks:
            pass
    return _lock_side_file(path, write)


# ---------------------------------------------------------------------------------------------
# OFD byte locks (Linux)

def _flock_op(fd: int, cmd: int, lock_type: int, offset: int) -> int:
    """One fcntl on a single byte; returns the l_type the kernel hands back."""
    arg = _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0)  # l_pid must be 0 for OFD locks
    result = fcntl.fcntl(fd, cmd, arg)
    l_type: int = _FLOCK.unpack(result)[0]
    return l_type


def _lock_ofd(fd: int, path: str, write: bool, given: tuple[tuple[int, ...], tuple[int, ...]] | None) -> ImageLock:
    perms, unshared = given or (WRITER_PERMS if write else READER_PERMS)
    wanted = [LOCK_PERM_BASE + i for i in perms] + [LOCK_SHARED_BASE + i for i in unshared]
    # Our own duplicate shares the open file description (so the locks are the image fd's)
    # but lets release() run safely even after the caller closed and reused `fd`.
    lock_fd = os.dup(fd)
    locked: list[int] = []

    def unlock() -> None:
        try:
            for offset in locked:
                _flock_op(lock_fd, F_OFD_SETLK, fcntl.F_UNLCK, offset)
        finally:
            locked.clear()
            os.close(lock_fd)

    try:
        for offset in wanted:
            try:
                _flock_op(lock_fd, F_OFD_SETLK, fcntl.F_RDLCK, offset)
            except OSError as e:
                if e.errno in _NO_OFD_ERRNOS and not locked:
                    raise _NoOfdLocks() from e
                if e.errno in _CONFLICT_ERRNOS:
                    raise ImageLockedError(
                        f"image '{path}' is locked: failed to lock byte {offset} "
                        f"(another process holds a conflicting lock on it)") from None
                raise
            locked.append(offset)
        # Then test, as raw_check_lock_bytes does: nobody may unshare what we want ...
        for i in perms:
            if _byte_locked(lock_fd, LOCK_SHARED_BASE + i):
                raise ImageLockedError(
                    f"image '{path}' is locked: failed to get \"{PERM_NAMES[i]}\" lock "
                    f"(another open of the image does not share \"{PERM_NAMES[i]}\"; "
                    f"lock byte {LOCK_SHARED_BASE + i} is held). "
                    f"Is another process using the image?", f"Failed to get \"{PERM_NAMES[i]}\" lock", path)
        # ... nor hold what we refuse to share.
        for i in unshared:
            if _byte_locked(lock_fd, LOCK_PERM_BASE + i):
                raise ImageLockedError(
                    f"image '{path}' is locked: failed to get shared \"{PERM_NAMES[i]}\" lock "
                    f"(another open of the image holds \"{PERM_NAMES[i]}\"; "
                    f"lock byte {LOCK_PERM_BASE + i} is held). "
                    f"Is another process using the image?", f"Failed to get shared \"{PERM_NAMES[i]}\" lock", path)
    except BaseException:
        unlock()
        raise
    return ImageLock(path, write, unlock, lambda: os.close(lock_fd))


def _byte_locked(fd: int, offset: int) -> bool:
    """True if an open other than `fd`'s holds a lock on `offset` (F_OFD_GETLK, write probe)."""
    return _flock_op(fd, F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


# ---------------------------------------------------------------------------------------------
# Side-file fallback (no OFD locks)

def _lock_side_file(path: str, write: bool) -> ImageLock:
    import filelock

    lock_path = path + ".lock"
    side = filelock.FileLock(lock_path, timeout=0, thread_local=False)
    try:
        side.acquire(timeout=0)
    except filelock.Timeout:
        raise ImageLockedError(
            f"image '{path}' is locked: lock file '{lock_path}' is held by another open "
            f"of the image") from None
    if not write:
        # Exclusive-only locks: a reader just makes sure no writer is there, then lets go,
        # so that readers never exclude each other.
        side.release()
        return ImageLock(path, write, lambda: None)
    return ImageLock(path, write, side.release)
