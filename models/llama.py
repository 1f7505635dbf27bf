"""Hugging Face decoders with Llama's module names: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms).

    spec = model_spec("llama")           # also by config.model_type: "mistral", "qwen2", "qwen3"

Their causal LM is ``model.{embed_tokens, layers.<i>.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}, norm}`` + ``lm_head``, and transformers' classes are used as
they are. Everything but the tensor-parallel plan is models/hf/family.py's.

The plan (parallel/tensor_parallel.py's styles): per block the two norms ``norm_style``, ``self_attn`` and ``mlp``
get their input Replicate (gathered under SP), q/k/v and gate/up ColwiseParallel (a bias is sharded with its rows),
o and down Rowwise to the residual layout; Qwen3's per-head ``q_norm`` / ``k_norm`` are ``HeadSharded``. Top level:
the embedding Rowwise with a full-length Replicate output (HF builds position ids and the causal mask from its
length, so under SP the first decoder layer of each stage keeps its slice instead), ``model.norm`` and the head
as for any decoder. KV heads: with kv % tp == 0 each rank keeps kv/tp heads; when tp is a multiple of them they
are replicated (parallel/kv_replication.py) and each attention's ``num_key_value_groups`` becomes its local
query heads per kv head. A tied ``lm_head`` is re-tied after sharding (both are Shard(0) of (vocab, d)).
"""

from __future__ import annotations

from plait.models.hf.family import hf_spec
from plait.models.spec import register
from plait.parallel.kv_replication import check_divisible, kv_replicas, replicate_heads
from plait.parallel.tensor_parallel import (
    HeadSharded,
    act_layout,
    has_module,
    norm_style,
    output_style,
    sequence_check,
)
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)


def decoder_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False, head_norms: bool = False
                    ) -> tuple[dict, dict]:
    """(top-level plan for a Llama-named HF decoder causal LM, plan for one ``model.layers.<i>``)."""
    sp, act = sequence_parallel, act_layout(sequence_parallel)
    top = {
        # Full-length embeddings: the HF model builds position ids and the causal mask from their length.
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "model.norm": norm_style(sp),
        "lm_head": output_style(sp, loss_parallel),
    }
    block = {
        "input_layernorm": norm_style(sp),
        "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": act},
                                        desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(output_layouts=act),
        "post_attention_layernorm": norm_style(sp),
        "mlp": PrepareModuleInput(input_layouts=(act,), desired_input_layouts=(Replicate(),)),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=act),
    }
    if head_norms:
        block["self_attn.q_norm"] = HeadSharded()
        block["self_attn.k_norm"] = HeadSharded()
    return top, block


def decoder_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(global index, block) of the decoder layers this model (or pipeline stage) really holds."""
    layers = model.model.layers
    items = layers.items() if isinstance(layers, nn.ModuleDict) else enumerate(layers)
    return [(int(i), b) for i, b in items if any(True for _ in b.parameters()) or hasattr(b, "self_attn")]


def shard_decoder(model: nn.Module, mesh: DeviceMesh, sp: bool, lp: bool, plan: tuple[dict, dict],
                  kv_projections=lambda attn: [attn.k_proj, attn.v_proj], local_heads=None) -> None:
    """Apply a (top, block) plan to a HF decoder causal LM or a pipeline stage of one, in place, with the
    decoder conventions every HF family shares: SP's first-layer slice and last-layer gather, kv-head
    replication (``kv_projections(attn)``: the modules holding kv heads), a re-tied lm_head. ``local_heads(attn,
    tp, replicas)`` fixes what a family's attention reads of its head counts (default: Llama's
    ``num_key_value_groups``)."""
    c, tp = model.config.get_text_config(decoder=True), mesh.size()
    check_divisible({"intermediate_size": c.intermediate_size}, tp)
    replicas = kv_replicas(c.num_key_value_heads, c.num_attention_heads, tp)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layers = decoder_layers(model)
    top, block_plan = plan
    top = {fqn: style for fqn, style in top.items() if has_module(model, fqn)}
    if sp and layers:
        # Each stage's first layer sees the full sequence (position ids and the mask come from its length)
        # and keeps its slice; a stage that hands hidden states on gathers them back after its last layer.
        first = layers[0][0]
        layers[0][1].register_forward_pre_hook(sequence_check(tp))  # before the plan's hook: full length
        top[f"model.layers.{first}"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                          desired_input_layouts=(Shard(1),), use_local_output=True)
        if not has_module(model, "lm_head"):
            parallelize_module(layers[-1][1], mesh, PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    parallelize_module(model, mesh, top)
    for _, block in layers:
        attn = block.self_attn
        if replicas > 1:
            replicate_heads(kv_projections(attn), replicas, head_dim, mesh)
        parallelize_module(block, mesh, block_plan)
        (local_heads or _llama_local_heads)(attn, c, tp, replicas)
    tied = getattr(c, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False)
    if tied and has_module(model, "lm_head") and has_module(model, "model.embed_tokens"):
        model.lm_head.weight = model.model.embed_tokens.weight  # both are Shard(0) of (vocab, d): re-tie them


def _llama_local_heads(attn: nn.Module, c, tp: int, replicas: int) -> None:
    attn.num_key_value_groups = c.num_attention_heads // tp // max(1, c.num_key_value_heads * replicas // tp)


def parallelize_decoder(model: nn.Module, mesh: DeviceMesh, sp: bool, lp: bool) -> None:
    """Shard a Llama-named HF decoder causal LM (or a pipeline stage of one) in place."""
    head_norms = any(hasattr(b.self_attn, "q_norm") for _, b in decoder_layers(model))
    shard_decoder(model, mesh, sp, lp, decoder_tp_plan(sp, lp, head_norms))


SPEC = register(hf_spec("llama", ("llama", "mistral", "qwen2", "qwen3"), tensor_parallel=parallelize_decoder,
                        tp_plan=decoder_tp_plan, kv_projections=("self_attn.k_proj", "self_attn.v_proj")))
