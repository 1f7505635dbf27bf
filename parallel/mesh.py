"""The layout of every parallel dimension, in one object: ranks as ``arange(world).view(dp, pp, cp, tp)``.

    layout = Layout.of(plan)                 # the degrees (dp, pp, cp, tp) of a ParallelPlan
    layout.world_size                        # dp*pp*cp*tp
    layout.coordinates(5)                    # {"dp": .., "pp": .., "cp": .., "tp": ..} of global rank 5
    mesh = build_mesh(plan, "cpu")           # = layout.build_mesh("cpu")
    mesh["tp"], mesh["cp"], mesh["pp"], mesh["dp"], mesh["dp_cp"]

Order, outermost first (picotron's grid): dp, pp, cp, tp. tp is the fastest-varying dimension so
tensor-parallel peers are neighbours (same node on a GPU cluster), cp next (ring attention passes
K/V between cp neighbours every block), then pp, dp outermost. The plan's world check, the memory
estimator and the mesh all ask this module rather than restating the order.

Expert parallelism (``ep``, expert_parallel.py) lives inside dp, as torchtitan puts it: ep divides dp and the dp
ranks are split as ``(dp/ep, ep)`` (``dp_mod_ep`` outer, ``ep`` inner, so ep peers are neighbours). With ep > 1
the root mesh has dims ``(dp_mod_ep, ep, pp, cp, tp)`` and ``dp`` is their first two flattened: ``mesh["dp"]``,
``mesh.get_local_rank("dp")`` and the rank order are the same as with ep = 1. An experts module's parameters are
sharded Shard(0) over ``mesh["ep"]`` and FSDP2-sharded over ``mesh["dp_mod_ep"]`` (the dp ranks that hold the
same experts).

``dp_cp`` is dp x cp flattened (torchtitan's ``dp_shard_cp``): the ranks that hold the same parameters
and see different tokens (other sequences over dp, other pieces of the same sequences over cp). FSDP2
shards and DDP all-reduces gradients over ``data_mesh(mesh)`` (``mesh["dp_cp"]`` when cp > 1, else
``mesh["dp"]``), and the reported loss is averaged over it. Sub-meshes are reached by name and passed
explicitly; no global process groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp", "pp", "cp", "tp")  # outermost first
FLAT_DIMS = {"dp_cp": ("dp", "cp")}  # flattened dimensions build_mesh adds, and the mesh dims each spans
EP_DIMS = ("dp_mod_ep", "ep")  # with ep > 1 the root mesh splits dp into these two (dp = both, flattened)
MESSAGE_ORDER = ("dp", "cp", "tp", "pp")  # how errors list the degrees (cp only when it is > 1)


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    pp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1  # expert parallelism: splits dp (not a factor of the world size)

    @classmethod
    def of(cls, plan: Any) -> Layout:
        """The layout of a ParallelPlan (or anything with dp/pp/tp and optionally cp degrees)."""
        return cls(dp=plan.dp, pp=plan.pp, cp=getattr(plan, "cp", 1), tp=plan.tp, ep=getattr(plan, "ep", 1))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def dp_cp(self) -> int:
        """Ranks that hold the same parameters: FSDP2 shards over them, DDP averages their gradients."""
        return self.dp * self.cp

    @property
    def dp_mod_ep(self) -> int:
        """The dp ranks holding the same experts (FSDP2 shards expert parameters over them)."""
        return self.dp // self.ep

    def coordinate(self, rank: int, dim: str) -> int:
        """Global ``rank``'s coordinate on ``dim``: a mesh dimension, or ``ep`` / ``dp_mod_ep`` (parts of dp)."""
        dp = self.coordinates(rank)["dp"]
        if dim == "ep":
            return dp % self.ep
        if dim == "dp_mod_ep":
            return dp // self.ep
        return self.coordinates(rank)[dim]

    def grid(self) -> torch.Tensor:
        """The global rank at each (dp, pp, cp, tp) coordinate: what build_mesh lays out."""
        return torch.arange(self.world_size).view(self.shape)

    def coordinates(self, rank: int) -> dict[str, int]:
        """Global ``rank``'s coordinate on each dimension."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1} for the layout {self}")
        out = {}
        for name, size in reversed(list(zip(MESH_DIMS, self.shape, strict=True))):
            rank, out[name] = divmod(rank, size)
        return {name: out[name] for name in MESH_DIMS}

    def rank(self, **coords: int) -> int:
        """The global rank at these coordinates (missing dimensions are 0)."""
        out = 0
        for name, size in zip(MESH_DIMS, self.shape, strict=True):
            out = out * size + coords.get(name, 0)
        return out

    def product(self) -> str:
        """The world size as an equation, for error messages: ``dp*tp*pp = 2*2*1 = 4`` (cp listed when > 1)."""
        names = [d for d in MESSAGE_ORDER if d != "cp" or self.cp > 1]
        return f"{'*'.join(names)} = {'*'.join(str(getattr(self, d)) for d in names)} = {self.world_size}"

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One DeviceMesh with dims ``MESH_DIMS`` plus the flattened ``dp_cp`` (a collective: every rank calls it);
        with ep > 1 dims ``(dp_mod_ep, ep, pp, cp, tp)`` and ``dp`` flattened from the first two."""
        if self.dp % self.ep:
            raise ValueError(f"ep={self.ep} must divide dp={self.dp}: expert parallelism splits the dp ranks")
        if self.ep > 1:
            mesh = init_device_mesh(device_type, (self.dp_mod_ep, self.ep, *self.shape[1:]),
                                    mesh_dim_names=(*EP_DIMS, *MESH_DIMS[1:]))
            mesh[EP_DIMS]._flatten("dp")
        else:
            mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        for name, dims in FLAT_DIMS.items():
            mesh[dims]._flatten(name)
        return mesh


def build_mesh(plan: Any, device_type: str) -> DeviceMesh:
    return Layout.of(plan).build_mesh(device_type)


def rank_grid(plan: Any) -> torch.Tensor:
    """The global rank at each (dp, pp, cp, tp) coordinate: what build_mesh lays out."""
    return Layout.of(plan).grid()


def coordinates(mesh: DeviceMesh) -> dict[str, int]:
    """This rank's coordinate on each named dimension of the mesh (and on ``dp`` when ep splits it)."""
    out = {name: mesh.get_local_rank(name) for name in mesh.mesh_dim_names}
    if "dp" not in out and "ep" in out:
        out["dp"] = mesh.get_local_rank("dp")
    return out


def data_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh of ranks holding the same parameters: ``mesh["dp_cp"]`` when cp > 1, else ``mesh["dp"]``.
    FSDP2 shards and DDP all-reduces over it; the loss is averaged over it."""
    names = mesh.mesh_dim_names or ()
    if "cp" in names and mesh["cp"].size() > 1:
        # = mesh["dp_cp"]; torch asks callers to keep the flattened mesh rather than slice it from the root,
        # and _flatten returns the one build_mesh made (or makes it, for a mesh built elsewhere)
        return mesh[FLAT_DIMS["dp_cp"]]._flatten("dp_cp")
    if "ep" in names:  # dp = (dp_mod_ep, ep) flattened by build_mesh (kept, as above)
        return mesh[EP_DIMS]._flatten("dp")
    return mesh["dp"]


def root_dims(name: str, roots: tuple[str, ...] = MESH_DIMS) -> tuple[str, ...]:
    """The root mesh dimensions (``roots``: the root mesh's names) a (possibly flattened) dimension name spans:
    "dp_cp" -> ("dp", "cp"), "tp" -> ("tp",); with ep > 1 (roots without "dp") "dp" -> ("dp_mod_ep", "ep")."""
    if name in roots:
        return (name,)
    if name == "dp" and "dp" not in roots:
        return EP_DIMS
    return tuple(d for part in FLAT_DIMS.get(name, (name,)) for d in root_dims(part, roots))


def expert_meshes(mesh: DeviceMesh) -> tuple[DeviceMesh, DeviceMesh] | None:
    """(``mesh["dp_mod_ep"]``, ``mesh["ep"]``) of a mesh built with ep > 1, else None."""
    names = mesh.mesh_dim_names or ()
    if "ep" not in names:
        return None
    return mesh["dp_mod_ep"], mesh["ep"]
