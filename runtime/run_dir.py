"""The run directory belongs to the runtime: one folder per job, earlier runs kept, never deleted.

    RUN_DIR/
      run.json  spec.json  plait.log  metrics.jsonl  tensorboard/  checkpoints/  summary.json ...
      earlier/20261130-195312-3f9a/     an earlier run's outputs, moved here whole by a fresh start

What a job asks of it (its ``train.resume``) is decided on the driver, before any rank starts:

    ""          a fresh run: the earlier run's outputs move under ``earlier/<its start>-<id>/``
    "latest"    continue in place from the newest committed checkpoint (none yet: start at step 0)
    a path      a fresh run that starts from that committed checkpoint (checked now; a path inside
                this run_dir follows its folder into ``earlier/``)

The move happens only once the ranks are placed (``RunDir.start``), so a launch that fails changes
nothing on disk. A restart after a crash loads this run's own newest checkpoint (``run_id`` in its
meta.json), else the checkpoint the run started from: never anything else found in the folder.

With a storage location (the spec's ``storage``: a folder or a pyarrow URI, storage_location.py) the
run directory is the local staging folder and the storage location mirrors it: ``run.json`` names it
(so the ranks' Checkpointer and MetricsLogger find it), checkpoints commit there with their marker
written last, ``publish()`` copies the run's files there. Then "latest" means the storage side's newest
committed checkpoint, a resume path may be a URI, both are checked there by the driver (nothing is
downloaded or written until ``start``), and ``start`` downloads the chosen checkpoint into the run
directory. A fresh start moves the storage side's earlier run under ``earlier/`` there too.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
from plait.runtime.checkpoint import (
    Checkpointer,
    CheckpointNotFound,
    CorruptCheckpointError,
    check_committed,
    committed_in,
)
from plait.runtime.checkpoint_store import MARKER, check_stored, fetch_checkpoint, latest_stored, upload_run_files
from plait.runtime.config import ConfigError
from plait.runtime.run_lock import LOCK
from plait.runtime.storage_location import StorageLocation, is_uri
from plait.storage.folders import write_atomic

EARLIER = "earlier"
RECORD = "run.json"
# Files a Plait run writes: a folder holding any of them is a run directory Plait made.
PLAIT_MARKERS = (RECORD, "spec.json", "plait.log", "metrics.jsonl", "checkpoints", "summary.json", EARLIER, LOCK)
STAYS = (EARLIER, LOCK)  # what a fresh start does not move under earlier/: the earlier runs, the running one's lock


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run_dir that exists with files Plait did not write: moving them aside would rewrite a
    folder that is not Plait's."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} is a file, not a folder: choose another run_dir")
    entries = sorted(p.name for p in run_dir.iterdir())
    if entries and not any(name in PLAIT_MARKERS for name in entries):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConfigError(f"run_dir {run_dir} holds files Plait did not write ({shown}); Plait never moves or "
                          "deletes a folder it did not create: choose a new or empty run_dir")


def earlier_outputs(run_dir: Path) -> list[Path]:
    """What a fresh start moves under earlier/: everything of the last run (not earlier/ itself, not the lock)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name not in STAYS)


def archive_folder(run_dir: Path) -> Path:
    """Where the last run's outputs go: earlier/<its start time>-<its id> (unique; not created here)."""
    record = _read_record(run_dir)
    name = record.get("run_id") or time.strftime("%Y%m%d-%H%M%S", time.localtime(_mtime(run_dir)))
    dest, n = run_dir / EARLIER / name, 1
    while dest.exists():
        n += 1
        dest = run_dir / EARLIER / f"{name}-{n}"
    return dest


def _mtime(run_dir: Path) -> float:
    for name in ("spec.json", "plait.log", "metrics.jsonl"):
        if (run_dir / name).exists():
            return (run_dir / name).stat().st_mtime
    return time.time()


def _read_record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class RunDir:
    """One run in its folder: what to resume from, and where the earlier run goes."""

    path: Path
    run_id: str
    resume_from: Path | None  # the checkpoint the run starts from (None: step 0)
    archive_to: Path | None  # where a fresh start moves the earlier run's outputs (None: nothing to move)
    notes: list[str] = field(default_factory=list)
    storage: StorageLocation | None = None  # where the run's outputs persist (None: the run directory only)
    fetch_from: StorageLocation | None = None  # the stored checkpoint ``start`` downloads to ``resume_from``
    storage_archive: str | None = None  # where a fresh start moves the storage side's earlier run (relative)
    started: bool = False  # ``start`` has run: the folder holds this run
    start_step: int = 0  # the step of ``resume_from`` (read when checked: the checkpoint may be pruned later)
    resume_meta: dict = field(default_factory=dict)  # the meta.json of ``resume_from`` ({}: a fresh start)

    @classmethod
    def plan(cls, run_dir: Path, resume: str, storage: str | StorageLocation | None = None) -> "RunDir":
        """Decide everything on the driver, write nothing. Raises ConfigError for a bad resume path or
        storage location."""
        run_dir = run_dir.resolve()
        check_run_dir(run_dir)
        loc = storage if isinstance(storage, StorageLocation) or storage is None else \
            StorageLocation.parse(storage) if str(storage) else None
        if loc is not None:
            _check_storage(loc)
        run_id, notes = new_run_id(), []
        if resume == "latest" and loc is not None:
            name = latest_stored(loc.child("checkpoints"))
            fetch = loc.child(f"checkpoints/{name}") if name else None
            meta = _check_stored_or_config_error(fetch) if fetch is not None else {}
            notes.append(f"continuing {loc} from {fetch}" if fetch else
                         f"train.resume=latest: no committed checkpoint in {loc.child('checkpoints')} yet, "
                         "starting at step 0")
            return cls(run_dir, run_id, run_dir / "checkpoints" / name if name else None, None, notes, loc, fetch,
                       start_step=int(meta.get("step", 0)), resume_meta=meta)
        if resume == "latest":
            latest = Checkpointer(run_dir / "checkpoints", storage="").latest()
            meta = _check_or_config_error(latest) if latest is not None else {}
            notes.append(f"continuing {run_dir} from {latest}" if latest else
                         f"train.resume=latest: no committed checkpoint in {run_dir / 'checkpoints'} yet, "
                         "starting at step 0")
            return cls(run_dir, run_id, latest, None, notes, loc, start_step=int(meta.get("step", 0)),
                       resume_meta=meta)
        start, fetch, meta = None, None, {}
        if resume and is_uri(resume) and not resume.startswith("file://"):
            fetch = StorageLocation.parse(resume)
            meta = _check_stored_or_config_error(fetch)
            if any(name.startswith("zero/") for name in fetch.files()):
                raise ConfigError(f"train.resume={fetch}: a DeepSpeed ZeRO checkpoint (DeepSpeed unpickles its files): "
                                  "Plait loads them only from the run's own storage (train.resume=\"latest\")")
            start = run_dir / "resumed" / fetch.root.rsplit("/", 1)[-1]
        elif resume:
            start = Path(resume.removeprefix("file://")).expanduser().resolve()
            meta = _check_or_config_error(start)
        archive_to = archive_folder(run_dir) if earlier_outputs(run_dir) else None
        if start is not None and fetch is None and archive_to is not None and start.is_relative_to(run_dir) \
                and not start.is_relative_to(run_dir / EARLIER):
            start = archive_to / start.relative_to(run_dir)  # the checkpoint moves with its run
        if archive_to is not None:
            notes.append(f"fresh start: the earlier run in {run_dir} is kept under {archive_to} "
                         "(train.resume=latest continues it instead)")
        storage_archive = _storage_archive(loc) if loc is not None else None
        if storage_archive is not None:
            notes.append(f"fresh start: the earlier run in {loc} is kept under {loc.child(storage_archive)}")
        return cls(run_dir, run_id, start, archive_to, notes, loc, fetch, storage_archive,
                   start_step=int(meta.get("step", 0)), resume_meta=meta)

    def start(self, job: str, attempt_note: str = "") -> None:
        """Once the ranks are placed: move the earlier run aside (here and on the storage side), record
        this one, download the checkpoint it starts from."""
        if self.archive_to is not None:
            self.archive_to.mkdir(parents=True)
            for entry in earlier_outputs(self.path):
                os.rename(entry, self.archive_to / entry.name)
            self.archive_to = None
        if self.storage_archive is not None:
            _move_stored_run(self.storage, self.storage_archive)
            self.storage_archive = None
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.run_id, "job": job, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "resume_from": str(self.resume_from) if self.resume_from else None, "start_step": self.start_step,
                  "resume_source": str(self.fetch_from) if self.fetch_from else None,  # downloaded from there
                  "storage": self.storage.uri if self.storage is not None else None}
        write_atomic(self.path / RECORD, json.dumps(record, indent=1))
        self.started = True
        if self.storage is not None:
            self.storage.upload_file(self.path / RECORD, RECORD)
        if self.fetch_from is not None:
            self.resume_from.parent.mkdir(parents=True, exist_ok=True)
            fetch_checkpoint(self.fetch_from, self.resume_from)
            self.fetch_from = None
            if not (self.path / "metrics.jsonl").exists() and self.storage is not None \
                    and self.storage.is_file("metrics.jsonl"):  # continuing on another machine: keep the history
                (self.path / "metrics.jsonl").write_bytes(self.storage.read_bytes("metrics.jsonl"))

    def publish(self) -> list[str]:
        """Copy the run's own files (run.json, spec.json, plait.log, metrics, plot, summary.json,
        tensorboard/, outputs/) to the storage location; checkpoints went there as they committed. Returns what
        was copied (nothing without storage, or before ``start``)."""
        if self.storage is None or not self.started:
            return []
        draw_plot(self.path)  # the plot lands in storage with the metrics, no `plait plot` needed
        return upload_run_files(self.path, self.storage)

    def restart_point(self) -> Path | None:
        """After a crash: this run's own newest committed checkpoint, else where the run started."""
        for path in reversed(committed_in(self.path / "checkpoints")):
            try:
                if json.loads((path / "meta.json").read_text()).get("run_id") == self.run_id:
                    return path
            except (OSError, ValueError):
                continue
        return self.resume_from


def draw_plot(path: Path) -> Path | None:
    """metrics.png from metrics.jsonl, when the run logged steps (the end of every run, on Ray, torchrun and
    mpirun alike); a plotting failure never fails the run. Returns the PNG (None: no metrics, or it failed)."""
    metrics, png = path / "metrics.jsonl", path / "metrics.png"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return None
    if png.is_file() and png.stat().st_mtime_ns >= metrics.stat().st_mtime_ns:
        return png  # drawn already from these metrics
    try:
        from plait.runtime.plot import plot_run

        return plot_run(path)
    except Exception as e:  # noqa: BLE001 - the metrics themselves are still copied
        logging.getLogger("plait").warning("drawing %s/metrics.png failed: %s", path, e)
        return None


def _check_or_config_error(path: Path) -> dict:
    """The committed checkpoint's meta.json; ConfigError when it is missing or unreadable."""
    try:
        return dict(check_committed(path))
    except (FileNotFoundError, CorruptCheckpointError) as e:
        raise ConfigError(f"train.resume: {e}") from None


def _check_stored_or_config_error(loc: StorageLocation) -> dict:
    try:
        return dict(check_stored(loc))
    except (CheckpointNotFound, CorruptCheckpointError) as e:
        raise ConfigError(f"train.resume: {e}") from None
    except OSError as e:
        raise ConfigError(f"train.resume: cannot read {loc} ({e}): check the address, the endpoint "
                          "(AWS_ENDPOINT_URL) and the credentials") from None


def _check_storage(loc: StorageLocation) -> None:
    """Refuse a storage folder holding files Plait did not write, as check_run_dir does locally."""
    try:
        top = loc.root.split("/", 1)[0]
        if not loc.is_local and loc.fs.get_file_info(top).type == pafs.FileType.NotFound:
            raise ConfigError(f"storage {loc}: bucket (or top folder) {top!r} does not exist there: create it first "
                              "(Plait never creates buckets)")
        entries = loc.entries()
    except OSError as e:
        raise ConfigError(f"storage {loc}: cannot list it ({e}): check the address, the endpoint "
                          "(AWS_ENDPOINT_URL for an S3-compatible server) and the credentials") from None
    if entries and not any(name in PLAIT_MARKERS for name in entries):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ConfigError(f"storage {loc} holds files Plait did not write ({shown}); Plait never moves or deletes "
                          "them: choose a new or empty storage location")


def _storage_archive(loc: StorageLocation) -> str | None:
    """Where a fresh start moves the storage side's earlier run: earlier/<its id> (None: nothing there)."""
    if not [name for name in loc.entries() if name not in STAYS]:
        return None
    try:
        name = json.loads(loc.read_bytes(RECORD)).get("run_id") or ""
    except (OSError, ValueError, AttributeError):
        name = ""
    name = name or new_run_id()
    dest, n = f"{EARLIER}/{name}", 1
    while loc.exists(dest):
        n += 1
        dest = f"{EARLIER}/{name}-{n}"
    return dest


def _move_stored_run(loc: StorageLocation, dest: str) -> None:
    """Move every entry but earlier/ to ``dest``: copy (commit markers last), then delete (markers first),
    so a checkpoint is whole, committed, in one place or the other at every moment."""
    for name in [n for n in loc.entries() if n not in STAYS]:
        if loc.is_local:
            loc.fs.create_dir(loc.path(dest), recursive=True)
            loc.fs.move(loc.path(name), loc.path(f"{dest}/{name}"))
        elif loc.is_file(name):
            loc.fs.create_dir(loc.path(dest), recursive=True)
            loc.fs.copy_file(loc.path(name), loc.path(f"{dest}/{name}"))
            loc.fs.delete_file(loc.path(name))
        else:
            loc.copy_tree(name, f"{dest}/{name}", last=(MARKER,))
            loc.delete_tree(name, first=(MARKER,))
