"""qemu-img's `-t CACHE` / `-T SRC_CACHE` modes and its `-r RATE` write throttle (convert; the
modes also for check, compare, commit, rebase and amend, through `host_class`).

QEMU (bdrv_parse_cache_mode) knows five modes; here is what each means for qcowdisk:

- `unsafe` (qemu-img convert's default for the target): flushes are ignored (BDRV_O_NO_FLUSH).
  Nothing is ever fsynced: writes reach the disk when the kernel writes them back, in any
  order, so a host crash during or soon after the conversion can leave a target that is not
  consistent. QEMU gives the same (absent) guarantee; the conversion is simply redone.
- `writeback` (qemu-img's default elsewhere, and the library's default): every metadata update
  keeps its crash ordering (fsyncs between dependent writes) and the target is fsynced at the
  end, so it is durable when convert returns.
- `writethrough`: as writeback, and the target is also fsynced after every write request.
- `none` (`off`) and `directsync`: as writeback and writethrough respectively, with the file
  opened O_DIRECT, bypassing the host page cache, as QEMU does (`hostio.DirectHostFile`: aligned
  bounce buffers; a file system that refuses O_DIRECT fails the open with EINVAL, as QEMU's).

For the source (`-T`, default writeback) `none` and `directsync` read it (and its backing files)
with O_DIRECT too; the other modes read through the page cache (a source is never written, so
no mode changes what is read).
"""

from __future__ import annotations

import time

from ..hostio import DirectHostFile, HostFile

CACHE_MODES = ("none", "off", "writeback", "unsafe", "directsync", "writethrough")
DEFAULT_TARGET_CACHE = "unsafe"  # qemu-img convert's default for the target (-t)
DEFAULT_SOURCE_CACHE = "writeback"  # BDRV_DEFAULT_CACHE (-T)


class CacheModeError(ValueError):
    """A cache mode qemu-img does not know (its message: "Invalid cache option: MODE")."""


def parse_cache_mode(mode: str, what: str = "cache") -> tuple[bool, bool]:
    """(whether flushes are honoured, whether every write is flushed) for a qemu cache mode;
    `what` is "cache" or "source cache" for the error message."""
    if mode not in CACHE_MODES:
        raise CacheModeError(f"Invalid {what} option: {mode}")
    return mode != "unsafe", mode in ("writethrough", "directsync")


class NoFlushHostFile(HostFile):
    """A host file whose fsyncs do nothing: cache=unsafe (QEMU's BDRV_O_NO_FLUSH)."""

    def fsync(self) -> None:
        """Ignored, as QEMU ignores flushes with cache=unsafe."""
        self.unsynced = False

    def start_writeback(self) -> None:
        """Ignored too: with cache=unsafe nothing is written back on purpose."""


def host_class(mode: str) -> type[HostFile]:
    """The HostFile class a (valid) cache mode opens files with: O_DIRECT for none/off and
    directsync, fsyncs ignored for unsafe, the page cache otherwise."""
    if mode in ("none", "off", "directsync"):
        return DirectHostFile
    return NoFlushHostFile if mode == "unsafe" else HostFile


class RateLimit:
    """qemu-img convert's `-r RATE`: writes to the target throttled to `rate` bytes a second
    (QEMU's throttle on bps-write, whose bucket lets a tenth of a second through at once).
    Every byte of a request counts, zeroes and compressed clusters at their guest size."""

    BURST_SECONDS = 0.1

    def __init__(self, rate: int) -> None:
        """Limit to `rate` bytes per second (0: no limit)."""
        if rate < 0:
            raise ValueError(f"rate limit must not be negative: {rate}")
        self.rate = rate
        self.start = time.monotonic()
        self.written = 0

    def account(self, nbytes: int) -> None:
        """Count `nbytes` written; sleep while the writes run ahead of the rate."""
        if not self.rate:
            return
        self.written += nbytes
        ahead = self.start + self.written / self.rate - time.monotonic() - self.BURST_SECONDS
        if ahead > 0:
            time.sleep(ahead)


__all__ = ["CACHE_MODES", "DEFAULT_TARGET_CACHE", "DEFAULT_SOURCE_CACHE", "CacheModeError", "parse_cache_mode",
           "NoFlushHostFile", "RateLimit", "host_class"]
