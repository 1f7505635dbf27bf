"""Import a user's graph into a Plait GNN dataset folder (gnn/dataset.py), in bounded memory.

    ds = import_graph("my-graph/metadata.yaml", "data/my-graph", undirected=True)   # or an OGB folder
    ds = import_graph(..., rebuild=True)            # the sources changed: import them again
    plait gnn import SOURCE DEST [--undirected] [--dedupe] [--self-loops keep|drop|add] [--rebuild]

The sources (gnn/import_sources.py: a TOML / YAML metadata file with GraphBolt's field names, or an OGB
node-property folder; their files read by gnn/import_readers.py) are checked first, cheaply: files there and of a
known format, the feature file's row count (from its header) against the number of nodes, labels integer class
ids, splits in range and disjoint. Then the folder is built beside DEST (``<DEST>.tmp-<pid>-<thread>``) and renamed
in: the graph by gnn/graph_build.py's two passes over the edge files (the first checks every node id, naming file
and row, before anything is placed; a truncated .gz fails there), the features streamed a chunk of rows at a time
into a checksummed feature file (float32), labels, split and meta.json. Memory: O(num_nodes) (degrees, labels,
split) plus a chunk of edges or feature rows, never the edges or the features (bench/gnn_import.py: 20M edges and
0.5 GB of features import in 175 MiB of working memory). A failure leaves DEST as it was.

meta.json records what the dataset was made from under "imported": the source, the options, and each file read
(path relative to the source's folder, bytes, mtime_ns, crc32). DEST is refused unless absent, empty, or an import
of the same sources; an import whose sources changed (bytes, or mtime and contents) or whose options differ is
replaced only with ``rebuild=True``. A folder that is not a Plait import is never replaced.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from plait.gnn.dataset import FORMAT, VERSION, GraphDataset, extra_files, open_dataset
from plait.gnn.generate import file_crc32
from plait.gnn.graph import CSCGraph
from plait.gnn.graph_build import write_graph_files
from plait.gnn.import_readers import GraphImportError, edge_chunks, feature_chunks, feature_shape, read_column
from plait.gnn.import_sources import GraphSource, read_source
from plait.storage.feature_file import FeatureWriter
from plait.storage.folders import read_meta, write_folder, write_npy

SELF_LOOPS = ("keep", "drop", "add")
EDGE_ROWS = 1 << 18  # edges read at a time (and placed: ~100 bytes an edge of working memory)
SORT_EDGES = 1 << 20  # edges sorted at a time in the graph's last pass (~48 bytes an edge)
FEATURE_ROWS = 1 << 15  # feature rows read at a time
HASH_CHUNK = 1 << 20  # bytes read at a time for a source file's crc32


def import_options(undirected: bool = False, dedupe: bool = False, self_loops: str = "keep") -> dict:
    if self_loops not in SELF_LOOPS:
        raise GraphImportError(f"self_loops={self_loops!r} is not a choice", f"choose one of {', '.join(SELF_LOOPS)}")
    return {"undirected": bool(undirected), "dedupe": bool(dedupe), "self_loops": self_loops}


def import_graph(source: str | Path, dest: str | Path, undirected: bool = False, dedupe: bool = False,
                 self_loops: str = "keep", rebuild: bool = False, edge_rows: int = EDGE_ROWS,
                 feature_rows: int = FEATURE_ROWS, sort_edges: int = SORT_EDGES) -> GraphDataset:
    """Import the graph ``source`` describes into the dataset folder ``dest`` (the module doc); returns it. An import
    of the same unchanged sources with the same options already at ``dest`` is returned as it is. ``edge_rows``,
    ``feature_rows``, ``sort_edges``: the chunks that bound the working memory (edges read, feature rows read,
    edges sorted at a time)."""
    options = import_options(undirected, dedupe, self_loops)
    dest = Path(dest)
    state, why = import_state(dest, source, options)
    if state == "same" and not rebuild:
        return open_dataset(dest)
    if state == "changed" and not rebuild:
        raise GraphImportError(f"{dest} was imported from {source} with other options or from files that changed "
                               f"since ({why})", "import it again "
                               f"with `plait gnn import {source} {dest} --rebuild` (data.rebuild=true in a job spec)",
                               dest)
    if state == "foreign":
        raise GraphImportError(f"{dest} is not a graph Plait imported ({why}); it is never replaced",
                               "choose an absent or empty folder for DEST", dest)
    src = read_source(source)
    n, labels, split, classes = check_source(src)
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        (tmp / "graph").mkdir()
        write_graph_files(tmp / "graph", lambda: _edges(src, n, options["self_loops"], edge_rows), n,
                          undirected=options["undirected"], dedupe=options["dedupe"], where=str(src.where),
                          sort_edges=sort_edges)
        edges = CSCGraph.load(tmp / "graph").num_edges
        dim = _write_features(tmp / "features.bin", src, n, feature_rows)
        write_npy(tmp / "labels.npy", labels)
        with open(tmp / "split.npz", "wb") as f:
            np.savez(f, **split)
            f.flush()
            os.fsync(f.fileno())
        meta = {"format": FORMAT, "version": VERSION, "num_nodes": n, "num_edges": edges, "num_classes": classes,
                "feat_dim": dim, "splits": {k: len(v) for k, v in split.items()},
                "imported": {"source": str(src.where), "kind": src.kind, "options": options,
                             "files": source_files(src, hashes=True)},
                "seconds": round(time.perf_counter() - start, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    write_folder(dest, build, lambda p: import_record(p) is not None, "imported graph")
    return open_dataset(dest)


def check_source(src: GraphSource) -> tuple[int, np.ndarray, dict, int]:
    """The cheap checks (before anything is written): (num_nodes, labels int64, split, num_classes)."""
    rows, _ = feature_shape(src.features)
    labels = None
    if src.labels is not None:
        labels = _labels(src.labels, read_column(src.labels))
    n = src.num_nodes if src.num_nodes is not None else rows if rows is not None else \
        len(labels) if labels is not None else None
    if n is None:
        raise GraphImportError(f"{src.where}: the number of nodes is not given", "give graph.nodes: [{num: N}]",
                               src.where)
    if rows is not None and rows != n:
        raise GraphImportError(f"{src.features.path} holds {rows} feature rows, the graph has {n} nodes",
                               "write one feature row per node, in node id order (or fix graph.nodes' num)",
                               src.features.path)
    if labels is not None and len(labels) != n:
        raise GraphImportError(f"{src.labels.path} holds {len(labels)} labels, the graph has {n} nodes",
                               "write one label per node, in node id order", src.labels.path)
    split = {}
    for name, ref in src.splits.items():
        ids = read_column(ref)
        if ids.dtype.kind not in "iu":
            raise GraphImportError(f"{ref.path} holds {ids.dtype} values, not node ids", "write integer node ids",
                                   ref.path)
        if ids.size and not 0 <= ids.min() <= ids.max() < n:
            raise GraphImportError(f"{ref.path} holds node ids from {ids.min()} to {ids.max()}, outside [0, {n})",
                                   "fix the split (or the number of nodes)", ref.path)
        if len(np.unique(ids)) != len(ids):
            raise GraphImportError(f"{ref.path} names a node twice", "list each node once", ref.path)
        split[name] = np.sort(ids.astype(np.int64))
    for name in ("val", "test"):
        split.setdefault(name, np.zeros(0, dtype=np.int64))
    names = list(split)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = np.intersect1d(split[a], split[b])
            if both.size:
                raise GraphImportError(f"{src.where}: the {a} and {b} splits share {both.size} node(s), e.g. node "
                                       f"{int(both[0])}", "make the splits disjoint", src.splits[a].path)
    if labels is None:  # GraphBolt's per-set labels: every labelled node is in a set
        labels = np.zeros(n, dtype=np.int64)
        for name, ref in src.set_labels.items():
            got = _labels(ref, read_column(ref))
            ids = read_column(src.splits[name]).astype(np.int64)
            if len(got) != len(ids):
                raise GraphImportError(f"{ref.path} holds {len(got)} labels for {len(ids)} seeds in "
                                       f"{src.splits[name].path}", "give one label per seed, in order", ref.path)
            labels[ids] = got
    classes = src.num_classes or int(labels.max(initial=0)) + 1
    if labels.size and labels.max() >= classes:
        raise GraphImportError(f"{src.where}: labels go up to {int(labels.max())}, num_classes={classes}",
                               "fix num_classes (class ids are 0 .. num_classes - 1)", src.where)
    return n, labels, split, classes


def _labels(ref, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise GraphImportError(f"{ref.path} holds {a.dtype} labels, not integer class ids", "write class ids as "
                               "integers 0 .. C-1 (a float column with NaN for unlabelled nodes is not supported: "
                               "drop those nodes from the splits and give them any class)", ref.path)
    if a.size and a.min() < 0:
        raise GraphImportError(f"{ref.path} holds a negative class id ({int(a.min())})", "class ids are 0 .. C-1",
                               ref.path)
    return a.astype(np.int64)


def _edges(src: GraphSource, n: int, self_loops: str, rows: int):
    for ref in src.edges:
        for s, d in edge_chunks(ref, n, rows):
            if self_loops != "keep":
                keep = s != d
                s, d = s[keep], d[keep]
            yield s, d
    if self_loops == "add":
        for lo in range(0, n, rows):
            ids = np.arange(lo, min(lo + rows, n), dtype=np.int64)
            yield ids, ids


def _write_features(path: Path, src: GraphSource, n: int, rows: int) -> int:
    with FeatureWriter(path, None, np.float32, meta={"what": "imported node features"}) as w:
        for x in feature_chunks(src.features, rows):
            w.append(x)
            if w.num_rows > n:
                break
        if w.num_rows != n:
            raise GraphImportError(f"{src.features.path} holds {'more than ' if w.num_rows > n else ''}{w.num_rows} "
                                   f"feature rows, the graph has {n} nodes", "write one feature row per node, in "
                                   "node id order", src.features.path)
        return int(w.row_shape[0])


def source_files(src: GraphSource, hashes: bool = False) -> list[dict]:
    base = src.where.parent if src.where.is_file() else src.where
    out = []
    for f in src.files():
        st = f.stat()
        name = os.path.relpath(f, base)
        out.append({"file": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                    **({"crc32": file_crc32(f, HASH_CHUNK)} if hashes else {})})
    return out


def import_record(root: str | Path) -> dict | None:
    """meta.json's "imported" record when ``root`` holds an import and nothing else; else None."""
    meta = read_meta(Path(root)) or {}
    record = meta.get("imported")
    if meta.get("format") != FORMAT or not isinstance(record, dict) or extra_files(Path(root)):
        return None
    return record


def import_state(dest: str | Path, source: str | Path, options: dict) -> tuple[str, str]:
    """What ``dest`` holds against ``source``: ("absent" | "same" | "changed" | "foreign", why). "changed": an
    import of other options or of source files that changed (bytes, or mtime and crc32). Reads only."""
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        return "foreign", "it is a file or a symbolic link"
    if not dest.exists() or not any(dest.iterdir()):
        return "absent", ""
    record = import_record(dest)
    if record is None:
        return "foreign", "its meta.json records no import, or it holds other files"
    if record.get("options") != options:
        return "changed", f"imported with {record.get('options')}, asked for {options}"
    try:
        src = read_source(source)
    except GraphImportError as e:
        return "changed", str(e)
    if str(src.where) != record.get("source") and Path(record.get("source", "")).name != src.where.name:
        return "changed", f"imported from {record.get('source')}"
    then = {f["file"]: f for f in record.get("files", [])}
    now = {f["file"]: f for f in source_files(src)}
    base = src.where.parent if src.where.is_file() else src.where
    changes = [f"{f} is new" for f in now if f not in then] + [f"{f} is gone" for f in then if f not in now]
    for f in now.keys() & then.keys():
        a, b = then[f], now[f]
        if a.get("bytes") != b["bytes"]:
            changes.append(f"{f}: {a.get('bytes')} -> {b['bytes']} bytes")
        elif a.get("mtime_ns") != b["mtime_ns"] and file_crc32(base / f, HASH_CHUNK) != a.get("crc32"):
            changes.append(f"{f}: its contents changed (crc32)")
    return ("changed", "; ".join(sorted(changes)[:5])) if changes else ("same", "")


def main(argv: list[str]) -> int:
    """``plait gnn import SOURCE DEST [...]`` (runtime/cli.py hands the arguments here)."""
    import argparse

    p = argparse.ArgumentParser(prog="plait gnn import", description="import a graph into a Plait GNN dataset")
    p.add_argument("source", help="a metadata file (TOML / YAML) or an OGB node-property folder")
    p.add_argument("dest", help="the dataset folder to write (absent, empty, or an import of the same sources)")
    p.add_argument("--undirected", action="store_true", help="add every edge both ways")
    p.add_argument("--dedupe", action="store_true", help="drop repeated edges")
    p.add_argument("--self-loops", default="keep", choices=SELF_LOOPS)
    p.add_argument("--rebuild", action="store_true", help="import again an import whose sources changed")
    a = p.parse_args(argv)
    start = time.perf_counter()
    state, _ = import_state(Path(a.dest), a.source, import_options(a.undirected, a.dedupe, a.self_loops))
    ds = import_graph(a.source, a.dest, a.undirected, a.dedupe, a.self_loops, a.rebuild)
    m = ds.meta
    if state == "same" and not a.rebuild:
        print(f"{ds.root} is already an import of {a.source} (its files unchanged, the same options): kept as it is",
              flush=True)
        return 0
    print(f"imported {m['num_nodes']:,} nodes, {m['num_edges']:,} edges, {m['feat_dim']} features, "
          f"{m['num_classes']} classes into {ds.root} ({time.perf_counter() - start:.1f} s)", flush=True)
    return 0
