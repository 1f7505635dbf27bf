"""Distributed checkpoints that commit atomically and reshard on load.

Layout under ``root``::

    step_00000040/          a committed checkpoint (torch.distributed.checkpoint files,
        .metadata, *.distcp   one rng/rankN.pt per rank, meta.json written last by rank 0)
    .step_00000050.tmp/     a checkpoint being written; never read

Every rank writes into the temporary folder; after a barrier rank 0 writes ``meta.json`` and renames
the folder into place, so a crash mid-write leaves the previous checkpoint the latest one. Model and
optimizer go through ``get_state_dict``/``set_state_dict`` (DDP, FSDP2, TP and pipeline stages alike),
so a checkpoint saved under one parallel plan loads under another. The rename commit assumes all
ranks see one filesystem (one node, or a shared mount on a cluster).

With a storage location (a run's ``storage``, or ``Checkpointer(storage=...)``) ``root`` is the local
staging folder: the ranks upload the staged files, then rank 0 commits locally and writes ``meta.json``
on the storage side last (checkpoint_store.py), so there too a kill mid-upload leaves the previous
checkpoint the latest one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from plait.runtime.checkpoint_check import (  # noqa: F401 - re-exported: the checkpoint API is this module's
    STEP_DIR,
    CheckpointNotFound,
    CorruptCheckpointError,
    check_committed,
    committed_in,
    dcp_files_problem,
    earlier_hint,
    first_line,
    saved_plan,
    uncommitted_in,
)
from plait.runtime.checkpoint_store import (
    agree,
    fetch_checkpoint,
    latest_stored,
    prune_stored,
    run_storage,
    stored_checkpoints,
    upload_run_files,
    upload_staged,
)
from plait.runtime.storage_location import StorageLocation
from plait.storage.folders import fsync_path
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger("plait")


class ModelOptimizer(Stateful):
    """Model parts + their optimizers as one FQN-keyed state dict, the plan-independent form DCP reshards.

    A rank may hold several model parts (pipeline stages), each with its own optimizer, as in
    torchtitan; flattened optimizer state ("state.<fqn>.exp_avg") merges across parts without clashes.
    """

    OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, models: Any, optimizers: Any = None):
        self.models = list(models) if isinstance(models, (list, tuple)) else [models]
        if optimizers is None:
            self.optimizers = [None] * len(self.models)
        else:
            self.optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
        if len(self.optimizers) != len(self.models):
            raise ValueError(f"{len(self.models)} model parts but {len(self.optimizers)} optimizers: pass one each")

    def _part(self, model: torch.nn.Module, optimizer: Any) -> tuple[dict, dict]:
        return get_state_dict(model, () if optimizer is None else optimizer, options=self.OPTIONS)

    def state_dict(self) -> dict:
        merged: dict[str, dict] = {"model": {}, "optim": {}}
        for model, optimizer in zip(self.models, self.optimizers, strict=True):
            model_sd, optim_sd = self._part(model, optimizer)
            merged["model"].update(model_sd)
            merged["optim"].update(optim_sd)
        return merged

    def save_to(self, path: Path) -> None:
        dcp.save({"app": self}, checkpoint_id=str(path))

    def load_from(self, path: Path) -> None:
        if (Path(path) / "zero").is_dir():
            raise ValueError(f"{path} holds DeepSpeed ZeRO files, not a DCP checkpoint: resume it with the ZeRO "
                             f"engine it was saved under ({saved_plan(path)})")
        try:
            dcp.load({"app": self}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # DCP wraps every rank's traceback: name the folder
            raise CorruptCheckpointError(
                f"checkpoint {path} could not be loaded ({type(e).__name__}: {first_line(e)}); it is corrupt or "
                f"was saved for another model. {earlier_hint(Path(path))}") from None

    def load_state_dict(self, state: dict) -> None:
        for model, optimizer in zip(self.models, self.optimizers, strict=True):
            model_keys, optim_keys = (set(sd) for sd in self._part(model, optimizer))
            set_state_dict(
                model, () if optimizer is None else optimizer,
                model_state_dict={k: v for k, v in state["model"].items() if k in model_keys},
                optim_state_dict={k: v for k, v in state["optim"].items() if k in optim_keys},
                options=self.OPTIONS,
            )


class EngineState:
    """A DeepSpeed engine checkpoints itself (ZeRO partitions, fp32 masters, optimizer) into the
    temporary folder; the commit is still Plait's rename. Loads only under the same ZeRO world size.

    DeepSpeed reads its files with torch.load(weights_only=False), so only checkpoints under the run's
    own checkpoint folder (``trusted_root``) are loaded: never a folder from elsewhere."""

    def __init__(self, engine: Any, trusted_root: str | Path | None = None):
        self.engine, self.trusted_root = engine, trusted_root

    def save_to(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag="zero", save_latest=False)

    def load_from(self, path: Path) -> None:
        if not (path / "zero").is_dir():
            raise ValueError(f"{path} was not saved by a DeepSpeed ZeRO engine (no zero/ folder): resume it "
                             f"under the engine it was saved with ({saved_plan(path)})")
        root = None if self.trusted_root is None else Path(self.trusted_root).resolve()
        if root is None or not Path(path).resolve().is_relative_to(root):
            raise ValueError(f"refusing to load ZeRO checkpoint {path}: DeepSpeed unpickles its files, so Plait "
                             f"loads ZeRO checkpoints only from this run directory's own folders ({root})")
        self.engine.load_checkpoint(str(path), tag="zero")


def _as_state(model: Any, optimizer: Any) -> Any:
    return model if isinstance(model, (ModelOptimizer, EngineState)) else ModelOptimizer(model, optimizer)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """``run_id`` (the runtime's ``ctx.run_id``) goes into every meta.json, so a restart can tell this
    run's checkpoints from those of an earlier run it continued.

    ``storage``: a folder or URI (or StorageLocation) that mirrors ``root`` where checkpoints persist
    (checkpoint_store.py); "" for none; by default (None) the run's own, named in ``run.json`` beside
    ``root`` (written by the runtime from the spec's ``storage``), else none. With storage, a save stages
    the checkpoint in ``root``, the ranks upload its files in parallel, and rank 0 writes ``meta.json``
    there last: only then is it committed on the storage side. The ranks must see one ``root`` (one node,
    or a shared mount)."""

    def __init__(self, root: str | Path, keep_last: int = 3, run_id: str = "",
                 storage: StorageLocation | str | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: keep at least one checkpoint")
        self.root, self.keep_last, self.run_id = Path(root), keep_last, run_id
        self.run_storage = run_storage(self.root.parent) if storage is None else None
        if storage is None:
            self.storage = self.run_storage.child(self.root.name) if self.run_storage else None
        elif isinstance(storage, StorageLocation):
            self.storage = storage
        else:
            self.storage = StorageLocation.parse(storage) if str(storage) else None

    def committed(self) -> list[Path]:
        """Committed checkpoints in the local ``root``, oldest first (a folder counts once its meta.json exists)."""
        return committed_in(self.root)

    def latest(self) -> Path | None:
        """The newest committed checkpoint in ``root``; ``step_*`` folders without meta.json are skipped and named."""
        done = self.committed()
        newest = done[-1] if done else None
        skipped = [p for p in uncommitted_in(self.root) if newest is None or p.name > newest.name]
        if skipped:
            log.warning("latest checkpoint: skipping %s (no meta.json: never committed, e.g. torn or copied by "
                        "hand); using %s", ", ".join(str(p) for p in skipped), newest or "none")
        return newest

    def stored(self) -> list[str]:
        """Names of the checkpoints committed on the storage location, oldest first (none without storage)."""
        return stored_checkpoints(self.storage) if self.storage is not None else []

    def save(self, step: int, model: Any, optimizer: Any = None, meta: dict | None = None) -> Path:
        """Collective: every rank calls it with the same step. ``model``/``optimizer``: one or a list
        (or a ready ModelOptimizer / EngineState as ``model``)."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a torn attempt at this step
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        _as_state(model, optimizer).save_to(tmp)
        rng_file = tmp / "rng" / f"rank{_rank()}.pt"
        with open(rng_file, "wb") as f:
            torch.save(rng_state(), f)
            f.flush()
            os.fsync(f.fileno())
        _barrier()
        if self.storage is not None:
            upload_staged(self.storage, tmp, final.name)
        error = None
        if _rank() == 0:
            try:
                self._commit(tmp, final, step, meta)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, not wait at a barrier
                error = e
        agree(error, f"committing checkpoint {final}")
        if _rank() == 0 and self.run_storage is not None:
            self._sync_run_files()
        return final

    def _commit(self, tmp: Path, final: Path, step: int, meta: dict | None) -> None:
        """Rank 0: meta.json, the local rename, then (with storage) the marker upload, written last."""
        info = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "run_id": self.run_id}
        info.update(meta or {})
        with open(tmp / "meta.json", "w") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = self.root / f".{final.name}.old"
        if final.exists():  # re-saving a step after a restart: the old copy stays until the new one is in
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)
        for old in self.committed()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if self.storage is not None:
            self.storage.write_marker(f"{final.name}/meta.json", (final / "meta.json").read_bytes())
            prune_stored(self.storage, self.keep_last)

    def _sync_run_files(self) -> None:
        try:
            upload_run_files(self.root.parent, self.run_storage)
        except Exception as e:  # noqa: BLE001 - the checkpoint is committed; the end of the run tries again
            log.warning("copying the run's metrics and logs to %s failed (%s: %s); retried at the end of the run",
                        self.run_storage, type(e).__name__, e)

    def fetch(self, name: str) -> Path:
        """Rank-local: the checkpoint ``name`` committed on the storage location, downloaded into ``root``
        (a local copy with the same meta.json is used as it is)."""
        if self.storage is None:
            raise ValueError(f"fetch({name!r}): this Checkpointer has no storage location")
        return fetch_checkpoint(self.storage.child(name), self.root / name)

    def resolve(self, which: str | Path) -> Path | None:
        """'latest' -> newest committed checkpoint (None if none); a path -> that checkpoint (checked).
        With storage, 'latest' is the storage side's newest, downloaded into ``root``, and a path in
        ``root`` that is missing locally is downloaded from there. Collective when torch.distributed is
        up: rank 0 chooses (and downloads) and broadcasts its choice, so ranks cannot disagree."""
        if str(which) == "latest" or self._missing_here(which):
            choice, error = [None], None
            if _rank() == 0:
                try:
                    chosen = self._choose(which)
                    choice = [str(chosen) if chosen else None]
                except Exception as e:  # noqa: BLE001
                    error = e
            agree(error, f"finding checkpoint {which}")
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(choice, src=0)
            return Path(choice[0]) if choice[0] else None
        check_committed(which)
        return Path(which)

    def _missing_here(self, which: str | Path) -> bool:
        path = Path(which)
        return self.storage is not None and path.parent == self.root and not (path / "meta.json").is_file()

    def _choose(self, which: str | Path) -> Path | None:
        if self.storage is None:
            return self.latest()
        name = latest_stored(self.storage) if str(which) == "latest" else Path(which).name
        return self.fetch(name) if name else None

    def load(self, which: str | Path, model: Any, optimizer: Any = None) -> dict | None:
        """Collective. Restores model, optimizer and this rank's RNG; returns meta.json (None: nothing)."""
        path = self.resolve(which)
        if path is None:
            return None
        _as_state(model, optimizer).load_from(path)
        rng_file = path / "rng" / f"rank{_rank()}.pt"
        if rng_file.is_file():  # absent when resuming on more ranks than saved: RNG stays as seeded
            set_rng_state(torch.load(rng_file, weights_only=True))
        return json.loads((path / "meta.json").read_text())

