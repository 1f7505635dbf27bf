"""The language-model losses the plans offer: next-token cross-entropy, and its vocab-parallel form.

    loss = lm_loss(logits, targets)                       # mean next-token cross-entropy
    loss = tp_loss(model(tokens), targets, loss_parallel=True)   # vocab-sharded logits, never gathered

``tp_loss`` is parallelize's default loss: plain under ``loss_parallel=False``; with it, the logits are the
vocab-sharded DTensor a tensor-parallel output projection returns (Shard(-1)) and the cross-entropy runs under
torch's ``loss_parallel()``. A Hugging Face model's output (``.logits``) is accepted too.

Auxiliary terms (mixture-of-experts load balancing, router z-loss): a model output may carry an already weighted
scalar under the attribute ``AUX_LOSS`` (``with_aux_loss(output, term)`` sets it: a HF ``ModelOutput`` or a logits
tensor alike); ``tp_loss`` adds it to the cross-entropy, so parallelize's default loss trains it without knowing
the family. A family computes the term as its reference does (HF's ``router_aux_loss_coef * aux_loss`` ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

AUX_LOSS = "plait_aux_loss"  # the weighted auxiliary term a model output carries (added by tp_loss)


def with_aux_loss(output, term: torch.Tensor | None):
    """``output`` (a logits tensor or a HF ModelOutput) carrying ``term`` for tp_loss to add; returns it."""
    if term is not None:
        setattr(output, AUX_LOSS, term)
    return output


def aux_loss_of(output) -> torch.Tensor | None:
    """The weighted auxiliary term an output carries (None: none)."""
    return getattr(output, AUX_LOSS, None)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits go to float32 for the softmax; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose target is not -100 (torch's ignore_index). A batch
    must hold at least one such target (the mean of none is NaN): the packed prompt / completion rows of
    ``plait.lm.pair_rows`` each hold one."""
    return F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(0, 1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of vocab-sharded logits under ``loss_parallel()``; the gradient is computed in the
    same context during forward, so the returned plain loss can be backpropagated anywhere (a pipeline
    schedule, a caller that never heard of loss_parallel)."""

    @staticmethod
    def forward(ctx, logits: DTensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad(), loss_parallel():
            leaf = logits.detach().requires_grad_(ctx.needs_input_grad[0])
            loss = F.cross_entropy(upcast(leaf).flatten(0, 1), targets.flatten(0, 1))
            if leaf.requires_grad:
                (grad,) = torch.autograd.grad(loss, leaf)
                ctx.save_for_backward(grad)
        return loss.detach().to_local()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None


def tp_loss(logits: torch.Tensor, targets: torch.Tensor, loss_parallel: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (like ``lm_loss``), a plain scalar equal on every tp rank.
    With ``loss_parallel`` the logits are the vocab-sharded DTensor the model returns; the full
    (batch, seq, vocab) logits are never gathered. A HF model's output (``.logits``) is accepted too. An
    auxiliary term the output carries (``with_aux_loss``: MoE load balancing, z-loss) is added."""
    aux = aux_loss_of(logits)
    loss = _cross_entropy(getattr(logits, "logits", logits), targets, loss_parallel)
    if aux is None:
        return loss
    aux = aux.full_tensor() if isinstance(aux, DTensor) else aux
    return loss + aux.to(loss.dtype)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_parallel: bool) -> torch.Tensor:
    if not loss_parallel:
        return lm_loss(logits, targets)
    vocab_sharded = isinstance(logits, DTensor) and any(
        p.is_shard() and p.dim % logits.ndim == logits.ndim - 1 for p in logits.placements)
    if not vocab_sharded:
        raise ValueError("tp_loss(loss_parallel=True) needs vocab-sharded DTensor logits: apply the plan with "
                         "apply_tensor_parallel(..., loss_parallel=True), or pass loss_parallel=False")
    return _VocabParallelCrossEntropy.apply(logits, targets)
