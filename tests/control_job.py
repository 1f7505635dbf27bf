"""A control job for runtime tests: on the driver, it drives a 2-rank trainer group and a pool of
generator actors together. Generators make samples while the trainer trains on the previous ones;
the trainer's last rank can be made to die once, to exercise the restart of control."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class WorkConfig:
    rounds: int = 3
    generators: int = 2
    crash_round: int = 0  # the trainer's last rank dies in this round (first attempt only); 0 = never
    round_sleep_s: float = 0.0  # each round also sleeps this long on the driver (a run slow enough to stop)


@dataclass
class Config:
    work: WorkConfig = field(default_factory=WorkConfig)


class Generator:
    def __init__(self, seed: int):
        self.seed, self.made = seed, 0

    def generate(self, version: int) -> dict:
        self.made += 1
        return {"sample": float(self.seed + 1), "version": version}

    def made_count(self) -> int:
        return self.made


class Trainer:
    def __init__(self, ctx, crash_round: int):
        self.ctx, self.crash_round = ctx, crash_round
        self.version, self.seen = 0, 0.0

    def step(self, samples: list[float]) -> dict:
        if self.version + 1 == self.crash_round and self.ctx.attempt == 0 and self.ctx.rank == self.ctx.world_size - 1:
            os._exit(17)
        t = torch.tensor([float(sum(samples))])
        dist.all_reduce(t)
        self.seen += t.item()
        self.version += 1
        self.ctx.step_done(self.version)  # the driver's watchdog learns the trainer's rhythm
        return {"version": self.version, "seen": self.seen}


def control(job, cfg: Config) -> dict:
    w = cfg.work
    trainer = job.worker_group(num=2, cpus_per_worker=1)
    trainer.start(Trainer, w.crash_round)
    pool = job.actor_pool(Generator, w.generators, per_actor_args=[(i,) for i in range(w.generators)], cpus=0.5,
                          name="generator")
    for i in range(len(pool)):
        pool.submit(i, "generate", 0)
    stats, stopped_at = [], None
    for version in range(1, w.rounds + 1):
        batch = [pool.next_done() for _ in range(len(pool))]
        samples = sorted(done.value["sample"] for done in batch)
        refs = trainer.submit("step", per_rank_args=[(samples[r::2],) for r in range(2)])
        for done in batch:  # the generators make the next samples while the trainer trains
            pool.submit(done.index, "generate", version)
        stats = trainer.gather(refs)
        time.sleep(w.round_sleep_s)
        if job.stop_requested():  # Ctrl-C or SIGTERM on the driver: return now (a real job commits a checkpoint)
            stopped_at = version
            break
    while pool.in_flight():
        pool.next_done()
    return {"attempt": job.attempt, "version": stats[0]["version"], "seen": stats[0]["seen"],
            "made": pool.call_all("made_count"), "ranks_agree": stats[0] == stats[1], "stopped_at": stopped_at}


def summarize(cfg: Config, run_dir, result: dict) -> dict:
    return dict(result)
