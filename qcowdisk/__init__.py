"""qcowdisk: a pure-Python engine that reads and writes QEMU qcow2 disk images."""

from .errors import (BackingChainError, CorruptImageError, ImageLockedError, InvalidImageError,
                     QcowError, ReadOnlyError, RefcountOverflowError, UnsupportedFeatureError)
from .format import Snapshot
from .image import Extent

__all__ = ["QcowError", "InvalidImageError", "CorruptImageError", "UnsupportedFeatureError",
           "BackingChainError", "ImageLockedError", "ReadOnlyError", "RefcountOverflowError",
           "Snapshot", "Extent", "QcowFile"]

from .qcowfile import QcowFile  # noqa: E402
