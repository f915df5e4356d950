"""Convert a guest disk to a new qcow2 or raw image as `qemu-img convert` (QEMU 7.2) does.

QEMU's loop (img_convert, convert_iteration_sectors, convert_co_write), step by step: the
source's block status splits the disk into runs that read as zeros, hold data, or (with a
target backing file) come from that backing file. Zero runs are skipped on a new target (it
reads as zeros already) and written as zeroes otherwise; backing-file runs are skipped; data
runs are read at most `IO_BUF_SIZE` at a time (by two threads, each with reused buffers;
the pieces are written in guest order: qcowdisk.ops.inorder), and in each piece the
all-zero stretches of at least `sparse_size` bytes (qemu-img's `-S`, is_allocated_sectors_min,
with its alignment rules) are treated as zero runs, the rest written. `sparse_size=0` (`-S 0`)
writes every byte, zeros included, so the target is fully allocated. With `compress`, data is
handled one cluster at a time: an all-zero cluster is skipped, the others are written with
`write_compressed`, whose compression runs in worker threads (zlib and zstd release the GIL).

Memory stays bounded whatever the disk's size: block status is read lazily and data moves
through a fixed number of buffers; unallocated and zero ranges are never read.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator

from .. import formats
from ..blockstatus import qemu_length
from ..errors import QcowError
from ..hostio import HostFile
from ..image import zero_block
from ..locking import ImageLock, lock_image
from ..qcow2.bitmapedit import BitmapEditor
from ..qcow2.compressed import CompressedClusters
from ..qcow2.file import QcowFile
from ..raw import FIRST_BLOCK, raw_window
from . import bitmapcopy
from .cachemode import DEFAULT_SOURCE_CACHE, RateLimit, host_class, parse_cache_mode
from .inorder import InOrder
from .measure import Options, target_options
from .qemuopts import QemuOpts
from .writeback import WritebackPacer
from .zeroscan import SECTOR, data_runs, is_zero

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from ..image import Image

    _T = TypeVar("_T")
    from concurrent.futures import Future

IO_BUF_SIZE = 2 << 20  # qemu-img's IO_BUF_SIZE: the most read and written in one step
MAX_BUF_SECTORS = 32768  # the largest -S qemu-img takes, in sectors
COMPRESS_BATCH = 1 << 20  # bytes of clusters handed to one compression worker at a time
# Plain copies: two threads, each reading, scanning and (in its turn) writing its own 2 MiB
# piece, keep two cores busy; a third measured no faster (qcowdisk.ops.inorder).
COPY_WORKERS = 2
COPY_BUFFERS = 6  # pieces in flight: workers prepare the next ones while another writes its turn

# plain copy steps (kind, guest offset, length) and what preparing one gives: the step, the
# bytes read (data steps), and runs (is_data, start, end) of offsets in them
_SKIP, _ZEROES, _ZERO_DATA, _DATA = range(4)
_Step = tuple[int, int, int]
_Prepared = tuple[_Step, memoryview | None, list[tuple[bool, int, int]]]

Progress = Callable[[int, int], object]

_COMPAT = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}


class ConvertError(ValueError):
    """A conversion qemu-img refuses before writing anything (bad options, sizes, snapshots)."""


class OpenRefusedError(ConvertError):
    """The source or target cannot be opened with the options given (`source_open`,
    `target_open`): `path` names it, `reason` is QEMU's message."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"Could not open '{path}': {reason}")
        self.path, self.reason = path, reason


@contextlib.contextmanager
def _opening(path: str) -> Iterator[None]:
    """Turn an option refused at open into OpenRefusedError naming `path`."""
    try:
        yield
    except formats.OpenOptionError as e:
        raise OpenRefusedError(path, str(e)) from None


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, src_format: str | None = None,
            out_format: str = "qcow2", options: Options = None, compress: bool = False,
            backing_file: str | None = None, backing_format: str | None = None, snapshot: str | None = None,
            sparse_size: int = 4096, target_exists: bool = False, progress: Progress | None = None,
            threads: int | None = None, out_of_order: bool = False, target_is_zero: bool = False,
            cache: str = "writeback", src_cache: str = DEFAULT_SOURCE_CACHE, rate_limit: int = 0,
            force_share: bool = False, bitmaps: bool = False, skip_broken_bitmaps: bool = False,
            source_open: formats.OpenOptions | None = None,
            target_open: formats.OpenOptions | None = None) -> None:
    """Convert the guest disk `src` into `dst` as `qemu-img convert [-f SRC_FORMAT] -O OUT_FORMAT
    [-o OPTIONS] [-c] [-B BACKING_FILE [-F BACKING_FORMAT]] [-l SNAPSHOT] [-S SPARSE_SIZE] [-n]
    [-m THREADS] [-W] [--target-is-zero] [-t CACHE] [-T SRC_CACHE] [-r RATE] [-U] SRC DST` does.

    `src` is opened read-only with its backing chain (format probed unless `src_format` names
    it; `snapshot`, an id or name, shows that internal snapshot of a qcow2 source). `dst` is
    created (replacing any file there) as `out_format` "qcow2" (every `qemu-img create -o`
    option in `options`: text or a mapping) or "raw" (a sparse file), unless `target_exists`,
    when it is opened and written over, zero ranges included. With `backing_file`, the new
    qcow2 image is an overlay of it and only what differs from it is written: when the source's
    chain contains that file, only the layers above it are copied; otherwise each cluster is
    compared with the backing file's. `sparse_size` is `-S` (a multiple of 512; 0 allocates
    everything). `compress` writes compressed clusters (qcow2 only), compressing in `threads`
    worker threads (default: the CPU count, at most 8); the payloads are written in guest order
    unless `out_of_order` (-W: each worker writes its clusters as soon as they are compressed).
    Uncompressed data is read and scanned for zeros by two threads (at most `threads`; one on
    a one-CPU host), 2 MiB at a time, and written in guest order whatever `out_of_order` says,
    so the target is byte for byte what a one-thread copy makes (qcowdisk.ops.inorder).
    `target_is_zero` (with `target_exists` only, and
    a target without a backing file) takes the existing target to read as zeros already, so
    zero ranges are not written. `cache` and `src_cache` are qemu-img's -t and -T modes
    (see qcowdisk.ops.cachemode: "unsafe" never fsyncs, as qemu-img convert by default;
    "writeback", the library's default, leaves the target durable on return). `rate_limit`
    throttles writes to that many bytes a second (0: none). `force_share` opens the source
    without its image lock, as -U (it may be in use, and seen inconsistent). `bitmaps`
    (--bitmaps) copies the source's persistent bitmaps (names, granularity, enabled or not,
    contents) into the qcow2 target after the data, as qemu-img does, and refuses what it
    refuses (a source or target without bitmap support, an inconsistent bitmap unless
    `skip_broken_bitmaps`, which skips it with a `BitmapSkippedWarning`); see
    qcowdisk.ops.bitmapcopy.
    `source_open` and `target_open` (from `--image-opts` / `--target-image-opts`) open
    the source and the existing target (`target_exists`) as they say: cache sizes, backing
    files (`backing`, `backing_node`), a data file, a raw image's `raw_offset`/`raw_size`
    window; the access mode, lock sharing and host I/O class come from the other arguments.
    `progress(done_bytes, total_bytes)` is
    called as the conversion goes; an exception from it stops the conversion and propagates,
    with everything closed (the partly written target is left behind, as qemu-img leaves it).
    Raises ConvertError (a ValueError) for what qemu-img refuses up front.
    """
    if sparse_size < 0 or sparse_size % SECTOR or sparse_size // SECTOR > MAX_BUF_SECTORS:
        raise ConvertError(f"Invalid buffer size for sparse output specified. Valid sizes are multiples of "
                           f"{SECTOR} up to {MAX_BUF_SECTORS * SECTOR}. Select 0 to disable sparse detection "
                           f"(fully allocates output).")
    if skip_broken_bitmaps and not bitmaps:
        raise ConvertError("Use of --skip-broken-bitmaps requires --bitmaps")
    if out_format not in ("qcow2", "raw"):
        raise ConvertError(f"Unknown file format '{out_format}'" if out_format not in ("qcow", "vmdk", "vdi")
                           else f"qcowdisk writes qcow2 and raw images only, not '{out_format}'")
    if compress and out_format != "qcow2":
        raise ConvertError("Compression not supported for this file format")
    if backing_format is not None and backing_file is None:
        raise ConvertError("Backing format cannot be used without backing file")
    if threads is not None and threads < 1:
        raise ConvertError("Invalid number of threads (must be at least 1)")
    try:
        _, flush_each = parse_cache_mode(cache)
        parse_cache_mode(src_cache, "source cache")
        limit = RateLimit(rate_limit)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if target_is_zero and not target_exists:
        raise ConvertError("--target-is-zero requires use of -n flag")
    opts = target_options(out_format, options)
    if opts.string("backing_file") is not None:
        if backing_file is not None:
            raise ConvertError("Option backing_file cannot be used together with -B")
        backing_file = opts.string("backing_file")
        backing_format = backing_format or opts.string("backing_fmt")
    if backing_file is not None and out_format != "qcow2":
        raise ConvertError("Backing file not supported for file format 'raw'")
    if backing_file is not None and target_exists:
        raise ConvertError("-B cannot be used with -n (the target exists)")
    dst_path = os.fspath(dst)
    with contextlib.ExitStack() as stack:
        with _opening(os.fspath(src)):
            source = _open_source(os.fspath(src), src_format, snapshot, force_share, host_class(src_cache),
                                  source_open or formats.OpenOptions())
        stack.callback(source.close)
        size = qemu_length(source)
        if snapshot is not None and isinstance(source, QcowFile):
            size = max(size, source.header.size)  # qemu-img exports a snapshot at the active disk's size
        _refuse_source_as_target(source, dst_path)
        found = None
        if bitmaps:
            found = _bitmap_step(lambda: bitmapcopy.check_source(source, skip_broken_bitmaps))
            if not target_exists:
                _bitmap_step(lambda: bitmapcopy.refuse_target(out_format, 2 if _compat(opts) == "0.10" else 3))
        host = host_class(cache)
        if target_exists:
            with _opening(dst_path):
                target = _open_target(dst_path, out_format, size, host, target_open or formats.OpenOptions())
        else:
            target = _create_target(dst_path, out_format, opts, size, backing_file, backing_format, host, stack)
        stack.callback(target.close)
        editor = target.disk.edit_bitmaps() if isinstance(target, _QcowTarget) else None
        if editor is not None:
            stack.push(_bitmaps_committed(editor))  # before the close, whatever happens (as qemu-img's close)
        if found is not None and target_exists:
            version = target.disk.header.version if isinstance(target, _QcowTarget) else 0
            _bitmap_step(lambda: bitmapcopy.refuse_target(out_format, version))
        target.limit, target.flush_each = limit, flush_each
        if target_is_zero and isinstance(target, _QcowTarget) and target.disk.backing_file is not None:
            raise ConvertError("Cannot use --target-is-zero when the destination image has a backing file")
        base_depth, backing = _backing_layer(source, target, backing_file, stack)
        # (a raw external data file may hold anything: qcow2_has_zero_init says no, zeros are written)
        zero_init = target_is_zero or (not target_exists and backing_file is None
                                       and not opts.boolean("data_file_raw", False))
        _Copy(source, size, target, sparse_size // SECTOR, compress, base_depth, backing, progress,
              threads or min(8, os.cpu_count() or 1), zero_init, out_of_order).run()
        if found is not None:
            assert isinstance(source, QcowFile) and editor is not None  # (check_source, refuse_target)
            _bitmap_step(lambda: bitmapcopy.copy(source, found, editor))
        if editor is not None:
            editor.commit()
        target.flush()


# ------------------------------------------------------------------------------------------
# opening and creating
# ------------------------------------------------------------------------------------------

def _open_source(path: str, fmt: str | None, snapshot: str | None, force_share: bool,
                 host: type[HostFile], options: formats.OpenOptions) -> Image:
    opened = options.replace(readonly=True, force_share=force_share, host_factory=host)
    if snapshot is None:
        return formats.open_image(path, fmt, opened)
    if fmt not in (None, "qcow2"):
        raise ConvertError(f"Failed to load snapshot: a '{fmt}' image has no internal snapshots")
    return QcowFile.open_snapshot(path, snapshot, opened)  # (the option string's backing and caches too)


def create_keywords(opts: QemuOpts) -> dict[str, Any]:
    """`QcowFile.create` keywords for qcow2 `-o` options (backing ones excluded)."""
    kw: dict[str, Any] = {}
    if opts.boolean("encryption", False) or opts.string("encrypt.format") is not None:
        raise ConvertError("qcowdisk does not create encrypted images")
    if opts.given("cluster_size"):
        kw["cluster_size"] = opts.number("cluster_size", 65536)
    if opts.given("refcount_bits"):
        kw["refcount_bits"] = opts.number("refcount_bits", 16)
    compat = opts.string("compat")
    if compat is not None:
        if compat not in _COMPAT:
            raise ConvertError(f"Invalid compatibility level: '{compat}'")
        kw["compat"] = _COMPAT[compat]
    for name in ("lazy_refcounts", "extended_l2", "data_file_raw"):
        if opts.given(name):
            kw[name] = opts.boolean(name, False)
    for name in ("compression_type", "preallocation", "data_file"):
        value = opts.string(name)
        if value is not None:
            kw[name] = value
    return kw


class _Requests:
    """What every target does after a write request: flush it (writethrough), throttle (-r),
    and start the writeback of the data every few MiB (see ops.writeback: the flush at the end,
    when the cache mode honours it, then waits less; cache=unsafe's host ignores the hint)."""

    limit = RateLimit(0)
    flush_each = False
    writeback: WritebackPacer | None = None  # set by the target's constructor

    def flush(self) -> None:
        raise NotImplementedError

    def written(self, n: int, data: bool = False) -> None:
        """Count a request of n guest bytes (`data`: bytes written, not zeroed)."""
        if self.flush_each:
            self.flush()
        elif data and self.writeback is not None:
            self.writeback.wrote(n)
        self.limit.account(n)


class _RawTarget(_Requests):
    """A raw file written in place, under QEMU's write lock: only non-zero data is written, holes
    stay holes, zeroed ranges are punched (file-posix's write_zeroes with MAY_UNMAP)."""

    def __init__(self, path: str, size: int, new: bool, preallocation: str,
                 host: type[HostFile] = HostFile, offset: int = 0) -> None:
        self.host = host.create(path) if new else host(path, True)
        self.fd = self.host.fd
        self.writeback = WritebackPacer(self.host.start_writeback)
        self.virtual_size = size
        self.offset = offset  # an existing raw target's window (raw's offset= option)
        self.cluster_size = 0
        self.lock: ImageLock | None = None
        try:
            self.lock = lock_image(self.fd, path, write=True)
            if new:
                self.host.truncate(size)
                if size:  # file-posix's allocate_first_block: QEMU's new files start with a block of zeros
                    self.host.pwrite(zero_block(min(size, FIRST_BLOCK)), 0)
                if preallocation == "falloc" and size:
                    self.host.allocate(0, size)
                elif preallocation == "full":  # file-posix writes zeros: the file maps as data
                    self.host.write_zeros(FIRST_BLOCK, size - FIRST_BLOCK)
        except BaseException:
            self.close()
            raise

    def write_at(self, offset: int, data: memoryview) -> None:
        self.host.pwrite(data, self.offset + offset)
        self.written(len(data), data=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.written(length)
        self.host.zero_range(self.offset + offset, length)


    def flush(self) -> None:
        self.host.fsync()

    def close(self) -> None:
        lock, self.lock = self.lock, None
        if lock is not None:
            lock.release()
        self.host.close()


class _QcowTarget(_Requests):
    def __init__(self, disk: QcowFile) -> None:
        self.disk = disk  # (an existing target's own bitmaps record what is written: QcowFile does it)
        self.writeback = WritebackPacer(disk.start_writeback)
        self.cluster_size = disk.cluster_size

    def write_at(self, offset: int, data: memoryview) -> None:
        self.disk.write_at(offset, data)
        self.written(len(data), data=True)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.disk.zeroize(offset, length)  # zero clusters, as qemu-img's MAY_UNMAP zeroing
        self.written(length)


    def flush(self) -> None:
        self.disk.flush()

    def close(self) -> None:
        self.disk.close()


_Target = _RawTarget | _QcowTarget


def _refuse_source_as_target(source: Image, dst: str) -> None:
    """The target may not be the source or a file of its chain (qemu-img fails on the image lock)."""
    if not os.path.exists(dst):
        return
    layer: Image | None = source
    while layer is not None:
        with contextlib.suppress(OSError):
            if os.path.samefile(layer.filename, dst):
                raise ConvertError(f"Could not create '{dst}': Failed to get \"write\" lock: "
                                   f"it is the source image or in its backing chain")
        layer = layer.backing


def _bitmap_step(step: Callable[[], _T]) -> _T:
    """Run a step of --bitmaps, its refusals as ConvertError."""
    try:
        return step()
    except bitmapcopy.BitmapCopyError as e:
        raise ConvertError(str(e)) from None


def _bitmaps_committed(editor: BitmapEditor) -> Callable[..., bool]:
    """An exit callback committing the target's bitmaps: after a failure too (qemu-img's close
    stores what it has), unless that commit fails as well (the failure at hand is the one to
    report; bitmaps marked in use stay so, inconsistent)."""
    def exit_(exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is None:
            editor.commit()
        else:
            with contextlib.suppress(QcowError, OSError):
                editor.commit()
        return False
    return exit_


def _compat(opts: QemuOpts) -> str:
    return _COMPAT.get(opts.string("compat") or "1.1", "1.1")


def _remove_existing(path: str, stack: contextlib.ExitStack) -> None:
    """Remove the file a new target replaces, unless another process holds it (qemu-img's lock
    failure). Its name goes at once, but its blocks are freed by the last close (a large file's
    take a good part of a copy's time: qemu-img's ftruncate pays it up front), so that close runs
    in a thread of its own while the copy goes on, joined before convert returns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            lock_image(fd, path, write=True).release()  # ImageLockedError when in use
        os.unlink(path)
    except BaseException:
        os.close(fd)
        raise
    closer = threading.Thread(target=os.close, args=(fd,), name="qcowdisk-free-old-target", daemon=True)
    closer.start()
    stack.callback(closer.join)


def _create_target(path: str, out_format: str, opts: QemuOpts, size: int, backing_file: str | None,
                   backing_format: str | None, host: type[HostFile], stack: contextlib.ExitStack) -> _Target:
    if out_format == "raw":
        prealloc = opts.string("preallocation") or "off"
        if prealloc not in ("off", "falloc", "full"):
            raise ConvertError(f"Invalid parameter '{prealloc}'")
        _remove_existing(path, stack)
        return _RawTarget(path, size, True, prealloc, host)
    kw = create_keywords(opts)
    _remove_existing(path, stack)
    if backing_file is not None:
        return _QcowTarget(QcowFile.create_from_backing(path, backing_file, backing_format=backing_format,
                                                        size=size, host_factory=host, **kw))
    return _QcowTarget(QcowFile.create(path, size, host_factory=host, **kw))


def _open_target(path: str, out_format: str, size: int, host: type[HostFile],
                 options: formats.OpenOptions) -> _Target:
    if out_format == "raw":
        raw = _RawTarget(path, size, False, "off", host, options.raw_offset)
        target: _Target = raw
        try:
            have = raw_window(raw.host.size(), options.raw_offset, options.raw_size)
        except BaseException:
            raw.close()
            raise
        have = -(-have // SECTOR) * SECTOR  # (QEMU counts the disk in whole sectors)
    else:
        # (writes into an image with bitmaps are recorded in them, as QEMU records them)
        img = formats.open_image(path, "qcow2", options.replace(
            readonly=False, force_share=False, host_factory=host, raw_offset=0, raw_size=None))
        assert isinstance(img, QcowFile)  # (QcowFile.open read-write, with the options' caches and files)
        target = _QcowTarget(img)
        have = img.virtual_size
    if have < size:
        target.close()
        raise ConvertError("output file is smaller than input file")
    return target


def _backing_layer(source: Image, target: _Target, backing_file: str | None,
                   stack: contextlib.ExitStack) -> tuple[int | None, Image | None]:
    """(depth of the backing file in the source's chain, or None; the target's backing image when
    it is not in the source's chain, for cluster-by-cluster comparison)."""
    if backing_file is None or not isinstance(target, _QcowTarget):
        return None, None
    backing = target.disk.backing
    assert backing is not None
    want = os.path.realpath(backing.filename)
    depth, layer = 0, source
    layer_: Image | None = source
    while layer_ is not None:
        layer = layer_
        if os.path.realpath(layer.filename) == want:
            return depth, None
        depth, layer_ = depth + 1, layer.backing
    return None, backing


def _pow2floor(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0


# ------------------------------------------------------------------------------------------
# the copy
# ------------------------------------------------------------------------------------------

class _Compressor:
    """Compressed clusters through worker threads, as qemu-img's coroutines with -m: each job
    reads up to COMPRESS_BATCH bytes of whole clusters, finds the all-zero clusters and
    compresses the others, all without the image lock (reads, zero scans, zlib and zstandard
    release the GIL), so the main thread only hands out ranges and the work scales with the
    CPUs. In order (qemu-img without -W), the main thread writes the jobs' results in guest
    order, so the payloads lie in the file in guest order; with `out_of_order` (-W) each worker
    writes its own as soon as they are compressed. At most 2 jobs a thread are in flight, so
    memory stays bounded."""

    def __init__(self, copy: _Copy, target: _QcowTarget, threads: int, out_of_order: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor  # (only compressed converts need threads)
        self.copy = copy
        self.target = target
        self.disk = target.disk
        self.out_of_order = out_of_order
        self.limit = 2 * threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="qcowdisk-compress")
        self.inflight: deque[Future[list[CompressedClusters]]] = deque()

    def submit(self, offset: int, n: int, read: bool, skip_zeros: bool) -> None:
        """Compress and write the n bytes of whole clusters at guest `offset`: read from the
        source (else zeros), all-zero clusters skipped if `skip_zeros`."""
        while len(self.inflight) >= self.limit:
            self._retire()
        self.inflight.append(self.pool.submit(self._job, offset, n, read, skip_zeros))
        self.target.written(n)

    def _job(self, offset: int, n: int, read: bool, skip_zeros: bool) -> list[CompressedClusters]:
        cs = self.disk.cluster_size
        data: bytes | bytearray = self.copy.read_new(offset, n) if read else bytes(n)
        mv = memoryview(data)[:n]
        out: list[CompressedClusters] = []
        c = 0
        while c < n:
            if skip_zeros and is_zero(data, c, min(cs, n - c)):
                c += cs
                continue
            d = c + cs  # a run of clusters to write
            while d < n and not (skip_zeros and is_zero(data, d, min(cs, n - d))):
                d += cs
            if self.out_of_order:
                self.disk.write_compressed(offset + c, mv[c:min(d, n)])
            else:
                out.append(self.disk.compress_clusters(offset + c, mv[c:min(d, n)]))
            c = d
        return out

    def _retire(self) -> None:
        for clusters in self.inflight.popleft().result():
            self.disk.write_compressed_clusters(clusters)

    def finish(self) -> None:
        """Wait for every job and write what is left."""
        while self.inflight:
            self._retire()
        self.pool.shutdown()

    def abort(self) -> None:
        """Drop the jobs not started, wait for the running ones (they may be writing)."""
        for f in self.inflight:
            f.cancel()
        self.pool.shutdown(wait=True)


class _Copy:
    def __init__(self, source: Image, size: int, target: _Target, min_sparse: int, compress: bool,
                 base_depth: int | None, backing: Image | None, progress: Progress | None, threads: int,
                 zero_init: bool, out_of_order: bool) -> None:
        self.source = source
        self.size = size
        self.target = target
        self.min_sparse = min_sparse
        self.alignment = max(_pow2floor(min_sparse), 1)
        self.compress = compress
        self.base_depth = base_depth
        self.backing = backing
        self.progress = progress
        self.threads = threads
        self.out_of_order = out_of_order
        self.zero_init = zero_init
        self.cdone = 0  # where the clusters written compressed so far end
        self.buf = bytearray(IO_BUF_SIZE)
        self.buf2 = bytearray(IO_BUF_SIZE)
        self.compressor: _Compressor | None = None
        # plain copies: this many threads read and scan while another writes (qemu-img -m bounds it)
        self.copy_workers = min(COPY_WORKERS, threads, os.cpu_count() or 1)
        self.applied = 0  # where the steps applied so far end
        self.reported = 0  # the progress last reported

    def _report(self, done: int) -> None:
        if self.progress is not None:
            self.progress(done, self.size)

    def run(self) -> None:
        self._report(0)
        if not self.compress and self.backing is None:
            InOrder(self._plain_steps(), self._prepare, self._apply, self._caught_up, self.copy_workers,
                    COPY_BUFFERS if self.copy_workers > 1 else 1, IO_BUF_SIZE).run()
            self._caught_up()
            return
        if not self.compress:
            self._walk()
            return
        assert isinstance(self.target, _QcowTarget)
        self.compressor = _Compressor(self, self.target, self.threads, self.out_of_order)
        try:
            self._walk()
        except BaseException:
            self.compressor.abort()
            raise
        self.compressor.finish()

    def _walk(self) -> None:
        pos = 0
        for e in self.source.block_status(0, self.size):
            end = e.start + e.length
            if self.base_depth is not None and e.depth >= self.base_depth:
                pass  # the target's backing file holds it
            elif e.zero and self.min_sparse and self.backing is None:
                if not self.zero_init:
                    self.target.write_zeroes(e.start, e.length)
            elif self.backing is not None:
                self._diff(e.start, end, e.zero)
            else:
                self._compressed(e.start, end, e.zero)
            pos = end
            self._report(pos)
        if pos < self.size:  # a snapshot shorter than the active disk: zeros up to its size
            if not self.zero_init:
                self.target.write_zeroes(pos, self.size - pos)
            self._report(self.size)

    def _plain_steps(self) -> Iterator[_Step]:
        """A plain copy as steps in guest order (kind, offset, length): block status extents
        of zeros, data pieces of at most IO_BUF_SIZE; each step's end is the progress after it."""
        pos = 0
        for e in self.source.block_status(0, self.size):
            end = e.start + e.length
            if self.base_depth is not None and e.depth >= self.base_depth:
                yield _SKIP, e.start, e.length  # the target's backing file holds it
            elif e.zero and self.min_sparse:
                yield _ZEROES, e.start, e.length
            else:
                kind = _ZERO_DATA if e.zero else _DATA  # (zeros written as data: -S 0)
                for p in range(e.start, end, IO_BUF_SIZE):
                    yield kind, p, min(end - p, IO_BUF_SIZE)
            pos = end
        if pos < self.size:  # a snapshot shorter than the active disk: zeros up to its size
            yield _ZEROES, pos, self.size - pos

    def _prepare(self, step: _Step, buf: bytearray) -> _Prepared:
        """Read a data step into `buf` and split it into runs (is_data, start, end) by qemu-img's
        zero detection; other steps need nothing read."""
        kind, pos, n = step
        if kind != _DATA:
            return step, None, []
        mv = self._read(buf, pos, n)
        if not self.min_sparse:
            return step, mv, [(True, 0, n)]
        sectors = -(-n // SECTOR)
        if sectors * SECTOR > n:
            buf[n:sectors * SECTOR] = bytes(sectors * SECTOR - n)
        runs = []
        at = 0
        for is_data, count in data_runs(buf, sectors, pos // SECTOR, self.min_sparse, self.alignment):
            runs.append((is_data, at * SECTOR, min((at + count) * SECTOR, n)))
            at += count
        return step, mv, runs

    def _apply(self, prepared: _Prepared) -> None:
        """Write a prepared step to the target (steps come here one at a time, in guest order)."""
        (kind, pos, n), mv, runs = prepared
        target = self.target
        if kind == _ZEROES:
            if not self.zero_init:
                target.write_zeroes(pos, n)
        elif kind == _ZERO_DATA:
            target.write_at(pos, zero_block(n))
        elif kind == _DATA:
            assert mv is not None
            for is_data, a, b in runs:
                if is_data:
                    target.write_at(pos + a, mv[a:b])
                elif not self.zero_init:
                    target.write_zeroes(pos + a, b - a)
        self.applied = pos + n

    def _caught_up(self) -> None:
        """Report the progress the applied steps made (in the caller's thread)."""
        if self.applied != self.reported:
            self.reported = self.applied
            self._report(self.applied)

    def _read(self, buf: bytearray, offset: int, n: int) -> memoryview:
        mv = memoryview(buf)[:n]
        got = self.source.readinto_at(mv, offset)
        if got < n:
            mv[got:] = zero_block(n - got)
        return mv

    def _compressed(self, start: int, end: int, zero_range: bool) -> None:
        """Clusters written compressed, by jobs of whole clusters. An all-zero cluster is
        skipped when the target reads zeros already (qemu-img: has_zero_init and -S not 0),
        else written compressed as qemu-img writes it."""
        compressor = self.compressor
        assert compressor is not None
        cs = compressor.disk.cluster_size
        batch = max(cs, COMPRESS_BATCH // cs * cs)
        skip_zeros = self.zero_init and self.min_sparse != 0
        pos = max(start // cs * cs, self.cdone)
        last = min(-(-end // cs) * cs, self.size)
        self.cdone = max(self.cdone, last)
        while pos < last:
            n = min(last - pos, batch)
            # a zero range says nothing of the rest of the clusters it starts or ends inside
            zeros = zero_range and start <= pos and pos + n <= end
            if not (zeros and skip_zeros):
                compressor.submit(pos, n, not zeros, skip_zeros)
            pos += n
            self._report(min(pos, end))

    def read_new(self, offset: int, n: int) -> bytearray:
        """n bytes of the source at `offset` in a new buffer (any thread may call this)."""
        data = bytearray(n)
        self._read(data, offset, n)
        return data

    def _diff(self, start: int, end: int, zero: bool) -> None:
        """Write where the source differs from the target's backing file, cluster by cluster."""
        backing = self.backing
        assert backing is not None
        cs = self.target.cluster_size
        step = IO_BUF_SIZE // cs * cs or cs
        pos = start
        while pos < end:
            n = min(end - pos, step - pos % cs if pos % cs else step)
            if zero:
                self.buf[:n] = zero_block(n)
            else:
                self._read(self.buf, pos, n)
            self._read_backing(pos, n)
            src, ref = self.buf, self.buf2
            c = 0
            while c < n:
                d = min(n, c + cs - (pos + c) % cs)
                if src[c:d] != ref[c:d]:  # (bytearray slices compare with memcmp)
                    if is_zero(src, c, d - c):
                        self.target.write_zeroes(pos + c, d - c)
                    else:
                        self.target.write_at(pos + c, memoryview(src)[c:d])
                c = d
            pos += n

    def _read_backing(self, offset: int, n: int) -> None:
        """n bytes of the target's backing file at `offset` into buf2 (zeros past its end)."""
        backing = self.backing
        assert backing is not None
        mv = memoryview(self.buf2)[:n]
        have = max(0, min(n, qemu_length(backing) - offset))
        got = backing.readinto_at(mv[:have], offset) if have else 0
        if got < n:
            mv[got:] = zero_block(n - got)


__all__ = ["convert", "ConvertError", "IO_BUF_SIZE"]
