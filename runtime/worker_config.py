"""How a worker group is shaped: the [workers] settings, GPUs per rank, local ranks per node."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class WorkerConfig:
    num: int = 2  # ranks
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = -1  # -1: one GPU per rank (the cluster must have enough) or CPU on a GPU-less cluster
    strategy: str = "PACK"
    threads_per_worker: int = 0  # torch intra-op threads; 0 = max(1, int(cpus_per_worker))
    placement_timeout_s: float = 60.0
    pg_timeout_s: float = 1800.0  # torch.distributed process-group timeout (a collective waiting on a peer)
    call_timeout_s: float = 0.0  # the driver's wait for one group.run call; 0 = no limit
    max_restarts: int = 0  # job-level restarts from the latest checkpoint after a rank crashes
    stop_grace_s: float = 120.0  # after Ctrl-C / SIGTERM: how long the ranks get to checkpoint and return

    def check(self) -> None:
        if self.num < 1:
            raise ValueError(f"workers.num={self.num}: need at least one rank")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"workers.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"workers.cpus_per_worker={self.cpus_per_worker}: must be > 0")
        if self.gpus_per_worker < 0 and self.gpus_per_worker != -1:
            raise ValueError(f"workers.gpus_per_worker={self.gpus_per_worker}: use -1 (auto), 0 (CPU) or > 0")
        if self.pg_timeout_s <= 0:
            raise ValueError(f"workers.pg_timeout_s={self.pg_timeout_s}: must be > 0 seconds")
        if self.call_timeout_s < 0:
            raise ValueError(f"workers.call_timeout_s={self.call_timeout_s}: use 0 (no limit) or > 0 seconds")
        if self.stop_grace_s <= 0:
            raise ValueError(f"workers.stop_grace_s={self.stop_grace_s}: must be > 0 seconds (how long the ranks get "
                             "to commit a checkpoint after Ctrl-C or SIGTERM)")


class PlacementError(RuntimeError):
    """The cluster cannot place the requested ranks; the message says what to lower or free."""

    user_error = True


def gpus_per_rank(requested: float, cluster_gpus: float, num: int) -> float:
    """GPUs each rank gets: ``requested`` when >= 0; for -1 (auto), one each, or 0 on a GPU-less cluster.

    A cluster with some GPUs but fewer than ranks is an error, not a silent fall-back to CPU.
    """
    if requested >= 0:
        return requested
    if cluster_gpus <= 0:
        return 0
    if cluster_gpus >= num:
        return 1
    raise PlacementError(
        f"workers.num={num} ranks want one GPU each (workers.gpus_per_worker=-1, auto), but the Ray cluster has "
        f"{cluster_gpus:g} GPU: ask for at most {int(cluster_gpus)} ranks, or set workers.gpus_per_worker=0 "
        "to run every rank on CPU"
    )


def local_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """``(local_rank, local_world_size)`` of each rank, given the Ray node id each rank runs on."""
    return [(node_ids[:rank].count(node), node_ids.count(node)) for rank, node in enumerate(node_ids)]
