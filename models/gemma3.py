"""Gemma-3 text (``Gemma3ForCausalLM``, model_type "gemma3_text"): four norms a layer, scaled embeddings, per-head
q/k norms, local sliding-window and global layers, final logit soft-capping.

    spec = model_spec("gemma3")          # also by config.model_type "gemma3_text"

What differs from a Llama-named decoder, and how each is handled from outside (transformers' classes unmodified):

* a layer norms the attention's and the MLP's output too (``post_attention_layernorm``, ``post_feedforward_
  layernorm``) before they join the residual stream: under tensor parallelism those two norms hand back plain
  local tensors (``norm_style(sp, local_output=True)``), the pre-norms (``input_layernorm``,
  ``pre_feedforward_layernorm``) feed attention and MLP as DTensors like Llama's. RMSNorm scales by 1 + weight:
  their weights initialise to 0 (models/hf/family.py's init rule).
* q_norm / k_norm act per head on (batch, heads, seq, head_dim): ``HeadSharded(dim=1)``.
* the embedding multiplies by sqrt(hidden) (a non-persistent ``embed_scale`` buffer): vocab-sharded like any
  embedding (the scale is linear in the partial sums); the buffer is recomputed after a meta build.
* sliding-window layers: HF's mask builders apply the window (tp, pp, SeCO); ring attention applies it by global
  position (cp); each layer type has its own RoPE base, recomputed after a meta build (``reset_rotary_buffers``).
* final logit soft-capping: the causal LM's forward (and a last pipeline stage, models/hf/stages.py) applies it.
* tied embeddings: the head is re-tied after sharding, and not written on export.
"""

from __future__ import annotations

import torch
from plait.models.hf.family import hf_spec
from plait.models.hf.stages import reset_rotary_buffers
from plait.models.llama import decoder_tp_plan, shard_decoder
from plait.models.spec import register
from plait.parallel.tensor_parallel import HeadSharded, norm_style
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def gemma3_tp_plan(sequence_parallel: bool = False, loss_parallel: bool = False) -> tuple[dict, dict]:
    """Llama's plan with Gemma's four norms a layer and its per-head q/k norms."""
    top, block = decoder_tp_plan(sequence_parallel, loss_parallel)
    sp = sequence_parallel
    block.update({
        "post_attention_layernorm": norm_style(sp, local_output=True),  # joins the residual stream
        "pre_feedforward_layernorm": norm_style(sp),  # feeds the MLP
        "post_feedforward_layernorm": norm_style(sp, local_output=True),
        "self_attn.q_norm": HeadSharded(dim=1),  # after the transpose: (batch, heads, seq, head_dim)
        "self_attn.k_norm": HeadSharded(dim=1),
    })
    return top, block


def parallelize_gemma3(model: nn.Module, mesh: DeviceMesh, sp: bool, lp: bool) -> None:
    shard_decoder(model, mesh, sp, lp, gemma3_tp_plan(sp, lp))


@torch.no_grad()
def reset_gemma3_buffers(model: nn.Module) -> None:
    """The rotary tables of every layer type, and the embedding's sqrt(hidden) scale."""
    reset_rotary_buffers(model)
    for module in model.modules():
        if hasattr(module, "embed_scale") and hasattr(module, "scalar_embed_scale"):
            module.embed_scale.fill_(module.scalar_embed_scale)


SPEC = register(hf_spec("gemma3", ("gemma3_text",), tensor_parallel=parallelize_gemma3, tp_plan=gemma3_tp_plan,
                        reset_buffers=reset_gemma3_buffers, kv_projections=("self_attn.k_proj", "self_attn.v_proj")))
