"""What every Hugging Face decoder family shares: build from a config, sizes, stages, weights, init, attention.

    spec = hf_spec("llama", ("llama", "mistral", "qwen2", "qwen3"), tensor_parallel=parallelize_decoder,
                   tp_plan=decoder_tp_plan)
    register(spec)

A family file (models/llama.py, models/phi3.py, models/gemma3.py ...) states only what differs: its
tensor-parallel plan, and where its names or modules are not a Llama's, its weight names and shape. The rest:

  build          ``AutoModelForCausalLM.from_config(config)`` (transformers' own classes, unmodified)
  shape          sizes from ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``
  cut_stage      models/hf/stages.py (names unchanged; the HF forward runs each stage)
  load_weights   models/hf/weights.py (each rank reads its slices); export_config: the config's dict
  reset_buffers  the rotary ``inv_freq`` buffers, recomputed after ``to_empty``
  tied_weights   the embedding and the head when ``tie_word_embeddings`` (pipeline stages sum their gradients)
  init_value     HF's default init, parameter by parameter: normal(0, initializer_range) for matrices, zeros for
                 biases, ones for norm weights (zeros where the family's norm scales by 1 + weight)
  attention      models/hf/attention.py: the ``plait_core`` attention (ring attention), ``position_ids``, a
                 Plait cache behind transformers' Cache interface
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from plait.models.hf.attention import cache_forward, padded_forward, set_core
from plait.models.hf.stages import cut_hf_stage, reset_rotary_buffers
from plait.models.hf.weights import load_hf_folder, same_names
from plait.models.spec import AttentionHooks, ModelSpec
from plait.parallel.names import clean_fqn
from plait.parallel.shape import DecoderShape
from torch import nn

HF_ATTENTION = AttentionHooks(set_core=set_core, positions_kwarg="position_ids", cache_forward=cache_forward,
                              padded_forward=padded_forward)


def read_config(folder: str | Path, attn_implementation: str | None = None):
    """The HF config of a local model folder (``config.json``); nothing is downloaded."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    return cfg


def build_hf(config: Any) -> nn.Module:
    """transformers' causal LM of this config, in torch's default dtype (callers cast or build on meta)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.get_default_dtype())


def hf_shape(config: Any, family: str = "", supports: tuple[str, ...] = ("tp", "pp", "cp")) -> DecoderShape:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return DecoderShape(vocab_size=text.vocab_size, d_model=text.hidden_size, n_layers=text.num_hidden_layers,
                        n_heads=heads, n_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                        ffn_hidden=text.intermediate_size, kv_replication=True,
                        family=family or getattr(text, "model_type", ""), supports=supports)


def export_config(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def owner(model: nn.Module, name: str) -> nn.Module:
    """The module that holds parameter ``name`` (a clean name: wrapper segments are looked through)."""
    module = model
    for part in name.split(".")[:-1]:
        inner = getattr(module, "_checkpoint_wrapped_module", None)
        module = getattr(inner if inner is not None and not hasattr(module, part) else module, part)
    return module


def hf_init_value(model: nn.Module, name: str, shape: tuple[int, ...], generator: torch.Generator | None
                  ) -> torch.Tensor:
    """HF's default init for one parameter (see the module docstring)."""
    config = getattr(model, "config", None)
    std = getattr(config, "initializer_range", 0.02) or 0.02
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        norm = owner(model, clean_fqn(name))
        return torch.zeros(shape) if "Gemma" in type(norm).__name__ else torch.ones(shape)
    return torch.randn(shape, generator=generator) * std


def tied_embeddings(model: nn.Module) -> list[tuple[str, ...]]:
    """A HF causal LM whose head is its embedding (``tie_word_embeddings``)."""
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", False) if config is not None else False
    return [("model.embed_tokens.weight", "lm_head.weight")] if tied else []


def hf_spec(name: str, model_types: tuple[str, ...], **fields: Any) -> ModelSpec:
    """A ModelSpec for a HF decoder family with the defaults above; ``fields`` override them."""
    spec_ref: list[ModelSpec] = []
    defaults = dict(
        build=build_hf, shape=lambda cfg: hf_shape(cfg, name), hf_model_types=model_types,
        cut_stage=cut_hf_stage, num_layers=lambda model: len(model.model.layers),
        load_weights=lambda model, folder: load_hf_folder(model, folder, spec_ref[0]),
        weight_names=same_names, export_config=export_config, reset_buffers=reset_rotary_buffers,
        init_value=hf_init_value, attention=HF_ATTENTION, tied_weights=tied_embeddings,
    )
    spec = ModelSpec(name=name, **{**defaults, **fields})
    spec_ref.append(spec)
    return spec
