"""What the GNN tests share: the classifiers trained on a generated graph (an MLP on features alone, a two-layer
GraphSAGE over sampled blocks) and the accuracy they are judged by."""

from __future__ import annotations

import torch
from torch_geometric.nn import SAGEConv


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def mlp_test_accuracy(x: torch.Tensor, y: torch.Tensor, split, steps: int = 100) -> float:
    """Test accuracy of an MLP trained full-batch on the train split's features alone (no graph)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(mlp.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x[split.train]), y[split.train]).backward()
        opt.step()
    with torch.no_grad():
        return accuracy(mlp(x[split.test]), y[split.test])


def sage_model(in_dim: int = 128, hidden: int = 64, classes: int = 10):
    """A two-layer GraphSAGE and its forward(mb, x) over a mini-batch's blocks (x: the rows of mb.n_id)."""
    convs = torch.nn.ModuleList([SAGEConv(in_dim, hidden), SAGEConv(hidden, classes)])

    def forward(mb, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (conv, block) in enumerate(zip(convs, mb.blocks, strict=True)):
            h = conv((h, h[: block.size[1]]), block.edge_index, block.size)
            h = torch.relu(h) if i == 0 else h
        return h

    return convs, forward
