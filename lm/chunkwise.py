"""Chunk-wise training of long sequences on one device: SeCO (exact) and SpaCO (sparse, unbiased).

    loss = seco_step(model, tokens, targets, chunk_len=512)            # .grad filled as by loss.backward()
    loss = spaco_step(model, tokens, targets, chunk_len=512, t=4, generator=g)
    optimizer.step()

From "Training Long-Context LLMs Efficiently via Chunk-wise Optimization" (Li et al., ACL Findings 2025).
``model`` is any registered family (plait.models: its spec's attention takes a start position and a KV cache,
``spec.attention.cache_forward``; Plait's GPT directly, a Hugging Face decoder through its ``past_key_values``
cache interface, transformers unpatched), under ``peft`` (LoRA), DDP or FSDP2. ``tokens`` and
``targets`` are (batch, seq); the returned loss is the full sequence's mean loss (detached).

SeCO. Stage 1: every chunk runs forward without grad; each layer's keys/values (after RoPE) are written
into one (batch, kv_heads, seq, head_dim) buffer per layer. Stage 2: chunks in reverse order are
recomputed with grad on top of the buffer's earlier positions. ``_CarryKV`` stands where a detached
leaf and a hook would: its backward adds the gradient the later chunks already sent to this chunk's
keys/values (accumulated in a gradient buffer) to the recomputed ones, and adds the gradient for earlier
positions into that buffer. Only one chunk's activations live at a time; on top of them SeCO holds the
K/V cache and its gradient (no prefix copies: attention reads views of the buffer). The loss of a chunk
is its token sum divided by the TOTAL token count, so the chunk gradients add up to the full mean's.
Stage 2 must recompute what stage 1 computed: a model with dropout needs it off (no RNG replay here).

SpaCO. Each chunk joins stage 2 independently with probability t/k (k chunks, t on average); a chosen
chunk's loss is scaled by k/t and so is the K/V gradient it carries on to earlier chunks (k/t per hop).
A gradient path through s chunks then survives with probability (t/k)^s and is scaled by (k/t)^s: the
estimate is unbiased. (The paper's code picks exactly t chunks; with that draw k/t per hop is exact
for a chunk's own loss but scales each cross-chunk hop by k(t-1)/(t(k-1)) in expectation, a bias the
independent draw avoids.) ``cap`` > 0 clips the per-hop factor to min(k/t, cap): lower variance, but
cross-chunk gradients are then biased low by cap*t/k per hop. t == k is SeCO exactly.

Data parallelism: under DDP the chunk backwards run in ``no_sync`` on the inner module, and the last
one goes through the DDP wrapper, so gradients are all-reduced once per step; under FSDP2,
``set_requires_gradient_sync(False)`` until the last chunk (gradients stay unsharded until then).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from plait.parallel.loss import upcast
from torch import nn


class ChunkCache:
    """Every layer's keys/values for the whole sequence, written chunk by chunk, and their gradients.
    Plait's cache protocol (``update(k, v, layer_idx)``, ``get_seq_length()``); ``start`` is where the
    current chunk begins, ``carry`` the factor on gradients carried from later chunks (SpaCO)."""

    def __init__(self, total_len: int):
        self.total, self.start, self.carry = total_len, 0, 1.0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.grad: dict[tuple[str, int], torch.Tensor] = {}

    def get_seq_length(self, layer_idx: int | None = None) -> int:
        return self.start

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + k.shape[-2]
        if end > self.total:
            raise ValueError(f"chunk ends at {end}, past the sequence length {self.total} the cache was made for")
        if layer_idx not in self.k:
            self.k[layer_idx] = k.new_empty((*k.shape[:-2], self.total, k.shape[-1]))
            self.v[layer_idx] = v.new_empty((*v.shape[:-2], self.total, v.shape[-1]))
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return _CarryKV.apply(k, v, self, layer_idx)
        return _write(self, layer_idx, k, v)

    def grad_buffer(self, kind: str, layer_idx: int) -> torch.Tensor:
        """The gradient accumulated for layer ``layer_idx``'s keys ("k") or values ("v"), at least float32."""
        key = (kind, layer_idx)
        if key not in self.grad:
            base = (self.k if kind == "k" else self.v)[layer_idx]
            self.grad[key] = torch.zeros(base.shape, dtype=torch.promote_types(base.dtype, torch.float32),
                                         device=base.device)
        return self.grad[key]


def _write(cache: ChunkCache, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
    """Store the chunk's k/v at [start, end) and return views of positions [0, end)."""
    end = cache.start + k.shape[-2]
    with torch.no_grad():
        cache.k[layer_idx][..., cache.start:end, :].copy_(k)
        cache.v[layer_idx][..., cache.start:end, :].copy_(v)
    return cache.k[layer_idx][..., :end, :], cache.v[layer_idx][..., :end, :]


class _CarryKV(torch.autograd.Function):
    """Forward: the recomputed chunk's k/v joined to the earlier positions (views, no copy). Backward: the
    gradient for earlier positions is accumulated for their chunks; the chunk's own gradient gets what the
    later chunks accumulated for it (times ``cache.carry``)."""

    @staticmethod
    def forward(ctx, k, v, cache: ChunkCache, layer_idx: int):
        ctx.cache, ctx.layer_idx, ctx.start, ctx.end = cache, layer_idx, cache.start, cache.start + k.shape[-2]
        ctx.carry, ctx.dtypes = cache.carry, (k.dtype, v.dtype)
        keys, values = _write(cache, layer_idx, k, v)
        return keys, values

    @staticmethod
    def backward(ctx, grad_keys, grad_values):
        out = []
        for kind, grad, dtype in (("k", grad_keys, ctx.dtypes[0]), ("v", grad_values, ctx.dtypes[1])):
            acc = ctx.cache.grad_buffer(kind, ctx.layer_idx)
            own = acc[..., ctx.start:ctx.end, :] * ctx.carry
            if grad is not None:
                acc[..., :ctx.start, :] += grad[..., :ctx.start, :]
                own = own + grad[..., ctx.start:ctx.end, :]
            out.append(own.to(dtype))
        return out[0], out[1], None, None


def seco_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, chunk_len: int,
              loss_fn=None, spec: Any = None) -> torch.Tensor:
    """The exact gradient of the full sequence's mean loss, chunk by chunk (see the module docstring).

    ``loss_fn(logits, targets)`` returns the mean over the chunk's targets (weighted here by the chunk's
    share of the tokens); None is next-token cross-entropy, ``ignore_index=-100`` tokens excluded from
    both the sum and the count. Returns the full mean loss (detached); gradients accumulate into .grad."""
    k = _num_chunks(tokens, chunk_len)
    return _chunkwise(model, tokens, targets, chunk_len, loss_fn, [True] * k, scale=1.0, carry=1.0, spec=spec)


def spaco_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, chunk_len: int, t: int,
               cap: float = 0.0, loss_fn=None, generator: torch.Generator | None = None,
               spec: Any = None) -> torch.Tensor:
    """An unbiased estimate of SeCO's gradient that back-propagates through t of the k chunks on average;
    ``cap`` > 0 clips the per-hop factor (see the module docstring). ``generator`` draws the chunks."""
    k = _num_chunks(tokens, chunk_len)
    if not 1 <= t <= k:
        raise ValueError(f"spaco t={t}: choose 1 <= t <= {k}, the number of chunks of length {chunk_len} in "
                         f"{tokens.shape[1]} tokens (t == {k} is SeCO)")
    if cap and cap < 1:
        raise ValueError(f"spaco cap={cap}: 0 (no cap) or >= 1 (a factor below 1 would shrink SeCO's gradient)")
    if t == k:
        return _chunkwise(model, tokens, targets, chunk_len, loss_fn, [True] * k, scale=1.0, carry=1.0, spec=spec)
    picked = (torch.rand(k, generator=generator) < t / k).tolist()
    factor = k / t
    return _chunkwise(model, tokens, targets, chunk_len, loss_fn, picked, scale=factor,
                      carry=min(factor, cap) if cap else factor, spec=spec)


def _num_chunks(tokens: torch.Tensor, chunk_len: int) -> int:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
    if chunk_len < 1:
        raise ValueError(f"chunk_len={chunk_len}: must be >= 1")
    return math.ceil(tokens.shape[1] / chunk_len)


def _chunkwise(model, tokens, targets, chunk_len, loss_fn, picked, scale, carry, spec=None) -> torch.Tensor:
    seq = tokens.shape[1]
    if targets.shape[:2] != tokens.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must start with the tokens' shape {tuple(tokens.shape)}")
    spans = [(s, min(s + chunk_len, seq)) for s in range(0, seq, chunk_len)]
    chunk_loss = _chunk_loss(loss_fn, targets)
    cache, call = ChunkCache(seq), _caller(model, spec)
    inner = model.module if _is_ddp(model) else model
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    with torch.no_grad():  # stage 1: every chunk's K/V into the cache, and the exact loss
        for s, e in spans:
            cache.start = s
            total += chunk_loss(call(inner, tokens[:, s:e], cache, s), targets[:, s:e]).double()
    order = [i for i in reversed(range(len(spans))) if picked[i]]
    if not order:  # SpaCO drew no chunk: one zero-weight backward keeps data-parallel ranks in step
        order, scale = [0], 0.0
    cache.carry = carry
    for n, i in enumerate(order):  # stage 2: recompute with grad, latest chunk first
        s, e = spans[i]
        cache.start = s
        with _grad_sync(model, last=n == len(order) - 1) as module:
            loss = chunk_loss(call(module, tokens[:, s:e], cache, s), targets[:, s:e])
            (loss * scale).backward()
    return total


def _chunk_loss(loss_fn, targets: torch.Tensor):
    """A function (logits, chunk targets) -> this chunk's share of the full sequence's mean loss."""
    if loss_fn is None:
        count = max(int((targets != -100).sum()), 1)
        return lambda logits, tgt: F.cross_entropy(upcast(logits).flatten(0, 1), tgt.flatten(0, 1),
                                                   ignore_index=-100, reduction="sum") / count
    return lambda logits, tgt: loss_fn(logits, tgt) * (tgt.numel() / targets.numel())


def _is_ddp(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


@contextlib.contextmanager
def _grad_sync(model: nn.Module, last: bool):
    """The module to call for one chunk, with gradient reduction only on the last chunk of the step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        try:
            yield model
        finally:
            model.set_requires_gradient_sync(True)
    elif _is_ddp(model) and not last:
        with model.no_sync():
            yield model.module
    else:
        yield model


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP and peft wrappers."""
    for _ in range(4):
        if _is_ddp(model):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model


def _caller(model: nn.Module, spec: Any = None):
    """(module, tokens, cache, start) -> logits through the family's KV-cache forward (plait.models spec)."""
    base = _unwrap(model)
    if spec is None:
        from plait.models.registry import spec_for_model

        try:
            spec = spec_for_model(base)
        except ValueError as e:
            raise TypeError(f"chunk-wise training runs a model of a registered family (its spec's attention takes a "
                            f"start position and a KV cache), not {type(base).__name__}: {e}; or use "
                            "train.mode='full'") from None
    if spec.attention is None:
        raise TypeError(f"chunk-wise training needs the attention hooks of family {spec.name!r} (a forward through a "
                        "KV cache at a start position); it declares none: use train.mode='full'")
    return lambda module, tokens, cache, start: spec.attention.cache_forward(module, tokens, cache, start)
