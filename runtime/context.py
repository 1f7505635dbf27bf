"""The per-rank context a train function receives: who it is, where it runs, where it writes.

Nothing here is global: a rank's function gets this object as its first argument and passes it (or
the mesh built from it) down explicitly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class StopFlag:
    """Set when this rank is asked to stop (the driver's request seen by the heartbeat thread, or a signal under
    torchrun/mpirun). A copy sent elsewhere (pickled) starts unset."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""  # who asked: "SIGTERM", "SIGINT" (a signal to this rank), "driver"

    def set(self, reason: str = "") -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __reduce__(self):
        return type(self), ()


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_ip: str
    device: torch.device
    backend: str  # "gloo" or "nccl"
    run_dir: Path
    attempt: int = 0  # restarts of the job so far (0 on the first try)
    run_id: str = ""  # this run's id (the runtime's, written into every checkpoint it commits)
    resume_from: Path | None = None  # the committed checkpoint to load before training (None: fresh start),
    # decided on the driver: the user's train.resume on the first attempt, this run's own latest after a restart
    heartbeat: Any = field(default=None, repr=False, compare=False)  # runtime/watchdog.py's Heartbeat (Ray ranks)
    stop: StopFlag | None = field(default=None, repr=False, compare=False)  # None: nobody can ask this rank to stop

    def step_done(self, step: int) -> None:
        """Call after every training step: the driver's watchdog learns the step rhythm from it and names a rank
        that stops keeping it (runtime/watchdog.py). Free: one attribute write. A no-op outside a Ray group."""
        if self.heartbeat is not None:
            self.heartbeat.step_done(step)

    def stop_requested(self) -> bool:
        """Whether the run was asked to stop (Ctrl-C or SIGTERM on the driver; SIGTERM to the rank under torchrun or
        mpirun): then commit a checkpoint for the step just done and return. Collective: every rank calls it at the
        same point of its loop (after each step), and all get the same answer, so all stop after the same step; it
        costs one all-reduce of one number (none when nothing can ask this group to stop)."""
        if self.stop is None:
            return False
        import torch.distributed as dist

        mine = self.stop.is_set()
        if self.world_size == 1 or not dist.is_initialized():
            return mine
        flag = torch.tensor([1 if mine else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[plait rank0] {msg}", flush=True)
