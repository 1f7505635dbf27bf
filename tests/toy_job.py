"""A small custom job module for runtime tests: a linear model, gradients all-reduced by hand, with
the runtime's checkpointer and metrics logger, and fault injection. Only plait.runtime is used."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from plait.runtime.checkpoint import Checkpointer, ModelOptimizer
from plait.runtime.context import RankContext
from plait.runtime.metrics import MetricsLogger


@dataclass
class TrainConfig:
    steps: int = 4
    checkpoint_every: int = 1
    keep_last: int = 3
    resume: str = ""
    fail: str = ""  # "", "crash:N" (last rank's process dies after step N, first attempt only),
    #                 "value_error:N" (a ValueError at step N, every attempt), "import_error" (at start),
    #                 "user_error:N" (the last rank raises BadInput, an error marked user_error, at step N),
    #                 "hang:N" (last rank writes stuck.rankR = its pid, then sleeps inside step N before its all-reduce,
    #                 first attempt only),
    #                 "slow_save:N" (in checkpoint N's save, after the data files are written, every rank
    #                 writes saving.rankR holding its pid and the last rank sleeps: first attempt only)
    step_sleep_s: float = 0.0  # every step also sleeps this long (a run slow enough to interrupt from outside)
    honor_stop: bool = True  # False: the loop never asks ctx.stop_requested() (a job that ignores Ctrl-C/SIGTERM)
    prepare_s: float = 0.0  # prepare (on the driver, before the ranks start) says so and takes this long
    record_nodes: bool = False  # each rank writes node.attemptA.rankR: its Ray node id and whether it is the head


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)


class BadInput(Exception):
    """An error in the user's input raised on a rank: its message names the value and the fix."""

    user_error = True


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)


class SlowSave(ModelOptimizer):
    """A checkpoint state whose save announces itself (``saving.rankR`` = pid) and, on the last rank, stalls
    mid-write: a test kills a rank's process from outside at that point."""

    def __init__(self, ctx: RankContext, step: int, *parts):
        super().__init__(*parts)
        self.ctx, self.step = ctx, step

    def save_to(self, path) -> None:
        super().save_to(path)
        if f".step_{self.step:08d}.tmp" in str(path) and self.ctx.attempt == 0:
            marker = self.ctx.run_dir / f"saving.rank{self.ctx.rank}"
            tmp = marker.parent / f".{marker.name}.tmp"
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, marker)
            if self.ctx.rank == self.ctx.world_size - 1:
                time.sleep(600)


def _record_node(ctx: RankContext) -> None:
    import json

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    record = {"node_id": node_id, "head": "node:__internal_head__" in node["Resources"]}
    (ctx.run_dir / f"node.attempt{ctx.attempt}.rank{ctx.rank}").write_text(json.dumps(record))


def prepare(cfg: Config, run_dir) -> None:
    if cfg.train.prepare_s:
        print("[toy] preparing", flush=True)
        time.sleep(cfg.train.prepare_s)


def train(ctx: RankContext, cfg: Config) -> dict:
    t = cfg.train
    with open(ctx.run_dir / f"attempts.rank{ctx.rank}", "a") as f:
        f.write(f"{ctx.attempt}\n")
    if t.fail == "import_error":
        import plait_module_that_does_not_exist  # noqa: F401
    if t.record_nodes:
        _record_node(ctx)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    slow = t.fail.startswith("slow_save:")
    state = SlowSave(ctx, int(t.fail.split(":")[1]), model, opt) if slow else ModelOptimizer(model, opt)
    ckpt = Checkpointer(ctx.run_dir / "checkpoints", keep_last=t.keep_last, run_id=ctx.run_id)
    start = ckpt.load(ctx.resume_from, state)["step"] if ctx.resume_from is not None else 0
    metrics = MetricsLogger(ctx.run_dir, enabled=ctx.is_main, total_steps=t.steps, start_step=start, progress="off")
    ctx.step_done(start)  # started: the watchdog now watches the first step too (watchdog.first_step_s)
    losses, stopped_at = [], None
    for step in range(start, t.steps):
        x, y = _batch(step)
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        time.sleep(t.step_sleep_s)
        if t.fail == f"hang:{step + 1}" and ctx.attempt == 0 and ctx.rank == ctx.world_size - 1:
            marker = ctx.run_dir / f"stuck.rank{ctx.rank}"  # its pid, for a test that kills it from outside
            marker.with_suffix(".tmp").write_text(str(os.getpid()))
            os.replace(marker.with_suffix(".tmp"), marker)
            time.sleep(600)  # stuck inside the step: its peers wait in the all-reduce below
        for p in model.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        opt.step()
        losses.append(loss.item())
        metrics.log(step + 1, loss=loss.item())
        if t.fail == f"value_error:{step + 1}":
            raise ValueError(f"bad value at step {step + 1}")
        if t.fail == f"user_error:{step + 1}" and ctx.rank == ctx.world_size - 1:
            raise BadInput(f"row {step + 1} of the input holds 'x' where a number belongs: fix the input file")
        if t.fail == f"crash:{step + 1}" and ctx.attempt == 0 and ctx.rank == ctx.world_size - 1:
            os._exit(17)
        saved = bool(t.checkpoint_every) and (step + 1) % t.checkpoint_every == 0
        if saved:
            ckpt.save(step + 1, state)
        ctx.step_done(step + 1)
        if t.honor_stop and ctx.stop_requested():  # Ctrl-C or SIGTERM: commit this step and return (all agree)
            if not saved:
                ckpt.save(step + 1, state)
            stopped_at = step + 1
            break
    metrics.close()
    return {"start_step": start, "losses": losses, "weight": model.weight.detach().clone(),
            "resume_from": str(ctx.resume_from) if ctx.resume_from else None, "stopped_at": stopped_at}


def summarize(cfg: Config, run_dir, results: list[dict]) -> dict:
    return results[0]
