"""Run one job: prepare on the driver, place the ranks, train, restart from checkpoints on failure.

A job module (named by the spec's ``job`` key) provides:
    Config                         dataclass of its sections ([model], [data], [train], ...)
    train(ctx, cfg) -> Any         runs on every rank; resumes from the latest checkpoint when
                                   ``ctx.attempt > 0`` (a restart)
    validate(cfg, world_size)      optional, on the driver before anything starts; raises ValueError
    prepare(cfg, run_dir)          optional, on the driver before ranks start (e.g. build a dataset)
    summarize(cfg, run_dir, results) -> dict   optional, on the driver after all ranks return
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from plait.runtime.cluster import connect
from plait.runtime.spec import JobSpec
from plait.runtime.worker_group import RankError, WorkerGroup

log = logging.getLogger("plait")


def _log_to_run_dir(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "plait.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def write_resolved_spec(spec: JobSpec, run_dir: Path) -> None:
    resolved = {
        "job": spec.job, "source": spec.source, "run_dir": str(run_dir),
        "cluster": dataclasses.asdict(spec.cluster), "workers": dataclasses.asdict(spec.workers),
        **dataclasses.asdict(spec.config),
    }
    (run_dir / "spec.json").write_text(json.dumps(resolved, indent=1, default=str))


def validate_job(spec: JobSpec) -> None:
    """Everything that can be checked without a cluster; raises ValueError (PlanError, ConfigError)."""
    if hasattr(spec.module, "validate"):
        spec.module.validate(spec.config, spec.workers.num)


def run_job(spec: JobSpec) -> dict[str, Any]:
    validate_job(spec)
    run_dir = spec.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _log_to_run_dir(run_dir)
    try:
        return _run(spec, run_dir)
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(spec: JobSpec, run_dir: Path) -> dict[str, Any]:
    write_resolved_spec(spec, run_dir)
    module, cfg = spec.module, spec.config
    started = time.time()
    if hasattr(module, "prepare"):
        module.prepare(cfg, run_dir)
    cluster = connect(spec.cluster, run_dir)
    log.info("cluster: %s; job %s on %d ranks", cluster, spec.job, spec.workers.num)
    attempt = 0
    while True:
        try:
            # A live progress bar only when someone watches a terminal; plain lines in logs otherwise.
            env = {"PLAIT_PROGRESS": "bar" if sys.stdout.isatty() else "lines"}
            with WorkerGroup(spec.workers, run_dir, attempt=attempt, env=env) as group:
                results = group.run(module.train, cfg)
            break
        except RankError as e:
            log.error("attempt %d failed: %s", attempt, e)
            if attempt >= spec.workers.max_restarts:
                raise
            attempt += 1
            print(f"[plait] rank {e.rank} failed; restart {attempt}/{spec.workers.max_restarts} "
                  "from the latest checkpoint", flush=True)
    summary = module.summarize(cfg, run_dir, results) if hasattr(module, "summarize") else {"results": results}
    summary.update(run_dir=str(run_dir), wall_s=round(time.time() - started, 1), restarts=attempt)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log.info("summary: %s", summary)
    return summary
