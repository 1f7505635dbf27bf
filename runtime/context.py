"""The per-rank context a train function receives: who it is, where it runs, where it writes.

Nothing here is global: a rank's function gets this object as its first argument and passes it (or
the mesh built from it) down explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[plait rank0] {msg}", flush=True)
