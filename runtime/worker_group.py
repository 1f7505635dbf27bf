"""A worker group: N rank actors in one placement group, wired into one torch.distributed group.

    with WorkerGroup(WorkerConfig(num=4), run_dir) as group:
        results = group.run(train, cfg)          # train(ctx: RankContext, cfg) on every rank

Rank 0's node address and a free port there become the rendezvous; each actor initialises
torch.distributed (NCCL when it was given a GPU, gloo otherwise). A failure on any rank is raised
in the driver as one ``RankError`` naming the rank and carrying its traceback, and the whole group
is torn down (peers blocked in a collective are killed, not waited for).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import ray
from plait.runtime.context import RankContext
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class WorkerConfig:
    num: int = 2  # ranks
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = -1  # -1: one GPU per rank when the cluster has enough, else 0
    strategy: str = "PACK"
    threads_per_worker: int = 0  # torch intra-op threads; 0 = max(1, int(cpus_per_worker))
    placement_timeout_s: float = 60.0
    max_restarts: int = 0  # job-level restarts from the latest checkpoint after a rank fails

    def check(self) -> None:
        if self.num < 1:
            raise ValueError(f"workers.num={self.num}: need at least one rank")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"workers.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"workers.cpus_per_worker={self.cpus_per_worker}: must be > 0")


class RankError(RuntimeError):
    """One rank failed; ``rank`` says which, ``remote_traceback`` holds its traceback."""

    def __init__(self, rank: int, world_size: int, node_ip: str, detail: str, cause: BaseException | None):
        self.rank, self.node_ip, self.remote_traceback, self.cause = rank, node_ip, detail, cause
        super().__init__(f"rank {rank} of {world_size} (node {node_ip}) failed:\n{detail}")


class PlacementError(RuntimeError):
    """The cluster cannot place the requested ranks."""


@ray.remote
class RankActor:
    """One rank. Owns its torch.distributed process group for the actor's lifetime."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.ctx: RankContext | None = None

    def node_info(self) -> tuple[str, list[int]]:
        return _node_ip(), [int(i) for i in ray.get_gpu_ids()]

    def free_port(self, loopback: bool) -> tuple[str, int]:
        ip = "127.0.0.1" if loopback else _node_ip()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, fields: dict, master: tuple[str, int], timeout_s: float) -> str:
        import torch
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and bool(ray.get_gpu_ids())
        device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        backend = "nccl" if use_cuda else "gloo"
        if master[0].startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.update(
            MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(fields["rank"]),
            WORLD_SIZE=str(fields["world_size"]), LOCAL_RANK=str(fields["local_rank"]),
        )
        dist.init_process_group(
            backend, init_method=f"tcp://{master[0]}:{master[1]}", rank=fields["rank"],
            world_size=fields["world_size"], timeout=timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
        self.ctx = RankContext(device=device, backend=backend, **fields)
        return backend

    def run(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return fn(self.ctx, *args, **kwargs)
        except BaseException as e:  # keep the remote traceback readable in the driver
            raise _RemoteFailure(type(e).__name__, traceback.format_exc()) from None

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _wait_removed(pg, timeout_s: float = 10.0) -> None:
    """Block until Ray records the placement group as removed, so its resources are free again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.util.placement_group_table(pg).get("state") == "REMOVED":
            return
        time.sleep(0.05)


def _node_ip() -> str:
    """The address this node registered with Ray (127.0.0.1 for the embedded cluster)."""
    try:
        return ray._private.worker.global_worker.node_ip_address  # noqa: SLF001
    except AttributeError:
        return ray.util.get_node_ip_address()


class _RemoteFailure(Exception):
    def __init__(self, kind: str, tb: str):
        super().__init__(kind, tb)
        self.kind, self.tb = kind, tb

    def __str__(self) -> str:
        return self.tb


class WorkerGroup:
    def __init__(self, cfg: WorkerConfig, run_dir: str | Path, *, attempt: int = 0, pg_timeout_s: float = 1800,
                 env: dict[str, str] | None = None):
        cfg.check()
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call plait.runtime.connect() first")
        self.cfg, self.run_dir, self.attempt = cfg, Path(run_dir).resolve(), attempt
        self.world_size = cfg.num
        gpus = self._gpus_per_worker()
        self._check_capacity(gpus)
        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(cfg.num)], strategy=cfg.strategy)
        self.actors: list = []
        try:
            self._wait_placed(bundle)
            threads = cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker))
            env = {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **(env or {})}
            self.actors = [
                RankActor.options(
                    num_cpus=cfg.cpus_per_worker, num_gpus=gpus, runtime_env={"env_vars": env},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                ).remote(threads)
                for i in range(cfg.num)
            ]
            infos = ray.get([a.node_info.remote() for a in self.actors])
            self.node_ips = [ip for ip, _ in infos]
            # All ranks on one node: rendezvous on loopback, never exposed beyond this machine.
            master = ray.get(self.actors[0].free_port.remote(len(set(self.node_ips)) == 1))
            self.run_dir.mkdir(parents=True, exist_ok=True)
            setups = [a.setup.remote(self._fields(r), master, pg_timeout_s) for r, a in enumerate(self.actors)]
            self.backend = self._gather(setups)[0]
        except BaseException:
            self.shutdown()
            raise

    def _fields(self, rank: int) -> dict:
        ip = self.node_ips[rank]
        same_node = [r for r, other in enumerate(self.node_ips) if other == ip]
        return dict(
            rank=rank, world_size=self.world_size, local_rank=same_node.index(rank),
            local_world_size=len(same_node), node_ip=ip, run_dir=self.run_dir, attempt=self.attempt,
        )

    def _gpus_per_worker(self) -> float:
        if self.cfg.gpus_per_worker >= 0:
            return self.cfg.gpus_per_worker
        return 1 if ray.cluster_resources().get("GPU", 0) >= self.cfg.num else 0

    def _check_capacity(self, gpus: float) -> None:
        """Fail fast when the cluster could never hold the group, instead of waiting forever."""
        cfg, total = self.cfg, ray.cluster_resources()
        need = {"CPU": cfg.num * cfg.cpus_per_worker, "GPU": cfg.num * gpus}
        for res, amount in need.items():
            have = total.get(res, 0)
            if amount > have:
                hint = (
                    "lower workers.num or workers.cpus_per_worker, or give Ray more logical CPUs "
                    "(cluster.num_cpus for the embedded cluster, `ray start --num-cpus` otherwise)"
                    if res == "CPU" else "lower workers.num or set workers.gpus_per_worker=0 to run on CPU"
                )
                raise PlacementError(
                    f"{cfg.num} ranks x {need[res] / cfg.num:g} {res} need {amount:g} {res}, "
                    f"but the Ray cluster has {have:g}: {hint}"
                )
        per_node = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        if not any(n.get("CPU", 0) >= cfg.cpus_per_worker and n.get("GPU", 0) >= gpus for n in per_node):
            raise PlacementError(
                f"no node can hold one rank ({cfg.cpus_per_worker:g} CPU, {gpus:g} GPU); largest nodes: "
                f"{[{k: n.get(k, 0) for k in ('CPU', 'GPU')} for n in per_node]}"
            )

    def _wait_placed(self, bundle: dict) -> None:
        ready, _ = ray.wait([self.pg.ready()], timeout=self.cfg.placement_timeout_s)
        if not ready:
            raise PlacementError(
                f"could not place {self.cfg.num} ranks of {bundle} with strategy {self.cfg.strategy} within "
                f"{self.cfg.placement_timeout_s:g}s; available now: {ray.available_resources()}. Other jobs "
                "hold the rest: wait for them, or ask for fewer ranks"
            )

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``fn(ctx, *args, **kwargs)`` on every rank; return the results in rank order."""
        if not self.actors:
            raise RuntimeError("this worker group was shut down (a rank failed or shutdown() was called)")
        return self._gather([a.run.remote(fn, args, kwargs) for a in self.actors])

    def _gather(self, refs: list) -> list[Any]:
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rank = refs.index(done[0])
            try:
                results[rank] = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:
                detail = str(e.cause) if isinstance(e.cause, _RemoteFailure) else str(e)
                self._fail(rank, detail, e.cause)
            except ray.exceptions.RayActorError as e:
                self._fail(rank, f"the rank's process died: {e}", e)
        return [results[r] for r in range(len(refs))]

    def _fail(self, rank: int, detail: str, cause: BaseException | None) -> None:
        ip = self.node_ips[rank] if getattr(self, "node_ips", None) else "?"
        self.shutdown(graceful=False)
        raise RankError(rank, self.world_size, ip, detail, cause)

    def shutdown(self, graceful: bool = True) -> None:
        """Destroy process groups (when ranks are idle), kill the actors, free the placement group."""
        if graceful and self.actors:
            ray.wait([a.teardown.remote() for a in self.actors], num_returns=len(self.actors), timeout=30)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            _wait_removed(self.pg)
            self.pg = None

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(graceful=exc[0] is None)


def run_ranks(fn: Callable, num: int, *args: Any, run_dir: str | Path, cpus_per_worker: float = 1.0,
              **kwargs: Any) -> list[Any]:
    """Start a group of ``num`` ranks, call ``fn(ctx, *args, **kwargs)`` on each, tear it down."""
    with WorkerGroup(WorkerConfig(num=num, cpus_per_worker=cpus_per_worker), run_dir) as group:
        return group.run(fn, *args, **kwargs)
