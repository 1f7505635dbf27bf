"""summary.json describes the run, not its last attempt: the runtime sets the run-level facts itself.

    summary = run_summary(job_summary, run, started=t0, restarts=[...], stopped=None)
    write_summary(run.path, summary)           # atomically: written aside, fsynced, renamed in
    print(screen_summary(summary))             # what the CLI prints: scalars only

After the job's own ``summarize`` the runtime sets (its values win): ``start_step`` of the run (where
its first attempt started: 0, or the step of the checkpoint it resumed), ``first_loss`` and
``last_loss`` from metrics.jsonl (each step once, runtime/metrics.py) when the run logged a loss,
``restarts`` (how many) and ``restart_log`` (each restart: attempt, failed ranks and nodes, kind,
reason, the checkpoint and step it resumed from, when), ``stopped`` (a run stopped by a signal:
which, when, how, its last committed checkpoint, the command that continues it), ``run_dir``,
``run_id``, ``wall_s`` and ``storage``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from plait.runtime.metrics import read_metrics
from plait.runtime.run_dir import RunDir
from plait.runtime.storage_location import StorageLocation

SCREEN_STRING = 300  # longer strings are cut when printed (summary.json keeps them whole)


def checkpoint_step(path: Path | None) -> int:
    """The step a checkpoint folder holds (its meta.json), 0 for None or an unreadable one."""
    if path is None:
        return 0
    try:
        return int(json.loads((Path(path) / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def restart_record(attempt: int, error: Any, resumed_from: Path | None) -> dict:
    """One entry of ``restart_log``: what failed (a RankError's ranks, nodes, kind, message) and where the next
    attempt resumed."""
    message = str(getattr(error, "message", "") or error or "").strip().splitlines()
    return {"attempt": attempt, "failed_ranks": list(getattr(error, "ranks", [])),
            "nodes": list(getattr(error, "node_ips", [])),
            "kind": getattr(error, "kind", type(error).__name__ if error is not None else ""),
            "reason": (message[0] if message else "")[:SCREEN_STRING],
            "resumed_from": str(resumed_from) if resumed_from else None, "resumed_step": checkpoint_step(resumed_from),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def losses_of_run(run_dir: Path, start_step: int) -> dict[str, float]:
    """``first_loss`` (the first step after ``start_step``) and ``last_loss`` (the last step) from metrics.jsonl,
    each step's last record counting; {} when the run logged no loss."""
    try:
        records = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return {}
    by_step = {int(r["step"]): r["loss"] for r in records if "step" in r and isinstance(r.get("loss"), (int, float))}
    mine = sorted(step for step in by_step if step > start_step)
    if not mine:
        return {}
    return {"first_loss": by_step[mine[0]], "last_loss": by_step[mine[-1]]}


def run_summary(job_summary: dict, run: RunDir, *, started: float, restarts: list[dict],
                stopped: dict | None = None, **more: Any) -> dict:
    """The job's summary with the run-level facts set over it."""
    summary = dict(job_summary)
    start_step = run.start_step
    summary.update(start_step=start_step, **losses_of_run(run.path, start_step))
    summary.update(run_dir=str(run.path), run_id=run.run_id, wall_s=round(time.time() - started, 1),
                   restarts=len(restarts), **more)
    if restarts:
        summary["restart_log"] = restarts
    if run.storage is not None:
        summary["storage"] = str(run.storage)
    if stopped is not None:
        summary["stopped"] = stopped
    return summary


def write_summary(run_dir: Path, summary: dict) -> Path:
    """RUN_DIR/summary.json, atomically (a reader sees the old file or all of the new one)."""
    StorageLocation.parse(run_dir).write_marker("summary.json", json.dumps(summary, indent=1, default=str).encode())
    return Path(run_dir) / "summary.json"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def screen_summary(summary: dict) -> str:
    """The summary as printed: scalars as they are (long strings cut), a table of scalars as it is; lists and
    larger tables become a note pointing at summary.json, which keeps everything."""
    shown: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, str) and len(value) > SCREEN_STRING:
            shown[key] = value[:SCREEN_STRING] + "..."
        elif _scalar(value):
            shown[key] = value
        elif isinstance(value, dict) and len(value) <= 8 and all(_scalar(v) for v in value.values()):
            shown[key] = value
        elif isinstance(value, (list, tuple, dict)):
            shown[key] = f"({type(value).__name__} of {len(value)}: see summary.json)"
        else:
            shown[key] = f"({type(value).__name__}: see summary.json)"
    return json.dumps(shown, indent=1, default=str)
