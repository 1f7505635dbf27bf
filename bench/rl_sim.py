"""Simulated devices for the async RL bench: a job module (``job = "rl_sim"``, bench/rl_sim.toml) that runs the real
controller (plait.rl.rl_job.control: its loop, the staleness queue, checkpoints, metrics) and the real weight sync
(each trainer step publishes the policy's weights, each generator loads the version its work asks for), while
the work itself is a time model instead of CPU compute:

  * a generator's work item (``prompts_per_call`` prompts x ``group_size`` completions, decoded as one batch)
    takes ``prefill_s + decode_s_per_token * max(lengths)``: the batch runs until its longest completion ends;
    lengths are long-tailed like reasoning traces (lognormal around ``median_tokens`` with ``sigma``, capped at
    ``generation.max_new_tokens``, where the completion counts as unfinished);
  * a trainer step takes ``train_step_s + train_s_per_sample * samples``.

Both sleep for their time, so many simulated generators fit on two cores and what the bench measures is the
controller's scheduling (async against sync, idle shares) and its own CPU cost per sample. ``ideal`` gives the
samples/s the same time model allows with perfect scheduling, to compare with what the controller reached.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from plait.rl import rl_config, rl_job
from plait.rl.generator import Generator, RolloutBatch
from plait.rl.trainer import Trainer

PROMPT_TOKENS = 8  # every simulated prompt's length


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
