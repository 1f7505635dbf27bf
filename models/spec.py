"""Model families declare themselves: one ``ModelSpec`` per family, in a registry by name and HF ``model_type``.

    from plait.models import model_spec, spec_for_config     # the registry (models/registry.py)
    spec = model_spec("gpt")                  # Plait's GPT (a [model] table is its GPTConfig)
    spec = spec_for_config(hf_config)         # a Hugging Face config, by config.model_type (llama, phi3 ...)
    parts = parallelize(lambda: spec.build(cfg), plan, mesh, device, optim, spec=spec)
    plan.validate(world_size, spec.shape(cfg))

What a family declares is what the mechanisms in ``plait.parallel`` ask of a model. They are handed the spec
(or the pieces of it they need) and never import a family, so adding one is a file in ``models/`` that builds a
ModelSpec and calls ``register``; nothing in ``parallel/`` changes:

  build(config)             the model, in torch's default dtype and device (callers wrap it in
                            ``torch.device("meta")`` to build without memory)
  shape(config)             its sizes (parallel/shape.py): plan checks and the estimator
  tensor_parallel(model, tp_mesh, sp, lp)   shard it in place (its FQN -> ParallelStyle plan, from
                            parallel/tensor_parallel.py's styles; kv-head replication, fused weights)
  tp_plan(sp, lp)           that plan as (top-level, per-block) FQN -> style dicts (the estimator reads it)
  cut_stage(model, (start, stop), first, last)   a pipeline stage with the layers [start, stop), names unchanged
  num_layers(model)         how many blocks pipeline stages divide
  load_weights(model, folder)   fill a materialised (possibly sharded) model from a local HF folder, each rank
                            reading only the slices it holds; export_config(config) the config.json it exports
  weight_names(model)       model parameter name -> HF tensor name and row map (load and export share it)
  reset_buffers(model)      recompute non-persistent buffers (RoPE tables) after ``to_empty``
  tied_weights(model)       groups of parameter names that are one tensor (a tied embedding and head): pipeline
                            stages holding copies sum their gradients
  init_value(model, name, shape, generator)   a parameter's initial value (random init shard by shard)
  experts                   module names in a block that are experts modules (models/moe.py): "ep" shards them
  attention                 how its attention is reached from outside (``AttentionHooks``): the core that ring
                            attention replaces (cp), the keyword that takes explicit positions, and a forward
                            through a KV cache at a start position (SeCO/SpaCO chunks, KV-cache generation)
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from plait.parallel.estimate import ModelParams, ParamInfo
from plait.parallel.names import clean_fqn
from plait.parallel.shape import DecoderShape
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

TPPlanFn = Callable[[nn.Module, Any, bool, bool], None]  # (model, tp_mesh, sequence_parallel, loss_parallel)


def _nothing(_model: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class AttentionHooks:
    """One attention API, three callers: ring attention (cp), chunk-wise training, KV-cache generation."""

    # (model, core or None): every attention's score computation becomes core(q, k, v, scale=, window=) on
    # (batch, heads, n, head_dim) tensors (None restores the family's own); positions then come through:
    set_core: Callable[[nn.Module, Callable | None], None]
    positions_kwarg: str  # the forward keyword taking explicit (batch, n) or (n,) positions
    # (model, tokens, cache, start) -> logits: tokens at positions start.. through a Plait cache
    # (update(k, v, layer_idx) -> keys/values to attend to; get_seq_length())
    cache_forward: Callable[[nn.Module, torch.Tensor, Any, int], torch.Tensor]
    # (model, tokens (B, n), positions (B, n), cache, key_valid (B, kv_len) bool) -> logits (B, n, V): a batch of
    # left-padded rows through a cache, padded keys hidden (KV-cache generation of prompts of different lengths)
    padded_forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, Any, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[Any], nn.Module]
    shape: Callable[[Any], DecoderShape]
    hf_model_types: tuple[str, ...] = ()  # config.model_type values this spec serves ("llama", "qwen2" ...)
    config_class: type | None = None  # the [model] table's dataclass for a family configured in the spec (GPT)
    tensor_parallel: TPPlanFn | None = None
    tp_plan: Callable[[bool, bool], tuple[dict, dict]] | None = None
    cut_stage: Callable[[nn.Module, tuple[int, int], bool, bool], nn.Module] | None = None
    num_layers: Callable[[nn.Module], int] | None = None
    load_weights: Callable[[nn.Module | list[nn.Module], Any], list[str]] | None = None
    weight_names: Callable[[nn.Module], dict] | None = None
    export_config: Callable[[Any], dict] | None = None
    reset_buffers: Callable[[nn.Module], None] = _nothing
    init_value: Callable[[nn.Module, str, tuple[int, ...], torch.Generator | None], torch.Tensor] | None = None
    attention: AttentionHooks | None = None
    tied_weights: Callable[[nn.Module], list[tuple[str, ...]]] | None = None  # names that are one tensor
    kv_projections: tuple[str, ...] = ()  # module names in a block that hold kv heads (the estimator's replication)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # default LoRA modules (peft names)
    generation: bool = True  # a causal LM that KV-cache generation can drive (the RL policy)
    # module names inside a block (``layers.<i>.<name>``) that are experts modules (models/moe.py's contract:
    # forward(x (T, H), top_k_index (T, k), top_k_weights (T, k)), ``num_experts``, params with dim 0 = expert):
    # expert parallelism shards their dim 0 over the ep ranks
    experts: tuple[str, ...] = ()
    # module names inside a block that are MoE routers (forward output[2]: the (T, k) expert ids): the expert
    # load meter (models/moe.py's ExpertLoad) hooks them for per-expert token counts
    routers: tuple[str, ...] = ()

    def supports(self) -> tuple[str, ...]:
        """The mesh dimensions this family can be split over beyond data parallelism."""
        out = []
        if self.tensor_parallel is not None:
            out.append("tp")
        if self.cut_stage is not None:
            out.append("pp")
        if self.attention is not None:
            out.append("cp")
        if self.experts:
            out.append("ep")
        return tuple(out)


_BY_NAME: dict[str, ModelSpec] = {}
_BY_MODEL_TYPE: dict[str, ModelSpec] = {}


# The registry's tables; models/registry.py looks families up in them (after importing the built-in ones).
def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Add a family to the registry (by its name and every HF model_type it serves); returns the spec."""
    keys = [("name", spec.name, _BY_NAME)] + [("model_type", t, _BY_MODEL_TYPE) for t in spec.hf_model_types]
    for kind, key, table in keys:
        if key in table and table[key] is not spec and table[key].name != spec.name and not replace:
            raise ValueError(f"a model spec for {kind} {key!r} is registered already ({table[key].name}): pass "
                             "replace=True to swap it")
    for _kind, key, table in keys:
        table[key] = spec
    return spec


_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.*)$")


def model_params(spec: ModelSpec, config: Any) -> ModelParams:
    """What the estimator needs of a family's model (parallel/estimate.py), from a meta-device build: every
    parameter's shape, its block or the end of the model it sits at (a first pipeline stage cut by the family's
    own ``cut_stage`` keeps the embeddings), the dim its tensor-parallel plan shards, its kv heads."""
    with torch.device("meta"):
        model = spec.build(config)
    shape = spec.shape(config)
    first_stage = set()
    if spec.cut_stage is not None:
        stage = spec.cut_stage(copy.deepcopy(model), (0, 1), True, shape.n_layers == 1)
        first_stage = {clean_fqn(n) for n, _ in stage.named_parameters()}
    top, block = spec.tp_plan(False, False) if spec.tp_plan is not None else ({}, {})
    modules = dict(model.named_modules())
    params = {}
    for name, p in model.named_parameters():
        name = clean_fqn(name)
        owner, _, leaf = name.rpartition(".")
        m = _BLOCK.match(name)
        layer, rel = (int(m.group(1)), m.group(2).rpartition(".")[0]) if m else (None, owner)
        style = (block if m else top).get(rel)
        params[name] = ParamInfo(
            shape=tuple(p.shape), layer=layer,
            end="" if m else ("first" if name in first_stage else "last"),
            tp_dim=_tp_dim(style, modules.get(owner), leaf),
            kv_heads=shape.n_kv_heads if m and rel in spec.kv_projections else 0,
            expert=bool(m) and any(rel == e or rel.startswith(e + ".") for e in spec.experts))
    buffers = sum(b.numel() for b in model.buffers())
    return ModelParams(params, buffer_elems=buffers, n_layers=shape.n_layers,
                       meta={"params": sum(math.prod(i.shape) for i in params.values())})


def _tp_dim(style: Any, module: nn.Module | None, leaf: str) -> int | None:
    if isinstance(style, ColwiseParallel):
        return 0
    if isinstance(style, RowwiseParallel):
        return 0 if isinstance(module, nn.Embedding) else (1 if leaf == "weight" else None)
    return None
