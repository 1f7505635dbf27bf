"""Text for the text-dataset tests: documents cut from Python's own standard library and a tiny BPE tokenizer
trained on them at test time (nothing downloaded)."""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

EOS = "<|endoftext|>"
STDLIB_FILES = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py")


def stdlib_documents() -> list[str]:
    """The blank-line separated blocks of a few standard-library files: ~150 documents of varied length, most
    shorter than a test row, some far longer."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in STDLIB_FILES:
        docs += [d for d in re.split(r"\n\n+", (root / name).read_text()) if d.strip()]
    return docs


def train_tokenizer(folder: Path, texts: list[str], vocab_size: int = 300, special: tuple[str, ...] = (EOS,),
                    config: dict | None = None) -> Path:
    """A byte-level BPE tokenizer.json (vocabulary ``vocab_size``) in ``folder``, with ``config`` written as
    its tokenizer_config.json when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


def write_parquet(file: Path, texts: list[str], column: str = "text", row_group_size: int = 8) -> Path:
    """``texts`` as a Parquet file in row groups of ``row_group_size`` (so readers meet several batches)."""
    pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), file, row_group_size=row_group_size)
    return file


def write_jsonl(file: Path, texts: list[str], column: str = "text") -> Path:
    file.write_text("".join(json.dumps({column: t, "source": "stdlib"}) + "\n" for t in texts))
    return file
