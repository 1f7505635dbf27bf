"""Prompt / completion pairs packed into rows with the loss on the completion only (TRL's ``completion_only_loss``).

    [data]
    files = ["sft.parquet"]           # columns "prompt" and "completion" (JSONL keys alike)
    prompt_column = "prompt"
    text_column = "completion"

Each pair is one document: the prompt tokenised as the tokenizer does alone (its special tokens, a ``<s>``
included), then the completion tokenised without special tokens, then the end-of-text token. That is exactly
the sequence a policy sees when it is prompted with the prompt and generates the completion (``plait.rl``), so
a warm start here and RL later agree on every token. The loss covers the completion and the end-of-text token;
the prompt is context only.

Unlike plain text, a document is never cut between rows: a pair that does not fit the rest of a row starts the
next one, and the rest is padding (end-of-text tokens of a document of their own, without loss), so every
completion is trained with its whole prompt in view. A pair longer than a row (``seq_len + 1`` tokens) is
truncated at its end and counted (``truncated`` in the manifest's meta, and printed); one whose prompt alone
fills a row is left out and counted (``skipped``): every row then holds a trained token, so no batch has a
loss over nothing (NaN). Rows hold
``3 * (seq_len + 1)`` int32 values: tokens, document indices, and 1 where the token is trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm


class PairPacker:
    """Packs (tokens, prompt length) documents whole into rows of ``width`` tokens (see the module docstring),
    appending finished rows as int32 to an open binary file."""

    def __init__(self, out, width: int, pad_id: int):
        self.out, self.width, self.pad_id = out, width, pad_id
        self.row = np.empty((3, width), np.int32)
        self.fill = 0
        self.documents = self.total = self.rows = self.truncated = self.padding = self.trained = self.skipped = 0

    def add(self, documents: list[tuple[list[int], int]]) -> None:
        for tokens, prompt_len in documents:
            if prompt_len >= self.width:  # not one completion token would fit beside the prompt
                self.skipped += 1
                continue
            if len(tokens) > self.width:
                tokens, self.truncated = tokens[: self.width], self.truncated + 1
            n = len(tokens)
            if self.fill + n > self.width:
                self.flush()
            doc = self.documents % (1 << 30)
            self.row[0, self.fill : self.fill + n] = tokens
            self.row[1, self.fill : self.fill + n] = doc
            self.row[2, self.fill : self.fill + n] = np.arange(n) >= prompt_len
            self.fill += n
            self.documents, self.total = self.documents + 1, self.total + n
            self.trained += max(0, n - prompt_len)

    def flush(self) -> None:
        """Pad the open row (a document of its own, no loss) and write it; nothing when it is empty."""
        if not self.fill:
            return
        self.row[0, self.fill :] = self.pad_id
        self.row[1, self.fill :] = (1 << 30) + self.rows % (1 << 30)  # never equal to a document's index
        self.row[2, self.fill :] = 0
        self.padding += self.width - self.fill
        self.out.write(self.row.tobytes())
        self.rows, self.fill = self.rows + 1, 0


def pack_pairs(cfg, files: list[Path], tok, eos_id: int, out, batch: int, read_columns) -> PairPacker:
    """Tokenise the (prompt, completion) pairs of ``files`` with ``tok`` (a tokenizers.Tokenizer) into ``out``;
    ``cfg`` is a TextDataConfig with ``prompt_column`` set, ``read_columns`` text_data's reader."""
    packer = PairPacker(out, cfg.seq_len + 1, eos_id)
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, mininterval=1.0,
              desc="[plait] tokenising pairs") as bar:
        for file in files:
            for rows, size in read_columns(file, [cfg.text_column, cfg.prompt_column], batch):
                if rows:
                    prompts = [e.ids for e in tok.encode_batch([p for _, p in rows])]
                    completions = [e.ids for e in tok.encode_batch([c for c, _ in rows], add_special_tokens=False)]
                    packer.add([([*p, *c, eos_id], len(p)) for p, c in zip(prompts, completions, strict=True)])
                bar.update(size)
    packer.flush()
    return packer
