"""KV heads replicated across tensor-parallel ranks when tp exceeds them (Megatron's way, any family).

    replicas = kv_replicas(num_kv_heads, num_heads, tp)       # 1: kv heads shard like the others
    replicate_heads([attn.k_proj, attn.v_proj], replicas, head_dim, tp_mesh)   # before ColwiseParallel
    ... forward, backward ...
    sync_replicated_kv_grads(modules)                          # before clipping and the optimizer step

With ``num_key_value_heads % tp == 0`` each rank keeps kv/tp heads. When tp is a multiple of the kv heads
(MQA, or GQA with few kv heads) the projections' rows (and biases) are repeated head by head tp/kv times, so
the column-parallel shard of rank r is kv head ``r // (tp/kv)``, the one its query heads use. The copies of
one head get different gradients (each from its rank's query heads): ``sync_replicated_kv_grads`` sums them
over the ranks sharing the head, so every copy gets the original head's gradient and the copies stay equal.
Each replicated projection is marked (``REPLICAS``, ``MESH``, ``HEAD_DIM`` attributes): weight loading maps
a copy's rows back to its head (``replica_rows``), export writes the first copy, and a global gradient norm
counts a replicated head tp/kv times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

REPLICAS = "plait_kv_replicas"  # on a projection whose kv heads are replicated: copies per head
MESH = "plait_kv_tp_mesh"
HEAD_DIM = "plait_kv_head_dim"


def check_divisible(sizes: dict[str, int], tp: int) -> None:
    """ValueError naming the size tensor parallelism cannot split, and the tp degrees that would."""
    for name, size in sizes.items():
        if size % tp:
            good = [d for d in range(1, size + 1) if size % d == 0]
            raise ValueError(f"tensor parallelism splits {name}={size} across tp={tp} ranks, but {size} is not "
                             f"divisible by {tp}: choose tp from {good} or change {name}")


def kv_replicas(num_kv_heads: int, num_heads: int, tp: int) -> int:
    """How many copies of each kv head tp ranks hold: 1 when kv % tp == 0, tp / kv when kv heads are
    replicated (tp % kv == 0); ValueError naming the valid tp otherwise."""
    if num_heads % tp:
        check_divisible({"num_attention_heads": num_heads}, tp)
    if num_kv_heads % tp == 0:
        return 1
    if tp % num_kv_heads == 0:
        return tp // num_kv_heads
    good = [d for d in range(1, num_heads + 1)
            if num_heads % d == 0 and (num_kv_heads % d == 0 or d % num_kv_heads == 0)]
    raise ValueError(f"tensor parallelism splits num_key_value_heads={num_kv_heads} across tp={tp} ranks: {tp} neither "
                     f"divides {num_kv_heads} nor is a multiple of it (to replicate kv heads); choose tp from {good}")


def replicate_heads(projections: list[nn.Linear], replicas: int, head_dim: int, mesh: DeviceMesh) -> None:
    """Repeat each head of these projections (weight rows and bias) ``replicas`` times, in place, and mark them."""
    for proj in projections:
        for key in ("weight", "bias"):
            p = getattr(proj, key, None)
            if p is None:
                continue
            heads = p.data.unflatten(0, (-1, head_dim))
            new = heads.repeat_interleave(replicas, dim=0).flatten(0, 1)
            setattr(proj, key, nn.Parameter(new, requires_grad=p.requires_grad))
        proj.out_features = proj.weight.shape[0]
        setattr(proj, REPLICAS, replicas)
        setattr(proj, MESH, mesh)
        setattr(proj, HEAD_DIM, head_dim)


def replica_rows(rows: torch.Tensor, replicas: int, head_dim: int) -> torch.Tensor:
    """Checkpoint rows of model rows of a projection whose heads are replicated ``replicas`` times."""
    return (rows // head_dim) // replicas * head_dim + rows % head_dim


def replicated(module: nn.Module) -> list[nn.Module]:
    """The projections under ``module`` whose heads are replicated."""
    return [m for m in module.modules() if getattr(m, REPLICAS, 0) > 1]


def sync_replicated_kv_grads(modules: nn.Module | list[nn.Module]) -> None:
    """Sum the gradients of replicated kv-head copies over the tp ranks sharing each head (in place, on the
    local shards; works under FSDP2 too, whose shards of the copies line up). A collective on each tp
    group that holds replicated heads; a no-op for models without them. Call it after backward, before
    gradient clipping and the optimizer step."""
    for module in modules if isinstance(modules, (list, tuple)) else [modules]:
        for proj in replicated(module):
            replicas, mesh = getattr(proj, REPLICAS), getattr(proj, MESH)
            tp, rank = mesh.size(), mesh.get_local_rank()
            for p in proj.parameters(recurse=False):
                if p.grad is None:
                    continue
                grad = p.grad
                if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
                    grad = grad.redistribute(grad.device_mesh, [Replicate() if pl.is_partial() else pl
                                                                for pl in grad.placements])
                    p.grad = grad
                local = grad.to_local() if isinstance(grad, DTensor) else grad
                slots = local.new_zeros((tp // replicas, *local.shape))
                slots[rank // replicas] = local
                dist.all_reduce(slots, group=mesh.get_group())
                local.copy_(slots[rank // replicas])
