"""Wait until a Ray cluster has N live nodes (the Slurm script's step between starting the nodes and the job).

    python -m plait.launchers.ray_nodes HEAD_IP:6379 4 --timeout 300

Joins through plait's ``connect`` (the address checked, this machine's Ray token sent), so a wrong
address or a missing token is reported as such; exits 2 naming how many nodes came up in time.
"""

from __future__ import annotations

import argparse
import sys
import time

import ray
from plait.runtime.cluster import ClusterConfig, ClusterError, connect


def live_nodes() -> int:
    return len([n for n in ray.nodes() if n["Alive"]])


def wait_for_nodes(address: str, want: int, timeout_s: float, poll_s: float = 3.0) -> int:
    """Block until the cluster at ``address`` has ``want`` live nodes; returns how many. Raises TimeoutError
    (saying how many came, and the last connection error) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive, why = 0, ""
    while True:
        try:
            connect(ClusterConfig(address=address))
            alive, why = live_nodes(), ""
        except ClusterError as e:  # the head is not up yet (or the token is wrong: said at the deadline)
            alive, why = 0, str(e)
        if alive >= want:
            return alive
        ray.shutdown()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{alive} of {want} Ray nodes up at {address} after {timeout_s:g} s"
                               + (f": {why}" if why else "") + "; look at the nodes' `ray start` output")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plait.launchers.ray_nodes", description=__doc__.splitlines()[0])
    p.add_argument("address", help="GCS address host:port")
    p.add_argument("nodes", type=int)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    args = p.parse_args(argv)
    try:
        alive = wait_for_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as e:
        print(f"plait: error: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"[plait] {alive} Ray nodes up at {args.address}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
