"""Building a CSC graph (gnn/graph.py) from edges: in memory, or from a Parquet edge list in bounded memory.

    g = graph_from_parquet("edges.parquet", out="graph/")      # two passes over record batches, bounded memory
    g = graph_from_edges(src, dst, num_nodes)                  # in memory; g.save("graph/") to keep it

Every graph built here is canonical: each node's in-neighbours are sorted ascending, so the same edge set gives
the same bytes whatever the input order or batching; ``dedupe=True`` also drops repeated edges (a multigraph is
kept as given otherwise). ``undirected=True`` adds each edge both ways. Memory while building: O(num_nodes) for
degrees and cursors plus one record batch (or one sort chunk) of edges; the edges themselves go to a
memory-mapped file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from plait.gnn.graph import CSCGraph, is_graph_folder, write_meta
from plait.storage.folders import fsync_path, write_folder, write_npy

MAX_NODES = 2**31 - 1  # indices are int32
SORT_CHUNK_EDGES = 1 << 22  # edges sorted (and deduplicated) at a time in the last pass


def graph_from_edges(src, dst, num_nodes: int | None = None, undirected: bool = False,
                     dedupe: bool = False) -> CSCGraph:
    """The CSC graph of edges ``src[i] -> dst[i]``, built in memory (num_nodes defaults to max id + 1)."""
    src, dst = np.asarray(src), np.asarray(dst)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"src and dst must be 1-D arrays of one length, got shapes {src.shape} and {dst.shape}")
    _check_ids(src, dst, 0, num_nodes, "edges")
    if num_nodes is None:
        num_nodes = int(max(src.max(initial=-1), dst.max(initial=-1))) + 1
    _check_num_nodes(num_nodes)
    src, dst = src.astype(np.int64), dst.astype(np.int64)
    if undirected:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    key = _sorted_keys(dst * num_nodes + src, dedupe)
    dst, src = np.divmod(key, num_nodes)
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=num_nodes), out=indptr[1:])
    return CSCGraph(indptr, src.astype(np.int32))


def graph_from_parquet(path: str | Path, out: str | Path, src: str = "src", dst: str = "dst",
                       num_nodes: int | None = None, undirected: bool = False, dedupe: bool = False,
                       batch_rows: int = 1 << 20) -> CSCGraph:
    """Build the graph folder ``out`` from the Parquet edge list at ``path`` (a file or a folder of files, integer
    columns ``src`` and ``dst``), reading it twice in record batches of ``batch_rows``; returns it memory-mapped."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(path), format="parquet")
    for name in (src, dst):
        field = dataset.schema.field(name) if name in dataset.schema.names else None
        if field is None or not pa.types.is_integer(field.type):
            found = ", ".join(f"{f.name}: {f.type}" for f in dataset.schema)
            raise ValueError(f"{path}: needs an integer column {name!r} for edge endpoints; it has {found}. "
                             "Pass src=/dst= to name the columns")

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for batch in dataset.to_batches(columns=[src, dst], batch_size=batch_rows, use_threads=False):
            cols = [batch.column(0), batch.column(1)]
            for name, col in zip((src, dst), cols, strict=True):
                if col.null_count:
                    raise ValueError(f"{path}: column {name!r} has {col.null_count} null endpoint(s) in a batch; "
                                     "every edge needs both ends")
            yield cols[0].to_numpy(), cols[1].to_numpy()

    return graph_from_chunks(chunks, out, num_nodes, undirected, dedupe, where=str(path))


def graph_from_chunks(chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], out: str | Path,
                      num_nodes: int | None = None, undirected: bool = False, dedupe: bool = False,
                      where: str = "edges") -> CSCGraph:
    """Build the graph folder ``out`` from ``chunks()``, an iterable of (src, dst) arrays, called twice (it must
    give the same edges both times): pass 1 counts in-degrees, pass 2 places each edge with a cursor per node,
    then each node's neighbours are sorted (and deduplicated) a few million edges at a time."""
    out = Path(out)
    write_folder(out, lambda tmp: write_graph_files(tmp, chunks, num_nodes, undirected, dedupe, where),
                 is_graph_folder, "graph")
    return CSCGraph.load(out)


def write_graph_files(folder: Path, chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                      num_nodes: int | None = None, undirected: bool = False, dedupe: bool = False,
                      where: str = "edges", sort_edges: int = SORT_CHUNK_EDGES) -> None:
    """graph_from_chunks' work, writing a graph's files into the existing empty ``folder`` with no rename: for a
    caller that commits a larger folder (holding this one) atomically itself. ``sort_edges``: edges sorted at a
    time in the last pass (its working memory: about 48 bytes an edge)."""
    folder = Path(folder)
    n, indptr = _count_degrees(chunks, num_nodes, undirected, where)
    raw = np.lib.format.open_memmap(folder / "unsorted.npy", mode="w+", dtype=np.int32, shape=(int(indptr[-1]),))
    cursor = indptr[:-1].copy()
    for s, d in chunks():
        s, d = np.asarray(s, dtype=np.int64), np.asarray(d, dtype=np.int64)
        _place(raw, cursor, d, s)
        if undirected:
            _place(raw, cursor, s, d)
    indptr = _sort_segments(raw, indptr, n, dedupe, sort_edges)
    e = int(indptr[-1])
    if e == len(raw):  # nothing dropped: the sorted file is the final one
        raw.flush()
        del raw
        os.rename(folder / "unsorted.npy", folder / "indices.npy")
    else:  # deduplicated: copy the compacted prefix into a file of the right length
        indices = np.lib.format.open_memmap(folder / "indices.npy", mode="w+", dtype=np.int32, shape=(e,))
        for a in range(0, e, sort_edges):
            b = min(a + sort_edges, e)
            indices[a:b] = raw[a:b]
        indices.flush()
        del raw, indices
        os.unlink(folder / "unsorted.npy")
    fsync_path(folder / "indices.npy")
    write_npy(folder / "indptr.npy", indptr)
    write_meta(folder, n, e, {"undirected": undirected, "deduplicated": dedupe})


def _check_num_nodes(n: int) -> None:
    if not 0 <= n <= MAX_NODES:
        raise ValueError(f"num_nodes={n} is outside [0, {MAX_NODES}]: node ids are stored as int32")


def _check_ids(s: np.ndarray, d: np.ndarray, first_row: int, num_nodes: int | None, where: str) -> None:
    """Raise naming the first edge row whose endpoint is not an integer id in [0, num_nodes)."""
    for name, col in (("src", s), ("dst", d)):
        if col.dtype.kind not in "iu":
            raise TypeError(f"{where}: {name} ids must be integers, got dtype {col.dtype}")
        upper = MAX_NODES if num_nodes is None else num_nodes
        bad = (col >= upper) if col.dtype.kind == "u" else (col < 0) | (col >= upper)
        if bad.any():
            i = int(np.argmax(bad))
            rng = f"in [0, {upper})" + (" (int32)" if num_nodes is None else "")
            fix = "fix the edge list" + ("" if num_nodes is None else " or pass a larger num_nodes")
            raise IndexError(f"{where}: edge row {first_row + i} has {name}={int(col[i])}; node ids must be {rng}: "
                             f"{fix}")


def _count_degrees(chunks, num_nodes, undirected, where) -> tuple[int, np.ndarray]:
    counts, row, top = np.zeros(num_nodes or 0, dtype=np.int64), 0, -1  # top: largest id seen
    for s, d in chunks():
        s, d = np.asarray(s), np.asarray(d)
        if s.shape != d.shape or s.ndim != 1:
            raise ValueError(f"{where}: src and dst chunks must be 1-D of one length, got {s.shape} and {d.shape}")
        _check_ids(s, d, row, num_nodes, where)
        s, d = s.astype(np.int64, copy=False), d.astype(np.int64, copy=False)
        top = max(top, int(s.max(initial=-1)), int(d.max(initial=-1)))
        row += len(s)
        for col in (d, s) if undirected else (d,):
            if len(col) * 8 < len(counts) and top < len(counts):  # a small batch: O(batch), not O(num_nodes)
                np.add.at(counts, col, 1)
                continue
            c = np.bincount(col, minlength=len(counts))
            if len(c) > len(counts):
                c[: len(counts)] += counts
                counts = c
            else:
                counts += c
    n = top + 1 if num_nodes is None else num_nodes
    _check_num_nodes(n)
    counts = np.r_[counts, np.zeros(n - len(counts), dtype=np.int64)]  # nodes that are only ever sources
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return n, indptr


def _place(out: np.ndarray, cursor: np.ndarray, dst: np.ndarray, src: np.ndarray) -> None:
    """Write ``src[i]`` into the next free slot of node ``dst[i]``'s segment of ``out``; advance the cursors."""
    if not len(dst):
        return
    order = np.argsort(dst, kind="stable")
    d = dst[order]
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    runs = np.diff(np.r_[starts, len(d)])
    rank = np.arange(len(d)) - np.repeat(starts, runs)
    out[cursor[d] + rank] = src[order]
    cursor[d[starts]] += runs


def _sorted_keys(key: np.ndarray, dedupe: bool) -> np.ndarray:
    """``key`` sorted, repeats dropped when ``dedupe`` (sort + mask: several times faster than np.unique's hash)."""
    key = np.sort(key)
    return key[np.r_[True, key[1:] != key[:-1]]] if dedupe and len(key) else key


def _sort_segments(indices: np.ndarray, indptr: np.ndarray, n: int, dedupe: bool,
                   chunk: int = SORT_CHUNK_EDGES) -> np.ndarray:
    """Sort each node's segment of ``indices`` in place (deduplicated and compacted forward when ``dedupe``),
    a few million edges at a time; returns the new indptr."""
    bounds = np.unique(np.searchsorted(indptr, np.arange(0, indptr[-1], chunk), side="right") - 1)
    bounds = np.r_[bounds[bounds < n], n] if n else np.array([0])
    new_deg, write = np.zeros(n, dtype=np.int64), 0
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        seg = np.asarray(indices[indptr[a] : indptr[b]], dtype=np.int64)
        local = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(indptr[a : b + 1]))
        key = local * max(n, 1) + seg
        key = _sorted_keys(key, dedupe)
        node, nbr = np.divmod(key, max(n, 1))
        new_deg[a:b] = np.bincount(node, minlength=b - a)
        indices[write : write + len(nbr)] = nbr  # write <= indptr[a]: never overtakes what is still unread
        write += len(nbr)
    out = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new_deg, out=out[1:])
    return out
