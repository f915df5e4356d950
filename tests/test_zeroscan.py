"""qcowdisk.ops.zeroscan finds the same runs as a sector-by-sector reading of qemu-img's
is_allocated_sectors (qemu-img.c, QEMU 7.2), and data_runs splits as is_allocated_sectors_min."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcowdisk.ops import zeroscan
from qcowdisk.ops.zeroscan import data_runs, is_allocated_sectors, is_zero, zero_sectors

SECTOR = 512


def naive_is_allocated(buf: bytes, start: int, n: int, sector_num: int, alignment: int) -> tuple[bool, int]:
    """qemu-img's is_allocated_sectors, one sector at a time."""
    def zero(k: int) -> bool:
        return buf[k * SECTOR:(k + 1) * SECTOR] == bytes(SECTOR)
    if n <= start:
        return False, 0
    first = zero(start)
    i = 1
    while start + i < n and zero(start + i) == first:
        i += 1
    if start + i == n:
        return not first, i
    tail = (sector_num + i) & (alignment - 1)
    if tail:
        if first and i <= tail:
            return True, i
        if not first:
            i = min(i + alignment - tail, n - start)
        else:
            i -= tail
    return not first, i


# a sector is zeros, data, or zeros but for one byte (at its start, middle or end)
sector = st.one_of(st.just(bytes(SECTOR)), st.binary(min_size=SECTOR, max_size=SECTOR),
                   st.sampled_from([0, 255, 511]).map(lambda i: bytes(i) + b"\x01" + bytes(SECTOR - i - 1)))
disk = st.lists(st.tuples(sector, st.integers(1, 40)), min_size=1, max_size=12).map(
    lambda runs: b"".join(s * k for s, k in runs))


@settings(max_examples=300, deadline=None)
@given(disk, st.sampled_from([1, 2, 3, 8, 16, 128]), st.integers(0, 300))
def test_runs_match_the_sector_by_sector_rules(buf: bytes, min_sparse: int, sector_num: int) -> None:
    n = len(buf) // SECTOR
    alignment = 1 << (min_sparse.bit_length() - 1)
    raw = bytearray(buf)
    fast = list(data_runs(raw, n, sector_num, min_sparse, alignment))
    with pytest.MonkeyPatch.context() as mp:  # the same split over the sector-by-sector rules
        mp.setattr(zeroscan, "is_allocated_sectors", lambda b, *a: naive_is_allocated(bytes(b), *a))
        assert fast == list(data_runs(raw, n, sector_num, min_sparse, alignment))
    for start in range(0, n, 7):
        assert is_allocated_sectors(raw, start, n, sector_num, alignment) == \
            naive_is_allocated(buf, start, n, sector_num, alignment)


@settings(max_examples=300, deadline=None)
@given(disk, st.data())
def test_zero_tests(buf: bytes, data: st.DataObject) -> None:
    n = len(buf) // SECTOR
    start = data.draw(st.integers(0, len(buf)))
    length = data.draw(st.integers(0, len(buf) - start))
    assert is_zero(buf, start, length) == (buf[start:start + length] == bytes(length))
    s = data.draw(st.integers(0, n - 1))
    if buf[s * SECTOR:(s + 1) * SECTOR] == bytes(SECTOR):
        k = 0
        while s + k < n and buf[(s + k) * SECTOR:(s + k + 1) * SECTOR] == bytes(SECTOR):
            k += 1
        assert zero_sectors(buf, s, n) == k


def test_long_runs() -> None:
    """Runs longer than the largest probe (2 MiB), ending one sector from either side."""
    size = 5 << 20
    for at in (0, SECTOR, (2 << 20) - SECTOR, 2 << 20, size - SECTOR):
        buf = bytearray(size)
        buf[at + 100] = 7
        assert zero_sectors(buf, 0, size // SECTOR) == at // SECTOR
        assert not is_zero(buf, 0, size) and is_zero(buf, 0, at)
