"""Writing a new header into cluster 0 so that a power cut shows the old header or the new one.

A disk writes 512-byte sectors atomically, not more: a header write that changes several
sectors may land in part, and the sectors then mix two headers (an extension area cut in the
middle, a backing name offset pointing at half of the old name). QEMU writes the header with
one pwrite (qcow2_update_header); qcowdisk orders it instead, so that every switch comes down to
one write inside the first sector:

1. What the new header needs beyond sector 0 and the old header does not read (past its
   extension area and backing name) is written first and synced: the old reader does not see it.
2. The first sector is written (one sector: it lands whole or not at all) and synced.

That works when the two headers differ beyond sector 0 only where the old one reads nothing
(a bigger header, a new name past the old one). Otherwise it goes through an intermediate
header that both readers accept, placed in the part of cluster 0 the old header leaves free:

- the new header with its backing name moved past the old one (`backing_file_offset` is a
  field of sector 0), when the extension areas agree beyond sector 0 (a new backing name);
- a version 3 header (the new one, or the old one when going back to version 2) whose
  `header_length` starts its extensions past the old header (bytes in between are unknown
  header fields, which readers keep and ignore), when the extension area itself changes
  beyond sector 0 (bitmaps added or removed behind the feature table, a version change).

From the intermediate, steps 1 and 2 reach the new header in its usual layout. A cut between
the steps leaves the intermediate: the old or the new state, in a layout QEMU reads too. What
the old and intermediate headers leave past the new one is zeroed once the new one is durable.

Without room for an intermediate too, the switch is one step to the new header with its backing
name out of the usual place: where the old header has it (the name did not change), or past the
old header. Only when even that does not fit is there no such order (the new header's bytes
beyond sector 0 and the old one's cannot lie side by side in cluster 0: e.g. 1 KiB clusters, a
464-byte name replaced by a 675-byte one; or a version 2 header whose extensions pass sector
0): then what the old header does not read is written and synced first, and the rest in one
write up to the last sector where both headers read different bytes. A power cut tearing that
one write may mix the two headers; it is the only window left, and QEMU has it for every header.
"""

from __future__ import annotations

import struct

from ..hostio import HostFile
from .format import EXT_END, EXT_STRUCT, HEADER_V2_LENGTH, HEADER_V3_LENGTH, Header, serialize_header

SECTOR = 512
Ranges = list[tuple[int, int]]
Writes = list[tuple[int, bytes]]
Middle = tuple[bytes, Ranges, Ranges]
"""A header layout: its bytes, the ranges it reads, the ranges whose contents matter."""


def used_ranges(buf: bytes, cluster_size: int) -> Ranges:
    """The byte ranges of cluster 0 a reader of the header in `buf` reads: the header fields,
    the extension area up to its end mark, the backing file name. Clamped to the cluster."""
    limit = min(cluster_size, len(buf))
    if limit < HEADER_V2_LENGTH:
        return [(0, limit)]
    version, bfo, bfs = struct.unpack_from(">I", buf, 4)[0], *struct.unpack_from(">QI", buf, 8)
    start = HEADER_V2_LENGTH
    if version >= 3 and limit >= 104:
        start = min(max(struct.unpack_from(">I", buf, 100)[0], 104), limit)
    end = min(bfo, limit) if bfo else limit
    pos = start
    while pos + EXT_STRUCT.size <= end:
        ext_type, length = EXT_STRUCT.unpack_from(buf, pos)
        pos += EXT_STRUCT.size
        if ext_type == EXT_END:
            break
        pos = min(pos + (length + 7) // 8 * 8, end)
    out = [(0, pos)]
    if bfo and bfs and bfo < cluster_size:
        out.append((bfo, min(bfo + bfs, cluster_size)))
    return out


def _minus(a: int, b: int, used: Ranges) -> tuple[Ranges, Ranges]:
    """[a, b) split into (parts inside `used`, parts outside)."""
    inside: Ranges = []
    for u, v in sorted(used):
        lo, hi = max(a, u), min(b, v)
        if lo < hi:
            inside.append((lo, hi))
    outside: Ranges = []
    pos = a
    for lo, hi in inside:
        if lo > pos:
            outside.append((pos, lo))
        pos = max(pos, hi)
    if pos < b:
        outside.append((pos, b))
    return inside, outside


def _diff(cur: bytes, cur_used: Ranges, target: bytes, target_used: Ranges) -> tuple[Writes, int]:
    """How `target` differs from `cur` beyond sector 0: the writes that can go before a switch
    (bytes the target reads there and the current header does not), and the end of the last
    byte both read that differs (0 if none: the switch is then one sector write)."""
    writes: Writes = []
    clash = 0
    for start, b in target_used:
        a = max(start, SECTOR)
        if a >= b:
            continue
        inside, outside = _minus(a, b, cur_used)
        clash = max([clash, *(hi for lo, hi in inside if cur[lo:hi] != target[lo:hi])])
        writes += [(lo, target[lo:hi]) for lo, hi in outside if cur[lo:hi] != target[lo:hi]]
    return writes, clash


def _step(cur: bytes, cur_used: Ranges, layout: Middle) -> Writes | None:
    """The writes before a sector-0 switch from `cur` to `layout`; None if none makes it safe
    (the layout reads bytes beyond sector 0 that the current header reads and that differ)."""
    writes, clash = _diff(cur, cur_used, layout[0], layout[1])
    return None if clash else writes


def _end(ranges: Ranges) -> int:
    return max(b for _, b in ranges)


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _name_at(cur: bytes, new: Header, new_bytes: bytes, at: int, cluster_size: int) -> Middle | None:
    """The new header with its backing name at `at` instead of right after the extensions
    (the bytes between are left as they are on disk); None without a name or room."""
    n, ext_end = new.backing_file_size, new.backing_file_offset
    if not n or at < ext_end or at + n > cluster_size:
        return None
    buf = bytearray(cur[:at].ljust(at, b"\0"))
    buf[:ext_end] = new_bytes[:ext_end]
    buf[8:20] = struct.pack(">QI", at, n)
    buf += new_bytes[ext_end:ext_end + n]
    used = [(0, ext_end), (at, at + n)]
    return bytes(buf), used, used


def _moved_extensions(cur: bytes, cur_end: int, old: Header, new: Header, new_bytes: bytes,
                      cluster_size: int) -> Middle | None:
    """A version 3 header (the new one, else the old one) whose extensions and name start past
    both the old header and the new one's usual layout, the bytes between kept as unknown header
    fields; None if neither is version 3 or cluster 0 has no room."""
    base = new if new.version >= 3 else old if old.version >= 3 else None
    if base is None:
        return None
    fixed = HEADER_V3_LENGTH + len(base.extra_header)
    at = _round8(max(cur_end, len(new_bytes), fixed))
    filler = cur[fixed:at].ljust(at - fixed, b"\0")
    h = base.replace(extensions=list(base.extensions), extra_header=base.extra_header + filler)
    try:
        buf = serialize_header(h)
    except ValueError:
        return None
    if len(buf) > cluster_size or h.extensions != base.extensions:
        return None  # no room (serialize_header would have left the feature table out)
    read = used_ranges(buf, cluster_size)
    return buf, read, [(0, fixed), *read[1:], (at, read[0][1])]


def _plan(cur: bytes, cluster_size: int, old: Header, new: Header, new_bytes: bytes) -> list[tuple[Middle, Writes]]:
    """The steps from the header on disk (`cur`) to `new`: each a layout and the writes that
    go before its sector-0 write. Empty when no order fits in cluster 0."""
    cur_used = used_ranges(cur, cluster_size)
    cur_end = _end(cur_used)
    new_used = used_ranges(new_bytes, cluster_size)
    final: Middle = (new_bytes, new_used, new_used)
    direct = _step(cur, cur_used, final)
    if direct is not None:
        return [(final, direct)]
    # Through an intermediate, to the usual layout.
    n = new.backing_file_size
    for middle in (_name_at(cur, new, new_bytes, _round8(max(cur_end, new.backing_file_offset + n)), cluster_size),
                   _moved_extensions(cur, cur_end, old, new, new_bytes, cluster_size)):
        if middle is None:
            continue
        first = _step(cur, cur_used, middle)
        second = _step(middle[0].ljust(len(new_bytes), b"\0"), middle[2], final)
        if first is not None and second is not None:
            return [(middle, first), (final, second)]
    # No room for both: one step to the new header with its name elsewhere, where the old
    # header has it (the name did not change) or past the old header.
    kept = [old.backing_file_offset] if old.backing_file == new.backing_file and old.backing_file_offset else []
    for at in (*kept, _round8(max(cur_end, new.backing_file_offset))):
        layout = _name_at(cur, new, new_bytes, at, cluster_size)
        step = None if layout is None else _step(cur, cur_used, layout)
        if layout is not None and step is not None:
            return [(layout, step)]
    return []


def _old_end(old: Header) -> int:
    """Where the old header's bytes end (its extensions or its name, whichever is later)."""
    name_end = old.backing_file_offset + old.backing_file_size if old.backing_file_offset else 0
    try:
        return max(name_end, len(serialize_header(old.replace(extensions=list(old.extensions)))))
    except ValueError:  # (an image read from disk always fits; this only keeps the switch going)
        return name_end


def write_header(host: HostFile, cluster_size: int, old: Header, new: Header, new_bytes: bytes) -> None:
    """Replace the header `old` on disk by `new` (serialized as `new_bytes`) in steps that each
    leave the old or the new state (module docstring). The caller has synced what the new
    header names, and syncs (`host.sync()`) after this returns: the last header write may be
    left unsynced; every write that must be durable before the next one is synced here.

    `new.backing_file_offset` is set to where the name went (past the usual place when cluster
    0 has no room to move it there safely)."""
    stale = _old_end(old)
    if len(new_bytes) <= SECTOR:
        host.pwrite(new_bytes, 0)  # one sector: lands whole or not at all
        end = len(new_bytes)
    else:
        cur = host.pread(min(cluster_size, max(len(new_bytes), stale, 4096)), 0)
        plan = _plan(cur, cluster_size, old, new, new_bytes)
        if not plan:
            # No tear-safe order fits in cluster 0 (module docstring): what the old header does
            # not read first, then one write up to the last sector where the two differ.
            new_used = used_ranges(new_bytes, cluster_size)
            before, clash = _diff(cur, used_ranges(cur, cluster_size), new_bytes, new_used)
            for offset, data in before:
                host.pwrite(data, offset)
            if before:
                host.fsync()
            host.pwrite(new_bytes[:clash], 0)
            plan = [((new_bytes, new_used, new_used), [])]
        else:
            stale = max(stale, _end(used_ranges(cur, cluster_size)))
            for i, ((target, _, _), before) in enumerate(plan):
                if i:
                    host.fsync()  # the intermediate is durable before its spare bytes are reused
                for offset, data in before:
                    host.pwrite(data, offset)
                if before:
                    host.fsync()  # durable before the sector that points at it
                host.pwrite(target[:SECTOR], 0)
                stale = max(stale, len(target))
        final_bytes, final_used, _ = plan[-1][0]
        new.backing_file_offset = struct.unpack_from(">Q", final_bytes, 8)[0]
        end = _end(final_used)
    if stale > end:
        # QEMU leaves zeros past the header: clear what the old and intermediate headers left,
        # once the new header is durable (until then the old one may still read it).
        host.fsync()
        host.pwrite(bytes(stale - end), end)
