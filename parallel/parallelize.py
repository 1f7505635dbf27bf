"""Apply a ParallelPlan to an unmodified model, from outside, as a short recipe of steps.

    parts = parallelize(build_model, plan, mesh, device, optim_cfg)
    loss = parts.train_step(inputs, targets)     # the global mean loss, on every rank

The recipe, in torchtitan's order: build the model (same seed everywhere) -> cut pipeline stages ->
tensor/sequence parallel on ``mesh["tp"]`` -> activation checkpointing -> data parallel on
``mesh["dp"]`` (DDP, FSDP2 or a DeepSpeed ZeRO engine) -> optimizer -> a train step that knows
whether a pipeline schedule or a plain forward/backward drives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from plait.parallel.models.gpt import lm_loss
from plait.parallel.plan import ParallelPlan
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


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
    optimizers: list[torch.optim.Optimizer]  # one per part (what checkpoints pair with each part)
    train_step: Callable[[torch.Tensor, torch.Tensor, float], float]  # (inputs, targets, lr) -> loss
    mesh: DeviceMesh


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             foreach=False)


def _set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def _dp_mean(value: torch.Tensor, mesh: DeviceMesh) -> float:
    value = value.detach().float().clone()
    if mesh["dp"].size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG, group=mesh["dp"].get_group())
    return float(value)


def parallelize(build_model: Callable[[], nn.Module], plan: ParallelPlan, mesh: DeviceMesh,
                device: torch.device, optim: OptimConfig) -> Parallelized:
    model = build_model().to(device)
    if plan.engine != "ddp" or plan.tp > 1 or plan.pp > 1:
        raise NotImplementedError(f"plan {plan.describe()} is not wired yet")
    from torch.nn.parallel import DistributedDataParallel as DDP

    if mesh["dp"].size() > 1:
        model = DDP(model, process_group=mesh["dp"].get_group())
    optimizer = make_optimizer(model.parameters(), optim)

    def train_step(inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
        _set_lr([optimizer], lr)
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model(inputs.to(device)), targets.to(device))
        loss.backward()
        if optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        return _dp_mean(loss, mesh)

    return Parallelized(modules=[model], optimizers=[optimizer], train_step=train_step, mesh=mesh)
