"""Builders and byte-level inspectors for test images, independent of qcowdisk.

Everything here drives the real QEMU tools or edits bytes by hand from the qcow2 spec, so
tests can build the images qcowdisk is judged on without trusting qcowdisk to build them.
Reusable by any test module: `from imagefactory import ...`.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from qemutools import create, pattern, qemu_img, qemu_io, run

KiB = 1024
MiB = 1024 * KiB

#: Every cluster size qcow2 allows, 512 B .. 2 MiB.
CLUSTER_SIZES = [1 << bits for bits in range(9, 22)]
#: Every refcount width qcow2 allows.
REFCOUNT_BITS = [1, 2, 4, 8, 16, 32, 64]

# Header extension types (docs/interop/qcow2.txt).
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_EXT = struct.Struct(">II")
_FEATURE_ENTRY = struct.Struct(">BB46s")
_L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_OFLAG_COMPRESSED = 1 << 62
_OFLAG_ZERO = 1


def pad8(n: int) -> int:
    """Round up to a multiple of 8 (header extension padding)."""
    return (n + 7) & ~7


# --------------------------------------------------------------------------- building


def make_image(path: str, size: int | str, options: str | None = None, *, commands: Iterable[str] = (),
               backing: str | None = None, backing_fmt: str | None = None, fmt: str = "qcow2") -> str:
    """`qemu-img create` then run each qemu-io command on it (one qemu-io process); returns path."""
    create(path, size, fmt, options, backing, backing_fmt)
    cmds = list(commands)
    if cmds:
        qemu_io(path, *cmds, fmt=fmt)
    return path


def sparse_file(path: str | os.PathLike[str], size: int, pieces: Iterable[tuple[int, bytes]]) -> str:
    """A plain file of `size` bytes, holes everywhere but at `pieces` (offset, bytes); returns path."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    return str(path)


def raw_qcow2_qcow2_chain(d: str | os.PathLike[str], top_commands: Iterable[str] = ()) -> str:
    """In directory `d`: base.raw (sparse, 200000 bytes) <- mid.qcow2 (1 MiB: data, zeros and
    data past the end of its backing file) <- top.qcow2 (3 MiB, longer than mid: data, zeros,
    then `top_commands`), with backing names relative to `d`. Returns top.qcow2's path."""
    def at(name: str) -> str:
        return os.path.join(d, name)
    sparse_file(at("base.raw"), 200000, [(0, b"a" * 70000), (150000, b"b" * 10)])
    create(at("mid.qcow2"), "1M", backing="base.raw", backing_fmt="raw")
    qemu_io(at("mid.qcow2"), "write -P 2 64k 64k", "write -z 192k 64k", "write -P 6 896k 128k")
    create(at("top.qcow2"), "3M", backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io(at("top.qcow2"), "write -P 3 1536k 64k", "write -z 128k 4k", "write -P 7 2M 64k", *top_commands)
    return at("top.qcow2")


def write_pattern_file(path: str, length: int, seed: int = 0) -> str:
    """A file of deterministic random bytes, the source for qemu-io `write -s`; returns path."""
    with open(path, "wb") as f:
        f.write(pattern(length, seed))
    return path


def text_like(length: int, seed: int = 0) -> bytes:
    """Compressible, non-repeating data: random words from a small vocabulary."""
    rng = random.Random(seed)
    words = [b"cluster", b"refcount", b"table", b"guest", b"host", b"offset", b"qcow2", b"backing",
             b"snapshot", b"zero", b"data", b"the", b"of", b"and", b"\n", b"0x1f00", b"L2"]
    out = bytearray()
    while len(out) < length:
        out += rng.choice(words) + b" "
    return bytes(out[:length])


def mixed_raw(length: int, chunk: int, seed: int = 0) -> bytes:
    """Chunks cycling text-like / random / zero / constant: compress well, not at all, skip, tiny."""
    rng = random.Random(seed)
    out = bytearray()
    i = 0
    while len(out) < length:
        kind = i % 4
        if kind == 0:
            out += text_like(chunk, rng.randrange(1 << 30))
        elif kind == 1:
            out += rng.randbytes(chunk)
        elif kind == 2:
            out += bytes(chunk)
        else:
            out += bytes([rng.randrange(1, 256)]) * chunk
        i += 1
    return bytes(out[:length])


def kill_writer(path: str, *commands: str, fmt: str = "qcow2") -> None:
    """Run qemu-io COMMANDS then SIGKILL it (`sigraise 9`), leaving whatever it had not cleaned up."""
    args = ["qemu-io", "-f", fmt]
    for c in (*commands, "sigraise 9"):
        args += ["-c", c]
    p = run(*args, path, check=False)
    assert p.returncode in (-9, 137), f"qemu-io was expected to die by SIGKILL: rc {p.returncode}\n{p.stdout}{p.stderr}"


def extents_as_qemu_json(extents: Iterable[Any]) -> list[dict[str, Any]]:
    """Block-status extents (start, length, depth, present, zero, data, offset) in the shape of
    `qemu-img map --output=json` entries, to compare with qemu_map."""
    out = []
    for e in extents:
        d: dict[str, Any] = {"start": e.start, "length": e.length, "depth": e.depth, "present": e.present,
                             "zero": e.zero, "data": e.data}
        if e.offset is not None:
            d["offset"] = e.offset
        out.append(d)
    return out


def qemu_map(path: str, *extra: str) -> list[dict]:
    """`qemu-img map --output=json`, parsed."""
    return json.loads(qemu_img("map", "--output=json", *extra, path).stdout)


def map_at(entries: list[dict], guest_offset: int) -> dict:
    """The map entry covering guest_offset."""
    for e in entries:
        if e["start"] <= guest_offset < e["start"] + e["length"]:
            return e
    raise AssertionError(f"no map entry covers {guest_offset}: {entries}")


# --------------------------------------------------------------------------- header bytes


def patch_be(path: str, offset: int, fmt: str, value: int) -> None:
    """Overwrite one big-endian field of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">" + fmt, value))


def read_be(path: str, offset: int, fmt: str) -> int:
    """Read one big-endian field of a file."""
    s = struct.Struct(">" + fmt)
    with open(path, "rb") as f:
        f.seek(offset)
        return s.unpack(f.read(s.size))[0]


def or_be(path: str, offset: int, fmt: str, bits: int) -> None:
    """Set bits in one big-endian field of a file."""
    patch_be(path, offset, fmt, read_be(path, offset, fmt) | bits)


@dataclass
class Cluster0:
    """Cluster 0 of a qcow2 image taken apart: fixed header, extensions, backing file name.

    Edit the fields, then `write_cluster0` lays them out again: header, extensions (each padded
    to 8), end marker, backing name; header_length and the backing name offset/size are fixed up.
    """

    version: int
    cluster_size: int
    header: bytearray  # the fixed header: 72 bytes (v2) or header_length bytes (v3)
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    backing_name: bytes | None = None

    def ext(self, ext_type: int) -> bytes | None:
        """Data of the extension of this type, or None."""
        for t, d in self.extensions:
            if t == ext_type:
                return d
        return None

    def drop_ext(self, ext_type: int) -> None:
        """Remove every extension of this type."""
        self.extensions = [(t, d) for t, d in self.extensions if t != ext_type]


def read_cluster0(path: str) -> Cluster0:
    """Parse cluster 0 of a qcow2 image straight from the spec."""
    with open(path, "rb") as f:
        head = f.read(512)
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        f.seek(0)
        buf = f.read(1 << cluster_bits)
    version = struct.unpack_from(">I", buf, 4)[0]
    backing_offset, backing_size = struct.unpack_from(">QI", buf, 8)
    hlen = 72 if version == 2 else struct.unpack_from(">I", buf, 100)[0]
    c0 = Cluster0(version, 1 << cluster_bits, bytearray(buf[:hlen]))
    pos = hlen
    end = backing_offset or len(buf)
    while pos + 8 <= end:
        t, n = _EXT.unpack_from(buf, pos)
        pos += 8
        if t == EXT_END:
            break
        c0.extensions.append((t, bytes(buf[pos:pos + n])))
        pos += pad8(n)
    if backing_offset:
        c0.backing_name = bytes(buf[backing_offset:backing_offset + backing_size])
    return c0


def write_cluster0(path: str, c0: Cluster0) -> None:
    """Lay cluster 0 out again from `c0` (see Cluster0); the rest of the cluster is zeroed."""
    hdr = bytearray(c0.header)
    if c0.version >= 3:
        assert len(hdr) >= 104 and len(hdr) % 8 == 0, f"bad v3 header length {len(hdr)}"
        struct.pack_into(">I", hdr, 100, len(hdr))
    else:
        assert len(hdr) == 72
    out = bytearray(hdr)
    for t, d in c0.extensions:
        out += _EXT.pack(t, len(d)) + d + bytes(pad8(len(d)) - len(d))
    out += _EXT.pack(EXT_END, 0)
    if c0.backing_name is not None:
        struct.pack_into(">QI", out, 8, len(out), len(c0.backing_name))
        out += c0.backing_name
    else:
        struct.pack_into(">QI", out, 8, 0, 0)
    assert len(out) <= c0.cluster_size, f"cluster 0 overflows: {len(out)} > {c0.cluster_size}"
    out += bytes(c0.cluster_size - len(out))
    with open(path, "r+b") as f:
        f.write(out)


def set_header_length(path: str, length: int, fill: bytes | None = None) -> bytes:
    """Make a v3 image's header `length` bytes long, shifting the extensions and backing name.

    Shorter than 112 drops compression_type (must be zlib); longer appends unknown trailing
    fields (`fill`, default deterministic nonzero bytes). Returns the trailing bytes added.
    """
    c0 = read_cluster0(path)
    assert c0.version == 3
    base = bytes(c0.header[:min(len(c0.header), 112)])
    if length <= 112:
        assert length >= 104
        if length < 112:
            assert base[104] == 0, "header_length 104 can only describe a zlib image"
        c0.header = bytearray(base[:length])
        extra = b""
    else:
        extra = fill if fill is not None else bytes((i * 37 + 11) % 255 + 1 for i in range(length - 112))
        assert len(extra) == length - 112
        c0.header = bytearray(base + extra)
    write_cluster0(path, c0)
    return extra


def feature_table(entries: Iterable[tuple[int, int, str]]) -> bytes:
    """Encode a feature-name table extension body."""
    return b"".join(_FEATURE_ENTRY.pack(k, b, n.encode()) for k, b, n in entries)


def decode_feature_table(data: bytes) -> dict[tuple[int, int], str]:
    """Decode a feature-name table extension body to {(kind, bit): name}."""
    out = {}
    for i in range(len(data) // _FEATURE_ENTRY.size):
        k, b, n = _FEATURE_ENTRY.unpack_from(data, i * _FEATURE_ENTRY.size)
        out[(k, b)] = n.rstrip(b"\0").decode()
    return out


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class L2Entry:
    """One active L2 entry as stored (bitmap is None without extended L2)."""

    guest_cluster: int
    entry: int
    bitmap: int | None

    @property
    def compressed(self) -> bool:
        """Whether the entry is a compressed-cluster descriptor."""
        return bool(self.entry & _OFLAG_COMPRESSED)


def l2_entries(path: str) -> Iterator[L2Entry]:
    """Every nonzero active L2 entry of a qcow2 image, in guest order (read straight from the file)."""
    with open(path, "rb") as f:
        head = f.read(112)
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        _size, _crypt, l1_size, l1_offset = struct.unpack_from(">QIIQ", head, 24)
        version = struct.unpack_from(">I", head, 4)[0]
        incompat = struct.unpack_from(">Q", head, 72)[0] if version >= 3 else 0
        ext_l2 = bool(incompat & (1 << 4))
        cs = 1 << cluster_bits
        esize = 16 if ext_l2 else 8
        per_l2 = cs // esize
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        for l1_index, l1e in enumerate(l1):
            l2_offset = l1e & _L2_OFFSET_MASK
            if not l2_offset:
                continue
            f.seek(l2_offset)
            table = f.read(cs)
            for i in range(per_l2):
                if esize == 8:
                    e, bm = struct.unpack_from(">Q", table, 8 * i)[0], None
                else:
                    e, bm = struct.unpack_from(">QQ", table, 16 * i)
                if e or bm:
                    yield L2Entry(l1_index * per_l2 + i, e, bm)


def compressed_host_sharing(path: str) -> dict[int, int]:
    """{host cluster index: number of compressed payloads starting in it}, from the raw L2 tables."""
    cluster_bits = read_be(path, 20, "I")
    offset_bits = 62 - (cluster_bits - 8)
    counts: dict[int, int] = {}
    for e in l2_entries(path):
        if e.compressed:
            host = (e.entry & ((1 << offset_bits) - 1)) >> cluster_bits
            counts[host] = counts.get(host, 0) + 1
    return counts


def snapshot_table(path: str) -> list[dict]:
    """The snapshot table read straight from the file: one dict per entry, in table order.

    Keys: entry_offset (absolute file offset of the entry), l1_table_offset, l1_size, id, name,
    date_sec, date_nsec, vm_clock_nsec, vm_state_size (the 32-bit field), extra_size,
    vm_state_size_large / disk_size / icount (None when the extra data is too short).
    """
    count = read_be(path, 60, "I")
    pos = read_be(path, 64, "Q")
    out = []
    with open(path, "rb") as f:
        for _ in range(count):
            f.seek(pos)
            head = f.read(40)
            l1o, l1s, id_len, name_len, dsec, dnsec, vmc, vms, extra_size = struct.unpack(">QIHHIIQII", head)
            rest = f.read(extra_size + id_len + name_len)
            extra = rest[:extra_size] + bytes(24)
            large, disk_size, icount = struct.unpack_from(">QQQ", extra)
            out.append({
                "entry_offset": pos, "l1_table_offset": l1o, "l1_size": l1s,
                "id": rest[extra_size:extra_size + id_len].decode(),
                "name": rest[extra_size + id_len:].decode(),
                "date_sec": dsec, "date_nsec": dnsec, "vm_clock_nsec": vmc, "vm_state_size": vms,
                "extra_size": extra_size,
                "vm_state_size_large": large if extra_size >= 8 else None,
                "disk_size": disk_size if extra_size >= 16 else None,
                "icount": icount if extra_size >= 24 else None,
            })
            pos = pad8(pos + 40 + extra_size + id_len + name_len)
    return out


def file_digest(path: str) -> str:
    """sha256 of a whole file (to prove a read-only open left it untouched)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["KiB", "MiB", "CLUSTER_SIZES", "REFCOUNT_BITS", "EXT_END", "EXT_BACKING_FORMAT", "EXT_FEATURE_TABLE",
           "EXT_BITMAPS", "EXT_CRYPTO", "EXT_DATA_FILE", "pad8", "make_image", "write_pattern_file", "text_like",
           "mixed_raw", "kill_writer", "qemu_map", "map_at", "patch_be", "read_be", "or_be", "Cluster0",
           "read_cluster0", "write_cluster0", "set_header_length", "feature_table", "decode_feature_table",
           "L2Entry", "l2_entries", "compressed_host_sharing", "snapshot_table", "file_digest"]
