"""Epoch loaders: mini-batches and their feature rows, made on a background thread while the caller computes.

    loader = PackedLoader("packs/", rank, world_size)              # DiskGNN: offline batches, cache + packs
    loader = OnlineLoader(graph, store, train_ids, [10, 10], 1024, seed=0, rank=rank, world_size=world_size)
    for epoch in range(epochs):
        for mb, x in loader.epoch(epoch):                          # x: (len(mb.n_id), F) rows of mb.n_id
            ...
    loader.stats()      # sample_s, read_s, wait_s, batches, rows_read, bytes_read, host_hit_rate, ...
    loader.close()      # or `with loader:`; stops the thread (also when an epoch is left early)

Both loaders run ``prefetch`` batches ahead on one thread (``prefetch=0``: made on the caller's thread) and give
every rank the same number of batches per epoch: of an epoch's ``B`` batches in order, rank ``r`` takes batches
``r, r + W, ...`` below ``(B // W) * W`` (the tail is dropped), so the ranks' batches are disjoint and DDP steps
match. ``OnlineLoader`` samples each epoch afresh (``NeighborSampler``, epoch order from ``(seed, epoch)``) and
reads ``store.read(n_id)``: a ``DiskStore(mode="mmap")`` is the mmap baseline, a ``CachedStore`` over a direct
``DiskStore`` the Ginex-like one, an ``ArrayStore`` the in-memory limit. ``PackedLoader`` reuses the batches
``prepare_packed`` sampled (gnn/offline.py) in an order shuffled by ``(seed, epoch)``: it loads the cached rows
into a host buffer (pinned when CUDA is available) once, then per batch makes one aligned sequential direct read
of its pack and assembles x by index from cache and pack.

``stats()`` (cumulative since construction or ``reset_stats()``): ``batches``, ``sample_s`` and ``read_s``
(seconds the thread spent sampling and reading), ``assemble_s`` (building x), ``wait_s`` (the caller blocked
waiting for a batch), ``rows_read`` / ``bytes_read`` (rows and bytes asked of the disk), ``bytes_needed`` (rows
the disk had to give x row bytes: the read amplification is bytes_read / bytes_needed), ``host_hits``,
``host_rows_read`` and ``host_hit_rate`` per cache tier (from the store for OnlineLoader). PackedLoader adds
``index_bytes``: bytes of the memory-mapped batch index (n_id, loc, seeds, edges) read, which the page cache
serves or the disk reads on top of ``bytes_read``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from plait.gnn.graph import CSCGraph
from plait.gnn.offline import CorruptPackError, load_pack_info
from plait.gnn.sampler import Block, MiniBatch, NeighborSampler, batch_rng, batch_seeds
from plait.storage.cache import host_buffer
from plait.storage.disk_reader import DiskStore
from plait.storage.feature_file import PAGE, FeatureFileError, open_feature_file

_ORDER = 7  # stream tag of PackedLoader's epoch order
_DONE = object()
CACHE_LOAD_ROWS = 1 << 16
REBUILD = "run prepare_packed again to rebuild it"


class EpochLoader(Protocol):
    def epoch(self, epoch: int) -> Iterator[tuple[MiniBatch, torch.Tensor]]: ...

    def stats(self) -> dict: ...

    def reset_stats(self) -> None: ...

    def num_batches(self) -> int: ...

    def close(self) -> None: ...


def rank_batches(order: Sequence[int] | np.ndarray, rank: int, world_size: int) -> list[int]:
    """This rank's share of an epoch's batch ``order``: positions rank, rank + W, ... below (B // W) * W."""
    order = np.asarray(order)
    keep = len(order) // world_size * world_size
    return order[rank:keep:world_size].tolist()


def _check_rank(rank: int, world_size: int, num_batches: int, what: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{what}: rank {rank} is not in [0, world_size={world_size})")
    if num_batches < world_size:
        raise ValueError(f"{what}: {num_batches} batches per epoch cannot give each of {world_size} ranks one; "
                         "use a smaller batch_size or fewer ranks")


class _Prefetcher:
    """``produce(item)`` for each item on one daemon thread, at most ``depth`` results waiting; iterate to take
    them in order. An exception on the thread is raised to the consumer; ``close()`` stops the thread."""

    def __init__(self, items: list, produce: Callable, depth: int, name: str):
        self.items, self.produce, self.wait_s = items, produce, 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self.items:
                if self._stop.is_set():
                    return
                if not self._put(self.produce(item)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(_Failure(e))
            return
        self._put(_DONE)

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            value = self._next()
            self.wait_s += time.perf_counter() - t0
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value

    def _next(self):
        while True:
            try:
                return self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError("this epoch's iterator was stopped (a later epoch started or the loader was "
                                       "closed); iterate one epoch at a time") from None

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Base:
    """The epoch loop, threads and timing shared by both loaders; subclasses give _order and _produce."""

    prefetch: int
    _name: str

    def __init__(self, prefetch: int):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.prefetch = int(prefetch)
        self._active: _Prefetcher | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.reset_stats()

    def reset_stats(self) -> None:
        self._t = {"sample_s": 0.0, "read_s": 0.0, "assemble_s": 0.0, "wait_s": 0.0, "batches": 0}

    def _add(self, key: str, value: float) -> None:
        with self._lock:
            self._t[key] += value

    def epoch(self, epoch: int) -> Iterator[tuple[MiniBatch, torch.Tensor]]:
        """This rank's batches of ``epoch`` with their features; the thread starts at the first ``next``."""
        if self._closed:
            raise RuntimeError(f"{self._name} is closed; make a new loader")
        return self._iterate(int(epoch))

    def _iterate(self, epoch: int) -> Iterator[tuple[MiniBatch, torch.Tensor]]:
        plan = self._order(epoch)
        if self.prefetch == 0:
            for item in plan:
                t0 = time.perf_counter()
                out = self._produce(epoch, item)
                self._add("wait_s", time.perf_counter() - t0)
                self._add("batches", 1)
                yield out
            return
        self._stop_active()
        pf = _Prefetcher(plan, lambda item: self._produce(epoch, item), self.prefetch,
                         f"plait-{self._name}-e{epoch}")
        self._active = pf
        counted = 0.0
        try:
            for out in pf:
                self._add("wait_s", pf.wait_s - counted)
                counted = pf.wait_s
                self._add("batches", 1)
                yield out
        finally:
            pf.close()
            self._add("wait_s", pf.wait_s - counted)
            if self._active is pf:
                self._active = None

    def _stop_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def close(self) -> None:
        """Stop the background thread (if an epoch is running) and release files; idempotent."""
        self._stop_active()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def _torch_rows(rows) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows
    rows = np.asarray(rows)
    if not rows.flags.writeable or not rows.flags.c_contiguous:
        rows = np.array(rows)
    return torch.from_numpy(rows)


class OnlineLoader(_Base):
    """Samples each epoch online and reads ``store.read(n_id)``, both on the background thread."""

    _name = "online-loader"

    def __init__(self, graph, store, train_ids, fanouts, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, prefetch: int = 2):
        self.graph = graph if isinstance(graph, CSCGraph) else CSCGraph.load(graph)
        self.store, self.seed, self.batch_size = store, int(seed), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.sampler = NeighborSampler(self.graph, fanouts)
        if store.num_rows != self.graph.num_nodes:
            raise ValueError(f"the store holds {store.num_rows} rows but the graph has {self.graph.num_nodes} "
                             "nodes; pass the features of this graph")
        self.row_bytes = math.prod(store.row_shape) * np.dtype(store.dtype).itemsize
        if self.batch_size < 1:
            raise ValueError(f"OnlineLoader: batch_size must be >= 1, got {batch_size}")
        self._batches_per_epoch = -(-len(self.train_ids) // self.batch_size)
        _check_rank(self.rank, self.world_size, self._batches_per_epoch, "OnlineLoader")
        super().__init__(prefetch)

    def num_batches(self) -> int:
        return self._batches_per_epoch // self.world_size

    def reset_stats(self) -> None:
        super().reset_stats()
        self._store0 = dict(self.store.stats())

    def _order(self, epoch: int) -> list:
        seeds = batch_seeds(self.train_ids, self.batch_size, self.seed, epoch)
        return [(i, seeds[i]) for i in rank_batches(np.arange(len(seeds)), self.rank, self.world_size)]

    def _produce(self, epoch: int, item) -> tuple[MiniBatch, torch.Tensor]:
        i, seeds = item
        t0 = time.perf_counter()
        mb = self.sampler.sample(seeds, batch_rng(self.seed, epoch, i))
        t1 = time.perf_counter()
        x = _torch_rows(self.store.read(mb.n_id))
        t2 = time.perf_counter()
        self._add("sample_s", t1 - t0)
        self._add("read_s", t2 - t1)
        return mb, x

    def stats(self) -> dict:
        now, then = self.store.stats(), self._store0
        out = {}
        for k, v in now.items():
            if k.endswith(("_hit_rate", "_capacity_rows", "_resident_rows")) or not isinstance(v, (int, float)):
                out[k] = v
            else:
                out[k] = v - then.get(k, 0)
        for k in now:
            if k.endswith("_hit_rate"):
                tier = k[: -len("_hit_rate")]
                asked = out.get(f"{tier}_rows_read", 0)
                out[k] = out.get(f"{tier}_hits", 0) / asked if asked else 0.0
        out.setdefault("bytes_read", 0)
        out["bytes_needed"] = out.get("rows_read", 0) * self.row_bytes
        with self._lock:
            return {**out, **self._t}


class PackedLoader(_Base):
    """DiskGNN's online stage over a pack folder written by ``prepare_packed`` (see the module doc)."""

    _name = "packed-loader"

    def __init__(self, pack_dir, rank: int = 0, world_size: int = 1, prefetch: int = 2, verify: bool = True,
                 read_threads: int = 4):
        self.path = Path(pack_dir)
        self.info = info = load_pack_info(self.path)
        self.rank, self.world_size = int(rank), int(world_size)
        _check_rank(self.rank, self.world_size, info.num_batches, f"PackedLoader({self.path})")
        idx = {name: _load_index(self.path, name) for name in
               ("seeds", "seeds_ptr", "n_id", "n_id_ptr", "loc", "edge_ptr", "sizes", "pack_page", "pack_rows")}
        idx["edges"] = [_load_index(self.path, f"edges_{layer}") for layer in range(info.num_layers)]
        for name in ("seeds_ptr", "n_id_ptr", "edge_ptr", "sizes", "pack_page", "pack_rows"):  # small: in RAM
            idx[name] = np.array(idx[name])
        self._idx = idx
        try:
            self.packs = DiskStore(self.path / "packs.feat", mode="direct", threads=read_threads, verify=verify)
        except FeatureFileError as e:
            raise FeatureFileError(f"{e}. It is part of the pack folder {self.path}: {REBUILD}") from None
        try:
            self._check_index(idx)
            self._load_cache(verify)
        except FeatureFileError as e:
            self.packs.close()
            raise FeatureFileError(f"{e}. It is part of the pack folder {self.path}: {REBUILD}") from None
        except BaseException:
            self.packs.close()
            raise
        self.row_shape, self.dtype, self.row_bytes = self._cache_rows.shape[1:], self._cache_rows.dtype, info.row_bytes
        self._cache_t = torch.from_numpy(self._cache_rows)  # shares the (pinned) host buffer
        self._torch_dtype = self._cache_t.dtype
        self.pin = torch.cuda.is_available()
        super().__init__(prefetch)

    def _check_index(self, idx: dict) -> None:
        b, layers, info = self.info.num_batches, self.info.num_layers, self.info
        rules = [
            ("seeds_ptr", idx["seeds_ptr"].shape == (b + 1,) and idx["seeds_ptr"][-1] == len(idx["seeds"])),
            ("n_id_ptr", idx["n_id_ptr"].shape == (b + 1,) and idx["n_id_ptr"][-1] == len(idx["n_id"])
             == len(idx["loc"]) == info.rows_needed),
            ("edge_ptr", idx["edge_ptr"].shape == (b + 1, layers)
             and all(idx["edge_ptr"][-1, k] == idx["edges"][k].shape[1] for k in range(layers))),
            ("sizes", idx["sizes"].shape == (b, layers, 2)),
            ("pack_page", idx["pack_page"].shape == (b + 1,) and idx["pack_page"][-1] == self.packs.num_rows
             and self.packs.row_bytes == PAGE),
            ("pack_rows", idx["pack_rows"].shape == (b,) and int(np.sum(idx["pack_rows"])) == info.pack_rows),
        ]
        for name, ok in rules:
            if not ok:
                raise CorruptPackError(f"{self.path / (name + '.npy')} does not agree with meta.json and the other "
                                       f"index files ({b} batches, {layers} layers, {info.rows_needed} rows, "
                                       f"{self.packs.num_rows} pack pages); run prepare_packed again")

    def _load_cache(self, verify: bool) -> None:
        """The cached rows into a host buffer (pinned when CUDA is available), read sequentially once."""
        file = self.path / "cache.feat"
        finfo = open_feature_file(file)
        if finfo.num_rows != self.info.cached_rows or finfo.row_bytes != self.info.row_bytes:
            raise CorruptPackError(f"{file} holds {finfo.num_rows} rows of {finfo.row_bytes} bytes, meta.json says "
                                   f"{self.info.cached_rows} of {self.info.row_bytes}; run prepare_packed again")
        self._cache_owner, self._cache_rows = host_buffer(finfo.num_rows, finfo.row_shape, finfo.dtype, None)
        t0 = time.perf_counter()
        self.cache_load_bytes = 0
        if finfo.num_rows:
            with DiskStore(file, mode="direct", verify=verify) as store:
                for a in range(0, finfo.num_rows, CACHE_LOAD_ROWS):
                    b = min(a + CACHE_LOAD_ROWS, finfo.num_rows)
                    self._cache_rows[a:b] = store.read_rows(a, b)
                self.cache_load_bytes = store.stats()["bytes_read"]
        self.cache_load_s = time.perf_counter() - t0

    def num_batches(self) -> int:
        return self.info.num_batches // self.world_size

    def reset_stats(self) -> None:
        super().reset_stats()
        self._t.update(rows_read=0, bytes_needed=0, host_hits=0, host_rows_read=0, index_bytes=0)
        self._bytes0 = self.packs.stats()["bytes_read"]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Every batch of the pack (all ranks) in the order of ``epoch``."""
        return np.random.default_rng([self.info.seed, epoch, _ORDER]).permutation(self.info.num_batches)

    def _order(self, epoch: int) -> list:
        return rank_batches(self.epoch_order(epoch), self.rank, self.world_size)

    def _produce(self, epoch: int, b: int) -> tuple[MiniBatch, torch.Tensor]:
        idx = self._idx
        t0 = time.perf_counter()
        rows = int(idx["pack_rows"][b])
        try:
            raw = self.packs.read_range(int(idx["pack_page"][b]) * PAGE, rows * self.row_bytes)
        except FeatureFileError as e:
            raise FeatureFileError(f"{e}. It holds the pack of batch {b} of {self.path}: {REBUILD}") from None
        t1 = time.perf_counter()
        mb = self.batch(b)
        loc = np.asarray(idx["loc"][idx["n_id_ptr"][b] : idx["n_id_ptr"][b + 1]])
        x = torch.empty((len(loc), *self.row_shape), dtype=self._torch_dtype, pin_memory=self.pin)
        hit_pos, miss_pos = np.flatnonzero(loc >= 0), np.flatnonzero(loc < 0)
        if hit_pos.size:
            x.index_copy_(0, torch.from_numpy(hit_pos), self._cache_t.index_select(0, torch.from_numpy(loc[hit_pos])))
        if rows:
            pack = torch.from_numpy(raw.view(self.dtype).reshape(rows, *self.row_shape))
            order = -1 - loc[miss_pos]
            if not np.array_equal(order, np.arange(rows)):  # prepare_packed writes them in n_id order
                pack = pack[torch.from_numpy(order)]
            x.index_copy_(0, torch.from_numpy(miss_pos), pack)
        t2 = time.perf_counter()
        with self._lock:
            t = self._t
            t["read_s"] += t1 - t0
            t["assemble_s"] += t2 - t1
            t["rows_read"] += rows
            t["bytes_needed"] += rows * self.row_bytes
            t["host_hits"] += len(loc) - rows
            t["host_rows_read"] += len(loc)
            t["index_bytes"] += loc.nbytes * 2 + mb.seeds.nbytes + sum(4 * blk.edge_index.shape[1] * 2
                                                                       for blk in mb.blocks)
        return mb, x

    def batch(self, b: int) -> MiniBatch:
        """Batch ``b`` of the pack (seeds, n_id, blocks), without its features."""
        idx = self._idx
        s0, s1 = idx["seeds_ptr"][b], idx["seeds_ptr"][b + 1]
        n0, n1 = idx["n_id_ptr"][b], idx["n_id_ptr"][b + 1]
        blocks = []
        for layer, edges in enumerate(idx["edges"]):
            e0, e1 = idx["edge_ptr"][b, layer], idx["edge_ptr"][b + 1, layer]
            size = idx["sizes"][b, layer]
            blocks.append(Block(torch.from_numpy(edges[:, e0:e1].astype(np.int64)), (int(size[0]), int(size[1]))))
        return MiniBatch(np.array(idx["seeds"][s0:s1]), np.array(idx["n_id"][n0:n1]), blocks)

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._t)
        out["bytes_read"] = self.packs.stats()["bytes_read"] - self._bytes0
        out["host_hit_rate"] = out["host_hits"] / out["host_rows_read"] if out["host_rows_read"] else 0.0
        out["host_capacity_rows"] = self.info.cached_rows
        return out

    def close(self) -> None:
        super().close()
        self.packs.close()


def _load_index(path: Path, name: str) -> np.ndarray:
    file = path / f"{name}.npy"
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptPackError(f"{file}: cannot read this index array ({type(e).__name__}: {e}); run "
                               "prepare_packed again") from None

