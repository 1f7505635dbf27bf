"""Plait's reference decoder-only transformer: RMSNorm, RoPE, SDPA attention, SwiGLU.

Names follow torchtitan's Llama so parallel plans read the same: ``tok_embeddings``,
``layers.<i>.attention.{wq,wk,wv,wo}``, ``layers.<i>.feed_forward.{w1,w2,w3}``, ``norm``, ``output``.
Layers live in a ``ModuleDict`` keyed by their global index, so a pipeline stage that keeps
layers 4..7 still calls them ``layers.4`` .. ``layers.7`` and checkpoints line up across plans.
A stage built by deleting ``tok_embeddings`` / ``norm`` / ``output`` (set to ``None``) passes
hidden states through, which is how pipeline stages are cut from one model.

Mixture of experts (``n_experts > 0``, models/moe.py): every block's feed-forward is ``moe`` (a router
``moe.router``, ``experts_top_k`` of ``n_experts`` SwiGLU experts ``moe.experts`` of width ``expert_hidden``, and
``n_shared_experts`` always-on experts ``moe.shared``, DeepSeek's). The logits carry the auxiliary term
(``aux_loss_coef`` x balance + ``z_loss_coef`` x router z-loss, averaged over the layers) for ``tp_loss`` to add
(parallel/loss.py's ``with_aux_loss``). ``expert_hidden`` defaults to the dense hidden / (top_k + shared), so the
active feed-forward parameters per token equal the dense model's of the same config.
The RoPE tables stay float32 whatever the model is cast to (``GPT(cfg).to(torch.bfloat16)``), and the
rotation runs in float32 (float64 for a float64 model).

One attention API serves training on whole sequences, chunk-wise training (SeCO/SpaCO), ring attention and
KV-cache generation:

    logits = model(tokens)                                   # positions 0..n-1, SDPA is_causal fast path
    logits = model(tokens, start_pos=128)                    # positions 128..128+n-1 (RoPE)
    logits = model(tokens, positions=pos)                    # any positions, (n,) or (batch, n) LongTensor
    cache = KVCache()
    logits = model(prompt, cache=cache)                      # fills the cache (keys stored AFTER RoPE)
    logits = model(next_token, cache=cache)                  # start_pos defaults to the cache's length

A cache is anything with ``update(k, v, layer_idx) -> (keys, values)`` and ``get_seq_length()`` (the same
calls as a Hugging Face ``Cache``): ``k``/``v`` are this call's keys/values, (batch, kv_heads, n, head_dim),
and it returns every key/value the queries attend to, the new ones last. The causal mask is aligned
bottom-right: the n queries are the LAST n of the returned keys (SDPA's ``is_causal`` is top-left aligned
when the lengths differ, so a prefix gets an explicit (n, kv_len) additive mask). Positions set only the
RoPE angles; the mask follows the order of the keys. ``Attention.attend(q, k, v)`` is the core a caller
may replace per module (e.g. ring attention over a sharded sequence); parameter names are unchanged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from plait.models.moe import ROUTERS, MoE, SwiGLU
from plait.parallel.loss import lm_loss, upcast, with_aux_loss  # noqa: F401 - the GPT's loss, re-exported
from plait.parallel.shape import DecoderShape
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (plain multi-head attention)
    ffn_hidden: int = 0  # 0 means the SwiGLU default: 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_experts: int = 0  # 0: a dense feed-forward; > 0: a mixture of experts in every block (models/moe.py)
    experts_top_k: int = 2  # experts per token
    n_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek)
    expert_hidden: int = 0  # 0: hidden // (experts_top_k + n_shared_experts) (the dense model's active size)
    router: str = "topk_softmax"  # or "softmax_topk" (models/moe.py)
    aux_loss_coef: float = 0.01  # the balance loss's weight
    z_loss_coef: float = 0.001  # the router z-loss's weight

    @property
    def moe_hidden(self) -> int:
        return self.expert_hidden or max(1, self.hidden // (self.experts_top_k + self.n_shared_experts))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return 32 * ((int(8 * self.d_model / 3) + 31) // 32)

    def check(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE; change d_model or n_heads")
        if self.n_experts:
            self.check_moe()

    def check_moe(self) -> None:
        bad = []
        if self.n_experts < 0 or not 1 <= self.experts_top_k <= max(self.n_experts, 1):
            bad.append(f"model.experts_top_k={self.experts_top_k} must be 1..model.n_experts={self.n_experts}")
        if self.n_shared_experts < 0 or self.expert_hidden < 0:
            bad.append(f"model.n_shared_experts={self.n_shared_experts} and model.expert_hidden={self.expert_hidden} "
                       "must be >= 0 (expert_hidden 0: the default width)")
        if self.router not in ROUTERS:
            bad.append(f"model.router={self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            bad.append(f"model.aux_loss_coef={self.aux_loss_coef} and model.z_loss_coef={self.z_loss_coef} must be "
                       ">= 0 (0 turns a term off)")
        if bad:
            raise ValueError("; ".join(bad))

    def decoder_shape(self) -> DecoderShape:
        """The sizes plan checks and the estimator read (parallel/shape.py)."""
        if self.n_experts:  # the MoE block is replicated over tp; pp and cp cannot see every router at once
            return DecoderShape(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                                n_heads=self.n_heads, n_kv_heads=self.kv_heads, head_dim=self.head_dim,
                                ffn_hidden=self.moe_hidden, family="gpt", supports=("tp", "ep"),
                                extra_tp_sizes={"model.d_model": self.d_model}, n_experts=self.n_experts,
                                top_k=self.experts_top_k)
        return DecoderShape(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                            n_heads=self.n_heads, n_kv_heads=self.kv_heads, head_dim=self.head_dim,
                            ffn_hidden=self.hidden, family="gpt", extra_tp_sizes={"model.d_model": self.d_model})

    def num_params(self, active: bool = False) -> int:
        """Parameters (``active``: those one token uses, top_k + shared experts of each MoE block)."""
        d, h, v = self.d_model, self.hidden, self.vocab_size
        kv = self.kv_heads * self.head_dim
        ffn = 3 * d * h
        if self.n_experts:
            used = (self.experts_top_k if active else self.n_experts) + self.n_shared_experts
            ffn = 3 * d * self.moe_hidden * used + self.n_experts * d
        per_layer = d * d * 2 + d * kv * 2 + ffn + 2 * d
        return v * d * 2 + d + self.n_layers * per_layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim // 2), real-valued so DTensor never sees complex."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); rotates interleaved pairs (x0, x1), (x2, x3), ...

    The rotation is computed in at least float32 (float64 for a float64 ``x``) and the result cast back
    to ``x.dtype``: bf16 queries and keys are rotated by fp32 angles, not by angles rounded to bf16."""
    compute = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x[..., 0::2].to(compute), x[..., 1::2].to(compute)
    # (seq, d/2) tables are shared by the batch; (batch, seq, d/2) ones come from per-sequence positions.
    cos = (cos[None, :, None, :] if cos.ndim == 2 else cos[:, :, None, :]).to(compute)
    sin = (sin[None, :, None, :] if sin.ndim == 2 else sin[:, :, None, :]).to(compute)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA with a causal mask aligned bottom-right: q (batch, heads, n, d) are the last n of the
    (batch, kv_heads, kv_len, d) keys. Equal lengths take ``is_causal`` (no mask is built); a single query
    sees every key; otherwise an additive (n, kv_len) mask, block-sized, never kv_len x kv_len."""
    n, kv_len = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if n == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if n > kv_len:
        raise ValueError(f"{n} queries but only {kv_len} keys: a cache must return the new keys too (its update() "
                         "returns past + new)")
    mask = None if n == 1 else bottom_right_mask(n, kv_len, q.dtype, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


_MASKS: dict[tuple, weakref.ref] = {}  # the live mask per shape, so every layer of a chunk shares one


def bottom_right_mask(n: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0 where query i (of the last n) may see key j, -inf elsewhere, in the queries' dtype. A float mask
    is passed to SDPA as it is (a boolean one is converted, and saved for backward, in every layer); the
    same tensor serves every layer while any of them still holds it, and is freed with the last."""
    key = (n, kv_len, dtype, device)
    mask = _MASKS[key]() if key in _MASKS else None
    if mask is None:
        allowed = torch.ones(n, kv_len, dtype=torch.bool, device=device).tril(kv_len - n)
        mask = torch.zeros(n, kv_len, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        _MASKS.clear()  # dead entries from earlier shapes
        _MASKS[key] = weakref.ref(mask)
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                layer_idx: int | None = None) -> torch.Tensor:
        """x (batch, n, d); cos/sin the RoPE tables of x's n positions; ``cache.update(k, v, layer_idx)``
        (optional) receives the rotated keys/values and returns the keys/values to attend to."""
        bsz, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        out = self.attend(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(batch, heads, n, d) queries over (batch, kv_heads, kv_len, d) keys/values -> (batch, heads, n, d).
        Assign ``module.attend = fn`` to replace it on one module (FQNs stay the same)."""
        return causal_attention(q, k, v)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.n_experts:
            self.moe = MoE(cfg.d_model, cfg.n_experts, cfg.experts_top_k, cfg.moe_hidden, cfg.n_shared_experts,
                           cfg.router, cfg.aux_loss_coef, cfg.z_loss_coef)
        else:
            self.feed_forward = SwiGLU(cfg.d_model, cfg.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                layer_idx: int | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache=cache, layer_idx=layer_idx)
        ffn = self.moe if hasattr(self, "moe") else self.feed_forward
        return x + ffn(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Under sequence parallelism a stage without embeddings receives 1/sequence_shards of the sequence
        # (apply_tensor_parallel sets it); RoPE positions still cover the gathered sequence.
        self.sequence_shards = 1
        self.init_weights()

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.double()`` ... cast every float buffer; the RoPE tables are
        rebuilt in float32 afterwards (on the tables' new device), whatever the parameters' dtype."""
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 or self.rope_sin.dtype != torch.float32:
            cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
            self._buffers["rope_cos"] = cos.to(self.rope_cos.device)
            self._buffers["rope_sin"] = sin.to(self.rope_sin.device)
        return self

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic init (given the global RNG or ``seed``); also fills meta-initialised models."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            p.copy_(self.init_value(name, tuple(p.shape), gen))
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def init_value(self, name: str, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        """One parameter's initial value (full shape): norms 1, output projections N(0, 0.02/sqrt(2L)), the
        rest N(0, 0.02). ``init_weights`` draws every parameter in order; ``meta_init`` one at a time."""
        if len(shape) == 1:
            return torch.ones(shape)
        out_proj = name.endswith(("wo.weight", "w2.weight", "experts.down_proj"))
        std = 0.02 / (2 * self.cfg.n_layers) ** 0.5 if out_proj else 0.02
        return torch.randn(shape, generator=generator) * std

    def forward(self, tokens: torch.Tensor, *, start_pos: int | None = None, positions: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        """tokens (batch, n) int64 -> logits (batch, n, vocab); on a middle pipeline stage,
        hidden (batch, n, d_model) -> hidden. The tokens sit at positions ``start_pos`` .. ``start_pos + n - 1``
        (default: the cache's length, else 0), or at ``positions`` ((n,) or (batch, n)). With a ``cache``,
        every layer's keys/values go through ``cache.update`` (see the module docstring)."""
        if self.cfg.n_experts and (self.tok_embeddings is None or self.output is None):
            raise ValueError("a pipeline stage of a mixture-of-experts GPT: its auxiliary loss needs every layer's "
                             "router in one forward: use plan.pp=1 (split the experts with plan.ep instead)")
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        n = tokens.shape[1] if self.tok_embeddings is not None else h.shape[1] * self.sequence_shards
        cos, sin = self.rope(n, start_pos, positions, cache)
        for key, layer in self.layers.items():
            h = layer(h, cos, sin) if cache is None else layer(h, cos, sin, cache=cache, layer_idx=int(key))
        if self.norm is not None:
            h = self.norm(h)
        logits = self.output(h) if self.output is not None else h
        if self.cfg.n_experts:
            terms = [layer.moe.aux for layer in self.layers.values()]
            with_aux_loss(logits, torch.stack(terms).mean())
        return logits

    def rope(self, n: int, start_pos: int | None = None, positions: torch.Tensor | None = None,
             cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables for n tokens at ``positions``, or from ``start_pos`` (default: the cache's length)."""
        limit = self.rope_cos.shape[0]
        if positions is not None:
            if start_pos is not None:
                raise ValueError("give start_pos or positions, not both")
            if positions.shape[-1] != n:
                raise ValueError(f"positions has {positions.shape[-1]} entries for a sequence of {n} tokens")
            on_host = positions.device.type == "cpu"  # checked there only: no device sync per forward
            if on_host and positions.numel() and (int(positions.max()) >= limit or int(positions.min()) < 0):
                raise ValueError(f"positions span {int(positions.min())}..{int(positions.max())}, outside "
                                 f"0..{limit - 1} (model.max_seq_len={limit}): raise max_seq_len")
            positions = positions.to(self.rope_cos.device)
            return self.rope_cos[positions], self.rope_sin[positions]
        start = start_pos if start_pos is not None else (cache.get_seq_length() if cache is not None else 0)
        if start < 0 or start + n > limit:
            raise ValueError(f"positions {start}..{start + n - 1} exceed model.max_seq_len={limit}: raise "
                             "max_seq_len or shorten the sequence")
        return self.rope_cos[start:start + n], self.rope_sin[start:start + n]


class KVCache:
    """Keys/values per layer, (batch, kv_heads, seq, head_dim), stored after RoPE, growing by concatenation:
    the cache for KV-cache generation, and a prefix in / new keys out for any caller. ``keys[i]`` and
    ``values[i]`` are layer i's tensors (global layer index). Same calls as a Hugging Face ``Cache``."""

    def __init__(self, layers: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.keys: dict[int, torch.Tensor] = {i: kv[0] for i, kv in (layers or {}).items()}
        self.values: dict[int, torch.Tensor] = {i: kv[1] for i, kv in (layers or {}).items()}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.keys:
            k = torch.cat([self.keys[layer_idx], k], dim=-2)
            v = torch.cat([self.values[layer_idx], v], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        if not self.keys:
            return 0
        return self.keys[min(self.keys) if layer_idx is None else layer_idx].shape[-2]
