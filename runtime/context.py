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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[plait rank0] {msg}", flush=True)
