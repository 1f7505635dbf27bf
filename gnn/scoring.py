"""What the GNN job measures of a model: accuracy on a split shared over the ranks, and a digest of its weights.

    scorer = Scorer(ds, cfg.train, ctx)
    scorer.accuracy(model, split.val, epoch)     # the same figure on every rank (counts summed with all_reduce)
    param_digest(model)                          # equal on every data-parallel rank after each step
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.distributed as dist
from plait.gnn.dataset import load_labels
from plait.gnn.sampler import NeighborSampler
from plait.runtime.context import RankContext
from plait.storage.disk_reader import DiskStore


class Scorer:
    """Accuracy on up to ``eval_nodes`` nodes of a split, shared over the ranks (each scores its slice; the counts
    are summed with all_reduce). Features come through buffered reads of the feature file, each block checked
    against its crc32 (a damaged one raises FeatureFileError naming it)."""

    def __init__(self, ds, t, ctx: RankContext):
        """``t``: the job's TrainConfig (fanouts, batch_size, eval_nodes, seed)."""
        self.sampler = NeighborSampler(ds.load_graph(), t.fanouts)
        self.store = DiskStore(ds.features, mode="pread")
        self.labels = load_labels(ds.root)
        self.t, self.ctx = t, ctx

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module, ids: np.ndarray, epoch: int) -> float:
        t, ctx = self.t, self.ctx
        if t.eval_nodes and len(ids) > t.eval_nodes:
            ids = np.sort(np.random.default_rng([t.seed, 7]).choice(ids, t.eval_nodes, replace=False))
        mine = ids[ctx.rank :: ctx.world_size]
        model.eval()
        correct = 0
        for mb in self.sampler.batches(mine, t.batch_size, t.seed, epoch=10**6 + epoch, shuffle=False):
            x = torch.from_numpy(self.store.read(mb.n_id)).to(ctx.device)
            correct += int((model(x, mb.blocks).argmax(-1).cpu().numpy() == self.labels[mb.seeds]).sum())
        model.train()
        counts = torch.tensor([correct, len(mine)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(counts)
        return float(counts[0] / counts[1]) if counts[1] else math.nan


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on every data-parallel rank after each step."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
