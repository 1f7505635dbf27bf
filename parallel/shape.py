"""The sizes of a decoder that plans are checked against and the estimator counts: a model family says them.

    shape = DecoderShape(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                         ffn_hidden=8192)
    plan.validate(world_size, shape)           # what tensor / pipeline / context parallelism would split
    estimate_memory(model_layout, shape, plan, ...)

Nothing here knows a family: ``plait.models`` turns a family's config into a DecoderShape (``spec.shape(cfg)``;
Plait's GPTConfig also answers ``decoder_shape()``), and ``parallel/`` only reads the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DecoderShape:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int  # the feed-forward width (per expert for a mixture of experts)
    kv_replication: bool = False  # tensor parallelism may replicate kv heads when tp is a multiple of them
    family: str = ""  # the spec's name, for messages
    supports: tuple[str, ...] = ("tp", "pp", "cp")  # the dimensions the family's spec can split it over
    extra_tp_sizes: dict[str, int] = field(default_factory=dict)  # more sizes tp splits, by their config name
    n_experts: int = 0  # experts per mixture-of-experts layer (0: a dense model); ep divides it
    top_k: int = 0  # experts each token is routed to (the estimator's dispatch buffers)

    def tp_sizes(self) -> dict[str, int]:
        """What tensor parallelism splits, by the names messages use."""
        ffn = {} if self.n_experts else {"ffn hidden size": self.ffn_hidden}  # an MoE block is replicated over tp
        return {"model.n_heads": self.n_heads, "model.n_kv_heads": self.n_kv_heads, **ffn, **self.extra_tp_sizes}


def decoder_shape(model: Any) -> DecoderShape | None:
    """A DecoderShape from what a caller passes as "the model" to plan checks: a DecoderShape, anything with a
    ``decoder_shape()`` method (Plait's GPTConfig), or None (a model of the user's own: data parallelism only)."""
    if model is None or isinstance(model, DecoderShape):
        return model
    if callable(getattr(model, "decoder_shape", None)):
        return model.decoder_shape()
    raise TypeError(f"plan checks need the model's sizes as a DecoderShape, got {type(model).__name__}: pass "
                    "plait.models.model_spec_for(config).shape(config) (a Hugging Face config), a GPTConfig, or None "
                    "for a model of your own")
