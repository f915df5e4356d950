"""The error hierarchy: one root, subclasses by what the caller can do about it."""

from __future__ import annotations


class QcowError(Exception):
    """Root of every error qcowdisk raises on account of an image."""


class InvalidImageError(QcowError):
    """The file is not a valid image of the format it claims (bad header, bad field)."""


class CorruptImageError(InvalidImageError):
    """The image's metadata is inconsistent (bad table entry, overlapping metadata, corrupt bit)."""


class UnsupportedFeatureError(QcowError):
    """The image is valid but uses a feature qcowdisk does not implement (encryption, unknown bits)."""


class BackingChainError(QcowError):
    """The backing chain cannot be followed: missing file, loop, too deep."""


class ImageLockedError(QcowError):
    """Another process (or another QcowFile) holds the image's write lock. `qemu_reason` is
    QEMU's words for the conflict (`Failed to get shared "write" lock`) and `path` the file
    locked, when known (the command line prints them as qemu-img does)."""

    qemu_reason: str
    """QEMU's words for the conflict, e.g. `Failed to get "write" lock` ("" when unknown)."""
    path: str
    """The file whose lock conflicts, as it was opened ("" when unknown)."""

    def __init__(self, message: str, qemu_reason: str = "", path: str = "") -> None:
        super().__init__(message)
        self.qemu_reason = qemu_reason
        self.path = path


class ReadOnlyError(QcowError):
    """A write was attempted on an image opened read-only (or only openable read-only)."""


class RefcountOverflowError(CorruptImageError):
    """A cluster's reference count would exceed what the refcount width can hold."""


class ImageFailedError(QcowError):
    """An earlier host write or fsync failed, so the image refuses writes and flushes.

    After such a failure the metadata in memory no longer matches the disk and the kernel may
    have dropped unsynced pages, so nothing written since the last successful flush can be
    promised. The failure that started it is `first_error` (also the exception's `__cause__`).
    """

    def __init__(self, message: str, first_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.first_error = first_error
        """The host error (usually an OSError) that put the image in this state."""


class UnsafeFileError(QcowError):
    """A file an image names (or the image itself) is refused: it is not a regular file or a
    block device (a FIFO, socket, directory or character device), or it lies outside the
    directory the caller confined the image to."""


class SnapshotNotFoundError(QcowError, LookupError):
    """No internal snapshot has the id or name asked for."""


class SnapshotExistsError(QcowError):
    """An internal snapshot with that name exists already (qemu-img would accept a duplicate;
    qcowdisk refuses one, so that a name always resolves to one snapshot)."""


class ResizeError(QcowError):
    """A resize refused before anything was written, for a reason `qemu-img resize` refuses it
    too; the message is qemu-img's ("Use the --shrink option to perform a shrink operation.")."""


class BitmapError(QcowError):
    """A persistent-bitmap operation refused before anything was written, for a reason QEMU
    refuses it too (a name in use, a granularity out of range, a version 2 image, an
    inconsistent bitmap); the message is QEMU's."""


class AmendError(QcowError):
    """An amendment refused before anything was written, for a reason `qemu-img amend` refuses it
    too; the message is qemu-img's and `hint` its follow-up text (or "")."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint
        """qemu-img amend's follow-up text after the message (or "")."""
