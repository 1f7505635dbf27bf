"""Expert parallelism: each experts module's experts sharded over ``mesh["ep"]``, tokens sent to them and back.

    apply_expert_parallel(model, mesh["ep"], spec.experts)   # after tp, before activation checkpointing / FSDP2
    experts = expert_modules(model, spec.experts)             # [(fqn, module)] of the experts modules

An "experts module" has Hugging Face 5.23's interface (MixtralExperts, Qwen3MoeExperts):
``forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)`` = sum_k w_k * expert_{idx_k}(x),
an attribute ``num_experts`` and parameters whose dim 0 is the expert index. A family names them in its spec
(``ModelSpec.experts``, e.g. ``("mlp.experts",)``: ``layers.<i>.mlp.experts``); the router stays the family's.

``apply_expert_parallel`` makes every such parameter a DTensor ``Shard(0)`` over the ep mesh (rank r holds experts
[r*E/ep, (r+1)*E/ep); DCP saves the global tensor, so checkpoints reshard between ep degrees), sets
``num_experts`` to the local count and replaces ``forward`` with ``ExpertDispatch`` (dropless token choice, as
torchtitan's ExpertParallel):

  1. the (token, k) pairs sorted by expert id; per-expert counts exchanged (all_to_all, integers);
  2. the pairs' hidden states sent to the ranks holding their experts (all_to_all_single, variable splits);
  3. the module's own forward on the received rows with LOCAL expert ids and weight 1 (grouped per local expert
     by the family's code, which sees its local parameter slices);
  4. the outputs sent back (all_to_all_single), unsorted, and the routing weights applied and summed over k at
     home: the routing weights' gradients stay local and the result equals the unsharded sum (float64: to
     rounding).

Both exchanges are autograd-aware (``_AllToAll``: the backward is the reverse exchange). A rank whose experts
receive no token still gives them a (zero) gradient, so FSDP2's reduce-scatter sees every rank's.

Gradients (parallelize.py): each rank's expert gradient sums the losses of its ep peers' tokens, and FSDP2 over
``mesh["dp_mod_ep"]`` averages it over dp/ep ranks; the mean over dp of each rank's loss (what the other
parameters get from FSDP2 over ``mesh["dp"]``) needs another 1/ep. ``grad_scale=1/ep`` applies it inside the
dispatch: the gradient arriving at the experts' outputs is scaled by it and the one leaving their inputs by its
inverse, so only the expert parameters' gradients change (exact for a power-of-two ep). (FSDP2's
``set_gradient_divide_factor`` would say the same, but torch 2.13 divides twice on a one-rank mesh in float64,
and its PREMUL_SUM is not on gloo.)
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from plait.parallel.shape import decoder_shape
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.utils.stateless import _reparametrize_module


def expert_violations(plan: Any, model: Any = None) -> list[str]:
    """What expert parallelism (ep > 1) cannot run with (see expert_parallel.py); ``model`` (a DecoderShape or
    None) adds the checks against the model: a family with experts, ep dividing their number."""
    if plan.ep == 1:
        return []
    ep, out = plan.ep, []
    if plan.dp % ep:
        good = plan.dp - plan.dp % ep if plan.dp >= ep else ep
        out.append(f"plan.ep={ep} must divide plan.dp={plan.dp}: expert parallelism splits the data-parallel ranks "
                   f"into dp/ep groups of ep (each holds every expert once); use dp={good},ep={ep} or an ep "
                   f"dividing {plan.dp}")
    if plan.engine != "fsdp2":
        why = ("DDP would average the expert gradients over ranks that hold other experts" if plan.engine == "ddp"
               else "DeepSpeed ZeRO flattens parameters over the whole world and cannot keep experts apart")
        out.append(f"plan.ep={ep} with plan.engine={plan.engine!r}: {why}; use engine='fsdp2' (expert parameters "
                   f"sharded over the dp/ep ranks holding the same experts, the others over dp)")
    if plan.pp > 1:
        out.append(f"plan.ep={ep} with plan.pp={plan.pp}: expert parallelism does not combine with pipeline stages in "
                   f"Plait (the auxiliary load-balancing loss spans every layer's router, which no single stage "
                   f"sees); use pp=1, e.g. dp={plan.dp * plan.pp},ep={ep},tp={plan.tp}")
    if plan.cp > 1:
        out.append(f"plan.ep={ep} with plan.cp={plan.cp}: expert parallelism over context-parallel ranks is not "
                   f"built in Plait; use cp=1, e.g. dp={plan.dp * plan.cp},ep={ep},tp={plan.tp}")
    shape = decoder_shape(model)
    if model is not None and (shape is None or "ep" not in shape.supports or not shape.n_experts):
        who = f"the model family ({shape.family})" if shape is not None and shape.family else "the model"
        out.append(f"plan.ep={ep}: {who} has no mixture-of-experts layers (its spec names no experts modules): "
                   f"use ep=1 (dp={plan.dp} stays data parallelism)")
    elif shape is not None and shape.n_experts % ep:
        fits = [d for d in range(2, shape.n_experts + 1) if shape.n_experts % d == 0 and plan.dp % d == 0]
        out.append(f"model.n_experts={shape.n_experts} is not divisible by plan.ep={ep} (each ep rank holds an "
                   f"equal share of the experts): use ep in {fits or [1]}")
    return out


def expert_modules(model: nn.Module, names: tuple[str, ...] | list[str]) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of each ``layers.<i>.<name>`` module for ``name`` in ``names`` (a spec's ``experts``)."""
    if not names:
        return []
    pattern = re.compile(r"(?:^|\.)layers\.\d+\.(?:" + "|".join(re.escape(n) for n in names) + r")$")
    return [(fqn, m) for fqn, m in model.named_modules() if pattern.search(fqn)]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the experts modules ``apply_expert_parallel`` sharded (their ``ExpertDispatch``)."""
    return [p for m in model.modules() if isinstance(m.__dict__.get("forward"), ExpertDispatch)
            for p in m.parameters(recurse=False)]


def sharded_experts(model: nn.Module) -> list[nn.Module]:
    """The experts modules ``apply_expert_parallel`` sharded."""
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), ExpertDispatch)]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, names: tuple[str, ...] | list[str],
                          grad_scale: float = 1.0) -> int:
    """Shard the experts modules named ``names`` (see ``expert_modules``) over the 1-D ``ep_mesh``, in place.
    Every rank must have built the same model (same seed) or a meta one. ``grad_scale`` multiplies the expert
    parameters' gradients only (parallelize passes 1/ep: see the module docstring). Returns how many modules it
    sharded."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"expert parallelism needs a 1-D mesh, got {ep_mesh.ndim}-D {ep_mesh.mesh_dim_names}: pass "
                         "mesh['ep']")
    found = expert_modules(model, names)
    if not found:
        raise ValueError(f"expert parallelism found no experts module named {list(names)} under layers.<i> in "
                         f"{type(model).__name__}: check the spec's experts names, or use ep=1")
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for fqn, module in found:
        total = getattr(module, "num_experts", None)
        if not isinstance(total, int) or total % ep:
            raise ValueError(f"{fqn}.num_experts={total!r} must be an int divisible by ep={ep}: each ep rank holds "
                             "an equal share of the experts; pick ep dividing the number of experts")
        local = total // ep
        for key, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0 or p.shape[0] != total:
                raise ValueError(f"{fqn}.{key} has shape {tuple(p.shape)}: an experts module's parameters must have "
                                 f"the expert index as dim 0 (num_experts={total})")
            piece = p.detach()[rank * local:(rank + 1) * local]
            shard = DTensor.from_local(piece, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            module.register_parameter(key, nn.Parameter(shard, requires_grad=p.requires_grad))
        module.num_experts = local
        module.forward = ExpertDispatch(module.forward, ep_mesh, total, grad_scale)
    return len(found)


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split ``send`` (one count per rank) sent out, ``recv`` rows received; backward reverses it,
    the gradient multiplied by ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, recv: list[int], send: list[int], group: Any, grad_scale: float) -> torch.Tensor:
        ctx.recv, ctx.send, ctx.group, ctx.grad_scale = recv, send, group, grad_scale
        return _exchange(x, recv, send, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = _exchange(grad, ctx.send, ctx.recv, ctx.group)
        return (out if ctx.grad_scale == 1 else out * ctx.grad_scale), None, None, None, None


def _exchange(x: torch.Tensor, recv: list[int], send: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def dispatch_plan(top_k_index: torch.Tensor, num_experts: int, ep_mesh: DeviceMesh
                  ) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
    """(order of the flattened (token, k) pairs by expert, rows sent to each rank, rows received from each,
    the local expert id of each received row). One all_to_all of the per-expert counts."""
    ep = ep_mesh.size()
    local = num_experts // ep
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    got = torch.empty_like(counts)
    dist.all_to_all_single(got, counts, group=ep_mesh.get_group())  # rank r gets everyone's counts of its experts
    got = got.view(ep, local)
    send, recv = counts.view(ep, local).sum(1).tolist(), got.sum(1).tolist()
    local_ids = torch.arange(local, device=flat.device).repeat(ep).repeat_interleave(got.reshape(-1))
    return order, send, recv, local_ids


class ExpertDispatch:
    """An experts module's forward under expert parallelism (see the module docstring). An object, not a
    closure, so ``expert_parameters`` can find the modules it replaced the forward of."""

    def __init__(self, forward: Any, ep_mesh: DeviceMesh, num_experts: int, grad_scale: float = 1.0):
        self.forward, self.ep_mesh, self.num_experts, self.grad_scale = forward, ep_mesh, num_experts, grad_scale

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        tokens, k = top_k_index.shape
        group = self.ep_mesh.get_group()
        order, send, recv, local_ids = dispatch_plan(top_k_index, self.num_experts, self.ep_mesh)
        rows = _AllToAll.apply(hidden_states[order // k], recv, send, group, 1 / self.grad_scale)
        module = self.forward.__self__
        params = {key: p.to_local() for key, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        with _reparametrize_module(module, params):
            out = self.forward(rows, local_ids[:, None], ones)
        if rows.shape[0] == 0:
            # No token for this rank's experts: the (empty) output still depends on the received rows and on every
            # local expert parameter (zero gradients), so this rank's backward runs the dispatch's reverse
            # all-to-all and FSDP2's gradient reduce-scatter like every other rank does (without the rows' edge
            # it skipped the all-to-all and the group hung).
            out = out + (rows.sum() + sum(p.sum() for p in params.values())) * 0
        back = _AllToAll.apply(out, send, recv, group, self.grad_scale)
        pairs = torch.empty_like(back).index_copy(0, order, back)  # back to (token, k) order
        weights = top_k_weights.to(pairs.dtype).reshape(tokens, k, 1)
        return (pairs.view(tokens, k, -1) * weights).sum(1)
