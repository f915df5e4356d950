"""Formats: probe, resolve and open any image by format; the registry every format joins.

Each format module (qcow2/file.py, qcow1.py, raw.py) registers a `FormatDriver` here when it
is imported (this module imports them all the first time the registry is consulted, so a
program that opens no image pays for none of them), so this module sits below every format
and each of them can open its backing file through `open_backing` without importing the others:
the format graph has no import cycles. Backing chains are followed here: names are resolved
against the naming image's directory, loops and excessive depth are caught before anything
recurses.
"""

from __future__ import annotations

import os

from .errors import BackingChainError, UnsafeFileError, UnsupportedFeatureError
from .hostio import HostFactory, HostFile
from .record import FrozenRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .image import Image

PROBE_BYTES = 512
DEFAULT_MAX_NESTING_DEPTH = 64


class OpenOptionError(ValueError):
    """An opening option QEMU refuses for this image (a cache size, a raw window): its message."""


class OpenOptions(FrozenRecord):
    """How to open an image and the files it names.

    `backing=False` opens the image alone (unallocated ranges read as zeros, QEMU's
    `backing: null`). With `confine_to`, every backing file and data file must resolve (after
    symlinks) inside that directory. `force_share` (read-only only) neither takes nor honours
    the image lock, as `qemu-img -U` does. `l2_cache_size` and `l2_cache_entry_size` are
    QEMU's `l2-cache-size` and `l2-cache-entry-size` (bytes; None: QEMU's default) for the
    image itself, not its backing files (see qcowdisk.qcow2.cachesize). `raw_offset` and
    `raw_size` are QEMU's raw `offset` and `size` (a raw image itself only: the window of the
    file that is the disk; see qcowdisk.raw.raw_window). `cache_size` and `refcount_cache_size`
    are QEMU's `cache-size` and `refcount-cache-size` (shared with the L2 cache as QEMU shares
    them). `backing_node` opens the backing file as QEMU's `backing.*` options say instead of
    as the image names it; `data_file` is the external data file to use in place of the one the
    image names (QEMU's `data-file.*`; the image itself only). `write_lock` makes a read-only
    open take the writer's image lock all the same (qemu-img's `read-only=off` on a command that
    only reads an image qcowdisk opens read-only: qcow v1; the image itself only).
    """

    __slots__ = (
        "backing",
        "backing_node",
        "cache_size",
        "confine_to",
        "data_file",
        "force_share",
        "host_factory",
        "l2_cache_entry_size",
        "l2_cache_size",
        "max_nesting_depth",
        "raw_offset",
        "raw_size",
        "readonly",
        "refcount_cache_size",
        "write_lock",
    )
    readonly: bool
    max_nesting_depth: int
    host_factory: HostFactory
    backing: bool
    confine_to: str | None
    force_share: bool
    l2_cache_size: int | None
    l2_cache_entry_size: int | None
    raw_offset: int
    raw_size: int | None
    cache_size: int | None
    refcount_cache_size: int | None
    backing_node: BackingNode | None
    data_file: str | None
    write_lock: bool

    def __init__(self, readonly: bool = False, max_nesting_depth: int = DEFAULT_MAX_NESTING_DEPTH,
                 host_factory: HostFactory = HostFile, backing: bool = True, confine_to: str | None = None,
                 force_share: bool = False, l2_cache_size: int | None = None,
                 l2_cache_entry_size: int | None = None, raw_offset: int = 0, raw_size: int | None = None,
                 cache_size: int | None = None, refcount_cache_size: int | None = None,
                 backing_node: BackingNode | None = None, data_file: str | None = None,
                 write_lock: bool = False) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "readonly", readonly)
        setattr_(self, "max_nesting_depth", max_nesting_depth)
        setattr_(self, "host_factory", host_factory)
        setattr_(self, "backing", backing)
        setattr_(self, "confine_to", confine_to)
        setattr_(self, "force_share", force_share)
        setattr_(self, "l2_cache_size", l2_cache_size)
        setattr_(self, "l2_cache_entry_size", l2_cache_entry_size)
        setattr_(self, "raw_offset", raw_offset)
        setattr_(self, "raw_size", raw_size)
        setattr_(self, "cache_size", cache_size)
        setattr_(self, "refcount_cache_size", refcount_cache_size)
        setattr_(self, "backing_node", backing_node)
        setattr_(self, "data_file", data_file)
        setattr_(self, "write_lock", write_lock)

    def for_backing(self) -> OpenOptions:
        """The options a backing file is opened with: read-only, its own `backing.*` options
        (`backing_node`; default caches without), the rest inherited."""
        node = self.backing_node or BackingNode()
        return self.replace(readonly=True, l2_cache_size=node.l2_cache_size,
                            l2_cache_entry_size=node.l2_cache_entry_size, raw_offset=node.raw_offset,
                            raw_size=node.raw_size, cache_size=node.cache_size,
                            refcount_cache_size=node.refcount_cache_size, backing=node.backing,
                            backing_node=node.backing_node, data_file=None, write_lock=False)


class BackingNode(FrozenRecord):
    """A backing file as QEMU's `backing.*` options open it: `filename` and `fmt` (None: the
    name and format the image records, the format probed when it records none) and the
    options of the same names as OpenOptions' for the backing file itself."""

    __slots__ = (
        "backing",
        "backing_node",
        "cache_size",
        "filename",
        "fmt",
        "l2_cache_entry_size",
        "l2_cache_size",
        "raw_offset",
        "raw_size",
        "refcount_cache_size",
    )
    filename: str | None
    fmt: str | None
    backing: bool
    l2_cache_size: int | None
    l2_cache_entry_size: int | None
    cache_size: int | None
    refcount_cache_size: int | None
    raw_offset: int
    raw_size: int | None
    backing_node: BackingNode | None

    def __init__(self, filename: str | None = None, fmt: str | None = None, backing: bool = True,
                 l2_cache_size: int | None = None, l2_cache_entry_size: int | None = None,
                 cache_size: int | None = None, refcount_cache_size: int | None = None, raw_offset: int = 0,
                 raw_size: int | None = None, backing_node: BackingNode | None = None) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "filename", filename)
        setattr_(self, "fmt", fmt)
        setattr_(self, "backing", backing)
        setattr_(self, "l2_cache_size", l2_cache_size)
        setattr_(self, "l2_cache_entry_size", l2_cache_entry_size)
        setattr_(self, "cache_size", cache_size)
        setattr_(self, "refcount_cache_size", refcount_cache_size)
        setattr_(self, "raw_offset", raw_offset)
        setattr_(self, "raw_size", raw_size)
        setattr_(self, "backing_node", backing_node)


def check_confined(path: str, options: OpenOptions, what: str, named_by: str, real: str | None = None) -> None:
    """Refuse a file an image names when it resolves (or `real` is) outside `options.confine_to`."""
    if options.confine_to is None:
        return
    root = os.path.realpath(options.confine_to)
    if real is None:
        real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise UnsafeFileError(
            f"{what} {path!r} named by {named_by!r} resolves to {real!r}, outside the directory "
            f"{options.confine_to!r} the image is confined to")


def open_named_file(path: str, writable: bool, options: OpenOptions, what: str, named_by: str) -> HostFile:
    """Open a file an image names (backing or data file), honouring `options.confine_to`.

    The name is checked before the open (for a clear message) and the opened descriptor after it
    (/proc/self/fd), so a symlink swapped in between cannot lead outside the directory.
    """
    check_confined(path, options, what, named_by)
    host = options.host_factory(path, writable)
    if options.confine_to is not None:
        try:
            real = os.readlink(f"/proc/self/fd/{host.fd}")
        except OSError:  # no /proc: the check by name above is what there is
            return host
        try:
            check_confined(path, options, what, named_by, real)
        except BaseException:
            host.close()
            raise
    return host


class FormatDriver(FrozenRecord):
    """One format: its name as qemu-img spells it, a probe score for the file's first bytes
    (0 = not this format; the highest score wins) and its opener."""

    __slots__ = ("name", "open", "probe")
    name: str
    probe: Callable[[bytes], int]
    open: Callable[[str, OpenOptions, tuple[str, ...]], Image]

    def __init__(self, name: str, probe: Callable[[bytes], int],
                 open: Callable[[str, OpenOptions, tuple[str, ...]], Image]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "probe", probe)
        object.__setattr__(self, "open", open)


_DRIVERS: dict[str, FormatDriver] = {}
_FORMAT_MODULES = ("raw", "qcow1", "qcow2.file")
_loaded: list[bool] = []  # not empty once every format module is imported


def _drivers() -> dict[str, FormatDriver]:
    """The registry, with every format module imported (each registers itself)."""
    if not _loaded:
        import importlib
        for module in _FORMAT_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        _loaded.append(True)
    return _DRIVERS


def register(driver: FormatDriver) -> None:
    """Make a format known (called once by each format module)."""
    _DRIVERS[driver.name] = driver


def format_names() -> list[str]:
    """The names of every known format."""
    return sorted(_drivers())


def probe_format(path: str, host_factory: HostFactory | None = None) -> str:
    """Guess an image's format from its first bytes, as QEMU's probing does."""
    host = (host_factory or HostFile)(path, False)
    try:
        head = host.pread(PROBE_BYTES, 0)
    finally:
        host.close()
    return max(_drivers().values(), key=lambda d: d.probe(head)).name


def resolve_backing_path(parent_path: str, name: str) -> str:
    """A relative backing name is relative to the directory of the image naming it."""
    if name.startswith("json:") or (":" in name.split("/")[0] and not os.path.exists(name)
                                    and name.split(":", 1)[0] in ("nbd", "http", "https", "ftp", "ssh", "iscsi", "file")):
        if name.startswith("file:"):
            name = name[5:]
        else:
            raise UnsupportedFeatureError(f"backing file name {name!r}: protocols and json: names are not supported")
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(parent_path)), name)


def open_image(path: str, fmt: str | None = None, options: OpenOptions | None = None,
               chain: tuple[str, ...] = ()) -> Image:
    """Open `path` as `fmt` (probed when None) with its backing chain (default options: `OpenOptions()`)."""
    if options is None:
        options = OpenOptions()
    if not fmt:
        fmt = probe_format(path, options.host_factory)
    driver = _drivers().get(fmt)
    if driver is None:
        raise UnsupportedFeatureError(
            f"image {path!r}: format {fmt!r} is not supported ({', '.join(format_names())})")
    return driver.open(path, options, chain or (os.path.realpath(path),))


def open_backing(parent_path: str, name: str, fmt: str | None, options: OpenOptions,
                 chain: tuple[str, ...]) -> Image:
    """Open the backing image `name` of the image at `parent_path`, read-only.

    `chain` holds the real paths of every image above (the parent last); its length is the
    parent's depth. Raises BackingChainError for missing files, loops and chains deeper than
    `options.max_nesting_depth`. `options.backing_node` may name another file and format.
    """
    node = options.backing_node
    if node is not None and node.fmt is not None:
        fmt = node.fmt
    path = node.filename if node is not None and node.filename is not None else resolve_backing_path(parent_path, name)
    if len(chain) > options.max_nesting_depth:
        raise BackingChainError(
            f"backing chain of {parent_path!r} is too deep: more than max_nesting_depth "
            f"{options.max_nesting_depth} backing files")
    check_confined(path, options, "backing file", parent_path)
    if not os.path.exists(path):
        raise BackingChainError(f"backing file {path!r} (named {name!r} by {parent_path!r}) does not exist")
    real = os.path.realpath(path)
    if real in chain:
        raise BackingChainError(f"backing chain loops: {parent_path!r} names {name!r}, which is already in the chain")
    try:
        return open_image(path, fmt or None, options.for_backing(), (*chain, real))
    except OpenOptionError as e:  # (QEMU's words for an option of the backing node)
        raise OpenOptionError(f"Could not open backing file: {e}") from None
    except OSError as e:
        raise BackingChainError(f"cannot open backing file {path!r} of {parent_path!r}: {e.strerror}") from None
    except RecursionError:  # pragma: no cover - depth is bounded above
        raise BackingChainError(f"backing chain of {parent_path!r} is too deep") from None
