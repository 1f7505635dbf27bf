"""Connect to Ray: an existing cluster when an address is given, else an embedded local one.

Order of precedence for the address: the ``address`` argument (``--address`` / ``cluster.address``),
then ``PLAIT_RAY_ADDRESS``, then ``RAY_ADDRESS`` (set by ``ray job submit`` for the job's driver).
With none of them, Ray starts in-process on this machine, bound to 127.0.0.1.

Joining a cluster is checked first, so that a wrong address fails in seconds with a message instead
of minutes of Ray retries: the address must be a GCS address ``host:port`` (or ``ray://host:port``,
or ``auto``), something must listen there, and, when the cluster uses Ray's token authentication,
this machine must hold its token. A token found here (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``) is sent: Ray >= 2.60 turns authentication on for every cluster started once
such a token exists, but sends it from a client only when ``RAY_AUTH_MODE=token`` is set.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import ray

log = logging.getLogger("plait")

GCS_HINT = "the GCS address host:port that `ray start --head` printed (port 6379 unless --port chose another)"


class ClusterError(ValueError):
    """The Ray cluster named by an address cannot be joined; the message says what to check."""

    user_error = True


@dataclass
class ClusterConfig:
    address: str = ""  # "" = PLAIT_RAY_ADDRESS / RAY_ADDRESS / embedded local cluster
    num_cpus: int = 0  # embedded cluster only; 0 = this machine's cores. May exceed them (logical CPUs).
    num_gpus: int = -1  # embedded cluster only; -1 = what torch sees
    dashboard: bool = False  # embedded cluster only; bound to 127.0.0.1 when on
    host: str = "127.0.0.1"  # embedded cluster only: the address its services bind
    connect_timeout_s: float = 10.0  # joining only: how long the cluster may take to answer before we give up

    def check(self) -> None:
        if self.connect_timeout_s <= 0:
            raise ValueError(f"cluster.connect_timeout_s={self.connect_timeout_s} must be > 0 (seconds)")


def resolve_address(cfg: ClusterConfig) -> str:
    return address_and_source(cfg)[0]


def address_and_source(cfg: ClusterConfig) -> tuple[str, str]:
    """The address to join ("" = embedded cluster) and where it came from, for messages."""
    for value, source in ((cfg.address, "--address / cluster.address"),
                          (os.environ.get("PLAIT_RAY_ADDRESS", ""), "PLAIT_RAY_ADDRESS"),
                          (os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS")):
        if value.strip():
            return value.strip(), source
    return "", ""


def connect(cfg: ClusterConfig | None = None, run_dir: Path | None = None) -> dict:
    """Initialise Ray once for this driver and return a short description of the cluster.
    Raises ClusterError (a ValueError) when an address is given but cannot be joined."""
    cfg = cfg or ClusterConfig()
    if ray.is_initialized():
        if run_dir is not None:
            link_ray_logs(Path(run_dir))
        return describe()
    env_vars = {"PYTHONUNBUFFERED": "1"}
    address, source = address_and_source(cfg)
    if address:
        join(address, source, cfg.connect_timeout_s, env_vars)
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


def join(address: str, source: str, timeout_s: float, env_vars: dict[str, str]) -> None:
    """Check the address, send this machine's token if it has one, then ``ray.init(address=...)``."""
    host, _ = check_reachable(address, source, timeout_s)
    token = use_token_if_available()
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token" and not token:
        raise ClusterError(f"RAY_AUTH_MODE=token is set but this machine has no Ray token to join {address!r} "
                           f"(from {source}) with: {NO_TOKEN_HELP}")
    if host and not address.startswith("ray://"):
        check_gcs_answers(address, source, timeout_s, token)
    log.info("joining Ray cluster at %s (from %s)%s", address, source, f"; token from {token}" if token else "")
    try:
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
    except Exception as e:
        if _caused_by_auth(e):
            raise ClusterError(token_message(address, source, token)) from None
        if not isinstance(e, (ConnectionError, RuntimeError)):
            raise
        raise ClusterError(f"could not join the Ray cluster at {address!r} (from {source}): {e}. Check that "
                           f"{address!r} is {GCS_HINT} and that `ray status --address {address}` "
                           "works on this machine.") from e


def parse_address(address: str, source: str) -> tuple[str, int] | None:
    """``host:port`` or ``ray://host:port`` -> (host, port); ``auto`` -> None (Ray finds the local cluster).
    Raises ClusterError for dashboard (http) addresses and anything without a port."""
    if address == "auto":
        return None
    if address.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        gcs = f"{urlsplit(address).hostname or 'HOST'}:6379"
        raise ClusterError(
            f"{source}={address!r} is a dashboard (Jobs API) address, which `ray job submit --address` takes; "
            f"`plait run` joins the cluster itself and needs {GCS_HINT}, e.g. --address {gcs} "
            f"or PLAIT_RAY_ADDRESS={gcs}")
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit():
        example = "ray://HOST:10001" if address.startswith("ray://") else "HOST:6379"
        raise ClusterError(f"{source}={address!r} is not a Ray address: give {example} ({GCS_HINT}), "
                           "or leave it empty for an embedded local cluster")
    return host, int(port)


def check_reachable(address: str, source: str, timeout_s: float) -> tuple[str, int]:
    """A TCP connect to the address, so that a wrong one fails now instead of after Ray's retries.
    Returns (host, port), or ("", 0) for "auto"."""
    parsed = parse_address(address, source)
    if parsed is None:
        return "", 0
    host, port = parsed
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} (from {source}): {reason}. Check that the cluster is "
            f"running (`ray status` on its head node), that {address!r} is {GCS_HINT}, and that no firewall "
            "blocks the port from this machine; or give no address to run on an embedded local cluster") from None
    return host, port


def find_token() -> str:
    """Where Ray would read this machine's auth token from ("" = none), in Ray's order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if path:
        return path if Path(path).expanduser().is_file() else ""
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else ""


def use_token_if_available() -> str:
    """Send this machine's Ray auth token when it has one and RAY_AUTH_MODE is unset: sets RAY_AUTH_MODE=token
    for this process (and what it starts). A cluster without authentication ignores the token.
    Returns where the token came from ("" = none sent)."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    token = find_token()
    if mode:  # the user chose; respect it
        return token if mode == "token" else ""
    if not token:
        return ""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import Config  # Ray reads RAY_AUTH_MODE into its config once; read it again

    Config.initialize("")
    return token


def check_gcs_answers(address: str, source: str, timeout_s: float, token: str) -> None:
    """Ask the GCS at ``address`` for its cluster id: an auth refusal or silence is reported now,
    not after Ray's minutes of retries."""
    from ray._raylet import GcsClient

    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            GcsClient(address=address)
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="plait-gcs-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise ClusterError(
            f"something listens at {address!r} (from {source}) but it does not answer as a Ray cluster within "
            f"{timeout_s:g} s: is it {GCS_HINT}, not the dashboard (8265) or Ray Client (10001) port? "
            "On a slow cluster raise cluster.connect_timeout_s")
    error = outcome["error"]
    if error is not None and _caused_by_auth(error):
        raise ClusterError(token_message(address, source, token)) from None


NO_TOKEN_HELP = ("run `ray get-auth-token` on the cluster's head node and put the token it prints in "
                 "~/.ray/auth_token here (or export RAY_AUTH_TOKEN=<token>), then run again")


def token_message(address: str, source: str, token: str) -> str:
    have = (f"the token this machine sent (from {token}) is not the cluster's" if token
            else "this machine has no Ray token (no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    return f"the Ray cluster at {address!r} (from {source}) requires its authentication token and {have}: " \
           + NO_TOKEN_HELP


def _caused_by_auth(error: BaseException | None) -> bool:
    from ray.exceptions import AuthenticationError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


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
