"""Tensor-parallel plans by architecture: a small registry that ``apply_tensor_parallel`` consults.

    register_tp_plan("my_arch", fn)        # fn(model, tp_mesh, sequence_parallel, loss_parallel) -> None
    find_tp_plan(model)                    # the plan for config.model_type, else the class name

Built in: Plait's ``GPT`` and the Hugging Face decoder families whose causal LM is
``model.{embed_tokens, layers.<i>.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}, norm}`` + ``lm_head``: ``llama``, ``mistral``, ``qwen2`` (q/k/v biases:
ColwiseParallel shards a bias with its rows) and ``qwen3`` (``self_attn.q_norm`` / ``k_norm`` act per
head on head_dim: their weights are replicated and their input is the rank's heads, Shard on the head
dim, so the weight gradient sums over every rank's heads). Another family with these names is one line:
``register_tp_plan("phi3", parallelize_decoder)``.

KV heads (``parallelize_decoder``): with num_key_value_heads % tp == 0 each rank keeps kv/tp heads.
When tp exceeds the kv heads (MQA, or GQA with few kv heads; tp % kv == 0) they are replicated as
Megatron does: ``k_proj`` / ``v_proj`` rows (and biases) are repeated head by head tp/kv times, so the
Colwise shard of rank r is kv head ``r // (tp/kv)``, the one its query heads use, and each attention's
``num_key_value_groups`` becomes its local query heads. The copies of one head get different gradients
(each from its rank's query heads): ``sync_replicated_kv_grads(modules)`` after backward (before clipping
and the optimizer step) sums them over the ranks sharing the head, so every copy gets the original
head's gradient and the copies stay equal. ``hf_weights`` maps the copies back to the one head (load:
each copy reads its head; export: the first copy is written). A global gradient norm counts a
replicated head tp/kv times.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from plait.parallel.tensor_parallel import (
    _act,
    _check_divisible,
    _norm,
    _output,
    _sequence_check,
    parallelize_gpt,
)
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

TPPlanFn = Callable[[nn.Module, DeviceMesh, bool, bool], None]  # (model, tp_mesh, sequence_parallel, loss_parallel)

_PLANS: dict[str, TPPlanFn] = {}
KV_REPLICAS = "plait_kv_replicas"  # attribute set on an attention module whose kv heads are replicated
KV_MESH = "plait_kv_tp_mesh"


def architecture(model: nn.Module) -> str:
    """The registry key of ``model``: its HF ``config.model_type``, else its class name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else type(model).__name__


def known_architectures() -> list[str]:
    return sorted(_PLANS)


def register_tp_plan(name: str, fn: TPPlanFn, *, replace: bool = False) -> None:
    """Make ``apply_tensor_parallel`` shard models whose ``architecture()`` is ``name`` with ``fn``."""
    if not callable(fn):
        raise TypeError(f"register_tp_plan({name!r}, fn): fn must be callable (model, tp_mesh, sequence_parallel, "
                        f"loss_parallel) -> None, got {type(fn).__name__}")
    if name in _PLANS and _PLANS[name] is not fn and not replace:
        raise ValueError(f"a tensor-parallel plan for {name!r} is already registered: pass replace=True to swap it")
    _PLANS[name] = fn


def find_tp_plan(model: nn.Module) -> TPPlanFn:
    """The registered plan for ``model``, or TypeError naming the known architectures and the fix."""
    arch = architecture(model)
    if arch in _PLANS:
        return _PLANS[arch]
    raise TypeError(f"tensor parallelism has no plan for architecture {arch!r} ({type(model).__name__}); known: "
                    f"{', '.join(known_architectures())}. A decoder with Llama's module names registers with "
                    f"plait.models.hf.plans.register_tp_plan({arch!r}, parallelize_decoder); another one with "
                    "register_tp_plan(name, fn), fn(model, tp_mesh, sequence_parallel, loss_parallel) applying "
                    "torch's parallelize_module (see tensor_parallel.gpt_tp_plan); or use tp=1")


class HeadSharded(ParallelStyle):
    """A per-head norm (Qwen3's q_norm / k_norm on (batch, seq, heads, head_dim)) after a column-parallel
    projection: the weight is a Replicate DTensor, the input is this rank's heads (Shard(2)), so the
    weight's gradient is the sum over all ranks' heads (a Partial DTensor, like SequenceParallel's)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_params(_name, mod, mesh):
            for key, p in list(mod.named_parameters(recurse=False)):
                if not isinstance(p, DTensor):
                    mod.register_parameter(key, nn.Parameter(DTensor.from_local(p.data, mesh, [Replicate()],
                                                                                run_check=False),
                                                             requires_grad=p.requires_grad))

        def heads_in(_mod, inputs, mesh):
            return tuple(DTensor.from_local(t, mesh, [Shard(2)], run_check=False)
                         if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

        def local_out(_mod, output, _mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, replicate_params, input_fn=heads_in, output_fn=local_out)


def decoder_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False, head_norms: bool = False
                    ) -> tuple[dict[str, ParallelStyle], dict[str, ParallelStyle]]:
    """(top-level plan for a HF decoder causal LM, plan for one ``model.layers.<i>``)."""
    sp, act = sequence_parallel, _act(sequence_parallel)
    top = {
        # Full-length embeddings: the HF model builds position ids and the causal mask from their length.
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "model.norm": _norm(sp),
        "lm_head": _output(sp, loss_parallel),
    }
    block = {
        "input_layernorm": _norm(sp),
        "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": act},
                                        desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=act),
        "post_attention_layernorm": _norm(sp),
        "mlp": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=act),
    }
    if head_norms:
        block["self_attn.q_norm"] = HeadSharded()
        block["self_attn.k_norm"] = HeadSharded()
    return top, block


def llama_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False):
    """``decoder_tp_plan`` without per-head norms (kept for callers of the old name)."""
    return decoder_tp_plan(sequence_parallel, loss_parallel)


def kv_replicas(num_kv_heads: int, num_heads: int, tp: int) -> int:
    """How many copies of each kv head tp ranks hold: 1 when kv % tp == 0, tp / kv when kv heads are
    replicated (tp % kv == 0); ValueError naming the valid tp otherwise."""
    if num_heads % tp:
        _check_divisible({"num_attention_heads": num_heads}, tp)
    if num_kv_heads % tp == 0:
        return 1
    if tp % num_kv_heads == 0:
        return tp // num_kv_heads
    good = [d for d in range(1, num_heads + 1)
            if num_heads % d == 0 and (num_kv_heads % d == 0 or d % num_kv_heads == 0)]
    raise ValueError(f"tensor parallelism splits num_key_value_heads={num_kv_heads} across tp={tp} ranks: {tp} neither "
                     f"divides {num_kv_heads} nor is a multiple of it (to replicate kv heads); choose tp from {good}")


def replicate_kv_heads(attn: nn.Module, replicas: int, head_dim: int) -> None:
    """Repeat each kv head of ``attn.k_proj`` / ``v_proj`` (weight rows and bias) ``replicas`` times, in place."""
    for proj in (attn.k_proj, attn.v_proj):
        for key in ("weight", "bias"):
            p = getattr(proj, key, None)
            if p is None:
                continue
            heads = p.data.unflatten(0, (-1, head_dim))
            new = heads.repeat_interleave(replicas, dim=0).flatten(0, 1)
            setattr(proj, key, nn.Parameter(new, requires_grad=p.requires_grad))
        proj.out_features = proj.weight.shape[0]


def _layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(global index, block) of the decoder layers this model (or pipeline stage) really holds."""
    layers = model.model.layers
    items = layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)
    return [(int(i), b) for i, b in items if any(True for _ in b.parameters()) or hasattr(b, "self_attn")]


def _is_real(model: nn.Module, fqn: str) -> bool:
    try:
        module = model.get_submodule(fqn)
    except AttributeError:
        return False
    return module is not None and not isinstance(module, nn.Identity)


def parallelize_decoder(model: nn.Module, mesh: DeviceMesh, sp: bool, lp: bool) -> None:
    """Shard a HF decoder causal LM (or a pipeline stage cut by ``pipeline.cut_hf_stage``) in place."""
    c, tp = model.config, mesh.size()
    _check_divisible({"intermediate_size": c.intermediate_size}, tp)
    replicas = kv_replicas(c.num_key_value_heads, c.num_attention_heads, tp)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layers = _layers(model)
    head_norms = any(hasattr(b.self_attn, "q_norm") for _, b in layers)
    top, block_plan = decoder_tp_plan(sp, lp, head_norms)
    top = {fqn: style for fqn, style in top.items() if _is_real(model, fqn)}
    if sp and layers:
        # Each stage's first layer sees the full sequence (position ids and the mask come from its length)
        # and keeps its slice; a stage that hands hidden states on gathers them back after its last layer.
        first = layers[0][0]
        layers[0][1].register_forward_pre_hook(_sequence_check(tp))  # before the plan's hook: full length
        top[f"model.layers.{first}"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                          desired_input_layouts=(Shard(1),), use_local_output=True)
        if not _is_real(model, "lm_head"):
            parallelize_module(layers[-1][1], mesh, PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    parallelize_module(model, mesh, top)
    for _, block in layers:
        if replicas > 1:
            replicate_kv_heads(block.self_attn, replicas, head_dim)
        parallelize_module(block, mesh, block_plan)
        attn = block.self_attn
        attn.num_key_value_groups = c.num_attention_heads // tp // max(1, c.num_key_value_heads * replicas // tp)
        if replicas > 1:
            setattr(attn, KV_REPLICAS, replicas)
            setattr(attn, KV_MESH, mesh)
    tied = getattr(c, "tie_word_embeddings", False)
    if tied and _is_real(model, "lm_head") and _is_real(model, "model.embed_tokens"):
        model.lm_head.weight = model.model.embed_tokens.weight  # both are Shard(0) of (vocab, d): re-tie them


def sync_replicated_kv_grads(modules: nn.Module | list[nn.Module]) -> None:
    """Sum the gradients of replicated kv-head copies over the tp ranks sharing each head (in place, on the
    local shards; works under FSDP2 too, whose shards of the copies line up). A collective on each tp
    group that holds replicated heads; a no-op for models without them. Call it after backward, before
    gradient clipping and the optimizer step."""
    for module in modules if isinstance(modules, (list, tuple)) else [modules]:
        for attn in module.modules():
            replicas = getattr(attn, KV_REPLICAS, 0)
            if replicas <= 1:
                continue
            mesh: DeviceMesh = getattr(attn, KV_MESH)
            tp, rank = mesh.size(), mesh.get_local_rank()
            for proj in (attn.k_proj, attn.v_proj):
                for p in proj.parameters(recurse=False):
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
                        grad = grad.redistribute(grad.device_mesh, [Replicate() if pl.is_partial() else pl
                                                                    for pl in grad.placements])
                        p.grad = grad
                    local = grad.to_local() if isinstance(grad, DTensor) else grad
                    slots = local.new_zeros((tp // replicas, *local.shape))
                    slots[rank // replicas] = local
                    dist.all_reduce(slots, group=mesh.get_group())
                    local.copy_(slots[rank // replicas])


for _arch in ("llama", "mistral", "qwen2", "qwen3"):
    register_tp_plan(_arch, parallelize_decoder)
register_tp_plan("GPT", parallelize_gpt)
