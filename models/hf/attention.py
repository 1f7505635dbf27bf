"""A Hugging Face decoder's attention, reached from outside: a replaceable core, explicit positions, a KV cache.

    set_core(model, ring_core)        # every attention's scores -> ring_core(q, k, v, scale=, window=, softcap=)
    logits = cache_forward(model, tokens, cache, start)   # tokens at positions start.. through a Plait cache

The same three calls Plait's GPT answers (models/gpt_spec.py), so ring attention (cp), chunk-wise training
(SeCO/SpaCO) and KV-cache generation drive any HF family through its spec, transformers unpatched:

* the core: HF attention modules look their score function up by ``config._attn_implementation`` in
  transformers' ``AttentionInterface``; ``set_core`` registers ``"plait_core"`` there, which calls the module's
  ``plait_core`` attribute with (batch, heads, n, head_dim) queries and (batch, kv_heads, n, head_dim) keys and
  values, the module's ``scaling``, its ``sliding_window`` and ``softcap`` (Gemma-2), and returns what HF wants
  ((batch, n, heads, head_dim), no weights). A custom implementation gets no mask from transformers' mask
  builders: the core owns causality (ring attention does, from global positions). ``set_core(model, None)``
  restores the previous implementation.
* positions: the keyword is ``position_ids``.
* the cache: ``cache`` is anything with Plait's protocol (``update(k, v, layer_idx) -> (keys, values)``,
  ``get_seq_length()``: lm/chunkwise.py's ChunkCache, models/gpt.py's KVCache); ``hf_cache`` wraps it in a
  transformers ``Cache`` whose layers read and write it (keys after RoPE, as HF stores them).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

CORE = "plait_core"


def _core_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    sliding_window=None, softcap=None, **_kwargs):
    if dropout:
        raise ValueError(f"attention dropout {dropout} with a replaced attention core (ring attention): set the "
                         "model's attention_dropout to 0")
    core = getattr(module, CORE, None)
    if core is None:
        raise RuntimeError(f"{type(module).__name__} runs the {CORE!r} attention but has no core: use set_core")
    out = core(query, key, value, scale=scaling, window=sliding_window, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CORE, _core_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a HF decoder (those with q/k/v projections, fused or not)."""
    return [m for m in model.modules()
            if hasattr(m, "o_proj") and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj")) and hasattr(m, "config")]


def set_core(model: nn.Module, core) -> None:
    """Every attention's score computation becomes ``core`` (None: the implementation the model had)."""
    _register()
    modules = attention_modules(model)
    if not modules:
        raise TypeError(f"{type(model).__name__} has no Hugging Face attention modules (q/k/v and o projections)")
    configs = {id(m.config): m.config for m in modules}
    if getattr(model, "config", None) is not None:
        configs[id(model.config)] = model.config
    for cfg in configs.values():
        if core is None:
            prev = getattr(cfg, "_plait_previous_attn", None)
            if prev is not None:
                cfg._attn_implementation = prev
                del cfg._plait_previous_attn
        elif cfg._attn_implementation != CORE:
            cfg._plait_previous_attn = cfg._attn_implementation
            cfg._attn_implementation = CORE
    for m in modules:
        setattr(m, CORE, core)


def hf_cache(cache, num_layers: int):
    """A transformers ``Cache`` over a Plait cache (one adapter per cache object, made on first use)."""
    adapter = getattr(cache, "_plait_hf_cache", None)
    if adapter is None or len(adapter.layers) != num_layers:
        adapter = _cache_class()(cache, num_layers)
        cache._plait_hf_cache = adapter
    return adapter


def cache_forward(model: nn.Module, tokens: torch.Tensor, cache, start: int, **kwargs) -> torch.Tensor:
    """Logits of ``tokens`` (batch, n) at positions start.. attending to what ``cache`` holds before them."""
    num_layers = _text_config(model).num_hidden_layers
    pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    return model(input_ids=tokens, past_key_values=hf_cache(cache, num_layers), position_ids=pos, use_cache=True,
                 **kwargs).logits


def padded_forward(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache, key_valid: torch.Tensor
                   ) -> torch.Tensor:
    """Logits of left-padded rows through ``cache``: HF's own padding mask (``attention_mask`` over every key so
    far) and per-row ``position_ids``."""
    num_layers = _text_config(model).num_hidden_layers
    return model(input_ids=tokens, attention_mask=key_valid.long(), position_ids=positions,
                 past_key_values=hf_cache(cache, num_layers), use_cache=True).logits


def _text_config(model: nn.Module):
    """The decoder config of a HF model, under DDP's ``.module`` if need be."""
    for _ in range(4):
        if hasattr(model, "config"):
            return model.config.get_text_config(decoder=True)
        model = model.module
    raise TypeError(f"{type(model).__name__} has no Hugging Face config")


@functools.cache
def _cache_class():
    """A transformers ``Cache`` whose layers read and write a Plait cache (built on first use)."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class _PlaitLayer(CacheLayerMixin):
        is_sliding = False  # every key stays: the mask builders apply a family's window by position

        def __init__(self, store, layer_idx: int):
            super().__init__()
            self.store, self.layer_idx, self.is_initialized = store, layer_idx, True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            return self.store.update(key_states, value_states, self.layer_idx)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.store.get_seq_length() + query_length, 0

        def get_seq_length(self) -> int:
            return self.store.get_seq_length()

        def get_max_length(self) -> int:
            return -1

    class PlaitHFCache(Cache):
        def __init__(self, store, num_layers: int):
            super().__init__(layers=[_PlaitLayer(store, i) for i in range(num_layers)])

    return PlaitHFCache
