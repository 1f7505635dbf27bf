"""Context parallelism for any family with an attention hook: every attention runs as ring attention over cp.

    model = apply_context_parallel(model, mesh["cp"], spec.attention)   # in place; parameter names unchanged
    x, y = shard_batch(tokens, targets, cp_rank, cp)            # this rank's piece of every sequence
    loss = lm_loss(model(x), y)                                 # the mean over this rank's tokens
    # full-sequence loss and gradient = the average over the cp ranks (parallelize.py does it over dp x cp)

Layout (ring_attention.py, load-balanced for causal attention): every sequence is cut into 2*cp equal
chunks and cp rank r holds chunk r followed by chunk 2*cp-1-r. A model after apply_context_parallel
takes that piece as its input:
  * a forward pre-hook passes the global positions of the local tokens (``shard_positions``) through the
    family's positions keyword (``hooks.positions_kwarg``: ``positions`` for Plait's GPT, ``position_ids`` for
    a HF decoder), unless the caller gives them; a GPT's ``start_pos`` shifts them (a continuation);
  * every attention's score computation (``hooks.set_core``: the GPT's ``Attention.attend``, a HF module's
    attention function; projections, RoPE, norms and the output projection stay the model's) becomes ring
    attention over the cp group: K/V travel the ring with point-to-point send/recv, partial results merge by
    log-sum-exp;
  * a KV cache is refused (the keys are spread over the ring, not held as a prefix).

Parameters are replicated over cp and every cp rank holds the same number of tokens, so averaging the
local mean losses and the local gradients over cp gives the full sequence's: parallelize.py reduces
gradients over ``mesh["dp_cp"]`` (FSDP2 shards over it as torchtitan does, DDP all-reduces over it) and
averages the loss there. Composes with tensor parallelism (each tp rank rings its own heads; sequence
parallelism splits the local piece further over tp) and activation checkpointing (the recompute passes
the ring again, in the same order on every cp rank). Not with pipeline stages (refused by the plan).
A sliding-window layer (Mistral, Gemma-3's local layers) rings with its window applied by global position
(ring_attention.py); attention the ring cannot compute is refused when it is met: logit soft-capping (Gemma-2),
attention dropout.
"""

from __future__ import annotations

from typing import Any

import torch
from plait.parallel.ring_attention import ring_attention, shard_positions, shard_sequence
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

RING_MARK = "_plait_ring_attention"


def uses_ring_attention(model: nn.Module) -> bool:
    """Whether ``apply_context_parallel`` made ``model``'s attention cores ring attention."""
    return bool(getattr(model, RING_MARK, False))


class RingCore:
    """An attention core as ring attention over a cp process group: ``core(q, k, v, scale=, window=, softcap=)``
    on (batch, heads, n, head_dim) tensors (an object, not a closure, so a deep-copied or pickled module keeps a
    working core)."""

    def __init__(self, group, cp: int):
        self.group, self.cp = group, cp

    @torch.compiler.disable  # send/recv inside an autograd.Function: dynamo cannot trace it (compile.py)
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        if softcap:
            raise ValueError(f"attention logit soft-capping ({softcap}) does not run as ring attention: use cp=1")
        window = window if window is not None and window < q.shape[-2] * self.cp else None  # no cut: plain causal
        return ring_attention(q, k, v, self.group, causal=True, scale=scale, window=window)


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh, hooks: Any) -> nn.Module:
    """Make ``model`` (whole: embeddings to output) compute on this cp rank's zigzag piece of each sequence, with
    ring attention over ``cp_mesh`` (1-D, e.g. ``mesh["cp"]``). ``hooks`` is its family's ``spec.attention``
    (plait.models: ``set_core``, ``positions_kwarg``). Returns the same module. Apply it before FSDP2/DDP and
    activation checkpointing; tensor parallelism may come before or after."""
    if hooks is None:
        raise TypeError(f"context parallelism replaces the attention core of a model family that declares one "
                        f"(its spec's attention hooks); {type(model).__name__} has none: use cp=1 for this model")
    if not isinstance(cp_mesh, DeviceMesh) or cp_mesh.ndim != 1:
        raise ValueError(f"expected a 1-D cp DeviceMesh (e.g. mesh['cp']), got {cp_mesh!r}")
    cp = cp_mesh.size()
    if cp == 1:
        return model
    hooks.set_core(model, RingCore(cp_mesh.get_group(), cp))
    setattr(model, RING_MARK, True)  # plan.compile: a graph break at each attention core (compile.py)
    model.register_forward_pre_hook(_positions_hook(cp_mesh.get_local_rank(), cp, hooks.positions_kwarg),
                                    with_kwargs=True)
    return model


def _positions_hook(cp_rank: int, cp: int, keyword: str):
    def hook(_model, args, kwargs):
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("a KV cache does not combine with context parallelism: ring attention spreads the keys "
                             "over the cp ranks; generate with a model without apply_context_parallel")
        if kwargs.get(keyword) is not None:
            return None
        tokens = args[0] if args else next(kwargs[k] for k in ("tokens", "input_ids", "inputs_embeds") if k in kwargs)
        if tokens.is_floating_point():  # hidden states: (batch, n, d)
            n = tokens.shape[1]
        else:
            n = tokens.shape[-1]
        positions = shard_positions(n * cp, cp_rank, cp, tokens.device)
        start = kwargs.pop("start_pos", None)
        positions = positions + start if start else positions
        if keyword == "position_ids":
            positions = positions[None].expand(tokens.shape[0], -1)
        return args, {**kwargs, keyword: positions}

    return hook


def shard_batch(inputs: Any, targets: torch.Tensor, cp_rank: int, cp: int) -> tuple[Any, torch.Tensor]:
    """This cp rank's piece of (batch, seq) token inputs and targets: chunks cp_rank and 2*cp-1-cp_rank of the
    sequence dim. ``inputs`` may be a dict of (batch, seq) tensors (``input_ids``, ``position_ids``); an
    attention mask is refused (ring attention is causal over the whole sequence). seq must be a multiple of
    2*cp (the error says so, with the value)."""
    if cp == 1:
        return inputs, targets
    if isinstance(inputs, dict):
        if inputs.get("attention_mask") is not None:
            raise ValueError("context parallelism with an attention mask (e.g. packed documents, data.doc_mask): ring "
                             "attention is causal over the whole sequence; turn the mask off or use cp=1")
        inputs = {k: shard_sequence(v, cp_rank, cp, dim=1) if isinstance(v, torch.Tensor) and v.ndim >= 2 else v
                  for k, v in inputs.items()}
    else:
        inputs = shard_sequence(inputs, cp_rank, cp, dim=1)
    return inputs, shard_sequence(targets, cp_rank, cp, dim=1)
