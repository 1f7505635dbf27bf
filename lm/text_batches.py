"""Batches of packed text rows: inputs, shifted targets and document-aware masks for a Hugging Face causal LM.

A packed text dataset (built by ``plait.lm.text_data``) is a row-shard dataset whose rows hold
``2 * (seq_len + 1)`` int32 values: ``seq_len + 1`` token ids, then as many document indices (the index of
the document each token came from, counted over all input files). Documents are concatenated, each
followed by the end-of-text token, and cut into rows without overlap, so a row may start or end inside a
document. For a step, ``TextBatches.batch`` gives this data-parallel rank's slice of the global batch:

- ``input_ids`` [B, T]: tokens 0..T-1 of each row;
- ``position_ids`` [B, T]: 0 at each document start (and at the row's first token), counting up;
- ``attention_mask`` [B, 1, T, T] (when ``doc_mask``): block-diagonal causal, True where a token may attend
  (the custom 4-D mask ``LlamaForCausalLM`` passes to its attention as it is; SDPA takes booleans, the eager
  implementation wants an additive float mask: pass ``mask_dtype=torch.float32`` or the model's dtype);
- targets [B, T]: tokens 1..T, with -100 where the next token starts another document.

Which rows a step takes is StepBatches' pure function of (seed, step, global_batch), so the data position
of a run is its step: StepBatches' ``data_state(step)`` goes into the checkpoint and ``check_resume(state)``
refuses to resume from one written with another dataset, seed or global batch. The dp degree may change.
"""

from __future__ import annotations

import numpy as np
import torch
from plait.lm.data import DatasetError, StepBatches, recipe_digest  # noqa: F401 (recipe_digest re-exported)
from plait.storage.row_shards import RowShards

TEXT = "plait-text-v1"  # the row layout above; bump when it changes
PAIRS = "plait-text-pairs-v1"  # prompt / completion rows (lm/pair_rows.py): a third block, 1 where trained on
IGNORE = -100  # the target ignored by torch's (and transformers') cross-entropy


def split_rows(rows: np.ndarray, blocks: int = 2) -> tuple[np.ndarray, ...]:
    """(tokens, document indices) of packed text rows, each [N, seq_len + 1]; with ``blocks=3`` (prompt /
    completion rows) also the trained-on flags."""
    width = rows.shape[1] // blocks
    return tuple(rows[:, i * width : (i + 1) * width] for i in range(blocks))


def position_ids(docs: torch.Tensor) -> torch.Tensor:
    """Positions within each document for document indices ``docs`` [B, T]; a row's first token is position 0."""
    t = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    start = torch.ones_like(docs, dtype=torch.bool)
    start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    last_start = torch.cummax(torch.where(start, t, torch.zeros_like(t)), dim=1).values
    return t - last_start


def document_mask(docs: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """[B, 1, T, T] block-diagonal causal mask of document indices ``docs`` [B, T]. Boolean: True may attend;
    a floating dtype: 0 may attend, the dtype's minimum may not (added to attention scores)."""
    T = docs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    if not dtype.is_floating_point:
        raise ValueError(f"mask_dtype={dtype}: use torch.bool (SDPA) or a floating dtype (an additive mask)")
    return torch.zeros(allowed.shape, dtype=dtype, device=docs.device).masked_fill(~allowed, torch.finfo(dtype).min)


def text_inputs(rows: np.ndarray, doc_mask: bool = True, mask_dtype: torch.dtype = torch.bool, pairs: bool = False
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(inputs, targets) of packed text rows [N, 2 * (T + 1)] (see the module docstring); ``pairs``: prompt /
    completion rows [N, 3 * (T + 1)], whose targets are IGNORE except at the completions' tokens."""
    blocks = [torch.from_numpy(np.ascontiguousarray(a).astype(np.int64)) for a in split_rows(rows, 3 if pairs else 2)]
    tokens, docs = blocks[:2]
    targets = tokens[:, 1:].clone()
    targets[docs[:, 1:] != docs[:, :-1]] = IGNORE
    if pairs:
        targets[blocks[2][:, 1:] == 0] = IGNORE
    in_docs = docs[:, :-1]
    inputs = {"input_ids": tokens[:, :-1]}
    if doc_mask:
        inputs["position_ids"] = position_ids(in_docs)
        inputs["attention_mask"] = document_mask(in_docs, mask_dtype)
    else:  # one stream, attention across documents: plain positions (restarting ones would make transformers
        # infer packed sequences from them and mask anyway)
        inputs["position_ids"] = torch.arange(in_docs.shape[1]).expand_as(in_docs).clone()
    return inputs, targets


class TextBatches(StepBatches):
    """The global batch of each step of a packed text dataset, sliced per data-parallel rank."""

    def __init__(self, shards: RowShards, global_batch: int, seed: int, doc_mask: bool = True,
                 mask_dtype: torch.dtype = torch.bool):
        if shards.meta.get("text") not in (TEXT, PAIRS):
            raise DatasetError(f"{shards.path} is not a packed text dataset of this version (its manifest meta "
                               f"says text={shards.meta.get('text')!r}, expected {TEXT!r} or {PAIRS!r}); build it "
                               "with ensure_text_dataset")
        self.pairs = shards.meta["text"] == PAIRS
        if global_batch < 1:
            raise DatasetError(f"train.global_batch={global_batch}: must be >= 1")
        super().__init__(shards, global_batch, seed)
        self.doc_mask, self.mask_dtype = doc_mask, mask_dtype

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(inputs, targets) for data-parallel rank ``dp_rank``'s contiguous slice of step's global batch."""
        if dp_size < 1 or self.global_batch % dp_size or not 0 <= dp_rank < dp_size:
            raise ValueError(f"train.global_batch={self.global_batch} must split evenly over dp_size={dp_size} "
                             f"ranks and dp_rank={dp_rank} must lie in [0, {dp_size})")
        per_rank = self.global_batch // dp_size
        ids = self.row_ids(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        return text_inputs(self.shards.read(np.sort(ids)), self.doc_mask, self.mask_dtype, self.pairs)
