"""Run one job: check on the driver, place the ranks, then own the run directory, train, restart crashes.

A job module (named by the spec's ``job`` key) provides:
    Config                         dataclass of its sections ([model], [data], [train], ...)
    train(ctx, cfg) -> Any         runs on every rank; loads ``ctx.resume_from`` when it is set
    control(job, cfg) -> Any       instead of train: runs ON THE DRIVER and drives the job itself with
                                   the ``Job`` handle's worker groups and actor pools (e.g. a trainer
                                   group and generator actors); its return value is the result
    validate(cfg, world_size)      optional, on the driver before anything starts; raises ValueError
    prepare(cfg, run_dir)          optional, on the driver before ranks start (e.g. build a dataset);
                                   it must not write into run_dir, which the runtime owns
    summarize(cfg, run_dir, results) -> dict   optional, on the driver after all ranks return
A Config with a ``train.resume`` string ("" fresh, "latest", or a checkpoint folder) gets the
runtime's resume handling (runtime/run_dir.py); a module may instead define ``resume_request(cfg)``.

Order, so that a launch that fails changes nothing on disk: validate -> resume path checked ->
connect -> prepare -> ranks placed -> earlier run moved aside, spec.json and plait.log written ->
train. A control job places its own groups, so its run directory starts (earlier run moved aside,
run.json, spec.json, plait.log) after prepare and just before control is called: a placement that
fails inside control leaves this run recorded (with the error in plait.log).

Restarts (``workers.max_restarts``) are for crashes only (a dead process, a lost node, a
communication error, a timeout, a hung rank the watchdog named); an error that would repeat (bad
input, a corrupt file, a bug) ends the job at once with its message. A restart keeps its ranks off
the nodes where the failures were, when the other nodes have room for them (runtime/placement.py);
otherwise it reuses them and says so. For a control job, a transient ``RankError`` escaping
control (from one of its worker groups) tears down every group and pool it made and calls control
again with ``job.attempt`` + 1 and ``job.resume_from`` = the restart point; a failed pool actor is
control's own business (``ActorPool.replace``), and anything else escaping control ends the job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from plait.runtime.actor_pool import ActorPool
from plait.runtime.cluster import connect, link_ray_logs
from plait.runtime.metrics import progress_mode
from plait.runtime.placement import nodes_to_avoid
from plait.runtime.run_dir import RunDir
from plait.runtime.spec import JobSpec
from plait.runtime.watchdog import WatchdogConfig
from plait.runtime.worker_group import RankError, WorkerConfig, WorkerGroup, gpus_per_rank

log = logging.getLogger("plait")


def _log_to_run_dir(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "plait.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def write_resolved_spec(spec: JobSpec, run_dir: Path) -> None:
    resolved = {
        "job": spec.job, "source": spec.source, "run_dir": str(run_dir), "storage": spec.storage or None,
        "cluster": dataclasses.asdict(spec.cluster), "workers": dataclasses.asdict(spec.workers),
        "watchdog": dataclasses.asdict(spec.watchdog),
        **dataclasses.asdict(spec.config),
    }
    (run_dir / "spec.json").write_text(json.dumps(resolved, indent=1, default=str))


def validate_job(spec: JobSpec) -> None:
    """Everything that can be checked without a cluster; raises ValueError (PlanError, ConfigError)."""
    if hasattr(spec.module, "validate"):
        spec.module.validate(spec.config, spec.workers.num)


def resume_request(spec: JobSpec) -> str:
    """What the job asks to resume: ``resume_request(cfg)`` if the module defines it, else ``train.resume``."""
    ask = getattr(spec.module, "resume_request", None)
    if ask is not None:
        return ask(spec.config) or ""
    return getattr(getattr(spec.config, "train", None), "resume", "") or ""


def run_job(spec: JobSpec) -> dict[str, Any]:
    validate_job(spec)
    run = RunDir.plan(spec.run_dir, resume_request(spec), storage=spec.storage)
    cluster = connect(spec.cluster)  # a wrong address fails here, in seconds, before any data is built
    if hasattr(spec.module, "control"):
        log.info("cluster: %s; control job %s (its groups and pools are placed by control)", cluster, spec.job)
    else:
        log.info("cluster: %s; job %s on %d ranks", cluster, spec.job, spec.workers.num)
    if hasattr(spec.module, "prepare"):
        spec.module.prepare(spec.config, run.path)
    try:
        return _run(spec, run)
    except BaseException:
        _publish_after_failure(run)
        raise
    finally:
        for handler in [h for h in log.handlers if getattr(h, "plait_run_dir", None) == run.path]:
            log.removeHandler(handler)
            handler.close()


def start_outputs(spec: JobSpec, run: RunDir) -> None:
    """The ranks are placed (or, for a control job, control is about to start): now the run directory
    changes (earlier run aside, this run recorded)."""
    run.start(spec.job)
    handler = _log_to_run_dir(run.path)
    handler.plait_run_dir = run.path
    write_resolved_spec(spec, run.path)
    link_ray_logs(run.path)
    for note in run.notes:
        log.info(note)
        print(f"[plait] {note}", flush=True)


def _publish_after_failure(run: RunDir) -> None:
    """A failed run's log and metrics still go to the storage location (once the run has started)."""
    try:
        run.publish()
    except Exception as e:  # noqa: BLE001 - the job's own error is the one to report
        log.warning("copying the failed run's files to %s failed: %s", run.storage, e)


@dataclass
class Job:
    """What ``control(job, cfg)`` drives the job with. Groups and pools made through it are torn down
    when control returns or raises."""

    run_dir: Path
    run_id: str
    resume_from: Path | None  # the checkpoint to load (None: step 0); after a restart, this run's newest
    attempt: int  # restarts so far
    workers: WorkerConfig  # the spec's [workers]: worker_group()'s defaults; max_restarts governs control restarts
    code: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)  # the local job module, shipped
    env: dict[str, str] = field(default_factory=dict, repr=False)  # environment of every actor
    owned: list = field(default_factory=list, repr=False)  # groups and pools to tear down
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # the spec's [watchdog], for every group
    avoid_nodes: list[str] = field(default_factory=list)  # Ray node ids where earlier attempts failed

    def worker_group(self, **overrides: Any) -> WorkerGroup:
        """A WorkerGroup of ``workers`` with ``overrides`` (num=..., cpus_per_worker=...), with the job's
        code, env and context (run_dir, run_id, resume_from, attempt)."""
        known = {f.name for f in dataclasses.fields(WorkerConfig)}
        if set(overrides) - known:
            raise ValueError(f"job.worker_group({', '.join(sorted(set(overrides) - known))}=...): not WorkerConfig "
                             f"fields; choose from {sorted(known)}")
        cfg = dataclasses.replace(self.workers, **overrides)
        context = {"run_id": self.run_id, "resume_from": self.resume_from}
        group = WorkerGroup(cfg, self.run_dir, attempt=self.attempt, env=self.env, context=context, code=self.code,
                            watchdog=self.watchdog, avoid_nodes=self.avoid_nodes)
        self.owned.append(group)
        return group

    def actor_pool(self, cls: type | Callable | str, num: int, **kw: Any) -> ActorPool:
        """An ActorPool (keywords as ActorPool's) with the job's code and env (``env=`` adds to it)."""
        pool = ActorPool(cls, num, code=self.code, env={**self.env, **kw.pop("env", {})}, **kw)
        self.owned.append(pool)
        return pool

    def close(self, graceful: bool = True) -> None:
        """Tear down every group and pool made through this handle, newest first."""
        while self.owned:
            owned = self.owned.pop()
            try:
                if isinstance(owned, WorkerGroup):
                    owned.shutdown(graceful)
                else:
                    owned.shutdown()
            except Exception as e:  # noqa: BLE001 - free the others whatever one of them does
                log.warning("tearing down %s failed: %s", type(owned).__name__, e)


def _attempt(spec: JobSpec, run: RunDir, attempt: int, resume_from: Path | None, avoid: list[str]) -> Any:
    """One try at the job: ``control`` on the driver, or ``train`` on every rank of one group."""
    # A live progress bar only when someone watches a terminal; plain lines in logs otherwise.
    env = {"PLAIT_PROGRESS": progress_mode()}
    control = getattr(spec.module, "control", None)
    if control is not None:
        if attempt == 0:
            start_outputs(spec, run)
        job = Job(run.path, run.run_id, resume_from, attempt, spec.workers, dict(spec.code), env,
                  watchdog=spec.watchdog, avoid_nodes=avoid)
        try:
            result = control(job, spec.config)
        except BaseException:
            job.close(graceful=False)
            raise
        job.close()
        return result
    context = {"run_id": run.run_id, "resume_from": resume_from}
    with WorkerGroup(spec.workers, run.path, attempt=attempt, env=env, context=context, code=spec.code,
                     watchdog=spec.watchdog, avoid_nodes=avoid) as group:
        if attempt == 0:
            start_outputs(spec, run)
        return group.run(spec.module.train, spec.config)


def _placement_after(spec: JobSpec, failed_nodes: set[str]) -> tuple[list[str], str]:
    """The nodes the next attempt avoids (when the others have room for the spec's [workers]), and a note."""
    import ray

    w = spec.workers
    try:
        gpus = gpus_per_rank(w.gpus_per_worker, ray.cluster_resources().get("GPU", 0), w.num)
        return nodes_to_avoid(failed_nodes, w.num, w.cpus_per_worker, gpus, w.strategy)
    except Exception as e:  # noqa: BLE001 - the restart goes ahead anywhere; its placement reports what is wrong
        return [], f"could not judge room off the failed node(s) ({type(e).__name__}: {e}); placing anywhere"


def _run(spec: JobSpec, run: RunDir) -> dict[str, Any]:
    module, cfg = spec.module, spec.config
    started = time.time()
    attempt, resume_from = 0, run.resume_from
    failed_nodes: set[str] = set()  # Ray node ids where ranks died or hung
    avoid: list[str] = []
    while True:
        try:
            results = _attempt(spec, run, attempt, resume_from, avoid)
            break
        except RankError as e:
            log.error("attempt %d failed: %s", attempt, e)
            if not getattr(e, "transient", True):
                log.error("not restarting: this error would repeat (%s)", getattr(e, "kind", "error"))
                raise
            if attempt >= spec.workers.max_restarts:
                raise
            attempt += 1
            resume_from = run.restart_point()
            failed_nodes.update(e.node_ids)
            avoid, note = _placement_after(spec, failed_nodes)
            who = ", ".join(f"rank {r} (node {ip})" for r, ip in zip(e.ranks, e.node_ips, strict=False))
            print(f"[plait] {who} failed ({getattr(e, 'kind', 'crash')}); restart {attempt}/"
                  f"{spec.workers.max_restarts} from {resume_from or 'step 0 (no checkpoint yet)'}", flush=True)
            if note:
                log.info(note)
                print(f"[plait] {note}", flush=True)
        except Exception as e:
            if hasattr(module, "control"):  # into plait.log: control's run directory has started
                log.error("control failed: %s: %s", type(e).__name__, e)
            raise
    summary = module.summarize(cfg, run.path, results) if hasattr(module, "summarize") else {"results": results}
    summary.update(run_dir=str(run.path), run_id=run.run_id, wall_s=round(time.time() - started, 1),
                   restarts=attempt)
    if run.storage is not None:
        summary["storage"] = str(run.storage)
    (run.path / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log.info("summary: %s", summary)
    copied = run.publish()  # the run's files to the storage location (none without one)
    if copied:
        log.info("copied %s to %s", ", ".join(copied), run.storage)
    return summary
