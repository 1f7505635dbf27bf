"""The systems bench/ooc_gnn.py compares, each an EpochLoader over the same dataset (generated, or any folder in the
layout of gnn/dataset.py):

    mmap               OnlineLoader over DiskStore(mode="mmap"): online sampling, features through the page cache
    mmap-random        the same with MADV_RANDOM (no readahead)
    ginex              OnlineLoader over CachedStore(DiskStore(mode="direct"), policy): per-row direct reads, a
                       host cache of the budget (Ginex-like, without its offline Belady superbatches)
    plait              PackedLoader: offline-sampled batches, the hottest rows in a host cache, each batch's other
                       rows packed contiguously and read with one sequential direct read (DiskGNN)
    memory             OnlineLoader over ArrayStore: every feature row in RAM beforehand (the limit; no budget)
    memory-presampled  Plait's offline-sampled batches in the same order with every feature row in RAM
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SYSTEMS = ("mmap", "mmap-random", "ginex", "plait", "memory", "memory-presampled")
UNBOUNDED = ("memory", "memory-presampled")  # features in RAM: no budget, no memory group


def io_bytes_of(pid: int | str = "self") -> int:
    """read_bytes of /proc/<pid>/io: what the process made the disk read (page-cache hits not counted)."""
    from plait.storage.disk_reader import process_read_bytes

    got = process_read_bytes(pid)
    if got is None:
        raise RuntimeError(f"/proc/{pid}/io is not readable here: the bench measures disk reads with it")
    return got


@dataclass
class System:
    """One system's loader, the store behind it (online systems), the files its reads hit, and the bytes of its own
    host cache (part of the budget)."""

    loader: object
    store: object = None
    files: list[Path] = field(default_factory=list)
    cache_bytes: int = 0

    def evict(self) -> None:
        """Drop the feature (or pack) file from the page cache, unmapping an mmap store's pages first."""
        from plait.storage.disk_reader import DiskStore, drop_page_cache

        if isinstance(self.store, DiskStore):
            self.store.release_mapped_pages()  # mapped pages stay cached until unmapped from this process
        for f in self.files:
            drop_page_cache(f)


def open_system(name: str, ds, pack: str, budget: float, fanouts: list[int], batch_size: int, seed: int,
                ginex_policy: str = "sieve") -> System:
    """System ``name`` over dataset ``ds`` (``open_dataset``), with its budget's host cache filled or allocated
    and its working set (graph, batch index) in RAM."""
    from plait.gnn.dataset import load_split, read_features
    from plait.gnn.graph import CSCGraph
    from plait.gnn.online_loader import OnlineLoader
    from plait.gnn.packed_loader import PackedLoader
    from plait.storage.cache import CachedStore
    from plait.storage.disk_reader import DiskStore
    from plait.storage.store import ArrayStore

    if name == "memory-presampled":
        return System(PresampledInMemory(PackedLoader(pack, prefetch=0), read_features(ds.root)),
                      files=[ds.features])
    if name == "plait":
        loader = PackedLoader(pack, prefetch=2)
        loader.touch_index()  # the batch index in RAM: working memory, as the graph is for the others
        return System(loader, files=[Path(pack) / "packs.feat"], cache_bytes=loader.info.cache_bytes)
    g = ds.load_graph()
    graph = CSCGraph(np.array(g.indptr), np.array(g.indices))  # topology in RAM (working memory) for all
    cache_bytes = 0
    if name in ("mmap", "mmap-random"):  # the baseline of np.memmap users: unchecked (the job's online-mmap checks)
        store = DiskStore(ds.features, mode="mmap", verify=False, advise="random" if name == "mmap-random" else None)
    elif name == "ginex":
        cap = int(budget * ds.meta["num_nodes"])
        store = CachedStore(DiskStore(ds.features, mode="direct"), ginex_policy, cap)
        cache_bytes = cap * store.store.row_bytes
        store.buffer.fill(0)  # touch the cache now: its pages are the budget, not working memory to measure
    elif name == "memory":
        store = ArrayStore(read_features(ds.root))
    else:
        raise ValueError(f"unknown system {name!r}; choose one of {', '.join(SYSTEMS)}")
    loader = OnlineLoader(graph, store, load_split(ds.root).train, fanouts, batch_size, seed, prefetch=2)
    return System(loader, store, [ds.features], cache_bytes)


class PresampledInMemory:
    """Plait's offline-sampled batches (same order) with every feature row in RAM: the in-memory limit for the
    same work, an EpochLoader reading ``features[n_id]`` two batches ahead on a thread."""

    def __init__(self, packed, features: np.ndarray, prefetch: int = 2):
        self.packed, self.features, self.prefetch = packed, features, prefetch
        self.reset_stats()

    def reset_stats(self) -> None:
        self.t = {"sample_s": 0.0, "read_s": 0.0, "wait_s": 0.0, "batches": 0, "bytes_read": 0, "bytes_needed": 0}

    def num_batches(self) -> int:
        return self.packed.num_batches()

    def epoch(self, epoch: int):
        import torch

        q: queue.Queue = queue.Queue(maxsize=self.prefetch)

        def produce() -> None:
            for b in self.packed.rank_order(epoch):
                mb = self.packed.batch(b)
                t0 = time.perf_counter()
                x = torch.from_numpy(self.features[mb.n_id])
                self.t["read_s"] += time.perf_counter() - t0
                q.put((mb, x))
            q.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while True:
            t0 = time.perf_counter()
            item = q.get()
            self.t["wait_s"] += time.perf_counter() - t0
            if item is None:
                return
            self.t["batches"] += 1
            yield item

    def stats(self) -> dict:
        return dict(self.t)

    def close(self) -> None:
        self.packed.close()


def ensure_dataset(data: str, nodes: int, train_frac: float, seed: int) -> dict:
    """The meta of the generated dataset at ``data``, generated first unless one of this recipe is there (a
    folder generate_dataset did not write is refused, never replaced)."""
    from plait.gnn.generate import generate_dataset, generated_recipe, generation_recipe, open_dataset

    if generated_recipe(data)[0] == generation_recipe(num_nodes=nodes, train_frac=train_frac, seed=seed):
        return open_dataset(data).meta
    t0 = time.perf_counter()
    ds = generate_dataset(data, num_nodes=nodes, train_frac=train_frac, seed=seed)
    print(f"generated {nodes:,} nodes / {ds.meta['num_edges']:,} edges in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr, flush=True)
    return ds.meta


def open_any_dataset(path: str) -> dict:
    """The meta of the dataset folder at ``path`` (any made in gnn/dataset.py's layout: generated, imported or
    assembled), after check_dataset; read only."""
    from plait.gnn.dataset import check_dataset, open_dataset

    ds = open_dataset(path)
    check_dataset(ds)
    return ds.meta


def ensure_packs(data: str, budget: float, fanouts: list[int], batch_size: int, seed: int, epochs: int = 1,
                 packs: str = "") -> dict:
    """pack_info_dict of the packs of dataset ``data`` for a host cache of ``budget`` of its rows and ``epochs``
    sampled epochs, in ``<packs or data.packs>/bNNNN-eE``, with ``disk_bytes``: the folder's bytes on disk (packs,
    cache, index); prepared first unless packs made from the same inputs and settings are there."""
    from plait.gnn.generate import load_split, open_dataset
    from plait.gnn.offline import pack_info_dict, prepare_packed

    ds = open_dataset(data)
    out = Path(packs or data.rstrip("/") + ".packs") / f"b{round(budget * 1000):04d}-e{epochs}"
    info = prepare_packed(ds.load_graph(), ds.features, load_split(ds.root).train, fanouts, batch_size, seed,
                          int(budget * ds.meta["num_nodes"]), out, reuse=True, epochs=epochs)
    disk = sum(p.stat().st_blocks * 512 for p in out.iterdir() if p.is_file())
    return {**pack_info_dict(info), "disk_bytes": disk}
