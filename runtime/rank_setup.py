"""One rank start-up for every launcher: a launcher's environment -> a RankContext, process group up.

    placement, rendezvous = torchrun_placement()         # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    placement, rendezvous = mpi_placement(timeout_s)     # mpi4py: rank, size, node-local rank; rank 0's
                                                         # store address broadcast over MPI
    placement, rendezvous = launcher_placement(timeout_s)  # whichever of the two started this process
    ctx = setup_rank(placement, rendezvous, use_gpu=wants_gpu(-1), timeout_s=1800, run_dir=...)

The Ray rank actor (runtime/rank_actor.py) builds its Placement from Ray's placement group and
calls the same ``setup_rank``. The device is ``cuda:LOCAL_RANK`` when the process sees the node's
GPUs (torchrun, mpirun), ``cuda:0`` when Ray has already narrowed ``CUDA_VISIBLE_DEVICES`` to this
rank's own GPU, and the CPU otherwise; the backend is NCCL on a GPU, gloo on the CPU. The
variables DeepSpeed and DeviceMesh read (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) are set
to match, with LOCAL_RANK the index of this rank's device.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import torch
from plait.runtime.context import RankContext

LAUNCHERS = ("ray", "torchrun", "mpi")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchError(RuntimeError):
    """This process's launcher environment cannot start a rank; the message says what to change."""

    user_error = True


@dataclass(frozen=True)
class Placement:
    """Where one rank sits: what the launcher decided."""

    rank: int
    world_size: int
    local_rank: int  # index among the ranks on this node
    local_world_size: int  # ranks on this node
    node_ip: str
    launcher: str  # "ray", "torchrun" or "mpi"
    attempt: int = 0  # restarts so far (torchrun's TORCHELASTIC_RESTART_COUNT; Ray's from the driver)

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher={self.launcher!r}: one of {', '.join(LAUNCHERS)}")
        if not (0 <= self.rank < self.world_size and 0 <= self.local_rank < self.local_world_size):
            raise LaunchError(f"{self.launcher}: rank {self.rank} of {self.world_size}, local rank {self.local_rank} "
                              f"of {self.local_world_size} is not a valid placement")


@dataclass
class Rendezvous:
    """How the ranks meet: a TCPStore at ``host:port`` (``store``: the one this process already holds, rank 0's),
    or, with ``env=True``, torch's ``env://`` (torchrun's MASTER_ADDR/MASTER_PORT and its agent's store)."""

    host: str
    port: int
    store: Any = None  # torch.distributed.TCPStore opened by this process (rank 0), else None
    env: bool = False


def host_ip() -> str:
    """This machine's address on its default route (no packet is sent), else what its name resolves to."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))
            return s.getsockname()[0]
    except OSError:
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"


def detect_launcher(env: Mapping[str, str] | None = None) -> str:
    """``"torchrun"`` or ``"mpi"``: which launcher started this process, read from its environment."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return "torchrun"
    if any(k in env for k in MPI_VARS):
        return "mpi"
    raise LaunchError("this process was not started by torchrun or mpirun (no RANK/WORLD_SIZE/MASTER_ADDR/"
                      "MASTER_PORT, no OMPI_COMM_WORLD_SIZE/PMI_RANK/PMIX_RANK in its environment): start it with "
                      "`torchrun --nproc-per-node N -m plait.launchers.spmd SPEC` or `mpirun -n N python -m "
                      "plait.launchers.spmd SPEC`, or use `plait run SPEC` to run on Ray")


def torchrun_placement(env: Mapping[str, str] | None = None) -> tuple[Placement, Rendezvous]:
    """From torchrun's variables (``torch.distributed.run``); the ranks meet through ``env://``."""
    env = os.environ if env is None else env
    missing = [k for k in TORCHRUN_VARS if not env.get(k, "").strip()]
    if missing:
        raise LaunchError(f"torchrun variables {', '.join(missing)} are not set: start this process with torchrun "
                          "(or set all of " + ", ".join(TORCHRUN_VARS) + ")")
    try:
        rank, world, local, local_world, port = (int(env[k]) for k in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"))
        attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError as e:
        raise LaunchError(f"torchrun variables must be integers: {e}") from None
    placement = Placement(rank, world, local, local_world, host_ip(), "torchrun", attempt)
    return placement, Rendezvous(env["MASTER_ADDR"], port, env=True)


def mpi_placement(timeout_s: float, comm: Any = None) -> tuple[Placement, Rendezvous]:
    """From MPI (mpi4py): rank and size of ``comm`` (default COMM_WORLD), the node-local rank from a shared-memory
    split. Rank 0 opens the rendezvous store on a port the OS picks (loopback when every rank is on its node;
    MASTER_ADDR, when set, chooses the address) and broadcasts ``host:port`` over MPI."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"mpirun started this process but mpi4py cannot be imported ({e}): pip install mpi4py "
                          "built against the MPI that runs it") from None
    import torch.distributed as dist

    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    one_node = comm.allreduce(local_size, op=MPI.MIN) == size
    ip = host_ip()
    master, store = None, None
    if rank == 0:
        host = os.environ.get("MASTER_ADDR", "").strip() or ("127.0.0.1" if one_node else ip)
        try:
            store = dist.TCPStore(host, int(os.environ.get("MASTER_PORT", "0") or 0), size, is_master=True,
                                  wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
            master = (host, store.port, "")
        except Exception as e:  # noqa: BLE001 - every rank must hear about it, not only rank 0
            master = (host, 0, f"{type(e).__name__}: {e}")
    host, port, error = comm.bcast(master, root=0)
    if error:
        raise LaunchError(f"rank 0 could not open the rendezvous store on {host} ({error}): set MASTER_ADDR to an "
                          "address of rank 0's node that the other nodes reach, and MASTER_PORT to a free port")
    return Placement(rank, size, local_rank, local_size, "127.0.0.1" if one_node else ip, "mpi"), \
        Rendezvous(host, port, store)


def launcher_placement(timeout_s: float, env: Mapping[str, str] | None = None) -> tuple[Placement, Rendezvous]:
    """The placement of whichever launcher (torchrun or mpirun) started this process."""
    if detect_launcher(env) == "torchrun":
        return torchrun_placement(env)
    return mpi_placement(timeout_s)


def wants_gpu(gpus_per_worker: float, gpu_count: int | None = None) -> bool:
    """Whether a rank outside Ray uses a GPU, from the spec's ``workers.gpus_per_worker``: 0 = CPU, -1 = a GPU when
    this node has one, > 0 = a GPU (an error when there is none)."""
    if gpus_per_worker == 0:
        return False
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if gpus_per_worker > 0 and count == 0:
        raise LaunchError(f"workers.gpus_per_worker={gpus_per_worker:g} but torch {torch.__version__} sees no GPU on "
                          f"{socket.gethostname()} (a CPU build of torch, no driver, or CUDA_VISIBLE_DEVICES empty): "
                          "install CUDA torch there, or set workers.gpus_per_worker=0 to run on CPU")
    return count > 0


def pick_device(placement: Placement, use_gpu: bool, gpu_count: int | None = None) -> torch.device:
    """``cuda:0`` under Ray (it shows each rank only its own GPU), ``cuda:LOCAL_RANK`` under torchrun and mpirun
    (each rank sees the node's GPUs), the CPU without a GPU."""
    if not use_gpu:
        return torch.device("cpu")
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if count == 0:
        raise LaunchError(f"rank {placement.rank} on {placement.node_ip} was meant to use a GPU but torch "
                          f"{torch.__version__} there sees none (a CPU build of torch, or no driver): install CUDA "
                          "torch on that node, or set workers.gpus_per_worker=0 to run the ranks on CPU")
    if placement.launcher == "ray":
        return torch.device("cuda", 0)
    if placement.local_world_size > count:
        raise LaunchError(f"{placement.local_world_size} ranks on node {placement.node_ip} but it shows {count} GPU(s) "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most "
                          f"{count} processes per node (torchrun --nproc-per-node {count}, mpirun --map-by "
                          f"ppr:{count}:node), or set workers.gpus_per_worker=0 to run on CPU")
    return torch.device("cuda", placement.local_rank)


def init_process_group(placement: Placement, rendezvous: Rendezvous, device: torch.device,
                       timeout_s: float) -> str:
    """Set the launcher variables libraries read, then start torch.distributed: NCCL on a GPU, gloo on the CPU.
    Returns the backend."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif placement.launcher != "ray":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks: DeepSpeed must not pick CUDA (Ray's ranks have it set)
    if rendezvous.host.startswith("127.") or rendezvous.host == "localhost":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(
        MASTER_ADDR=rendezvous.host, MASTER_PORT=str(rendezvous.port), RANK=str(placement.rank),
        WORLD_SIZE=str(placement.world_size), LOCAL_WORLD_SIZE=str(placement.local_world_size),
        LOCAL_RANK=str(device.index if device.type == "cuda" else placement.local_rank),
    )
    timeout = timedelta(seconds=timeout_s)
    common = dict(rank=placement.rank, world_size=placement.world_size, timeout=timeout,
                  device_id=device if device.type == "cuda" else None)
    if rendezvous.env and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        dist.init_process_group(backend, init_method="env://", **common)
        return backend
    store = rendezvous.store
    if store is None:
        store = dist.TCPStore(rendezvous.host, rendezvous.port, placement.world_size, is_master=False, timeout=timeout)
    if rendezvous.env:  # torchrun's agent hosts the store and keeps it across restarts: keys of each attempt apart
        store = dist.PrefixStore(f"plait/attempt{placement.attempt}/", store)
    dist.init_process_group(backend, store=store, **common)
    return backend


def setup_rank(placement: Placement, rendezvous: Rendezvous, *, use_gpu: bool, timeout_s: float,
               run_dir: str | Path, **context: Any) -> RankContext:
    """The one rank start-up: device chosen, process group initialised, the rank's context returned.
    ``context``: further RankContext fields (attempt, run_id, resume_from)."""
    device = pick_device(placement, use_gpu)
    backend = init_process_group(placement, rendezvous, device, timeout_s)
    context.setdefault("attempt", placement.attempt)
    return RankContext(rank=placement.rank, world_size=placement.world_size, local_rank=placement.local_rank,
                       local_world_size=placement.local_world_size, node_ip=placement.node_ip, device=device,
                       backend=backend, run_dir=Path(run_dir), **context)
