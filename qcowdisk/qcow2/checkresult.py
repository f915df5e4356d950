"""What a check reports and how it fails: QEMU's BdrvCheckResult (`CheckTally`, while checking),
the ImageCheck object qemu-img prints (`CheckResult`, its JSON and human text), the repair modes,
and `CheckRun`, what one run of the check carries from step to step (check.py drives the steps).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import QcowError
from ..record import FrozenRecord
from .state import Qcow2State

FIX_LEAKS = 1   # BDRV_FIX_LEAKS
FIX_ERRORS = 2  # BDRV_FIX_ERRORS
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Literal

    Repair = Literal["leaks", "all"] | None
REPAIR_MODES: dict[Repair, int] = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}
Report = Callable[[str], None]


class CheckFailedError(QcowError):
    """The check could not complete (QEMU: `Check failed: <strerror>`); `strerror` says why."""

    def __init__(self, strerror: str) -> None:
        super().__init__(f"Check failed: {strerror}")
        self.strerror = strerror


class CheckResult(FrozenRecord):
    """What `qemu-img check --output=json` reports, field for field (QAPI ImageCheck).

    `corruptions_fixed` and `leaks_fixed` are what a repair fixed; the other counts describe the
    image after it (qemu-img checks a repaired image again and reports that second check).
    """

    __slots__ = ("allocated_clusters", "check_errors", "compressed_clusters", "corruptions", "corruptions_fixed",
                 "filename", "format", "fragmented_clusters", "image_end_offset", "leaks", "leaks_fixed",
                 "total_clusters")
    check_errors: int
    corruptions: int
    leaks: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int
    filename: str
    format: str

    def __init__(self, check_errors: int, corruptions: int, leaks: int, corruptions_fixed: int, leaks_fixed: int,
                 image_end_offset: int, total_clusters: int, allocated_clusters: int, fragmented_clusters: int,
                 compressed_clusters: int, filename: str, format: str = "qcow2") -> None:
        object.__setattr__(self, "check_errors", check_errors)
        object.__setattr__(self, "corruptions", corruptions)
        object.__setattr__(self, "leaks", leaks)
        object.__setattr__(self, "corruptions_fixed", corruptions_fixed)
        object.__setattr__(self, "leaks_fixed", leaks_fixed)
        object.__setattr__(self, "image_end_offset", image_end_offset)
        object.__setattr__(self, "total_clusters", total_clusters)
        object.__setattr__(self, "allocated_clusters", allocated_clusters)
        object.__setattr__(self, "fragmented_clusters", fragmented_clusters)
        object.__setattr__(self, "compressed_clusters", compressed_clusters)
        object.__setattr__(self, "filename", filename)
        object.__setattr__(self, "format", format)

    @property
    def exit_status(self) -> int:
        """qemu-img check's exit status: 1 internal errors, 2 corruptions, 3 leaks, else 0."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        return 3 if self.leaks else 0

    def qapi(self) -> dict[str, int | str]:
        """The ImageCheck object as QEMU serialises it: optional members only when nonzero, in
        the order QEMU's QDict iterates them (its hash buckets; see `_QDICT_ORDER`)."""
        values: dict[str, int | str] = {
            "filename": self.filename, "format": self.format, "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset, "corruptions": self.corruptions, "leaks": self.leaks,
            "corruptions-fixed": self.corruptions_fixed, "leaks-fixed": self.leaks_fixed,
            "total-clusters": self.total_clusters, "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters, "compressed-clusters": self.compressed_clusters}
        always = ("filename", "format", "check-errors")
        return {k: values[k] for k in _QDICT_ORDER if k in always or values[k]}

    def to_json(self) -> str:
        """`qemu-img check --output=json`'s text (without the final newline)."""
        items = [f"    {_qjson_string(k)}: {_qjson_string(v) if isinstance(v, str) else v}"
                 for k, v in self.qapi().items()]
        return "{\n" + ",\n".join(items) + "\n}"

    def to_human(self) -> str:
        """`qemu-img check`'s human-readable summary (dump_human_image_check), lines ending in newlines."""
        out = []
        if not (self.corruptions or self.leaks or self.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            if self.corruptions:
                out.append(f"\n{self.corruptions} errors were found on the image.\n"
                           "Data may be corrupted, or further writes to the image may corrupt it.\n")
            if self.leaks:
                out.append(f"\n{self.leaks} leaked clusters were found on the image.\n"
                           "This means waste of disk space, but no harm to data.\n")
            if self.check_errors:
                out.append(f"\n{self.check_errors} internal errors have occurred during the check.\n")
        if self.total_clusters and self.allocated_clusters:
            out.append("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n" % (
                self.allocated_clusters, self.total_clusters, self.allocated_clusters * 100.0 / self.total_clusters,
                self.fragmented_clusters * 100.0 / self.allocated_clusters,
                self.compressed_clusters * 100.0 / self.allocated_clusters))
        if self.image_end_offset:
            out.append(f"Image end offset: {self.image_end_offset}\n")
        return "".join(out)

    def repaired_banner(self) -> str:
        """What qemu-img prints (human output) before checking a repaired image again."""
        return ("The following inconsistencies were found and repaired:\n\n"
                f"    {self.leaks_fixed} leaked clusters\n    {self.corruptions_fixed} corruptions\n\n"
                "Double checking the fixed image now...\n")


# QEMU 7.2 prints a QDict in bucket order: tdb_hash(key) % 512 (qobject/qdict.c); no two of
# these keys share a bucket, so this order is fixed.
def _tdb_hash(name: str) -> int:
    data = name.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, ch in enumerate(data):
        value = (value + (ch << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


_QDICT_ORDER = sorted(("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
                       "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
                       "fragmented-clusters", "compressed-clusters"), key=lambda k: _tdb_hash(k) % 512)


def _qjson_string(text: str) -> str:
    """A JSON string as QEMU's qjson writes it: ASCII printable as is, the rest as \\uXXXX (upper case)."""
    out = ['"']
    for ch in os.fsencode(text).decode("utf-8", "replace"):
        cp = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            out.append("\\u%04X\\u%04X" % (0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def hx(value: int) -> str:
    """C's %#x: 0x-prefixed, but a bare 0."""
    return f"{value:#x}" if value else "0"


class CheckTally:
    """QEMU's BdrvCheckResult (mutable while checking)."""

    __slots__ = ("allocated_clusters", "check_errors", "compressed_clusters", "corruptions", "corruptions_fixed",
                 "fragmented_clusters", "image_end_offset", "leaks", "leaks_fixed", "total_clusters")

    def __init__(self) -> None:
        self.corruptions = self.leaks = self.check_errors = 0
        self.corruptions_fixed = self.leaks_fixed = 0
        self.image_end_offset = 0
        self.total_clusters = self.allocated_clusters = self.fragmented_clusters = self.compressed_clusters = 0

    def copy(self) -> CheckTally:
        """An independent copy of the counts."""
        r = CheckTally()
        for name in self.__slots__:
            setattr(r, name, getattr(self, name))
        return r

    def result(self, filename: str) -> CheckResult:
        """The frozen ImageCheck for `filename`."""
        return CheckResult(self.check_errors, self.corruptions, self.leaks, self.corruptions_fixed, self.leaks_fixed,
                           self.image_end_offset, self.total_clusters, self.allocated_clusters,
                           self.fragmented_clusters, self.compressed_clusters, filename)


def add_counts(res: CheckTally, other: CheckTally) -> None:
    """qcow2_add_check_result without the figures: add `other`'s problem counts to `res`."""
    for name in ("corruptions", "leaks", "check_errors", "corruptions_fixed", "leaks_fixed"):
        setattr(res, name, getattr(res, name) + getattr(other, name))


class StepFailed(Exception):
    """A check step failed as QEMU's returns -errno: the check stops (`Check failed: ...`)."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.err = err


def no_report(line: str) -> None:
    """A `Report` that drops every line."""


Progress = Callable[[int, int], None]


class CheckProgress:
    """The check's steps for `progress(done, total)`: one per L1 entry walked (active and
    snapshot tables), per refcount block compared, per active L1 entry whose flags are checked.
    A step done again (the walk redone entry by entry, or after a rebuild) adds to the total."""

    def __init__(self, callback: Progress) -> None:
        self.callback = callback
        self.done = self.total = 0

    def expect(self, steps: int) -> None:
        """`steps` more to do (said before they are done)."""
        self.total += steps
        self.callback(self.done, self.total)

    def advance(self, steps: int) -> None:
        """`steps` done. Whatever the callback raises stops the check there."""
        if steps:
            self.done = min(self.total, self.done + steps)
            self.callback(self.done, self.total)


class CheckRun:
    """One run of qcow2_co_check_locked over an open image: what its steps share."""

    def __init__(self, s: Qcow2State, fix: int, report: Report, progress: CheckProgress | None = None) -> None:
        self.s = s
        self.fix = fix
        self.report = report
        self.progress = progress
        self.cs = s.cluster_size
        self.cb = s.cluster_bits
        # OFLAG_COPIED flags cleared ahead of a refcount increase (see `refrepair.preclear_copied`),
        # with the entries as they were: check_oflag_copied judges those, as QEMU's would.
        self.precleared_l1: dict[int, int] = {}
        self.precleared_l2: dict[tuple[int, int], int] = {}
        # what the last reference walk found of the active L2 tables (RefcountWalk.contiguous_l2)
        self.contiguous_l2: dict[int, int] = {}

    def expect(self, steps: int) -> None:
        """Progress: `steps` more to do."""
        if self.progress is not None:
            self.progress.expect(steps)

    def advance(self, steps: int) -> None:
        """Progress: `steps` done (the callback may raise: call only between ordered steps)."""
        if self.progress is not None:
            self.progress.advance(steps)


def __getattr__(name: str) -> object:
    """`Repair` (the repair modes' type) on first use: it needs `typing`, which checking an
    image does not import otherwise (start-up time)."""
    if name == "Repair":
        from typing import Literal
        return Literal["leaks", "all"] | None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
