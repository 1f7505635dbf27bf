"""Sampling from a policy of any registered family with a KV cache, and the trainer-side log-probs that match it.

    batch = left_pad([tok.encode(t.prompt, bos=True) for t in tasks], tok.pad_id)
    out = generate(model, batch.tokens, 16, temperature=1.0, top_p=1.0, stop_token=tok.eos_id,
                   generator=torch.Generator().manual_seed(0), pad_id=tok.pad_id, weight_version=7)
    seqs = pack_sequences(batch.tokens, out, pad_id=tok.pad_id)      # right-padded prompt + completion
    logp = sequence_logprobs(model, seqs.tokens, seqs.mask, temperature=1.0)  # == seqs.behaviour_logprobs

Generation prefills the cache with the whole (left-padded) prompt batch once, then feeds one token per
step through the same ``KVCache`` (Plait's cache protocol), by the family's ``spec.attention.padded_forward``
(plait.models): per-row positions and a mask of the real keys so far. Left padding is exact: each row's real
tokens sit at RoPE positions 0, 1, ... and no query attends to a padded key (Plait's GPT replaces its attention
core with a masked SDPA for the call; a HF decoder takes the mask as its ``attention_mask``). Rows that have
emitted a stop token keep being fed ``pad_id`` (masked in the result) until every row stops or the budget ends.

Behaviour log-probs: ``log_softmax(logits / temperature)`` at the sampled token, over the FULL vocabulary:
top-p renormalisation is NOT included (the nucleus changes the sampler, not the reported density), so
the trainer's ``sequence_logprobs(..., temperature)`` — the same ``token_logprobs`` on the same logits —
gives pi/mu == 1 on unchanged weights, and importance weights measure only the weight drift. With
``temperature=0`` (greedy) the log-probs are those of the untempered softmax (use temperature 1 on the
trainer side). Sampling is inverse-CDF with exactly one ``torch.rand`` draw per row per step from
``generator``, so a fixed generator reproduces a rollout whatever the logits' rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from plait.models.gpt import KVCache
from plait.rl.losses import token_logprobs
from torch import nn


@dataclass
class Rollout:
    """Completions of one ``generate`` call, (B, N) with N <= max_new_tokens (the steps actually run)."""

    tokens: torch.Tensor  # (B, N) long: sampled tokens, the stop token included; pad_id after it
    logprobs: torch.Tensor  # (B, N) behaviour log-probs of ``tokens`` (see the module docstring); 0 where masked
    mask: torch.Tensor  # (B, N) bool: True at valid completion tokens (up to and including the stop token)
    lengths: torch.Tensor  # (B,) long: valid completion tokens per row
    finished: torch.Tensor  # (B,) bool: the row emitted stop_token (False: budget reached or interrupted)
    weight_version: int  # the version of the weights that produced the tokens (the caller's)
    temperature: float  # the temperature the log-probs are under (1.0 when greedy)
    interrupted: bool = False  # should_interrupt() stopped generation before every row finished


@dataclass
class Sequences:
    """Prompt + completion per row, RIGHT-padded: what the trainer feeds a plain ``model(tokens)``."""

    tokens: torch.Tensor  # (B, S) long: a row's real prompt tokens, then its valid completion tokens, then pad
    mask: torch.Tensor  # (B, S) bool: True at completion tokens (the ones trained on)
    behaviour_logprobs: torch.Tensor  # (B, S) the rollout's log-probs at the completion tokens, 0 elsewhere
    weight_version: int


@torch.no_grad()
def generate(model: nn.Module, prompt_tokens: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, stop_token: int | None = None, generator: torch.Generator | None = None,
             pad_id: int = 0, weight_version: int = 0, prompt_mask: torch.Tensor | None = None,
             should_interrupt: Callable[[], bool] | None = None, spec=None, top_k: int = 0,
             stop_tokens: tuple[int, ...] = ()) -> Rollout:
    """Sample up to ``max_new_tokens`` per row after left-padded ``prompt_tokens`` (B, P).

    ``prompt_mask`` (B, P) bool marks real prompt tokens (default: everything after a row's leading
    ``pad_id`` run). ``temperature=0`` is greedy. ``generator`` must live on the prompts' device (None: the
    global RNG). ``should_interrupt`` is polled between steps (e.g. "a newer weight version is out"); when it
    returns True the rollout so far is returned with ``interrupted=True`` (unfinished rows: finished False).
    ``spec``: the model's family (plait.models; default: found from the model), whose attention hooks run the
    padded batch through the cache. ``stop_tokens``: more ids that end a row (as ``stop_token`` does);
    ``top_k`` > 0 samples among the k most probable tokens only."""
    if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] == 0:
        raise ValueError(f"prompt_tokens has shape {tuple(prompt_tokens.shape)}: give (batch, prompt_len >= 1)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: give 1 or more")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p}: need temperature >= 0 and 0 < top_p <= 1")
    device = prompt_tokens.device
    valid = _prompt_mask(prompt_tokens, pad_id, prompt_mask)
    batch, width = prompt_tokens.shape
    forward = _padded_forward(model, spec)
    stops = torch.tensor([t for t in (stop_token, *stop_tokens) if t is not None], dtype=torch.long, device=device)
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None) or \
        getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and width + max_new_tokens > limit:
        raise ValueError(f"prompt width {width} + max_new_tokens {max_new_tokens} exceeds model.max_seq_len={limit}: "
                         "shorten either or build the model with a larger max_seq_len")
    prompt_len = valid.sum(1)
    cache = KVCache()
    tokens, logprobs, masks = [], [], []
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    interrupted = False
    keys = valid
    logits = forward(model, prompt_tokens, (valid.cumsum(1) - 1).clamp(min=0), cache, keys)[:, -1]
    for step in range(max_new_tokens):
        token, logp = sample_next(logits, temperature, top_p, generator, top_k)
        live = ~done
        token = torch.where(live, token, torch.full_like(token, pad_id))
        tokens.append(token)
        logprobs.append(torch.where(live, logp, torch.zeros_like(logp)))
        masks.append(live)
        if len(stops):
            done = done | (live & torch.isin(token, stops))
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if should_interrupt is not None and should_interrupt():
            interrupted = True
            break
        keys = torch.cat([keys, keys.new_ones(batch, 1)], 1)  # generated keys are real
        logits = forward(model, token[:, None], (prompt_len + step)[:, None], cache, keys)[:, -1]
    mask = torch.stack(masks, 1)
    return Rollout(tokens=torch.stack(tokens, 1), logprobs=torch.stack(logprobs, 1), mask=mask,
                   lengths=mask.sum(1), finished=done, weight_version=weight_version,
                   temperature=temperature if temperature > 0 else 1.0, interrupted=interrupted)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (token (B,) long, its behaviour log-prob (B,)). One uniform per row from ``generator``
    (none when greedy); top-k keeps the k most probable tokens, top-p the smallest most-probable set whose mass
    reaches ``top_p``."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, token_logprobs(logits, token, 1.0)
    probs = torch.softmax(_upcast(logits) / temperature, dim=-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    if 0 < top_k < sorted_probs.shape[-1]:
        sorted_probs[:, top_k:] = 0.0
    if top_p < 1.0:
        before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the more probable tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most probable always stays
    cdf = sorted_probs.cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=logits.shape[-1] - 1)
    token = order.gather(-1, index).squeeze(-1)
    return token, token_logprobs(logits, token, temperature)  # the trainer's formula, on the same logits


def pack_sequences(prompt_tokens: torch.Tensor, rollout: Rollout, *, pad_id: int = 0,
                   prompt_mask: torch.Tensor | None = None) -> Sequences:
    """Each row's real prompt tokens followed by its valid completion tokens, right-padded with ``pad_id``
    to the longest row: positions start at 0 in every row, so a plain causal ``model(tokens)`` sees exactly
    what generation saw (trailing padding is never attended by earlier tokens)."""
    valid = _prompt_mask(prompt_tokens, pad_id, prompt_mask)
    prompt_len, comp_len = valid.sum(1), rollout.lengths.to(valid.device)
    batch, width = len(prompt_len), int((prompt_len + comp_len).max())
    tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=prompt_tokens.device)
    mask = torch.zeros((batch, width), dtype=torch.bool, device=prompt_tokens.device)
    behaviour = torch.zeros((batch, width), dtype=rollout.logprobs.dtype, device=prompt_tokens.device)
    for row in range(batch):
        p, c = int(prompt_len[row]), int(comp_len[row])
        tokens[row, :p] = prompt_tokens[row][valid[row]]
        tokens[row, p:p + c] = rollout.tokens[row, :c]
        mask[row, p:p + c] = True
        behaviour[row, p:p + c] = rollout.logprobs[row, :c]
    return Sequences(tokens=tokens, mask=mask, behaviour_logprobs=behaviour, weight_version=rollout.weight_version)


def sequence_logprobs(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """(B, S) log p(tokens[:, t] | tokens[:, :t]) under ``log_softmax(logits / temperature)`` where ``mask``,
    0 elsewhere (position 0 has no prediction and must not be masked in). The model sees ``tokens[:, :-1]``,
    the inputs a training step on ``plait.rl.losses.train_batch`` feeds it, so the values agree bit for bit.
    Differentiable: wrap in ``torch.no_grad()`` for behaviour or proximal log-probs."""
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be (batch, seq)")
    if bool(mask[:, 0].any()):
        raise ValueError("mask is True at position 0, which no token predicts: sequences must start with a prompt")
    out = model(tokens[:, :-1])
    logp = token_logprobs(getattr(out, "logits", out), tokens[:, 1:], temperature)
    return F.pad(logp, (1, 0)) * mask


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _prompt_mask(prompt_tokens: torch.Tensor, pad_id: int, prompt_mask: torch.Tensor | None) -> torch.Tensor:
    valid = (prompt_tokens != pad_id).cumsum(1) > 0 if prompt_mask is None else prompt_mask.bool()
    if prompt_mask is None and bool((valid & (prompt_tokens == pad_id)).any()):
        rows = (valid & (prompt_tokens == pad_id)).any(1).nonzero().flatten().tolist()
        raise ValueError(f"prompt rows {rows[:8]} hold pad_id={pad_id} after a real token: pad prompts on the LEFT "
                         "(plait.rl.tokenizer.left_pad), or pass prompt_mask")
    if valid.shape != prompt_tokens.shape:
        raise ValueError(f"prompt_mask {tuple(valid.shape)} does not match prompt_tokens {tuple(prompt_tokens.shape)}")
    if not bool(valid[:, -1].all()):
        rows = (~valid[:, -1]).nonzero().flatten().tolist()
        raise ValueError(f"prompt rows {rows[:8]} have no real token in the last column: pad prompts on the LEFT "
                         "(plait.rl.tokenizer.left_pad), and give every row at least one token")
    if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
        raise ValueError("prompt_mask has padding after a real token: prompts must be left-padded only")
    return valid


def _padded_forward(model: nn.Module, spec):
    """The family's forward of a left-padded batch through a cache (plait.models' attention hooks)."""
    if spec is None:
        from plait.models.registry import spec_for_model

        spec = spec_for_model(model)
    forward = getattr(spec.attention, "padded_forward", None) if spec.attention is not None else None
    if forward is None:
        raise ValueError(f"model family {spec.name!r} declares no padded KV-cache forward: it cannot generate here")
    return forward
