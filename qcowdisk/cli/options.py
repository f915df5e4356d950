"""`create`'s `-o` options: QEMU's name=value lists mapped onto `QcowFile.create` keywords."""

from __future__ import annotations

from collections.abc import Sequence

from ..qcow2.format import (
    COMPRESSION_NAMES,
)
from .common import parse_size

TYPE_CHECKING = False
if TYPE_CHECKING:  # (TypedDicts need typing at run time)
    from typing import TypedDict

    class CreateKeywords(TypedDict, total=False):
        """The `QcowFile.create` keywords that `-o` options set."""

        cluster_size: int
        refcount_bits: int
        compat: str
        lazy_refcounts: bool
        extended_l2: bool
        compression_type: str
        preallocation: str
        data_file: str
        data_file_raw: bool


    class CreateOptions(CreateKeywords, total=False):
        """Everything `-o` can set: the `QcowFile.create` keywords, the size and the backing file."""

        size: int
        backing_file: str
        backing_format: str


def parse_bool(name: str, text: str) -> bool:
    """Parse an on/off option value the way QEMU does (on/off, yes/no, true/false)."""
    low = text.lower()
    if low in ("on", "yes", "true", "y"):
        return True
    if low in ("off", "no", "false", "n"):
        return False
    raise ValueError(f"Parameter '{name}' expects 'on' or 'off', got {text!r}")


def split_options(specs: Sequence[str]) -> list[tuple[str, str]]:
    """Split `-o a=1,b=2` strings into (name, value) pairs; ',,' is a literal comma (QEMU's rule)."""
    pairs: list[tuple[str, str]] = []
    for spec in specs:
        items: list[str] = []
        cur = ""
        i = 0
        while i < len(spec):
            if spec[i] == ",":
                if spec[i + 1:i + 2] == ",":
                    cur += ","
                    i += 2
                    continue
                items.append(cur)
                cur = ""
            else:
                cur += spec[i]
            i += 1
        items.append(cur)
        for item in items:
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Invalid option {item!r}: expected name=value")
            pairs.append((name.strip(), value))
    return pairs


_COMPAT_ALIASES = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}


def create_options(pairs: Sequence[tuple[str, str]]) -> tuple[CreateOptions, list[tuple[str, str]]]:
    """Map `-o` pairs onto `QcowFile.create` keyword arguments.

    Returns the keywords and the (name, value-as-typed) pairs that were given, for the
    `Formatting ...` line. `size`, `backing_file` and `backing_fmt` come back under those keys.
    """
    kw: CreateOptions = {}
    given: list[tuple[str, str]] = []
    for name, value in pairs:
        given.append((name, value))
        if name == "size":
            kw["size"] = parse_size(value)
        elif name == "cluster_size":
            kw["cluster_size"] = parse_size(value)
        elif name == "refcount_bits":
            if not value.isdigit():
                raise ValueError(f"Invalid refcount_bits {value!r}: expected a power of two 1..64")
            kw["refcount_bits"] = int(value)
        elif name == "compat":
            if value not in _COMPAT_ALIASES:
                raise ValueError(f"Invalid compatibility level: '{value}' (use 0.10, 1.1, v2 or v3)")
            kw["compat"] = _COMPAT_ALIASES[value]
        elif name == "lazy_refcounts":
            kw["lazy_refcounts"] = parse_bool(name, value)
        elif name == "extended_l2":
            kw["extended_l2"] = parse_bool(name, value)
        elif name == "data_file_raw":
            kw["data_file_raw"] = parse_bool(name, value)
        elif name == "compression_type":
            if value not in COMPRESSION_NAMES.values():
                raise ValueError(f"Invalid compression_type {value!r} (use zlib or zstd)")
            kw["compression_type"] = value
        elif name == "preallocation":
            if value not in ("off", "metadata", "falloc", "full"):
                raise ValueError(f"Invalid preallocation mode: '{value}' (use off, metadata, falloc or full)")
            kw["preallocation"] = value
        elif name == "data_file":
            kw["data_file"] = value
        elif name == "backing_file":
            kw["backing_file"] = value
        elif name == "backing_fmt":
            kw["backing_format"] = value
        else:
            raise ValueError(f"Invalid parameter '{name}'")
    return kw, given

