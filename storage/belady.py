"""Belady's MIN within a lookahead window of already-sampled batches (Ginex's superbatch cache).

    policy = BeladyPolicy(capacity=50_000, num_rows=store.num_rows, future=batches)   # batches: id arrays
    hit, slots = policy.lookup(ids)      # consumes one future batch (the cursor moves to the batch read)
    adm = policy.admit(unique_miss_ids)  # keeps the ids used soonest; as every policy in cache_policy.py

``Lookahead`` answers "when is this id next used?" for the batches ahead; the host cache (cache.py) also asks it
which evicted rows a victim buffer should keep.
"""

from __future__ import annotations

import numpy as np
from plait.storage.cache_policy import Admission, SlotTable

NEVER = np.iinfo(np.int64).max  # next-use distance of an id not used again within the lookahead window


class Lookahead:
    """The future access sequence (batches of ids already sampled) and a cursor on it: when is an id next used?

    `advance(ids)` moves the cursor to the batch being read: the next batch if it holds all `ids`, else the
    first later batch holding them (a tier that saw no misses for a while skips batches); ids in no batch
    ahead raise. `next_use(ids)` gives, per id, how many batches after the current one it is next asked
    for, or NEVER if not within `window` batches. Both are O(len(ids)): `next_of[id]`, the first batch after
    the cursor holding id, is kept up to date as the cursor moves."""

    def __init__(self, batches, window: int | None = None):
        batches = [np.asarray(b, dtype=np.int64).ravel() for b in batches]
        self.num_batches = len(batches)
        self.window = self.num_batches if window is None else int(window)
        if self.window < 1:
            raise ValueError(f"Lookahead: window must be >= 1 batch, got {window}")
        stride = self.num_batches + 1
        sizes = [b.size for b in batches]
        flat = np.concatenate(batches or [np.zeros(0, dtype=np.int64)])
        keys = np.unique(flat * stride + np.repeat(np.arange(len(sizes)), sizes))
        ids, which = keys // stride, keys % stride  # distinct (id, batch), by id then batch
        later = np.full(keys.size, NEVER, dtype=np.int64)  # the id's next batch after this one
        same = ids[1:] == ids[:-1]
        later[:-1][same] = which[1:][same]
        order = np.argsort(which, kind="stable")  # grouped by batch, ids ascending within a batch
        self._ids, self._later = ids[order], later[order]
        self._start = np.searchsorted(which[order], np.arange(self.num_batches + 1))
        self.next_of = np.full(int(ids.max()) + 1 if ids.size else 0, NEVER, dtype=np.int64)
        first = np.ones(ids.size, dtype=bool)
        first[1:] = ~same
        self.next_of[ids[first]] = which[first]
        self.cursor = -1  # no batch read yet

    def _next(self, ids) -> np.ndarray:
        if not self.next_of.size:
            return np.full(ids.size, NEVER, dtype=np.int64)
        return np.where(ids < self.next_of.size, self.next_of[np.minimum(ids, self.next_of.size - 1)], NEVER)

    def _in_batch(self, ids, b: int) -> np.ndarray:
        seg = self._ids[self._start[b] : self._start[b + 1]]
        pos = np.minimum(np.searchsorted(seg, ids), max(seg.size - 1, 0))
        return seg[pos] == ids if seg.size else np.zeros(ids.size, dtype=bool)

    def advance(self, ids) -> int:
        ids = np.asarray(ids, dtype=np.int64)
        b = self.cursor + 1
        if ids.size and not (self._next(ids) == b).all():  # not the next batch: the first later one holding ids
            later = (t for t in range(b, self.num_batches) if self._in_batch(ids[:1], t)[0])
            b = next((t for t in later if self._in_batch(ids, t).all()), None)
            if b is None:
                nxt = self.cursor + 1
                missing = ids[~self._in_batch(ids, nxt)][0] if nxt < self.num_batches else ids[0]
                raise ValueError(
                    f"Lookahead: the rows read are in no single future batch after batch {self.cursor} of "
                    f"{self.num_batches} (row id {int(missing)} is not in the next); call set_future with the "
                    "batches in order, one read per batch, and again for the next superbatch"
                )
        for t in range(self.cursor + 1, min(b, self.num_batches - 1) + 1):  # batches read or skipped
            s, e = self._start[t], self._start[t + 1]
            self.next_of[self._ids[s:e]] = self._later[s:e]
        self.cursor = b
        return b

    def next_use(self, ids) -> np.ndarray:
        nxt = self._next(np.asarray(ids, dtype=np.int64))
        dist = np.where(nxt == NEVER, NEVER, nxt - self.cursor)
        return np.where(dist > self.window, NEVER, dist)


class BeladyPolicy(SlotTable):
    """Belady's MIN within a lookahead window: when full, keep the `capacity` ids (residents and this batch's
    misses together) used soonest after the current batch; ids not used again in the window go first, a
    miss is not admitted when every resident is needed sooner. Ties keep residents.

    `set_future(batches, window=None)`: the batches about to be read, in order; each `lookup` consumes one.
    Without a future every id counts as never used again: the cache fills, then keeps what it has."""

    def __init__(self, capacity: int, num_rows: int, future=None, window: int | None = None):
        super().__init__(capacity, num_rows)
        self.lookahead: Lookahead | None = None
        if future is not None:
            self.set_future(future, window)

    def set_future(self, batches, window: int | None = None) -> Lookahead:
        self.lookahead = Lookahead(batches, window)
        return self.lookahead

    def _touch(self, ids, slots, hit) -> None:
        if self.lookahead is not None:
            self.lookahead.advance(ids)

    def _next_use(self, ids) -> np.ndarray:
        if self.lookahead is None:
            return np.full(np.asarray(ids).size, NEVER, dtype=np.int64)
        return self.lookahead.next_use(ids)

    def admit(self, ids) -> Admission:
        ids = self._check_candidates(ids)
        if ids.size <= self.capacity - self.size:
            return self._keep_lowest(ids, None, None)
        return self._keep_lowest(ids, self._next_use(self.id_of[: self.size]), self._next_use(ids))
