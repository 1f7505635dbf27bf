"""One named DeviceMesh for a plan: ranks laid out as ``arange(world).view(dp, pp, tp)``.

tp is the innermost (fastest-varying) dimension so tensor-parallel peers are neighbours (same node
on a GPU cluster); pp next; dp outermost. Sub-meshes are reached by name and passed explicitly:
``mesh["tp"]``, ``mesh["pp"]``, ``mesh["dp"]``. No global process groups.
"""

from __future__ import annotations

import torch
from plait.parallel.plan import ParallelPlan
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "pp", "tp")


def build_mesh(plan: ParallelPlan, device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, (plan.dp, plan.pp, plan.tp), mesh_dim_names=MESH_DIMS)


def rank_grid(plan: ParallelPlan) -> torch.Tensor:
    """The global rank at each (dp, pp, tp) coordinate: what build_mesh lays out."""
    return torch.arange(plan.world_size).view(plan.dp, plan.pp, plan.tp)


def coordinates(mesh: DeviceMesh) -> dict[str, int]:
    """This rank's coordinate on each named dimension."""
    return {name: mesh.get_local_rank(name) for name in mesh.mesh_dim_names}
