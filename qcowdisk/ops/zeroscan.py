"""Zero detection at memcmp speed: qemu-img convert's is_allocated_sectors(_min) rules.

Every test here is `buffer.startswith(ZEROS, pos)` on a `bytes`/`bytearray` with a `bytes`
prefix of zeros: CPython compares with memcmp (tens of GB/s), where comparing memoryviews goes
item by item (a few hundred MB/s) and a regular expression is slower still. A run of zero
sectors is measured by galloping (doubling the probe while it is all zeros) and then halving
onto the first non-zero sector, so a run of n sectors costs O(log n) compares of O(n) bytes in
all; a run of data sectors ends at the first aligned all-zero sector, found with `find`.
"""

from __future__ import annotations

from collections.abc import Iterator

SECTOR = 512
_MAX_POW = 12  # probes of up to 2 MiB (qemu-img's IO_BUF_SIZE)
# _ZERO_POW[k]: 512 << k zero bytes, as bytes (startswith needs no buffer export for them)
_ZERO_POW = [bytes(SECTOR << k) for k in range(_MAX_POW + 1)]
_ZERO_SECTOR = _ZERO_POW[0]

Buf = bytes | bytearray


def sector_is_zero(raw: Buf, sector: int) -> bool:
    """Whether sector `sector` of `raw` is all zeros (it must lie inside `raw`)."""
    return raw.startswith(_ZERO_SECTOR, sector * SECTOR)


def is_zero(raw: Buf, start: int, length: int) -> bool:
    """Whether raw[start:start+length] (inside `raw`) is all zeros."""
    end = start + length
    while end - start >= SECTOR:
        k = min(_MAX_POW, ((end - start) // SECTOR).bit_length() - 1)
        if not raw.startswith(_ZERO_POW[k], start):
            return False
        start += SECTOR << k
    return start == end or raw.startswith(_ZERO_SECTOR[:end - start], start)


def zero_sectors(raw: Buf, start: int, n: int) -> int:
    """How many sectors from `start` (< n) are all zeros, stopping at sector n."""
    lo, k = start, 3
    while lo < n:
        if lo + (1 << k) > n:
            k = (n - lo).bit_length() - 1
        if raw.startswith(_ZERO_POW[k], lo * SECTOR):
            lo += 1 << k
            k = min(k + 1, _MAX_POW)
            continue
        while k:  # a non-zero sector in [lo, lo + 2^k): halve onto the first one
            k -= 1
            if raw.startswith(_ZERO_POW[k], lo * SECTOR):
                lo += 1 << k
        return lo - start
    return n - start


def data_sectors(raw: Buf, start: int, n: int) -> int:
    """How many sectors from `start` (< n) hold data, up to the first all-zero sector or n."""
    pos, end = start * SECTOR, n * SECTOR
    while True:
        p = raw.find(_ZERO_SECTOR, pos, end)
        if p < 0:
            return n - start
        k = -(-p // SECTOR)  # the first sector boundary at or after the zeros found
        if k >= n:
            return n - start
        if sector_is_zero(raw, k):
            return k - start
        pos = k * SECTOR


def is_allocated_sectors(raw: Buf, start: int, n: int, sector_num: int, alignment: int) -> tuple[bool, int]:
    """qemu-img's is_allocated_sectors over sectors [start, n) of `raw` (guest sector
    `sector_num` at `start`): (whether the first run holds data, its length in sectors)."""
    if n <= start:
        return False, 0
    zero = sector_is_zero(raw, start)
    i = zero_sectors(raw, start, n) if zero else data_sectors(raw, start, n)
    if start + i == n:
        return not zero, i
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if zero and i <= tail:
            return True, i  # the next sector is data and rewrites this tail anyway
        if not zero:
            i = min(i + alignment - tail, n - start)
        else:
            i -= tail
    return not zero, i


def data_runs(raw: Buf, n: int, sector_num: int, min_sparse: int, alignment: int) -> Iterator[tuple[bool, int]]:
    """The (is_data, sectors) runs qemu-img's convert_co_write splits an n-sector data buffer
    into with is_allocated_sectors_min: zero stretches of at least `min_sparse` sectors are
    zero runs, everything else data."""
    pos = 0
    while pos < n:
        m = min(min_sparse, n - pos)
        data, pnum = is_allocated_sectors(raw, pos, n, sector_num + pos, alignment)
        if not data:
            yield False, pnum
            pos += pnum
            continue
        used = checked = pnum
        p = pos + pnum
        while p < n:
            data, pnum = is_allocated_sectors(raw, p, n, sector_num + p, alignment)
            p += pnum
            checked += pnum
            if data:
                used = checked
            elif pnum >= m:
                break
        yield True, used
        pos += used


__all__ = ["SECTOR", "sector_is_zero", "is_zero", "zero_sectors", "data_sectors", "is_allocated_sectors",
           "data_runs"]
