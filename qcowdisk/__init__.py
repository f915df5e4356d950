"""qcowdisk: a pure-Python engine that reads and writes QEMU qcow2 disk images.

Layout (each layer imports only from the ones before it):

- `errors`: the error hierarchy, one root `QcowError`.
- `hostio`: positional host I/O, fsync, punch: the seam for fault injection and crash tests.
- `locking`: QEMU's OFD lock bytes, with a lock-file fallback.
- `image`: the `Image` protocol every format implements, and the `Extent` record.
- `formats`: probing, backing-name resolution, the registry every format joins, chain opening.
- `compress`: compressed-cluster codecs.
- the formats: `qcow2` (a package, see its docstring), `qcow1` (legacy, read-only), `raw`.
- `blockstatus`: format-independent block status over a backing chain (`qemu-img map`).
- `cli`: the `qcowdisk` command.
- `pytest_plugin`: the `qcow_image` and `assert_image_sound` fixtures (pytest loads it through
  the package's `pytest11` entry point; it needs pytest, nothing imports it otherwise).
"""

from __future__ import annotations

from .errors import (
    AmendError,
    BackingChainError,
    BitmapError,
    CorruptImageError,
    ImageFailedError,
    ImageLockedError,
    InvalidImageError,
    QcowError,
    ReadOnlyError,
    RefcountOverflowError,
    ResizeError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsafeFileError,
    UnsupportedFeatureError,
)

TYPE_CHECKING = False  # (not typing's: importing typing is a tenth of a short command's start-up)
if TYPE_CHECKING:  # imported on first use (see __getattr__): a command needs a few of them only
    from typing import Any

    from .image import Extent, Image
    from .ops.commit import commit  # qemu-img's operations over any image
    from .ops.compare import compare
    from .ops.convert import convert
    from .ops.measure import measure
    from .ops.rebase import rebase
    from .qcow2.bitmaps import NewBitmap
    from .qcow2.file import QcowFile
    from .qcow2.format import Bitmap, Snapshot
    from .stream import QcowIO, open  # qcowdisk.open, as gzip.open and tarfile.open

# public name -> the module defining it, imported when the name is first looked up
_LAZY = {"Extent": "image", "Image": "image", "commit": "ops.commit", "compare": "ops.compare",
         "convert": "ops.convert", "measure": "ops.measure", "rebase": "ops.rebase", "QcowFile": "qcow2.file",
         "Snapshot": "qcow2.format", "Bitmap": "qcow2.format", "NewBitmap": "qcow2.bitmaps",
         "QcowIO": "stream", "open": "stream"}

__all__ = ["QcowError", "InvalidImageError", "CorruptImageError", "UnsupportedFeatureError", "UnsafeFileError",
           "BackingChainError", "ImageLockedError", "ReadOnlyError", "RefcountOverflowError", "ImageFailedError",
           "SnapshotNotFoundError", "SnapshotExistsError", "ResizeError", "AmendError", "BitmapError",
           "Snapshot", "Bitmap", "NewBitmap", "QcowFile", "Extent", "Image", "QcowIO", "open", "compare", "measure",
           "commit", "rebase", "convert"]


def __getattr__(name: str) -> Any:
    """The public names beyond the errors, imported on first use: `import qcowdisk` (and the
    command line, which needs one operation) does not pay for the whole engine. Each is then
    kept in the module, so the lookup runs once. `qcowdisk.__version__` too: importlib.metadata
    costs more at every start than the rest of the package's imports together."""
    if name == "__version__":
        from ._version import __version__
        return __version__
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qcowdisk' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
