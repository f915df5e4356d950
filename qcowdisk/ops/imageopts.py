"""qemu-img's `--image-opts`: an image named by block-layer options instead of a file name.

`driver=qcow2,file.driver=file,file.filename=/path/x.qcow2,l2-cache-size=1M` is read as QEMU 7.2
reads it: QemuOpts syntax (`,,` is a literal comma; a first item without `=` is the implied
`file=`, which names a block node and so can never be found here; any later bare `name` is
`name=on`, with QEMU's deprecation warning), then the checks the block layer makes, in its
order, with its messages:

- the format (`driver`, probed when absent), the protocol child (`file.driver`, only `file` and
  `host_device`; `file.filename` required) and the file's existence;
- the values of every option QEMU's qcow2, raw, file-posix and generic block layer know;
- QEMU's cache-size rules (`cache-size`, `l2-cache-size`, `refcount-cache-size`);
- options nobody knows, the first in QDict order named (QEMU's QDict iterates hash buckets).

What qcowdisk honours: the format, the file name, `force-share`, `read-only` (checked against
what the command does; `off` on a command that only reads opens the image read-write with the
write lock, as QEMU does, a qcow v1 image read-only with the writer's lock), `l2-cache-size`,
`l2-cache-entry-size`, `cache-size` and `refcount-cache-size` (qcowdisk.qcow2.cachesize), raw's
`offset` and `size` (a window on the file; qemu-img info names the image by QEMU's json: name),
`backing=` (empty: open the image without its backing file, with QEMU's deprecation warning), `backing.*` (the backing file
opened as those options say: formats.BackingNode, checked here as QEMU's
bdrv_open_backing_file checks them, nested), `data-file.*` (another external data file),
`cache.direct=on` (O_DIRECT host I/O) and `file.locking=off` (read-only: no image lock, as
force-share). Options that only tune QEMU's own machinery (aio, discard passing, overlap
checks, cache cleaning, node names, detect-zeroes, `cache.*`) are checked and have no effect.
Options that would change what is read or written and that qcowdisk does not implement
(encryption, a raw window on a data file, a backing node by name) are refused with
`ImageOptsError`, naming the option.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable

from .. import formats
from ..errors import QcowError
from ..record import FrozenRecord
from . import qemuopts
from .qemuopts import OptionError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# QEMU 7.2's block drivers (qemu-img --help): a name outside this list is "Unknown driver".
QEMU_DRIVERS = frozenset((
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read",
    "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "iser",
    "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc",
    "vvfat"))
FORMATS = ("qcow2", "qcow", "raw")  # what qcowdisk opens
PROTOCOLS = ("file", "host_device")

_BOOL, _STR, _SIZE, _NUM = "bool", "str", "size", "num"
_GENERIC = {"node-name": _STR, "driver": _STR, "read-only": _BOOL, "auto-read-only": _BOOL, "discard": _STR,
            "cache.direct": _BOOL, "cache.no-flush": _BOOL, "detect-zeroes": _STR, "force-share": _BOOL}
_OVERLAP = ("main-header", "active-l1", "active-l2", "refcount-table", "refcount-block", "snapshot-table",
            "inactive-l1", "inactive-l2", "bitmap-directory")
_QCOW2 = {"lazy-refcounts": _BOOL, "pass-discard-request": _BOOL, "pass-discard-snapshot": _BOOL,
          "pass-discard-other": _BOOL, "overlap-check": _STR, "overlap-check.template": _STR,
          **{f"overlap-check.{n}": _BOOL for n in _OVERLAP},
          "cache-size": _SIZE, "l2-cache-size": _SIZE, "l2-cache-entry-size": _SIZE, "refcount-cache-size": _SIZE,
          "cache-clean-interval": _NUM, "encrypt.format": _STR, "encrypt.key-secret": _STR}
_FORMAT_OPTS = {"qcow2": _QCOW2, "raw": {"offset": _SIZE, "size": _SIZE}, "qcow": {"encrypt.key-secret": _STR}}
_FILE = {"filename": _STR, "aio": _STR, "aio-max-batch": _NUM, "locking": _STR, "pr-manager": _STR,
         "drop-cache": _BOOL, "x-check-cache-dropped": _BOOL}
# Known to QEMU, and they change what is read or written: qcowdisk refuses them.
_NOT_HONOURED = ("encrypt.format", "encrypt.key-secret", "file.pr-manager")
_CHILDREN = ("backing", "data-file")  # references to other nodes (and their dotted options)
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class ImageOptsError(ValueError):
    """An option string qemu-img refuses. `str(e)` is QEMU's message; `prefixed` tells whether
    qemu-img reports it after "Could not open 'OPTIONS': " (False: on its own); `hint` is
    QEMU's follow-up text (or "")."""

    def __init__(self, message: str, *, prefixed: bool = True, hint: str = "") -> None:
        super().__init__(message)
        self.prefixed = prefixed
        self.hint = hint


class ImageOpts(FrozenRecord):
    """An image named by `--image-opts`: what qcowdisk opens and how."""

    __slots__ = ("backing_node", "cache_direct", "cache_size", "data_file", "driver", "filename", "force_share",
                 "l2_cache_entry_size", "l2_cache_size", "no_backing", "raw_offset", "raw_size", "read_only",
                 "refcount_cache_size", "shown", "text", "warnings")
    text: str  # the option string as given: qemu-img names the image by it in its messages
    filename: str
    driver: str | None  # None: probe the format
    force_share: bool
    read_only: bool | None  # None: as the command needs
    no_backing: bool  # backing= (empty): the image alone
    l2_cache_size: int | None
    l2_cache_entry_size: int | None
    cache_size: int | None
    refcount_cache_size: int | None
    raw_offset: int  # raw's offset= and size=: the window of the file that is the disk
    raw_size: int | None
    backing_node: formats.BackingNode | None  # backing.*: the backing file opened so
    data_file: str | None  # data-file.*: the external data file in place of the one named
    cache_direct: bool  # cache.direct=on: O_DIRECT (hostio.DirectHostFile)
    warnings: tuple[str, ...]
    shown: str  # the name qemu-img info gives the image (a json: name for a raw window)

    def __init__(self, text: str, filename: str, driver: str | None, force_share: bool = False,
                 read_only: bool | None = None, no_backing: bool = False, l2_cache_size: int | None = None,
                 l2_cache_entry_size: int | None = None, cache_size: int | None = None,
                 refcount_cache_size: int | None = None, raw_offset: int = 0, raw_size: int | None = None,
                 backing_node: formats.BackingNode | None = None, data_file: str | None = None,
                 cache_direct: bool = False, warnings: tuple[str, ...] = (), shown: str = "") -> None:
        setattr_ = object.__setattr__
        setattr_(self, "text", text)
        setattr_(self, "filename", filename)
        setattr_(self, "driver", driver)
        setattr_(self, "force_share", force_share)
        setattr_(self, "read_only", read_only)
        setattr_(self, "no_backing", no_backing)
        setattr_(self, "l2_cache_size", l2_cache_size)
        setattr_(self, "l2_cache_entry_size", l2_cache_entry_size)
        setattr_(self, "cache_size", cache_size)
        setattr_(self, "refcount_cache_size", refcount_cache_size)
        setattr_(self, "raw_offset", raw_offset)
        setattr_(self, "raw_size", raw_size)
        setattr_(self, "backing_node", backing_node)
        setattr_(self, "data_file", data_file)
        setattr_(self, "cache_direct", cache_direct)
        setattr_(self, "warnings", warnings)
        setattr_(self, "shown", shown)


def qdict_order(keys: list[str]) -> list[str]:
    """`keys` (in insertion order) in the order QEMU's QDict iterates them: by bucket of its
    tdb_hash modulo 512, the latest inserted first within a bucket."""
    def bucket(key: str) -> int:
        raw = key.encode()
        value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
        for i, c in enumerate(raw):
            value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
        return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512
    indexed = list(enumerate(keys))
    return [k for _, k in sorted(indexed, key=lambda ik: (bucket(ik[1]), -ik[0]))]


def split(text: str, warnings: list[str]) -> dict[str, str]:
    """QemuOpts' reading of an option string with the implied first name `file` (qemu-img's
    "source" list): {name: last value given}, in first-insertion order."""
    values: dict[str, str] = {}
    first = True
    pos = 0
    while pos < len(text):
        head = re.match(r"[^=,]*", text[pos:])
        assert head is not None
        if text[pos + head.end():pos + head.end() + 1] != "=":
            if first:
                name, (value, pos) = "file", _value(text, pos)
            else:
                name, pos = head.group(0), pos + head.end()
                value = "on"
                if name.startswith("no"):
                    name, value = name[2:], "off"
                if name != "help" and name != "?":
                    shown = ("no" if value == "off" else "") + name
                    warnings.append(f"short-form boolean option '{shown}' deprecated\n"
                                    f"Please use {name}={value} instead")
        else:
            name = head.group(0)
            value, pos = _value(text, pos + head.end() + 1)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        first = False
        if name == "id" and not _ID.match(value):
            raise ImageOptsError("Parameter 'id' expects an identifier", prefixed=False,
                                 hint="Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n")
        values[name] = value
    return values


def _value(text: str, pos: int) -> tuple[str, int]:
    """A value from `pos` up to the next single comma (`,,` is a comma): (value, end)."""
    out: list[str] = []
    while pos < len(text):
        c = text[pos]
        if c == ",":
            if text[pos + 1:pos + 2] != ",":
                break
            pos += 1
        out.append(c)
        pos += 1
    return "".join(out), pos


def _check_value(name: str, shown: str, kind: str, value: str) -> int | bool | str:
    """An option's value parsed as QEMU parses its type (OptionError with QEMU's message)."""
    if kind == _BOOL:
        return qemuopts.parse_bool(shown, value)
    if kind == _SIZE:
        return qemuopts.parse_size(shown, value)
    if kind == _NUM:
        return qemuopts.parse_number(shown, value)
    return value


_ENUMS = {"discard": (("ignore", "off", "unmap", "on"), "Invalid discard option"),
          "detect-zeroes": (("off", "on", "unmap"), None), "locking": (("on", "off", "auto"), None),
          "aio": (("threads", "native", "io_uring"), None)}


def _check_table(values: dict[str, str], table: dict[str, str], prefix: str) -> dict[str, int | bool | str]:
    """Parse every option of `table` given in `values` (keys under `prefix`), in QDict order."""
    parsed: dict[str, int | bool | str] = {}
    for key in qdict_order([k for k in values if k.startswith(prefix) and k[len(prefix):] in table]):
        name = key[len(prefix):]
        value = _check_value(name, name, table[name], values[key])
        if name in _ENUMS and value not in _ENUMS[name][0]:
            raise OptionError(_ENUMS[name][1] or f"invalid parameter value: {value}")
        if name == "node-name" and not _ID.match(str(value)):
            raise OptionError(f"Invalid node-name: '{value}'")
        if name == "overlap-check" and value not in ("none", "constant", "cached", "all"):
            raise OptionError(f"Unsupported value '{value}' for qcow2 option 'overlap-check'. Allowed are any "
                              f"of the following: none, constant, cached, all")
        parsed[name] = value
    return parsed


def _cache_sizes(opts: dict[str, int | bool | str]) -> None:
    """read_cache_sizes' refusals that do not depend on the image."""
    combined, l2, refcount = (opts.get(n) for n in ("cache-size", "l2-cache-size", "refcount-cache-size"))
    if combined is None:
        return
    if l2 is not None and refcount is not None:
        raise OptionError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
    if l2 is not None and int(l2) > int(combined):
        raise OptionError("l2-cache-size may not exceed cache-size")
    if refcount is not None and int(refcount) > int(combined):
        raise OptionError("refcount-cache-size may not exceed cache-size")


def parse_image_opts(text: str, *, force_share: bool = False, writable: bool = False,
                     opens_backing: bool = True, opens_data_file: bool = True,
                     warn: Callable[[str], None] | None = None) -> ImageOpts:
    """Read `text` as qemu-img reads an `--image-opts` image name (ImageOptsError if it refuses).

    `force_share` is `-U` (qemu-img sets force-share=on, refusing a conflicting option),
    `writable` whether the command opens the image read-write, `opens_backing` whether it opens
    the backing chain (qemu-img info, bitmap and rebase -u do not: a `backing` option is then
    left unused), `opens_data_file` whether it opens an external data file (qemu-img info does
    not: `data-file.*` are then ignored, as QEMU ignores them). `warn` receives QEMU's
    deprecation warnings as they arise (also before a refusal).
    """
    warned = _Warnings(warn)
    values = split(text, warned)
    if force_share:
        if values.get("force-share", "on") != "on":
            raise ImageOptsError("--force-share/-U conflicts with image options", prefixed=False)
        values["force-share"] = "on"
    try:
        return _resolve(text, values, warned, writable, opens_backing, opens_data_file)
    except OptionError as e:
        raise ImageOptsError(str(e), hint=e.hint) from None


class _Warnings(list[str]):
    """Warnings kept for ImageOpts.warnings and passed on to a callback as they come."""

    def __init__(self, callback: Callable[[str], None] | None) -> None:
        super().__init__()
        self.callback = callback

    def append(self, line: str) -> None:
        """Keep `line` and pass it on."""
        super().append(line)
        if self.callback is not None:
            self.callback(line)


def _resolve(text: str, values: dict[str, str], warned: list[str], writable: bool,
             opens_backing: bool, opens_data_file: bool) -> ImageOpts:
    driver = values.get("driver")
    if driver is not None and driver not in QEMU_DRIVERS:
        raise OptionError(f"Unknown driver '{driver}'")
    if values.get("backing") == "":
        warned.append('Use of "backing": "" is deprecated; use "backing": null instead')
    if "file" in values:  # a node name: qemu-img has no nodes but the ones it opens
        raise OptionError(f"Cannot find device='{values['file']}' nor node-name='{values['file']}'")
    if driver is None and not any(k.startswith("file.") for k in values):
        raise OptionError("Must specify either driver or file")
    if driver is not None and driver not in FORMATS:
        raise OptionError(f"qcowdisk opens qcow2, qcow and raw images only, not driver '{driver}'")
    filename, file_opts = _protocol(values)
    fmt = driver or _probe(filename)
    # the format
    fmt_table = _FORMAT_OPTS.get(fmt, {})
    top = _check_table(values, {**_GENERIC, **fmt_table}, "")
    direct = bool(file_opts.get("cache.direct", top.get("cache.direct", False)))  # the child inherits it
    if file_opts.get("aio") == "native" and not direct:
        raise OptionError("aio=native was specified, but it requires cache.direct=on, which was not specified.")
    read_only = top.get("read-only")
    force = bool(top.get("force-share", False))
    if force and (read_only is False or (read_only is None and writable)):
        raise OptionError("force-share=on can only be used with read-only images")
    if writable and read_only is True:
        raise OptionError("Block node is read-only")
    _cache_sizes(top)
    no_backing = values.get("backing") == ""
    children = [k for k in values if k.split(".")[0] in _CHILDREN]
    leftover = [k for k in values if not k.startswith("file.") and k not in children
                and k not in _GENERIC and k not in fmt_table]
    backing_keys = [k for k in children if k.startswith("backing.")]
    data_keys = [k for k in children if k.startswith("data-file.")]
    if fmt != "qcow2":
        leftover += data_keys
    data_file = None
    if opens_data_file and fmt == "qcow2":
        if "data-file" in values:
            raise OptionError(f"Cannot find device='{values['data-file']}' nor node-name='{values['data-file']}'")
        if data_keys:
            data_file = _data_file({k[10:]: values[k] for k in data_keys}, filename)
    if not opens_backing or no_backing:
        leftover += backing_keys + (["backing"] if "backing" in values and not no_backing else [])
    elif fmt == "raw" and (backing_keys or "backing" in values):
        raise OptionError("Driver doesn't support backing files")
    node = None
    if opens_backing and not no_backing and backing_keys:
        try:
            node = _backing_node({k[8:]: values[k] for k in backing_keys}, filename, fmt, warned, 1)
        except OptionError as e:
            raise OptionError(f"Could not open backing file: {e}", hint=e.hint) from None
    _refuse_unknown(leftover, {}, f"Block format '{fmt}' does not support the option '{{}}'")
    if opens_backing and values.get("backing", "") != "":
        raise OptionError(f"Could not open backing file: Cannot find device='{values['backing']}' "
                          f"nor node-name='{values['backing']}'")
    for key in _NOT_HONOURED:
        if key in top or (key.startswith("file.") and key[5:] in file_opts):
            raise OptionError(f"qcowdisk does not support the option '{key}'")
    return ImageOpts(text=text, filename=filename, driver=driver,
                     force_share=force or (not writable and file_opts.get("locking") == "off"),
                     read_only=read_only if isinstance(read_only, bool) else None,
                     no_backing=no_backing, **_sizes(top), backing_node=node, data_file=data_file,
                     cache_direct=direct, warnings=tuple(warned), shown=_shown(values, fmt, filename))


def _protocol(values: dict[str, str]) -> tuple[str, dict[str, int | bool | str]]:
    """The protocol child (`file.*`), opened before the format: (file name, its options)."""
    proto = values.get("file.driver", "file")
    if proto not in QEMU_DRIVERS:
        raise OptionError(f"Unknown driver '{proto}'")
    if proto not in PROTOCOLS:
        raise OptionError(f"qcowdisk reads local files only, not protocol '{proto}'")
    if "file.filename" not in values:
        raise OptionError('A block device must be specified for "file"')
    file_opts = _check_table(values, {**_GENERIC, **_FILE}, "file.")
    filename = values["file.filename"]
    try:
        os.close(os.open(filename, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))
    except OSError as e:
        raise OptionError(f"Could not open '{filename}': {e.strerror}") from None
    mode = os.stat(filename).st_mode
    if proto == "host_device" and not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
        raise OptionError(f"'host_device' driver requires '{filename}' to be either a character or block device")
    if proto == "file" and not (stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
        raise OptionError(f"'file' driver requires '{filename}' to be a regular file")
    _refuse_unknown([k[5:] for k in values if k.startswith("file.")], {**_GENERIC, **_FILE},
                    f"Block protocol '{proto}' doesn't support the option '{{}}'")
    return filename, file_opts


def _probe(filename: str) -> str:
    """The format QEMU's probe finds (qcowdisk's formats; the file exists)."""
    try:
        return formats.probe_format(filename)
    except OSError as e:
        raise OptionError(f"Could not open '{filename}': {e.strerror}") from None
    except QcowError as e:  # (a file qcowdisk refuses to open: a character device)
        raise OptionError(str(e)) from None


def _sizes(opts: dict[str, int | bool | str]) -> dict[str, Any]:
    """The size options qcowdisk honours, as ImageOpts / BackingNode keywords."""
    def size(name: str) -> int | None:
        value = opts.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return {"l2_cache_size": size("l2-cache-size"), "l2_cache_entry_size": size("l2-cache-entry-size"),
            "cache_size": size("cache-size"), "refcount_cache_size": size("refcount-cache-size"),
            "raw_offset": size("offset") or 0, "raw_size": size("size")}


def _data_file(values: dict[str, str], image: str) -> str:
    """The external data file `data-file.*` (`values`, without the prefix) names for the qcow2
    image `image`, checked as QEMU opens its data-file child: a protocol node (`filename`,
    `driver` file or host_device) or a raw format node over one (`file.*`)."""
    driver = values.get("driver")
    if driver is not None and driver not in QEMU_DRIVERS:
        raise OptionError(f"Unknown driver '{driver}'")
    has_child = any(k.startswith("file.") for k in values)
    if driver is None and "filename" not in values:
        raise OptionError("Must specify either driver or file")
    if driver is not None and driver not in (*PROTOCOLS, *FORMATS):
        raise OptionError(f"qcowdisk reads an external data file from a local file only, not driver '{driver}'")
    if driver in (None, *PROTOCOLS) and not has_child:  # a protocol node
        proto = driver or "file"
        if "filename" not in values:
            raise OptionError(f"The '{proto}' block driver requires a file name")
        name, _ = _protocol({"file.driver": proto, **{f"file.{k}": v for k, v in values.items() if k != "driver"}})
    else:  # a format node over its file
        if "file" in values:
            raise OptionError(f"Cannot find device='{values['file']}' nor node-name='{values['file']}'")
        name, _ = _protocol(values)
        fmt = driver or _probe(name)
        if fmt != "raw":
            raise OptionError(f"qcowdisk reads an external data file as raw only, not driver '{fmt}'")
        opts = _check_table(values, {**_GENERIC, **_FORMAT_OPTS["raw"]}, "")
        _refuse_unknown([k for k in values if not k.startswith("file.") and k not in _GENERIC
                         and k not in _FORMAT_OPTS["raw"]], {}, "Block format 'raw' does not support the option '{}'")
        for key in ("offset", "size"):
            if key in opts:
                raise OptionError(f"qcowdisk does not support the option 'data-file.{key}'")
    if not _has_data_file(image):
        raise OptionError("'data-file' can only be set for images with an external data file")
    return name


def _has_data_file(path: str) -> bool:
    """Whether the qcow2 image at `path` says it has an external data file."""
    try:
        img = formats.open_image(path, "qcow2", formats.OpenOptions(readonly=True, backing=False, force_share=True))
    except (QcowError, OSError, ValueError):
        return True  # (opening the image itself reports it)
    try:
        header = getattr(img, "header", None)
        return bool(getattr(header, "has_data_file", False))
    finally:
        img.close()


def _recorded_backing(path: str, fmt: str) -> tuple[str | None, str | None]:
    """(backing file name resolved, its format) as the image at `path` records them."""
    try:
        img = formats.open_image(path, fmt, formats.OpenOptions(readonly=True, backing=False, force_share=True))
    except (QcowError, OSError, ValueError):
        return None, None  # (opening the image itself reports it)
    try:
        name = img.backing_file
        header = getattr(img, "header", None)
        recorded = getattr(header, "backing_format", None) if header is not None else None
        return (formats.resolve_backing_path(path, name) if name else None), recorded
    except QcowError:
        return None, None
    finally:
        img.close()


def _backing_node(values: dict[str, str], parent: str, parent_fmt: str, warned: list[str],
                  depth: int) -> formats.BackingNode:
    """The backing file of the image `parent` as its `backing.*` options (`values`, without
    the prefix) open it, checked as QEMU's bdrv_open_backing_file checks them."""
    if depth > formats.DEFAULT_MAX_NESTING_DEPTH:
        raise OptionError("backing.* options nested too deep")
    if values.get("backing") == "":
        warned.append('Use of "backing": "" is deprecated; use "backing": null instead')
    if "file" in values:
        raise OptionError("Cannot reference an existing block device with additional options or a new filename")
    driver = values.get("driver")
    if driver is not None and driver not in QEMU_DRIVERS:
        raise OptionError(f"Unknown driver '{driver}'")
    recorded, recorded_fmt = _recorded_backing(parent, parent_fmt)
    given = "file.filename" in values
    if not given:
        if recorded is None:
            raise OptionError('A block device must be specified for "file"')
        values = {**values, "file.filename": recorded}
    if driver is not None and driver not in FORMATS:
        raise OptionError(f"qcowdisk opens qcow2, qcow and raw images only, not driver '{driver}'")
    filename, _ = _protocol(values)
    fmt = driver or recorded_fmt or _probe(filename)
    if fmt not in FORMATS:
        raise OptionError(f"qcowdisk opens qcow2, qcow and raw images only, not driver '{fmt}'")
    fmt_table = _FORMAT_OPTS.get(fmt, {})
    opts = _check_table(values, {**_GENERIC, **fmt_table}, "")
    _cache_sizes(opts)
    no_backing = values.get("backing") == ""
    children = [k for k in values if k.split(".")[0] in _CHILDREN]
    backing_keys = [k for k in children if k.startswith("backing.")]
    leftover = [k for k in values if not k.startswith("file.") and k not in children
                and k not in _GENERIC and k not in fmt_table]
    if no_backing:
        leftover += backing_keys
    elif fmt == "raw" and (backing_keys or "backing" in values):
        raise OptionError("Driver doesn't support backing files")
    node = None
    if backing_keys and not no_backing:
        try:
            node = _backing_node({k[8:]: values[k] for k in backing_keys}, filename, fmt, warned, depth + 1)
        except OptionError as e:
            raise OptionError(f"Could not open backing file: {e}", hint=e.hint) from None
    _refuse_unknown(leftover, {}, f"Block format '{fmt}' does not support the option '{{}}'")
    for key in children:
        if key == "backing" and values[key] != "":
            raise OptionError(f"Could not open backing file: Cannot find device='{values[key]}' "
                              f"nor node-name='{values[key]}'")
        if key.split(".")[0] == "data-file":
            raise OptionError(f"qcowdisk does not support the option '{key}'")
    for key in _NOT_HONOURED:
        if key in opts:
            raise OptionError(f"qcowdisk does not support the option '{key}'")
    return formats.BackingNode(filename=filename if given else None, fmt=driver, backing=not no_backing,
                               backing_node=node, **_sizes(opts))


def _shown(values: dict[str, str], fmt: str, filename: str) -> str:
    """The name QEMU gives the image (bdrv_refresh_filename): its file's, unless options that
    change what it reads are set (raw's offset and size), when a json: name holds those, the
    driver and the file's driver and name, in QDict order."""
    strong = [k for k in ("offset", "size") if fmt == "raw" and k in values]
    if not strong:
        return filename
    import json  # (only here: a plain image name needs no json, and every command parses options)
    fields: dict[str, str] = {"driver": json.dumps(fmt), **{k: json.dumps(values[k]) for k in strong}}
    child = {"driver": json.dumps(values.get("file.driver", "file")), "filename": json.dumps(filename)}
    fields["file"] = "{" + ", ".join(f'"{k}": {child[k]}' for k in qdict_order(list(child))) + "}"
    return "json:{" + ", ".join(f'"{k}": {fields[k]}' for k in qdict_order(list(fields))) + "}"


def json_name(tree: dict[str, object]) -> str:
    """QEMU's json: name for a tree of options (None is null), keys in QDict order."""
    import json

    def dump(value: object) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)}: {dump(value[k])}" for k in qdict_order(list(value))) + "}"
        return json.dumps(value)
    return "json:" + dump(tree)


def overridden_name(spec: ImageOpts) -> str | None:
    """The json: name QEMU gives a qcow2 image whose backing file its options replace (`backing=`,
    or `backing.file.filename`), else None (its own file name)."""
    node = spec.backing_node
    if not spec.no_backing and (node is None or node.filename is None):
        return None
    backing: object = None
    if node is not None and node.filename is not None:
        fmt = node.fmt or _probe(node.filename)
        backing = {"driver": fmt, "file": {"driver": "file", "filename": node.filename}}
    return json_name({"backing": backing, "driver": spec.driver or "qcow2",
                      "file": {"driver": "file", "filename": spec.filename}})


def _refuse_unknown(names: list[str], table: dict[str, str], message: str) -> None:
    """QEMU's refusal of options left over after opening: the first in QDict order."""
    left = [n for n in names if n not in table]
    if left:
        raise OptionError(message.format(qdict_order(left)[0]))


__all__ = ["ImageOpts", "ImageOptsError", "parse_image_opts", "qdict_order", "split", "QEMU_DRIVERS", "json_name",
           "overridden_name"]
