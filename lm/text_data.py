"""Your own text: local Parquet / JSONL files, tokenised locally, packed into fixed rows with documents kept.

    cfg = TextDataConfig(files=["corpus/*.parquet"], tokenizer="models/my-llama", seq_len=2048)
    shards = ensure_text_dataset(cfg, Path("data/my-corpus"))      # on the driver: build once, then reuse
    batches = TextBatches(shards, global_batch=32, seed=0)          # on each rank
    inputs, targets = batches.batch(step, dp_rank, dp_size)         # model(**inputs).logits vs targets

Each input file is read in bounded memory (Parquet by record batches of the text column, JSONL line by
line), in the order given (globs expand sorted); each non-empty text is a document, tokenised with the
``tokenizers`` library from a local tokenizer.json (nothing is downloaded) and followed by the end-of-text
token. The token stream is cut into rows of ``seq_len + 1`` tokens (every token once, in order; the last
partial row is dropped), each stored with the document index of every token (``text_batches`` turns them
into targets, position ids and a block-diagonal mask). Rows stream through a temporary file beside the
dataset into Parquet row shards (``storage/row_shards.py``), committed atomically with a manifest whose
``meta`` records the recipe: each input file's path, size and mtime, the tokenizer file's SHA-256, the
end-of-text id, text column and seq_len. A folder of another recipe (an input file changed) or of someone
else's files is refused before anything is written; ``rebuild=true`` replaces a Plait dataset, never a
foreign folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from plait.lm.data import DatasetError, reuse_or_refuse
from plait.lm.pair_rows import pack_pairs
from plait.lm.text_batches import PAIRS, TEXT, TextBatches, recipe_digest, split_rows  # noqa: F401 (re-exported)
from plait.runtime.config import ConfigError
from plait.storage.row_shards import (
    CorruptDataError,
    RowShards,
    dataset_lock,
    is_row_shards,
    read_manifest,
    replace_row_shards,
)
from plait.storage.table_files import JSONL, PARQUET, expand_table_files  # noqa: F401
from tqdm import tqdm

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
GROUP_BYTES, SHARD_BYTES, CACHE_BYTES = 256 << 10, 64 << 20, 256 << 20  # row group, shard, reader cache sizes


@dataclass
class TextDataConfig:
    files: list[str] = field(default_factory=list)  # Parquet (.parquet/.pq) or JSONL (.jsonl/.ndjson); globs ok
    text_column: str = "text"  # the text; with prompt_column, the completion
    prompt_column: str = ""  # set: prompt / completion pairs, loss on the completion only (see lm/pair_rows.py)
    tokenizer: str = ""  # a tokenizer.json, or a model folder holding one
    seq_len: int = 1024
    doc_mask: bool = True  # attention stays inside each document (a block-diagonal mask, restarting positions)
    rebuild: bool = False  # replace a Plait dataset of another recipe (or a corrupt one); never other files

    def check(self) -> None:
        if not isinstance(self.files, list) or not self.files or not all(isinstance(f, str) and f for f in self.files):
            raise ConfigError(f"data.files={self.files!r}: give a list of local Parquet or JSONL files (paths or "
                              "globs), e.g. data.files=['corpus/*.parquet']")
        if not isinstance(self.text_column, str) or not self.text_column:
            raise ConfigError(f"data.text_column={self.text_column!r}: name the column (JSONL key) holding the text")
        if not isinstance(self.prompt_column, str) or self.prompt_column == self.text_column:
            raise ConfigError(f"data.prompt_column={self.prompt_column!r}: name the column (JSONL key) holding the "
                              f"prompt, other than data.text_column={self.text_column!r} (the completion), or leave it "
                              "empty for plain text")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError(f"data.tokenizer={self.tokenizer!r}: give the path of a tokenizer.json or of a model "
                              "folder holding one (e.g. the folder the model is loaded from)")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"data.seq_len={self.seq_len!r}: must be an integer >= 1 (tokens per training sequence)")


def input_files(cfg: TextDataConfig) -> list[Path]:
    """The input files, globs expanded (sorted), each checked to exist and to have a known suffix."""
    return expand_table_files(cfg.files, "data.files", ConfigError)


def tokenizer_file(cfg: TextDataConfig) -> Path:
    path = Path(cfg.tokenizer).absolute()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"data.tokenizer={cfg.tokenizer!r}: {file} not found; give a tokenizer.json or a model "
                          "folder holding one (a model saved with save_pretrained has it)")
    return file


def end_of_text_id(tok, file: Path) -> int:
    """The end-of-text token of tokenizer ``tok`` (loaded from ``file``): tokenizer_config.json's eos_token,
    else config.json's eos_token_id, else a special token with a well-known end-of-text name."""
    folder, wanted = file.parent, None
    conf = folder / "tokenizer_config.json"
    if conf.is_file():
        eos = json.loads(conf.read_text()).get("eos_token")
        wanted = eos.get("content") if isinstance(eos, dict) else eos
    if wanted is not None:
        if (i := tok.token_to_id(wanted)) is None:
            raise ConfigError(f"{conf} names eos_token={wanted!r}, which {file} does not hold; fix one of them")
        return i
    if (model_conf := folder / "config.json").is_file():
        eos_id = json.loads(model_conf.read_text()).get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
        if isinstance(eos_id, int):
            return eos_id
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for name in EOS_NAMES:
        if name in special:
            return special[name]
    raise ConfigError(f"data.tokenizer: cannot tell the end-of-text token of {file}: no tokenizer_config.json with "
                      f"eos_token beside it, no eos_token_id in a config.json, and none of its special tokens "
                      f"({', '.join(sorted(special)) or 'none'}) is a known end-of-text name ({', '.join(EOS_NAMES)}). "
                      f"Write {conf} holding {{\"eos_token\": \"<the token>\"}}.")


def file_details(files: list[Path]) -> list[dict]:
    return [{"file": str(f), "bytes": (s := f.stat()).st_size, "mtime_ns": s.st_mtime_ns} for f in files]


def text_recipe(cfg: TextDataConfig, files: list[dict], tokenizer: Path, eos_id: int) -> dict:
    """What a text dataset is made from: stored in its manifest's ``meta``, compared before reuse."""
    recipe = {"text": PAIRS if cfg.prompt_column else TEXT,
              "sources": hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16],
              "tokenizer": hashlib.sha256(tokenizer.read_bytes()).hexdigest()[:16], "eos_id": eos_id,
              "text_column": cfg.text_column, "seq_len": cfg.seq_len}
    return {**recipe, "prompt_column": cfg.prompt_column} if cfg.prompt_column else recipe


def read_texts(file: Path, column: str, batch: int) -> Iterator[tuple[list[str], int]]:
    """Lists of at most ``batch`` non-empty texts of ``file``, each with the input bytes it accounts for."""
    for rows, size in read_columns(file, [column], batch):
        yield [r[0] for r in rows], size


def read_columns(file: Path, columns: list[str], batch: int) -> Iterator[tuple[list[tuple[str, ...]], int]]:
    """Lists of at most ``batch`` rows of ``file``'s text ``columns`` (rows whose texts are all empty left out),
    each list with the input bytes it accounts for. ``columns[0]`` is data.text_column, a second one
    data.prompt_column (the error messages name them so)."""
    names = {columns[0]: "data.text_column", **({columns[1]: "data.prompt_column"} if len(columns) > 1 else {})}
    if file.name.endswith(PARQUET):
        reader = pq.ParquetFile(file)
        for column, setting in names.items():
            if column not in reader.schema_arrow.names:
                raise ConfigError(f"{setting}={column!r}: {file} has no such column (it has "
                                  f"{', '.join(reader.schema_arrow.names)})")
            kind = reader.schema_arrow.field(column).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
                raise ConfigError(f"{setting}={column!r}: {file} stores it as {kind}, not text")
        per_row = file.stat().st_size / max(1, reader.metadata.num_rows)
        for rb in reader.iter_batches(batch_size=batch, columns=columns):
            cols = [rb.column(c).to_pylist() for c in columns]
            yield [r for r in zip(*cols, strict=True) if any(r)], round(per_row * rb.num_rows)
        return
    rows, size = [], 0
    with open(file, "rb") as f:
        for n, line in enumerate(f, 1):
            size += len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                row = tuple(obj[c] for c in columns)
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
                keys = " and ".join(repr(c) for c in columns)
                raise ConfigError(f"{file}:{n} is not a JSON object with {keys} key(s) ({type(e).__name__}: "
                                  f"{e}); fix the line or set {' / '.join(names.values())}") from None
            for column, text in zip(columns, row, strict=True):
                if not isinstance(text, str):
                    raise ConfigError(f"{file}:{n}: {column!r} holds a {type(text).__name__}, not text")
            if any(row):
                rows.append(row)
            if len(rows) >= batch:
                yield rows, size
                rows, size = [], 0
    yield rows, size


class RowPacker:
    """Cuts a stream of documents into rows of ``width`` tokens plus their document indices, appending
    finished rows as int32 to an open binary file; keeps fewer than ``width`` tokens between calls."""

    def __init__(self, out, width: int):
        self.out, self.width = out, width
        self.tokens, self.docs = np.empty(0, np.int32), np.empty(0, np.int32)
        self.documents = self.total = self.rows = 0

    def add(self, documents: list[list[int]]) -> None:
        lengths = np.array([len(d) for d in documents], dtype=np.int64)
        if not len(documents):
            return
        tokens = np.concatenate([self.tokens, np.fromiter((t for d in documents for t in d), np.int32, lengths.sum())])
        doc_ids = (np.arange(self.documents, self.documents + len(documents)) % (1 << 31)).astype(np.int32)
        docs = np.concatenate([self.docs, np.repeat(doc_ids, lengths)])
        self.documents, self.total = self.documents + len(documents), self.total + int(lengths.sum())
        n = len(tokens) // self.width
        if n:
            rows = np.concatenate([tokens[: n * self.width].reshape(n, -1), docs[: n * self.width].reshape(n, -1)], 1)
            self.out.write(rows.tobytes())
            self.rows += n
        self.tokens, self.docs = tokens[n * self.width :], docs[n * self.width :]


def pack_texts(cfg: TextDataConfig, files: list[Path], tok, eos_id: int, out, batch: int) -> RowPacker:
    """Tokenise the texts of ``files`` with ``tok`` (a tokenizers.Tokenizer), packing rows into ``out``."""
    packer = RowPacker(out, cfg.seq_len + 1)
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, mininterval=1.0,
              desc="[plait] tokenising") as bar:
        for file in files:
            for texts, size in read_texts(file, cfg.text_column, batch):
                ids = [e.ids for e in tok.encode_batch(texts)] if texts else []
                packer.add([d if d and d[-1] == eos_id else [*d, eos_id] for d in ids])
                bar.update(size)
    return packer


def ensure_text_dataset(cfg: TextDataConfig, path: Path, read_batch: int = 1024) -> RowShards:
    """The verified packed text dataset of ``cfg`` at ``path``, built if missing (see the module docstring).
    Builders of one path take turns (a lock beside it); one that waited reuses what the other built.
    ``read_batch``: texts read and tokenised at a time (memory scales with it, not with the files)."""
    cfg.check()
    path, files = Path(path).absolute(), input_files(cfg)
    from tokenizers import Tokenizer

    tokenizer = tokenizer_file(cfg)
    tok = Tokenizer.from_file(str(tokenizer))
    eos_id = end_of_text_id(tok, tokenizer)
    details = file_details(files)
    recipe = text_recipe(cfg, details, tokenizer, eos_id)
    refuse_changed_inputs(path, recipe, details, cfg.rebuild)
    width = cfg.seq_len + 1
    open_kw = {"cache_rows": max(1, CACHE_BYTES // (12 * width))}
    if (shards := reuse_or_refuse(path, recipe, cfg.rebuild)) is not None:
        return RowShards(shards.path, **open_kw)
    with dataset_lock(path):
        if (shards := reuse_or_refuse(path, recipe, cfg.rebuild)) is not None:
            return RowShards(shards.path, **open_kw)
        print(f"[plait] data.path={path}: packing {len(files)} file(s) into rows of {width} tokens "
              f"(tokenizer {tokenizer}, eos id {eos_id})", flush=True)
        for stale in path.parent.glob(f"{glob.escape(path.name)}.pack-*"):
            if re.fullmatch(re.escape(path.name) + r"\.pack-\d+-\d+", stale.name) and stale.is_file():
                stale.unlink()  # left by a crashed builder (we hold the lock)
        pack = path.with_name(f"{path.name}.pack-{os.getpid()}-{threading.get_native_id()}")
        try:
            blocks = 3 if cfg.prompt_column else 2  # tokens, documents (, trained-on flags)
            with open(pack, "wb") as out:
                if cfg.prompt_column:
                    packer = pack_pairs(cfg, files, tok, eos_id, out, read_batch, read_columns)
                else:
                    packer = pack_texts(cfg, files, tok, eos_id, out, read_batch)
            if packer.rows == 0:
                raise DatasetError(f"data.files hold {packer.total} tokens in {packer.documents} documents, fewer "
                                   f"than one row of data.seq_len+1={width}: add text or lower data.seq_len")
            rows = np.memmap(pack, dtype=np.int32, mode="r", shape=(packer.rows, blocks * width))
            meta = {**recipe, "files": details, "documents": packer.documents, "tokens": packer.total}
            if cfg.prompt_column:
                meta.update(truncated=packer.truncated, skipped=packer.skipped, padding_tokens=packer.padding,
                            trained_tokens=packer.trained)
            else:
                meta.update(dropped_tokens=packer.total - packer.rows * width)
            row_bytes = 4 * blocks * width
            replace_row_shards(path, rows, rows_per_shard=max(1, SHARD_BYTES // row_bytes), meta=meta,
                               rows_per_group=min(128, max(1, GROUP_BYTES // row_bytes)))
            del rows
        finally:
            pack.unlink(missing_ok=True)
        if cfg.prompt_column:
            print(f"[plait] data.path={path}: {packer.rows} rows from {packer.documents} prompt/completion pairs "
                  f"({packer.total} tokens, {packer.trained} of them trained on, {packer.padding} padding), "
                  f"{packer.truncated} pairs longer than a row truncated, {packer.skipped} whose prompt fills a row "
                  "left out" + (" (raise train.seq_len to keep them whole)" if packer.truncated + packer.skipped
                                else ""), flush=True)
        else:
            print(f"[plait] data.path={path}: {packer.rows} rows from {packer.documents} documents "
                  f"({packer.total} tokens, {packer.total - packer.rows * width} dropped at the end)", flush=True)
    return RowShards(path, **open_kw)


def refuse_changed_inputs(path: Path, recipe: dict, details: list[dict], rebuild: bool) -> None:
    """Refuse, naming the files, when ``path`` holds a text dataset of these settings made from other inputs."""
    try:
        manifest = read_manifest(path) if path.is_dir() else None
    except (CorruptDataError, OSError):
        return  # reuse_or_refuse explains what is wrong with the folder
    meta = manifest.get("meta") if is_row_shards(manifest) and isinstance(manifest.get("meta"), dict) else {}
    if rebuild or meta.get("text") not in (TEXT, PAIRS) or meta.get("sources") == recipe["sources"]:
        return
    then = {d["file"]: d for d in meta.get("files", []) if isinstance(d, dict) and "file" in d}
    now = {d["file"]: d for d in details}
    changes = [f"{f} was added" for f in now if f not in then] + [f"{f} was removed" for f in then if f not in now]
    changes += [f"{f} changed ({then[f].get('bytes')} -> {now[f]['bytes']} bytes, mtime {then[f].get('mtime_ns')} "
                f"-> {now[f]['mtime_ns']} ns)" for f in now if f in then and then[f] != now[f]]
    if not changes:
        changes = ["the input files are listed in another order"]
    raise DatasetError(f"data.path={path} was built from other input files: {'; '.join(changes)}. Set "
                       "data.rebuild=true to rebuild it from the files as they are now (jobs reading it keep "
                       "their copy), or choose another data.path.")


def open_text_dataset(path: str | Path, digest: str, seq_len: int) -> RowShards:
    """On a rank: the dataset at ``path``, checked to be the one the driver built (``recipe_digest`` of its
    manifest), without ensure_text_dataset's input-file, tokenizer and shard checks, done once on the driver."""
    shards = RowShards(path, cache_rows=max(1, CACHE_BYTES // (12 * (seq_len + 1))))
    if recipe_digest(shards.meta) != digest:
        raise DatasetError(f"data.path={path} changed after the driver checked it (another job rebuilt it?): use a "
                           "data.path of your own")
    return shards
