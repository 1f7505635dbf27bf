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
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from plait.runtime.checkpoint import Checkpointer, CorruptCheckpointError, check_committed, committed_in
from plait.runtime.config import ConfigError

EARLIER = "earlier"
RECORD = "run.json"
# Files a Plait run writes: a folder holding any of them is a run directory Plait made.
PLAIT_MARKERS = (RECORD, "spec.json", "plait.log", "metrics.jsonl", "checkpoints", "summary.json", EARLIER)


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
    """What a fresh start moves under earlier/: everything of the last run (not earlier/ itself)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name != EARLIER)


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

    @classmethod
    def plan(cls, run_dir: Path, resume: str) -> "RunDir":
        """Decide everything on the driver, write nothing. Raises ConfigError for a bad resume path."""
        run_dir = run_dir.resolve()
        check_run_dir(run_dir)
        run_id, notes = new_run_id(), []
        if resume == "latest":
            latest = Checkpointer(run_dir / "checkpoints").latest()
            if latest is not None:
                _check_or_config_error(latest)
            notes.append(f"continuing {run_dir} from {latest}" if latest else
                         f"train.resume=latest: no committed checkpoint in {run_dir / 'checkpoints'} yet, "
                         "starting at step 0")
            return cls(run_dir, run_id, latest, None, notes)
        start = None
        if resume:
            start = Path(resume).expanduser().resolve()
            _check_or_config_error(start)
        archive_to = archive_folder(run_dir) if earlier_outputs(run_dir) else None
        if start is not None and archive_to is not None and start.is_relative_to(run_dir) \
                and not start.is_relative_to(run_dir / EARLIER):
            start = archive_to / start.relative_to(run_dir)  # the checkpoint moves with its run
        if archive_to is not None:
            notes.append(f"fresh start: the earlier run in {run_dir} is kept under {archive_to} "
                         "(train.resume=latest continues it instead)")
        return cls(run_dir, run_id, start, archive_to, notes)

    def start(self, job: str, attempt_note: str = "") -> None:
        """Once the ranks are placed: move the earlier run aside, then record this one."""
        if self.archive_to is not None:
            self.archive_to.mkdir(parents=True)
            for entry in earlier_outputs(self.path):
                os.rename(entry, self.archive_to / entry.name)
            self.archive_to = None
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"run_id": self.run_id, "job": job, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "resume_from": str(self.resume_from) if self.resume_from else None}
        tmp = self.path / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.path / RECORD)

    def restart_point(self) -> Path | None:
        """After a crash: this run's own newest committed checkpoint, else where the run started."""
        for path in reversed(committed_in(self.path / "checkpoints")):
            try:
                if json.loads((path / "meta.json").read_text()).get("run_id") == self.run_id:
                    return path
            except (OSError, ValueError):
                continue
        return self.resume_from


def _check_or_config_error(path: Path) -> None:
    try:
        check_committed(path)
    except (FileNotFoundError, CorruptCheckpointError) as e:
        raise ConfigError(f"train.resume: {e}") from None
