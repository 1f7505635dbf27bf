"""Online sampling: each epoch sampled afresh and its rows read from a store, on a background thread.

    loader = OnlineLoader(graph, store, train_ids, [10, 10], 1024, seed=0, rank=rank, world_size=world_size)
    for mb, x in loader.epoch(epoch): ...      # the EpochLoader interface (gnn/epoch_loader.py)

Epoch ``e``'s batches come from ``NeighborSampler`` in an order drawn from ``(seed, e)``; ``x`` is
``store.read(n_id)``. The store picks the system: a ``DiskStore(mode="mmap")`` is the mmap baseline, a
``CachedStore`` over a direct ``DiskStore`` the Ginex-like one, an ``ArrayStore`` the in-memory limit.
``stats()`` adds the store's own counters (bytes asked of the disk, hit rates per cache tier) since
``reset_stats()``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from plait.gnn.epoch_loader import LoaderBase, check_rank, rank_batches, torch_rows
from plait.gnn.graph import CSCGraph
from plait.gnn.sampler import MiniBatch, NeighborSampler, batch_rng, batch_seeds


class OnlineLoader(LoaderBase):
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
        check_rank(self.rank, self.world_size, self._batches_per_epoch, "OnlineLoader")
        super().__init__(prefetch, self.graph.num_nodes)

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
        x = torch_rows(self.store.read(mb.n_id))
        t2 = time.perf_counter()
        self._count_distinct(mb.n_id, mb.n_id, self.row_bytes)  # no fixed host cache: every row may need the disk
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
