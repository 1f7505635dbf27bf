"""Tensor parallelism (Megatron style), with optional sequence parallelism and loss parallelism.

    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True, loss_parallel=True)
    loss = tp_loss(model(tokens), targets, loss_parallel=True)   # a plain scalar; backward anywhere

Which plan a model gets is looked up by architecture in ``hf_plans`` (``register_tp_plan`` adds one);
this module holds the styles, Plait GPT's plan and the loss. The plans are FQN -> ParallelStyle dicts
for ``parallelize_module`` on a 1-D tp mesh, as torchtitan writes them.
``act`` is the layout of the residual stream between blocks: ``Replicate()`` (every tp rank holds the
full ``(batch, seq, d)``) or, with sequence parallelism, ``Shard(1)`` (each holds ``seq / tp``
positions); it travels as a plain local tensor. A norm hands its output to attention /
feed-forward as a DTensor, so the backward reduces once per norm, not once per projection.

    per block (Plait GPT name / HF Llama name)
      attention_norm, ffn_norm / input_layernorm, post_attention_layernorm
                              SequenceParallel under SP, else Replicated (weights -> Replicate DTensors)
      attention / self_attn   PrepareModuleInput: act -> Replicate (all-gathers the sequence under SP)
      wq wk wv / q,k,v_proj   ColwiseParallel: each rank keeps n_heads/tp query and kv heads
      wo / o_proj             RowwiseParallel -> act (all-reduce, or reduce-scatter under SP)
      feed_forward / mlp      PrepareModuleInput: act -> Replicate
      w1 w3 / gate,up_proj    ColwiseParallel;  w2 / down_proj: RowwiseParallel -> act
    top level
      tok_embeddings / embed_tokens   RowwiseParallel (vocab-sharded table) -> act
      norm / model.norm               SequenceParallel or Replicated
      output / lm_head                ColwiseParallel (vocab-sharded) -> Replicate logits, or, with
                                      loss parallelism, a Shard(-1) DTensor that ``tp_loss`` consumes

Every parameter becomes a DTensor on the tp mesh, so ``clip_grad_norm_``, FSDP2 and DCP see one kind.
Head counts: both models reshape projections with ``-1`` heads and HF keeps ``num_key_value_groups``
(a ratio), so the local shard simply holds n_heads/tp heads. Contiguous head shards keep each query
head with its GQA kv head. (HF decoders with fewer kv heads than tp replicate them: see hf_plans.)
RoPE: under SP the GPT's embedding output (or a middle stage's hidden input) holds seq/tp positions;
``model.sequence_shards = tp`` makes the GPT build the tables for the gathered sequence from its start
position or positions, and a pre-hook on each attention checks the lengths agree. HF Llama derives positions
and the causal mask from the embedding output, so under SP that output stays full-length (an
all-reduce where torchtitan's GPT has a reduce-scatter) and the first decoder layer keeps its slice.
SP needs seq % tp == 0 (checked at forward). Uneven vocab shards work in torch 2.13 and are allowed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from plait.models.gpt import GPT, lm_loss, upcast
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle


class Replicated(ParallelStyle):
    """Norms without SP: parameters become Replicate DTensors, plain inputs Replicate DTensors.

    The output is re-wrapped (to_local, then from_local as Replicate) so the Partial gradient coming
    back from the column-parallel projections is all-reduced once, before the norm (Megatron's "f"),
    and the norm weight's gradient is a complete Replicate tensor. Without this the weight gradient
    stays Partial and every optimizer op that reads it would all-reduce it again."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def to_dtensor(_mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                         if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

        def reduce_grad_here(_mod, output, mesh):
            if isinstance(output, DTensor):
                return DTensor.from_local(output.to_local(), mesh, [Replicate()], run_check=False)
            return output

        return distribute_module(module, device_mesh, input_fn=to_dtensor, output_fn=reduce_grad_here)


def _norm(sequence_parallel: bool) -> ParallelStyle:
    return SequenceParallel() if sequence_parallel else Replicated()


def _act(sequence_parallel: bool):
    return Shard(1) if sequence_parallel else Replicate()


def _output(sequence_parallel: bool, loss_parallel: bool) -> ParallelStyle:
    return ColwiseParallel(input_layouts=_act(sequence_parallel),
                           output_layouts=Shard(-1) if loss_parallel else Replicate(),
                           use_local_output=not loss_parallel)


def gpt_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False
                ) -> tuple[dict[str, ParallelStyle], dict[str, ParallelStyle]]:
    """(top-level plan for a GPT, plan for one ``layers.<i>`` block)."""
    sp, act = sequence_parallel, _act(sequence_parallel)
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=act),
        "norm": _norm(sp),
        "output": _output(sp, loss_parallel),
    }
    block = {
        "attention_norm": _norm(sp),
        "attention": PrepareModuleInput(input_layouts=(act, None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=act),
        "ffn_norm": _norm(sp),
        "feed_forward": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=act),
        "feed_forward.w3": ColwiseParallel(),
    }
    return top, block


def _check_divisible(sizes: dict[str, int], tp: int) -> None:
    for name, size in sizes.items():
        if size % tp:
            good = [d for d in range(1, size + 1) if size % d == 0]
            raise ValueError(f"tensor parallelism splits {name}={size} across tp={tp} ranks, but {size} is not "
                             f"divisible by {tp}: choose tp from {good} or change {name}")


def _present(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """The plan entries whose module exists (a pipeline stage may have dropped some: set to None)."""
    return {fqn: style for fqn, style in plan.items() if _has(model, fqn)}


def _has(model: nn.Module, fqn: str) -> bool:
    try:
        return model.get_submodule(fqn) is not None
    except AttributeError:
        return False


def _sequence_check(tp: int):
    """Pre-hook on the module that first sees the full sequence: SP needs seq % tp == 0."""

    def hook(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 2 and args[0].shape[1] % tp:
            raise ValueError(f"sequence parallelism splits the sequence ({args[0].shape[1]} positions) across "
                             f"tp={tp} ranks: use a sequence length divisible by {tp} or sequence_parallel=False")

    return hook


def _rope_length_check(_attention, args):
    """Under SP the GPT builds RoPE tables for the gathered sequence (``model.sequence_shards = tp``, set
    below), whatever its start position or positions; the attention input is gathered, so lengths match."""
    x, cos = args[0], args[1]
    if cos.shape[-2] != x.shape[1]:
        raise ValueError(f"RoPE tables cover {cos.shape[-2]} positions but the gathered attention input has "
                         f"{x.shape[1]}: under sequence parallelism call the GPT with the full sequence's tokens "
                         "or positions (model.sequence_shards says how many shards a hidden input is)")


def parallelize_gpt(model: GPT, mesh: DeviceMesh, sp: bool, lp: bool) -> None:
    """The registered plan for Plait's GPT (or a pipeline stage of one)."""
    cfg, tp = model.cfg, mesh.size()
    _check_divisible({"model.n_heads": cfg.n_heads, "model.n_kv_heads": cfg.kv_heads,
                      "ffn hidden size": cfg.hidden}, tp)
    top, block_plan = gpt_tp_plan(sp, lp)
    if sp and model.tok_embeddings is not None:
        model.register_forward_pre_hook(_sequence_check(tp))
    parallelize_module(model, mesh, _present(model, top))
    if sp:
        model.sequence_shards = tp
    for block in model.layers.values():
        parallelize_module(block, mesh, block_plan)
        if sp:
            block.attention.register_forward_pre_hook(_rope_length_check)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = False,
                          loss_parallel: bool = False) -> nn.Module:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` with the plan registered for its architecture
    (``hf_plans``: Plait's GPT, HF llama / mistral / qwen2 / qwen3, or a pipeline stage of one; TypeError
    naming the known ones otherwise). Build it with the same seed on every rank first (or on the meta
    device, then materialise and load). Returns the model."""
    from plait.models.hf.plans import find_tp_plan  # hf_plans builds on this module's styles

    if tp_mesh.ndim != 1:
        raise ValueError(f"tensor parallelism needs a 1-D mesh, got {tp_mesh.ndim}-D {tp_mesh.mesh_dim_names}: "
                         "pass the tp sub-mesh, e.g. mesh['tp']")
    find_tp_plan(model)(model, tp_mesh, sequence_parallel, loss_parallel)
    return model


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of vocab-sharded logits under ``loss_parallel()``; the gradient is computed in the
    same context during forward, so the returned plain loss can be backpropagated anywhere (a pipeline
    schedule, a caller that never heard of loss_parallel)."""

    @staticmethod
    def forward(ctx, logits: DTensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), loss_parallel():
            leaf = logits.detach().requires_grad_(ctx.needs_input_grad[0])
            loss = F.cross_entropy(upcast(leaf).flatten(0, 1), targets.flatten(0, 1))
            if leaf.requires_grad:
                (grad,) = torch.autograd.grad(loss, leaf)
                ctx.save_for_backward(grad)
        return loss.detach().to_local()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None


def tp_loss(logits: torch.Tensor, targets: torch.Tensor, loss_parallel: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (like ``lm_loss``), a plain scalar equal on every tp rank.
    With ``loss_parallel`` the logits are the vocab-sharded DTensor the model returns; the full
    (batch, seq, vocab) logits are never gathered. A HF model's output (``.logits``) is accepted too."""
    logits = getattr(logits, "logits", logits)
    if not loss_parallel:
        return lm_loss(logits, targets)
    vocab_sharded = isinstance(logits, DTensor) and any(
        p.is_shard() and p.dim % logits.ndim == logits.ndim - 1 for p in logits.placements)
    if not vocab_sharded:
        raise ValueError("tp_loss(loss_parallel=True) needs vocab-sharded DTensor logits: apply the plan with "
                         "apply_tensor_parallel(..., loss_parallel=True), or pass loss_parallel=False")
    return _VocabParallelCrossEntropy.apply(logits, targets)
