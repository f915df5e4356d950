"""qcowdisk.record: the value classes that replace dataclasses behave as dataclasses did
(equality, hashing, repr, replace, frozen fields), so no caller sees the change."""

from __future__ import annotations

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
