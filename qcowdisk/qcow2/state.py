"""The state of one open qcow2 image, every field declared here (QEMU's BDRVQcow2State).

The modules of this package are functions over a `Qcow2State`: mapping.py and reading.py read
it, writing.py, refcount.py and ordering.py change it, file.py owns it and takes its lock. A
field's comment says what it means and who may change it; nothing adds fields elsewhere.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict

from ..errors import InvalidImageError
from ..hostio import HostFactory, HostFile
from .cache import TableCache
from .cachesize import l2_cache_geometry, whole_disk_l2_bytes
from .entries import CompressedDescriptor, TableCodec
from .format import INCOMPAT_DIRTY, Header, Snapshot
from .l1 import L1Table

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..image import Image
    from .refcount import Refcounts

DEFAULT_REFBLOCK_CACHE_BYTES = 4 << 20
COMPRESSED_CACHE_CLUSTERS = 16


class Qcow2State:
    """Everything an open qcow2 image knows. The caller of every function over it holds `lock`."""

    def __init__(self, filename: str, readonly: bool, host: HostFile, host_factory: HostFactory,
                 header: Header, file_length: int, l1_entries: array[int], *,
                 l2_cache_size: int | None = None, l2_cache_entry_size: int | None = None,
                 cache_size: int | None = None, refcount_cache_size: int | None = None) -> None:
        """State for `host` with a validated `header` and the decoded active L1 table; the L2
        cache sized by QEMU's options (see cachesize.py; ValueError for a refused value)."""
        # --- identity and host files -----------------------------------------------------
        self.filename = filename            # the path the image was opened by
        self.readonly = readonly
        self.host = host                    # the image file (metadata, and data without a data file)
        self.host_factory = host_factory    # opens every other file (data file, backing files)
        self.data_host = host               # where guest data lives: the image or its external data file
        self.lock = threading.RLock()       # public methods of QcowFile take it; nothing else does

        # --- header and geometry (constant while open, except header fields switched by ordering.py)
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.cluster_mask = header.cluster_size - 1
        self.l2_entries = header.l2_entries                 # entries (not u64 words) per L2 table
        self.l2_span = header.cluster_size * header.l2_entries  # guest bytes one L2 table maps
        self.extended_l2 = header.extended_l2
        self.subcluster_bits = header.cluster_bits - 5 if header.extended_l2 else header.cluster_bits
        self.has_data_file = header.has_data_file
        self.v2 = header.version < 3                        # no zero flag in version 2
        self.virtual_size = header.size
        self.descriptor = CompressedDescriptor(header.cluster_bits)

        # --- limits every table entry is checked against ---------------------------------
        self.alloc_limit = file_length      # host bytes of the image file that entries may name
        self.data_file_limit = 0            # the same for the external data file

        # --- tables ------------------------------------------------------------------------
        self.l1 = L1Table(host, header.l1_table_offset, l1_entries)
        cache_entries, entry_size = l2_cache_geometry(header.size, header.cluster_size, header.extended_l2,
                                                      l2_cache_size, l2_cache_entry_size, cache_size=cache_size,
                                                      refcount_cache_size=refcount_cache_size)
        # Whole tables (writes, check, amend, snapshots all work on whole tables): as many as
        # the cache size holds.
        self.l2_cache = TableCache(host, TableCodec(64, header.cluster_size),
                                   cache_entries * entry_size // header.cluster_size)
        # Slices of L2 tables for the read path of read-only opens (None: whole tables).
        # `l2_slice_entries` counts L2 entries (an extended entry is two u64 words).
        self.l2_slices: TableCache | None = None
        self.l2_slice_entries = header.l2_entries
        if readonly and entry_size < header.cluster_size:
            self.l2_slices = TableCache(host, TableCodec(64, entry_size), cache_entries)
            self.l2_slice_entries = entry_size // (16 if header.extended_l2 else 8)
        # Recent misses of a read-only cache too small for the disk: admission on a second miss
        # (see cachesize.py); None when every table is cached on its first miss.
        self.l2_recent: dict[int, None] | None = None
        if readonly and cache_entries * entry_size < whole_disk_l2_bytes(header.size, header.cluster_size,
                                                                          header.extended_l2):
            self.l2_recent = {}
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_length = 0      # bytes of the snapshot table (0 without snapshots)
        self.snapshot_error: InvalidImageError | None = None  # a broken table (read-only opens only)
        self.compressed_cache: OrderedDict[int, bytes] = OrderedDict()  # descriptor -> cluster
        self.metadata_preallocated: bool | None = None  # block status: detected once per query
        # Raised (under the lock) before anything that could make a host range some mapping
        # named read other bytes: a free, punch, truncate, table switch, close. Reads do their
        # host I/O outside the lock and are redone when it moved meanwhile (reading.ReadPlan).
        self.remap_epoch = 0

        # --- writing (read-write opens only) -------------------------------------------------
        self.refcounts: Refcounts | None = None   # counts, allocation, deferred frees
        self.metadata: set[int] = set()           # host clusters holding metadata (overlap check)
        # External data file runs [start, end) that discards unmapped in tables not yet durable:
        # punched once the tables are (ordering.punch_discarded_data), as QEMU discards them.
        self.data_punches: list[list[int]] = []

        # --- backing chain -------------------------------------------------------------------
        self.backing: Image | None = None

        # --- health --------------------------------------------------------------------------
        self.corrupt = False                # an inconsistency was found: writes refused
        self.signaled_corruption = False    # check.py printed QEMU's one corruption notice
        self.failure: BaseException | None = None  # first failed host write/fsync: writes refused
        self.closed = False
        self.inherited = False              # this process is a fork() child of the opener

    @property
    def lazy(self) -> bool:
        """Whether refcount updates may be deferred: the dirty bit is set (lazy refcounts)."""
        return bool(self.header.incompatible_features & INCOMPAT_DIRTY)

    def data_limit(self) -> int:
        """Host bytes a data cluster may lie below: the image file, or the external data file."""
        return self.data_file_limit if self.has_data_file else self.alloc_limit

    def grow_alloc_limit(self, end: int) -> None:
        """The image file now reaches `end` (a new cluster was allocated there)."""
        if end > self.alloc_limit:
            self.alloc_limit = end
