"""Plait's ground floor: Ray clusters, rank worker groups, torch.distributed, checkpoints, metrics."""

from plait.runtime.actor_pool import ActorCallError, ActorLost, ActorPool, RestartLimitError
from plait.runtime.cluster import ClusterConfig, connect, shutdown
from plait.runtime.context import RankContext
from plait.runtime.worker_group import PlacementError, RankError, WorkerConfig, WorkerGroup, run_ranks

__all__ = [
    "ActorCallError", "ActorLost", "ActorPool", "RestartLimitError",
    "ClusterConfig", "PlacementError", "RankContext", "RankError", "WorkerConfig", "WorkerGroup",
    "connect", "run_ranks", "shutdown",
]
