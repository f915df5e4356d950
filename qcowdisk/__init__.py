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

from . import qcow1, raw  # noqa: F401  (importing a format registers it)
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
from .image import Extent, Image
from .ops import commit, compare, convert, measure, rebase  # qemu-img's operations over any image
from .qcow2.bitmaps import NewBitmap
from .qcow2.file import QcowFile
from .qcow2.format import Bitmap, Snapshot
from .stream import QcowIO, open  # qcowdisk.open, as gzip.open and tarfile.open

__all__ = ["QcowError", "InvalidImageError", "CorruptImageError", "UnsupportedFeatureError", "UnsafeFileError",
           "BackingChainError", "ImageLockedError", "ReadOnlyError", "RefcountOverflowError", "ImageFailedError",
           "SnapshotNotFoundError", "SnapshotExistsError", "ResizeError", "AmendError", "BitmapError",
           "Snapshot", "Bitmap", "NewBitmap", "QcowFile", "Extent", "Image", "QcowIO", "open", "compare", "measure",
           "commit", "rebase", "convert"]


def __getattr__(name: str) -> str:
    """`qcowdisk.__version__`, looked up on first use: importlib.metadata costs more at every
    start than the rest of the package's imports together."""
    if name == "__version__":
        from ._version import __version__
        return __version__
    raise AttributeError(f"module 'qcowdisk' has no attribute {name!r}")
