"""Simulated devices for the async RL bench: a job module (``job = "rl_sim"``, bench/rl_sim.toml) that runs the real
controller (plait.rl.rl_job.control: its loop, the staleness queue, checkpoints, metrics) and the real weight sync
(each trainer step publishes the policy's weights, each generator loads the version its work asks for), while
the work itself is a time model instead of CPU compute:

  * a generator's work item (``prompts_per_call`` prompts x ``group_size`` completions, decoded as one batch)
    takes ``prefill_s + decode_s_per_token * max(lengths)``: the batch runs until its longest completion ends;
    lengths are long-tailed like reasoning traces (lognormal around ``median_tokens`` with ``sigma``, capped at
    ``generation.max_new_tokens``, where the completion counts as unfinished);
  * a trainer step takes ``train_step_s + train_s_per_sample * samples``.

    python bench/rl_sim.py --quick          # about three minutes: 7 runs of 6 s (start-up not counted)
    python bench/rl_sim.py --budget 30      # (the same as bench/async_rl.py --sim)

Both sleep for their time, so many simulated generators fit on two cores and what the bench measures is the
controller's scheduling (async against sync, idle shares) and its own CPU cost per sample. ``ideal`` gives the
samples/s the same time model allows with perfect scheduling, to compare with what the controller reached.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from plait.rl import rl_config, rl_job
from plait.rl.generator import Generator, RolloutBatch
from plait.rl.trainer import Trainer

PROMPT_TOKENS = 8  # every simulated prompt's length
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SimModel:
    prefill_s: float = 0.02  # per work item
    decode_s_per_token: float = 0.002  # per decode step of the whole batch
    median_tokens: float = 40.0  # completion length: lognormal, long-tailed
    sigma: float = 0.9
    train_step_s: float = 0.01  # per trainer step
    train_s_per_sample: float = 0.006
    reward_p: float = 0.5  # each completion is correct with this probability (advantages are not all 0)

    def lengths(self, rng: random.Random, n: int, cap: int) -> list[int]:
        mu = math.log(self.median_tokens)
        return [max(1, min(cap, int(rng.lognormvariate(mu, self.sigma)))) for _ in range(n)]

    def item_s(self, lengths: list[int]) -> float:
        return self.prefill_s + self.decode_s_per_token * max(lengths)

    def step_s(self, samples: int) -> float:
        return self.train_step_s + self.train_s_per_sample * samples


def ideal(sim: SimModel, generators: int, prompts_per_call: int, group_size: int, batch_prompts: int, cap: int,
          eta: int, draws: int = 4000, seed: int = 0) -> float:
    """Samples/s with perfect scheduling under the time model. eta > 0: generators and trainer overlap fully, so
    the slower side sets the rate. eta = 0: each step's items are generated (greedy list scheduling over the
    generators, the batch waits for its last item), then trained."""
    rng = random.Random(seed)
    rows = prompts_per_call * group_size
    items = [sim.item_s(sim.lengths(rng, rows, cap)) for _ in range(draws)]
    per_step = batch_prompts * group_size
    step_s = sim.step_s(per_step)
    if eta > 0:
        gen_rate = generators * rows / (sum(items) / len(items))
        return min(gen_rate, per_step / step_s)
    k = batch_prompts // prompts_per_call
    spans = []
    for start in range(0, draws - k + 1, k):
        free = [0.0] * generators
        for t in items[start:start + k]:
            i = free.index(min(free))
            free[i] += t
        spans.append(max(free))
    return per_step / (sum(spans) / len(spans) + step_s)


class SimGenerator(Generator):
    """A generator whose work is the time model: the real weight load, then a sleep, then a batch of the right
    shapes (random tokens, Bernoulli rewards) for the real queue and collate."""

    def __init__(self, policy, gen_cfg, seed: int, index: int, reward=None, sim: SimModel | None = None):
        super().__init__(policy, gen_cfg, seed, index, reward)
        self.sim = sim or SimModel()

    def generate(self, work, published) -> RolloutBatch:
        load_s = self._load(published)  # the real weight sync: the version this work asks for
        rng = random.Random(self.seed * 1_000_003 + work.uid)
        g = self.cfg.group_size
        rows = work.prompts * g
        lengths = self.sim.lengths(rng, rows, work.max_new_tokens)
        t0 = time.perf_counter()
        time.sleep(self.sim.item_s(lengths))
        gen_time = time.perf_counter() - t0
        width = PROMPT_TOKENS + max(lengths)
        gen = torch.Generator().manual_seed(work.uid)
        tokens = torch.randint(1, self.policy.vocab_size, (rows, width), generator=gen)
        mask = torch.zeros(rows, width, dtype=torch.bool)
        for i, n in enumerate(lengths):
            mask[i, PROMPT_TOKENS:PROMPT_TOKENS + n] = True
        rewards = torch.tensor([float(rng.random() < self.sim.reward_p) for _ in range(rows)])
        finished = torch.tensor([n < work.max_new_tokens for n in lengths])
        return RolloutBatch(uid=work.uid, task_ids=list(work.task_ids), version=self.version,
                            versions=[self.version], tokens=tokens, mask=mask,
                            behaviour_logprobs=torch.where(mask, -1.0, 0.0), rewards=rewards, group_size=g,
                            completion_tokens=int(mask.sum()), gen_time_s=gen_time, load_time_s=load_s,
                            generator=self.index, texts=[str(rng.randrange(100)) for _ in range(rows)],
                            finished=finished, train_rewards=torch.where(finished, rewards, self.cfg.unfinished_reward),
                            prompt_texts=[f"prompt {i}" for i in work.task_ids])


class SimTrainer(Trainer):
    """A trainer whose step is the time model; the version count, the one loop's bookkeeping and the real weight
    publication (every rank's share of the gathers) are the Trainer's."""

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.sim: SimModel = cfg.sim

    def train_step(self, batch: dict) -> dict | None:
        t0 = time.perf_counter()
        time.sleep(self.sim.step_s(int(batch["tokens"].shape[0]) * self.ctx.world_size))
        self.version += 1
        compute_s = time.perf_counter() - t0
        self.loop.step_done(loss=0.0)
        published = self._publish()
        if not self.ctx.is_main:
            return None
        zero = dict.fromkeys(("is_weight", "truncated_frac", "clip_frac", "behaviour_kl", "step_kl"), 0.0)
        return {"version": self.version, "published": published, "loss": 0.0, "compute_s": compute_s,
                "grad_norm": 0.0, "updated": 1.0, **zero}


@dataclass
class Config(rl_config.Config):
    sim: SimModel = field(default_factory=SimModel)


validate = rl_config.validate


def control(job, cfg: Config) -> dict:
    return rl_job.control(job, cfg, SimGenerator, SimTrainer, generator_args=(cfg.sim,))


def summarize(cfg: Config, run_dir, result: dict) -> dict:
    keep = ("version", "steps_run", "eta", "samples_trained", "samples_per_s", "gen_busy_share",
            "trainer_busy_share", "loop_s", "driver_cpu_s", "samples_received", "staleness", "startup_s")
    return {k: result[k] for k in keep if k in result}


# --- the bench ---------------------------------------------------------------------------------------------

def run_sim(eta: int, generators: int, budget_s: float, run_dir: Path, extra: list[str]) -> tuple[dict, float]:
    """One run of the real controller over simulated devices (bench/rl_sim.py) and its ideal samples/s. A step
    takes 2 prompts per generator (one work item each; the staleness bound then admits (eta + 1) items per
    generator) and the trainer's time per sample scales with 4 / generators, so generation and training stay
    balanced as the generators grow and the controller handles proportionally more samples per second."""
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    spec = load_spec(ROOT / "bench" / "rl_sim.toml", [f"run_dir={run_dir}", f"rl.eta={eta}",
                                                      f"rl.generators={generators}", f"train.time_budget_s={budget_s}",
                                                      f"rl.batch_prompts={2 * generators}",
                                                      *extra])
    cfg = spec.config
    cfg.sim.train_s_per_sample *= 4 / generators
    cfg.sim.train_step_s *= 4 / generators
    gen = cfg.generation
    best = ideal(cfg.sim, generators, gen.prompts_per_call, gen.group_size, cfg.rl.batch_prompts, gen.max_new_tokens,
                 eta)
    return run_job(spec), best


def main_sim(args, budget: float) -> int:
    """The simulated-device mode: async/sync at eta 1, 2, 4 against the time model's ideal, generator idle
    share, and the driver's CPU per sample at 2, 8 and 16 generators."""
    from plait.runtime import ClusterConfig, connect, shutdown

    connect(ClusterConfig(num_cpus=24, num_gpus=0))
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="plait-rl-sim-") as tmp:
            for eta in (0, 1, 2, 4):
                s, best = run_sim(eta, 4, budget, Path(tmp) / f"eta{eta}", args.set)
                rows.append(("eta", eta, 4, s, best))
            for n in (2, 8, 16):
                s, best = run_sim(2, n, budget, Path(tmp) / f"g{n}", args.set)
                rows.append(("gens", 2, n, s, best))
    finally:
        shutdown()
    print(f"{'run':5} {'eta':>3} {'gens':>4} {'steps':>6} {'samples/s':>10} {'ideal':>8} {'of ideal':>8} "
          f"{'gen idle':>8} {'trainer busy':>12} {'driver cpu ms/sample':>20} staleness")
    for kind, eta, n, s, best in rows:
        cpu_ms = 1000 * s["driver_cpu_s"] / max(1, s["samples_received"])
        print(f"{kind:5} {eta:>3} {n:>4} {s['steps_run']:>6} {s['samples_per_s']:>10.1f} {best:>8.1f} "
              f"{s['samples_per_s'] / best:>8.3f} {1 - s['gen_busy_share']:>8.3f} {s['trainer_busy_share']:>12.3f} "
              f"{cpu_ms:>20.3f} {s['staleness']}")
    by_eta = {eta: (s, best) for kind, eta, n, s, best in rows if kind == "eta"}
    sync, sync_ideal = by_eta[0]
    parts = []
    for eta in (1, 2, 4):
        s, best = by_eta[eta]
        parts.append(f"ratio_eta{eta}={s['samples_per_s'] / sync['samples_per_s']:.2f}")
    for eta in (1, 2, 4):
        s, best = by_eta[eta]
        parts.append(f"ideal_ratio_eta{eta}={best / sync_ideal:.2f} of_ideal_eta{eta}={s['samples_per_s'] / best:.3f}"
                     f" gen_idle_eta{eta}={1 - s['gen_busy_share']:.3f}")
    parts.append(f"sync_of_ideal={sync['samples_per_s'] / sync_ideal:.3f}")
    for kind, _, n, s, best in rows:
        if kind == "gens":
            parts.append(f"driver_cpu_ms_per_sample_g{n}={1000 * s['driver_cpu_s'] / max(1, s['samples_received']):.3f}"
                         f" of_ideal_g{n}={s['samples_per_s'] / best:.3f}")
    print("RESULT " + " ".join(parts) + f" budget_s={budget:g} load_avg={os.getloadavg()[0]:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 s of training per run")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of training per run")
    ap.add_argument("--set", action="append", default=[], help="extra spec overrides (sim.sigma=1.2)")
    args = ap.parse_args(argv)
    return main_sim(args, 6.0 if args.quick else args.budget)


if __name__ == "__main__":
    sys.exit(main())
