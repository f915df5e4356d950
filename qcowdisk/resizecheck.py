"""The refusals `qemu-img resize` makes itself, before any format driver sees the new size.

qemu-img (7.2's img_resize) checks, in this order: the preallocation mode while parsing its
options, then a new size that is not positive, preallocation without growth, and a shrink
without --shrink. Each format then refuses what its driver refuses (qcow2: qcowdisk.qcow2.resize;
raw: qcowdisk.ops.rawresize; qcow v1 cannot be resized at all).
"""

from __future__ import annotations

from .errors import ResizeError

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")  # QEMU's PreallocMode names
SHRINK_REFUSED = "Use the --shrink option to perform a shrink operation."  # qemu-img's words


def check_new_size(current: int, new_size: int, *, shrink: bool, preallocation: str = "off") -> None:
    """Raise ResizeError with qemu-img's message, in its order, for what it refuses whatever the
    format: an unknown preallocation mode, a size that is not positive, preallocation without
    growth, a shrink not asked for (`shrink`)."""
    if preallocation not in PREALLOCATION_MODES:
        raise ResizeError(f"Invalid preallocation mode '{preallocation}'")
    if new_size <= 0:
        raise ResizeError("New image size must be positive")
    if new_size <= current and preallocation != "off":
        raise ResizeError("Preallocation can only be used for growing images")
    if new_size < current and not shrink:
        raise ResizeError(SHRINK_REFUSED)


__all__ = ["PREALLOCATION_MODES", "SHRINK_REFUSED", "check_new_size"]
