"""Apply a ParallelPlan to an unmodified model, from outside, as a short recipe of steps.

    parts = parallelize(build_model, plan, mesh, device, optim_cfg)
    loss = parts.train_step(inputs, targets, lr)    # the global mean loss, on every rank

The recipe, in torchtitan's order, each step on its named sub-mesh:
  1. build the model (same seed on every rank) and, with pp > 1, cut this rank's pipeline stages;
  2. tensor (+ sequence, loss) parallelism on ``mesh["tp"]``;
  3. activation checkpointing (off / full / selective);
  4. data parallelism on ``mesh["dp"]``: DDP or FSDP2 per part (a DeepSpeed ZeRO engine instead of
     steps 1-4 when the plan says zero1/2/3: DeepSpeed then owns the optimizer step);
  5. one AdamW per part, and a train step that a pipeline schedule or a plain forward/backward drives;
     gradient clipping uses the global norm across tp, dp and pp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from plait.parallel.activation_checkpoint import apply_activation_checkpointing
from plait.parallel.data_parallel import (
    ZERO_STAGES,
    apply_ddp,
    apply_fsdp2,
    build_deepspeed_engine,
    deepspeed_train_step,
)
from plait.parallel.models.gpt import lm_loss
from plait.parallel.pipeline import build_pipeline
from plait.parallel.plan import ParallelPlan
from plait.parallel.tensor_parallel import apply_tensor_parallel, tp_loss
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr. Stateless, so checkpoints need no scheduler."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class Parallelized:
    modules: list[nn.Module]  # the model parts this rank holds (one, or one per pipeline stage)
    optimizers: list[Any]  # one per part (what checkpoints pair with each part); empty under DeepSpeed
    train_step: Callable[[torch.Tensor, torch.Tensor, float], float]  # (inputs, targets, lr) -> loss
    mesh: DeviceMesh
    engine: Any = None  # the DeepSpeed engine under zero1/2/3


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=True)


def _set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def _mean_over(value: torch.Tensor, mesh: DeviceMesh, dim: str) -> torch.Tensor:
    if mesh[dim].size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG, group=mesh[dim].get_group())
    return value


def clip_grad_norm(modules: list[nn.Module], max_norm: float, mesh: DeviceMesh) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient: DTensor shards (tp, FSDP) are reduced by
    ``full_tensor`` of their norms, pipeline stages by a sum of squares over ``mesh["pp"]``."""
    params = [p for m in modules for p in m.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        low = p.grad.dtype in (torch.bfloat16, torch.float16)
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32 if low else None)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq = sq + norm.double().cpu() ** 2
    if mesh["pp"].size() > 1:
        sq = sq.to(_comm_device(mesh))
        dist.all_reduce(sq, group=mesh["pp"].get_group())
    total = sq.sqrt().float()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


def _comm_device(mesh: DeviceMesh) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")


def _shard_part(part: nn.Module, plan: ParallelPlan, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Steps 2-4 on one model part (a whole model or one pipeline stage)."""
    if plan.tp > 1:
        apply_tensor_parallel(part, mesh["tp"], sequence_parallel=plan.sequence_parallel,
                              loss_parallel=plan.loss_parallel)
    apply_activation_checkpointing(part, plan.activation_checkpointing)
    if plan.engine == "fsdp2" and plan.dp > 1:  # one data-parallel rank: nothing to shard over
        # With tp > 1 the parameters are DTensors on mesh["tp"]; FSDP2 makes them 2-D (dp, tp).
        apply_fsdp2(part, mesh["dp"], mixed_precision=plan.mixed_precision)
    elif plan.engine == "ddp" and plan.dp > 1:
        part = apply_ddp(part, mesh["dp"], device)
    return part


def parallelize(build_model: Callable[[], nn.Module], plan: ParallelPlan, mesh: DeviceMesh,
                device: torch.device, optim: OptimConfig, global_batch: int | None = None) -> Parallelized:
    if plan.engine.startswith("zero"):
        return _parallelize_deepspeed(build_model, plan, mesh, device, optim, global_batch)
    loss_fn = lambda logits, targets: tp_loss(logits, targets, plan.loss_parallel)  # noqa: E731
    if plan.pp > 1:
        pipe = build_pipeline(build_model, mesh["pp"], schedule=plan.schedule, microbatches=plan.microbatches,
                              virtual_stages=plan.virtual_stages, loss_fn=loss_fn, device=device,
                              parallelize_stage=lambda part: _shard_part(part, plan, mesh, device))
        modules = pipe.modules
    else:
        pipe = None
        modules = [_shard_part(build_model().to(device), plan, mesh, device)]
    optimizers = [make_optimizer(m.parameters(), optim) for m in modules]

    def train_step(inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
        _set_lr(optimizers, lr)
        if pipe is not None:
            loss = pipe.step(inputs.to(device), targets.to(device))  # clears grads itself
            loss = _broadcast_from_last_stage(loss, mesh, pipe.has_last)
        else:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(modules[0](inputs.to(device)), targets.to(device))
            loss.backward()
        if optim.grad_clip > 0:
            clip_grad_norm(modules, optim.grad_clip, mesh)
        for opt in optimizers:
            opt.step()
        return float(_mean_over(loss.detach().double().reshape(()).clone(), mesh, "dp"))

    return Parallelized(modules=modules, optimizers=optimizers, train_step=train_step, mesh=mesh)


def _broadcast_from_last_stage(loss: torch.Tensor | None, mesh: DeviceMesh, has_last: bool) -> torch.Tensor:
    """Every pp rank learns the loss computed where the last stage lives (sum: only that rank adds)."""
    value = loss.detach().double().reshape(()).clone() if has_last else torch.zeros((), dtype=torch.float64)
    value = value.to(_comm_device(mesh))
    dist.all_reduce(value, group=mesh["pp"].get_group())
    return value


def _parallelize_deepspeed(build_model, plan, mesh, device, optim, global_batch) -> Parallelized:
    model = build_model().to(device)
    apply_activation_checkpointing(model, plan.activation_checkpointing)
    if global_batch is None:
        raise ValueError("DeepSpeed engines need the global batch size (parallelize(..., global_batch=N))")
    engine = build_deepspeed_engine(
        model, mesh["dp"], stage=ZERO_STAGES[plan.engine], lr=optim.lr, weight_decay=optim.weight_decay,
        betas=(optim.beta1, optim.beta2), grad_clip=optim.grad_clip, mixed_precision=plan.mixed_precision,
        micro_batch_size=global_batch // plan.dp,
    )

    def train_step(inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
        loss = deepspeed_train_step(engine, inputs, targets, lm_loss, lr=lr)
        return float(_mean_over(loss.double().reshape(()).clone(), mesh, "dp"))

    return Parallelized(modules=[engine.module], optimizers=[], train_step=train_step, mesh=mesh, engine=engine)
