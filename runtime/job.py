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
run_dir locked (runtime/run_lock.py; a second start is refused) -> connect -> prepare -> ranks placed ->
earlier run moved aside, spec.json and plait.log written -> train -> summary.json (runtime/run_summary.py)
-> lock released (on every way out). A control job places its own groups, so its run directory
starts (earlier run moved aside, run.json, spec.json, plait.log) after prepare and just before control
is called: a placement that fails inside control leaves this run recorded (with the error in plait.log).

Restarts (``workers.max_restarts``) are for crashes only (a dead process, a lost node, a
communication error, a timeout, a hung rank the watchdog named); an error that would repeat (bad
input, a corrupt file, a bug) ends the job at once with its message. A restart keeps its ranks off
the nodes where the failures were, when the other nodes have room for them (runtime/placement.py);
otherwise it reuses them and says so. For a control job, a transient ``RankError`` escaping
control (from one of its worker groups) tears down every group and pool it made and calls control
again with ``job.attempt`` + 1 and ``job.resume_from`` = the restart point; a failed pool actor is
control's own business (``ActorPool.replace``), and anything else escaping control ends the job.

Ctrl-C and SIGTERM (runtime/stop.py) ask the ranks to commit a checkpoint at their next step boundary
(``ctx.stop_requested()``; a control job asks ``job.stop_requested()``), wait up to
``workers.stop_grace_s``, and end the run with its summary saying so; the CLI prints the last committed
checkpoint and the command that continues the run, and exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from plait.runtime.actor_pool import ActorPool
from plait.runtime.cluster import connect, link_ray_logs
from plait.runtime.driver_log import CheckpointWatcher, DriverLog, say
from plait.runtime.faults import forwarded_env
from plait.runtime.metrics import progress_mode, show_whole_steps_in_ray_bars
from plait.runtime.placement import nodes_to_avoid
from plait.runtime.run_dir import RunDir, draw_plot
from plait.runtime.run_lock import RunLock
from plait.runtime.run_summary import restart_record, run_summary, write_summary
from plait.runtime.spec import JobSpec
from plait.runtime.stop import RunStopped, StopOnSignal, StopRequest, resume_command, stop_key
from plait.runtime.watchdog import WatchdogConfig
from plait.runtime.worker_group import RankError, WorkerConfig, WorkerGroup, gpus_per_rank

log = logging.getLogger("plait")


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


def command_line(spec: JobSpec) -> list[str]:
    """The command that started this run (``spec.command``, set by the CLI), else one that would."""
    return list(spec.command) or ["plait", "run", spec.source]


def run_job(spec: JobSpec, driver_log: DriverLog | None = None) -> dict[str, Any]:
    """Run the job to its end and return its summary (also in RUN_DIR/summary.json). A run stopped by a signal
    after its ranks returned has ``summary["stopped"]``; one stopped before raises ``RunStopped``."""
    started = time.time()
    with contextlib.ExitStack() as stack:
        driver_log = driver_log or stack.enter_context(DriverLog())
        validate_job(spec)
        run = RunDir.plan(spec.run_dir, resume_request(spec), storage=spec.storage)
        check_resume = getattr(spec.module, "check_resume", None)
        if check_resume is not None and run.resume_meta:  # the job's word on continuing this checkpoint
            check_resume(spec.config, run.resume_meta)
        locks = stack.enter_context(RunLock.hold(run.path, run.storage, run_id=run.run_id,
                                                 command=shlex.join(command_line(spec))))
        for note in locks.notes:
            say(note)
        cluster = connect(spec.cluster)  # a wrong address fails here, in seconds, before any data is built
        show_whole_steps_in_ray_bars()  # the ranks' progress bar, drawn here, counts whole steps
        if hasattr(spec.module, "control"):
            log.info("cluster: %s; control job %s (its groups and pools are placed by control)", cluster, spec.job)
        else:
            log.info("cluster: %s; job %s on %d ranks", cluster, spec.job, spec.workers.num)
        # after connect: an embedded Ray cluster installs its own SIGTERM handler when it starts
        stop = stack.enter_context(StopOnSignal(stop_key(run.run_id), spec.workers.stop_grace_s))
        restarts: list[dict] = []  # restart_log, filled by _run
        try:
            try:
                if hasattr(spec.module, "prepare"):
                    spec.module.prepare(spec.config, run.path)
                return _run(spec, run, driver_log, stop, started, restarts)
            except KeyboardInterrupt:  # how the signal handler unwinds the driver (runtime/stop.py)
                raise stop.stopped_by() from None
        except RunStopped as e:
            e.stopped = _stopped(spec, run, e.request, e.how)
            if run.started:
                write_summary(run.path, run_summary({}, run, started=started, restarts=restarts, stopped=e.stopped))
            _publish_after_failure(run)
            raise
        except BaseException as e:
            if run.started:
                log.error("the run failed: %s: %s", type(e).__name__, e)
            _publish_after_failure(run)
            raise


def _stopped(spec: JobSpec, run: RunDir, request: StopRequest, how: str) -> dict:
    """``summary["stopped"]``: the signal, what happened, the last committed checkpoint, the command to continue
    (before the run directory started, nothing of this run exists: the same command starts it again)."""
    checkpoint = run.restart_point() if run.started else None
    again = resume_command(command_line(spec)) if run.started else shlex.join(command_line(spec))
    return {"signal": request.signal, "at": request.at, "how": how, "exit_code": request.exit_code,
            "checkpoint": str(checkpoint) if checkpoint else None, "continue_with": again}


def start_outputs(spec: JobSpec, run: RunDir, driver_log: DriverLog | None = None) -> None:
    """The ranks are placed (or, for a control job, control is about to start): now the run directory
    changes (earlier run aside, this run recorded), and plait.log gets what the driver said so far."""
    run.start(spec.job)
    if driver_log is not None:
        driver_log.start(run.path)
    write_resolved_spec(spec, run.path)
    link_ray_logs(run.path)
    log.info("run %s of %s started in %s: spec resolved in spec.json (%s, %d ranks); resume from %s", run.run_id,
             spec.job, run.path, spec.source, spec.workers.num, run.resume_from or "step 0")
    for note in run.notes:
        say(note)


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
    stop: StopOnSignal | None = field(default=None, repr=False)  # the driver's Ctrl-C / SIGTERM handling

    def stop_requested(self) -> bool:
        """Whether Ctrl-C or SIGTERM asked the run to stop: then commit a checkpoint and return from control
        (within workers.stop_grace_s). The trainer groups' ranks see it too (``ctx.stop_requested()``)."""
        return self.stop is not None and self.stop.requested is not None

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
                            watchdog=self.watchdog, avoid_nodes=self.avoid_nodes,
                            stop_key=self.stop.key if self.stop is not None else None)
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
                owned.shutdown(graceful)
            except Exception as e:  # noqa: BLE001 - free the others whatever one of them does
                log.warning("tearing down %s failed: %s", type(owned).__name__, e)


def _attempt(spec: JobSpec, run: RunDir, attempt: int, resume_from: Path | None, avoid: list[str],
             driver_log: DriverLog, stop: StopOnSignal) -> Any:
    """One try at the job: ``control`` on the driver, or ``train`` on every rank of one group."""
    # A live progress bar only when someone watches a terminal; plain lines in logs otherwise.
    env = {"PLAIT_PROGRESS": progress_mode(), **forwarded_env()}  # tests' PLAIT_FAULTS reach every rank and actor
    control = getattr(spec.module, "control", None)
    if control is not None:
        if attempt == 0:
            start_outputs(spec, run, driver_log)
        job = Job(run.path, run.run_id, resume_from, attempt, spec.workers, dict(spec.code), env,
                  watchdog=spec.watchdog, avoid_nodes=avoid, stop=stop)
        try:
            with stop.running():
                result = control(job, spec.config)
        except BaseException:
            job.close(graceful=False)
            raise
        job.close()
        return result
    context = {"run_id": run.run_id, "resume_from": resume_from}
    with WorkerGroup(spec.workers, run.path, attempt=attempt, env=env, context=context, code=spec.code,
                     watchdog=spec.watchdog, avoid_nodes=avoid, stop_key=stop.key) as group:
        if attempt == 0:
            start_outputs(spec, run, driver_log)
        with stop.running():
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


def _run(spec: JobSpec, run: RunDir, driver_log: DriverLog, stop: StopOnSignal, started: float,
         restarts: list[dict]) -> dict[str, Any]:
    """The attempts (a restart after each transient failure, recorded in ``restarts``), then the summary."""
    module, cfg = spec.module, spec.config
    attempt, resume_from = 0, run.resume_from
    failed_nodes: set[str] = set()  # Ray node ids where ranks died or hung
    avoid: list[str] = []
    with CheckpointWatcher(run.path / "checkpoints", run.run_id) as checkpoints:
        while True:
            try:
                results = _attempt(spec, run, attempt, resume_from, avoid, driver_log, stop)
                break
            except RankError as e:
                checkpoints.look()  # what the attempt committed is logged before its failure
                log.error("attempt %d failed: %s", attempt, e)
                if stop.requested is not None:
                    raise RunStopped(stop.requested, f"a rank failed while stopping ({e.kind}: {e.message})") from e
                if not getattr(e, "transient", True):
                    log.error("not restarting: this error would repeat (%s)", getattr(e, "kind", "error"))
                    raise
                if attempt >= spec.workers.max_restarts:
                    raise
                attempt += 1
                resume_from = run.restart_point()
                restarts.append(restart_record(attempt, e, resume_from))
                failed_nodes.update(e.node_ids)
                avoid, note = _placement_after(spec, failed_nodes)
                who = ", ".join(f"rank {r} (node {ip})" for r, ip in zip(e.ranks, e.node_ips, strict=False))
                say(f"{who} failed ({getattr(e, 'kind', 'crash')}); restart {attempt}/{spec.workers.max_restarts} "
                    f"from {resume_from or 'step 0 (no checkpoint yet)'}")
                if note:
                    say(note)
            except RunStopped:
                raise
            except Exception as e:
                if hasattr(module, "control"):  # into plait.log: control's run directory has started
                    log.error("control failed: %s: %s", type(e).__name__, e)
                raise
    job_summary = module.summarize(cfg, run.path, results) if hasattr(module, "summarize") else {"results": results}
    stopped = None
    if stop.requested is not None:
        stopped = _stopped(spec, run, stop.requested, "the ranks committed a checkpoint at a step boundary and "
                                                      "returned" if not hasattr(module, "control") else
                                                      "control returned")
    plot = draw_plot(run.path)
    summary = run_summary(job_summary, run, started=started, restarts=restarts, stopped=stopped,
                          **({"plot": str(plot)} if plot else {}))
    write_summary(run.path, summary)
    log.info("summary: %s", summary)
    copied = run.publish()  # the run's files to the storage location (none without one)
    if copied:
        log.info("copied %s to %s", ", ".join(copied), run.storage)
    return summary
