"""Pipeline stages of Hugging Face decoder causal LMs (Llama, Mistral, Qwen2/3, Phi-3, Gemma-3 ...).

    stage = cut_hf_stage(model, (4, 8), is_first=False, is_last=True)   # layers 4..7, norm and lm_head

A HF decoder (``model.model.layers``) is cut by decoder layers into an ``HFDecoderStage`` whose names are
unchanged (``model.layers.3...``, ``lm_head.weight``): layers owned elsewhere become ``PassThrough``, the HF
model's own forward runs each stage, so rotary tables and masks are recomputed per stage. A family's spec
(plait.models) hands ``cut_hf_stage`` to the pipeline mechanism (parallel/pipeline.py).
"""

from __future__ import annotations

import torch
from torch import nn


def is_hf_decoder(model: nn.Module) -> bool:
    """A Hugging Face decoder causal LM (Llama, Mistral, Qwen2/3 ...): ``model.layers`` under ``model``."""
    inner = getattr(model, "model", None)
    return (hasattr(model, "config") and isinstance(inner, nn.Module)
            and isinstance(getattr(inner, "layers", None), nn.ModuleList))


class PassThrough(nn.Module):
    """Stands in for a decoder layer that another stage owns: returns the hidden states it is given."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class HFDecoderStage(nn.Module):
    """A pipeline stage of a HF decoder causal LM, parameter names unchanged (``model.layers.5...``,
    ``model.embed_tokens.weight`` on the first stage, ``model.norm.weight`` and ``lm_head.weight`` on
    the last). The HF model's own forward runs it: layers owned elsewhere are ``PassThrough``, a
    non-first stage takes hidden states as ``inputs_embeds`` (the model recomputes position ids, the
    rotary tables and the causal or sliding-window mask from them), a non-last stage has an identity
    norm and no head. Input: token ids (first stage) or (batch, seq, d) hidden states; output: logits
    (last stage) or hidden states."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.config = causal_lm.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            out = self.model(inputs_embeds=x, use_cache=False)
        else:
            out = self.model(input_ids=x, use_cache=False)
        hidden = out.last_hidden_state
        if self.lm_head is None:
            return hidden
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma-2/3: what the causal LM's forward does
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's default init (normal(0, initializer_range) for linear and embedding weights, unit norms,
        zeros for biases) and the rotary tables: what a meta-built stage needs before a checkpoint loads."""
        std = getattr(self.config, "initializer_range", 0.02) or 0.02
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif isinstance(module, (nn.Linear, nn.Embedding)):
                    p.normal_(0.0, std)
                else:  # a norm: scale 1, stored as 0 where the norm multiplies by 1 + weight (Gemma)
                    p.fill_(0.0 if "Gemma" in type(module).__name__ else 1.0)
        reset_rotary_buffers(self)


def reset_rotary_buffers(model: nn.Module) -> None:
    """Recompute HF rotary embeddings' non-persistent inverse frequencies (lost by ``to_empty``): ``inv_freq``, or
    one ``<layer type>_inv_freq`` per layer type (Gemma-3's local and global RoPE)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        if not (hasattr(module, "rope_type") and hasattr(module, "config") and
                hasattr(module, "compute_default_rope_parameters")):
            continue
        kinds = module.rope_type.items() if isinstance(module.rope_type, dict) else [(None, module.rope_type)]
        for layer_type, rope_type in kinds:
            fn = module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
            prefix = f"{layer_type}_" if layer_type else ""
            buffer = getattr(module, f"{prefix}inv_freq", None)
            if buffer is None:
                continue
            inv_freq, scaling = fn(module.config, layer_type=layer_type) if layer_type else fn(module.config)
            setattr(module, f"{prefix}inv_freq", inv_freq.to(buffer.device))
            setattr(module, f"{prefix}attention_scaling", scaling)
            if hasattr(module, f"{prefix}original_inv_freq"):
                setattr(module, f"{prefix}original_inv_freq", inv_freq.to(buffer.device).clone())


def cut_hf_stage(model: nn.Module, layers: tuple[int, int], is_first: bool, is_last: bool) -> HFDecoderStage:
    """Keep decoder layers [start, stop) of a HF causal LM (in place) and wrap them as a stage."""
    start, stop = layers
    inner = model.model
    for i in range(len(inner.layers)):
        if not start <= i < stop:
            inner.layers[i] = PassThrough()
    if not is_first:
        inner.embed_tokens = None
    if not is_last:
        inner.norm = nn.Identity()
        model.lm_head = None
    return HFDecoderStage(model)
