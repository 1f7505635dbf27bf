"""Fused projections as their parts: what tensor parallelism needs to shard a fused weight by its parts.

    split_fused(attn, "qkv_proj", {"q": 3072, "k": 1024, "v": 1024})   # attn.qkv_proj.q, .k, .v: Linear
    split_fused(mlp, "gate_up_proj", {"gate": 8192, "up": 8192})

A family that fuses projections into one Linear (Phi-3's ``qkv_proj`` = [q; k; v], ``gate_up_proj`` =
[gate; up]) slices the fused output by position: q is the first h*d columns, k the next kv*d ... A column-
parallel shard of the fused weight would hand rank 0 all of q and part of k. So the fused Linear becomes a
``FusedLinear`` of one Linear per part (the same rows, the same math: its forward concatenates the parts'
outputs in order), and each part is sharded on its own: under tensor parallelism rank r's output is [q_r; k_r;
v_r], which the family's forward slices with its local head counts. Parameter names gain the part
(``qkv_proj.q.weight``); the family maps them to the fused checkpoint tensor's rows (models/hf/weights.py
``offset_rows``), so HF folders load and export unchanged. Works on the meta device (no copy then).
"""

from __future__ import annotations

import torch
from torch import nn


class FusedLinear(nn.Module):
    """The parts of a fused projection, each a Linear, called in order and concatenated on the last dim."""

    def __init__(self, parts: dict[str, nn.Linear]):
        super().__init__()
        self.order = tuple(parts)
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.order], dim=-1)

    def offsets(self) -> dict[str, int]:
        """Each part's first row in the fused weight (global sizes: out_features before any sharding)."""
        out, at = {}, 0
        for name in self.order:
            out[name] = at
            at += getattr(self, name).out_features
        return out


def split_fused(owner: nn.Module, name: str, sizes: dict[str, int]) -> FusedLinear:
    """Replace ``owner.<name>`` (a Linear whose rows are the parts, in order) by a FusedLinear of those parts."""
    fused = getattr(owner, name)
    if isinstance(fused, FusedLinear):
        return fused
    if not isinstance(fused, nn.Linear) or sum(sizes.values()) != fused.out_features:
        raise ValueError(f"{name}: expected a Linear of {sum(sizes.values())} outputs to split into {sizes}, got "
                         f"{fused!r}")
    meta = fused.weight.is_meta
    parts, at = {}, 0
    for part, rows in sizes.items():
        linear = nn.Linear(fused.in_features, rows, bias=fused.bias is not None, device=fused.weight.device,
                           dtype=fused.weight.dtype)
        if not meta:
            with torch.no_grad():
                linear.weight.copy_(fused.weight[at:at + rows])
                if fused.bias is not None:
                    linear.bias.copy_(fused.bias[at:at + rows])
        linear.weight.requires_grad_(fused.weight.requires_grad)
        parts[part] = linear
        at += rows
    result = FusedLinear(parts)
    setattr(owner, name, result)
    return result
