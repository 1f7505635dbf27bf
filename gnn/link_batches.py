"""Link prediction's mini-batches: positive train edges, random negatives, neighbourhoods without the batch's edges.

    plan = LinkPlan(split.graph(), split.train_pos, fanouts=[10, 10], batch_size=512, seed=0, neg_per_pos=1)
    mb = plan.sample(epoch, i)          # LinkMiniBatch: a MiniBatch (seeds = the pairs' endpoints) + pairs, label
    loader = LinkLoader(plan, store)    # online: the EpochLoader interface (gnn/online_loader.py)
    prepare_packed(..., link=plan)      # offline: gnn/offline.py packs the same batches, PackedLoader replays them

Batch ``i`` of epoch ``e`` holds the positives ``batch_seeds(range(P), batch_size, seed, e)[i]`` (the train
positives shuffled by ``(seed, e)``) and, per positive ``(s, d)``, ``neg_per_pos`` negatives ``(s, d')`` with
``d'`` uniform over all nodes, drawn from ``(seed, e, i)`` (PyG LinkNeighborLoader's ``neg_sampling="binary"``;
a negative may by chance be an edge). Its seed nodes are the distinct endpoints (sorted); ``pairs`` holds each
pair's positions in ``seeds`` (row 0 source, row 1 destination), ``label`` 1.0 for positives, then 0.0.
Its neighbourhoods are sampled on the train graph with ``batch_rng(seed, e, i)`` excluding the batch's own
positive edges (both directions for an undirected graph): GraphBolt's ``exclude_seed_edges``.

In a pack folder the pairs are stored with the batch index: ``pairs.npy`` (2, total) int64 positions in the
batch's seeds, ``pair_label.npy`` float32, ``pairs_ptr.npy`` (B + 1,) and ``pairs_crc.npy`` (a crc32 per batch of
its pairs and labels, checked as the batch is read); meta.json's ``link`` holds the plan's key and the crc32 of
pairs_ptr.npy.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from plait.gnn.epoch_loader import rank_batches, torch_rows
from plait.gnn.online_loader import OnlineLoader
from plait.gnn.pack_info import corrupt_pack
from plait.gnn.sampler import MiniBatch, NeighborSampler, batch_rng, batch_seeds
from plait.storage.folders import read_meta, write_npy

_NEG = 2  # stream tag of the negatives (the sampler's streams are 0 and 1)


@dataclass(frozen=True, eq=False)
class LinkMiniBatch(MiniBatch):
    pairs: np.ndarray | None = None  # (2, P) int64 positions in seeds: source, destination
    label: np.ndarray | None = None  # float32 (P,): 1 positive, 0 negative


class LinkPlan:
    """The link batches of every epoch (see the module doc); any batch can be made on its own."""

    def __init__(self, graph, train_pos: np.ndarray, fanouts, batch_size: int, seed: int, neg_per_pos: int = 1,
                 undirected: bool = True):
        self.sampler = NeighborSampler(graph, fanouts)
        self.graph, self.pos = self.sampler.graph, np.asarray(train_pos, dtype=np.int64)
        if self.pos.ndim != 2 or self.pos.shape[0] != 2 or not self.pos.shape[1]:
            raise ValueError(f"train_pos must be a non-empty (2, P) array of edges, got shape {self.pos.shape}")
        self.batch_size, self.seed, self.neg_per_pos = int(batch_size), int(seed), int(neg_per_pos)
        self.undirected = bool(undirected)
        self.num_batches = -(-self.pos.shape[1] // self.batch_size)
        self._epoch_ids: tuple[int, list] | None = None

    def key(self) -> dict:
        """What the batches depend on beyond the graph and sampling arguments (a pack's key holds it)."""
        return {"task": "link", "num_pos": int(self.pos.shape[1]), "neg_per_pos": self.neg_per_pos,
                "undirected": self.undirected, "pos_crc": zlib.crc32(np.ascontiguousarray(self.pos))}

    def _ids(self, epoch: int, i: int) -> np.ndarray:
        cached = self._epoch_ids
        if cached is None or cached[0] != epoch:
            cached = self._epoch_ids = (epoch, batch_seeds(np.arange(self.pos.shape[1]), self.batch_size, self.seed,
                                                           epoch))
        return cached[1][i]

    def pairs(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch ``i`` of ``epoch``: (seeds, pairs as positions in seeds, label)."""
        pos = self.pos[:, self._ids(epoch, i)]
        k = self.neg_per_pos
        rng = np.random.default_rng([self.seed, epoch, _NEG, i])
        neg_dst = rng.integers(0, self.graph.num_nodes, size=pos.shape[1] * k)
        src = np.concatenate([pos[0], np.repeat(pos[0], k)])
        dst = np.concatenate([pos[1], neg_dst])
        seeds = np.unique(np.concatenate([src, dst]))
        pairs = np.stack([np.searchsorted(seeds, src), np.searchsorted(seeds, dst)]).astype(np.int64)
        label = np.r_[np.ones(pos.shape[1], np.float32), np.zeros(len(neg_dst), np.float32)]
        return seeds, pairs, label

    def seeds(self, epoch: int, i: int) -> np.ndarray:
        return self.pairs(epoch, i)[0]

    def sample(self, epoch: int, i: int) -> LinkMiniBatch:
        """Batch ``i`` of ``epoch`` with its neighbourhoods, its positive edges excluded from them."""
        seeds, pairs, label = self.pairs(epoch, i)
        pos = np.stack([seeds[pairs[0][label > 0]], seeds[pairs[1][label > 0]]])
        exclude = np.concatenate([pos, pos[::-1]], axis=1) if self.undirected else pos
        mb = self.sampler.sample(seeds, batch_rng(self.seed, epoch, i), exclude=exclude)
        return LinkMiniBatch(mb.seeds, mb.n_id, mb.blocks, pairs, label)


class LinkLoader(OnlineLoader):
    """Online link batches (``LinkPlan.sample``) with ``store.read(n_id)``: OnlineLoader's thread and stats."""

    _name = "link-loader"

    def __init__(self, plan: LinkPlan, store, rank: int = 0, world_size: int = 1, prefetch: int = 2):
        self.plan = plan
        super().__init__(plan.graph, store, np.arange(plan.pos.shape[1]), plan.sampler.fanouts, plan.batch_size,
                         plan.seed, rank=rank, world_size=world_size, prefetch=prefetch)

    def _order(self, epoch: int) -> list:
        return rank_batches(np.arange(self.plan.num_batches), self.rank, self.world_size)

    def _produce(self, epoch: int, i: int) -> tuple[LinkMiniBatch, torch.Tensor]:
        t0 = time.perf_counter()
        mb = self.plan.sample(epoch, i)
        t1 = time.perf_counter()
        x = torch_rows(self.store.read(mb.n_id))
        self._add("sample_s", t1 - t0)
        self._add("read_s", time.perf_counter() - t1)
        return mb, x


def pairs_crc(pairs: np.ndarray, label: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(label), zlib.crc32(np.ascontiguousarray(pairs)))


def write_pair_index(folder: Path, plan: LinkPlan, epochs: int = 1) -> dict:
    """The pairs of the first ``epochs`` sampled epochs' batches (batch e * B + i) into a pack folder being built
    (module doc); returns meta.json's ``link``."""
    parts = [plan.pairs(e, i)[1:] for e in range(epochs) for i in range(plan.num_batches)]
    ptr = np.r_[0, np.cumsum([p.shape[1] for p, _ in parts])].astype(np.int64)
    write_npy(folder / "pairs.npy", np.concatenate([p for p, _ in parts], axis=1))
    write_npy(folder / "pair_label.npy", np.concatenate([lab for _, lab in parts]))
    write_npy(folder / "pairs_ptr.npy", ptr)
    write_npy(folder / "pairs_crc.npy", np.array([pairs_crc(p, lab) for p, lab in parts], dtype=np.uint32))
    return {**plan.key(), "epochs": epochs, "ptr_crc": zlib.crc32(ptr)}


class PairIndex:
    """A pack folder's pairs (written by ``write_pair_index``): ``attach(b, mb)`` makes batch b a LinkMiniBatch."""

    def __init__(self, folder: Path, meta: dict, num_batches: int, verify: bool = True):
        self.folder, self.verify = folder, verify
        try:
            self.pairs = np.load(folder / "pairs.npy", mmap_mode="r", allow_pickle=False)
            self.label = np.load(folder / "pair_label.npy", mmap_mode="r", allow_pickle=False)
            self.ptr = np.load(folder / "pairs_ptr.npy", allow_pickle=False)
            self.crc = np.load(folder / "pairs_crc.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise corrupt_pack(folder, f"{folder}: cannot read its link pairs ({type(e).__name__}: {e})") from None
        ok = (self.ptr.shape == (num_batches + 1,) and self.crc.shape == (num_batches,)
              and self.pairs.shape == (2, int(self.ptr[-1])) and self.label.shape == (int(self.ptr[-1]),))
        if not ok or (verify and zlib.crc32(np.ascontiguousarray(self.ptr)) != meta.get("ptr_crc")):
            raise corrupt_pack(folder, f"{folder}: pairs.npy, pair_label.npy, pairs_ptr.npy and pairs_crc.npy do not "
                                       f"agree with each other and meta.json ({num_batches} batches)")

    def attach(self, b: int, mb: MiniBatch) -> LinkMiniBatch:
        a, z = int(self.ptr[b]), int(self.ptr[b + 1])
        pairs, label = np.array(self.pairs[:, a:z]), np.array(self.label[a:z])
        if self.verify and pairs_crc(pairs, label) != int(self.crc[b]):
            raise corrupt_pack(self.folder, f"{self.folder}: the link pairs of batch {b} (pairs.npy, pair_label.npy) "
                                            "fail their checksum (pairs_crc.npy): the pack folder changed after it "
                                            "was written")
        if pairs.size and pairs.max() >= len(mb.seeds):
            raise corrupt_pack(self.folder, f"{self.folder}: batch {b}'s pairs point past its {len(mb.seeds)} seeds")
        return LinkMiniBatch(mb.seeds, mb.n_id, mb.blocks, pairs, label)


def open_pair_index(folder: Path, num_batches: int, verify: bool = True) -> PairIndex | None:
    """The pack folder's PairIndex, or None for a pack of node batches."""
    link = (read_meta(folder) or {}).get("link")
    return PairIndex(folder, link, num_batches, verify) if link else None
