"""Token data for the reference GPT: made offline, stored as Parquet row shards, read per step.

Sources (nothing is downloaded):
- ``python-stdlib``: byte-level tokens (vocab 256) of the Python standard library's own source
  files, read from this interpreter's installation in sorted order — real text whose loss falls.
- ``synthetic``: a fixed random first-order Markov chain; cheap and identical on every machine.

Each stored row holds ``seq_len + 1`` tokens (inputs and shifted targets). The batch for a step is a
pure function of (seed, step), so resuming at step k reads exactly the batches an uninterrupted run
would, and each data-parallel rank takes its contiguous slice of the global batch.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from plait.storage.row_shards import RowShards, write_row_shards

SOURCES = ("python-stdlib", "synthetic")


@dataclass
class DataConfig:
    path: str = "data/stdlib-bytes"  # relative paths resolve against the directory `plait run` starts in
    source: str = "python-stdlib"
    num_tokens: int = 2_000_000
    seed: int = 0

    def check(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}: choose one of {', '.join(SOURCES)}")
        if self.num_tokens < 1024:
            raise ValueError(f"data.num_tokens={self.num_tokens}: need at least 1024 tokens")


def stdlib_bytes(limit: int) -> np.ndarray:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.glob("*.py")):
        data = f.read_bytes()
        out.append(np.frombuffer(data, dtype=np.uint8))
        total += len(data)
        if total >= limit:
            break
    if total < 1024:
        raise RuntimeError(f"found only {total} bytes of Python source under {root}; use data.source='synthetic'")
    return np.concatenate(out)[:limit]


def markov_tokens(n: int, vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Each token has 4 likely successors: learnable structure, entropy ~2 nats.
    successors = rng.integers(0, vocab, size=(vocab, 4))
    choice = rng.integers(0, 4, size=n)
    tokens = np.empty(n, dtype=np.int64)
    tokens[0] = 0
    for i in range(1, n):
        tokens[i] = successors[tokens[i - 1], choice[i]]
    return tokens


def build_token_rows(cfg: DataConfig, seq_len: int, vocab_size: int) -> np.ndarray:
    if cfg.source == "python-stdlib":
        if vocab_size < 256:
            raise ValueError(
                f"data.source='python-stdlib' is byte-level: model.vocab_size must be >= 256, got {vocab_size}"
            )
        tokens = stdlib_bytes(cfg.num_tokens).astype(np.int64)
    else:
        tokens = markov_tokens(cfg.num_tokens, vocab_size, cfg.seed)
    width = seq_len + 1
    n_rows = len(tokens) // width
    return tokens[: n_rows * width].reshape(n_rows, width).astype(np.int32)


def ensure_token_dataset(cfg: DataConfig, path: Path, seq_len: int, vocab_size: int) -> RowShards:
    """Build the dataset at ``path`` unless a finished one with the same recipe is there."""
    recipe = {"source": cfg.source, "num_tokens": cfg.num_tokens, "seed": cfg.seed, "seq_len": seq_len,
              "vocab_size": vocab_size}
    if (path / "manifest.json").is_file():
        shards = RowShards(path)
        if shards.meta == recipe:
            return shards
    write_row_shards(path, build_token_rows(cfg, seq_len, vocab_size), meta=recipe)
    return RowShards(path)


class StepBatches:
    """The global batch for each step: epoch-wise permutations of the rows, seeded."""

    def __init__(self, shards: RowShards, global_batch: int, seed: int):
        if global_batch > len(shards):
            raise ValueError(f"train.global_batch={global_batch} exceeds the dataset's {len(shards)} rows")
        self.shards, self.global_batch, self.seed = shards, global_batch, seed
        self.per_epoch = len(shards) // global_batch

    def row_ids(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return perm[i * self.global_batch : (i + 1) * self.global_batch]

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for this data-parallel rank's slice of step's global batch."""
        per_rank = self.global_batch // dp_size
        ids = self.row_ids(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        rows = torch.from_numpy(self.shards.read(np.sort(ids)).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]
