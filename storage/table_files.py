"""Local table files a user names by path or glob: Parquet or JSONL, each checked to exist before anything reads it.
The one expansion the language-model text data (lm/text_data.py) and the RL prompts (rl/prompts.py) share."""

from __future__ import annotations

import glob
import os
from pathlib import Path

PARQUET, JSONL = (".parquet", ".pq"), (".jsonl", ".ndjson")


def expand_table_files(entries: list[str], what: str, error: type[Exception] = ValueError) -> list[Path]:
    """The files of ``entries`` (paths or globs, a glob's matches sorted), as absolute paths, each an existing
    file with a Parquet or JSONL suffix; otherwise ``error`` naming ``what`` (the config key), the entry and the fix."""
    out = []
    for entry in entries:
        found = sorted(glob.glob(entry)) if glob.has_magic(entry) else [entry]
        if not found:
            raise error(f"{what}: {entry!r} matches no file (relative to {os.getcwd()})")
        for name in found:
            path = Path(name).absolute()
            if not path.is_file():
                raise error(f"{what}: {path} is not a file; give local Parquet or JSONL files")
            if not path.name.endswith(PARQUET + JSONL):
                raise error(f"{what}: {path} is neither Parquet ({', '.join(PARQUET)}) nor JSONL "
                            f"({', '.join(JSONL)}); rename it or convert it")
            out.append(path)
    return out
