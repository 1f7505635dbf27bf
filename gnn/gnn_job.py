"""Out-of-core GNN training: ``job = "plait.gnn.gnn_job"`` in a spec (examples/gnn_sage_ooc.toml).

On the driver, ``prepare`` generates the dataset at ``data.path`` when it holds none, uses the one there, or
refuses (gnn/data_path.py: a dataset Plait did not generate is never written; one generated with another recipe
is replaced only with ``data.rebuild=true``) and, for ``train.loader = "packed"``, runs the DiskGNN offline stage
once for ``workers.num`` ranks: ``train.pack_epochs`` epochs of batches sampled ahead (default min(train.epochs, 4);
epoch e replays sampled epoch e mod that, so training sees fresh neighbourhoods as online sampling does until the
cycle repeats), the hottest ``train.cache_frac`` of the feature rows chosen for the host cache, every batch's other
rows packed contiguously on disk. Both live outside the run directory (the packs in ``data.packs``, default
``<data.path>.packs/<recipe>``) and are reused while their recipe (dataset, fanouts, batch size, seed, cache rows,
ranks, sampled epochs) is unchanged (``data.rebuild_packs=true`` rebuilds them). Every loader checks the feature
rows it reads against their checksums; an error about a damaged file ends with the command that rebuilds it.

On every rank, ``train`` builds its loader, the model (GraphSAGE or GAT, gnn/models.py) under PyTorch DDP on the
process group the runtime set up, and trains ``train.epochs`` epochs; each epoch's batches are split over the
ranks (equal counts). Rank 0 logs per step: loss, seconds spent sampling / reading / waiting for data, host-cache
hit rates and the loader's bytes (``bytes_read``; ``bytes_requested`` for online-mmap, whose store counts rows
asked of the mapping); the step closing an epoch adds its accounting (``epoch_stats``: the process's disk reads,
distinct rows, both read amplifications). After each epoch the ranks measure validation accuracy together (up to
``train.eval_nodes`` nodes); checkpoints commit every ``train.checkpoint_every`` epochs, and
``train.resume = "latest"`` (or a restart) continues from the saved epoch.

Loaders (``train.loader``): "packed" (Plait: host cache + packed batches, one sequential read per batch),
"online-mmap" (online sampling, features through mmap: what most users do), "online-ginex" (online sampling,
per-row direct reads under a SIEVE host cache of ``cache_frac``), "memory" (every feature row loaded in RAM).

Tasks (``train.task``): "node" (node classification on the dataset's labels) or "link" (link prediction,
``train.link``: prepare holds out validation and test edges in ``<data.path>.link`` (gnn/link_split.py); batches
of train edges and random negatives, every loader (gnn/link_batches.py); MRR and Hits@K (gnn/link_task.py)).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from plait.gnn.data_path import DataConfig, dataset_action, ensure_dataset, pack_root, rebuild_hints, resolve_paths
from plait.gnn.dataset import check_dataset, load_labels, load_split, open_dataset, read_features
from plait.gnn.epoch_loader import epoch_train_loop
from plait.gnn.link_batches import LinkLoader, LinkPlan
from plait.gnn.link_split import LinkConfig, ensure_link_split, open_link_split
from plait.gnn.link_task import link_summary, train_link
from plait.gnn.models import MODELS, build_model
from plait.gnn.offline import prepare_packed
from plait.gnn.online_loader import OnlineLoader
from plait.gnn.packed_loader import PackedLoader
from plait.gnn.scoring import Scorer, param_digest
from plait.runtime.context import RankContext
from plait.runtime.trainer import LoopConfig
from plait.storage.cache import CachedStore
from plait.storage.disk_reader import DiskStore, process_read_bytes
from plait.storage.store import ArrayStore

LOADERS = ("packed", "online-mmap", "online-ginex", "memory")
TASKS = ("node", "link")


@dataclass
class TrainConfig(LoopConfig):
    model: str = "sage"  # sage | gat
    hidden: int = 128
    heads: int = 4  # gat only
    dropout: float = 0.5
    fanouts: list[int] = field(default_factory=lambda: [10, 10])  # one per layer, the seeds' hop first
    batch_size: int = 1024  # seed nodes per batch on each rank
    epochs: int = 5
    lr: float = 3e-3
    weight_decay: float = 0.0
    loader: str = "packed"  # packed | online-mmap | online-ginex | memory
    cache_frac: float = 0.1  # host cache: this share of the feature rows (packed, online-ginex)
    pack_epochs: int = 0  # packed: epochs of batches sampled ahead (epoch e replays e % this); 0 = min(epochs, 4)
    prefetch: int = 2  # batches read ahead on a background thread
    seed: int = 0
    eval_nodes: int = 4096  # validation (and test) nodes scored after each epoch; 0 = all
    checkpoint_every: int = 1  # epochs between checkpoints; 0 = only at the end (keep_last, resume: LoopConfig's)
    task: str = "node"  # node | link
    link: LinkConfig = field(default_factory=LinkConfig)  # train.task = "link" (gnn/link_split.py)

    def check(self) -> None:
        self.check_loop()
        if self.model not in MODELS:
            raise ValueError(f"train.model={self.model!r}: choose one of {', '.join(MODELS)}")
        if self.loader not in LOADERS:
            raise ValueError(f"train.loader={self.loader!r}: choose one of {', '.join(LOADERS)}")
        if not self.fanouts or any(f < 1 and f != -1 for f in self.fanouts):
            raise ValueError(f"train.fanouts={self.fanouts}: one positive fanout (or -1: all) per layer")
        if not 0 <= self.cache_frac <= 1:
            raise ValueError(f"train.cache_frac={self.cache_frac}: a share of the feature rows in [0, 1]")
        if min(self.batch_size, self.epochs, self.hidden) < 1 or min(self.prefetch, self.eval_nodes,
                                                                      self.pack_epochs) < 0:
            raise ValueError("train.batch_size, train.epochs and train.hidden must be >= 1, train.prefetch, "
                             f"train.eval_nodes and train.pack_epochs >= 0; got {self.batch_size}, {self.epochs}, "
                             f"{self.hidden}, {self.prefetch}, {self.eval_nodes}, {self.pack_epochs}")
        if self.task not in TASKS:
            raise ValueError(f"train.task={self.task!r}: choose one of {', '.join(TASKS)}")
        self.link.check()
        if self.model == "gat" and self.hidden % self.heads:
            raise ValueError(f"train.hidden={self.hidden} must divide by train.heads={self.heads} for GAT")

    def sampled_epochs(self) -> int:
        """Epochs of batches the packs hold: train.pack_epochs, or min(train.epochs, 4) when it is 0."""
        return self.pack_epochs or min(self.epochs, 4)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    world_size: int = field(default=0, init=False)  # set by validate (workers.num): the packs are cut for it
    pack_path: str = field(default="", init=False)  # set by prepare: this recipe's packs
    link_path: str = field(default="", init=False)  # set by prepare (train.task = "link"): the edge split


def validate(cfg: Config, world_size: int) -> None:
    """On the driver, before anything starts: the settings, and what data.path holds (gnn/data_path.py)."""
    cfg.data.check()
    cfg.train.check()
    resolve_paths(cfg.data)
    with rebuild_hints(cfg.data):
        if dataset_action(cfg.data)[0] == "use":  # a dataset to use as it is: its files agree (cheap checks)
            check_dataset(open_dataset(cfg.data.path))
    cfg.world_size = world_size


def prepare(cfg: Config, run_dir: Path) -> None:
    """On the driver: the dataset (gnn/data_path.py) and, for the packed loader, the packs for ``cfg.world_size``
    ranks, built unless current ones are there; absolute paths for the ranks."""
    data, t = cfg.data, cfg.train
    with rebuild_hints(data):
        ds = ensure_dataset(data)
        link = prepare_link(cfg, ds) if t.task == "link" else None
        if t.loader == "packed":
            out = pack_dir(cfg)
            before = _folder_id(out)
            info = prepare_packed(link.graph if link else ds.load_graph(), ds.features,
                                  None if link else load_split(ds.root).train, t.fanouts, t.batch_size,
                                  t.seed, cache_rows(cfg, ds.meta["num_nodes"]), out,
                                  world_size=max(cfg.world_size, 1), reuse=not (data.rebuild or data.rebuild_packs),
                                  epochs=t.sampled_epochs(), link=link)
            if _folder_id(out) != before:
                print(f"[plait] packed {info.pack_epochs} epoch(s) of batches in {out}: {info.preprocess_s:.1f} s, "
                      f"{info.blowup:.2f}x the feature bytes on disk", flush=True)
            cfg.pack_path = str(out)


def prepare_link(cfg: Config, ds) -> LinkPlan:
    """The link task's edge split (made once per recipe in ``<data.path>.link``) and its batch plan."""
    folder = Path(cfg.data.path).resolve()
    split = ensure_link_split(ds, cfg.train.link, folder.with_name(folder.name + ".link"), rebuild=cfg.data.rebuild)
    cfg.link_path = str(split.root)
    return link_plan(cfg)


def link_plan(cfg: Config) -> LinkPlan:
    t, split = cfg.train, open_link_split(cfg.link_path)
    return LinkPlan(split.graph(), split.train_pos, t.fanouts, t.batch_size, t.seed, t.link.neg_per_pos,
                    t.link.undirected)


def _folder_id(path: Path) -> int | None:
    return path.stat().st_ino if path.is_dir() else None


def cache_rows(cfg: Config, num_nodes: int) -> int:
    return int(cfg.train.cache_frac * num_nodes)


def pack_dir(cfg: Config) -> Path:
    """``<packs>/<recipe hash>``: a recipe changed (dataset, sampling, cache, ranks) gets a folder of its own."""
    data, t = cfg.data, cfg.train
    meta = {k: v for k, v in open_dataset(data.path).meta.items() if k != "seconds"}
    recipe = {"dataset": meta, "fanouts": list(t.fanouts), "batch_size": t.batch_size, "seed": t.seed,
              "cache_rows": cache_rows(cfg, meta["num_nodes"]), "world_size": max(cfg.world_size, 1),
              "pack_epochs": t.sampled_epochs()}
    if t.task == "link":
        recipe["link"] = {**t.link.recipe(), "neg_per_pos": t.link.neg_per_pos}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return pack_root(data).resolve() / f"recipe-{digest}"


def make_loader(cfg: Config, ctx: RankContext, ds, train_ids: np.ndarray):
    """This rank's EpochLoader for ``train.loader`` (gnn/online_loader.py, gnn/packed_loader.py)."""
    t, rank, world = cfg.train, ctx.rank, ctx.world_size
    if t.loader == "packed":
        if not cfg.pack_path or cfg.world_size != world:
            raise ValueError(f"train.loader='packed' needs packs cut for {world} ranks (have {cfg.world_size}: "
                             f"{cfg.pack_path or 'none'}); run the job through `plait run` or run_job, whose "
                             "prepare step builds them")
        return PackedLoader(cfg.pack_path, rank=rank, world_size=world, prefetch=t.prefetch)
    if t.loader == "online-mmap":  # each row's 4 KiB blocks checked as it is read, like every other path
        store = DiskStore(ds.features, mode="mmap")
    elif t.loader == "online-ginex":
        rows = max(cache_rows(cfg, ds.meta["num_nodes"]), 1)
        store = CachedStore(DiskStore(ds.features, mode="direct"), "sieve", rows)
    else:
        store = ArrayStore(read_features(ds.root))
    if t.task == "link":
        return LinkLoader(link_plan(cfg), store, rank=rank, world_size=world, prefetch=t.prefetch)
    return OnlineLoader(ds.load_graph(), store, train_ids, t.fanouts, t.batch_size, t.seed, rank=rank,
                        world_size=world, prefetch=t.prefetch)


def train(ctx: RankContext, cfg: Config) -> dict:
    with rebuild_hints(cfg.data):  # a damaged dataset or pack file: its error names the command that rebuilds it
        return _train(ctx, cfg)


def _train(ctx: RankContext, cfg: Config) -> dict:
    t = cfg.train
    ds = open_dataset(cfg.data.path)
    if t.task == "link":
        return train_link(ctx, cfg, ds, make_loader, step_stats, describe)
    labels, split = torch.from_numpy(load_labels(ds.root)), load_split(ds.root)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(t.model, ds.meta["feat_dim"], t.hidden, ds.meta["num_classes"], len(t.fanouts), t.heads,
                        t.dropout).to(ctx.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loader = make_loader(cfg, ctx, ds, split.train)
    per_epoch = loader.num_batches()
    loop = epoch_train_loop(ctx, t, per_epoch, ddp, opt)
    scorer = Scorer(ds, t, ctx)
    val_acc, epoch_s, batches = [], [], None
    try:
        for step in loop:
            epoch, i = divmod(step, per_epoch)
            if i == 0 or batches is None:
                ddp.train()
                t_epoch, batches = time.perf_counter(), iter(loader.epoch(epoch))
                before = prev = loader.stats()
                io_before = process_read_bytes()
            mb, x = next(batches)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = ddp(x.to(ctx.device, non_blocking=True), mb.blocks)
            loss = F.cross_entropy(out, labels[mb.seeds].to(ctx.device))
            loss.backward()
            opt.step()
            now = loader.stats()
            scalars = {"loss": loss.item(), "epoch": epoch, "compute_s": time.perf_counter() - t0,
                       **step_stats(prev, now, t.loader)}
            prev = now
            if i + 1 == per_epoch:  # the epoch's end: score it
                epoch_s.append(time.perf_counter() - t_epoch)
                io_after = process_read_bytes()
                disk = None if io_before is None or io_after is None else io_after - io_before
                val_acc.append(scorer.accuracy(model, split.val, epoch))
                scalars.update(val_acc=val_acc[-1], epoch_s=epoch_s[-1], **epoch_stats(before, loader.stats(), disk,
                                                                                        t.loader))
                mean = np.mean(loop.losses[len(loop.losses) - i:] + [scalars["loss"]])
                ctx.log(f"epoch {epoch + 1}/{t.epochs}: loss {mean:.4f} val_acc {val_acc[-1]:.4f} "
                        f"({epoch_s[-1]:.1f} s; {describe(before, loader.stats(), t.loader, disk)})")
            loop.step_done(**scalars)
        result = loop.finish()
        test_acc = scorer.accuracy(model, split.test, t.epochs)
        totals = loader.stats()
    finally:
        loader.close()
    return {"rank": ctx.rank, "start_epoch": result.start_step // per_epoch if per_epoch else 0, **result.as_dict(),
            "val_acc": val_acc, "test_acc": test_acc, "epoch_s": epoch_s, "loader_stats": totals,
            "param_digest": param_digest(model)}


def bytes_key(loader: str) -> str:
    """The name of the loader's bytes_read in metrics and the summary: ``bytes_requested`` for online-mmap, whose
    store counts the bytes of the rows asked of the mapping (the page cache serves some, the kernel reads pages
    around others), ``bytes_read`` for the rest (direct reads of the disk; nothing for memory)."""
    return "bytes_requested" if loader == "online-mmap" else "bytes_read"


def step_stats(prev: dict, now: dict, loader: str = "packed") -> dict:
    """What one step cost the loader: seconds and bytes since ``prev``, and the current hit rates."""
    out = {k: now.get(k, 0) - prev.get(k, 0) for k in ("sample_s", "read_s", "wait_s")}
    out[bytes_key(loader)] = now.get("bytes_read", 0) - prev.get("bytes_read", 0)
    out.update({k: v for k, v in now.items() if k.endswith("hit_rate")})
    return out


STORE_BYTES = {  # what a loader's bytes_read counts, for the log line
    "packed": "MiB of packs read (direct I/O)",
    "online-mmap": "MiB of rows requested through mmap (the page cache may serve them)",
    "online-ginex": "MiB of rows read (direct I/O, host-cache misses)",
    "memory": "MiB read by the loader (rows are in RAM)",
}


def epoch_stats(before: dict, after: dict, disk: int | None, loader: str = "packed") -> dict:
    """One epoch's accounting (metrics at its last step): ``disk_read_bytes`` (the process's /proc/self/io read_bytes
    over the epoch's steps, -1 where the kernel does not say; it includes whatever else the process read), the
    loader's ``distinct_rows`` and ``distinct_bytes_needed`` (gnn/epoch_loader.py), and both read amplifications of
    the bytes read: ``ampl_rows`` against the rows asked of the disk (a row once per batch) and ``ampl_distinct``
    against the epoch's distinct rows outside a fixed host cache. The bytes read are the loader's direct reads, for
    online-mmap (whose store counts rows requested) disk_read_bytes."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ("bytes_read", "bytes_needed", "distinct_rows",
                                                         "distinct_bytes_needed")}
    if loader == "online-mmap":
        d["bytes_read"] = max(disk or 0, 0)
    return {"disk_read_bytes": -1 if disk is None else int(disk), "distinct_rows": int(d["distinct_rows"]),
            "distinct_bytes_needed": int(d["distinct_bytes_needed"]),
            "ampl_rows": d["bytes_read"] / d["bytes_needed"] if d["bytes_needed"] else 0.0,
            "ampl_distinct": d["bytes_read"] / d["distinct_bytes_needed"] if d["distinct_bytes_needed"] else 0.0}


def describe(before: dict, after: dict, loader: str = "packed", disk: int | None = None) -> str:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ("sample_s", "read_s", "wait_s", "bytes_read")}
    e = epoch_stats(before, after, disk, loader)
    rates = " ".join(f"{k} {v:.2f}" for k, v in after.items() if k.endswith("hit_rate"))
    kernel = "" if disk is None else f", {disk / 2**20:.1f} MiB read from disk by this process (/proc/self/io)"
    return (f"sample {d['sample_s']:.2f} s, read {d['read_s']:.2f} s, waited {d['wait_s']:.2f} s, "
            f"{d['bytes_read'] / 2**20:.1f} {STORE_BYTES.get(loader, 'MiB read by the loader')}{kernel}, "
            f"{e['distinct_rows']:,} distinct rows (amplification {e['ampl_distinct']:.2f}x their bytes outside the "
            f"host cache, {e['ampl_rows']:.2f}x the rows asked){', ' + rates if rates else ''}")


def summarize(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    if cfg.train.task == "link":
        return link_summary(cfg, run_dir, results)
    main = results[0]  # first/last loss, the run's start and the plot: the runtime's (runtime/run_summary.py)
    out = {"model": cfg.train.model, "loader": cfg.train.loader, "epochs": cfg.train.epochs,
           "start_epoch": main["start_epoch"],
           "val_acc": [round(a, 4) for a in main["val_acc"]], "test_acc": round(main["test_acc"], 4),
           "epoch_s": [round(s, 2) for s in main["epoch_s"]],
           bytes_key(cfg.train.loader): int(sum(r["loader_stats"].get("bytes_read", 0) for r in results)),
           "param_digests": [r["param_digest"] for r in results], "checkpoint": main["checkpoint"],
           "metrics": str(run_dir / "metrics.jsonl")}
    return out
