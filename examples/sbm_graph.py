"""Write a graph the way a user has one: files, not a Plait dataset. A stochastic block model (communities as
classes, most edges inside a community) with noisy features, as Parquet edges, .npy features, labels and
splits, and a GraphBolt-style metadata.yaml naming them (README "Bring your own graph"):

    python examples/sbm_graph.py my-graph [--nodes 6000] [--classes 5]
    plait gnn import my-graph/metadata.yaml data/my-graph --undirected

The features alone classify a node poorly (an MLP on them: about 0.5 test accuracy at the defaults); its neighbours'
features, which a GNN aggregates, say much more. An existing folder is refused, never overwritten.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--nodes", type=int, default=6000)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--degree", type=int, default=10, help="edges per node (one direction)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--homophily", type=float, default=0.7, help="share of edges inside a community")
    p.add_argument("--signal", type=float, default=0.2, help="class signal in the features against noise 1")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        print(f"{out} exists: choose a new folder (nothing was written)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(a.seed)
    n, k = a.nodes, a.classes
    label = rng.integers(0, k, n)
    members = [np.flatnonzero(label == c) for c in range(k)]
    src = rng.integers(0, n, n * a.degree)
    inside = rng.random(src.size) < a.homophily
    dst = rng.integers(0, n, src.size)  # across communities: any node
    for c in range(k):  # inside: a node of the source's community
        pick = inside & (label[src] == c)
        dst[pick] = rng.choice(members[c], int(pick.sum()))
    centers = rng.normal(size=(k, a.dim))
    feat = (a.signal * centers[label] + rng.normal(size=(n, a.dim))).astype(np.float32)
    order = rng.permutation(n)
    cut1, cut2 = n // 2, n // 2 + n // 6
    out.mkdir(parents=True)
    pq.write_table(pa.table({"src": src, "dst": dst}), out / "edges.parquet")
    np.save(out / "feat.npy", feat)
    np.save(out / "labels.npy", label)
    for name, ids in (("train", order[:cut1]), ("valid", order[cut1:cut2]), ("test", order[cut2:])):
        np.save(out / f"{name}.npy", np.sort(ids))
    (out / "metadata.yaml").write_text(f"""graph:
  nodes: [{{num: {n}}}]
  edges: [{{format: parquet, path: edges.parquet}}]
feature_data:
  - {{domain: node, name: feat, format: numpy, path: feat.npy}}
  - {{domain: node, name: label, format: numpy, path: labels.npy}}
tasks:
  - name: node_classification
    num_classes: {k}
    train_set: [{{data: [{{name: seeds, format: numpy, path: train.npy}}]}}]
    validation_set: [{{data: [{{name: seeds, format: numpy, path: valid.npy}}]}}]
    test_set: [{{data: [{{name: seeds, format: numpy, path: test.npy}}]}}]
""")
    print(f"wrote {out}: {n:,} nodes, {src.size:,} edges (one direction), {a.dim} features, {k} classes, "
          f"metadata.yaml", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
