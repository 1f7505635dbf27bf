"""Caches that wrap a row store and are one themselves, so tiers compose: disk -> host cache -> device cache.

    host = CachedStore(DiskStore(path), "sieve", capacity_rows=200_000, tier="host")
    fill_static(host, top_k_ids(access_counts(batches, host.num_rows), 50_000))  # optional warm start
    dev = DeviceCache(host, "lru", capacity_rows=50_000)       # torch rows on cuda (cpu without one)
    rows = dev.read(ids)                                       # device tier, then host, then disk
    dev.stats()  # {"device_hits": .., "device_hit_rate": .., "host_hits": .., "rows_read": .., ...}

A cache keeps `capacity_rows` rows in a slot buffer; the policy (`cache_policy.py`, by name or instance)
decides which ids hold slots. `read(ids)` serves hits from the buffer, asks the wrapped store once for the
batch's distinct misses, admits them per the policy and returns rows in the order asked. The host buffer
is pinned when CUDA is available (unless pin=False) and pageable otherwise. Rows come back byte-identical.

`stats()` gives this tier's counts prefixed by its name (`host_hits`, `host_misses`, `host_hit_rate`,
`host_rows_read`, `host_victim_hits`) merged with the wrapped store's, so the unprefixed keys
(`rows_read`, `bytes_read`) describe the store at the bottom. Hits and misses count rows as asked
(duplicates included). A cache is not shared between threads without its lock: `read` holds it.

`VictimBuffer` (LSM-GNN): `victim_rows > 0` keeps evicted rows that the lookahead says are needed soon,
checked before the wrapped store; `set_future(batches)` gives the cache the batches about to be read.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .belady import NEVER, BeladyPolicy, Lookahead
from .cache_policy import LRUPolicy, SievePolicy, StaticPolicy
from .store import check_ids


def unique_in_order(ids: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct ids in first-occurrence order, the position of each one's first occurrence, and for each input
    its index among them. O(len(ids)): `scratch` is an integer array over all row ids, wide enough for
    len(ids) (its contents are overwritten, never trusted)."""
    n = ids.size
    scratch[ids] = n
    np.minimum.at(scratch, ids, np.arange(n, dtype=scratch.dtype))
    first_of = scratch[ids]
    is_first = first_of == np.arange(n)
    rank = np.cumsum(is_first) - 1
    return ids[is_first], np.flatnonzero(is_first), rank[first_of]


def host_buffer(rows: int, row_shape: tuple[int, ...], dtype, pin: bool | None) -> tuple[torch.Tensor, np.ndarray]:
    """A (rows, *row_shape) host array of `dtype`, pinned when CUDA is available (pin=None) or asked (pin=True).
    Returns the owning uint8 tensor and the numpy view onto it."""
    cuda = torch.cuda.is_available()
    if pin and not cuda:
        raise ValueError("pin=True asks for pinned host memory, which needs CUDA; none is available: pass pin=None")
    dtype = np.dtype(dtype)
    nbytes = rows * int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    owner = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=cuda if pin is None else bool(pin))
    view = owner.numpy()[:nbytes].view(dtype).reshape(rows, *row_shape)
    return owner, view


class VictimBuffer:
    """Rows evicted from a cache that the lookahead says are needed within its window (LSM-GNN): the soonest
    needed `capacity_rows` are kept; a row taken back leaves the buffer (it re-enters the cache)."""

    def __init__(self, capacity_rows: int, row_shape, dtype, pin: bool | None = None):
        if int(capacity_rows) < 1:
            raise ValueError(f"VictimBuffer: capacity_rows must be >= 1, got {capacity_rows}")
        self.capacity = int(capacity_rows)
        self.ids = np.full(self.capacity, -1, dtype=np.int64)
        self._owner, self.rows = host_buffer(self.capacity, tuple(row_shape), dtype, pin)
        self.lookahead: Lookahead | None = None
        self.hits = 0
        self.kept = 0

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For distinct ids: which are here, and their rows (removed from the buffer)."""
        order = np.argsort(self.ids)
        pos = np.minimum(np.searchsorted(self.ids[order], ids), self.capacity - 1)
        found = self.ids[order[pos]] == ids
        slots = order[pos[found]]
        rows = self.rows[slots].copy()
        self.ids[slots] = -1
        self.hits += int(found.sum())
        return found, rows

    def offer(self, ids: np.ndarray, rows) -> int:
        """Keep those of `ids` (with their rows) needed soonest; returns how many were kept."""
        if self.lookahead is None:
            raise RuntimeError("VictimBuffer needs the future accesses: call cache.set_future(batches) before reading")
        new_dist = self.lookahead.next_use(ids)
        soon = np.flatnonzero(new_dist != NEVER)
        if not soon.size:
            return 0
        held = np.flatnonzero(self.ids >= 0)
        dist = np.concatenate([self.lookahead.next_use(self.ids[held]), new_dist[soon]])
        keep = np.argsort(dist, kind="stable")[: self.capacity]
        keep = keep[dist[keep] != NEVER]
        self.ids[held[~np.isin(np.arange(held.size), keep)]] = -1
        incoming = soon[keep[keep >= held.size] - held.size]
        free = np.flatnonzero(self.ids < 0)[: incoming.size]
        self.ids[free] = ids[incoming]
        self.rows[free] = np.asarray(rows)[incoming]
        self.kept += int(incoming.size)
        return int(incoming.size)


POLICIES = {"static": StaticPolicy, "sieve": SievePolicy, "lru": LRUPolicy, "belady": BeladyPolicy}


def make_policy(name: str, capacity: int, num_rows: int):
    """A policy by name: static, sieve, lru or belady (cache_policy.py, belady.py)."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](capacity, num_rows)


class CachedStore:
    """A host-memory cache tier over any RowStore (a RowStore itself). `policy`: a name ("static", "sieve",
    "lru", "belady") or a policy instance sized to `capacity_rows`."""

    def __init__(self, store, policy, capacity_rows: int | None = None, pin: bool | None = None,
                 tier: str = "host", victim_rows: int = 0):
        self.store = store
        self.num_rows = int(store.num_rows)
        self.row_shape = tuple(store.row_shape)
        self.dtype = np.dtype(store.dtype)
        self.tier = tier
        clash = [k for k in store.stats() if k.startswith(f"{tier}_")]
        if clash:
            raise ValueError(f"tier name {tier!r} is already used by the wrapped store ({clash[0]}); pass tier=...")
        if isinstance(policy, str):
            if capacity_rows is None:
                raise ValueError(f"CachedStore({policy!r}): give capacity_rows (the cache size in rows)")
            policy = make_policy(policy, capacity_rows, self.num_rows)
        if capacity_rows is not None and int(capacity_rows) != policy.capacity:
            raise ValueError(f"capacity_rows={capacity_rows} but the policy holds {policy.capacity}; make them agree")
        if policy.num_rows != self.num_rows:
            raise ValueError(f"the policy covers {policy.num_rows} row ids but the store has {self.num_rows}")
        self.policy = policy
        self.capacity = policy.capacity
        self._alloc(pin)
        self.victim = VictimBuffer(victim_rows, self.row_shape, self.dtype, pin) if victim_rows else None
        self._lookahead: Lookahead | None = None  # advanced here only when the policy does not own it
        self._lock = threading.Lock()
        self._scratch = np.empty(self.num_rows, dtype=np.int32)  # for unique_in_order (batches < 2**31 ids)
        self.rows_asked = self.hits = self.misses = 0

    # -- buffer operations (DeviceCache overrides these) -----------------------------------------------------
    def _alloc(self, pin) -> None:
        self._owner, self.buffer = host_buffer(self.capacity, self.row_shape, self.dtype, pin)
        self.pinned = bool(self._owner.is_pinned())

    def _empty(self, n: int):
        return np.empty((n, *self.row_shape), dtype=self.dtype)

    def _native(self, rows):
        return np.asarray(rows)

    def _gather(self, slots: np.ndarray):
        return self.buffer[slots]

    def _scatter(self, slots: np.ndarray, rows) -> None:
        self.buffer[slots] = rows

    def _put(self, out, pos: np.ndarray, rows) -> None:
        out[pos] = rows

    def _take(self, rows, index: np.ndarray):
        return rows[index]

    # -- the tier ----------------------------------------------------------------------------------------------
    def set_future(self, batches, window: int | None = None) -> None:
        """The batches about to be read, in order (the Belady policy and the victim buffer look ahead)."""
        if hasattr(self.policy, "set_future"):
            la, self._lookahead = self.policy.set_future(batches, window), None
        else:
            la = self._lookahead = Lookahead(batches, window)
        if self.victim is not None:
            self.victim.lookahead = la

    def read(self, ids):
        ids = check_ids(ids, self.num_rows, f"{type(self).__name__}[{self.tier}].read")
        with self._lock:
            return self._read(ids)

    def _read(self, ids: np.ndarray):
        out = self._empty(ids.size)
        if not ids.size:
            return out
        if self._lookahead is not None:
            self._lookahead.advance(ids)
        hit, slots = self.policy.lookup(ids)
        hit_pos, miss_pos = np.flatnonzero(hit), np.flatnonzero(~hit)
        self.rows_asked += ids.size
        self.hits += hit_pos.size
        self.misses += miss_pos.size
        if hit_pos.size:
            self._put(out, hit_pos, self._gather(slots[hit_pos]))
        if not miss_pos.size:
            return out
        uniq, first, inverse = unique_in_order(ids[miss_pos], self._scratch)
        rows = self._fetch(uniq)
        self._put(out, miss_pos[first], rows)
        if uniq.size < miss_pos.size:  # repeats of a missed id within the batch
            again = np.ones(miss_pos.size, dtype=bool)
            again[first] = False
            self._put(out, miss_pos[again], self._take(rows, inverse[again]))
        self._admit(uniq, rows)
        return out

    def _fetch(self, uniq: np.ndarray):
        """Rows of distinct missed ids: from the victim buffer where held, the rest in one read of the store."""
        if self.victim is None:
            return self._native(self.store.read(uniq))
        found, vrows = self.victim.take(uniq)
        if found.all():
            return self._native(vrows)
        rest = self._native(self.store.read(uniq[~found]))
        if not found.any():
            return rest
        rows = self._empty(uniq.size)
        self._put(rows, np.flatnonzero(found), self._native(vrows))
        self._put(rows, np.flatnonzero(~found), rest)
        return rows

    def _admit(self, uniq: np.ndarray, rows) -> int:
        adm = self.policy.admit(uniq)
        if self.victim is not None and adm.evicted_ids.size:  # copy evicted rows out before reuse
            self.victim.offer(adm.evicted_ids, np.asarray(self._gather(adm.evicted_slots)))
        keep = np.flatnonzero(adm.slots >= 0)
        if keep.size == uniq.size:
            self._scatter(adm.slots, rows)
        elif keep.size:
            self._scatter(adm.slots[keep], self._take(rows, keep))
        return int(keep.size)

    def stats(self) -> dict:
        t = self.tier
        own = {
            f"{t}_rows_read": self.rows_asked,
            f"{t}_hits": self.hits,
            f"{t}_misses": self.misses,
            f"{t}_hit_rate": self.hits / self.rows_asked if self.rows_asked else 0.0,
            f"{t}_capacity_rows": self.capacity,
            f"{t}_resident_rows": len(self.policy),
        }
        if self.victim is not None:
            own[f"{t}_victim_hits"] = self.victim.hits
        return {**own, **self.store.stats()}


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except (TypeError, ValueError) as e:
        raise TypeError(f"DeviceCache: rows of dtype {dtype} have no torch dtype; keep this tier on the host") from e


class DeviceCache(CachedStore):
    """A cache tier whose rows live in a torch tensor on `device` (cuda when available, else cpu); `read`
    returns a torch tensor there. Wraps any RowStore (a host CachedStore, a DiskStore, a RemoteStore)."""

    def __init__(self, store, policy, capacity_rows: int | None = None, device=None, tier: str = "device"):
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        super().__init__(store, policy, capacity_rows, pin=False, tier=tier, victim_rows=0)

    def _alloc(self, pin) -> None:
        self.torch_dtype = _torch_dtype(self.dtype)
        self.buffer = torch.empty((self.capacity, *self.row_shape), dtype=self.torch_dtype, device=self.device)
        self.pinned = False

    def _index(self, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(self.device)

    def _empty(self, n: int):
        return torch.empty((n, *self.row_shape), dtype=self.torch_dtype, device=self.device)

    def _native(self, rows):
        if isinstance(rows, torch.Tensor):
            return rows.to(self.device)
        return torch.from_numpy(np.ascontiguousarray(rows)).to(self.device)

    def _gather(self, slots: np.ndarray):
        return self.buffer[self._index(slots)]

    def _scatter(self, slots: np.ndarray, rows) -> None:
        self.buffer[self._index(slots)] = rows

    def _put(self, out, pos: np.ndarray, rows) -> None:
        out[self._index(pos)] = rows

    def _take(self, rows, index: np.ndarray):
        return rows[self._index(index)]


def fill_static(cache: CachedStore, ids=None) -> int:
    """Pre-load rows (hottest first) into `cache` in one read of the wrapped store, up to its free slots;
    `ids` defaults to the static policy's set. Returns how many rows were loaded."""
    if ids is None:
        ids = getattr(cache.policy, "static_ids", None)
        if ids is None:
            raise ValueError("fill_static: give the ids to load (e.g. top_k_ids(access_counts(...), k))")
    ids = check_ids(np.asarray(ids), cache.num_rows, "fill_static")
    with cache._lock:
        ids = unique_in_order(ids, cache._scratch)[0]
        ids = ids[cache.policy.slot_of[ids] < 0][: cache.capacity - len(cache.policy)]
        if not ids.size:
            return 0
        return cache._admit(ids, cache._native(cache.store.read(ids)))
