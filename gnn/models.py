"""GraphSAGE and GAT from PyG, applied hop by hop over the sampler's blocks (node classification).

    model = build_model("sage", in_dim=128, hidden=256, num_classes=10, num_layers=2)
    logits = model(x, mb.blocks)          # x: float32 (len(mb.n_id), in_dim), rows of mb.n_id; -> (len(mb.seeds), C)

One PyG conv per block, outermost hop first: ``h = conv((h, h[:size[1]]), edge_index, size)``. The targets of a
block are the prefix ``n_id[:size[1]]`` of its sources (sampler.py), so ``h[:size[1]]`` is their own
representation (SAGE's root weight) and a self-loop ``i -> i`` for ``i < size[1]`` is the target attending to
itself: GATConv's ``add_self_loops`` (with ``size`` passed, it adds loops for the ``min(size)`` targets only) is
right here, and keeps a target with no sampled neighbour from reading nothing but zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv, SAGEConv

MODELS = ("sage", "gat")


class BlockGNN(nn.Module):
    """Convs stacked over sampled blocks; ReLU and dropout between layers, logits out of the last."""

    def __init__(self, convs: Sequence[nn.Module], dropout: float = 0.5):
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.dropout = dropout

    @property
    def num_layers(self) -> int:
        return len(self.convs)

    def forward(self, x: torch.Tensor, blocks: Sequence) -> torch.Tensor:
        if len(blocks) != len(self.convs):
            raise ValueError(f"{len(blocks)} blocks for a {len(self.convs)}-layer model: sample with as many "
                             "fanouts as the model has layers")
        h = x
        for i, (conv, block) in enumerate(zip(self.convs, blocks, strict=True)):
            src, dst = block.size
            if h.shape[0] != src:
                raise ValueError(f"layer {i}: {h.shape[0]} input rows for a block with {src} source nodes: pass "
                                 "the features of mb.n_id (in order) to the model")
            edge_index = block.edge_index.to(h.device)
            h = conv((h, h[:dst]), edge_index, size=(src, dst))
            if i < len(self.convs) - 1:
                h = F.dropout(F.relu(h), p=self.dropout, training=self.training)
        return h


def graph_sage(in_dim: int, hidden: int, num_classes: int, num_layers: int = 2, dropout: float = 0.5) -> BlockGNN:
    dims = [in_dim] + [hidden] * (num_layers - 1) + [num_classes]
    return BlockGNN([SAGEConv(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)], dropout)


def gat(in_dim: int, hidden: int, num_classes: int, num_layers: int = 2, heads: int = 4,
        dropout: float = 0.5) -> BlockGNN:
    """Hidden layers concatenate ``heads`` heads of ``hidden // heads`` channels; the last averages one head."""
    if hidden % heads:
        raise ValueError(f"train.hidden={hidden} must divide by train.heads={heads} (GAT concatenates the heads)")
    convs, d = [], in_dim
    for _ in range(num_layers - 1):
        convs.append(GATConv(d, hidden // heads, heads=heads, concat=True, add_self_loops=True))
        d = hidden
    convs.append(GATConv(d, num_classes, heads=1, concat=False, add_self_loops=True))
    return BlockGNN(convs, dropout)


def build_model(name: str, in_dim: int, hidden: int, num_classes: int, num_layers: int, heads: int = 4,
                dropout: float = 0.5) -> BlockGNN:
    """``name`` "sage" (GraphSAGE, mean aggregation) or "gat"."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: a GNN needs at least one layer (one per fanout)")
    if name == "sage":
        return graph_sage(in_dim, hidden, num_classes, num_layers, dropout)
    if name == "gat":
        return gat(in_dim, hidden, num_classes, num_layers, heads, dropout)
    raise ValueError(f"model {name!r}: choose one of {', '.join(MODELS)}")
