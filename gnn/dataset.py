"""A GNN dataset folder: its layout, opening and reading it, and checking it before a job starts.

    ds = open_dataset("data/gnn-100k")              # -> GraphDataset (paths and meta)
    check_dataset(ds)                              # the files agree with meta.json and each other (cheap)
    graph = ds.load_graph()                        # CSCGraph, memory-mapped
    labels, split = load_labels(ds.root), load_split(ds.root)
    x = read_features(ds.root)                     # every row in RAM, each block checked against its crc32

The layout (``generate_dataset`` writes it; you can assemble one yourself)::

    graph/         a graph folder: graph_from_parquet(edges, out=<root>/graph)       (gnn/graph_build.py)
    features.bin   a feature file, one row per node: write_features_from_parquet(<root>/features.bin, x.parquet)
    labels.npy     int64 (num_nodes,), class ids in [0, num_classes)
    split.npz      train, val, test: node ids (np.savez)
    meta.json      {"format": "plait-gnn-dataset", "version": 1, "num_nodes": N, "feat_dim": F, "num_classes": C}

A dataset Plait generated also records its recipe in meta.json (gnn/generate.py); only such a dataset is ever
replaced, by the generator. Anything else in the folder is left alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from plait.gnn.graph import CSCGraph
from plait.runtime.config import ConfigError
from plait.storage.disk_reader import DiskStore
from plait.storage.feature_file import open_feature_file
from plait.storage.folders import is_lock_file, lock_file, read_meta

FORMAT = "plait-gnn-dataset"
VERSION = 1
FILES = ("graph", "features.bin", "labels.npy", "split.npz", "meta.json")
READ_ROWS = 1 << 16  # feature rows per read in read_features


class DatasetLayoutError(ConfigError):
    """A dataset folder's files do not agree with its meta.json or with each other (the CLI exits 2)."""

    user_error = True


@dataclass(frozen=True, eq=False)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass(frozen=True, eq=False)
class GraphDataset:
    root: Path
    graph: Path  # graph folder (CSCGraph.load)
    features: Path  # feature file (plait.storage.feature_file)
    labels: Path  # labels.npy, int64 (N,)
    split: Path  # split.npz: train, val, test node ids
    meta: dict

    def load_graph(self) -> CSCGraph:
        return CSCGraph.load(self.graph)


def open_dataset(root: str | Path) -> GraphDataset:
    """The dataset at ``root`` (its meta.json says it is one; check_dataset checks the rest)."""
    root = Path(root)
    meta = read_meta(root)
    if not meta or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FileNotFoundError(f"{root} is not a finished GNN dataset ({root / 'meta.json'} missing or of another "
                                f"format); run generate_dataset({str(root)!r}, ...) first, or assemble one as "
                                "plait.gnn.dataset describes")
    return GraphDataset(root, root / "graph", root / "features.bin", root / "labels.npy", root / "split.npz", meta)


def load_labels(root: str | Path) -> np.ndarray:
    """Class of every node, int64 (N,)."""
    return np.load(open_dataset(root).labels, allow_pickle=False)


def load_split(root: str | Path) -> Split:
    """Train / validation / test node ids (sorted, disjoint)."""
    with np.load(open_dataset(root).split, allow_pickle=False) as z:
        return Split(z["train"], z["val"], z["test"])


def load_features(root: str | Path) -> np.ndarray:
    """The feature rows as a read-only np.memmap (no checksums verified): for tests and small graphs; training
    reads them through a plait.storage row store, or read_features."""
    info = open_feature_file(open_dataset(root).features)
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=info.data_offset, shape=info.shape)


def read_features(root: str | Path) -> np.ndarray:
    """Every feature row in RAM, read in large sequential reads with each block checked against its crc32 (a
    damaged block raises FeatureFileError naming it)."""
    with DiskStore(open_dataset(root).features, mode="pread") as store:
        out = np.empty((store.num_rows, *store.row_shape), dtype=store.dtype)
        for a in range(0, store.num_rows, READ_ROWS):
            b = min(a + READ_ROWS, store.num_rows)
            out[a:b] = store.read_rows(a, b)
    return out


def is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` holds a meta.json declaring a GNN dataset (readable; whether it is whole: check_dataset)."""
    meta = read_meta(path)
    return bool(meta) and meta.get("format") == FORMAT


def check_dataset(ds: GraphDataset) -> None:
    """Check, reading only headers, shapes, labels and the split, that the files agree with meta.json and with
    each other; raise DatasetLayoutError (or the FeatureFileError / CorruptGraphError of a damaged file) naming
    the file. Feature rows are checked against their checksums as they are read, not here."""
    meta, root = ds.meta, ds.root
    n, dim, classes = (meta.get(k) for k in ("num_nodes", "feat_dim", "num_classes"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, dim, classes)):
        raise DatasetLayoutError(f"{root / 'meta.json'} gives num_nodes={n!r}, feat_dim={dim!r}, num_classes="
                                 f"{classes!r}: each must be a positive integer; fix meta.json")
    for name in FILES:
        if not (root / name).exists():
            raise DatasetLayoutError(f"{root / name} is missing: a dataset holds {', '.join(FILES)}")
    info = open_feature_file(ds.features)
    if info.shape != (n, dim):
        raise DatasetLayoutError(f"{ds.features} holds rows of shape {info.shape}, meta.json says {n} nodes of "
                                 f"{dim} features: write the features of these nodes, or fix meta.json")
    graph = ds.load_graph()
    if graph.num_nodes != n:
        raise DatasetLayoutError(f"{ds.graph} has {graph.num_nodes} nodes, meta.json says {n}: build the graph "
                                 "with num_nodes=N, or fix meta.json")
    labels = _load(ds.labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise DatasetLayoutError(f"{ds.labels} holds {labels.dtype} of shape {labels.shape}, expected integer class "
                                 f"ids of shape ({n},)")
    if n and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise DatasetLayoutError(f"{ds.labels} holds class ids from {int(labels.min())} to {int(labels.max())}, "
                                 f"meta.json says num_classes={classes}: ids must be in [0, {classes})")
    try:
        with np.load(ds.split, allow_pickle=False) as z:
            parts = {k: np.asarray(z[k]) for k in ("train", "val", "test")}
    except (OSError, ValueError, KeyError) as e:
        raise DatasetLayoutError(f"{ds.split} cannot be read as train, val and test node ids ({type(e).__name__}: "
                                 f"{e}): write it with np.savez(f, train=..., val=..., test=...)") from None
    for k, ids in parts.items():
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and not 0 <= ids.min() <= ids.max() < n):
            raise DatasetLayoutError(f"{ds.split}: {k} must be a 1-D array of node ids in [0, {n}), got "
                                     f"{ids.dtype} of shape {ids.shape}")
    if not parts["train"].size:
        raise DatasetLayoutError(f"{ds.split}: train holds no node ids; a job needs some to train on")


def _load(file: Path) -> np.ndarray:
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetLayoutError(f"{file} cannot be read as a .npy array ({type(e).__name__}: {e})") from None


def extra_files(path: Path) -> list[str]:
    """Entries of the dataset folder ``path`` that are not a dataset's files (a stale lock file of a killed
    graph build inside it, e.g. ``graph.lock``, does not count)."""
    locks = {lock_file(Path(name)).name for name in FILES}
    return sorted(name for name in os.listdir(path)
                  if name not in FILES and not (name in locks and is_lock_file(path / name)))
