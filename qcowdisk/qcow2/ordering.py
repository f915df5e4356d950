"""Crash ordering: the one place that says why each write waits for another and each fsync.

Every metadata change has one of three shapes (QEMU's crash-safe order):

1. Data and refcount increments before the L2 entry that points at them. Declared once at open:
   the L2 cache depends on the refcount cache (unless refcounts are lazy) and on guest data.
2. A new table written and synced before the pointer to it: L2 tables before L1 entries (the L1
   depends on the L2 cache); a new refcount block before its refcount-table entry and a new
   refcount table before the header switch (refcount.py); any header change through
   `switch_header`, which syncs what came before it and then writes the header and syncs (a
   header longer than a sector in steps that each end in one sector write: headerswitch.py).
3. A reference dropped on disk before the cluster is freed or reused: the refcount allocator's
   deferred frees depend on the L2 cache and the L1 table.

So an eviction, a flush or a later feature (snapshots, L1 growth, compressed writes) adds an
edge with `depend_on`, never an fsync at a call site. Everything here expects the caller to hold
the image lock.
"""

from __future__ import annotations

from .format import COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY, serialize_header
from .headerswitch import write_header
from .refcount import Refcounts
from .state import Qcow2State

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class GuestData:
    """Guest data written in place or to new clusters: durable once the data file is synced."""

    def __init__(self, state: Qcow2State) -> None:
        """Guest data of `state`'s image (in the image file or its external data file)."""
        self.state = state

    def make_durable(self) -> None:
        """Sync the file guest data lives in."""
        self.state.data_host.sync()


class RefcountsUnlessLazy:
    """The refcount cache as a dependency of L2 tables, except while refcounts are lazy."""

    def __init__(self, state: Qcow2State, refcounts: Refcounts) -> None:
        """The dependency for `state`'s L2 tables on `refcounts`."""
        self.state = state
        self.refcounts = refcounts

    def make_durable(self) -> None:
        """Write and sync dirty refcount blocks, unless the dirty bit defers them."""
        if not self.state.lazy:
            self.refcounts.make_durable()


def declare_write_order(state: Qcow2State, refcounts: Refcounts) -> None:
    """Declare the ordering edges of a read-write image (once, at open)."""
    state.l2_cache.depend_on(RefcountsUnlessLazy(state, refcounts))
    state.l2_cache.depend_on(GuestData(state))
    state.l1.depend_on(state.l2_cache)
    refcounts.frees_depend_on(state.l2_cache)
    refcounts.frees_depend_on(state.l1)


def switch_header(state: Qcow2State, **fields: Any) -> None:
    """Change header fields with one header write, after everything written before is durable.

    Whatever the new fields name (a new refcount table, L1 table, snapshot table) was written
    before this call; the sync here makes it durable before the header points at it, and the
    sync after makes the switch itself durable before anything relies on it (freeing the old).
    """
    state.host.sync()
    new_header = state.header.replace(**fields)
    # One sector write in the end, whatever the header's size (headerswitch: a torn write of a
    # header spanning several sectors could mix the old and the new one).
    write_header(state.host, state.cluster_size, state.header, new_header, serialize_header(new_header))
    state.host.sync()
    state.header = new_header


def mark_dirty_before_lazy_update(state: Qcow2State) -> None:
    """With lazy refcounts, set and sync the dirty bit before the first deferred refcount update."""
    h = state.header
    if h.compatible_features & COMPAT_LAZY_REFCOUNTS and not h.incompatible_features & INCOMPAT_DIRTY:
        switch_header(state, incompatible_features=h.incompatible_features | INCOMPAT_DIRTY)


def flush(state: Qcow2State, *, final: bool = False) -> None:
    """Make everything written so far durable, in the declared order.

    The L1 pulls in the L2 tables, which pull in refcount blocks and guest data; then the
    deferred frees (whose references are gone on disk now) are applied and their space handed
    back. Lazy refcounts stay in memory unless `final` (a clean close).
    """
    rc = state.refcounts
    assert rc is not None
    # L2 tables first (they pull in refcounts and data), then the L1 entries naming them: an
    # L1 with nothing to write then costs no sync of its own.
    state.l2_cache.make_durable()
    state.l1.make_durable()
    punch_discarded_data(state)
    state.data_host.sync()
    freed = rc.release_deferred()
    if freed:
        state.remap_epoch += 1  # the allocator may reuse them now: reads in flight start over
        hand_back(state, freed)
    if not state.lazy or final:
        rc.make_durable()
    state.host.sync()


# Dropped references wait in the allocator's deferred-free queue until a flush makes the tables
# that dropped them durable. Past this many queued frees (or this many bytes of clusters), a
# write or discard flushes by itself, so that rewriting clusters without ever calling flush()
# (compressed replacements, copy-on-write over shared clusters, discards) cannot grow the file,
# or the queue, without bound.
FREE_PILE_MIN = 64
FREE_PILE_BYTES = 64 << 20


def release_frees_if_piling(state: Qcow2State) -> None:
    """Free the dropped references once many are waiting (see FREE_PILE_*): the tables that
    dropped them are made durable first (`release_deferred` does it), the decremented counts
    are written later like any refcount change (lost, they would only leak)."""
    if len(state.data_punches) >= FREE_PILE_MIN or sum(b - a for a, b in state.data_punches) >= FREE_PILE_BYTES:
        punch_discarded_data(state)
    rc = state.refcounts
    if rc is not None and len(rc.deferred_frees) >= max(FREE_PILE_MIN, FREE_PILE_BYTES >> state.cluster_bits):
        freed = rc.release_deferred()
        if freed:
            state.remap_epoch += 1  # the allocator may reuse them now: reads in flight start over
            hand_back(state, freed)


def punch_discarded_data(state: Qcow2State) -> None:
    """Punch the external data file runs discards queued (state.data_punches), after the
    tables that unmapped them are durable: until then a crash must find the data still there."""
    if not state.data_punches:
        return
    state.l2_cache.make_durable()
    state.l1.make_durable()
    runs, state.data_punches = state.data_punches, []
    for start, end in runs:
        state.data_host.punch_hole(start, end - start)


def hand_back(state: Qcow2State, freed: list[int]) -> None:
    """Forget freed metadata clusters and punch the host space of freed clusters, as runs."""
    cbits = state.cluster_bits
    for c in freed:
        if c in state.metadata:
            state.metadata.discard(c)
            state.l2_cache.drop(c << cbits)
    i = 0
    while i < len(freed):
        j = i
        while j + 1 < len(freed) and freed[j + 1] == freed[j] + 1:
            j += 1
        state.host.punch_hole(freed[i] << cbits, (freed[j] - freed[i] + 1) << cbits)
        i = j + 1
