"""A complete custom job: an MLP classifier trained data-parallel by Plait (the README's example).

Run it like any job (this file beside the spec, or in the directory you start from, is found
without PYTHONPATH and shipped to the ranks):

    plait run examples/mlp_dp2.toml                      # DDP on 2 ranks
    plait run examples/mlp_dp2.toml plan.engine=fsdp2    # or FSDP2, or zero1/zero2/zero3

The protocol: a ``Config`` dataclass (one field per TOML table), ``train(ctx, cfg)`` on every rank,
and optional ``validate(cfg, world_size)``, ``prepare(cfg, run_dir)``, ``summarize(cfg, run_dir,
results)`` on the driver. The runtime hands each rank a RankContext (rank, device, run_dir, run_id,
resume_from) and owns the run directory; the job builds the mesh, applies its plan with its own loss,
and uses the runtime's Checkpointer and MetricsLogger. After each step it asks ``ctx.stop_requested()``
(Ctrl-C or SIGTERM): then it commits a checkpoint and returns, and ``plait run ... train.resume=latest``
continues. The runtime adds the run's start step, first and last loss to the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from plait.parallel import ParallelPlan
from plait.parallel.mesh import build_mesh
from plait.parallel.parallelize import OptimConfig, lr_at, parallelize
from plait.runtime.checkpoint import Checkpointer, EngineState, ModelOptimizer
from plait.runtime.context import RankContext
from plait.runtime.metrics import MetricsLogger
from torch import nn


@dataclass
class DataConfig:
    features: int = 16
    classes: int = 4
    samples: int = 4096
    seed: int = 0


@dataclass
class TrainConfig:
    steps: int = 60
    global_batch: int = 64
    hidden: int = 64
    checkpoint_every: int = 20
    resume: str = ""  # "" fresh, "latest", or a checkpoint folder: the runtime checks and resolves it
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=5, grad_clip=1.0))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: ParallelPlan = field(default_factory=ParallelPlan)


def validate(cfg: Config, world_size: int) -> None:
    # No model config: a model of your own, so only data parallelism (tp/pp need Plait's GPT) is allowed.
    cfg.plan.validate(world_size, world_name="workers.num")
    if cfg.train.global_batch % cfg.plan.dp:
        raise ValueError(f"train.global_batch={cfg.train.global_batch} must divide by plan.dp={cfg.plan.dp}")


def make_data(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs, one per class; the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(cfg.seed)
    centers = torch.randn(cfg.classes, cfg.features, generator=g) * 2
    labels = torch.randint(0, cfg.classes, (cfg.samples,), generator=g)
    return centers[labels] + torch.randn(cfg.samples, cfg.features, generator=g), labels


def build_model(cfg: Config) -> nn.Module:
    d, h = cfg.data.features, cfg.train.hidden
    return nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, cfg.data.classes))


def train(ctx: RankContext, cfg: Config) -> dict:
    t, plan = cfg.train, cfg.plan
    torch.manual_seed(cfg.data.seed)  # the same initial weights on every rank
    mesh = build_mesh(plan, ctx.device_type)
    parts = parallelize(lambda: build_model(cfg), plan, mesh, ctx.device, t.optim, global_batch=t.global_batch,
                        loss_fn=F.cross_entropy)
    state = (EngineState(parts.engine, trusted_root=ctx.run_dir) if parts.engine is not None
             else ModelOptimizer(parts.modules, parts.optimizers))
    ckpt = Checkpointer(ctx.run_dir / "checkpoints", keep_last=2, run_id=ctx.run_id)
    start = ckpt.load(ctx.resume_from, state)["step"] if ctx.resume_from is not None else 0
    x, y = make_data(cfg.data)
    per_rank, dp_rank = t.global_batch // plan.dp, mesh.get_local_rank("dp")
    metrics = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, total_steps=t.steps, start_step=start,
                            device=ctx.device)
    losses, stopped_at = [], None
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        ids = torch.randperm(len(x), generator=torch.Generator().manual_seed(step))[: t.global_batch]
        mine = ids[dp_rank * per_rank : (dp_rank + 1) * per_rank]  # this rank's slice of the global batch
        loss = parts.train_step(x[mine], y[mine], lr_at(step, t.steps, t.optim))
        losses.append(loss)
        metrics.log(step + 1, loss=loss, step_time_s=time.perf_counter() - t0)
        stop = ctx.stop_requested()  # Ctrl-C or SIGTERM on the driver: every rank gets the same answer
        if (t.checkpoint_every and (step + 1) % t.checkpoint_every == 0) or step + 1 == t.steps or stop:
            ckpt.save(step + 1, state, meta={"plan": plan.describe()})
        if stop:
            stopped_at = step + 1
            break
    metrics.close()
    model = parts.modules[0]
    with torch.no_grad():
        accuracy = (model(x.to(ctx.device)).argmax(-1).cpu() == y).double().mean().item()
    return {"start_step": start, "losses": losses, "accuracy": accuracy, "stopped_at": stopped_at}


def summarize(cfg: Config, run_dir, results: list[dict]) -> dict:
    main = results[0]
    return {"plan": cfg.plan.describe(), "accuracy": round(main["accuracy"], 4), "stopped_at": main["stopped_at"]}
