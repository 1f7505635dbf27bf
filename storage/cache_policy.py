"""Which row ids a fixed-size cache keeps: pure bookkeeping over slots, no rows (those live in `cache.py`).

    policy = SievePolicy(capacity=50_000, num_rows=store.num_rows)
    hit, slots = policy.lookup(ids)           # slots[i] = slot of ids[i], -1 on a miss; marks the accesses
    adm = policy.admit(unique_miss_ids)       # adm.slots: where each miss now lives (-1: not kept);
                                              # adm.evicted_ids / adm.evicted_slots: who had to leave

Policies: `StaticPolicy` (a fixed set, e.g. the top-k ids by access count or degree; never evicts),
`SievePolicy` (SIEVE, NSDI'24), `LRUPolicy`; `BeladyPolicy` (belady.py, built on `SlotTable` here) evicts the id
used farthest in the future within a lookahead window of already-sampled batches, as Ginex does over a
superbatch. `make_policy` (cache.py) picks one by name; this module imports no other policy module.

Batch semantics (every policy): `lookup` marks all of a batch's accesses first; `admit` then takes the
batch's distinct misses in first-access order. With one id per batch this is the textbook policy.
Evicted rows of resident ids are reported before any slot is reused, so a victim buffer can copy them.
Everything is vectorised over the batch (no Python loop per id); `id -> slot` is an array of `num_rows`
int32 (4 bytes per row id; LRU adds 8 for each id's last access).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Admission:
    slots: np.ndarray  # int64, one per admitted candidate, -1 where the id was not kept
    evicted_ids: np.ndarray  # int64 ids that were resident before the call and are not now
    evicted_slots: np.ndarray  # their slots (still holding their rows until the caller overwrites them)


def access_counts(batches, num_rows: int) -> np.ndarray:
    """How often each row id is asked for over `batches` (a list of id arrays): the static cache's score."""
    if not batches:
        return np.zeros(num_rows, dtype=np.int64)
    return np.bincount(np.concatenate([np.asarray(b, dtype=np.int64) for b in batches]), minlength=num_rows)


def top_k_ids(scores, k: int) -> np.ndarray:
    """The `k` ids with the largest scores, hottest first (ties: lower id first)."""
    scores = np.asarray(scores)
    k = max(0, min(int(k), scores.size))
    # A stable ascending sort of the reversed scores, reversed: descending, ties in ascending id order.
    rev = np.argsort(scores[::-1], kind="stable")[::-1][:k]
    return (scores.size - 1 - rev).astype(np.int64)


class SlotTable:
    """Shared bookkeeping: id -> slot (array over all row ids) and slot -> id."""

    def __init__(self, capacity: int, num_rows: int):
        if int(capacity) < 1:
            raise ValueError(f"{type(self).__name__}: capacity must be >= 1 row, got {capacity}")
        if int(num_rows) < 0 or int(num_rows) >= 2**62:
            raise ValueError(f"{type(self).__name__}: num_rows must be in [0, 2**62), got {num_rows}")
        self.capacity = int(capacity)
        self.num_rows = int(num_rows)
        self.slot_of = np.full(self.num_rows, -1, dtype=np.int32 if self.capacity < 2**31 else np.int64)
        self.id_of = np.full(self.capacity, -1, dtype=np.int64)
        self.size = 0  # slots [size, capacity) have never been used; no policy frees a slot without refilling it

    def __len__(self) -> int:
        return self.size

    def resident_ids(self) -> np.ndarray:
        ids = self.id_of[: self.size]
        return ids[ids >= 0]

    def lookup(self, ids) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        slots = self.slot_of[ids].astype(np.int64)
        hit = slots >= 0
        self._touch(ids, slots, hit)
        return hit, slots

    def _touch(self, ids, slots, hit) -> None:
        """Record the accesses of one batch (policy-specific)."""

    def _check_candidates(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (self.slot_of[ids] >= 0).any():
            bad = int(ids[self.slot_of[ids] >= 0][0])
            raise ValueError(f"{type(self).__name__}.admit: row id {bad} is already resident; admit only misses")
        return ids

    def _fill(self, ids) -> np.ndarray:
        """Place ids into never-used slots (caller checked they fit); returns their slots."""
        slots = np.arange(self.size, self.size + ids.size, dtype=np.int64)
        self.slot_of[ids] = slots
        self.id_of[slots] = ids
        self.size += ids.size
        return slots

    def _replace(self, slots, new_ids) -> None:
        """Put new_ids into occupied `slots`."""
        self.slot_of[self.id_of[slots]] = -1
        self.slot_of[new_ids] = slots
        self.id_of[slots] = new_ids

    def _keep_lowest(self, ids, resident_score, new_score) -> Admission:
        """Fill free slots; when there are too few, keep the `capacity` ids with the lowest scores among the
        residents and `ids` together (ties keep residents)."""
        slots = np.full(ids.size, -1, dtype=np.int64)
        free = self.capacity - self.size
        if ids.size <= free:
            slots[:] = self._fill(ids)
            return Admission(slots, _empty(), _empty())
        # Scores doubled, +1 for candidates, so residents win ties; then an O(n) partition.
        key = np.concatenate([np.minimum(resident_score, 2**61) * 2, np.minimum(new_score, 2**61) * 2 + 1])
        kept = np.zeros(key.size, dtype=bool)
        kept[np.argpartition(key, self.capacity - 1)[: self.capacity]] = True
        evicted_slots = np.flatnonzero(~kept[: self.size])
        evicted_ids = self.id_of[evicted_slots].copy()
        pos = np.flatnonzero(kept[self.size :])
        slots[pos[:free]] = self._fill(ids[pos[:free]])
        self._replace(evicted_slots, ids[pos[free:]])
        slots[pos[free:]] = evicted_slots
        return Admission(slots, evicted_ids, evicted_slots)


def _empty() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


class StaticPolicy(SlotTable):
    """A fixed set: the top-`capacity` ids by `scores` (access counts, degree), or, without scores, the first
    ids admitted. Never evicts; ids outside the set are always misses."""

    def __init__(self, capacity: int, num_rows: int, scores=None):
        super().__init__(capacity, num_rows)
        self.static_ids = None
        self._allowed = None
        if scores is not None:
            scores = np.asarray(scores)
            if scores.shape != (self.num_rows,):
                raise ValueError(f"StaticPolicy: scores must have shape ({self.num_rows},), got {scores.shape}")
            self.static_ids = top_k_ids(scores, self.capacity)
            self._allowed = np.zeros(self.num_rows, dtype=bool)
            self._allowed[self.static_ids] = True

    def admit(self, ids) -> Admission:
        ids = self._check_candidates(ids)
        slots = np.full(ids.size, -1, dtype=np.int64)
        ok = np.ones(ids.size, dtype=bool) if self._allowed is None else self._allowed[ids]
        pos = np.flatnonzero(ok)[: self.capacity - self.size]
        slots[pos] = self._fill(ids[pos])
        return Admission(slots, _empty(), _empty())


class _Batch:
    """One admit call of SievePolicy: where each miss landed, and who left."""

    def __init__(self, ids: np.ndarray, capacity: int):
        self.ids = ids
        self.out = np.full(ids.size, -1, dtype=np.int64)  # slot of each miss, -1 if not kept
        self.fresh = np.zeros(capacity, dtype=bool)  # slots holding one of this batch's ids
        self.pos = np.zeros(capacity, dtype=np.int64)  # ... and its position in `ids`
        self.gone_ids, self.gone_slots = [], []  # earlier residents evicted


class SievePolicy(SlotTable):
    """SIEVE (Zhang et al., NSDI'24): a FIFO queue with a visited bit per object and a hand that moves from
    the tail (oldest) toward the head, clearing visited bits and evicting the first unvisited object; it
    wraps from head to tail. New objects enter at the head; a hit only sets the visited bit.

    Batched, and exact: a batch's hits are marked first, then its misses go in one at a time as in SIEVE
    (one eviction, then one insert at the head). Each sweep of the hand is one vectorised step; when the hand
    passes the head it meets this batch's own inserts, as SIEVE would, and evicts those. The queue is an
    array of slots, oldest first; the hand is an index into it."""

    def __init__(self, capacity: int, num_rows: int):
        super().__init__(capacity, num_rows)
        self.visited = np.zeros(self.capacity, dtype=bool)
        self.queue = _empty()  # slots, tail (oldest) first
        self.hand = 0  # index in queue of the next object the hand examines

    def _touch(self, ids, slots, hit) -> None:
        self.visited[slots[hit]] = True

    def admit(self, ids) -> Admission:
        b = _Batch(self._check_candidates(ids), self.capacity)
        n_fill = min(self.capacity - self.size, b.ids.size)
        if n_fill:
            filled = self._fill(b.ids[:n_fill])
            self._mark(b, filled, np.arange(n_fill))
            self.queue = np.concatenate([self.queue, filled])
        nxt = n_fill
        while nxt < b.ids.size:
            nxt = self._sweep(b, nxt)
        if not b.gone_slots:
            return Admission(b.out, _empty(), _empty())
        return Admission(b.out, np.concatenate(b.gone_ids), np.concatenate(b.gone_slots))

    def _mark(self, b: _Batch, slots, positions) -> None:
        self.visited[slots] = False
        b.fresh[slots] = True
        b.pos[slots] = positions
        b.out[positions] = slots

    def _evict(self, b: _Batch, slots) -> None:
        new = b.fresh[slots]
        b.out[b.pos[slots[new]]] = -1  # this batch's own id, inserted and evicted again
        b.gone_slots.append(slots[~new])
        b.gone_ids.append(self.id_of[slots[~new]].copy())

    def _install(self, b: _Batch, slots, positions) -> None:
        self._replace(slots, b.ids[positions])
        self._mark(b, slots, positions)

    def _sweep(self, b: _Batch, nxt: int) -> int:
        """One move of the hand, making room for misses nxt.. (an eviction each); returns the next miss."""
        queue, p, need = self.queue, self.hand, b.ids.size - nxt
        rest = queue[p:]
        seg = rest[: max(4 * need, 1024)]
        unv = np.flatnonzero(~self.visited[seg])
        if unv.size < need and seg.size < rest.size:
            seg = rest
            unv = np.flatnonzero(~self.visited[seg])
        c = min(unv.size, need)
        scanned = int(unv[c - 1]) + 1 if c == need else seg.size
        self.visited[seg[:scanned]] = False
        victims = seg[unv[:c]]
        at_head = c > 0 and p + int(unv[c - 1]) == queue.size - 1  # the last victim was the head
        keep = np.ones(queue.size, dtype=bool)
        keep[p + unv[:c]] = False
        kept = queue[keep]
        self._evict(b, victims)
        if c == need:  # room for every remaining miss, each inserted after its eviction
            self._install(b, victims, np.arange(nxt, nxt + c))
            self.queue = np.concatenate([kept, victims])
            # The hand moves on toward the head; past the head lies this sweep's first insert, if any, else
            # the tail.
            self.hand = p + scanned - c if not at_head else (kept.size if c >= 2 else 0)
            return b.ids.size
        self.hand = 0
        if c == 0:  # everything was visited (now cleared) and nothing inserted: the hand wraps to the tail
            return nxt
        if c >= 2:
            # Past the head the hand meets this sweep's inserts and chases them: each eviction removes the
            # oldest and one more goes in. Of the `need` misses, the last c stay, cycling through the c slots.
            j = np.arange(need - c, need)
            slots = victims[j % c]
            self._install(b, slots, nxt + j)
            self.queue = np.concatenate([kept, slots])
            self.hand = kept.size
            return b.ids.size
        # c == 1: a victim at the head sends the hand to the tail; otherwise the hand reaches the one insert
        # (now the head), evicts it and wraps; the next miss takes the slot.
        nxt += 0 if at_head else 1
        self._install(b, victims, np.array([nxt]))
        self.queue = np.concatenate([kept, victims])
        return nxt + 1


class LRUPolicy(SlotTable):
    """Least recently used, exact and vectorised: every access gets a time stamp (its position in the stream),
    and the cache keeps the `capacity` distinct ids with the latest stamps (LRU's stack property, so batching
    does not change what is kept). A miss enters with the stamp of its last access in the batch."""

    def __init__(self, capacity: int, num_rows: int):
        super().__init__(capacity, num_rows)
        self.last_use = np.zeros(self.capacity, dtype=np.int64)  # stamp of each slot's last access
        self.seen = np.full(self.num_rows, -1, dtype=np.int64)  # stamp of each id's last access (misses too)
        self.clock = 0
        self._batch_start = 0

    def _touch(self, ids, slots, hit) -> None:
        stamps = self.clock + np.arange(ids.size, dtype=np.int64)
        np.maximum.at(self.last_use, slots[hit], stamps[hit])
        np.maximum.at(self.seen, ids[~hit], stamps[~hit])  # stamps only grow: no reset needed
        self._batch_start = self.clock
        self.clock += ids.size

    def _stamps_of(self, ids) -> np.ndarray:
        """Each miss's last access in the batch just looked up; ids admitted without a lookup get new stamps."""
        fresh = self.clock + np.arange(ids.size, dtype=np.int64)
        self.clock += ids.size
        seen = self.seen[ids]
        return np.where(seen >= self._batch_start, seen, fresh)

    def admit(self, ids) -> Admission:
        ids = self._check_candidates(ids)
        stamps = self._stamps_of(ids)
        adm = self._keep_lowest(ids, -self.last_use[: self.size], -stamps)  # keep the latest stamps
        kept = adm.slots >= 0
        self.last_use[adm.slots[kept]] = stamps[kept]
        return adm
