"""Phi-3 (``Phi3ForCausalLM``, model_type "phi3"): fused ``qkv_proj`` and ``gate_up_proj``, sharded by their parts.

    spec = model_spec("phi3")

Phi-3's attention computes [q; k; v] with one Linear and slices it by position (q = the first
``num_attention_heads * head_dim`` columns), its MLP [gate; up] with one and halves it. A column-parallel shard of a
fused weight would give a rank all of q and part of k, so ``build`` splits each fused Linear into its parts
(parallel/fused.py: ``qkv_proj.{q,k,v}``, ``gate_up_proj.{gate,up}``; the same rows, the same math, under every
plan, so checkpoints reshard across plans) and the tensor-parallel plan shards each part like Llama's separate
projections: rank r computes [q_r; k_r; v_r] and [gate_r; up_r]. Each attention then gets its local head counts
(a config copy with ``num_attention_heads / tp``, ``num_key_value_heads``, ``num_key_value_groups``), which is all
Phi-3's forward reads. HF folders keep the fused names: each part reads and writes its rows of the fused tensor
(``offset_rows``), so ``from_pretrained`` loads the export. Everything else is a HF decoder's (models/hf/).
"""

from __future__ import annotations

import copy

from plait.models.hf.family import build_hf, hf_spec
from plait.models.hf.weights import WeightRef, offset_rows
from plait.models.llama import decoder_layers, decoder_tp_plan, shard_decoder
from plait.models.spec import register
from plait.parallel.fused import split_fused
from plait.parallel.names import clean_fqn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel

QKV, GATE_UP = ("q", "k", "v"), ("gate", "up")


def _sizes(config) -> tuple[dict[str, int], dict[str, int]]:
    c = config.get_text_config(decoder=True)
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    qkv = {"q": c.num_attention_heads * d, "k": c.num_key_value_heads * d, "v": c.num_key_value_heads * d}
    return qkv, {"gate": c.intermediate_size, "up": c.intermediate_size}


def build_phi3(config) -> nn.Module:
    """transformers' Phi3ForCausalLM with each fused projection split into its parts."""
    model = build_hf(config)
    qkv, gate_up = _sizes(config)
    for _, layer in decoder_layers(model):
        split_fused(layer.self_attn, "qkv_proj", qkv)
        split_fused(layer.mlp, "gate_up_proj", gate_up)
    return model


def phi3_weight_names(module: nn.Module) -> dict[str, WeightRef]:
    """A part's parameter reads and writes its rows of the fused HF tensor; the rest keep their names."""
    qkv, gate_up = _sizes(module.config)
    starts = {}
    for sizes in (qkv, gate_up):
        at = 0
        for part, rows in sizes.items():
            starts[part] = at
            at += rows
    out = {}
    for name, _ in module.named_parameters():
        name = clean_fqn(name)
        parent, part, leaf = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
        if parent.endswith((".qkv_proj", ".gate_up_proj")) and part in starts:
            out[name] = WeightRef(f"{parent}.{leaf}", offset_rows(starts[part]))  # its rows of the fused tensor
        else:
            out[name] = WeightRef(name)
    return out


def phi3_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False) -> tuple[dict, dict]:
    """Llama's plan with each fused projection's parts in place of the separate projections."""
    top, block = decoder_tp_plan(sequence_parallel, loss_parallel)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        del block[name]
    block.update({f"self_attn.qkv_proj.{p}": ColwiseParallel() for p in QKV})
    block.update({f"mlp.gate_up_proj.{p}": ColwiseParallel() for p in GATE_UP})
    return top, block


def _local_heads(attn: nn.Module, c, tp: int, replicas: int) -> None:
    """What Phi-3's attention reads of its head counts, made this rank's: it slices q by config.num_attention_heads."""
    local = copy.copy(attn.config)
    local.num_attention_heads = c.num_attention_heads // tp
    attn.config = local
    attn.num_key_value_heads = c.num_key_value_heads * replicas // tp
    attn.num_key_value_groups = local.num_attention_heads // attn.num_key_value_heads


def parallelize_phi3(model: nn.Module, mesh: DeviceMesh, sp: bool, lp: bool) -> None:
    shard_decoder(model, mesh, sp, lp, phi3_tp_plan(sp, lp),
                  kv_projections=lambda attn: [attn.qkv_proj.k, attn.qkv_proj.v], local_heads=_local_heads)


SPEC = register(hf_spec(
    "phi3", ("phi3",), build=build_phi3, tensor_parallel=parallelize_phi3, tp_plan=phi3_tp_plan,
    weight_names=phi3_weight_names, kv_projections=("self_attn.qkv_proj.k", "self_attn.qkv_proj.v"),
    lora_targets=("qkv_proj.q", "qkv_proj.k", "qkv_proj.v", "o_proj")))
