"""QEMU's option syntax, as QEMU 7.2 parses it and words its refusals.

- `strtosz`: a size with an optional suffix (qemu_strtosz).
- `strtou64`: an unsigned number in C's notation (qemu_strtou64, base 0).
- `valid_option_list`: what qemu-img accepts as one `-o` argument (is_valid_option_list).
- `split_option_list`: `name=value,...` into pairs (QemuOpts' get_opt_name_value: `,,` is a
  literal comma, a bare `name` is `name=on` and `noname` is `name=off`).
- `QemuOpts`: a parsed option list checked against a table of option types (`OptType`), with
  QemuOpts' "the last one given wins" lookups.

Refusals are `OptionError`s carrying QEMU's message and, where QEMU adds one, its hint. A size
given in hex with a suffix is accepted with QEMU's deprecation warning (`SizeSuffixWarning`).
"""

from __future__ import annotations

import enum
import re
import warnings
from collections.abc import Mapping, Sequence

UINT64_MAX = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1


class OptionError(ValueError):
    """An option QEMU refuses: `str(e)` is QEMU's message, `hint` its follow-up text (or "")."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class SizeSuffixWarning(DeprecationWarning):
    """A hex number with a size suffix: QEMU accepts it and warns that this is deprecated."""


class OptType(enum.Enum):
    """QemuOptType: how an option's value is parsed."""

    STRING = "string"
    BOOL = "bool"
    NUMBER = "number"
    SIZE = "size"


OptValue = str | bool | int

_STRTOSZ_SUFFIXES = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}  # powers of 1024
_SPACES = " \t\n\v\f\r"
_STRTOULL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(\d+)")
_STRTOULL_HEX = re.compile(r"[ \t\n\v\f\r]*[+-]?0[xX]([0-9a-fA-F]+)")
_STRTOD_FRACTION = re.compile(r"\.\d+(?:[eE][+-]?\d+)?")


def strtosz(text: str) -> tuple[int, bool]:
    """QEMU 7.2's qemu_strtosz: (bytes, whether a hex number took a suffix, which QEMU warns of).

    Decimal with an optional fraction, or 0x hex, then an optional B/K/M/G/T/P/E suffix (powers
    of 1024, either case); nothing may follow. Raises ValueError where QEMU says EINVAL and
    OverflowError where it says ERANGE (past 2**64 - 1). Shared by the operations and the
    command line (map, resize, measure).
    """
    m = _STRTOULL.match(text)
    if m is None or m.group(1) == "-":
        raise ValueError(text)
    value, end = int(m.group(2)), m.end()
    if value >= 1 << 64:
        raise OverflowError(text) if end == len(text) else ValueError(text)
    is_hex, fraction = False, 0
    if value == 0 and text[end:end + 1] in ("x", "X"):
        is_hex = True
        h = _STRTOULL_HEX.match(text)
        if h is not None:  # else "0x" without digits: strtoull stopped after the 0
            value, end = int(h.group(1), 16), h.end()
        if value >= 1 << 64:  # strtoull's ERANGE; anything after the digits makes it EINVAL
            raise OverflowError(text) if end == len(text) else ValueError(text)
        if text[end:end + 1] == ".":
            raise ValueError(text)
    elif text[end:end + 1] == ".":
        f = _STRTOD_FRACTION.match(text, end)
        if f is None:
            end += 1  # "1.k": no fraction digits, the suffix still counts
        elif "e" in f.group(0).lower():
            raise ValueError(text)
        else:  # a 64-bit fixed-point fraction, as QEMU keeps it
            fraction, end = int(float(f.group(0)) * 2.0 ** 64), f.end()
            if fraction >= 1 << 64:  # ".99999999999999999999" rounds to 1.0: QEMU's cast gives 0
                fraction = 0
    exponent = _STRTOSZ_SUFFIXES.get(text[end:end + 1].upper()) if end < len(text) else None
    if exponent is not None:
        end += 1
    if end != len(text):
        raise ValueError(text)
    if exponent is None or exponent == 0:
        if fraction:
            raise ValueError(text)
        return value, False
    part = fraction << (10 * exponent)
    value = (value << (10 * exponent)) + (part >> 64) + ((part >> 63) & 1)  # half a byte rounds up
    if value >= 1 << 64:
        raise OverflowError(text)
    return value, is_hex


def strtou64(text: str) -> int:
    """qemu_strtou64(text, NULL, 0): strtoull in base 0 (0x hex, 0 octal, decimal, a sign, leading
    blanks; a minus wraps modulo 2**64), the whole string consumed.

    Raises ValueError (EINVAL: no digits, or anything after them) or OverflowError (ERANGE).
    """
    pos = len(text) - len(text.lstrip(_SPACES))
    negative = False
    if text[pos:pos + 1] in ("+", "-"):
        negative = text[pos] == "-"
        pos += 1
    if text[pos:pos + 2].lower() == "0x" and text[pos + 2:pos + 3] and text[pos + 2] in "0123456789abcdefABCDEF":
        m = re.compile(r"[0-9a-fA-F]+").match(text, pos + 2)
        base = 16
    elif text[pos:pos + 1] == "0":
        m = re.compile(r"[0-7]+").match(text, pos)
        base = 8
    else:
        m = re.compile(r"[0-9]+").match(text, pos)
        base = 10
    if m is None or m.end() != len(text):  # no digits, or something after them
        raise ValueError(f"not a number: {text!r}")
    value = int(m.group(0), base)
    if value > UINT64_MAX:
        raise OverflowError(f"out of range: {text!r}")
    return (-value) & UINT64_MAX if negative else value


def parse_bool(name: str, text: str) -> bool:
    """qapi_bool_parse: on/yes/true/y or off/no/false/n, exactly."""
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_size(name: str, text: str) -> int:
    """parse_option_size: a size for option `name` (warns as QEMU does of hex with a suffix)."""
    try:
        value, hex_suffix = strtosz(text)
    except OverflowError:
        raise OptionError(f"Value '{text}' is out of range for parameter '{name}'") from None
    except ValueError:
        raise OptionError(f"Parameter '{name}' expects a non-negative number below 2^64",
                          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                          "and exabytes, respectively.\n") from None
    if hex_suffix:
        warnings.warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}", SizeSuffixWarning,
                      stacklevel=2)
    return value


def parse_number(name: str, text: str) -> int:
    """parse_option_number: an unsigned 64-bit number for option `name`."""
    try:
        return strtou64(text)
    except OverflowError:
        raise OptionError(f"Value '{text}' is too large for parameter '{name}'") from None
    except ValueError:
        raise OptionError(f"Parameter '{name}' expects a number") from None


def valid_option_list(text: str) -> bool:
    """is_valid_option_list: not empty, not starting with a comma, not ending in an odd number of them."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def split_option_list(text: str) -> list[tuple[str, str]]:
    """`name=value,...` into (name, value) pairs as QemuOpts reads them (no implied first name).

    A value runs to the next single comma (`,,` stands for one comma); an item without `=` is a
    flag, `name` meaning name=on and `noname` name=off.
    """
    pairs: list[tuple[str, str]] = []
    p = 0
    n = len(text)
    while p < n:
        length = len(text) - p
        for i in range(p, n):
            if text[i] in "=,":
                length = i - p
                break
        if p + length >= n or text[p + length] != "=":
            name = text[p:p + length]
            value = "on"
            if name.startswith("no"):
                name, value = name[2:], "off"
            p += length
        else:
            name = text[p:p + length]
            p += length + 1
            parts: list[str] = []
            while True:
                comma = text.find(",", p)
                if comma < 0:
                    parts.append(text[p:])
                    p = n
                    break
                if text[comma + 1:comma + 2] == ",":
                    parts.append(text[p:comma + 1])
                    p = comma + 2
                    continue
                parts.append(text[p:comma])
                p = comma
                break
            value = "".join(parts)
        if p < n and text[p] == ",":
            p += 1
        pairs.append((name, value))
    return pairs


class QemuOpts:
    """Options checked against a table of types, in the order given; lookups see the last value
    given for a name (QemuOpts' qemu_opt_get*). `id` is accepted and ignored, as QEMU does."""

    def __init__(self, table: Mapping[str, OptType]) -> None:
        self._table = table
        self._values: dict[str, OptValue] = {}

    def parse(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Check and store each (name, text) pair, stopping at the first QEMU refuses (OptionError)."""
        for name, text in pairs:
            if name == "id":
                continue
            kind = self._table.get(name)
            if kind is None:
                raise OptionError(f"Invalid parameter '{name}'")
            value: OptValue
            if kind is OptType.BOOL:
                value = parse_bool(name, text)
            elif kind is OptType.NUMBER:
                value = parse_number(name, text)
            elif kind is OptType.SIZE:
                value = parse_size(name, text)
            else:
                value = text
            self._values.pop(name, None)
            self._values[name] = value

    def set(self, name: str, value: OptValue) -> None:
        """Set an option directly (qemu_opt_set_number and friends): it overrides what was given."""
        self._values[name] = value

    def string(self, name: str) -> str | None:
        """The option's text, or None when it was not given."""
        value = self._values.get(name)
        return value if isinstance(value, str) else None

    def boolean(self, name: str, default: bool) -> bool:
        value = self._values.get(name, default)
        assert isinstance(value, bool)
        return value

    def number(self, name: str, default: int) -> int:
        value = self._values.get(name, default)
        assert isinstance(value, int) and not isinstance(value, bool)
        return value

    def given(self, name: str) -> bool:
        return name in self._values


__all__ = ["OptionError", "SizeSuffixWarning", "OptType", "QemuOpts", "strtosz", "strtou64", "parse_bool",
           "parse_size", "parse_number", "valid_option_list", "split_option_list", "UINT64_MAX", "INT64_MAX"]
