"""Run a job spec under torchrun or mpirun, without Ray: the same spec, the same ``train(ctx, cfg)``.

    torchrun --nproc-per-node 2 -m plait.launchers.spmd examples/mlp_dp2.toml [section.key=value ...]
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 \\
        -m plait.launchers.spmd SPEC ...
    mpirun -n 2 python -m plait.launchers.spmd examples/mlp_dp2.toml [section.key=value ...]

Every process reads the spec. The launcher decides the ranks (``workers.num`` follows its world size)
and the rank start-up is the Ray path's (runtime/rank_setup.py): device ``cuda:LOCAL_RANK`` or the
CPU (``workers.gpus_per_worker=0``), NCCL or gloo. Rank 0 then does what the Ray driver does, with
the runtime's own functions: validate, resume check, prepare, start the run directory; every rank
trains; rank 0 writes ``summary.json`` and prints it. A failure prints one line naming the rank (and
its traceback unless it is an input error), then ends every process (MPI: Abort; torchrun stops the
others itself). Under ``torchrun --max-restarts N`` a restart continues this run from its newest
checkpoint, as ``workers.max_restarts`` does on Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from plait.runtime.config import is_user_error
from plait.runtime.context import StopFlag
from plait.runtime.rank_setup import LaunchError, Placement, launcher_placement, setup_rank, wants_gpu
from plait.runtime.stop import stop_on_signal_in_rank

RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
# How a stopped run is continued: the launcher's own options stay the user's ("..."), the spec and overrides follow.
LAUNCHER_COMMANDS = {"torchrun": ["torchrun", "...", "-m", "plait.launchers.spmd"],
                     "mpi": ["mpirun", "...", "python", "-m", "plait.launchers.spmd"]}


class AgreedStop(Exception):
    """Rank 0's start-up failed and every rank knows it: they all end together, rank 0 reports ``error``."""

    def __init__(self, error: BaseException | None):
        super().__init__(str(error))
        self.error = error


def env_rank() -> int:
    """This process's rank as its launcher's environment states it (0 when none does): who reports errors that
    happen before the process group exists."""
    for var in RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plait.launchers.spmd",
                                description="run a Plait job spec on the ranks torchrun or mpirun started")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="section.key=value (TOML values), e.g. train.steps=20")
    return p.parse_args(argv)


def start_run(spec: Any, placement: Placement, stack: contextlib.ExitStack) -> tuple[Any, Path | None]:
    """Rank 0, before any rank trains: the Ray driver's steps (runtime/job.py), in its order, with its run
    directory lock and plait.log held in ``stack`` until the run ends. Returns the RunDir and the checkpoint to
    start from."""
    from plait.runtime.driver_log import DriverLog, say
    from plait.runtime.job import resume_request, start_outputs, validate_job
    from plait.runtime.metrics import progress_mode
    from plait.runtime.run_dir import RunDir
    from plait.runtime.run_lock import RunLock

    driver_log = stack.enter_context(DriverLog())
    validate_job(spec)
    run = continued_run(spec.run_dir) if placement.attempt > 0 else None
    run = run or RunDir.plan(spec.run_dir, resume_request(spec), storage=spec.storage)
    locks = stack.enter_context(RunLock.hold(run.path, run.storage, run_id=run.run_id,
                                             command=shlex.join(spec.command)))
    for note in locks.notes:
        say(note)
    os.environ.setdefault("PLAIT_PROGRESS", progress_mode())
    if hasattr(spec.module, "prepare") and placement.attempt == 0:
        spec.module.prepare(spec.config, run.path)
    start_outputs(spec, run, driver_log)
    resume_from = run.restart_point() if placement.attempt > 0 else run.resume_from
    if placement.attempt > 0:
        say(f"torchrun restart {placement.attempt}: continuing {run.path} from "
            f"{resume_from or 'step 0 (no checkpoint yet)'}")
    return run, resume_from


def continued_run(run_dir: Path) -> Any:
    """After a torchrun restart: the run its first attempt recorded in run.json (None: it never started)."""
    from plait.runtime.run_dir import RECORD, RunDir
    from plait.runtime.storage_location import StorageLocation

    try:
        record = json.loads((run_dir.resolve() / RECORD).read_text())
    except (OSError, ValueError):
        return None
    started_from = Path(record["resume_from"]) if record.get("resume_from") else None
    storage = StorageLocation.parse(record["storage"]) if record.get("storage") else None
    return RunDir(run_dir.resolve(), record["run_id"], started_from, None, storage=storage, started=True,
                  start_step=int(record.get("start_step") or 0))


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def end_run(spec: Any, run: Any, results: list, started: float, placement: Placement, restarts: list[dict],
            stop: StopFlag) -> dict:
    """Rank 0, after every rank returned: summary.json (the run's facts over the job's summary), metrics.png,
    the storage copy; a run stopped by a signal says so and how to continue."""
    from plait.runtime.driver_log import say
    from plait.runtime.run_dir import draw_plot
    from plait.runtime.run_summary import run_summary, screen_summary, write_summary
    from plait.runtime.stop import StopRequest, resume_command, stop_line

    module = spec.module
    job_summary = module.summarize(spec.config, run.path, results) if hasattr(module, "summarize") else \
        {"results": results}
    stopped = None
    if stop.is_set():
        request = StopRequest(stop.reason or "SIGTERM", time.strftime("%Y-%m-%dT%H:%M:%S"))
        checkpoint = run.restart_point()
        stopped = {"signal": request.signal, "at": request.at, "exit_code": request.exit_code,
                   "how": "the ranks committed a checkpoint at a step boundary and returned",
                   "checkpoint": str(checkpoint) if checkpoint else None,
                   "continue_with": resume_command(spec.command)}
    plot = draw_plot(run.path)
    summary = run_summary(job_summary, run, started=started, restarts=restarts, stopped=stopped,
                          launcher=placement.launcher, **({"plot": str(plot)} if plot else {}))
    summary["restarts"] = placement.attempt  # this attempt knows only its own restart, not the earlier ones
    write_summary(run.path, summary)
    run.publish()  # outputs to the storage location, when the spec names one
    print(screen_summary(summary), flush=True)
    if stopped is not None:
        say(stop_line(stopped))
    return summary


def run_spmd(spec: Any, placement: Placement, rendezvous: Any) -> dict | None:
    """Start this rank, run the job; rank 0 returns the summary (the others None). Raises what failed."""
    import torch.distributed as dist

    started = time.time()
    workers = spec.workers
    if workers.num != placement.world_size:
        if placement.rank == 0:
            print(f"[plait] {placement.launcher} started {placement.world_size} ranks; the spec's workers.num="
                  f"{workers.num} follows it", flush=True)
        workers.num = placement.world_size
    stop = StopFlag()
    stop_on_signal_in_rank(stop)  # SIGTERM / Ctrl-C reach every rank process here: ctx.stop_requested() sees it
    ctx = setup_rank(placement, rendezvous, use_gpu=wants_gpu(workers.gpus_per_worker),
                     timeout_s=workers.pg_timeout_s, run_dir=spec.run_dir.resolve(), stop=stop)
    with contextlib.ExitStack() as rank0:  # rank 0's run lock and plait.log, held to the end, released on any exit
        decision: dict[str, Any] = {}
        run, error, restarts = None, None, []
        if placement.rank == 0:
            try:
                run, resume_from = start_run(spec, placement, rank0)
                decision = {"run_id": run.run_id, "resume_from": resume_from}
                if placement.attempt > 0:  # what this attempt resumed, read now (pruning may remove it later)
                    from plait.runtime.run_summary import restart_record

                    restarts = [{**restart_record(placement.attempt, None, resume_from), "kind": "torchrun restart",
                                 "reason": "torchrun started the ranks again (--max-restarts)"}]
            except Exception as e:  # noqa: BLE001 - every rank must stop, rank 0 reports it
                decision, error = {"failed": True}, e  # the exception itself stays here: plain data crosses
        decision = broadcast(decision if placement.rank == 0 else None)
        if decision.get("failed"):  # every rank stops here together; rank 0 says why
            raise AgreedStop(error)
        ctx = dataclasses.replace(ctx, run_id=decision["run_id"], resume_from=decision["resume_from"])
        result = spec.module.train(ctx, spec.config)
        results = [None] * placement.world_size if placement.rank == 0 else None
        dist.gather_object(result, results, dst=0)
        summary = end_run(spec, run, results, started, placement, restarts, stop) if placement.rank == 0 else None
        dist.barrier()
        dist.destroy_process_group()
    return summary


def report(e: BaseException, rank: int, world: int | None, driver_work: bool = False) -> int:
    """One line naming the rank (after the traceback for an unexpected error); the exit code: 2 for an error in
    the user's input (its class's ``user_error``; also a ValueError from the driver's work: validate, resume)."""
    kind = type(e).__name__
    who = f"rank {rank}" + (f" of {world}" if world else "")
    if is_user_error(e, on_driver=driver_work):
        if rank == 0 or isinstance(e, LaunchError):
            print(f"plait: {who}: {kind}: {e}", file=sys.stderr, flush=True)
        return 2
    traceback.print_exception(e, file=sys.stderr)
    print(f"plait: job failed on {who}: {kind}: {e}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    placement = None
    try:
        from plait.runtime.spec import load_spec

        spec = load_spec(args.spec, args.overrides)
        placement, rendezvous = launcher_placement(spec.workers.pg_timeout_s)
        spec.command = [*LAUNCHER_COMMANDS[placement.launcher], args.spec, *args.overrides]
        summary = run_spmd(spec, placement, rendezvous)
        if summary is not None and summary.get("stopped"):
            return int(summary["stopped"]["exit_code"])
        return 0
    except AgreedStop as stop:
        return report(stop.error, 0, placement.world_size, driver_work=True) if stop.error is not None else 2
    except BaseException as e:  # noqa: BLE001 - reported as one line, then every process ends
        code = report(e, placement.rank if placement else env_rank(), placement.world_size if placement else None)
        if placement is not None and placement.launcher == "mpi" and not isinstance(e, KeyboardInterrupt):
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(code)  # a peer blocked in a collective would never see this rank leave
        return code


if __name__ == "__main__":
    sys.exit(main())
