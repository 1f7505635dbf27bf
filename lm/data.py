"""Token data for the reference GPT: made offline, stored as Parquet row shards, read per step.

Sources (nothing is downloaded):
- ``python-stdlib``: byte-level tokens (vocab 256) of the Python standard library's own source
  files, read from this interpreter's installation in sorted order — real text whose loss falls.
- ``synthetic``: a fixed random first-order Markov chain; cheap and identical on every machine.

Each stored row holds ``seq_len + 1`` tokens (inputs and shifted targets). A dataset folder records
the recipe that made it (source, seq_len, vocab_size, num_tokens, seed, format versions) and is used
only for that recipe: ``ensure_token_dataset`` builds a missing folder (saying so in one line), uses an
empty one, reuses and verifies a finished one, and refuses, before writing anything, a folder of someone
else's files or a dataset of another recipe (``data.rebuild=true`` replaces a Plait dataset of another
recipe, or a corrupt one, atomically; never a foreign folder).

The batch for a step is a pure function of (seed, step): step s of epoch e takes positions
[i*B, (i+1)*B) of a keyed pseudo-random permutation of the rows seeded by (seed, e), evaluated at those
positions only, so a step costs O(B) whatever the dataset's size. Resuming at step k reads exactly the
batches an uninterrupted run would, and each data-parallel rank takes its contiguous slice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from plait.runtime.config import ConfigError
from plait.storage.row_shards import (
    FORMAT,
    CorruptDataError,
    RowShards,
    check_replaceable,
    dataset_lock,
    describe_entries,
    is_row_shards,
    read_manifest,
    replace_row_shards,
)

SOURCES = ("python-stdlib", "synthetic")
TOKENS = "plait-tokens-v1"  # how a source becomes token rows; bump when that changes
ROUNDS = 6  # Feistel rounds of the per-epoch permutation


class DatasetError(ConfigError):
    """data.path cannot be used as asked (the CLI exits 2); the message names the folder and the choices."""


class CorruptDatasetError(DatasetError, CorruptDataError):
    """A finished dataset failed verification on the driver, before launch."""


@dataclass
class DataConfig:
    path: str = "data/stdlib-bytes"  # relative paths resolve against the directory `plait run` starts in
    source: str = "python-stdlib"
    num_tokens: int = 2_000_000
    seed: int = 0
    rebuild: bool = False  # replace a Plait dataset of another recipe (or a corrupt one) at path; never other files

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




def token_recipe(cfg: DataConfig, seq_len: int, vocab_size: int) -> dict:
    """What a token dataset is made from: stored as its manifest's ``meta``, compared before reuse."""
    return {"tokens": TOKENS, "source": cfg.source, "seq_len": seq_len, "vocab_size": vocab_size,
            "num_tokens": cfg.num_tokens, "seed": cfg.seed}


def _text(recipe: dict, keys) -> str:
    return ", ".join(f"{k}={recipe.get(k)!r}" for k in keys)


def reuse_or_refuse(path: Path, recipe: dict, rebuild: bool) -> RowShards | None:
    """The verified dataset at ``path`` if it holds ``recipe``; None if one is to be built there; else refuse.
    Reads only."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir():
        raise DatasetError(f"data.path={path} is not a folder (a file or a broken link): choose another data.path")
    names = sorted(os.listdir(path))
    if not names:
        return None  # an existing empty folder is taken as made for the dataset
    try:
        manifest = read_manifest(path)
    except CorruptDataError:
        manifest = None
    if not is_row_shards(manifest):
        raise DatasetError(f"data.path={path} is not a Plait dataset (it has no manifest.json of Plait's) and "
                           f"holds {describe_entries(names)}. Plait never writes into a folder it did not make "
                           "(data.rebuild does not apply): choose another data.path; a missing folder is built, "
                           "an empty one is used.")
    meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
    found, wanted = {"format": manifest.get("format"), **meta}, {"format": FORMAT, **recipe}
    differ = [k for k in wanted if found.get(k) != wanted[k]]
    if differ and not rebuild:
        beside = path.with_name(path.name + ("".join(f"-{k}{recipe[k]}" for k in differ if k in recipe) or "-new"))
        raise DatasetError(
            f"data.path={path} holds a Plait dataset made with another recipe ({_text(found, differ)}); this job "
            f"asks for {_text(wanted, differ)}. Choose one: data.path={beside} "
            f"builds a new dataset there and leaves this one as it is, or data.rebuild=true replaces this one "
            f"(jobs reading it now keep reading their copy).")
    if not differ:
        try:
            shards = RowShards(path)
            shards.verify()
            return shards
        except CorruptDataError as e:
            if not rebuild:
                raise CorruptDatasetError(f"{e} (or set data.rebuild=true to rebuild it in place)") from None
    try:
        check_replaceable(path)
    except ValueError as e:
        raise DatasetError(f"data.rebuild=true: {e}") from None
    return None


def ensure_token_dataset(cfg: DataConfig, path: Path, seq_len: int, vocab_size: int) -> RowShards:
    """The verified token dataset of this recipe at ``path``, built if missing (see the module docstring).
    Builders of one path take turns (a lock beside it); one that waited reuses what the other built."""
    path, recipe = Path(path).absolute(), token_recipe(cfg, seq_len, vocab_size)
    shards = reuse_or_refuse(path, recipe, cfg.rebuild)  # refusals happen here, before anything is written
    if shards is not None:
        return shards
    with dataset_lock(path):
        shards = reuse_or_refuse(path, recipe, cfg.rebuild)  # another job may have built it meanwhile
        if shards is not None:
            return shards
        state = ("does not exist" if not path.exists() else "is empty" if not os.listdir(path)
                 else "holds another recipe or a corrupt dataset, and data.rebuild=true")
        print(f"[plait] data.path={path} {state}: building a new dataset there "
              f"({_text(recipe, list(recipe))})", flush=True)
        replace_row_shards(path, build_token_rows(cfg, seq_len, vocab_size), meta=recipe)
    return RowShards(path)


def open_token_dataset(cfg: DataConfig, seq_len: int, vocab_size: int) -> RowShards:
    """On a rank: the dataset at ``cfg.path``, checked to hold this recipe (another job may have rebuilt it
    since the driver checked)."""
    shards, recipe = RowShards(cfg.path), token_recipe(cfg, seq_len, vocab_size)
    if shards.meta != recipe:
        raise DatasetError(f"data.path={cfg.path} changed after the driver checked it: it now holds "
                           f"{_text(shards.meta, list(recipe))}, this job needs {_text(recipe, list(recipe))}; "
                           "did another job rebuild it? Use a data.path of your own.")
    return shards


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permuted(positions: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """Where a keyed pseudo-random permutation of [0, n) sends each of ``positions``.

    A balanced Feistel network on the smallest power of four >= n is a bijection of that range; applying
    it again to values that land at or past n (cycle-walking) restricts it to a bijection of [0, n). Each
    walk takes fewer than 4 steps on average. Costs O(len(positions)); nothing n-sized is made."""
    positions = np.asarray(positions, dtype=np.int64)
    if n < 1 or (positions.size and (positions.min() < 0 or positions.max() >= n)):
        raise IndexError(f"positions must lie in [0, {n})")
    half = np.uint64(max(1, ((n - 1).bit_length() + 1) // 2))
    mask = (np.uint64(1) << half) - np.uint64(1)
    keys = np.random.SeedSequence(list(key)).generate_state(ROUNDS, dtype=np.uint64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << half) | right

    out = feistel(positions.astype(np.uint64))
    todo = np.nonzero(out >= np.uint64(n))[0]
    while todo.size:
        out[todo] = feistel(out[todo])
        todo = todo[out[todo] >= np.uint64(n)]
    return out.astype(np.int64)


class StepBatches:
    """The global batch for each step: positions of an epoch-wise keyed permutation of the rows."""

    def __init__(self, shards: RowShards, global_batch: int, seed: int):
        if global_batch > len(shards):
            raise ValueError(f"train.global_batch={global_batch} exceeds the dataset's {len(shards)} rows")
        self.shards, self.global_batch, self.seed = shards, global_batch, seed
        self.per_epoch = len(shards) // global_batch

    def row_ids(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        positions = np.arange(i * self.global_batch, (i + 1) * self.global_batch)
        return permuted(positions, len(self.shards), (self.seed, epoch))

    def batch(self, step: int, dp_rank: int = 0, dp_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for this data-parallel rank's slice of step's global batch."""
        per_rank = self.global_batch // dp_size
        ids = self.row_ids(step)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        rows = torch.from_numpy(self.shards.read(np.sort(ids)).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def data_state(self, step: int) -> dict:
        """The data position to store in a checkpoint written after ``step`` steps: the step is the position."""
        return {"format": self.shards.meta.get("text", TOKENS), "step": int(step), "global_batch": self.global_batch,
                "seed": self.seed, "rows": len(self.shards), "recipe": recipe_digest(self.shards.meta),
                "sequences_consumed": int(step) * self.global_batch}

    def check_resume(self, state: dict) -> int:
        """The step to resume at from a checkpoint's ``data_state``; refuses one this order cannot continue."""
        mine = self.data_state(int(state.get("step", 0)))
        if state.get("global_batch") != self.global_batch:
            raise DatasetError(
                f"the checkpoint was written with train.global_batch={state.get('global_batch')}, this job asks "
                f"for {self.global_batch}: the data order is a function of (seed, step, global batch), so resuming "
                "under another global batch would repeat or skip sequences. Keep train.global_batch="
                f"{state.get('global_batch')} (the dp degree may change; fit memory with more micro-batches), "
                "or start a new run.")
        for key, what in (("seed", "data seed"), ("recipe", "dataset recipe"), ("rows", "dataset size")):
            if state.get(key) != mine[key]:
                raise DatasetError(
                    f"the checkpoint's {what} is {key}={state.get(key)!r}, this job's is {mine[key]!r}: resuming "
                    "would read another sequence order. Point the job at the dataset and seed the run was "
                    "started with, or start a new run.")
        return int(state["step"])


def recipe_digest(meta: dict) -> str:
    """A short fingerprint of what a dataset was made from (its manifest ``meta``, file details aside)."""
    recipe = {k: v for k, v in sorted(meta.items()) if k not in ("files", "documents", "tokens", "dropped_tokens")}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
