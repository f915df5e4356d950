"""The qcow2 format driver.

Layers, each importing only from those above it in this list:

- `format`: the header, its extensions, the snapshot table: bytes <-> values, no I/O.
- `entries`: every bit of a table entry (masks, compressed descriptors, subcluster bitmaps) and
  the table codec.
- `cache`, `l1`: the L2/refcount-block caches and the active L1 table, with declared write-back
  dependencies; `state`: `Qcow2State`, every field of an open image declared in one place.
- `refcount`: counts, allocation, table growth, the deferred-free queue.
- `ordering`: the crash-ordering edges, the header switch, the flush pipeline.
- `overlap`, `mapping`, `reading`, `writing`, `check`, `repair`, `create`, `resize`: functions over
  the state (`repair` reuses `check`'s reference walker).
- `file`: `QcowFile`, the public object: opening, the lock, the failed state, closing.
"""
