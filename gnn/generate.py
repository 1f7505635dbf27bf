"""A synthetic node-classification dataset for tests and benchmarks: a power-law graph with planted classes.

    ds = generate_dataset("data/g20k", num_nodes=20_000)          # 0.4 s; 2M nodes / 40M edges / 1 GB: ~20 s
    graph = ds.load_graph()                                       # CSCGraph, memory-mapped
    labels, split = load_labels(ds.root), load_split(ds.root)     # int64 (N,); Split(train, val, test)
    x = load_features(ds.root)                                    # np.memmap (N, feat_dim) float32, for small uses

The model (a degree-corrected planted partition, Chung-Lu style): node i gets a Pareto weight w_i (tail exponent
``power_law``; capped at an expected degree of sqrt(N * avg_degree)) and a class (equal class sizes). Each edge
picks its first end with probability proportional to w, and its other end, proportional to w, within the first
end's class with probability ``homophily``, else within one of the other classes chosen uniformly. Expected
degree is then proportional to w (a power-law degree distribution, max degree >> mean) and an edge's ends share a
class with probability ``homophily``. Edges are added both ways; self-loops and repeats are dropped, so the graph
is simple and undirected, with a little under ``num_nodes * avg_degree`` directed edges. Node ids are a random
permutation of the generating order (hubs and classes are not clustered by id).

Features: ``signal * mu[class] + N(0, I)`` float32, ``mu`` random unit vectors: one node's features say little
about its class, its neighbourhood's mean says much more, so an MLP clearly underperforms GraphSAGE (defaults, 20k
nodes, 400 train nodes, 100 full-graph epochs: MLP 44% test accuracy, 2-layer SAGE 92%; test_graph_sampler.py
checks the gap on 4k nodes with sampled training). Split: ``train_frac`` / ``val_frac`` /
``test_frac`` of the nodes, disjoint, drawn at random.

Everything is made chunk by chunk (edges regenerated for the graph builder's two passes, features a chunk of rows
at a time), so memory is O(num_nodes) plus one chunk; the folder (graph/, features.bin, labels.npy, split.npz,
meta.json: the layout of gnn/dataset.py) is built beside ``out_dir`` and renamed into place. Reproducible: the same
arguments give the same bytes.

The recipe (every argument but ``out_dir``) is recorded in meta.json under "generated", with the crc32 of
labels.npy and split.npz, and its digest in features.bin's header. ``generated_recipe(root)`` returns it only
while all of these still agree and the folder holds nothing else: a dataset a user assembled (even with a
meta.json copied from a generated one), or a generated one whose labels or split were swapped, is not the
generator's, and generate_dataset never replaces it (ForeignFolderError).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from plait.gnn.dataset import (  # noqa: F401  (re-exported: the dataset API from one import, as before)
    FILES,
    FORMAT,
    VERSION,
    GraphDataset,
    Split,
    extra_files,
    is_dataset_folder,
    load_features,
    load_labels,
    load_split,
    open_dataset,
)
from plait.gnn.graph import CSCGraph
from plait.gnn.graph_build import write_graph_files
from plait.storage.feature_file import FeatureFileError, FeatureWriter, read_header
from plait.storage.folders import read_meta, write_folder

FINGERPRINTED = ("labels.npy", "split.npz")  # crc32 recorded in meta.json["generated"]["files"]
EDGE_CHUNK = 1 << 21  # edge pairs drawn at a time
ROW_CHUNK = 1 << 16  # feature rows drawn at a time
_MEANS, _EDGES, _FEATURES, _SPLIT, _LAYOUT = range(5)  # random stream tags


def generate_dataset(out_dir: str | Path, num_nodes: int, avg_degree: float = 20, num_classes: int = 10,
                     feat_dim: int = 128, train_frac: float = 0.02, seed: int = 0, homophily: float = 0.7,
                     signal: float = 2.0, power_law: float = 2.5, val_frac: float = 0.05,
                     test_frac: float = 0.1) -> GraphDataset:
    """Write the dataset folder ``out_dir``: absent, empty, or a dataset generated here (generated_recipe), which
    is replaced; anything else is refused (ForeignFolderError) and left as it is."""
    recipe = dict(locals())  # the arguments (this is the first statement): what this dataset is made of
    del recipe["out_dir"]
    _check_args(num_nodes, avg_degree, num_classes, feat_dim, homophily, power_law, train_frac, val_frac, test_frac)
    out_dir, start = Path(out_dir), time.perf_counter()
    layout = _Layout.draw(num_nodes, avg_degree, num_classes, power_law, seed)

    def build(tmp: Path) -> None:
        (tmp / "graph").mkdir()
        pairs = int(round(num_nodes * avg_degree / 2))
        write_graph_files(tmp / "graph", lambda: layout.edges(pairs, homophily, seed), num_nodes,
                          undirected=True, dedupe=True, where="generated edges")
        graph = CSCGraph.load(tmp / "graph")
        _write_features(tmp / "features.bin", layout.labels, feat_dim, signal, seed, recipe_digest(recipe))
        _save_npy(tmp / "labels.npy", layout.labels)
        split = _draw_split(num_nodes, train_frac, val_frac, test_frac, seed)
        with open(tmp / "split.npz", "wb") as f:
            np.savez(f, train=split.train, val=split.val, test=split.test)
            f.flush()
            os.fsync(f.fileno())
        deg = graph.in_degree()
        meta = {"format": FORMAT, "version": VERSION, "num_nodes": num_nodes, "num_edges": graph.num_edges,
                "num_classes": num_classes, "feat_dim": feat_dim, "seed": seed, "avg_degree": avg_degree,
                "homophily": homophily, "signal": signal, "power_law": power_law,
                "edge_homophily": edge_homophily(graph, layout.labels), "max_degree": int(deg.max(initial=0)),
                "mean_degree": float(deg.mean()) if num_nodes else 0.0,
                "splits": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                "generated": {"recipe": recipe, "files": {name: file_crc32(tmp / name) for name in FINGERPRINTED}},
                "seconds": round(time.perf_counter() - start, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    write_folder(out_dir, build, lambda path: generated_recipe(path)[0] is not None, "generated dataset")
    return open_dataset(out_dir)


def generation_recipe(**settings) -> dict:
    """generate_dataset's arguments but out_dir, its defaults filled in: the recipe of a dataset made with them."""
    bound = inspect.signature(generate_dataset).bind(None, **settings)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "out_dir"}


def generated_recipe(root: str | Path) -> tuple[dict | None, str]:
    """``(recipe, "")`` when ``root`` holds the dataset generate_dataset wrote with ``recipe``, as it wrote it (see
    the module docstring); else ``(None, why not)``."""
    root = Path(root)
    meta = read_meta(root) or {}
    generated = meta.get("generated")
    if not isinstance(generated, dict) or not isinstance(generated.get("recipe"), dict) or \
            not isinstance(generated.get("files"), dict):
        older = {"homophily", "power_law", "edge_homophily"} <= meta.keys()  # what generate_dataset always wrote
        return None, "its meta.json records no generation recipe" + (
            " (an earlier Plait generated it without one: move it away to have it generated anew)" if older else "")
    try:
        stamp = read_header(root / "features.bin").get("meta")
    except (OSError, FeatureFileError):
        stamp = None
    if not isinstance(stamp, dict) or stamp.get("recipe") != recipe_digest(generated["recipe"]):
        return None, "its features.bin is not the one generated with the recipe in meta.json"
    for name in FINGERPRINTED:
        if file_crc32(root / name) != generated["files"].get(name):
            return None, f"its {name} is not the one generated"
    extra = extra_files(root)
    if extra:
        return None, f"it also holds {', '.join(extra[:5])}"
    return generated["recipe"], ""


def recipe_digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def file_crc32(file: Path, chunk: int = 1 << 22) -> int | None:
    """crc32 of the file's bytes; None when it cannot be read."""
    crc = 0
    try:
        with open(file, "rb") as f:
            while block := f.read(chunk):
                crc = zlib.crc32(block, crc)
    except OSError:
        return None
    return crc


def edge_homophily(graph: CSCGraph, labels: np.ndarray, chunk: int = 1 << 22) -> float:
    """Fraction of edges whose two ends share a label, counted a chunk of edges at a time."""
    same = 0
    for lo in range(0, graph.num_edges, chunk):
        hi = min(lo + chunk, graph.num_edges)
        dst = np.searchsorted(graph.indptr, np.arange(lo, hi), side="right") - 1
        same += int((labels[np.asarray(graph.indices[lo:hi])] == labels[dst]).sum())
    return same / max(graph.num_edges, 1)


@dataclass(frozen=True, eq=False)
class _Layout:
    """Generating order: class c holds positions [starts[c], starts[c+1]); node id of position p is perm[p]."""

    starts: np.ndarray  # int64 (C + 1,)
    cum_w: np.ndarray  # float64 (N,), cumulative weights in generating order
    perm: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int64 (N,), class of each node id

    @classmethod
    def draw(cls, n: int, avg_degree: float, num_classes: int, power_law: float, seed: int) -> _Layout:
        rng = np.random.default_rng([seed, _LAYOUT, 0])
        w = (1.0 - rng.random(n)) ** (-1.0 / (power_law - 1.0))  # Pareto, w >= 1
        cap = np.sqrt(n * avg_degree) / avg_degree * w.mean()  # expected degree <= sqrt(N * avg_degree)
        w = np.minimum(w, max(cap, 1.0))
        starts = np.linspace(0, n, num_classes + 1).round().astype(np.int64)
        perm = rng.permutation(n)
        labels = np.empty(n, dtype=np.int64)
        labels[perm] = np.repeat(np.arange(num_classes), np.diff(starts))
        return cls(starts, np.cumsum(w), perm, labels)

    def edges(self, pairs: int, homophily: float, seed: int):
        """Edge chunks (src ids, dst ids), the same every call."""
        c = len(self.starts) - 1
        base = np.r_[0.0, self.cum_w][self.starts]  # cumulative weight before each class
        for k, a in enumerate(range(0, pairs, EDGE_CHUNK)):
            rng = np.random.default_rng([seed, _EDGES, k])
            m = min(EDGE_CHUNK, pairs - a)
            # Edge order is irrelevant (the graph builder sorts), so the first ends are drawn in sorted order and
            # the second ends looked up in sorted order: searchsorted then walks cum_w forward (3-5x faster).
            u = self._pick(np.sort(rng.random(m)) * self.cum_w[-1], 0, len(self.cum_w))
            cu = np.searchsorted(self.starts, u, side="right") - 1
            other = (cu + rng.integers(1, max(c, 2), m)) % c
            cv = np.where(rng.random(m) < homophily, cu, other)
            x = base[cv] + rng.random(m) * (base[cv + 1] - base[cv])
            order = np.argsort(x)
            v = np.empty(m, dtype=np.int64)
            v[order] = self._pick(x[order], self.starts[cv[order]], self.starts[cv[order] + 1])
            keep = u != v
            yield self.perm[u[keep]], self.perm[v[keep]]

    def _pick(self, x: np.ndarray, lo, hi) -> np.ndarray:
        """Position whose weight interval holds x, kept within [lo, hi) against rounding."""
        return np.clip(np.searchsorted(self.cum_w, x, side="right"), lo, np.asarray(hi) - 1)


def _write_features(path: Path, labels: np.ndarray, dim: int, signal: float, seed: int, digest: str) -> None:
    mu = np.random.default_rng([seed, _MEANS, 0]).standard_normal((int(labels.max(initial=0)) + 1, dim))
    mu = (signal * mu / np.linalg.norm(mu, axis=1, keepdims=True)).astype(np.float32)
    with FeatureWriter(path, (dim,), np.float32, meta={"what": "generated node features", "recipe": digest}) as w:
        for k, a in enumerate(range(0, len(labels), ROW_CHUNK)):
            rng = np.random.default_rng([seed, _FEATURES, k])
            lab = labels[a : a + ROW_CHUNK]
            x = rng.standard_normal((len(lab), dim), dtype=np.float32)
            x += mu[lab]
            w.append(x)
        if not len(labels):
            w.row_shape = (dim,)


def _draw_split(n: int, train: float, val: float, test: float, seed: int) -> Split:
    order = np.random.default_rng([seed, _SPLIT, 0]).permutation(n)
    a, b, c = (int(round(f * n)) for f in (train, train + val, train + val + test))
    return Split(np.sort(order[:a]), np.sort(order[a:b]), np.sort(order[b:c]))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _check_args(n, avg_degree, num_classes, feat_dim, homophily, power_law, train, val, test) -> None:
    rules = [(n >= 1, f"num_nodes={n} must be >= 1"), (avg_degree > 0, f"avg_degree={avg_degree} must be > 0"),
             (1 <= num_classes <= n, f"num_classes={num_classes} must be in [1, num_nodes={n}]"),
             (feat_dim >= 1, f"feat_dim={feat_dim} must be >= 1"),
             (0 <= homophily <= 1, f"homophily={homophily} must be in [0, 1]"),
             (power_law > 2, f"power_law={power_law} must be > 2 (a finite mean degree)"),
             (min(train, val, test) >= 0 and train + val + test <= 1,
              f"train_frac={train}, val_frac={val}, test_frac={test} must be >= 0 and sum to <= 1")]
    for ok, what in rules:
        if not ok:
            raise ValueError(f"generate_dataset: {what}")
