"""qemu-img info's content: the JSON objects (QEMU's keys and order) and the human text made from them."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from ..qcow1 import Qcow1File
from ..qcow2.file import QcowFile
from ..qcow2.format import (
    BME_FLAG_AUTO,
    BME_FLAG_IN_USE,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    Bitmap,
    Header,
    Snapshot,
)
from .common import combine_path, image_format, size_to_str

# qemu-img info --output=json, as QEMU's QAPI types (SnapshotInfo, ImageInfoSpecificQCow2, ImageInfo)
# spell their keys; a key is absent where QEMU leaves it out, and insertion order is QEMU's.
TYPE_CHECKING = False
if TYPE_CHECKING:  # (TypedDicts need typing at run time)
    from typing import TypedDict

    from .common import AnyImage

    SnapshotInfo = TypedDict("SnapshotInfo", {
        "icount": int, "vm-clock-nsec": int, "name": str, "date-sec": int, "date-nsec": int,
        "vm-clock-sec": int, "id": str, "vm-state-size": int}, total=False)
    class BitmapInfo(TypedDict):
        flags: list[str]
        name: str
        granularity: int
    Qcow2SpecificInfo = TypedDict("Qcow2SpecificInfo", {
        "compat": str, "compression-type": str, "lazy-refcounts": bool, "bitmaps": list[BitmapInfo], "refcount-bits": int,
        "data-file": str, "data-file-raw": bool, "corrupt": bool, "extended-l2": bool}, total=False)


    class FormatSpecificInfo(TypedDict):
        """ImageInfoSpecific: the format's name and its data (qcow2 is the only one shown)."""

        type: str
        data: Qcow2SpecificInfo


    ImageInfo = TypedDict("ImageInfo", {
        "backing-filename-format": str, "snapshots": list[SnapshotInfo], "virtual-size": int, "filename": str,
        "cluster-size": int, "format": str, "actual-size": int, "format-specific": FormatSpecificInfo,
        "full-backing-filename": str, "backing-filename": str, "dirty-flag": bool}, total=False)


def _actual_size(path: str) -> int | None:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def _snapshot_info(s: Snapshot) -> SnapshotInfo:
    """One snapshot as qemu-img's JSON has it (QEMU's key order)."""
    d: SnapshotInfo = {}
    icount = s.icount
    if icount is not None and icount != 0xFFFFFFFFFFFFFFFF:  # QEMU: absent when unknown (-1)
        d["icount"] = icount
    date_sec = int(s.date.timestamp())
    d["vm-clock-nsec"] = s.vm_clock_ns % 1_000_000_000
    d["name"] = s.name
    d["date-sec"] = date_sec
    d["date-nsec"] = s.date.microsecond * 1000
    d["vm-clock-sec"] = s.vm_clock_ns // 1_000_000_000
    d["id"] = s.id
    d["vm-state-size"] = s.vm_state_size
    return d


def _bitmap_info(b: Bitmap) -> BitmapInfo:
    """One bitmap as qemu-img's JSON has it (QEMU's key order; flags in-use, auto)."""
    flags = [name for bit, name in ((BME_FLAG_IN_USE, "in-use"), (BME_FLAG_AUTO, "auto")) if b.flags & bit]
    return {"flags": flags, "name": b.name, "granularity": b.granularity}


def _qcow2_specific(header: Header, bitmaps: Sequence[Bitmap] = ()) -> Qcow2SpecificInfo:
    """format-specific.data for a qcow2 image, with QEMU 7.2's presence rules and key order."""
    data: Qcow2SpecificInfo = {}
    if header.version == 2:
        data["compat"] = "0.10"
        data["compression-type"] = COMPRESSION_NAMES.get(header.compression_type, "zlib")
        data["refcount-bits"] = header.refcount_bits
        return data
    data["compat"] = "1.1"
    data["compression-type"] = COMPRESSION_NAMES.get(header.compression_type, "zlib")
    data["lazy-refcounts"] = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
    if bitmaps:
        data["bitmaps"] = [_bitmap_info(b) for b in bitmaps]
    data["refcount-bits"] = header.refcount_bits
    if header.data_file is not None:
        data["data-file"] = header.data_file
    if header.has_data_file:  # QEMU: present whenever an external data file is in use
        data["data-file-raw"] = header.data_file_raw
    data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
    data["extended-l2"] = header.extended_l2
    return data


def image_info(img: AnyImage, filename: str, shown: str | None = None) -> ImageInfo:
    """qemu-img info's JSON object for one opened image, the file `filename`, named `shown`
    (default: `filename`) as QEMU names it."""
    fmt = image_format(img)
    header = img.header if isinstance(img, QcowFile) else None  # the qcow2 header; None otherwise
    # qcow2 keeps the names in its header; Qcow1File exposes them on the image itself.
    backing_name: str | None = None
    backing_fmt: str | None = None
    if header is not None:
        backing_name, backing_fmt = header.backing_file, header.backing_format
    elif isinstance(img, Qcow1File):
        backing_name = img.backing_file  # qcow v1 cannot record a format; QEMU never shows one
    snapshots = list(img.snapshots) if isinstance(img, QcowFile) else []

    info: ImageInfo = {}
    if backing_name and backing_fmt:
        info["backing-filename-format"] = backing_fmt
    if snapshots:
        info["snapshots"] = [_snapshot_info(s) for s in snapshots]
    # (QEMU counts a raw file in whole sectors)
    info["virtual-size"] = -(-img.virtual_size // 512) * 512 if fmt == "raw" else img.virtual_size
    info["filename"] = filename if shown is None else shown
    if isinstance(img, (QcowFile, Qcow1File)):
        info["cluster-size"] = img.cluster_size
    info["format"] = fmt
    actual = _actual_size(filename)
    if actual is not None:
        info["actual-size"] = actual
    if header is not None:
        assert isinstance(img, QcowFile)
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(header, img.bitmaps)}
    if backing_name:
        info["full-backing-filename"] = combine_path(filename, backing_name)
        info["backing-filename"] = backing_name
    dirty = False
    if header is not None and header.version >= 3:
        dirty = bool(header.incompatible_features & INCOMPAT_DIRTY)
    info["dirty-flag"] = dirty
    return info


def chain_info(img: AnyImage, filename: str, shown: str | None = None) -> list[ImageInfo]:
    """Info for the image and every image below it, top first (qemu-img info --backing-chain);
    `shown` names the top one as in `image_info`."""
    out: list[ImageInfo] = []
    while img is not None:
        entry = image_info(img, filename, shown if not out else None)
        out.append(entry)
        nxt = img.backing if isinstance(img, (QcowFile, Qcow1File)) else None  # a raw image has none
        if nxt is None or "full-backing-filename" not in entry:
            break
        img, filename = nxt, entry["full-backing-filename"]
    return out


def format_human(info: ImageInfo) -> str:
    """qemu-img info's human-readable text for one image (bdrv_image_info_dump, QEMU 7.2)."""
    lines = [f"image: {info['filename']}",
             f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)"]
    if "actual-size" in info:
        lines.append(f"disk size: {size_to_str(info['actual-size'])}")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append("%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"))
        for s in info["snapshots"]:
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
            secs = s["vm-clock-sec"]
            clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                            s["vm-clock-nsec"] // 1_000_000 % 1000)
            icount = str(s["icount"]) if "icount" in s else ""
            lines.append("%-9s %-16s %8s%20s%13s%11s" % (s["id"], s["name"], size_to_str(s["vm-state-size"]),
                                                         date, clock, icount))
    if "format-specific" in info:
        lines.append("Format specific information:")
        for key, value in info["format-specific"]["data"].items():
            _dump_value(lines, 1, key.replace("-", " "), value)
    return "\n".join(lines) + "\n"


def _dump_value(lines: list[str], level: int, label: str, value: object) -> None:
    """QEMU's dump_qobject: scalars on the label's line, lists as [i] and dicts as keys below it."""
    pad = "    " * level
    if isinstance(value, list):
        lines.append(f"{pad}{label}:")
        for i, item in enumerate(value):
            _dump_value(lines, level + 1, f"[{i}]", item)
    elif isinstance(value, dict):
        lines.append(f"{pad}{label}:")
        for key, item in value.items():
            _dump_value(lines, level + 1, str(key).replace("-", " "), item)
    else:
        shown = ("true" if value else "false") if isinstance(value, bool) else value
        lines.append(f"{pad}{label}: {shown}")

