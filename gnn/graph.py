"""A graph in CSC on disk: for node v, its in-neighbours are ``indices[indptr[v]:indptr[v + 1]]``.

    g = graph_from_parquet("edges.parquet", out="graph/")      # gnn/graph_build.py: bounded memory
    g = graph_from_edges(src, dst, num_nodes)                  # gnn/graph_build.py; g.save("graph/") to keep it
    g = CSCGraph.load("graph/")                                # memory-mapped: the topology need not fit in RAM
    g.neighbors(v), g.in_degree(nodes), g.edge_index()         # edge_index(): PyG (2, E) source -> target

A graph folder holds ``indptr.npy`` (int64, N + 1), ``indices.npy`` (int32, E) and ``meta.json`` (format, version,
num_nodes, num_edges, how it was built). Each node's in-neighbours are sorted ascending (gnn/graph_build.py).

Writing is atomic: the folder is built beside the target (``<path>.tmp-<pid>-<thread>``), fsynced, and renamed in;
a graph already there is renamed aside first and removed after. Only an absent path, an empty folder or a graph
folder written here (nothing else in it) is ever replaced; anything else is refused with the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from plait.storage.errors import ProblemAndFix
from plait.storage.folders import ForeignFolderError, fsync_path, read_meta, write_folder, write_npy

FORMAT = "plait-csc-graph"
VERSION = 1
GRAPH_FILES = ("indptr.npy", "indices.npy", "meta.json")


NotAGraphError = ForeignFolderError  # a path that is not a graph folder written here


class CorruptGraphError(ProblemAndFix, RuntimeError):
    """A graph folder is incomplete or inconsistent: ``CorruptGraphError(problem, fix, folder)``."""


@dataclass(frozen=True, eq=False)
class CSCGraph:
    indptr: np.ndarray  # int64, num_nodes + 1
    indices: np.ndarray  # int32, num_edges: in-neighbours of each node, sorted ascending per node
    path: Path | None = None  # the folder it was loaded from

    def __reduce__(self):  # a memory-mapped graph pickles as its folder (Ray workers map it again)
        if self.path is not None and isinstance(self.indices, np.memmap):
            return CSCGraph.load, (self.path,)
        return CSCGraph, (np.asarray(self.indptr), np.asarray(self.indices), self.path)

    @property
    def num_nodes(self) -> int:
        return len(self.indptr) - 1

    @property
    def num_edges(self) -> int:
        return len(self.indices)

    def in_degree(self, nodes=None) -> np.ndarray:
        """In-degree of ``nodes`` (all nodes when None), int64."""
        if nodes is None:
            return np.diff(self.indptr)
        nodes = np.asarray(nodes, dtype=np.int64)
        return self.indptr[nodes + 1] - self.indptr[nodes]

    def neighbors(self, v: int) -> np.ndarray:
        """In-neighbours of node ``v`` (sorted ascending)."""
        return np.asarray(self.indices[self.indptr[v] : self.indptr[v + 1]])

    def edge_index(self):
        """All edges as a PyG ``edge_index`` (torch int64, shape (2, E), row 0 source, row 1 target); in RAM."""
        import torch

        dst = np.repeat(np.arange(self.num_nodes, dtype=np.int64), np.diff(self.indptr))
        return torch.from_numpy(np.stack([np.asarray(self.indices, dtype=np.int64), dst]))

    def save(self, path: str | Path) -> CSCGraph:
        """Write this graph as the graph folder at ``path`` (atomically) and return it memory-mapped from there."""
        path = Path(path)

        def build(tmp: Path) -> None:
            write_npy(tmp / "indptr.npy", np.asarray(self.indptr, dtype=np.int64))
            write_npy(tmp / "indices.npy", np.asarray(self.indices, dtype=np.int32))
            write_meta(tmp, self.num_nodes, self.num_edges, {})

        write_folder(path, build, is_graph_folder, "graph")
        return CSCGraph.load(path)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> CSCGraph:
        """Open the graph folder at ``path``; arrays are memory-mapped read-only unless ``mmap=False``."""
        path = Path(path)

        def bad(problem: str) -> CorruptGraphError:
            return CorruptGraphError(problem, f"delete {path} and build the graph again", path)

        meta = read_meta(path)
        if meta is None:
            raise bad(f"{path / 'meta.json'} not found: {path} is not a finished graph folder")
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise bad(f"{path / 'meta.json'}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                      f"expected {FORMAT!r} version {VERSION}")
        try:
            indptr = np.load(path / "indptr.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            indices = np.load(path / "indices.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise bad(f"{path}: cannot read its arrays ({e})") from None
        n, e = meta.get("num_nodes"), meta.get("num_edges")
        if not (isinstance(n, int) and isinstance(e, int) and n >= 0 and e >= 0):
            raise bad(f"{path / 'meta.json'}: num_nodes={n!r} num_edges={e!r} are not counts")
        if indptr.dtype != np.int64 or indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] != e:
            raise bad(f"{path / 'indptr.npy'}: dtype {indptr.dtype} shape {indptr.shape} does not describe {n} nodes "
                      f"and {e} edges (meta.json)")
        if indices.dtype != np.int32 or indices.shape != (e,):
            raise bad(f"{path / 'indices.npy'}: dtype {indices.dtype} shape {indices.shape}, expected int32 ({e},) "
                      "(meta.json)")
        return cls(indptr, indices, path)


def is_graph_folder(path: Path) -> bool:
    """Whether ``path`` is a folder this module wrote, holding nothing but a graph's files."""
    meta = read_meta(path)
    return bool(meta) and meta.get("format") == FORMAT and set(os.listdir(path)) <= set(GRAPH_FILES)


def write_meta(folder: Path, num_nodes: int, num_edges: int, extra: dict) -> None:
    """A graph folder's meta.json (format, version, sizes, ``extra``: how it was built), fsynced."""
    meta = {"format": FORMAT, "version": VERSION, "num_nodes": int(num_nodes), "num_edges": int(num_edges), **extra}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    fsync_path(folder / "meta.json")
