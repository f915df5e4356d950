"""qcowdisk.record: the value classes that replace dataclasses behave as dataclasses did
(equality, hashing, repr, replace, frozen fields), so no caller sees the change."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qcowdisk.formats import OpenOptions
from qcowdisk.image import Extent
from qcowdisk.record import FrozenRecord, Record


class Point(FrozenRecord):
    __slots__ = ("label", "x", "y")
    _hidden = ("label",)
    _uncompared = ("label",)
    x: int
    y: int
    label: str

    def __init__(self, x: int, y: int, label: str = "") -> None:
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "label", label)


class Box(Record):
    __slots__ = ("items",)
    items: list[int]

    def __init__(self, items: list[int]) -> None:
        self.items = items


def test_fields_follow_the_annotations_not_the_sorted_slots() -> None:
    assert Point._fields == ("x", "y", "label")
    assert repr(Point(1, 2, "a")) == "Point(x=1, y=2)"  # `label` hidden, as repr=False


def test_equality_and_hash_over_compared_fields() -> None:
    assert Point(1, 2, "a") == Point(1, 2, "b")  # label uncompared, as compare=False
    assert Point(1, 2) != Point(2, 1)
    assert hash(Point(1, 2, "a")) == hash(Point(1, 2, "b"))
    assert Point(1, 2) != (1, 2) and Point(1, 2).__eq__((1, 2)) is NotImplemented
    with pytest.raises(TypeError, match="unhashable"):
        hash(Box([1]))
    assert Box([1]) == Box([1]) and Box([1]) != Box([2])


def test_frozen_refuses_assignment_and_deletion() -> None:
    p = Point(1, 2)
    with pytest.raises(AttributeError, match="cannot assign to field 'x'"):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(AttributeError, match="cannot delete field 'x'"):
        del p.x
    with pytest.raises(AttributeError):
        p.z = 1  # type: ignore[attr-defined]
    b = Box([1])
    b.items = [2]
    assert b.items == [2]


@pytest.mark.parametrize("make", [lambda: Point(1, 2, "a"), lambda: Box([1, 2]), lambda: OpenOptions(readonly=True),
                                  lambda: Extent(0, 512, 1, True, False, True, 4096, filename="a")])
def test_copy_and_pickle(make: Callable[[], Record]) -> None:
    """As with dataclasses: copies and pickles come back equal, frozen ones included."""
    r = make()
    for twin in (copy.copy(r), copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        assert twin == r and twin is not r and type(twin) is type(r)
        assert [getattr(twin, f) for f in r._fields] == [getattr(r, f) for f in r._fields]
    if isinstance(r, FrozenRecord):
        with pytest.raises(AttributeError):
            copy.copy(r).x = 0


def test_replace_copies_with_changes() -> None:
    p = Point(1, 2, "a")
    q = p.replace(y=5)
    assert (q.x, q.y, q.label) == (1, 5, "a") and (p.x, p.y) == (1, 2)
    assert type(q) is Point
    with pytest.raises(TypeError, match="has no field 'z'"):
        p.replace(z=1)


def test_a_slot_without_annotation_is_refused() -> None:
    with pytest.raises(TypeError, match="every slot needs an annotation"):
        class Bad(Record):
            __slots__ = ("a", "b")
            a: int


def test_engine_records() -> None:
    o = OpenOptions(readonly=True)
    assert o.replace(readonly=False) == OpenOptions() and o != OpenOptions()
    assert hash(o) == hash(OpenOptions(readonly=True))
    e = Extent(0, 512, 0, True, False, True, 4096, filename="a")
    assert repr(e) == ("Extent(start=0, length=512, depth=0, present=True, zero=False, data=True, offset=4096, "
                       "compressed=False, filename='a')")


# The public qcow2 records, against what their dataclasses gave (strings captured from the
# dataclass versions).
def test_snapshot_record_as_the_dataclass_was() -> None:
    from datetime import UTC, datetime

    from qcowdisk.qcow2.format import Snapshot, SnapshotEntry

    date = datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    entry = SnapshotEntry(1, 2, b"1", b"n", 3, 4, 5, 6, b"x")
    s = Snapshot("1", "n", date, 5, 6, 7, None, 65536, 2, entry)
    assert repr(s) == ("Snapshot(id='1', name='n', date=datetime.datetime(2024, 1, 2, 3, 4, 5, 6, "
                       "tzinfo=datetime.timezone.utc), vm_clock_ns=5, vm_state_size=6, disk_size=7, icount=None)")
    assert repr(entry) == ("SnapshotEntry(l1_table_offset=1, l1_size=2, id_raw=b'1', name_raw=b'n', date_sec=3, "
                           "date_nsec=4, vm_clock_ns=5, vm_state_size=6, extra=b'x')")
    same = Snapshot("1", "n", date, 5, 6, 7, None, 65536, 2)  # `entry` is not compared
    assert s == same and hash(s) == hash(same)
    assert s != Snapshot("1", "n", date, 5, 6, 7, None, 65536, 3)  # l1_size is (repr=False, compared)
    assert s.replace(name="m").name == "m" and s.replace(name="m").entry is entry
    assert (s.l1_table_offset, s.l1_size, Snapshot("1", "n", date, 0, 0, None, None).entry) == (65536, 2, None)
    with pytest.raises(AttributeError):
        s.name = "m"


def test_bitmap_records_as_the_dataclasses_were() -> None:
    from qcowdisk.qcow2.bitmaps import NewBitmap
    from qcowdisk.qcow2.format import Bitmap

    b = Bitmap("b", 3, 16, 65536, 1)
    assert repr(b) == "Bitmap(name='b', flags=3, granularity_bits=16, table_offset=65536, table_size=1)"
    assert b == Bitmap("b", 3, 16, 65536, 1) and hash(b) == hash(Bitmap("b", 3, 16, 65536, 1))
    assert b != Bitmap("b", 1, 16, 65536, 1) and b.replace(flags=1) == Bitmap("b", 1, 16, 65536, 1)
    n = NewBitmap("b")
    assert repr(n) == "NewBitmap(name='b', granularity=65536, enabled=True, data=None)"
    assert n == NewBitmap(name="b", granularity=65536, enabled=True) and hash(n) == hash(NewBitmap("b"))
    assert n.replace(enabled=False) == NewBitmap("b", enabled=False)
    with pytest.raises(TypeError, match="unhashable"):
        hash(NewBitmap("b", data=[b"\0"]))  # as the frozen dataclass: hashes its fields
    with pytest.raises(AttributeError):
        n.granularity = 512


def test_check_result_record_as_the_dataclass_was() -> None:
    from qcowdisk.qcow2.checkresult import CheckResult

    r = CheckResult(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, "f")
    assert repr(r) == ("CheckResult(check_errors=0, corruptions=1, leaks=2, corruptions_fixed=3, leaks_fixed=4, "
                       "image_end_offset=5, total_clusters=6, allocated_clusters=7, fragmented_clusters=8, "
                       "compressed_clusters=9, filename='f', format='qcow2')")
    assert r == CheckResult(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, "f", "qcow2") and r != r.replace(filename="g")
    assert hash(r) == hash(CheckResult(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, "f"))
    assert r.replace(filename="g").filename == "g" and r.replace(filename="g").leaks == 2


def test_header_defaults_are_not_shared() -> None:
    from qcowdisk.qcow2.format import Header

    a = Header(3, 0, 0, 16, 1 << 20, 0, 2, 0x30000, 0x10000, 1, 0, 0)
    b = Header(3, 0, 0, 16, 1 << 20, 0, 2, 0x30000, 0x10000, 1, 0, 0)
    assert a.extensions == [] and a.extensions is not b.extensions and a.feature_names is not b.feature_names
    assert a == b and a.replace(size=0) != a
    assert repr(a).startswith("Header(version=3, backing_file_offset=0,") and repr(a).endswith(
        "extra_header=b'', extensions=[], backing_file=None, backing_format=None, data_file=None, feature_names={})")


def test_qcow2_engine_imports_neither_dataclasses_nor_typing() -> None:
    # (-S: the site hooks of some installs import typing themselves)
    code = ("import sys\n"
            "import qcowdisk.qcow2.file, qcowdisk.qcow2.check, qcowdisk.qcow2.amend, qcowdisk.qcow2.snapshot\n"
            "print(sorted(m for m in ('dataclasses', 'inspect', 'typing', 'datetime') if m in sys.modules))\n"
            "from typing import Literal\n"
            "from qcowdisk.qcow2.check import Repair\n"
            "print(Repair == (Literal['leaks', 'all'] | None))\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
    assert out.splitlines() == ["[]", "True"]  # Repair (the check's public alias) still resolves
