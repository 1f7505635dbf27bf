"""Tensor parallelism (Megatron style), with optional sequence parallelism and loss parallelism: the styles.

    apply_tensor_parallel(model, mesh["tp"], spec, sequence_parallel=True, loss_parallel=True)
    loss = tp_loss(model(tokens), targets, loss_parallel=True)   # parallel/loss.py; backward anywhere

Which plan a model gets is its family's (``plait.models``: ``spec.tensor_parallel``, an FQN -> ParallelStyle
plan per block and for the top level, applied with ``parallelize_module`` on a 1-D tp mesh as torchtitan writes
them). This module holds what those plans are made of, knowing no family:

``act_layout(sp)`` is the layout of the residual stream between blocks: ``Replicate()`` (every tp rank holds
the full ``(batch, seq, d)``) or, with sequence parallelism, ``Shard(1)`` (each holds ``seq / tp`` positions);
it travels as a plain local tensor. A norm hands its output to attention / feed-forward as a DTensor, so the
backward reduces once per norm, not once per projection:

    norms                      norm_style(sp): SequenceParallel under SP, else Replicated (Replicate weights)
    attention / feed-forward   PrepareModuleInput: act -> Replicate (all-gathers the sequence under SP)
    q, k, v / gate, up         ColwiseParallel: each rank keeps n_heads/tp heads (hidden/tp columns)
    o / down                   RowwiseParallel -> act (all-reduce, or reduce-scatter under SP)
    embeddings                 RowwiseParallel (a vocab-sharded table) -> act
    output projection          output_style(sp, lp): ColwiseParallel (vocab-sharded) -> Replicate logits, or,
                               with loss parallelism, a Shard(-1) DTensor that ``tp_loss`` consumes
    per-head norms             HeadSharded (Qwen3 / Gemma-3 q_norm, k_norm on the rank's heads)

Every parameter becomes a DTensor on the tp mesh, so ``clip_grad_norm_``, FSDP2 and DCP see one kind. Heads
are reshaped with ``-1`` heads, so the local shard simply holds n_heads/tp heads; contiguous head shards keep
each query head with its GQA kv head (replicated when tp exceeds them: parallel/kv_replication.py). SP needs
seq % tp == 0 (``sequence_check``, at forward). Uneven vocab shards work in torch 2.13 and are allowed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel
from torch.distributed.tensor.parallel.style import ParallelStyle


class Replicated(ParallelStyle):
    """Norms without SP: parameters become Replicate DTensors, plain inputs Replicate DTensors.

    The output is re-wrapped (to_local, then from_local as Replicate) so the Partial gradient coming
    back from the column-parallel projections is all-reduced once, before the norm (Megatron's "f"),
    and the norm weight's gradient is a complete Replicate tensor. Without this the weight gradient
    stays Partial and every optimizer op that reads it would all-reduce it again. ``local_output``: the output
    is a plain tensor, for a norm whose output joins the residual stream itself (Gemma's post-norms)."""

    def __init__(self, local_output: bool = False):
        super().__init__()
        self.local_output = local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                         if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

        def reduce_grad_here(_mod, output, mesh):
            if isinstance(output, DTensor):
                local = output.to_local()
                return local if self.local_output else DTensor.from_local(local, mesh, [Replicate()], run_check=False)
            return output

        return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=reduce_grad_here)


class HeadSharded(ParallelStyle):
    """A per-head norm (Qwen3's, Gemma-3's q_norm / k_norm on (batch, seq, heads, head_dim)) after a column-
    parallel projection: the weight is a Replicate DTensor, the input is this rank's heads (Shard on ``dim``),
    so the weight's gradient is the sum over all ranks' heads (a Partial DTensor, like SequenceParallel's)."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.dim = dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_params(_name, mod, mesh):
            for key, p in list(mod.named_parameters(recurse=False)):
                if not isinstance(p, DTensor):
                    mod.register_parameter(key, nn.Parameter(DTensor.from_local(p.data, mesh, [Replicate()],
                                                                                run_check=False),
                                                             requires_grad=p.requires_grad))

        def heads_in(_mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Shard(self.dim)], run_check=False)
                         if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

        def local_out(_mod, output, _mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, replicate_params, input_fn=heads_in, output_fn=local_out)


def norm_style(sequence_parallel: bool, local_output: bool = False) -> ParallelStyle:
    """A norm's style; ``local_output`` for a norm whose output goes straight into the residual stream."""
    if sequence_parallel:
        return SequenceParallel(use_local_output=local_output)
    return Replicated(local_output)


def act_layout(sequence_parallel: bool):
    return Shard(1) if sequence_parallel else Replicate()


class _Fresh(torch.autograd.Function):
    """The same values as a tensor of its own for autograd (no copy; the identity backward): ``to_local()``
    returns a view, and FSDP2 warns that an in-place op on a view returned by a root it wraps could drop its
    pre-backward hook."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class ColwiseToLocal(ColwiseParallel):
    """A column-parallel output projection whose output comes back gathered (Replicate) as a plain tensor that is
    not a view of the gathered buffer (``_Fresh``): what a model wrapped by FSDP2 returns (the logits)."""

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts, async_op=True)
        return _Fresh.apply(outputs.to_local()) if use_local_output else outputs


def output_style(sequence_parallel: bool, loss_parallel: bool) -> ParallelStyle:
    cls = ColwiseParallel if loss_parallel else ColwiseToLocal
    return cls(input_layouts=act_layout(sequence_parallel), output_layouts=Shard(-1) if loss_parallel else Replicate(),
               use_local_output=not loss_parallel)


def present(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """The plan entries whose module exists and is real (a pipeline stage drops some: None or Identity)."""
    return {fqn: style for fqn, style in plan.items() if has_module(model, fqn)}


def has_module(model: nn.Module, fqn: str) -> bool:
    try:
        module = model.get_submodule(fqn)
    except AttributeError:
        return False
    return module is not None and not isinstance(module, nn.Identity)


def sequence_check(tp: int):
    """Pre-hook on the module that first sees the full sequence: SP needs seq % tp == 0."""

    def hook(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 2 and args[0].shape[1] % tp:
            raise ValueError(f"sequence parallelism splits the sequence ({args[0].shape[1]} positions) across "
                             f"tp={tp} ranks: use a sequence length divisible by {tp} or sequence_parallel=False")

    return hook


def keep_grads_sharded(model: nn.Module) -> int:
    """Make every DTensor parameter's gradient take its parameter's placements once accumulated. Torch 2.13
    leaves a vocab-sharded (RowwiseParallel) embedding's gradient a full Replicate tensor on every tp rank: tp
    times the parameter's bytes, kept until the next step. Replicate -> Shard is a local slice (no
    communication), so the hook only frees memory. (Under FSDP2 the gradients are FSDP's, reduce-scattered
    to shards already: not needed there.) Returns how many parameters got the hook."""
    def reshard(p: torch.Tensor) -> None:
        if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)

    count = 0
    for p in model.parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            p.register_post_accumulate_grad_hook(reshard)
            count += 1
    return count


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, spec: Any, *, sequence_parallel: bool = False,
                          loss_parallel: bool = False) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` with its family's plan (``spec.tensor_parallel``, a
    ``plait.models`` spec). Build it with the same seed on every rank first (or on the meta device, then
    materialise and load). Returns the model."""
    if tp_mesh.ndim != 1:
        raise ValueError(f"tensor parallelism needs a 1-D mesh, got {tp_mesh.ndim}-D {tp_mesh.mesh_dim_names}: "
                         "pass the tp sub-mesh, e.g. mesh['tp']")
    plan_fn = getattr(spec, "tensor_parallel", None)
    if plan_fn is None:
        name = getattr(spec, "name", type(model).__name__)
        raise TypeError(f"tensor parallelism has no plan for {name!r} ({type(model).__name__}): its model spec "
                        "declares none (plait.models); use tp=1, or give the spec a tensor_parallel plan")
    plan_fn(model, tp_mesh, sequence_parallel, loss_parallel)
    return model
