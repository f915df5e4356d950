"""How large a new image file must be, as `qemu-img measure` (QEMU 7.2) computes it.

For a qcow2 target (block/qcow2.c, `qcow2_measure`): the fully allocated size is
`qcow2_calc_prealloc_size` (header, L2 and L1 tables, refcount metadata to its fixed point, every
data cluster); the required size is that minus the data clusters the new image would not
need: with a source image, only the target clusters holding data in the source's block status
(zeros and unallocated ranges skipped) are needed; with `backing_file`, or preallocation
`falloc`/`full`, all of them. A qcow2 v3 source (and a v3 target) adds the room its persistent
bitmaps would take. For a raw target (block/raw-format.c, `raw_measure`) both sizes are the
source's size, or the size rounded up to 512 bytes.

Options are parsed as qemu-img parses `-o` for the target format (its creation options and
the file protocol's), with QEMU's refusals in QEMU's words: see `qemuopts`.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Mapping

from .. import formats
from ..blockstatus import qemu_length
from ..qcow2.file import QcowFile
from ..qcow2.format import EXT_BITMAPS
from ..record import FrozenRecord
from .qemuopts import INT64_MAX, OptionError, OptType, OptValue, QemuOpts, split_option_list

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image

S, B, N, Z = OptType.STRING, OptType.BOOL, OptType.NUMBER, OptType.SIZE

# The file protocol's creation options (file-posix), which qemu-img measure accepts for any target.
FILE_OPTIONS: dict[str, OptType] = {"size": Z, "preallocation": S, "nocow": B, "extent_size_hint": Z}
# qcow2's creation options (QEMU 7.2, qcow2_create_opts).
QCOW2_OPTIONS: dict[str, OptType] = {
    "size": Z, "compat": S, "backing_file": S, "backing_fmt": S, "data_file": S, "data_file_raw": B,
    "encryption": B, "encrypt.format": S, "encrypt.key-secret": S, "encrypt.cipher-alg": S,
    "encrypt.cipher-mode": S, "encrypt.ivgen-alg": S, "encrypt.ivgen-hash-alg": S, "encrypt.hash-alg": S,
    "encrypt.iter-time": N, "cluster_size": Z, "extended_l2": B, "preallocation": S, "lazy_refcounts": B,
    "refcount_bits": N, "compression_type": S, **{k: v for k, v in FILE_OPTIONS.items() if k != "size"}}
RAW_OPTIONS: dict[str, OptType] = dict(FILE_OPTIONS)

# QEMU 7.2's other drivers (Debian's build): those that cannot create images, and those that can
# but cannot measure.
NO_CREATE = frozenset({
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read",
    "dmg", "ftp", "ftps", "http", "https", "null-aio", "null-co", "preallocate", "quorum", "replication",
    "snapshot-access", "throttle", "vvfat"})
NO_MEASURE = frozenset({
    "file", "gluster", "host_cdrom", "host_device", "iscsi", "iser", "nbd", "nfs", "nvme", "parallels", "qcow",
    "qed", "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc"})

DEFAULT_CLUSTER_SIZE = 65536
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
QCOW_MAX_L1_SIZE = 32 << 20
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
AUTOCLEAR_BITMAPS = 1  # the bitmaps extension is valid only while this autoclear bit is set

Options = str | Mapping[str, OptValue] | None


class MeasureResult(FrozenRecord):
    """What `qemu-img measure` reports: `required` bytes for the new image file as the source
    (or an empty disk) would fill it, `fully_allocated` bytes with every cluster allocated, and
    `bitmaps` bytes for the source's persistent bitmaps (None where qemu-img shows no bitmaps
    line: no qcow2 v3 source, or a target that cannot hold them)."""

    __slots__ = ("bitmaps", "fully_allocated", "required")
    required: int
    """Bytes the new image file needs as the source (or an empty disk) would fill it."""
    fully_allocated: int
    """Bytes the new image file needs with every cluster allocated."""
    bitmaps: int | None
    """Bytes for the source's persistent bitmaps, None where qemu-img prints no bitmaps line."""

    def __init__(self, required: int, fully_allocated: int, bitmaps: int | None = None) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "required", required)
        setattr_(self, "fully_allocated", fully_allocated)
        setattr_(self, "bitmaps", bitmaps)


def measure(*, size: int | None = None, src: str | os.PathLike[str] | Image | None = None,
            src_format: str | None = None, options: Options = None, out_format: str = "qcow2",
            force_share: bool = False) -> MeasureResult:
    """Measure a new `out_format` image of `size` bytes, or one converted from the image `src`,
    as `qemu-img measure -O OUT_FORMAT -o OPTIONS (--size SIZE | [-f SRC_FORMAT] SRC)` does.

    Exactly one of `size` and `src` is given. `src` is a path (opened read-only with its
    backing chain, the format probed unless `src_format` names it; `force_share` as
    `qemu-img -U`) or an opened `Image` (left open). `options` are the target's creation
    options: qemu-img's `-o` text ("cluster_size=2M,compat=0.10") or a mapping of names to
    values (text as after `=`, or bools and ints). Raises ValueError with qemu-img's message for
    what qemu-img refuses (`qemuopts.OptionError`, with its hint, for an option it cannot parse).
    """
    if (size is None) == (src is None):
        raise ValueError("either size or src must be given, and not both")
    if size is not None and not 0 <= size <= INT64_MAX:
        raise ValueError(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
    with contextlib.ExitStack() as stack:
        source: Image | None = None
        if src is not None and not isinstance(src, (str, bytes, os.PathLike)):  # an opened image
            source = src
        elif src is not None:
            source = formats.open_image(os.fspath(src), src_format, formats.OpenOptions(
                readonly=True, force_share=force_share))
            stack.callback(source.close)
        opts = target_options(out_format, options)
        if size is not None:
            opts.set("size", size)
        if out_format == "raw":
            return _measure_raw(opts, source)
        return _measure_qcow2(opts, source)


def target_options(out_format: str, options: Options) -> QemuOpts:
    """The target's creation options parsed as qemu-img measure parses them (ValueError if refused)."""
    if out_format in NO_CREATE:
        raise ValueError(f"Format driver '{out_format}' does not support image creation")
    if out_format == "qcow2":
        table = QCOW2_OPTIONS
    elif out_format == "raw":
        table = RAW_OPTIONS
    elif out_format in NO_MEASURE:
        table = {}  # (QEMU checks the options against that driver's own list first)
    else:
        raise ValueError(f"Unknown file format '{out_format}'")
    if isinstance(options, str):
        pairs = split_option_list(options)
    elif options is None:
        pairs = []
    else:
        pairs = [(k, ("on" if v else "off") if isinstance(v, bool) else str(v)) for k, v in options.items()]
    opts = QemuOpts(table)
    if out_format in NO_MEASURE:
        raise ValueError(f"Block driver '{out_format}' does not support size measurement")
    opts.parse(pairs)
    return opts


def _measure_raw(opts: QemuOpts, source: Image | None) -> MeasureResult:
    required = qemu_length(source) if source is not None else _round_up(opts.number("size", 0), 512)
    return MeasureResult(required, required)


def _ctz32(value: int) -> int:
    value &= 0xFFFFFFFF
    return (value & -value).bit_length() - 1 if value else 32


def _measure_qcow2(opts: QemuOpts, source: Image | None) -> MeasureResult:
    extended_l2 = opts.boolean("extended_l2", False)
    cluster_size = opts.number("cluster_size", DEFAULT_CLUSTER_SIZE)
    bits = _ctz32(cluster_size)
    if bits < MIN_CLUSTER_BITS or bits > MAX_CLUSTER_BITS or 1 << bits != cluster_size:
        raise ValueError(f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} and "
                         f"{1 << (MAX_CLUSTER_BITS - 10)}k")
    if extended_l2 and cluster_size < (1 << MIN_CLUSTER_BITS) * 32:
        raise ValueError(f"Extended L2 entries are only supported with cluster sizes of at least "
                         f"{(1 << MIN_CLUSTER_BITS) * 32} bytes")
    compat = opts.string("compat")
    if compat is None or compat == "1.1":
        version = 3
    elif compat == "0.10":
        version = 2
    else:
        raise ValueError(f"Invalid compatibility level: '{compat}'")
    refcount_bits = opts.number("refcount_bits", 16)
    if refcount_bits > 64 or refcount_bits == 0 or refcount_bits & (refcount_bits - 1):
        raise ValueError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise ValueError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                         "(use compat=1.1 or greater)")
    prealloc = opts.string("preallocation")
    if prealloc is not None and prealloc not in PREALLOC_MODES:
        raise ValueError(f"invalid parameter value: {prealloc}")
    has_backing_file = opts.string("backing_file") is not None
    if opts.string("encrypt.format") == "luks":
        secret = opts.string("encrypt.key-secret")
        if secret is None:
            raise ValueError("Parameter 'encrypt.key-secret' is required for cipher")
        raise ValueError(f"No secret with id '{secret}'")  # qemu-img measure takes no --object here

    virtual_size = _round_up(opts.number("size", 0), cluster_size)
    l2e_size = 16 if extended_l2 else 8
    l2_tables = _div_round_up(virtual_size // cluster_size, cluster_size // l2e_size)
    if l2_tables * 8 > QCOW_MAX_L1_SIZE:
        raise ValueError("The image size is too large (try using a larger cluster size)")

    required = 0
    if source is not None:
        virtual_size = _round_up(qemu_length(source), cluster_size)
        required = virtual_size if has_backing_file else _data_clusters(source, cluster_size) * cluster_size
    if prealloc in ("full", "falloc"):
        required = virtual_size
    fully = calc_prealloc_size(virtual_size, cluster_size, refcount_bits.bit_length() - 1, extended_l2)
    bitmaps = None
    if version >= 3 and isinstance(source, QcowFile) and source.header.version >= 3:
        bitmaps = persistent_bitmaps_size(source, cluster_size)
    return MeasureResult(fully - virtual_size + required, fully, bitmaps)


def _div_round_up(value: int, divisor: int) -> int:
    return -(-value // divisor)


def _round_up(value: int, align: int) -> int:
    return _div_round_up(value, align) * align


def _data_clusters(source: Image, cluster_size: int) -> int:
    """How many target clusters hold bytes the source's block status calls data (not zero)."""
    count = 0
    last = -1  # the last cluster counted
    for e in source.block_status():
        if e.zero or not (e.data and e.present):
            continue
        first, end = max(e.start // cluster_size, last + 1), (e.start + e.length - 1) // cluster_size
        if end >= first:
            count += end - first + 1
            last = end
    return count


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """qcow2_refcount_metadata_size (not generous): refcount table and blocks for `clusters`
    clusters and themselves, at their fixed point."""
    blocks_per_table_cluster = cluster_size // 8
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = _div_round_up(clusters + table + blocks, refcounts_per_block)
        table = _div_round_up(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def calc_prealloc_size(total_size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size: the file size of a fully preallocated image of `total_size` bytes."""
    aligned = _round_up(total_size, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    meta = cluster_size  # the header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = _round_up(nl2e * l2e_size // cluster_size, cluster_size // 8)
    meta += nl1e * 8
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


_BITMAPS_EXT = struct.Struct(">IIQQ")  # nb_bitmaps, reserved, directory size, directory offset
_DIR_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, granularity bits, name size, extra


def persistent_bitmaps_size(source: QcowFile, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size: room for the source's persistent bitmaps in a new
    image of `cluster_size` clusters (each whole bitmap, its table, the directory)."""
    header = source.header
    ext = next((e for e in header.extensions if e.ext_type == EXT_BITMAPS), None)
    if ext is None or not header.autoclear_features & AUTOCLEAR_BITMAPS or len(ext.data) < _BITMAPS_EXT.size:
        return 0
    nb_bitmaps, _, dir_size, dir_offset = _BITMAPS_EXT.unpack_from(ext.data)
    with open(source.filename, "rb") as f:
        f.seek(dir_offset)
        directory = f.read(dir_size)
    length = qemu_length(source)
    total = dir_bytes = 0
    pos = 0
    for _ in range(nb_bitmaps):
        if pos + _DIR_ENTRY.size > len(directory):
            break
        _, _, _, _, granularity_bits, name_size, extra = _DIR_ENTRY.unpack_from(directory, pos)
        granularity = 1 << granularity_bits
        bitmap_bytes = _div_round_up(_div_round_up(length, granularity), 8)
        clusters = _div_round_up(bitmap_bytes, cluster_size)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        dir_bytes += _round_up(_DIR_ENTRY.size + name_size, 8)
        pos += _round_up(_DIR_ENTRY.size + extra + name_size, 8)
    return total + _round_up(dir_bytes, cluster_size)


__all__ = ["measure", "MeasureResult", "target_options", "calc_prealloc_size", "refcount_metadata_size",
           "persistent_bitmaps_size", "QCOW2_OPTIONS", "RAW_OPTIONS", "FILE_OPTIONS", "OptionError"]
