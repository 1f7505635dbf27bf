"""Context parallelism for Plait's GPT: every attention runs as ring attention over a cp mesh.

    model = apply_context_parallel(GPT(cfg), mesh["cp"])       # in place; parameter names unchanged
    x, y = shard_batch(tokens, targets, cp_rank, cp)            # this rank's piece of every sequence
    loss = lm_loss(model(x), y)                                 # the mean over this rank's tokens
    # full-sequence loss and gradient = the average over the cp ranks (parallelize.py does it over dp x cp)

Layout (ring_attention.py, load-balanced for causal attention): every sequence is cut into 2*cp equal
chunks and cp rank r holds chunk r followed by chunk 2*cp-1-r. A model after apply_context_parallel
takes that piece as its input:
  * a forward pre-hook on the GPT passes the global positions of the local tokens (``shard_positions``)
    to RoPE, unless the caller gives ``positions``; ``start_pos`` shifts them (a continuation);
  * every ``Attention.attend`` (gpt.py's replaceable attention core; projections, RoPE and the output
    projection stay the model's) becomes ring attention over the cp group: K/V travel the ring with
    point-to-point send/recv, partial results merge by log-sum-exp;
  * a KV cache is refused (the keys are spread over the ring, not held as a prefix).

Parameters are replicated over cp and every cp rank holds the same number of tokens, so averaging the
local mean losses and the local gradients over cp gives the full sequence's: parallelize.py reduces
gradients over ``mesh["dp_cp"]`` (FSDP2 shards over it as torchtitan does, DDP all-reduces over it) and
averages the loss there. Composes with tensor parallelism (each tp rank rings its own heads; sequence
parallelism splits the local piece further over tp) and activation checkpointing (the recompute passes
the ring again, in the same order on every cp rank). Not with pipeline stages (refused by the plan).
"""

from __future__ import annotations

import torch
from plait.models.gpt import GPT, Attention
from plait.parallel.ring_attention import ring_attention, shard_positions, shard_sequence
from torch.distributed.device_mesh import DeviceMesh


class RingCore:
    """``Attention.attend`` as ring attention over a cp process group (an object, not a closure, so a
    deep-copied or pickled module keeps a working core)."""

    def __init__(self, group):
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ring_attention(q, k, v, self.group, causal=True)


def apply_context_parallel(model: GPT, cp_mesh: DeviceMesh) -> GPT:
    """Make ``model`` (Plait's GPT, whole: embeddings to output) compute on this cp rank's zigzag piece of
    each sequence, with ring attention over ``cp_mesh`` (1-D, e.g. ``mesh["cp"]``). Returns the same module.
    Apply it before FSDP2/DDP and activation checkpointing; tensor parallelism may come before or after."""
    if not isinstance(model, GPT):
        raise TypeError(f"context parallelism replaces the attention core of Plait's GPT, not {type(model).__name__}: "
                        "use cp=1 for this model")
    if model.tok_embeddings is None:
        raise ValueError("apply_context_parallel needs the whole GPT (with tok_embeddings), not a pipeline stage: "
                         "context parallelism does not combine with pp > 1")
    if not isinstance(cp_mesh, DeviceMesh) or cp_mesh.ndim != 1:
        raise ValueError(f"expected a 1-D cp DeviceMesh (e.g. mesh['cp']), got {cp_mesh!r}")
    cp = cp_mesh.size()
    if cp == 1:
        return model
    core = RingCore(cp_mesh.get_group())
    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = core
    model.register_forward_pre_hook(_positions_hook(cp_mesh.get_local_rank(), cp), with_kwargs=True)
    return model


def _positions_hook(cp_rank: int, cp: int):
    def hook(_model, args, kwargs):
        if kwargs.get("cache") is not None:
            raise ValueError("a KV cache does not combine with context parallelism: ring attention spreads the keys "
                             "over the cp ranks; generate with a model without apply_context_parallel")
        if kwargs.get("positions") is not None:
            return None
        tokens = args[0] if args else kwargs["tokens"]
        positions = shard_positions(tokens.shape[1] * cp, cp_rank, cp, tokens.device)
        start = kwargs.pop("start_pos", None)
        return args, {**kwargs, "positions": positions + start if start else positions}

    return hook


def shard_batch(inputs: torch.Tensor, targets: torch.Tensor, cp_rank: int, cp: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """This cp rank's piece of (batch, seq) token inputs and targets: chunks cp_rank and 2*cp-1-cp_rank of the
    sequence dim. seq must be a multiple of 2*cp (the error says so, with the value)."""
    if cp == 1:
        return inputs, targets
    return shard_sequence(inputs, cp_rank, cp, dim=1), shard_sequence(targets, cp_rank, cp, dim=1)

