"""The installed distribution's version, `qcowdisk.__version__` (and `qcowdisk --version`)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("qcowdisk")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
