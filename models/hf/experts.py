"""What the Hugging Face mixture-of-experts families share (models/mixtral.py, models/qwen3_moe.py).

    model = build_moe(config)       # transformers' class, router logits on, its weighted aux loss on the output
    top, block = moe_decoder_tp_plan(sp, lp, head_norms)

Build: ``output_router_logits`` is set on a copy of the config, so the causal LM's output carries HF's
``aux_loss`` (``load_balancing_loss_func`` over all layers' router logits at once); a forward hook puts
``router_aux_loss_coef * aux_loss`` on the output (parallel/loss.py's ``with_aux_loss``), so ``tp_loss`` equals
``model(input_ids, labels=...).loss`` (labels shifted by Plait, not by HF). A float64 build runs HF's eager
experts loop (``experts_implementation="eager"``: torch's grouped_mm, HF's default, has no float64).

Tensor parallelism: attention as Llama's plan (q/k/v Colwise, o Rowwise); the whole MoE block (router, experts,
and Qwen3-MoE's dense ``mlp_only_layers`` MLPs) is replicated over the tp ranks: its input is the full Replicate
activation as a plain tensor (gathered from Shard(1) under sequence parallelism, its output sliced back), every
tp rank routes and computes every token alike, and its parameters stay plain tensors (expert parallelism, the
``ep`` plan field, is what splits the experts). Pipeline and context parallelism are refused by the shape
(``supports``: tp and ep): HF's balance loss needs every layer's router logits of the whole sequence at once.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from plait.models.hf.family import build_hf, hf_shape
from plait.models.hf.weights import WeightRef, expert_ref
from plait.models.llama import decoder_tp_plan
from plait.models.moe import moe_block_style
from plait.parallel.loss import with_aux_loss
from plait.parallel.names import clean_fqn
from plait.parallel.shape import DecoderShape
from torch import nn

MOE_SUPPORTS = ("tp", "ep")


def _weighted_aux(model: nn.Module, _args, output):
    aux = getattr(output, "aux_loss", None)
    if aux is not None and not isinstance(aux, (int, float)):
        with_aux_loss(output, model.config.router_aux_loss_coef * aux)
    return output


def build_moe(config: Any) -> nn.Module:
    """transformers' MoE causal LM of ``config`` whose outputs carry the weighted balance loss."""
    config = copy.deepcopy(config)
    config.output_router_logits = True
    if torch.get_default_dtype() == torch.float64:  # torch's grouped_mm (HF's default experts kernel) has no float64
        config._experts_implementation = "eager"
    model = build_hf(config)
    model.register_forward_hook(_weighted_aux)
    return model


def moe_shape(config: Any, family: str) -> DecoderShape:
    """Mixtral (``num_local_experts``) and Qwen3-MoE (``num_experts``) alike, with their top-k."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", 0)
    width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size  # an expert's (Qwen3-MoE's own)
    return dataclasses.replace(hf_shape(config, family, supports=MOE_SUPPORTS), n_experts=experts,
                               top_k=text.num_experts_per_tok, ffn_hidden=width)


def moe_decoder_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False, head_norms: bool = False
                        ) -> tuple[dict, dict]:
    """Llama's plan with the MLP entries replaced by the replicated MoE block (module docstring)."""
    top, block = decoder_tp_plan(sequence_parallel, loss_parallel, head_norms)
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        del block[name]
    block["mlp"] = moe_block_style(sequence_parallel)
    return top, block


def stacked_expert_names(module: nn.Module, checkpoint_name: Callable[[str], str], gate: str, up: str,
                         down: str) -> dict[str, WeightRef]:
    """Model name -> checkpoint tensor for a HF MoE decoder whose model stacks its experts (``mlp.experts.
    gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I)) while its checkpoints hold one tensor per expert, as
    transformers' ``save_pretrained`` writes them: ``<experts>.<e>.<gate>`` and ``.<up>`` make gate_up_proj,
    ``.<down>`` down_proj. ``checkpoint_name`` maps the rest of a model name to the checkpoint's."""
    out = {}
    for name, _ in module.named_parameters():
        name = clean_fqn(name)
        ckpt = checkpoint_name(name)
        if name.endswith(".mlp.experts.gate_up_proj"):
            base = ckpt.removesuffix("gate_up_proj")
            out[name] = expert_ref(base + "{e}." + gate, base + "{e}." + up)
        elif name.endswith(".mlp.experts.down_proj"):
            out[name] = expert_ref(ckpt.removesuffix("down_proj") + "{e}." + down)
        else:
            out[name] = WeightRef(ckpt)
    return out
