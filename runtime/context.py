"""The per-rank context a train function receives: who it is, where it runs, where it writes.

Nothing here is global: a rank's function gets this object as its first argument and passes it (or
the mesh built from it) down explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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

    def step_done(self, step: int) -> None:
        """Call after every training step: the driver's watchdog learns the step rhythm from it and names a rank
        that stops keeping it (runtime/watchdog.py). Free: one attribute write. A no-op outside a Ray group."""
        if self.heartbeat is not None:
            self.heartbeat.step_done(step)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[plait rank0] {msg}", flush=True)
