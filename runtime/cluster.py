"""Connect to Ray: an existing cluster when an address is given, else an embedded local one.

Order of precedence for the address: the ``address`` argument (``--address`` / ``cluster.address``),
then ``PLAIT_RAY_ADDRESS``, then ``RAY_ADDRESS`` (set by ``ray job submit`` for the job's driver).
With none of them, Ray starts in-process on this machine, bound to 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray

log = logging.getLogger("plait")


@dataclass
class ClusterConfig:
    address: str = ""  # "" = PLAIT_RAY_ADDRESS / RAY_ADDRESS / embedded local cluster
    num_cpus: int = 0  # embedded cluster only; 0 = this machine's cores. May exceed them (logical CPUs).
    num_gpus: int = -1  # embedded cluster only; -1 = what torch sees
    dashboard: bool = False  # embedded cluster only; bound to 127.0.0.1 when on
    host: str = "127.0.0.1"  # embedded cluster only: the address its services bind


def resolve_address(cfg: ClusterConfig) -> str:
    return cfg.address or os.environ.get("PLAIT_RAY_ADDRESS", "") or os.environ.get("RAY_ADDRESS", "")


def connect(cfg: ClusterConfig | None = None, run_dir: Path | None = None) -> dict:
    """Initialise Ray once for this driver and return a short description of the cluster."""
    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        if run_dir is not None:
            link_ray_logs(Path(run_dir))
        return describe()
    env_vars = {"PYTHONUNBUFFERED": "1"}
    address = resolve_address(cfg)
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    else:
        num_gpus = cfg.num_gpus
        if num_gpus < 0:
            import torch

            num_gpus = torch.cuda.device_count()
        ray.init(
            num_cpus=cfg.num_cpus or os.cpu_count(),
            num_gpus=num_gpus,
            include_dashboard=cfg.dashboard,
            dashboard_host=cfg.host,
            _node_ip_address=cfg.host,
            runtime_env={"env_vars": env_vars},
            log_to_driver=True,
        )
    info = describe()
    if run_dir is not None:
        link_ray_logs(Path(run_dir))
    return info


def describe() -> dict:
    res = ray.cluster_resources()
    return {"nodes": len([n for n in ray.nodes() if n["Alive"]]), "CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0)}


def link_ray_logs(run_dir: Path) -> None:
    """Point ``RUN_DIR/ray-logs`` at this Ray session's log folder (the driver's node)."""
    try:
        session = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001
    except Exception:  # joined clusters may not expose it; logs stay in Ray's own folder
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "ray-logs"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session / "logs", target_is_directory=True)


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def stop_local_cluster(temp_dir: str, timeout_s: float = 15.0) -> int:
    """``ray stop`` for one cluster: end the processes (and their children) of the Ray cluster
    started on this machine with ``--temp-dir=temp_dir``, leaving any other Ray cluster alone.
    Returns how many processes were ended."""
    import psutil

    temp_dir = str(temp_dir)
    owners = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmdline and proc.pid != os.getpid():
            owners.append(proc)
    procs = {p.pid: p for owner in owners for p in [owner, *_children(owner)]}
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    for p in alive:
        p.kill()
    return len(procs)


def _children(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
