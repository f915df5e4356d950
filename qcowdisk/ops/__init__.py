"""Operations over the `Image` protocol, with progress: what `qemu-img` does with whole images.

Each operation opens (or takes) images of any format through `qcowdisk.formats`, works on them
through the `Image` protocol only (block status first, then bounded reads), and reproduces the
answer `qemu-img` (QEMU 7.2) gives for the same inputs; the command line prints it.

- `compare`: `qemu-img compare` (identical? where do they first differ, and why).
- `convert`: `qemu-img convert` (a guest disk copied into a new qcow2 or raw image).
- `measure`: `qemu-img measure` (the file size a new image needs, for a size or a source image).
- `commit`: `qemu-img commit` (copy an overlay into its backing file, then empty it).
- `rebase`: `qemu-img rebase` (change the backing file, safe or unsafe).
- `qemuopts`: QEMU's option syntax (`-o name=value,...`, sizes with suffixes) and its messages.

Long operations take `progress(done_bytes, total_bytes)`, called as they go with values that
never decrease; an exception raised by it stops the operation and propagates, with every image
the operation opened closed again.
"""

from __future__ import annotations

import sys
import types

TYPE_CHECKING = False
if TYPE_CHECKING:  # imported on first use (see __getattr__): a command needs one operation
    from .commit import CommitError, commit
    from .compare import CompareError, CompareResult, compare
    from .convert import ConvertError, convert
    from .measure import MeasureResult, measure
    from .rebase import RebaseError, rebase

# public name -> the module of this package defining it
_LAZY = {"convert": "convert", "ConvertError": "convert", "compare": "compare", "CompareResult": "compare",
         "CompareError": "compare", "measure": "measure", "MeasureResult": "measure", "commit": "commit",
         "CommitError": "commit", "rebase": "rebase", "RebaseError": "rebase"}

__all__ = ["convert", "ConvertError", "compare", "CompareResult", "CompareError", "measure", "MeasureResult",
           "commit", "CommitError", "rebase", "RebaseError"]


def __getattr__(name: str) -> object:
    """The operations, imported on first use: importing one of them (or `qemuopts`, which every
    command line parses with) does not import the others."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """This package's module type: five operations share their module's name (`compare` is both
    qcowdisk.ops.compare and the function in it), and importing a submodule sets the package's
    attribute of that name to the module. Binding the function instead keeps `ops.compare` the
    function, whatever was imported first, as when this package imported every operation."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
