"""Prompts with ground truth: your Parquet / JSONL files, or a built-in task stream; a held-out split.

    [prompts]
    files = ["data/train.parquet"]       # Parquet (.parquet/.pq) or JSONL (.jsonl/.ndjson), globs ok
    prompt_column = "prompt"             # text, or chat messages ([{"role": "user", "content": ...}, ...])
    answer_column = "ground_truth"       # what the reward compares against
    data_source_column = "data_source"   # optional: handed to the reward (default: the file's stem)
    extra_columns = ["level"]            # optional: handed to the reward in extra_info
    eval_files = ["data/test.parquet"]   # a held-out split (or eval_fraction of the files, kept out of training)

A record is ``Prompt(prompt, ground_truth, data_source, extra)``. The driver reads every file once before
anything starts and refuses, with the file and the fix, a missing file or column, an empty file, a prompt that
is neither text nor a list of messages, or an empty ground truth (exit 2). What was read is fingerprinted
(``digest``): a checkpoint records it, and resuming with other prompts is refused (the stream position would
mean other prompts). Without files the stream is a built-in task's (rl/tasks.py, the ``[task]`` table).

The stream: prompt ``i`` is record ``order(epoch)[i % N]`` with ``epoch = i // N`` and a seeded permutation per
epoch, a pure function of (seed, i), so a resumed run that knows its cursor reads on without repeating or
skipping a prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plait.runtime.config import ConfigError
from plait.storage.table_files import PARQUET, expand_table_files


class PromptDataError(ConfigError):
    """The prompt files cannot be used as given; the message names the file and the fix."""


@dataclass
class PromptConfig:
    files: list[str] = field(default_factory=list)  # [] = the built-in task of the [task] table
    prompt_column: str = "prompt"
    answer_column: str = "ground_truth"
    data_source_column: str = "data_source"  # absent from a file: the file's stem
    extra_columns: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0  # without eval_files: this share of the records is held out (never trained)
    eval_every: int = 0  # versions between held-out scorings (pass@1 at temperature 0, mean reward); 0 = never
    eval_size: int = 64  # held-out prompts scored each time (the first ones; the same every time)
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.eval_fraction < 1 or self.eval_every < 0 or self.eval_size < 1:
            raise ValueError(f"prompts.eval_fraction={self.eval_fraction} (in [0, 1)), eval_every={self.eval_every} "
                             f"(>= 0), eval_size={self.eval_size} (>= 1) out of range")
        if self.eval_files and self.eval_fraction:
            raise ValueError("prompts.eval_files and prompts.eval_fraction: give one held-out split, not both")


@dataclass(frozen=True)
class Prompt:
    prompt: Any  # text, or a list of {"role", "content"} messages
    ground_truth: str
    data_source: str
    extra: dict = field(default_factory=dict)


def expand(patterns: list[str], what: str) -> list[Path]:
    return expand_table_files(patterns, what, PromptDataError)


def read_rows(path: Path) -> list[dict]:
    if path.name.endswith(PARQUET):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's own error, restated with the file
            raise PromptDataError(f"{path}: not a readable Parquet file ({e})") from None
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PromptDataError(f"{path} line {number}: not JSON ({e.msg}): one JSON object per line") \
                        from None
    return rows


def _prompt(value: Any, path: Path, row: int, column: str) -> Any:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise PromptDataError(f"{path} row {row}: {column}={value!r} is neither text nor a list of chat messages "
                          "({'role': ..., 'content': ...}); fix the row or name another prompts.prompt_column")


def read_prompts(cfg: PromptConfig, files: list[Path]) -> list[Prompt]:
    """Every record of ``files``, checked (see the module docstring)."""
    out = []
    for path in files:
        rows = read_rows(path)
        if not rows:
            raise PromptDataError(f"{path} holds no rows: give a file with prompts, or leave it out")
        for column in (cfg.prompt_column, cfg.answer_column, *cfg.extra_columns):
            if column not in rows[0]:
                raise PromptDataError(f"{path} has no column {column!r} (it has {sorted(rows[0])}): name the right "
                                      "one in prompts.prompt_column / answer_column / extra_columns")
        for i, row in enumerate(rows):
            truth = row.get(cfg.answer_column)
            if truth is None or not str(truth).strip():
                raise PromptDataError(f"{path} row {i}: {cfg.answer_column} is empty: every prompt needs its ground "
                                      "truth for the reward")
            out.append(Prompt(_prompt(row.get(cfg.prompt_column), path, i, cfg.prompt_column), str(truth),
                              str(row.get(cfg.data_source_column) or path.stem),
                              {c: row.get(c) for c in cfg.extra_columns}))
    return out


def digest(records: list[Prompt]) -> str:
    """A fingerprint of the records (content, order): what a checkpoint's stream position refers to."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt, r.ground_truth, r.data_source, r.extra], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class PromptSet:
    train: list[Prompt]
    held_out: list[Prompt]
    seed: int = 0  # prompts.seed: the stream's order (and the eval_fraction split) follow it

    @property
    def digest(self) -> str:
        """The records and the seed: a stream position means the same prompt only under both (seed 0 adds
        nothing, so digests of runs from before the seed counted stay as they were)."""
        records = digest(self.train + self.held_out)
        return hashlib.sha256(f"{records}:{self.seed}".encode()).hexdigest()[:16] if self.seed else records


def load_prompt_set(cfg: PromptConfig) -> PromptSet:
    """The training and held-out records of ``cfg.files`` (driver side; raises PromptDataError)."""
    records = read_prompts(cfg, expand(cfg.files, "prompts.files"))
    if cfg.eval_files:
        held = read_prompts(cfg, expand(cfg.eval_files, "prompts.eval_files"))
        trained = {_key(r) for r in records}
        both = [r for r in held if _key(r) in trained]
        if both:
            raise PromptDataError(f"prompts.eval_files: {len(both)} of the {len(held)} held-out prompts are also in "
                                  f"prompts.files (the first: {both[0].prompt!r}); a held-out split is never trained: "
                                  "remove them from one of the two")
    elif cfg.eval_fraction:
        order = list(range(len(records)))
        random.Random(f"held-out:{cfg.seed}").shuffle(order)
        cut = max(1, int(len(records) * cfg.eval_fraction))
        held_ids = set(order[:cut])
        held = [records[i] for i in sorted(held_ids)]
        out = {_key(r) for r in held}  # a prompt the files hold twice is held out with all its copies
        records = [r for i, r in enumerate(records) if i not in held_ids and _key(r) not in out]
    else:
        held = []
    if not records:
        raise PromptDataError("prompts.files: no prompt is left for training after the held-out split")
    return PromptSet(records, held, cfg.seed)


def _key(record: Prompt) -> str:
    """What makes two records the same prompt (whatever their ground truth)."""
    return json.dumps(record.prompt, sort_keys=True)


class PromptStream:
    """Prompt ``i`` of the run (see the module docstring): records in a fresh seeded order every epoch."""

    def __init__(self, records: list[Prompt], seed: int):
        self.records, self.seed, self._orders = records, seed, {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            ids = list(range(len(self.records)))
            random.Random(f"stream:{self.seed}:{epoch}").shuffle(ids)
            self._orders = {epoch: ids}  # one epoch at a time is enough: the cursor moves forward
        return self._orders[epoch]

    def __getitem__(self, i: int) -> Prompt:
        epoch, at = divmod(i, len(self.records))
        return self.records[self.order(epoch)[at]]
