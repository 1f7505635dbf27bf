"""Keeping failed nodes out of a restarted group's placement, when the cluster has room elsewhere.

    avoid, note = nodes_to_avoid(failed_node_ids, num=4, cpus=1, gpus=0, strategy="PACK")
    selectors = bundle_selectors(avoid, 4)      # placement_group(..., bundle_label_selector=selectors)

Ray labels every node with its id (``ray.io/node-id``); a bundle label selector ``!in(id, ...)`` keeps
each bundle off those nodes (a hard constraint). Room is judged from the resources available on the
other live nodes right now; when they cannot hold the group, the failed nodes are used again and the
note says so.
"""

from __future__ import annotations

import math
from typing import Iterable

import ray

NODE_ID_LABEL = "ray.io/node-id"


def free_per_node(exclude: Iterable[str] = ()) -> dict[str, dict[str, float]]:
    """Available resources of each live node not in ``exclude``, by node id."""
    from ray._private import state  # noqa: PLC0415 - Ray's per-node view (no dashboard needed)

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - set(exclude)
    return {node: res for node, res in state.available_resources_per_node().items() if node in alive}


def ranks_that_fit(free: dict[str, dict[str, float]], cpus: float, gpus: float, strategy: str) -> int:
    """How many bundles of ``cpus``/``gpus`` the nodes' ``free`` resources hold under ``strategy``."""
    per_node = []
    for res in free.values():
        fit = math.floor(res.get("CPU", 0) / cpus + 1e-9) if cpus > 0 else 10**6
        if gpus > 0:
            fit = min(fit, math.floor(res.get("GPU", 0) / gpus + 1e-9))
        per_node.append(fit)
    if not per_node:
        return 0
    if strategy == "STRICT_PACK":
        return max(per_node)
    if strategy == "STRICT_SPREAD":
        return sum(1 for fit in per_node if fit >= 1)
    return sum(per_node)


def nodes_to_avoid(failed: Iterable[str], num: int, cpus: float, gpus: float, strategy: str) -> tuple[list[str], str]:
    """``(node ids to keep the new group off, a note for the log)``: the failed nodes when the other live
    nodes have room for all ``num`` ranks, else none (the note says they are reused, and why)."""
    failed = sorted({n for n in failed if n})
    if not failed:
        return [], ""
    short = ", ".join(n[:12] for n in failed)
    fit = ranks_that_fit(free_per_node(failed), cpus, gpus, strategy)
    if fit >= num:
        return failed, f"placing the new group off node(s) {short} (where the failure was)"
    return [], (f"no room elsewhere for {num} ranks of {cpus:g} CPU, {gpus:g} GPU (the other live nodes hold {fit} "
                f"now): reusing node(s) {short} where the failure was")


def bundle_selectors(avoid: list[str], num: int) -> list[dict[str, str]] | None:
    """Per-bundle label selectors keeping every bundle off ``avoid`` (None when there is nothing to avoid)."""
    if not avoid:
        return None
    return [{NODE_ID_LABEL: f"!in({','.join(avoid)})"} for _ in range(num)]
