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

from .commit import CommitError, commit
from .compare import CompareError, CompareResult, compare
from .convert import ConvertError, convert
from .measure import MeasureResult, measure
from .rebase import RebaseError, rebase

__all__ = ["convert", "ConvertError", "compare", "CompareResult", "CompareError", "measure", "MeasureResult",
           "commit", "CommitError", "rebase", "RebaseError"]
