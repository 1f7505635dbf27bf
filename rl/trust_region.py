"""A per-step trust region for the policy: TRPO's backtracking line search on the KL, after an Adam step.

    guard = StepGuard(max_kl=0.05, max_backtracks=5)
    before = guard.snapshot(model, inputs, valid)     # log-softmax at the valid positions (no grad) + parameters
    parts.train_step(inputs, batch, lr)               # the ordinary optimizer step
    kl, scale = guard.enforce(model, inputs, valid, before, group)   # KL(pi_old || pi_new) <= max_kl, or undone

The step's own forward already computed the logits before the step: ``params = guard.parameters(model)``
before it and ``guard.before(logits, valid, params)`` after spares the extra forward (the trainer does
this, with the logits its loss function saw). Only the valid positions' distributions are kept.

Why: Adam moves every parameter by about ``lr`` per step whatever the gradient's size, so on a small policy
one ordinary step can move the policy a long way (a digit_sum run at lr 1e-3 measured a single step with
KL 2.2 nats per token and a 7.7-nat change of one token's log-prob). Synchronous training recovers on the
next fresh batch; asynchronous training then takes ``eta`` more steps on rollouts of the old policy, whose
truncated importance weights cannot tell it where the policy went, and a run collapsed into answering
nothing. PPO's clip does not help with one gradient step per batch (its ratio is 1 at the step).

``enforce`` measures the exact KL(pi_old || pi_new) of the full next-token distributions at the batch's valid
positions, averaged over them (summed over the data-parallel ``group``, so every rank takes the same
decision). Above ``max_kl`` the parameter change is halved (``theta_old + s * (theta_new - theta_old)``, s =
1/2, 1/4, ...) until the KL is within bound; after ``max_backtracks`` halvings the step is undone (s = 0),
as TRPO does when its line search fails. The optimizer's moments keep the step's gradient either way.
Cost: one forward per trial after the step (and one before, unless the step's logits are reused), no backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Snapshot:
    logp: torch.Tensor  # (N, V) log-softmax at the N valid positions (float32 at least) of the policy before the step
    params: list[torch.Tensor]  # the parameters before the step (detached copies, local shards under FSDP2)


@dataclass
class StepGuard:
    max_kl: float = 0.05  # nats per valid token; 0 = off
    max_backtracks: int = 5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.max_kl < 0 or self.max_backtracks < 0:
            raise ValueError(f"max_step_kl={self.max_kl} and max_backtracks={self.max_backtracks} must be >= 0 "
                             "(max_step_kl = 0 turns the trust region off)")

    @property
    def enabled(self) -> bool:
        return self.max_kl > 0

    def log_softmax(self, logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits, (B, T) bool -> (N, V) log-softmax at the valid positions."""
        logits = logits.detach()
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        logits = logits[valid]
        logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
        return F.log_softmax(logits / self.temperature, dim=-1)

    @staticmethod
    def parameters(model: nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in _sharded_parameters(model)]

    def before(self, logits: torch.Tensor, valid: torch.Tensor, params: list[torch.Tensor]) -> Snapshot:
        """The policy before the step from the logits its own forward computed, and ``parameters()``."""
        return Snapshot(self.log_softmax(logits, valid), params)

    @torch.no_grad()
    def snapshot(self, model: nn.Module, inputs: torch.Tensor, valid: torch.Tensor) -> Snapshot:
        return self.before(_logits(model(inputs)), valid, self.parameters(model))

    @torch.no_grad()
    def kl(self, model: nn.Module, inputs: torch.Tensor, valid: torch.Tensor, before: Snapshot,
           group=None) -> float:
        """Mean KL(pi_old || pi_now) over the valid positions of every rank of ``group``."""
        after = self.log_softmax(_logits(model(inputs)), valid)
        p = before.logp.exp()
        per_pos = torch.where(p > 0, p * (before.logp - after), 0.0).sum(-1)  # 0 log 0 = 0
        total = torch.stack([per_pos.sum(), per_pos.new_tensor(float(per_pos.shape[0]))])  # on its device
        if dist.is_initialized() and dist.get_world_size(group) > 1:  # group None: the default (the trainer's)
            dist.all_reduce(total, group=group)
        return float(total[0] / total[1].clamp(min=1.0))

    @torch.no_grad()
    def enforce(self, model: nn.Module, inputs: torch.Tensor, valid: torch.Tensor, before: Snapshot,
                group=None) -> tuple[float, float]:
        """(KL after, step scale kept): 1.0 when the step was within bound, 0.0 when it was undone."""
        kl = self.kl(model, inputs, valid, before, group)
        if kl <= self.max_kl:
            return kl, 1.0
        new = self.parameters(model)
        scale = 1.0
        for _ in range(self.max_backtracks):
            scale /= 2
            for p, old, upd in zip(_sharded_parameters(model), before.params, new, strict=True):
                p.copy_(torch.lerp(old, upd, scale))
            kl = self.kl(model, inputs, valid, before, group)
            if kl <= self.max_kl:
                return kl, scale
        for p, old in zip(_sharded_parameters(model), before.params, strict=True):
            p.copy_(old)
        return 0.0, 0.0


def _sharded_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters as the optimizer holds them (the trainable ones: a step never moves a frozen LoRA base).
    FSDP2 leaves the root's parameters unsharded (plain tensors) after a forward: reshard every FSDP module
    first, so they are this rank's DTensor shards again."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return [p for p in model.parameters() if p.requires_grad]


def _logits(out):
    """A model's logits: Plait's GPT returns them, a HF causal LM an output object holding them."""
    return getattr(out, "logits", out)
