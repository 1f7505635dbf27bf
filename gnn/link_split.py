"""Link prediction's edge split: held-out validation and test edges, and the graph that training passes messages on.

    cfg = LinkConfig(val_frac=0.05, test_frac=0.1)                   # train.link in a spec
    split = ensure_link_split(ds, cfg, "data/gnn.link")              # -> LinkSplit, reused while its recipe holds
    split.graph()                                                    # CSCGraph of the train edges only
    split.train_pos, split.val, split.test                           # (2, E) int64 source, destination

Candidates are the graph's distinct edges without self-loops; for an undirected graph (``undirected=True``, the
default: every edge is stored both ways, as the generator and a symmetrised import write it) a candidate is an
unordered pair, taken as ``src < dst``. ``val_frac`` and ``test_frac`` of the candidates (rounded) are drawn with
``seed`` and removed from the graph, both directions of each for an undirected graph (every copy of a repeated
edge), so a held-out edge can never appear in a sampled neighbourhood. The remaining candidates are the training
positives. Memory: the graph's edge list in RAM (16 bytes an edge) while the split is made, once.

The split folder (``<folder>/split-<recipe hash>``, written beside and renamed in by storage/folders.write_folder;
only such a folder is ever replaced) holds ``graph/`` (a graph folder, gnn/graph.py), ``train_pos.npy``,
``val.npy``, ``test.npy`` ((2, E) int64) and ``meta.json`` (format, recipe: the dataset's meta and the split
settings, counts). A folder with the same recipe is reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from plait.gnn.graph import CSCGraph
from plait.gnn.graph import write_meta as write_graph_meta
from plait.runtime.config import ConfigError
from plait.storage.folders import read_meta, write_folder, write_npy

FORMAT = "plait-gnn-link-split"
VERSION = 1
DECODERS = ("dot", "mlp")


@dataclass
class LinkConfig:
    """``train.link``: the link-prediction task's settings (used when ``train.task = "link"``)."""

    val_frac: float = 0.05  # share of the edges held out for validation
    test_frac: float = 0.1  # and for test
    undirected: bool = True  # an edge and its reverse are one link: both held out together
    split_seed: int = 0
    neg_per_pos: int = 1  # training: uniform random destinations per positive edge
    decoder: str = "dot"  # dot | mlp (on the product of the two embeddings)
    eval_negatives: int = 100  # each held-out edge ranked against this many fixed random destinations
    eval_edges: int = 2000  # held-out edges scored per evaluation (val after each epoch, test at the end); 0 = all
    hits: list[int] = field(default_factory=lambda: [10, 50])  # Hits@K reported

    def check(self) -> None:
        if not (0 <= self.val_frac and 0 <= self.test_frac and self.val_frac + self.test_frac < 1):
            raise ValueError(f"train.link.val_frac={self.val_frac}, train.link.test_frac={self.test_frac}: shares "
                             "of the edges >= 0 that leave some for training (sum < 1)")
        if self.neg_per_pos < 1 or self.eval_negatives < 1 or self.eval_edges < 0:
            raise ValueError(f"train.link.neg_per_pos={self.neg_per_pos} and train.link.eval_negatives="
                             f"{self.eval_negatives} must be >= 1, train.link.eval_edges={self.eval_edges} >= 0")
        if self.decoder not in DECODERS:
            raise ValueError(f"train.link.decoder={self.decoder!r}: choose one of {', '.join(DECODERS)}")
        if not self.hits or any(k < 1 for k in self.hits):
            raise ValueError(f"train.link.hits={self.hits}: a list of K >= 1 for Hits@K")

    def recipe(self) -> dict:
        """What the split depends on."""
        return {"val_frac": self.val_frac, "test_frac": self.test_frac, "undirected": self.undirected,
                "split_seed": self.split_seed}


@dataclass(frozen=True, eq=False)
class LinkSplit:
    root: Path
    train_pos: np.ndarray  # (2, P) int64: the training positives (one direction for an undirected graph)
    val: np.ndarray  # (2, V) int64 held-out validation edges
    test: np.ndarray  # (2, T) int64 held-out test edges
    meta: dict

    def graph(self) -> CSCGraph:
        """The message-passing graph: every edge but the held-out ones (memory-mapped)."""
        return CSCGraph.load(self.root / "graph")


def split_edges(graph: CSCGraph, cfg: LinkConfig) -> tuple[CSCGraph, np.ndarray, np.ndarray, np.ndarray]:
    """(train graph in RAM, train positives, val edges, test edges) as the module doc describes."""
    n = graph.num_nodes
    indptr = np.asarray(graph.indptr)
    src = np.asarray(graph.indices, dtype=np.int64)
    dst = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    ok = src < dst if cfg.undirected else src != dst
    cand = np.unique(src[ok] * n + dst[ok])  # distinct candidate keys, sorted
    if cfg.undirected:
        back = src > dst
        lonely = len(np.setdiff1d(dst[back] * n + src[back], cand)) + len(np.setdiff1d(cand, dst[back] * n + src[back]))
        if lonely:
            raise ConfigError(f"train.link.undirected=true, but {lonely} of the graph's edges are stored one way only "
                              "(an undirected graph holds each edge both ways): set train.link.undirected=false for "
                              "a directed graph, or import the graph symmetrised")
    rng = np.random.default_rng([cfg.split_seed, 0x11])
    n_val, n_test = round(cfg.val_frac * len(cand)), round(cfg.test_frac * len(cand))
    pick = rng.permutation(len(cand))
    held = np.sort(cand[pick[: n_val + n_test]])
    keys = src * n + dst
    out = _isin_sorted(keys, held)
    if cfg.undirected:
        out |= _isin_sorted(dst * n + src, held)
    counts = np.bincount(dst[~out], minlength=n)
    train = CSCGraph(np.r_[0, np.cumsum(counts)].astype(np.int64), src[~out].astype(np.int32))

    def pairs(k: np.ndarray) -> np.ndarray:
        return np.stack([k // n, k % n]).astype(np.int64)

    train_pos = pairs(np.setdiff1d(cand, held, assume_unique=True))
    return train, train_pos, pairs(cand[pick[:n_val]]), pairs(cand[pick[n_val : n_val + n_test]])


def _isin_sorted(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if not sorted_set.size:
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, keys), len(sorted_set) - 1)
    return sorted_set[pos] == keys


def split_recipe(ds, cfg: LinkConfig) -> dict:
    """The dataset (its meta.json, less timings) and the split settings: a split folder is reused while equal."""
    meta = {k: v for k, v in ds.meta.items() if k != "seconds"}
    return {"dataset": meta, **cfg.recipe()}


def split_dir(ds, cfg: LinkConfig, folder: str | Path) -> Path:
    digest = hashlib.sha256(json.dumps(split_recipe(ds, cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(folder).resolve() / f"split-{digest}"


def is_split_folder(path: Path) -> bool:
    meta = read_meta(path)
    return bool(meta) and meta.get("format") == FORMAT


def ensure_link_split(ds, cfg: LinkConfig, folder: str | Path, rebuild: bool = False) -> LinkSplit:
    """The split of dataset ``ds`` for ``cfg`` in ``folder`` (see the module doc): made unless a current one is
    there (``rebuild=True`` makes it again)."""
    out = split_dir(ds, cfg, folder)
    recipe = split_recipe(ds, cfg)
    meta = read_meta(out)
    if rebuild or not (meta and meta.get("format") == FORMAT and meta.get("version") == VERSION
                       and meta.get("recipe") == recipe):
        graph, train_pos, val, test = split_edges(ds.load_graph(), cfg)

        def build(tmp: Path) -> None:
            (tmp / "graph").mkdir()
            write_npy(tmp / "graph" / "indptr.npy", graph.indptr)
            write_npy(tmp / "graph" / "indices.npy", graph.indices)
            write_graph_meta(tmp / "graph", graph.num_nodes, graph.num_edges, {"built_by": "link split"})
            for name, a in (("train_pos", train_pos), ("val", val), ("test", test)):
                write_npy(tmp / f"{name}.npy", a)
            counts = {"train_pos": train_pos.shape[1], "val": val.shape[1], "test": test.shape[1],
                      "train_graph_edges": graph.num_edges}
            (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "recipe": recipe,
                                                       **counts}, indent=1))

        Path(folder).mkdir(parents=True, exist_ok=True)
        write_folder(out, build, is_split_folder, "link split")
    return open_link_split(out)


def open_link_split(root: str | Path) -> LinkSplit:
    root = Path(root)
    meta = read_meta(root)
    if not meta or meta.get("format") != FORMAT:
        raise FileNotFoundError(f"{root} is not a link split folder (no {FORMAT} meta.json); let the GNN job's "
                                "prepare step (train.task='link') or ensure_link_split make it")
    arrays = {name: np.load(root / f"{name}.npy", allow_pickle=False) for name in ("train_pos", "val", "test")}
    return LinkSplit(root, meta=meta, **arrays)
