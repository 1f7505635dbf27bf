"""Checkpoints on a storage location (storage_location.py): committed by a marker written last.

    STORAGE/checkpoints/step_00000040/   .metadata  __0_0.distcp ... rng/rank0.pt ... meta.json (last)

Object stores have no rename, so a checkpoint is uploaded file by file into its final folder and
counts as committed only once its ``meta.json`` exists; that object is written after every other file
is complete. A process killed mid-upload leaves a folder without ``meta.json``: listings skip it, the
previous checkpoint stays the latest, and the next save of that step first removes the torn files.
Pruning deletes the marker first, so a reader never sees a marker whose files are gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist
from plait.runtime.checkpoint_check import STEP_DIR, CheckpointNotFound, CorruptCheckpointError, dcp_files_problem
from plait.runtime.storage_location import StorageLocation

MARKER = "meta.json"
RECORD = "run.json"
# The run's own files (not checkpoints, not earlier runs) that the storage location mirrors.
RUN_FILES = ("run.json", "spec.json", "plait.log", "metrics.jsonl", "metrics.png", "summary.json", "tensorboard",
             "outputs")  # outputs/: what a job makes for the user (an exported model, predictions)
log = logging.getLogger("plait")


def stored_checkpoints(loc: StorageLocation) -> list[str]:
    """Names of the checkpoints committed in ``loc`` (its ``meta.json`` exists), oldest first."""
    return [name for name in loc.entries() if STEP_DIR.match(name) and loc.is_file(f"{name}/{MARKER}")]


def torn_checkpoints(loc: StorageLocation) -> list[str]:
    """``step_*`` folders in ``loc`` without ``meta.json``: an upload that never finished."""
    return [name for name in loc.entries() if STEP_DIR.match(name) and not loc.is_file(f"{name}/{MARKER}")]


def latest_stored(loc: StorageLocation) -> str | None:
    done = stored_checkpoints(loc)
    newest = done[-1] if done else None
    skipped = [n for n in torn_checkpoints(loc) if newest is None or n > newest]
    if skipped:
        log.warning("latest checkpoint in %s: skipping %s (no meta.json: an upload that never finished); using %s",
                    loc, ", ".join(skipped), newest or "none")
    return newest


def check_stored(loc: StorageLocation) -> dict:
    """Check, without downloading tensors, that ``loc`` is a committed readable checkpoint; its meta.json.
    Raises CheckpointNotFound or CorruptCheckpointError as check_committed does for a local folder."""
    parent = loc.parent()
    if not loc.is_file(MARKER):
        what = "does not exist" if not loc.exists() else "is not a committed checkpoint (no meta.json)"
        listing = [f"{parent}/{n}" for n in stored_checkpoints(parent)]
        raise CheckpointNotFound(f"checkpoint {loc} {what}; committed checkpoints in {parent}: "
                                 f"{', '.join(listing) or 'none'}")
    try:
        meta = json.loads(loc.read_bytes(MARKER))
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"checkpoint {loc}: meta.json is unreadable ({e})") from None
    sizes = loc.files()
    if any(name.startswith("zero/") for name in sizes):
        return meta  # DeepSpeed's own layout; DeepSpeed checks its files when it loads them
    with tempfile.TemporaryDirectory(prefix="plait-check-") as tmp:
        if ".metadata" in sizes:
            with open(Path(tmp) / ".metadata", "wb") as f:
                f.write(loc.read_bytes(".metadata"))
        problem = dcp_files_problem(Path(tmp), sizes)
    if problem:
        raise CorruptCheckpointError(f"checkpoint {loc}{problem}")
    return meta


def fetch_checkpoint(loc: StorageLocation, local: Path) -> Path:
    """Download the committed checkpoint ``loc`` to the local folder ``local`` (into a temporary folder
    beside it, then renamed into place); a local copy with the same meta.json is kept as it is."""
    local = Path(local)
    marker = loc.read_bytes(MARKER)
    if (local / MARKER).is_file() and (local / MARKER).read_bytes() == marker:
        return local
    tmp = local.with_name(f".{local.name}.fetch-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    loc.download_tree("", tmp)
    old = local.with_name(f".{local.name}.old-{os.getpid()}")
    if local.exists():
        os.rename(local, old)
    os.rename(tmp, local)
    shutil.rmtree(old, ignore_errors=True)
    return local


def prune_stored(loc: StorageLocation, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` committed checkpoints (each marker first)."""
    for name in stored_checkpoints(loc)[:-keep_last]:
        loc.delete_tree(name, first=(MARKER,))


def run_storage(run_dir: Path) -> StorageLocation | None:
    """The storage location a run directory's ``run.json`` names (written by ``RunDir.start``), or None."""
    try:
        uri = json.loads((Path(run_dir) / RECORD).read_text()).get("storage")
    except (OSError, ValueError, AttributeError):
        return None
    return StorageLocation.parse(uri) if uri else None


def upload_run_files(run_dir: Path, loc: StorageLocation, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Copy the run's own files (``names`` that exist in ``run_dir``) to ``loc``; returns those copied."""
    done = []
    for name in names:
        path = Path(run_dir) / name
        if path.is_symlink() or not path.exists():
            continue
        if path.is_dir():
            loc.upload_tree(path, name)
        else:
            loc.upload_file(path, name)
        done.append(name)
    return done


def upload_staged(loc: StorageLocation, staged: Path, name: str) -> None:
    """Collective: the files of the staged checkpoint folder ``staged`` go to ``loc/name/``, spread over
    the ranks (all see ``staged``). Rank 0 first removes what an earlier attempt left of ``name`` there
    (marker first) and lists the files. ``meta.json`` is not among them: the caller writes it last."""
    listing, error = [None], None
    if _rank() == 0:
        try:
            loc.delete_tree(name, first=(MARKER,))
            listing = [sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*")
                              if p.is_file() and p.name != MARKER)]
        except Exception as e:  # noqa: BLE001 - every rank must learn of it
            error = e
    agree(error, f"preparing the upload of {name} to {loc}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(listing, src=0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    error = None
    try:
        for rel in listing[0][_rank()::world]:
            loc.upload_file(staged / rel, f"{name}/{rel}")
    except Exception as e:  # noqa: BLE001
        error = e
    agree(error, f"uploading checkpoint {name} to {loc}")


def agree(error: BaseException | None, what: str) -> None:
    """Collective, in place of a barrier: every rank learns whether any rank failed ``what``; the failing
    rank re-raises its own error, the others raise one naming the rank and its error."""
    errors = [None if error is None else f"{type(error).__name__}: {error}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank}: {message}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
