"""Which checkpoint folders are committed, and whether one is readable, without loading tensors.

A folder ``step_NNNNNNNN`` counts once its ``meta.json`` exists (rank 0 writes it last). ``check_committed``
also reads the DCP ``.metadata`` and checks every data file is present and long enough, so a truncated or
garbled checkpoint is named (folder, file, the previous committed checkpoint to use) before a job starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch.distributed.checkpoint as dcp

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CorruptCheckpointError(RuntimeError):
    """A committed checkpoint cannot be read; the message names the folder, the file and what to resume
    from instead. Never worth a restart: loading it again fails the same way."""

    transient = False
    user_error = True  # one line, exit 2: the message says which checkpoint to use instead


class CheckpointNotFound(FileNotFoundError):
    """A resume path that is not a committed checkpoint; the message lists the committed ones."""

    transient = False
    user_error = True


def saved_plan(path: Path) -> str:
    try:
        return "plan " + json.loads((Path(path) / "meta.json").read_text()).get("plan", "?")
    except (OSError, ValueError):
        return "plan unknown"


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def earlier_hint(path: Path) -> str:
    """'Resume from <the committed checkpoint before path>' or a note that there is none."""
    earlier = [p for p in committed_in(path.parent) if p.name < path.name]
    if earlier:
        return f"Resume from the previous committed checkpoint instead: train.resume={earlier[-1]}"
    return "No earlier committed checkpoint exists beside it: start fresh (train.resume=\"\")"


def committed_in(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first (a folder counts only once its meta.json exists)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()),
                  key=lambda p: p.name)


def uncommitted_in(root: Path) -> list[Path]:
    """``step_*`` folders without meta.json: renamed into place by hand or by another tool, never committed."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and not (p / "meta.json").is_file())


def check_committed(path: str | Path) -> dict:
    """Check, without loading tensors, that ``path`` is a readable committed checkpoint; return its meta.json.

    Raises CheckpointNotFound (no such folder, or no meta.json) or CorruptCheckpointError (meta.json
    unreadable, DCP metadata unreadable, a data file missing or shorter than the metadata says)."""
    path = Path(path)
    if not path.is_dir() or not (path / "meta.json").is_file():
        what = "does not exist" if not path.exists() else "is not a committed checkpoint (no meta.json)"
        listing = [str(p) for p in committed_in(path.parent)] if path.parent.is_dir() else []
        raise CheckpointNotFound(f"checkpoint {path} {what}; committed checkpoints in {path.parent}: "
                                 f"{', '.join(listing) or 'none'}")
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"checkpoint {path}: meta.json is unreadable ({e}). {earlier_hint(path)}") \
            from None
    if (path / "zero").is_dir():
        return meta  # DeepSpeed's own layout; DeepSpeed checks its files when it loads them
    _check_dcp_files(path)
    return meta


def _check_dcp_files(path: Path) -> None:
    sizes = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    problem = dcp_files_problem(path, sizes)
    if problem:
        raise CorruptCheckpointError(f"checkpoint {path}{problem}. {earlier_hint(path)}")


def dcp_files_problem(metadata_dir: Path, sizes: dict[str, int]) -> str:
    """What is wrong with a DCP checkpoint whose ``.metadata`` is in ``metadata_dir`` and whose files have
    ``sizes`` (relative path -> bytes; a local folder or a storage location): "" when nothing is, else the
    words that follow "checkpoint PATH" in an error message."""
    if ".metadata" not in sizes:
        return ": file .metadata is missing"
    try:
        metadata = dcp.FileSystemReader(str(metadata_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same thing to the user
        return f": file .metadata is corrupt ({type(e).__name__}: {first_line(e)})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        size = sizes.get(name, -1)
        if size < end:
            state = "is missing" if size < 0 else f"is truncated ({size} bytes, the metadata needs {end})"
            return f" is corrupt: file {name} {state}"
    return ""
