"""Out-of-core GNN training: ``job = "plait.gnn.gnn_job"`` in a spec (examples/gnn_sage_ooc.toml).

On the driver, ``prepare`` generates the dataset at ``data.path`` if it is missing (a folder that is not a Plait
dataset is refused, never overwritten) and, for ``train.loader = "packed"``, runs the DiskGNN offline stage once
for ``workers.num`` ranks: one epoch of batches sampled ahead, the hottest ``train.cache_frac`` of the feature
rows chosen for the host cache, every batch's other rows packed contiguously on disk. Both live outside the run
directory (the packs in ``data.packs``, default ``<data.path>.packs/<recipe>``) and are reused while their
recipe (dataset, fanouts, batch size, seed, cache rows, ranks) is unchanged.

On every rank, ``train`` builds its loader, the model (GraphSAGE or GAT, gnn/models.py) under PyTorch DDP on the
process group the runtime set up, and trains ``train.epochs`` epochs; each epoch's batches are split over the
ranks (equal counts). Rank 0 logs per step: loss, seconds spent sampling / reading / waiting for data, host-cache
hit rates and bytes read from disk. After each epoch the ranks measure validation accuracy together (up to
``train.eval_nodes`` nodes); checkpoints commit every ``train.checkpoint_every`` epochs, and
``train.resume = "latest"`` (or a restart) continues from the saved epoch.

Loaders (``train.loader``): "packed" (Plait: host cache + packed batches, one sequential read per batch),
"online-mmap" (online sampling, features through mmap: what most users do), "online-ginex" (online sampling,
per-row direct reads under a SIEVE host cache of ``cache_frac``), "memory" (every feature row loaded in RAM).
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
from plait.gnn.generate import generate_dataset, is_dataset_folder, load_features, load_labels, load_split, open_dataset
from plait.gnn.models import MODELS, build_model
from plait.gnn.offline import is_pack_folder, prepare_packed
from plait.gnn.online_loader import OnlineLoader
from plait.gnn.packed_loader import PackedLoader
from plait.gnn.scoring import Scorer, param_digest
from plait.runtime.checkpoint import Checkpointer, ModelOptimizer
from plait.runtime.context import RankContext
from plait.runtime.metrics import MetricsLogger
from plait.storage.cache import CachedStore
from plait.storage.disk_reader import DiskStore
from plait.storage.store import ArrayStore

LOADERS = ("packed", "online-mmap", "online-ginex", "memory")


@dataclass
class DataConfig:
    path: str = "data/gnn"  # the dataset folder (generate_dataset's); generated here when missing
    generate: bool = True  # False: data.path must already hold a dataset, used as it is
    num_nodes: int = 20_000  # generate settings (gnn/generate.py); a generated dataset with others is remade
    avg_degree: float = 20.0
    num_classes: int = 10
    feat_dim: int = 128
    train_frac: float = 0.02
    seed: int = 0
    packs: str = ""  # folder of packed batches; "" = "<path>.packs"

    def check(self) -> None:
        if self.num_nodes < 100 or self.feat_dim < 1 or self.num_classes < 2:
            raise ValueError(f"data.num_nodes={self.num_nodes}, data.feat_dim={self.feat_dim}, data.num_classes="
                             f"{self.num_classes}: need >= 100 nodes, >= 1 feature and >= 2 classes")
        if not 0 < self.train_frac <= 0.85:
            raise ValueError(f"data.train_frac={self.train_frac}: choose a share in (0, 0.85]")


@dataclass
class TrainConfig:
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
    prefetch: int = 2  # batches read ahead on a background thread
    seed: int = 0
    eval_nodes: int = 4096  # validation (and test) nodes scored after each epoch; 0 = all
    checkpoint_every: int = 1  # epochs between checkpoints; 0 = only at the end
    keep_last: int = 2
    resume: str = ""  # "" fresh, "latest", or a checkpoint folder

    def check(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"train.model={self.model!r}: choose one of {', '.join(MODELS)}")
        if self.loader not in LOADERS:
            raise ValueError(f"train.loader={self.loader!r}: choose one of {', '.join(LOADERS)}")
        if not self.fanouts or any(f < 1 and f != -1 for f in self.fanouts):
            raise ValueError(f"train.fanouts={self.fanouts}: one positive fanout (or -1: all) per layer")
        if not 0 <= self.cache_frac <= 1:
            raise ValueError(f"train.cache_frac={self.cache_frac}: a share of the feature rows in [0, 1]")
        if min(self.batch_size, self.epochs, self.hidden) < 1 or self.prefetch < 0 or self.eval_nodes < 0:
            raise ValueError("train.batch_size, train.epochs and train.hidden must be >= 1, train.prefetch and "
                             f"train.eval_nodes >= 0; got {self.batch_size}, {self.epochs}, {self.hidden}, "
                             f"{self.prefetch}, {self.eval_nodes}")
        if self.model == "gat" and self.hidden % self.heads:
            raise ValueError(f"train.hidden={self.hidden} must divide by train.heads={self.heads} for GAT")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    world_size: int = field(default=0, init=False)  # set by validate (workers.num): the packs are cut for it
    pack_path: str = field(default="", init=False)  # set by prepare: this recipe's packs


def validate(cfg: Config, world_size: int) -> None:
    """On the driver, before anything starts: the settings, and that data.path is a dataset or free for one."""
    cfg.data.check()
    cfg.train.check()
    check_data_path(cfg.data)
    cfg.world_size = world_size


def check_data_path(data: DataConfig) -> None:
    path = Path(data.path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ValueError(f"data.path={data.path!r} is {'a symbolic link' if path.is_symlink() else 'a file'}, "
                         "not a dataset folder: choose a folder (it is generated there when missing)")
    if path.is_dir() and any(path.iterdir()) and not is_dataset_folder(path):
        names = sorted(p.name for p in path.iterdir())[:5]
        raise ValueError(f"data.path={data.path!r} is not a Plait GNN dataset (it holds {', '.join(names)}); it is "
                         "never overwritten: choose an empty or new folder, or a folder generate_dataset wrote")
    if not data.generate and not is_dataset_folder(path):
        raise ValueError(f"data.path={data.path!r} holds no dataset and data.generate=false: generate one "
                         "(data.generate=true) or point data.path at a generated dataset")


def prepare(cfg: Config, run_dir: Path) -> None:
    """On the driver: the dataset (generated when missing or made with other settings) and, for the packed
    loader, the packs for ``cfg.world_size`` ranks; absolute paths for the ranks."""
    data, t = cfg.data, cfg.train
    check_data_path(data)
    data.path = str(Path(data.path).resolve())
    if data.generate and not _generated_with(Path(data.path), data):
        print(f"[plait] generating a {data.num_nodes:,}-node graph in {data.path}", flush=True)
        generate_dataset(data.path, num_nodes=data.num_nodes, avg_degree=data.avg_degree,
                         num_classes=data.num_classes, feat_dim=data.feat_dim, train_frac=data.train_frac,
                         seed=data.seed)
    if t.loader == "packed":
        out = pack_dir(cfg)
        if not is_pack_folder(out):
            ds = open_dataset(data.path)
            info = prepare_packed(ds.load_graph(), ds.features, load_split(ds.root).train, t.fanouts, t.batch_size,
                                  t.seed, cache_rows(cfg, ds.meta["num_nodes"]), out,
                                  world_size=max(cfg.world_size, 1))
            print(f"[plait] packed batches in {out}: {info.preprocess_s:.1f} s, {info.blowup:.2f}x the feature "
                  "bytes on disk", flush=True)
        cfg.pack_path = str(out)


def _generated_with(path: Path, data: DataConfig) -> bool:
    if not is_dataset_folder(path):
        return False
    meta = open_dataset(path).meta
    want = {"num_nodes": data.num_nodes, "avg_degree": data.avg_degree, "num_classes": data.num_classes,
            "feat_dim": data.feat_dim, "seed": data.seed}
    return all(meta.get(k) == v for k, v in want.items()) and \
        meta.get("splits", {}).get("train") == int(round(data.train_frac * data.num_nodes))


def cache_rows(cfg: Config, num_nodes: int) -> int:
    return int(cfg.train.cache_frac * num_nodes)


def pack_dir(cfg: Config) -> Path:
    """``<packs>/<recipe hash>``: a recipe changed (dataset, sampling, cache, ranks) gets a folder of its own."""
    data, t = cfg.data, cfg.train
    meta = {k: v for k, v in open_dataset(data.path).meta.items() if k != "seconds"}
    recipe = {"dataset": meta, "fanouts": list(t.fanouts), "batch_size": t.batch_size, "seed": t.seed,
              "cache_rows": cache_rows(cfg, meta["num_nodes"]), "world_size": max(cfg.world_size, 1)}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(data.packs) if data.packs else Path(data.path).with_name(Path(data.path).name + ".packs")
    return root.resolve() / f"recipe-{digest}"


def make_loader(cfg: Config, ctx: RankContext, ds, train_ids: np.ndarray):
    """This rank's EpochLoader for ``train.loader`` (gnn/online_loader.py, gnn/packed_loader.py)."""
    t, rank, world = cfg.train, ctx.rank, ctx.world_size
    if t.loader == "packed":
        if not cfg.pack_path or cfg.world_size != world:
            raise ValueError(f"train.loader='packed' needs packs cut for {world} ranks (have {cfg.world_size}: "
                             f"{cfg.pack_path or 'none'}); run the job through `plait run` or run_job, whose "
                             "prepare step builds them")
        return PackedLoader(cfg.pack_path, rank=rank, world_size=world, prefetch=t.prefetch)
    if t.loader == "online-mmap":
        store = DiskStore(ds.features, mode="mmap", verify=False)
    elif t.loader == "online-ginex":
        rows = max(cache_rows(cfg, ds.meta["num_nodes"]), 1)
        store = CachedStore(DiskStore(ds.features, mode="direct"), "sieve", rows)
    else:
        store = ArrayStore(np.array(load_features(ds.root)))
    return OnlineLoader(ds.load_graph(), store, train_ids, t.fanouts, t.batch_size, t.seed, rank=rank,
                        world_size=world, prefetch=t.prefetch)


def train(ctx: RankContext, cfg: Config) -> dict:
    t = cfg.train
    ds = open_dataset(cfg.data.path)
    labels, split = torch.from_numpy(load_labels(ds.root)), load_split(ds.root)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(t.model, ds.meta["feat_dim"], t.hidden, ds.meta["num_classes"], len(t.fanouts), t.heads,
                        t.dropout).to(ctx.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    ckpt = Checkpointer(ctx.run_dir / "checkpoints", keep_last=t.keep_last, run_id=ctx.run_id)
    state = ModelOptimizer([ddp], [opt])
    start = 0
    if ctx.resume_from is not None:
        start = int(ckpt.load(ctx.resume_from, state)["epoch"])
        ctx.log(f"resumed from {ctx.resume_from} (epoch {start})")
    loader = make_loader(cfg, ctx, ds, split.train)
    per_epoch = loader.num_batches()
    scorer = Scorer(ds, t, ctx)
    metrics = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, total_steps=t.epochs * per_epoch,
                            start_step=start * per_epoch, device=ctx.device)
    losses, val_acc, epoch_s = [], [], []
    ctx.step_done(start * per_epoch)  # the watchdog's rhythm starts here (runtime/watchdog.py)
    try:
        for epoch in range(start, t.epochs):
            ddp.train()
            t_epoch = time.perf_counter()
            before = prev = loader.stats()
            for i, (mb, x) in enumerate(loader.epoch(epoch)):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                out = ddp(x.to(ctx.device, non_blocking=True), mb.blocks)
                loss = F.cross_entropy(out, labels[mb.seeds].to(ctx.device))
                loss.backward()
                opt.step()
                losses.append(loss.item())
                now = loader.stats()
                scalars = {"loss": losses[-1], "epoch": epoch, "compute_s": time.perf_counter() - t0,
                           **step_stats(prev, now)}
                prev = now
                if i + 1 < per_epoch:
                    metrics.log(epoch * per_epoch + i + 1, **scalars)
                ctx.step_done(epoch * per_epoch + i + 1)
            epoch_s.append(time.perf_counter() - t_epoch)
            val_acc.append(scorer.accuracy(model, split.val, epoch))
            metrics.log((epoch + 1) * per_epoch, **scalars, val_acc=val_acc[-1], epoch_s=epoch_s[-1])
            ctx.log(f"epoch {epoch + 1}/{t.epochs}: loss {np.mean(losses[-per_epoch:]):.4f} val_acc "
                    f"{val_acc[-1]:.4f} ({epoch_s[-1]:.1f} s; {describe(before, loader.stats())})")
            every = t.checkpoint_every
            if (every and (epoch + 1) % every == 0) or epoch + 1 == t.epochs:
                ckpt.save((epoch + 1) * per_epoch, state, meta={"epoch": epoch + 1, "loader": t.loader})
        test_acc = scorer.accuracy(model, split.test, t.epochs)
        totals = loader.stats()
    finally:
        loader.close()
        metrics.close()
    return {"rank": ctx.rank, "start_epoch": start, "losses": losses, "val_acc": val_acc, "test_acc": test_acc,
            "epoch_s": epoch_s, "loader_stats": totals, "param_digest": param_digest(model),
            "checkpoint": str(ckpt.latest())}


def step_stats(prev: dict, now: dict) -> dict:
    """What one step cost the loader: seconds and bytes since ``prev``, and the current hit rates."""
    out = {k: now.get(k, 0) - prev.get(k, 0) for k in ("sample_s", "read_s", "wait_s")}
    out["bytes_read"] = now.get("bytes_read", 0) - prev.get("bytes_read", 0)
    out.update({k: v for k, v in now.items() if k.endswith("hit_rate")})
    return out


def describe(before: dict, after: dict) -> str:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ("sample_s", "read_s", "wait_s", "bytes_read")}
    rates = " ".join(f"{k} {v:.2f}" for k, v in after.items() if k.endswith("hit_rate"))
    return (f"sample {d['sample_s']:.2f} s, read {d['read_s']:.2f} s, waited {d['wait_s']:.2f} s, "
            f"{d['bytes_read'] / 2**20:.1f} MiB from disk{', ' + rates if rates else ''}")


def summarize(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    from plait.runtime.plot import plot_run

    main = results[0]
    losses = main["losses"]
    out = {"model": cfg.train.model, "loader": cfg.train.loader, "epochs": cfg.train.epochs,
           "start_epoch": main["start_epoch"], "first_loss": round(losses[0], 4) if losses else None,
           "last_loss": round(losses[-1], 4) if losses else None,
           "val_acc": [round(a, 4) for a in main["val_acc"]], "test_acc": round(main["test_acc"], 4),
           "epoch_s": [round(s, 2) for s in main["epoch_s"]],
           "bytes_read": int(sum(r["loader_stats"].get("bytes_read", 0) for r in results)),
           "param_digests": [r["param_digest"] for r in results], "checkpoint": main["checkpoint"],
           "metrics": str(run_dir / "metrics.jsonl")}
    if (run_dir / "metrics.jsonl").is_file():
        out["plot"] = str(plot_run(run_dir))
    return out
