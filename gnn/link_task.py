"""Link prediction, the GNN job's second task (``train.task = "link"``): model, ranking metrics, training loop.

    model = LinkModel(encoder, hidden, decoder="dot")      # encoder: a BlockGNN giving ``hidden`` numbers a node
    logits = model(x, mb.blocks, torch.from_numpy(mb.pairs))       # one logit per pair of the LinkMiniBatch
    rank_metrics(pos_scores, neg_scores, ks=[10, 50])      # {"mrr": ..., "hits@10": ..., "hits@50": ...}

Training minimises binary cross-entropy over each batch's positives and negatives (gnn/link_batches.py).
Evaluation (``LinkEvaluator``) is OGB ogbl-citation2's protocol: each held-out edge ``(s, d)`` is ranked against
``eval_negatives`` fixed destinations ``(s, d')`` drawn once per split from ``split_seed``; rank = 1 + (number of
negatives scoring above it + number scoring at least as high) / 2, MRR the mean of 1 / rank, Hits@K the share of
ranks <= K. Embeddings come from sampled inference on the train graph (held-out edges absent) with the training
fanouts, seeded per epoch. Each rank scores its slice of up to ``eval_edges`` held-out edges; the sums are
all_reduced, so every rank reports the same figures.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from plait.gnn.epoch_loader import epoch_train_loop
from plait.gnn.link_split import LinkSplit
from plait.gnn.sampler import NeighborSampler
from plait.runtime.context import RankContext
from plait.storage.disk_reader import DiskStore
from torch import nn

EVAL_NODES = 50_000  # distinct nodes embedded at once while scoring


class LinkModel(nn.Module):
    """A BlockGNN encoder and a decoder of pairs: ``dot`` (h_s . h_d) or ``mlp`` (an MLP on h_s * h_d)."""

    def __init__(self, encoder: nn.Module, hidden: int, decoder: str = "dot"):
        super().__init__()
        self.encoder, self.kind = encoder, decoder
        self.mlp = (nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
                    if decoder == "mlp" else None)

    def decode(self, hs: torch.Tensor, hd: torch.Tensor) -> torch.Tensor:
        return (hs * hd).sum(-1) if self.mlp is None else self.mlp(hs * hd).squeeze(-1)

    def forward(self, x: torch.Tensor, blocks, pairs: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x, blocks)  # one row per seed
        return self.decode(h[pairs[0]], h[pairs[1]])


def rank_metrics(pos: np.ndarray, neg: np.ndarray, ks=(10, 50)) -> dict:
    """MRR and Hits@K of positives ``pos`` (P,) each against its row of negatives ``neg`` (P, M) (module doc)."""
    return {k: v / len(pos) for k, v in rank_sums(pos, neg, ks).items()} if len(pos) else {}


def rank_sums(pos: np.ndarray, neg: np.ndarray, ks) -> dict:
    pos, neg = np.asarray(pos, dtype=np.float64)[:, None], np.asarray(neg, dtype=np.float64)
    rank = 1 + 0.5 * ((neg > pos).sum(1) + (neg >= pos).sum(1))
    return {"mrr": float((1 / rank).sum()), **{f"hits@{k}": float((rank <= k).sum()) for k in ks}}


class LinkEvaluator:
    """MRR and Hits@K on a split's held-out edges (module doc), shared over the ranks."""

    def __init__(self, split: LinkSplit, features, t, ctx: RankContext):
        """``t``: the job's TrainConfig (fanouts, batch_size, seed, link)."""
        self.sampler = NeighborSampler(split.graph(), t.fanouts)
        self.store = DiskStore(features, mode="pread")  # each 4 KiB block checked against its crc32
        self.t, self.ctx, self.link = t, ctx, t.link
        self.edges = {"val": self._pick(split.val, 1), "test": self._pick(split.test, 2)}

    def _pick(self, edges: np.ndarray, which: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's held-out edges of a split (up to eval_edges in all) and their fixed negatives."""
        n, link = self.sampler.graph.num_nodes, self.link
        if link.eval_edges and edges.shape[1] > link.eval_edges:
            keep = np.sort(np.random.default_rng([link.split_seed, 7, which]).choice(edges.shape[1],
                                                                                    link.eval_edges, replace=False))
            edges = edges[:, keep]
        neg = np.random.default_rng([link.split_seed, 11, which]).integers(0, n, (edges.shape[1], link.eval_negatives))
        r, w = self.ctx.rank, self.ctx.world_size
        return edges[:, r::w], neg[r::w]

    @torch.no_grad()
    def metrics(self, model: LinkModel, which: str, epoch: int) -> dict:
        """{"mrr", "hits@K"...} over the ``which`` ("val" or "test") edges: the same on every rank."""
        edges, neg = self.edges[which]
        ks = self.link.hits
        sums = np.zeros(1 + len(ks))
        chunk = max(1, EVAL_NODES // (neg.shape[1] + 2))
        model.eval()
        try:
            for a in range(0, edges.shape[1], chunk):
                src, dst, nd = edges[0, a : a + chunk], edges[1, a : a + chunk], neg[a : a + chunk]
                nodes = np.unique(np.concatenate([src, dst, nd.ravel()]))
                h = self._embed(model, nodes, epoch)
                hs = h[np.searchsorted(nodes, src)]
                pos = model.decode(hs, h[np.searchsorted(nodes, dst)])
                negs = model.decode(hs[:, None, :], h[torch.from_numpy(np.searchsorted(nodes, nd))])
                sums += list(rank_sums(pos.cpu().numpy(), negs.cpu().numpy(), ks).values())
        finally:
            model.train()
        totals = torch.tensor([*sums, edges.shape[1]], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals)
        count = float(totals[-1])
        names = ["mrr", *(f"hits@{k}" for k in ks)]
        return {name: float(totals[i]) / count if count else math.nan for i, name in enumerate(names)}

    def _embed(self, model: LinkModel, nodes: np.ndarray, epoch: int) -> torch.Tensor:
        out = []
        for mb in self.sampler.batches(nodes, self.t.batch_size, self.t.seed, epoch=10**6 + epoch, shuffle=False):
            x = torch.from_numpy(self.store.read(mb.n_id)).to(self.ctx.device)
            out.append(model.encoder(x, mb.blocks))
        return torch.cat(out)


def train_link(ctx: RankContext, cfg, ds, make_loader, step_stats, describe) -> dict:
    """The GNN job's training on one rank for ``train.task = "link"`` (gnn/gnn_job.py passes its helpers)."""
    from plait.gnn.link_split import open_link_split
    from plait.gnn.models import build_model
    from plait.gnn.scoring import param_digest

    t = cfg.train
    split = open_link_split(cfg.link_path)
    torch.manual_seed(t.seed)
    encoder = build_model(t.model, ds.meta["feat_dim"], t.hidden, t.hidden, len(t.fanouts), t.heads, t.dropout)
    model = LinkModel(encoder, t.hidden, t.link.decoder).to(ctx.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loader = make_loader(cfg, ctx, ds, None)
    per_epoch = loader.num_batches()
    loop = epoch_train_loop(ctx, t, per_epoch, ddp, opt, task="link")
    evaluator = LinkEvaluator(split, ds.features, t, ctx)
    val, epoch_s, batches = [], [], None
    try:
        for step in loop:
            epoch, i = divmod(step, per_epoch)
            if i == 0 or batches is None:
                ddp.train()
                t_epoch, batches = time.perf_counter(), iter(loader.epoch(epoch))
                before = prev = loader.stats()
            mb, x = next(batches)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = ddp(x.to(ctx.device, non_blocking=True), mb.blocks, torch.from_numpy(mb.pairs).to(ctx.device))
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(mb.label).to(ctx.device))
            loss.backward()
            opt.step()
            now = loader.stats()
            scalars = {"loss": loss.item(), "epoch": epoch, "compute_s": time.perf_counter() - t0,
                       **step_stats(prev, now)}
            prev = now
            if i + 1 == per_epoch:
                epoch_s.append(time.perf_counter() - t_epoch)
                val.append(evaluator.metrics(model, "val", epoch))
                scalars.update({f"val_{k}": v for k, v in val[-1].items()}, epoch_s=epoch_s[-1])
                mean = np.mean(loop.losses[len(loop.losses) - i :] + [scalars["loss"]])
                shown = " ".join(f"val_{k} {v:.4f}" for k, v in val[-1].items())
                ctx.log(f"epoch {epoch + 1}/{t.epochs}: loss {mean:.4f} {shown} ({epoch_s[-1]:.1f} s; "
                        f"{describe(before, loader.stats())})")
            loop.step_done(**scalars)
        result = loop.finish()
        test = evaluator.metrics(model, "test", t.epochs)
        totals = loader.stats()
    finally:
        loader.close()
        evaluator.store.close()
    return {"rank": ctx.rank, "start_epoch": result.start_step // per_epoch if per_epoch else 0, **result.as_dict(),
            "val": val, "test": test, "epoch_s": epoch_s, "loader_stats": totals, "param_digest": param_digest(model)}


def link_summary(cfg, run_dir, results: list[dict]) -> dict:
    main = results[0]
    return {"task": "link", "model": cfg.train.model, "decoder": cfg.train.link.decoder, "loader": cfg.train.loader,
            "epochs": cfg.train.epochs, "start_epoch": main["start_epoch"],
            "val_mrr": [round(v["mrr"], 4) for v in main["val"]],
            "val": [{k: round(x, 4) for k, x in v.items()} for v in main["val"]],
            "test": {k: round(v, 4) for k, v in main["test"].items()},
            "random_mrr": round(random_mrr(cfg.train.link.eval_negatives), 4),
            "epoch_s": [round(s, 2) for s in main["epoch_s"]],
            "bytes_read": int(sum(r["loader_stats"].get("bytes_read", 0) for r in results)),
            "param_digests": [r["param_digest"] for r in results], "checkpoint": main["checkpoint"],
            "split": cfg.link_path, "metrics": str(run_dir / "metrics.jsonl")}


def random_mrr(negatives: int) -> float:
    """The MRR of a scorer that ranks a positive uniformly among its ``negatives`` + 1 candidates."""
    return float(np.mean(1 / np.arange(1, negatives + 2)))
