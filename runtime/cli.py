"""The ``plait`` command (``python -m plait.runtime`` is the same).

    plait run SPEC [section.key=value ...] [--address ADDR]
    plait plot RUN_DIR [--out FILE.png]
    plait plan estimate SPEC [--plan dp=2,tp=2,...] [section.key=value ...]
    plait gnn import SOURCE DEST [--undirected] [--dedupe] [--self-loops keep|drop|add] [--rebuild]
"""

from __future__ import annotations

import argparse
import importlib
import sys

from plait.runtime.config import ConfigError, is_user_error
from plait.runtime.worker_group import RankError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plait", description="Ray-orchestrated distributed training")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job spec (TOML) on Ray")
    run.add_argument("spec")
    run.add_argument("overrides", nargs="*", help="section.key=value (TOML values), e.g. train.steps=20")
    run.add_argument("--address", default="",
                     help="GCS address host:port of a Ray cluster to join (else PLAIT_RAY_ADDRESS, RAY_ADDRESS, local)")
    plot = sub.add_parser("plot", help="write a PNG, one panel per metric the run logged (loss, lr, memory, ...)")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None)
    plan = sub.add_parser("plan", help="parallel-plan tools")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    est = plan_sub.add_parser("estimate", help="per-rank memory of a spec's model under a plan, before launch")
    est.add_argument("spec")
    est.add_argument("overrides", nargs="*")
    est.add_argument("--plan", default="", help="comma-separated plan fields, e.g. dp=2,tp=2,engine=fsdp2")
    gnn = sub.add_parser("gnn", help="GNN data tools: `plait gnn import SOURCE DEST` (see plait.gnn.graph_import)")
    gnn.add_argument("gnn_command", choices=sorted(TOOLS))
    gnn.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's own arguments (plait gnn import -h)")
    return p


TOOLS = {"import": "plait.gnn.graph_import"}  # `plait gnn <tool>`: the module whose main(argv) runs it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``section.key=value`` overrides may also come after options
    (``plait plan estimate SPEC --plan dp=2 train.seq_len=64``): argparse stops filling a
    positional list at the first option, so the rest arrive as extras and join the overrides."""
    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if args.command == "gnn":  # the tool parses its own arguments (options included)
        args.rest = [*args.rest, *extras]
        return args
    stray = [e for e in extras if e.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """``plait run``: the run, then its summary (scalars; everything is in summary.json); a run stopped by Ctrl-C
    or SIGTERM ends with one line naming its last committed checkpoint and the command that continues it."""
    from plait.runtime.driver_log import DriverLog, say
    from plait.runtime.job import run_job
    from plait.runtime.run_summary import screen_summary
    from plait.runtime.spec import load_spec
    from plait.runtime.stop import RunStopped, stop_line

    with DriverLog() as driver_log:  # what is said from here on goes to plait.log too
        spec = load_spec(args.spec, args.overrides)
        spec.command = ["plait", *argv]
        if args.address:
            spec.cluster.address = args.address
        try:
            summary = run_job(spec, driver_log)
        except RunStopped as e:
            say(stop_line(e.stopped))
            return e.request.exit_code
        print(screen_summary(summary), flush=True)
        if summary.get("stopped"):
            say(stop_line(summary["stopped"]))
            return int(summary["stopped"]["exit_code"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "run":
            return run_command(args, sys.argv[1:] if argv is None else list(argv))
        elif args.command == "plot":
            from plait.runtime.plot import plot_run

            print(f"wrote {plot_run(args.run_dir, args.out)}")
        elif args.command == "plan":
            from plait.runtime.spec import load_spec

            overrides = list(args.overrides) + [f"plan.{kv}" for kv in args.plan.split(",") if kv]
            spec = load_spec(args.spec, overrides)
            estimate = getattr(spec.module, "estimate", None)
            if estimate is None:
                raise ConfigError(f"job {spec.job!r} has no memory estimator")
            print(estimate(spec.config, spec.workers.num))
        elif args.command == "gnn":  # imported when asked for: the runtime does not depend on plait.gnn
            return importlib.import_module(TOOLS[args.gnn_command]).main(args.rest)
    except KeyboardInterrupt:  # before the run's own handling of Ctrl-C was in place
        print("plait: interrupted (Ctrl-C) before the run started; nothing was left to continue", file=sys.stderr)
        return 130
    except RankError as e:
        if e.user_error:  # the message says it all; the traceback is in plait.log
            print(f"plait: job failed on rank {e.rank}: {e.message}", file=sys.stderr)
            return 2
        print(f"plait: job failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not is_user_error(e):
            raise
        print(f"plait: {'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
