"""The GPT training job: ``job = "plait.parallel.gpt_job"`` in a spec.

Every rank builds the same GPT from the same seed, applies the spec's ParallelPlan on one named
DeviceMesh, reads its slice of each step's batch from the Parquet token dataset, trains, streams
metrics (rank 0) and commits checkpoints. On a restart (``ctx.attempt > 0``) or with
``train.resume = "latest"`` it continues from the newest committed checkpoint.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from plait.parallel.data import DataConfig, StepBatches, ensure_token_dataset, open_token_dataset
from plait.parallel.estimate import estimate_job
from plait.parallel.mesh import build_mesh
from plait.parallel.models.gpt import GPT, GPTConfig
from plait.parallel.parallelize import OptimConfig, lr_at, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime.checkpoint import Checkpointer, EngineState, ModelOptimizer
from plait.runtime.context import RankContext
from plait.runtime.metrics import MetricsLogger


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    seq_len: int = 128
    seed: int = 0
    dtype: str = "float32"  # float32 | float64 (float64 for exact-equality tests)
    checkpoint_every: int = 50  # 0 = only at the end
    keep_last: int = 2
    resume: str = ""  # "" = fresh start, "latest" (continue this run_dir), or a committed checkpoint folder
    fail_at_step: int = 0  # fault injection: rank world-1 dies at this step on the first attempt
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"train.dtype={self.dtype!r}: choose float32 or float64")
        if self.steps < 1 or self.global_batch < 1:
            raise ValueError("train.steps and train.global_batch must be >= 1")


@dataclass
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: ParallelPlan = field(default_factory=ParallelPlan)

    def check(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.train.global_batch % self.plan.dp:
            raise ValueError(f"train.global_batch={self.train.global_batch} must divide evenly over plan.dp="
                             f"{self.plan.dp} data-parallel ranks")


def validate(cfg: Config, world_size: int) -> None:
    """On the driver, before anything starts: the plan against the world and the model."""
    cfg.plan.validate(world_size, cfg.model, cfg.train.global_batch // cfg.plan.dp, world_name="workers.num",
                      model_dtype=cfg.train.dtype)


def estimate(cfg: Config, world_size: int) -> str:
    """`plait plan estimate`: per-rank memory of this job's model under its plan."""
    return estimate_job(cfg, world_size)


def prepare(cfg: Config, run_dir: Path) -> None:
    """On the driver: absolute paths for the ranks, and the dataset built (or checked) once, before launch."""
    cfg.data.path = str(Path(cfg.data.path).resolve())  # ranks may start in another directory
    ensure_token_dataset(cfg.data, Path(cfg.data.path), cfg.train.seq_len, cfg.model.vocab_size)


def train(ctx: RankContext, cfg: Config) -> dict:
    plan = cfg.plan
    plan.validate(ctx.world_size, cfg.model, cfg.train.global_batch // plan.dp)
    torch.manual_seed(cfg.train.seed)
    dtype = getattr(torch, cfg.train.dtype)
    mesh = build_mesh(plan, ctx.device_type)
    parts = parallelize(lambda: GPT(cfg.model).to(dtype), plan, mesh, ctx.device, cfg.train.optim,
                        global_batch=cfg.train.global_batch)
    ckpt = Checkpointer(ctx.run_dir / "checkpoints", keep_last=cfg.train.keep_last, run_id=ctx.run_id)
    state = (EngineState(parts.engine, trusted_root=ctx.run_dir) if parts.engine is not None
             else ModelOptimizer(parts.modules, parts.optimizers))
    start = 0
    if ctx.resume_from is not None:  # decided on the driver (runtime/run_dir.py), the same on every rank
        start = ckpt.load(ctx.resume_from, state)["step"]
        ctx.log(f"resumed from {ctx.resume_from} (step {start})")
    batches = StepBatches(open_token_dataset(cfg.data, cfg.train.seq_len, cfg.model.vocab_size),
                          cfg.train.global_batch, cfg.train.seed)
    dp_rank = mesh.get_local_rank("dp")
    metrics = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, total_steps=cfg.train.steps,
                            start_step=start, device=ctx.device)
    losses = []
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        inputs, targets = batches.batch(step, dp_rank, plan.dp)
        lr = lr_at(step, cfg.train.steps, cfg.train.optim)
        loss = parts.train_step(inputs, targets, lr)
        dt = time.perf_counter() - t0
        losses.append(loss)
        metrics.log(step + 1, loss=loss, lr=lr, step_time_s=dt, tokens_per_s=tokens_per_step / dt)
        if cfg.train.fail_at_step == step + 1 and ctx.attempt == 0 and ctx.rank == ctx.world_size - 1:
            os._exit(17)  # simulate a crashed worker process (no Python cleanup, no exception)
        every = cfg.train.checkpoint_every
        if (every and (step + 1) % every == 0) or step + 1 == cfg.train.steps:
            ckpt.save(step + 1, state, meta={"data_step": step + 1, "plan": plan.describe()})
    metrics.close()
    return {"rank": ctx.rank, "start_step": start, "losses": losses, "checkpoint": str(ckpt.latest())}


def summarize(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    from plait.runtime.plot import plot_run

    main = results[0]
    losses = main["losses"]
    out = {"plan": cfg.plan.describe(), "steps": cfg.train.steps, "start_step": main["start_step"],
           "first_loss": round(losses[0], 4) if losses else None,
           "last_loss": round(losses[-1], 4) if losses else None,
           "checkpoint": main["checkpoint"], "tensorboard": str(run_dir / "tensorboard"),
           "metrics": str(run_dir / "metrics.jsonl")}
    if (run_dir / "metrics.jsonl").is_file():
        out["plot"] = str(plot_run(run_dir))
    return out
