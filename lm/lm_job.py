"""The GPT training job: ``job = "plait.lm.lm_job"`` in a spec.

Every rank builds the same GPT from the same seed, applies the spec's ParallelPlan on one named
DeviceMesh, reads its slice of each step's batch from the Parquet token dataset, trains, streams
metrics (rank 0) and commits checkpoints. On a restart (``ctx.attempt > 0``) or with
``train.resume = "latest"`` it continues from the newest committed checkpoint.

``train.mode`` picks the backward: "full" (the plan's train step), "seco" (exact chunk-wise back-propagation
over ``train.chunk_len``-token chunks, parallel/chunkwise.py: long sequences in the memory of one chunk's
activations plus the K/V cache) or "spaco" (SeCO through ``train.spaco_t`` of the chunks on average, an
unbiased estimate; ``train.spaco_cap`` > 0 caps its per-hop factor). Chunk-wise modes run on data
parallelism only (DDP or FSDP2; gradients reduced once per step). ``[train.lora]`` with rank > 0 wraps the
GPT in peft LoRA adapters on ``targets``: only the adapters train (and are what the optimizer steps).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from plait.lm.chunkwise import seco_step, spaco_step
from plait.lm.data import DataConfig, StepBatches, ensure_token_dataset, open_token_dataset
from plait.parallel.estimate import estimate_job
from plait.parallel.mesh import build_mesh
from plait.models.gpt import GPT, GPTConfig
from plait.parallel.parallelize import OptimConfig, Parallelized, clip_grad_norm, lr_at, parallelize
from plait.parallel.plan import ParallelPlan
from plait.runtime.checkpoint import Checkpointer, EngineState, ModelOptimizer
from plait.runtime.context import RankContext
from plait.runtime.metrics import MetricsLogger

MODES = ("full", "seco", "spaco")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass
class LoraSettings:
    rank: int = 0  # 0 = no LoRA: every parameter trains
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])

    def check(self) -> None:
        if self.rank < 0:
            raise ValueError(f"train.lora.rank={self.rank}: 0 (off) or a positive adapter rank")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"train.lora.targets={self.targets}: choose module names from {', '.join(LORA_TARGETS)}")


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
    mode: str = "full"  # full | seco | spaco (chunk-wise back-propagation, see the module docstring)
    chunk_len: int = 0  # tokens per chunk under seco / spaco
    spaco_t: int = 0  # spaco: chunks that back-propagate per step, on average (1 .. seq_len / chunk_len)
    spaco_cap: float = 0.0  # spaco: cap on the k/t factor per hop between chunks; 0 = none (unbiased)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    meta_init: bool = False  # build on the meta device, each rank drawing only its shards (parallel/meta_init.py)

    def check(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"train.dtype={self.dtype!r}: choose float32 or float64")
        if self.steps < 1 or self.global_batch < 1:
            raise ValueError("train.steps and train.global_batch must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"train.mode={self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode != "full" and not 1 <= self.chunk_len <= self.seq_len:
            raise ValueError(f"train.mode={self.mode!r} needs train.chunk_len in 1..train.seq_len={self.seq_len}, "
                             f"got {self.chunk_len}")
        chunks = math.ceil(self.seq_len / self.chunk_len) if self.chunk_len else 0
        if self.mode == "spaco" and not 1 <= self.spaco_t <= chunks:
            raise ValueError(f"train.spaco_t={self.spaco_t}: choose 1..{chunks}, the number of {self.chunk_len}-token "
                             f"chunks in train.seq_len={self.seq_len} ({chunks} is SeCO)")
        if self.meta_init and self.lora.rank:
            raise ValueError("train.meta_init with train.lora.rank > 0: LoRA adapters have their own init (B = 0); "
                             "use train.meta_init=false for LoRA runs")
        if self.spaco_cap and self.spaco_cap < 1:
            raise ValueError(f"train.spaco_cap={self.spaco_cap}: 0 (no cap, unbiased) or >= 1")


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
        check_chunkwise(self.train.mode, self.plan)


def check_chunkwise(mode: str, plan: ParallelPlan) -> None:
    """Chunk-wise modes run on DDP or FSDP2 data parallelism; refuse what they do not drive."""
    if mode == "full":
        return
    other = {"plan.tp": plan.tp, "plan.pp": plan.pp, "plan.cp": getattr(plan, "cp", 1)}
    for name, degree in other.items():
        if degree > 1:
            raise ValueError(f"train.mode={mode!r} with {name}={degree}: chunk-wise training recomputes whole "
                             f"chunks on one rank's model; it runs with data parallelism only (DDP or FSDP2). "
                             f"Set {name}=1, or train.mode='full'")
    if plan.engine not in ("ddp", "fsdp2"):
        raise ValueError(f"train.mode={mode!r} with plan.engine={plan.engine!r}: DeepSpeed owns the backward pass; "
                         "use engine='ddp' or 'fsdp2'")
    if plan.activation_checkpointing != "off":
        raise ValueError(f"train.mode={mode!r} with plan.activation_checkpointing="
                         f"{plan.activation_checkpointing!r}: a chunk's activations are already bounded by "
                         "train.chunk_len; set activation_checkpointing='off' (or a smaller chunk_len)")


def validate(cfg: Config, world_size: int) -> None:
    """On the driver, before anything starts: the plan against the world and the model."""
    cfg.plan.validate(world_size, cfg.model, cfg.train.global_batch // cfg.plan.dp, world_name="workers.num",
                      model_dtype=cfg.train.dtype, seq_len=cfg.train.seq_len)
    cfg.check()


def estimate(cfg: Config, world_size: int) -> str:
    """`plait plan estimate`: per-rank memory of this job's model under its plan."""
    return estimate_job(cfg, world_size)


def prepare(cfg: Config, run_dir: Path) -> None:
    """On the driver: absolute paths for the ranks, and the dataset built (or checked) once, before launch."""
    cfg.data.path = str(Path(cfg.data.path).resolve())  # ranks may start in another directory
    ensure_token_dataset(cfg.data, Path(cfg.data.path), cfg.train.seq_len, cfg.model.vocab_size)


def train(ctx: RankContext, cfg: Config) -> dict:
    plan = cfg.plan
    plan.validate(ctx.world_size, cfg.model, cfg.train.global_batch // plan.dp, seq_len=cfg.train.seq_len)
    torch.manual_seed(cfg.train.seed)
    dtype = getattr(torch, cfg.train.dtype)
    mesh = build_mesh(plan, ctx.device_type)
    parts = parallelize(lambda: build_model(cfg, dtype), plan, mesh, ctx.device, cfg.train.optim,
                        global_batch=cfg.train.global_batch, init_seed=cfg.train.seed if cfg.train.meta_init else None)
    if cfg.train.mode == "full":
        def train_step(inputs, targets, lr, _step):
            return parts.train_step(inputs, targets, lr)
    else:
        train_step = chunkwise_train_step(parts, cfg, ctx.device)
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
    ctx.step_done(start)  # the watchdog's rhythm starts here (runtime/watchdog.py)
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        inputs, targets = batches.batch(step, dp_rank, plan.dp)
        lr = lr_at(step, cfg.train.steps, cfg.train.optim)
        loss = train_step(inputs, targets, lr, step)
        dt = time.perf_counter() - t0
        losses.append(loss)
        metrics.log(step + 1, loss=loss, lr=lr, step_time_s=dt, tokens_per_s=tokens_per_step / dt)
        if cfg.train.fail_at_step == step + 1 and ctx.attempt == 0 and ctx.rank == ctx.world_size - 1:
            os._exit(17)  # simulate a crashed worker process (no Python cleanup, no exception)
        every = cfg.train.checkpoint_every
        if (every and (step + 1) % every == 0) or step + 1 == cfg.train.steps:
            ckpt.save(step + 1, state, meta={"data_step": step + 1, "plan": plan.describe()})
        ctx.step_done(step + 1)
    metrics.close()
    return {"rank": ctx.rank, "start_step": start, "losses": losses, "checkpoint": str(ckpt.latest())}


def build_model(cfg: Config, dtype: torch.dtype) -> torch.nn.Module:
    """The GPT (seeded by the caller), wrapped in peft LoRA adapters when train.lora.rank > 0."""
    model = GPT(cfg.model).to(dtype)
    lora = cfg.train.lora
    if lora.rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets)))
    return model


def chunkwise_train_step(parts: Parallelized, cfg: Config, device: torch.device):
    """(inputs, targets, lr, step) -> the global mean loss, with SeCO or SpaCO instead of one backward."""
    train, model, mesh = cfg.train, parts.modules[0], parts.mesh
    dp_rank = mesh.get_local_rank("dp")

    def step_fn(inputs: torch.Tensor, targets: torch.Tensor, lr: float, step: int) -> float:
        for opt in parts.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        inputs, targets = inputs.to(device), targets.to(device)
        if train.mode == "seco":
            loss = seco_step(model, inputs, targets, train.chunk_len)
        else:  # a fresh, reproducible draw per step and dp rank (resumes draw the same chunks)
            gen = torch.Generator().manual_seed((train.seed * 1_000_003 + step) * 1009 + dp_rank)
            loss = spaco_step(model, inputs, targets, train.chunk_len, train.spaco_t, cap=train.spaco_cap,
                              generator=gen)
        if train.optim.grad_clip > 0:
            parts.grad_norm = clip_grad_norm(parts.modules, train.optim.grad_clip, mesh)
        for opt in parts.optimizers:
            opt.step()
        loss = loss.detach().double().reshape(()).clone()
        if mesh["dp"].size() > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=mesh["dp"].get_group())
        return float(loss)

    return step_fn


def summarize(cfg: Config, run_dir: Path, results: list[dict]) -> dict:
    from plait.runtime.plot import plot_run

    main = results[0]
    losses = main["losses"]
    out = {"plan": cfg.plan.describe(), "steps": cfg.train.steps, "start_step": main["start_step"],
           "first_loss": round(losses[0], 4) if losses else None,
           "last_loss": round(losses[-1], 4) if losses else None,
           "checkpoint": main["checkpoint"], "tensorboard": str(run_dir / "tensorboard"),
           "metrics": str(run_dir / "metrics.jsonl")}
    if (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:  # none: no step ran
        out["plot"] = str(plot_run(run_dir))
    return out
