"""Uniform neighbour sampling with fanouts, vectorised, deterministic under a seed, in PyG's block layout.

    sampler = NeighborSampler(graph, fanouts=[10, 10])               # graph: a CSCGraph (memory-mapped is fine)
    for mb in sampler.batches(train_ids, batch_size=1024, seed=0, epoch=3):
        x = store.read(mb.n_id)                                      # feature rows of every input node, seeds first
        h = torch.from_numpy(x)
        for conv, block in zip(convs, mb.blocks):                    # outermost hop first
            h = conv((h, h[: block.size[1]]), block.edge_index, block.size)
        # h: one row per seed, in the order of mb.seeds

Convention (PyG's classic NeighborSampler "adjs"): a batch's nodes are one list ``n_id`` of global ids in which
every hop's nodes are a prefix of the next hop's: seeds first, then nodes first reached at hop 1, then at hop 2...
Local id = position in ``n_id``. ``blocks[l]`` maps ``size[0]`` source nodes (``n_id[:size[0]]``) to ``size[1]``
target nodes (``n_id[:size[1]]``); ``edge_index`` is (2, E) int64, row 0 the source's local id, row 1 the
target's. ``blocks[0]`` is the outermost hop (its sources are all of ``n_id``), ``blocks[-1]`` targets the seeds,
and ``blocks[l].size[1] == blocks[l + 1].size[0]``: stacked layers shrink the rows hop by hop to the seeds.
New nodes of a hop are numbered in order of first appearance (target by target, neighbour by neighbour).

Sampling: each target takes ``fanout`` of its in-neighbours uniformly at random *without replacement* (DGL's and
PyG's default); a target with ``degree <= fanout`` takes all of them, and ``fanout=-1`` takes all neighbours of
every target. Without replacement uses Floyd's algorithm vectorised across targets: ``fanout`` steps per hop, each
one numpy operation over every target with ``degree > fanout`` — no Python loop per node, exactly uniform
subsets. ``replace=True`` draws ``floor(u * degree)`` offsets independently instead (repeats possible).
Sampled positions are distinct edges of the CSC; a multigraph's repeated edge may thus be taken twice.

Relabelling uses two int32 arrays of ``num_nodes`` entries per sampling thread (8 bytes per node, allocated on
first use, reset after each batch): O(sampled edges) per hop, no sort.

Excluding edges (link prediction): ``sample(seeds, rng, exclude=edges)`` drops every sampled edge listed in
``exclude`` ((2, X) global ids, row 0 source, row 1 target) before relabelling, so those edges and any node reached
only through them stay out of the batch. As in DGL GraphBolt's ``exclude_seed_edges``, the edges are removed after
sampling: a target that drew an excluded edge keeps one neighbour fewer.

Determinism: batch ``i`` of epoch ``e`` samples with ``batch_rng(seed, e, i)`` and the epoch's order is drawn
from ``(seed, e)`` alone, so any batch can be re-sampled on its own (offline sampling, several workers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from plait.gnn.graph import CSCGraph

_SHUFFLE, _SAMPLE = 0, 1  # stream tags: SeedSequence keys are kept the same length (trailing zeros are ignored)
_UNSET = np.iinfo(np.int32).max


@dataclass(frozen=True, eq=False)
class Block:
    edge_index: torch.Tensor  # (2, E) int64: row 0 source local id, row 1 target local id
    size: tuple[int, int]  # (num_src, num_dst): sources n_id[:num_src], targets n_id[:num_dst]


@dataclass(frozen=True, eq=False)
class MiniBatch:
    seeds: np.ndarray  # int64 global ids of the batch's targets
    n_id: np.ndarray  # int64 global ids of every input node, seeds first: the feature rows to read
    blocks: list[Block]  # outermost hop first; blocks[-1] targets the seeds

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @property
    def num_edges(self) -> int:
        return sum(int(b.edge_index.shape[1]) for b in self.blocks)


def batch_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator batch ``index`` of ``epoch`` samples with."""
    return np.random.default_rng([seed, epoch, _SAMPLE, index])


def batch_seeds(ids, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                drop_last: bool = False) -> list[np.ndarray]:
    """``ids`` split into batches of ``batch_size`` (the last one smaller unless ``drop_last``), in an order
    shuffled by ``(seed, epoch)`` when ``shuffle``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = np.asarray(ids, dtype=np.int64)
    if shuffle:
        ids = np.random.default_rng([seed, epoch, _SHUFFLE, 0]).permutation(ids)
    stop = len(ids) - len(ids) % batch_size if drop_last else len(ids)
    return [ids[a : a + batch_size] for a in range(0, stop, batch_size)]


def sample_neighbors(graph: CSCGraph, nodes: np.ndarray, fanout: int, rng: np.random.Generator,
                     replace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Sample in-neighbours of each of ``nodes``: returns (how many each node took, their global ids
    concatenated node by node)."""
    start = np.asarray(graph.indptr[nodes])
    deg = np.asarray(graph.indptr[nodes + 1]) - start
    if fanout < 0:
        take = deg
    elif replace:
        take = np.where(deg > 0, fanout, 0)
    else:
        take = np.minimum(deg, fanout)
    total = int(take.sum())
    seg_start = np.cumsum(take) - take
    offsets = np.arange(total, dtype=np.int64) - np.repeat(seg_start, take)  # 0..take-1: "take all" targets
    if fanout >= 0 and replace:
        offsets = np.floor(rng.random(total) * np.repeat(deg, take)).astype(np.int64)
    elif fanout >= 0:
        big = deg > fanout
        if big.any():
            offsets[np.repeat(big, take)] = _floyd(deg[big], fanout, rng).ravel()
    return take, np.asarray(graph.indices[np.repeat(start, take) + offsets], dtype=np.int64)


def _floyd(deg: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """One uniform k-subset of range(deg[i]) per row (every deg[i] > k), by Floyd's algorithm run on all rows
    at once: for j = d-k .. d-1, draw t in [0, j]; keep t unless already chosen, then keep j."""
    chosen = np.empty((len(deg), k), dtype=np.int64)
    for i in range(k):
        j = deg - k + i
        t = np.minimum(np.floor(rng.random(len(deg)) * (j + 1)).astype(np.int64), j)
        if i:
            t = np.where((chosen[:, :i] == t[:, None]).any(axis=1), j, t)
        chosen[:, i] = t
    return chosen


class NeighborSampler:
    """Samples ``len(fanouts)`` hops around seed nodes; ``fanouts[0]`` is the hop next to the seeds (as in PyG's
    ``num_neighbors``); -1 takes every neighbour."""

    def __init__(self, graph: CSCGraph, fanouts: Sequence[int], replace: bool = False):
        fanouts = [int(f) for f in fanouts]
        if not fanouts or any(f < -1 or f == 0 for f in fanouts):
            raise ValueError(f"fanouts must be a non-empty list of positive ints (or -1 for all), got {fanouts}")
        self.graph, self.fanouts, self.replace = graph, fanouts, replace
        self._tls = threading.local()

    def sample(self, seeds, rng: np.random.Generator, exclude=None) -> MiniBatch:
        """The mini-batch around ``seeds`` (distinct node ids), drawn with ``rng``; edges in ``exclude`` ((2, X)
        global source and target ids) never appear in it."""
        seeds = np.asarray(seeds)
        if seeds.ndim != 1 or seeds.dtype.kind not in "iu":
            raise TypeError(f"seeds must be a 1-D integer array, got shape {seeds.shape} dtype {seeds.dtype}")
        seeds = seeds.astype(np.int64)
        n = self.graph.num_nodes
        if seeds.size and (seeds.min() < 0 or seeds.max() >= n):
            bad = int(seeds.min()) if seeds.min() < 0 else int(seeds.max())
            raise IndexError(f"seed node {bad} is out of range [0, {n}) for this graph")
        if len(np.unique(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct; {len(seeds) - len(np.unique(seeds))} repeat(s) among "
                             f"{len(seeds)}: pass np.unique(seeds)")
        banned = edge_keys(np.asarray(exclude).reshape(2, -1), n) if exclude is not None else None
        local, first = self._scratch()
        nodes, blocks = seeds, []
        local[seeds] = np.arange(len(seeds), dtype=np.int32)
        try:
            for fanout in self.fanouts:
                take, nbrs = sample_neighbors(self.graph, nodes, fanout, rng, self.replace)
                if banned is not None and banned.size and nbrs.size:
                    take, nbrs = _drop_edges(nodes, take, nbrs, banned, n)
                nodes, src_local = _relabel(nodes, nbrs, local, first)
                dst_local = np.repeat(np.arange(len(take), dtype=np.int64), take)
                blocks.append(Block(torch.from_numpy(np.stack([src_local, dst_local])), (len(nodes), len(take))))
        except BaseException:
            self._tls.arrays = None  # may be left dirty: start afresh next time
            raise
        local[nodes] = -1
        return MiniBatch(seeds, nodes, blocks[::-1])

    def _scratch(self) -> tuple[np.ndarray, np.ndarray]:
        """This thread's global -> local id map (-1 = absent) and first-appearance buffer, 8 bytes per node."""
        arrays = getattr(self._tls, "arrays", None)
        if arrays is None:
            n = self.graph.num_nodes
            arrays = self._tls.arrays = (np.full(n, -1, dtype=np.int32), np.full(n, _UNSET, dtype=np.int32))
        return arrays

    def __getstate__(self) -> dict:  # pickles without its per-thread scratch arrays
        return {k: v for k, v in self.__dict__.items() if k != "_tls"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _tls=threading.local())

    def batches(self, ids, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[MiniBatch]:
        """The epoch's mini-batches over target nodes ``ids``: batch i sampled with batch_rng(seed, epoch, i)."""
        for i, seeds in enumerate(batch_seeds(ids, batch_size, seed, epoch, shuffle, drop_last)):
            yield self.sample(seeds, batch_rng(seed, epoch, i))


def batches(graph: CSCGraph, train_ids, batch_size: int, fanouts: Sequence[int], seed: int, epoch: int,
            replace: bool = False) -> Iterator[MiniBatch]:
    """``NeighborSampler(graph, fanouts, replace).batches(train_ids, batch_size, seed, epoch)``."""
    return NeighborSampler(graph, fanouts, replace).batches(train_ids, batch_size, seed, epoch)


def edge_keys(edges: np.ndarray, num_nodes: int) -> np.ndarray:
    """Sorted distinct int64 keys ``src * num_nodes + dst`` of (2, X) edges."""
    edges = np.asarray(edges, dtype=np.int64)
    return np.unique(edges[0] * num_nodes + edges[1])


def _drop_edges(nodes, take, nbrs, banned, n) -> tuple[np.ndarray, np.ndarray]:
    """Sampled (take, nbrs) of targets ``nodes`` without the edges nbr -> target whose keys are in ``banned``."""
    keys = nbrs * n + np.repeat(nodes, take)
    pos = np.minimum(np.searchsorted(banned, keys), len(banned) - 1)
    keep = banned[pos] != keys
    if keep.all():
        return take, nbrs
    owner = np.repeat(np.arange(len(take)), take)
    return np.bincount(owner[keep], minlength=len(take)).astype(take.dtype), nbrs[keep]


def _relabel(nodes: np.ndarray, nbrs: np.ndarray, local: np.ndarray,
             first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``nodes`` extended by the ``nbrs`` not yet in it (in order of first appearance), and each nbr's local id.
    ``local[v]`` holds the local id of every node in ``nodes`` and -1 elsewhere (updated here); ``first`` is all
    _UNSET on entry and on return. O(len(nbrs)), no sort."""
    cand = nbrs[local[nbrs] < 0]
    idx = np.arange(len(cand), dtype=np.int32)
    np.minimum.at(first, cand, idx)  # first[v] = index of v's first appearance among the candidates
    new = cand[first[cand] == idx]
    first[cand] = _UNSET
    local[new] = np.arange(len(nodes), len(nodes) + len(new), dtype=np.int32)
    return np.concatenate([nodes, new]), local[nbrs].astype(np.int64)
