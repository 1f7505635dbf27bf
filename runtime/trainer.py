"""The one training loop: resume point, step and checkpoint cadence, metrics, watchdog, stop requests, faults.

Every job drives it the same way; only what happens inside a step is the job's:

    loop = TrainLoop(ctx, cfg.train, total=cfg.train.steps, state=ModelOptimizer(parts.modules, parts.optimizers),
                     meta=lambda done: {"data": batches.data_state(done)})
    for step in loop:                          # step = the 0-based index of the step about to run
        loss = parts.train_step(*batches.batch(step, dp_rank, dp), lr_at(step, loop.total, optim))
        loop.step_done(loss=loss, lr=...)      # metrics, checkpoint when due, watchdog, stop request, faults
    result = loop.finish()                     # LoopResult: start step, steps run, losses, checkpoint, stopped

What the loop owns, so that no job restates it:
  * resume: ``ctx.resume_from`` (decided on the driver, runtime/run_dir.py) is loaded into ``state`` before the
    first step; the checkpoint's step is where the loop starts. A checkpoint records the run's total steps: a
    resume with another total is refused unless ``reschedule`` (the learning-rate schedule is a function of the
    total, so a silent change would alter it; with ``reschedule=true`` the loop says in one line that it does).
  * cadence: a checkpoint every ``checkpoint_every`` steps (times ``boundary``: a GNN epoch is ``boundary``
    steps, and it resumes only at epoch ends) and after the last step; metrics every step (rank 0).
  * the watchdog's rhythm (``ctx.step_done``), once before the first step and after each one.
  * a stop request (``ctx.stop_requested()``: SIGTERM to the driver, runtime/job.py): at the next boundary the
    loop commits a checkpoint (unless it just did) and ends; ``LoopResult.stopped`` says so.
  * fault injection for tests (runtime/faults.py: ``PLAIT_FAULTS``), after each step and at the start.

A job whose steps are driven from outside (the RL trainer: the controller on the driver hands it one step at a
time and decides when to checkpoint, as only it knows the rollout position) makes the loop with
``autosave=False``, calls ``begin()`` once, ``step_done(...)`` after each step and ``save(meta)`` when the
controller asks; resume, the reschedule check, the watchdog and faults stay the loop's.

``LoopConfig`` holds the fields a job's ``[train]`` table shares: a job's TrainConfig subclasses it. A job whose
position is not the step alone (a GNN epoch's batches depend on the number of ranks) passes ``resume_step(meta)``;
one without a schedule over the total (constant learning rate) passes ``schedule_follows_total=False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from plait.runtime.checkpoint import Checkpointer
from plait.runtime.context import RankContext
from plait.runtime.faults import active_faults, inject
from plait.runtime.metrics import MetricsLogger


@dataclass
class LoopConfig:
    checkpoint_every: int = 0  # steps (a GNN job: epochs) between checkpoints; 0 = only at the end
    keep_last: int = 2  # committed checkpoints kept
    resume: str = ""  # "" fresh, "latest" (continue this run_dir), or a committed checkpoint folder
    reschedule: bool = False  # resuming with another number of steps: allowed (the lr schedule follows the new total)

    def checkpoint_due(self, n: int, total: int, boundary: int = 1) -> bool:
        """Whether the step (or weight version) ``n`` of a run of ``total`` is checkpointed: every
        ``checkpoint_every`` boundaries, and the last."""
        every = self.checkpoint_every * boundary
        return n == total or (bool(every) and n % every == 0)

    def check_loop(self) -> None:
        if self.checkpoint_every < 0 or self.keep_last < 1:
            raise ValueError(f"train.checkpoint_every={self.checkpoint_every} (>= 0, 0 = only at the end) and "
                             f"train.keep_last={self.keep_last} (>= 1) out of range")


def check_reschedule(saved_total: int | None, total: int, reschedule: bool, what: str = "train.steps") -> str:
    """'' when a checkpoint of a run of ``saved_total`` steps may continue as a run of ``total``; else raises
    ValueError (not asked for) or returns the one line that says the schedule changes (asked for)."""
    if saved_total is None or int(saved_total) == total:
        return ""
    if not reschedule:
        raise ValueError(f"{what}={total} but the checkpoint belongs to a run of {saved_total}: the learning-rate "
                         f"schedule (warm-up, cosine decay to the last step) depends on it. Resume with "
                         f"{what}={saved_total}, or add train.reschedule=true to continue with the schedule of a "
                         f"{total}-step run from here")
    return (f"train.reschedule: continuing a {saved_total}-step run as a {total}-step run; the learning-rate "
            f"schedule now decays to step {total}")


@dataclass
class LoopResult:
    start_step: int  # where this attempt started (the resume point)
    steps: int  # the last step done
    total: int
    losses: list[float] = field(default_factory=list)  # this attempt's, in order
    checkpoint: str | None = None  # the newest committed checkpoint
    stopped: bool = False  # ended early on a stop request (a checkpoint was committed first)
    meta: dict = field(default_factory=dict)  # the resumed checkpoint's meta.json ({} on a fresh start)

    def as_dict(self) -> dict:
        return {"start_step": self.start_step, "steps": self.steps, "total": self.total, "losses": self.losses,
                "checkpoint": self.checkpoint, "stopped": self.stopped}


class TrainLoop:
    """See the module docstring. ``state`` is what checkpoints hold (ModelOptimizer, EngineState, or anything
    ``Checkpointer.save`` takes); ``meta(done)`` adds the job's own position to each checkpoint's meta.json."""

    def __init__(self, ctx: RankContext, cfg: LoopConfig, *, total: int, state: Any,
                 meta: Callable[[int], dict] | None = None, boundary: int = 1, metrics: bool = True,
                 desc: str = "train", resume_step: Callable[[dict], int] | None = None,
                 schedule_follows_total: bool = True, autosave: bool = True):
        if total < 0 or boundary < 1:
            raise ValueError(f"TrainLoop(total={total}, boundary={boundary}): total >= 0 and boundary >= 1")
        self.ctx, self.cfg, self.total, self.state, self.boundary = ctx, cfg, total, state, boundary
        self._meta = meta or (lambda done: {})
        self._resume_step = resume_step or (lambda saved: int(saved.get("step", 0)))
        self._check_total = schedule_follows_total
        self.autosave = autosave  # False: the caller decides when to save (and handles stop requests)
        self.ckpt = Checkpointer(ctx.run_dir / "checkpoints", keep_last=cfg.keep_last, run_id=ctx.run_id)
        self.faults = active_faults()
        self.resumed: dict = {}
        self.start = self._resume()
        self.done = self.start
        self.losses: list[float] = []
        self.stopped = False
        self._saved_at = self.start if ctx.resume_from is not None else -1
        self.metrics = MetricsLogger(ctx.run_dir, enabled=ctx.is_main and metrics, total_steps=total,
                                     start_step=self.start, device=ctx.device, desc=desc)
        self._t0 = time.perf_counter()

    def _resume(self) -> int:
        if self.ctx.resume_from is None:
            return 0
        self.resumed = self.ckpt.load(self.ctx.resume_from, self.state) or {}
        start = self._resume_step(self.resumed)
        saved_total = self.resumed.get("total_steps") if self._check_total else None
        note = check_reschedule(saved_total, self.total, self.cfg.reschedule)
        if note:
            self.ctx.log(note)
        if start > self.total:
            raise ValueError(f"the checkpoint {self.ctx.resume_from} is at step {start}, past the run's {self.total} "
                             "steps: raise the total (with train.reschedule=true) or resume an earlier checkpoint")
        self.ctx.log(f"resumed from {self.ctx.resume_from} (step {start})")
        return start

    def begin(self) -> None:
        """Before the first step: the watchdog's rhythm starts here (runtime/watchdog.py); ``start`` faults."""
        self.ctx.step_done(self.start)
        inject("start", self.start, run_dir=self.ctx.run_dir, faults=self.faults, rank=self.ctx.rank,
               attempt=self.ctx.attempt)

    def __iter__(self) -> Iterator[int]:
        self.begin()
        while self.done < self.total and not self.stopped:
            step = self.done
            self._t0 = time.perf_counter()
            yield step
            if self.done == step:
                raise RuntimeError(f"step {step + 1} ended without loop.step_done(...): call it once per step")

    def elapsed(self) -> float:
        """Seconds since the current step began (its ``step_time_s``)."""
        return time.perf_counter() - self._t0

    def step_done(self, **scalars: Any) -> None:
        """The step just run is done: its metrics (``step_time_s`` is added when not given), a checkpoint when
        due or when a stop was requested at a boundary, the watchdog, injected faults."""
        self.done += 1
        n = self.done
        scalars.setdefault("step_time_s", time.perf_counter() - self._t0)
        if "loss" in scalars:
            self.losses.append(float(scalars["loss"]))
        self.metrics.log(n, **scalars)
        at_boundary = n % self.boundary == 0 or n == self.total
        stop = self.autosave and at_boundary and n < self.total and self._stop_requested()
        if self.autosave and (self.cfg.checkpoint_due(n, self.total, self.boundary) or stop):
            self.save()
        self.ctx.step_done(n)
        inject("step", n, run_dir=self.ctx.run_dir, faults=self.faults, rank=self.ctx.rank, attempt=self.ctx.attempt)
        if stop:
            self.stopped = True
            self.ctx.log(f"stop requested: committed the checkpoint at step {n} and stopped")

    def _stop_requested(self) -> bool:
        """Whether the run was asked to stop (``ctx.stop_requested()``: collective, every rank gets the same answer,
        so all stop after the same step; a checkpoint is a collective)."""
        ask = getattr(self.ctx, "stop_requested", None)
        return bool(ask()) if ask is not None else False

    def save(self, meta: dict | None = None) -> str | None:
        """Commit a checkpoint of the current step (collective), unless one of this step exists already; ``meta``
        adds to the job's own. Returns the committed folder (None when it existed)."""
        if self._saved_at == self.done:
            return None
        path = self.ckpt.save(self.done, self.state,
                              meta={"total_steps": self.total, **self._meta(self.done), **(meta or {})})
        self._saved_at = self.done
        return str(path)

    def finish(self) -> LoopResult:
        self.metrics.close()
        latest = self.ckpt.latest()
        return LoopResult(self.start, self.done, self.total, self.losses, str(latest) if latest else None,
                          self.stopped, self.resumed)
