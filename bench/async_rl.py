"""Synchronous (eta = 0) against asynchronous (eta = 2) RL post-training: the same actors, the same wall-clock
budget, the same seeds, through the same control job (plait.rl.rl_job) on a local Ray cluster.

    python bench/async_rl.py --quick        # about a minute and a half: 2 x (start-up + 20 s of training)
    python bench/async_rl.py --budget 90    # longer runs, closer reward figures
    python bench/async_rl.py --sim --quick  # simulated devices (bench/rl_sim.py): the controller, not the cores

Generation lengths vary across prompts: string reversal of 1..5 letters (completions of 2..8 tokens), after
a short supervised warm start on correct answers (100 steps) so reward starts at about 0.2 and RL has a
signal to climb.
Reported per mode: trained samples/s, generator busy share (time a generator had work in flight / wall
time, over the training loop), trainer busy share, and the mean reward of the last quarter of steps
(the reward reached within the budget), and the trainer's seconds per step and the generators' ms per sample
(compute only: when they grow in the async run, the processes are sharing too few cores). Last line:
``RESULT samples_per_s_ratio=... ...``; ``overlap_bound_sync`` = 1 / the larger busy share of the sync run, the
ratio that overlapping alone could reach with a core per process; ``cpu_bound`` = what the machine's cores
allow from compute alone (the serial trainer, or all generation + training spread over ``cores``): every
process here is CPU-bound, so on 2 cores three of them (2 generators + the trainer, besides the driver and
Ray's own processes, which it does not count) cannot beat the sync run by more than the core-time it idles.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(eta: int, budget_s: float, run_dir: Path, generators: int, extra: list[str]) -> dict:
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    overrides = [
        f"run_dir={run_dir}", f"rl.eta={eta}", f"train.time_budget_s={budget_s}", "train.steps=100000",
        "train.checkpoint_every=0", "task.name=reversal", 'task.options={min_len = 1, max_len = 5}',
        "generation.max_new_tokens=8", "generation.group_size=8", "generation.prompts_per_call=2",
        "rl.batch_prompts=8", f"rl.generators={generators}", "train.warm_start_steps=100",
        "train.warm_start_correct_share=1.0", "model.max_seq_len=32", *extra,
    ]
    return run_job(load_spec(ROOT / "examples" / "rl_digit_sum.toml", overrides))


def tail_mean(values: list[float], share: float = 0.25) -> float:
    n = max(1, int(len(values) * share))
    return sum(values[-n:]) / n if values else float("nan")


def cpu_bound(sync: dict, cores: int) -> float:
    """The samples/s ratio no overlap can beat on ``cores`` CPUs: the synchronous run's seconds per sample
    against the larger of the trainer's own compute per sample (it is serial) and all compute per sample
    (generation + training) spread over every core. Compute times are the sync run's (uncontended)."""
    per_step = sync["samples_trained"] / max(1, sync["steps_run"])
    train = sync["train_step_s"] / per_step
    best = max(train, (sync["gen_s_per_sample"] + train) / cores)
    return (1 / sync["samples_per_s"]) / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20 s of training per mode")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of training per mode")
    ap.add_argument("--eta", type=int, default=2, help="the asynchronous run's staleness bound")
    ap.add_argument("--generators", type=int, default=2, help="generator actors (both runs)")
    ap.add_argument("--set", action="append", default=[], help="extra spec overrides (train.loss=decoupled_ppo)")
    ap.add_argument("--sim", action="store_true", help="simulated devices (bench/rl_sim.py): the real controller, "
                    "staleness queue and weight sync driving generators and a trainer whose work is a time model")
    args = ap.parse_args(argv)
    if args.sim:  # the simulated-device bench lives with its roles
        sys.path.insert(0, str(ROOT / "bench"))
        from rl_sim import main as sim_main

        return sim_main((["--quick"] if args.quick else ["--budget", str(args.budget / 2)]) +
                        [x for o in args.set for x in ("--set", o)])
    budget = 20.0 if args.quick else args.budget
    from plait.runtime import ClusterConfig, connect, shutdown

    connect(ClusterConfig(num_cpus=4, num_gpus=0))
    try:
        with tempfile.TemporaryDirectory(prefix="plait-async-rl-") as tmp:
            runs = {name: run_mode(eta, budget, Path(tmp) / name, args.generators, args.set)
                    for name, eta in (("sync", 0), ("async", args.eta))}
    finally:
        shutdown()
    print(f"{'mode':6} {'eta':>3} {'steps':>6} {'samples/s':>10} {'gen busy':>9} {'trainer busy':>13} "
          f"{'reward':>7} {'train step s':>12} {'gen ms/sample':>13} {'staleness (items)'}")
    for name, s in runs.items():
        print(f"{name:6} {s['eta']:>3} {s['steps_run']:>6} {s['samples_per_s']:>10.1f} {s['gen_busy_share']:>9.3f} "
              f"{s['trainer_busy_share']:>13.3f} {tail_mean(s['rewards']):>7.3f} {s['train_step_s']:>12.3f} "
              f"{1000 * s['gen_s_per_sample']:>13.2f} {s['staleness']}")
    sync, asy = runs["sync"], runs["async"]
    ratio = asy["samples_per_s"] / sync["samples_per_s"]
    # What overlap alone could give if generators and trainer had their own cores: the sync run alternates a
    # generation phase and a training phase, so a step could shrink to the longer of the two.
    bound = 1 / max(sync["gen_busy_share"], sync["trainer_busy_share"])
    cpu_cap = cpu_bound(sync, os.cpu_count() or 1)
    print(f"RESULT samples_per_s_ratio={ratio:.2f} gen_busy_share_async={asy['gen_busy_share']:.3f} "
          f"gen_busy_share_sync={sync['gen_busy_share']:.3f} reward_async={tail_mean(asy['rewards']):.3f} "
          f"reward_sync={tail_mean(sync['rewards']):.3f} steps_async={asy['steps_run']} steps_sync={sync['steps_run']} "
          f"overlap_bound_sync={bound:.2f} cpu_bound={cpu_cap:.2f} cores={os.cpu_count()} "
          f"budget_s={budget:g} eta={args.eta} generators={args.generators} "
          f"load_avg={os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
