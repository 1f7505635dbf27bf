"""The row-store interface every feature source and cache shares (GraphBolt-style).

A store holds `num_rows` fixed-shape rows of one dtype. `read(ids)` returns them in the order asked
(duplicates allowed) as a fresh array of shape `(len(ids), *row_shape)`. Caches wrap a store and
expose the same interface, so tiers compose: ``DeviceCache(HostCache(DiskStore(path)))``.

Every store counts what it cost: `stats()` returns a dict with at least ``rows_read`` (rows asked
of this store) and, for stores that touch a disk, ``bytes_read`` (bytes asked of the disk, after
alignment and coalescing). Caches add ``hits``/``misses`` per tier.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class RowStore(Protocol):
    num_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, ids: np.ndarray) -> np.ndarray: ...

    def stats(self) -> dict[str, int]: ...


def check_ids(ids, num_rows: int, where: str) -> np.ndarray:
    """Return ids as a 1-D int64 array, or raise naming the first id out of range."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"{where}: row ids must be 1-D, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{where}: row ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{where}: row id {bad} out of range [0, {num_rows}); ids must index existing rows")
    return ids


class ArrayStore:
    """Rows held in memory (a numpy array): the in-RAM limit, and a test double that is real."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array)
        self.num_rows = int(self.array.shape[0])
        self.row_shape = tuple(self.array.shape[1:])
        self.dtype = self.array.dtype
        self.rows_read = 0

    def read(self, ids) -> np.ndarray:
        ids = check_ids(ids, self.num_rows, "ArrayStore.read")
        self.rows_read += int(ids.size)
        return self.array[ids]

    def stats(self) -> dict[str, int]:
        return {"rows_read": self.rows_read, "bytes_read": 0}


def read_async(store: RowStore, ids, pool: ThreadPoolExecutor) -> Future:
    """Start `store.read(ids)` on `pool`; the caller overlaps compute and takes `.result()` later."""
    return pool.submit(store.read, np.asarray(ids))
