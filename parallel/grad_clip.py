"""Gradient clipping by the global norm across every mesh dimension (tp, dp, cp, pp) with at most one
all-reduce per dimension; see ``clip_grad_norm``. ``parallelize``'s train step calls it."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from plait.parallel.mesh import root_dims
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate


def clip_grad_norm(modules: list[nn.Module], max_norm: float, mesh: DeviceMesh) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / global norm) and return the global norm (0-d, on device).

    Squares are summed locally, per gradient, on its local tensor, grouped by the mesh dimensions the
    gradient is sharded over (DTensor ``Shard`` / ``_StridedShard`` placements; ``Replicate`` dims hold copies and plain
    tensors are replicated over every dimension but pp; a flattened dimension such as FSDP2's ``dp_cp``
    counts as sharded over each dimension it spans, and with expert parallelism ``dp`` over ``dp_mod_ep`` and
    ``ep``; an expert parameter is sharded over ``ep`` and ``dp_mod_ep``, so each expert counts once). One small
    vector of group sums then takes at most one all-reduce per mesh dimension of size > 1: along a dimension, the
    groups sharded over it sum, the others keep the coordinate-0 copy; pp always sums (stages hold other parameters).
    Nothing waits on the host. Sums accumulate in float64 when a gradient is float64, else float32.
    Every rank must hold the same kinds of gradients (all DTensors or all plain), as parallelize does.
    """
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device if grads else comm_device(mesh)
    sizes = {d: mesh[d].size() for d in mesh.mesh_dim_names or ()}
    dims = [d for d, n in sizes.items() if n > 1]
    split = [d for d in dims if d != "pp"] if any(isinstance(g, DTensor) for g in grads) else []
    keys = [frozenset(c) for r in range(len(split) + 1) for c in itertools.combinations(split, r)]
    with torch.no_grad():
        by_key: dict[frozenset, list[torch.Tensor]] = {k: [] for k in keys}
        scaled: list[torch.Tensor] = []  # the tensors the coefficient multiplies (local shards)
        for g in grads:
            local, key = _local_shard(g, split, sizes)
            by_key[key].append(local)
            scaled.append(g.to_local() if isinstance(g, DTensor) else g)
        sums = torch.stack([_sum_squares(by_key[k], acc, device) for k in keys])
        for d in dims:
            if d != "pp" and d not in split:
                continue  # nothing is sharded over d: every rank along it holds the same sums
            if d != "pp" and mesh.get_local_rank(d) != 0:
                for i, k in enumerate(keys):
                    if d not in k:
                        sums[i].zero_()  # a copy along d: only coordinate 0 contributes it
            dist.all_reduce(sums, group=mesh[d].get_group())
        total = sums.sum().sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for (dev, dtype), tensors in _by_device_dtype(scaled).items():
                torch._foreach_mul_(tensors, coef.to(dev, dtype))
    return total


def _local_shard(g: torch.Tensor, split: list[str], root_sizes: dict[str, int]) -> tuple[torch.Tensor, frozenset]:
    """(the local tensor whose squares add up to the full gradient's, the mesh dims it is sharded over)."""
    if not isinstance(g, DTensor):
        return g, frozenset()
    mesh, placements = g.device_mesh, list(g.placements)
    if any(p.is_partial() for p in placements):  # pending sums: complete them first (a collective)
        g = g.redistribute(mesh, [Replicate() if p.is_partial() else p for p in placements])
    names = mesh.mesh_dim_names or ()
    # Shard and FSDP2-over-TP's _StridedShard (whose is_shard() is False) both split the tensor; a flattened
    # dim (dp_cp) splits it over each plan mesh dim it spans that has size > 1.
    sharded = frozenset(d for i, p in enumerate(g.placements)
                        if not (p.is_replicate() or p.is_partial()) and mesh.size(i) > 1
                        for d in (root_dims(names[i], tuple(root_sizes)) if i < len(names) else (f"#{i}",))
                        if root_sizes.get(d, 2) > 1)
    if not sharded <= set(split):
        raise ValueError(f"a gradient is sharded over mesh dims {sorted(sharded)} (its mesh: {names}), but the "
                         f"plan's mesh has dims {tuple(root_sizes)}: build parameters' meshes from the plan's mesh")
    return g.to_local(), sharded


def _sum_squares(tensors: list[torch.Tensor], acc: torch.dtype, device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=acc, device=device)
    norms = torch._foreach_norm(tensors, 2.0, dtype=acc)
    return torch.stack(norms).square().sum().to(device)


def _by_device_dtype(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    out: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out


def comm_device(mesh: DeviceMesh) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
