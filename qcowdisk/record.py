"""Value classes without `dataclasses`: equality, repr and `replace` over declared slots.

Importing `dataclasses` pulls in `inspect` (with `ast`, `dis`, `tokenize`), and each
`@dataclass` compiles its generated methods with `exec`: about 30 ms of a process start on a
small VM, most of what a short `qcowdisk info` costs. A record writes its `__init__` by hand
(as fast as a generated one) and inherits the rest from here, computed from `__slots__`.

A subclass declares its fields as `__slots__` and annotates them in the class body (the
annotations give their order, as a dataclass's do); `_hidden` names the
fields repr leaves out and `_uncompared` those equality ignores (dataclasses' `repr=False`,
`compare=False`). `FrozenRecord` refuses assignment after `__init__` (which sets fields with
`object.__setattr__`) and hashes its compared fields, as `@dataclass(frozen=True)` does.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Self


class Record:  # noqa: PLW1641 (unhashable on purpose, see __eq__)
    """Base of qcowdisk's value classes: `==`, `repr` and `replace` over the fields in `__slots__`."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()  # every field, base classes' first (set per subclass)
    _compared: tuple[str, ...] = ()  # the fields equality and hashing look at
    _shown: tuple[str, ...] = ()  # the fields repr shows
    _hidden: tuple[str, ...] = ()
    _uncompared: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        slots: set[str] = set()
        fields: list[str] = []
        for klass in reversed(cls.__mro__):
            declared = klass.__dict__.get("__slots__", ())
            slots.update((declared,) if isinstance(declared, str) else declared)
            # (not inspect.get_annotations: importing inspect is the cost this module avoids)
            annotations = klass.__dict__.get("__annotations__", {})  # noqa: RUF063
            fields.extend(name for name in annotations if name not in fields)
        fields = [name for name in fields if name in slots]  # annotated order; the slots are sorted
        if set(fields) != slots:
            raise TypeError(f"{cls.__qualname__}: every slot needs an annotation ({sorted(slots - set(fields))})")
        cls._fields = tuple(fields)
        cls._compared = tuple(f for f in fields if f not in cls._uncompared)
        cls._shown = tuple(f for f in fields if f not in cls._hidden)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._compared)
    # (defining __eq__ leaves __hash__ None: a mutable record is unhashable, as a non-frozen dataclass)

    def replace(self, **changes: Any) -> Self:
        """A copy with the given fields changed (as `dataclasses.replace`); unknown names raise TypeError."""
        unknown = changes.keys() - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__qualname__} has no field {sorted(unknown)[0]!r}")
        new = object.__new__(type(self))
        for name in self._fields:
            object.__setattr__(new, name, changes[name] if name in changes else getattr(self, name))
        return new


class FrozenRecord(Record):
    """A `Record` whose fields cannot be assigned after `__init__`; hashable by its compared fields."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self._compared))

    def __setstate__(self, state: object) -> None:
        """Restore the fields `copy` and `pickle` saved ((None, {slot: value}) for slots), which
        they would otherwise set one by one through the refusing `__setattr__`."""
        for part in state if isinstance(state, tuple) else (state,):
            if isinstance(part, dict):
                for name, value in part.items():
                    object.__setattr__(self, name, value)


__all__ = ["Record", "FrozenRecord"]
