"""What a user's graph is made of, and reading its files in bounded memory: the sources of gnn/graph_import.py.

    src = read_source("my-graph/metadata.yaml")      # a metadata file (TOML or YAML, GraphBolt's field names), or
    src = read_source("ogbn-arxiv/")                 # an OGB node-property folder, read as it is
    for s, d in edge_chunks(src.edges[0], rows):     # int64 chunks, ids checked against src.num_nodes
    rows, row_shape = feature_shape(src.features)    # cheap: headers only (CSV: None until it is read)
    for x in feature_chunks(src.features, rows): ... # float32 rows
    ids = read_column(ref)                           # a 1-D column (labels, split node ids), in RAM: O(num_nodes)

A metadata file (paths relative to it; GraphBolt OnDiskDataset's fields where they fit, one node type)::

    graph:
      nodes: [{num: 100000}]
      edges: [{format: csv | numpy | parquet, path: edges.csv}]      # csv: no header, columns src,dst
    feature_data:
      - {domain: node, name: feat, format: numpy | parquet | zarr | csv, path: feat.npy}
      - {domain: node, name: label, format: numpy | parquet | csv, path: labels.npy}   # or labels in the sets
    tasks:
      - name: node_classification
        num_classes: 10
        train_set: [{data: [{name: seeds, format: numpy, path: train.npy},
                            {name: labels, format: numpy, path: train_labels.npy}]}]
        validation_set: [...]
        test_set: [...]

Edge files: CSV (``.gz`` read as it streams; no header unless ``header: true``), Parquet (integer columns ``src``
and ``dst``, or the ``src:``/``dst:`` named, or the first two), .npy of shape (2, E) or (E, 2) (memory-mapped).
An OGB folder: raw/edge.csv.gz, raw/node-feat.csv.gz, raw/node-label.csv.gz, raw/num-node-list.csv.gz (when
present) and split/<name>/{train,valid,test}.csv.gz (the only split folder, or the first by name).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from plait.storage.errors import ProblemAndFix

EDGE_FORMATS = ("csv", "numpy", "parquet")
FEATURE_FORMATS = ("numpy", "parquet", "zarr", "csv")
COLUMN_FORMATS = ("numpy", "parquet", "csv")
SETS = {"train_set": "train", "validation_set": "val", "test_set": "test"}
OGB_SPLITS = {"train": "train", "valid": "val", "test": "test"}


class GraphImportError(ProblemAndFix, ValueError):
    """A graph to import is malformed: ``GraphImportError(problem, fix, path)``; nothing was written."""


@dataclass(frozen=True)
class FileRef:
    path: Path
    format: str
    options: dict = field(default_factory=dict)  # header (csv), src / dst / column (parquet)


@dataclass
class GraphSource:
    """A graph to import, as its source describes it (nothing read but the metadata file and file headers)."""

    where: Path  # the metadata file or OGB folder
    kind: str  # "metadata" | "ogb"
    num_nodes: int | None
    edges: list[FileRef]
    features: FileRef
    labels: FileRef | None  # every node's class; or per set, in set_labels
    splits: dict[str, FileRef]  # train / val / test -> node ids
    set_labels: dict[str, FileRef] = field(default_factory=dict)
    num_classes: int | None = None

    def files(self) -> list[Path]:
        """Every file the import reads (a zarr array: the files inside it), the metadata file first."""
        refs = [*self.edges, self.features, *([self.labels] if self.labels else []), *self.splits.values(),
                *self.set_labels.values()]
        out = [self.where] if self.where.is_file() else []
        for ref in refs:
            out += sorted(p for p in ref.path.rglob("*") if p.is_file()) if ref.path.is_dir() else [ref.path]
        return out


def read_source(path: str | Path) -> GraphSource:
    """The GraphSource at ``path``: a .toml / .yaml / .yml metadata file, or an OGB node-property folder."""
    path = Path(path).absolute()
    if path.is_dir():
        if (path / "raw" / "edge.csv.gz").is_file():
            return _ogb_source(path)
        meta = [p for p in (path / n for n in ("metadata.yaml", "metadata.yml", "metadata.toml")) if p.is_file()]
        if not meta:
            raise GraphImportError(f"{path} is a folder with neither raw/edge.csv.gz (an OGB node-property dataset) "
                                   "nor a metadata.yaml / metadata.toml", "give the metadata file that names the "
                                   "graph's files, or an OGB folder", path)
        path = meta[0]
    if not path.is_file():
        raise GraphImportError(f"{path} does not exist", "give the path of a metadata file (TOML or YAML) or of "
                               "an OGB node-property folder", path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise GraphImportError(f"{path}: a graph source is a .toml / .yaml metadata file or an OGB folder, not a "
                               f"{path.suffix or 'suffix-less'} file", "write a metadata file naming the edge, "
                               "feature, label and split files (see plait.gnn.import_sources)", path)
    try:
        if path.suffix == ".toml":
            doc = tomllib.loads(path.read_text())
        else:
            import yaml

            doc = yaml.safe_load(path.read_text())
    except Exception as e:  # noqa: BLE001  (any parse error: named with the file)
        raise GraphImportError(f"{path} cannot be parsed ({type(e).__name__}: {e})", "fix its syntax", path) from None
    if not isinstance(doc, dict):
        raise GraphImportError(f"{path} holds no table of fields", "give graph:, feature_data: and tasks:", path)
    return _metadata_source(path, doc)


def _bad(where: Path, problem: str, fix: str) -> GraphImportError:
    return GraphImportError(f"{where}: {problem}", fix, where)


def _ref(where: Path, entry, allowed: tuple[str, ...], what: str) -> FileRef:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise _bad(where, f"{what} {entry!r} names no file", f"give it path: and format: ({', '.join(allowed)})")
    fmt = entry.get("format", "")
    if fmt not in allowed:
        raise _bad(where, f"{what} {entry['path']!r} has format {fmt!r}, which Plait does not read for it",
                   f"convert it to one of {', '.join(allowed)}")
    file = (where.parent / entry["path"]).absolute()
    if not file.exists():
        raise _bad(where, f"{what} {file} does not exist", "fix its path (relative to the metadata file)")
    return FileRef(file, fmt, {k: v for k, v in entry.items() if k in ("header", "src", "dst", "column")})


def _metadata_source(where: Path, doc: dict) -> GraphSource:
    graph = doc.get("graph")
    if not isinstance(graph, dict) or not isinstance(graph.get("edges"), list) or not graph["edges"]:
        raise _bad(where, "no graph.edges list", "give graph: {nodes: [{num: N}], edges: [{format, path}]}")
    nodes = graph.get("nodes") or []
    if len(nodes) > 1 or any(isinstance(e, dict) and e.get("type") not in (None, "") for e in graph["edges"]):
        raise _bad(where, "names several node or edge types (a heterogeneous graph)",
                   "import one homogeneous graph: one node type, its edges")
    num = nodes[0].get("num") if nodes and isinstance(nodes[0], dict) else None
    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
        raise _bad(where, f"graph.nodes[0].num={num!r}", "give the number of nodes, a positive integer")
    edges = [_ref(where, e, EDGE_FORMATS, "edge file") for e in graph["edges"]]
    feats = [f for f in doc.get("feature_data") or [] if isinstance(f, dict) and f.get("domain", "node") == "node"]
    by_name = {f.get("name"): f for f in feats}
    feat = by_name.get("feat") or next((f for f in feats if f.get("name") not in ("label", "labels")), None)
    if feat is None:
        raise _bad(where, "no node features in feature_data", "add {domain: node, name: feat, format, path}")
    label = by_name.get("label") or by_name.get("labels")
    tasks = doc.get("tasks") or []
    task = tasks[0] if tasks and isinstance(tasks[0], dict) else {}
    splits, set_labels = {}, {}
    for key, name in SETS.items():
        for part in task.get(key) or []:
            for item in (part or {}).get("data") or []:
                kind = item.get("name") if isinstance(item, dict) else None
                if kind in ("seeds", "seed_nodes", "node_ids"):
                    splits[name] = _ref(where, item, COLUMN_FORMATS, f"tasks[0].{key} seeds")
                elif kind == "labels":
                    set_labels[name] = _ref(where, item, COLUMN_FORMATS, f"tasks[0].{key} labels")
    if "train" not in splits:
        raise _bad(where, "tasks[0].train_set names no seeds file", "give the train node ids: train_set: "
                   "[{data: [{name: seeds, format, path}]}]")
    if label is None and set(set_labels) != set(splits):
        raise _bad(where, "no labels: neither a node feature named 'label' nor labels beside every set's seeds",
                   "add {domain: node, name: label, format, path} to feature_data")
    classes = task.get("num_classes")
    if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 1):
        raise _bad(where, f"tasks[0].num_classes={classes!r}", "give a positive integer, or leave it out")
    return GraphSource(where, "metadata", num, edges, _ref(where, feat, FEATURE_FORMATS, "feature file"),
                       _ref(where, label, COLUMN_FORMATS, "label file") if label else None, splits,
                       {} if label else set_labels, classes)


def _ogb_source(root: Path) -> GraphSource:
    raw = root / "raw"
    for name in ("node-feat.csv.gz", "node-label.csv.gz"):
        if not (raw / name).is_file():
            raise GraphImportError(f"{root}: an OGB node-property folder needs raw/{name}, which is missing",
                                   "put the dataset's raw files there as OGB ships them", raw / name)
    folders = sorted(p for p in (root / "split").iterdir() if p.is_dir()) if (root / "split").is_dir() else []
    if not folders:
        raise GraphImportError(f"{root}: no split/<name>/ folder", "add split/<name>/{train,valid,test}.csv.gz",
                               root / "split")
    splits = {}
    for stem, name in OGB_SPLITS.items():
        file = folders[0] / f"{stem}.csv.gz"
        if not file.is_file():
            raise GraphImportError(f"{file} is missing", "add it (node ids, one per line)", file)
        splits[name] = FileRef(file, "csv")
    num, counts = None, raw / "num-node-list.csv.gz"
    if counts.is_file():
        values = read_column(FileRef(counts, "csv"))
        if values.size != 1:
            raise GraphImportError(f"{counts} holds {values.size} counts (several graphs)", "import a dataset of "
                                   "one graph (a node-property one)", counts)
        num = int(values[0])
    return GraphSource(root, "ogb", num, [FileRef(raw / "edge.csv.gz", "csv")], FileRef(raw / "node-feat.csv.gz",
                       "csv"), FileRef(raw / "node-label.csv.gz", "csv"), splits)


def _csv_reader(ref: FileRef, names: list[str] | None, types, block: int):
    import pyarrow.csv as pc

    read = pc.ReadOptions(block_size=block, column_names=None if ref.options.get("header") else names,
                          autogenerate_column_names=names is None and not ref.options.get("header"))
    convert = pc.ConvertOptions(column_types=types) if types else None
    return pc.open_csv(str(ref.path), read_options=read, convert_options=convert)


def _stream_error(ref: FileRef, e: Exception) -> GraphImportError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "runcated" in text or isinstance(e, EOFError):
        return GraphImportError(f"{ref.path} is truncated ({text})", "copy or download the file again, whole",
                                ref.path)
    return GraphImportError(f"{ref.path} cannot be read as {ref.format} ({type(e).__name__}: {text})",
                            "fix the file, or its format in the metadata", ref.path)


def edge_chunks(ref: FileRef, num_nodes: int | None, rows: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The edges of one file as int64 (src, dst) chunks of up to ``rows``; an id outside [0, num_nodes) (or not
    an integer) raises GraphImportError naming the file and the row."""
    first = 0
    for s, d in _raw_edges(ref, rows):
        for name, col in (("src", s), ("dst", d)):
            if col.dtype.kind not in "iu":
                raise GraphImportError(f"{ref.path}: {name} ids are {col.dtype}, not integers", "write node ids "
                                       "as integers", ref.path)
            bad = (col < 0) | (col >= (num_nodes if num_nodes is not None else 2**31 - 1))
            if bad.any():
                i = int(np.argmax(bad))
                raise GraphImportError(f"{ref.path}: edge row {first + i} has {name}={int(col[i])}, outside "
                                       f"[0, {num_nodes}) (the graph's nodes)", "fix the edge list, or graph.nodes' "
                                       "num in the metadata", ref.path)
        first += len(s)
        yield s.astype(np.int64, copy=False), d.astype(np.int64, copy=False)


def _raw_edges(ref: FileRef, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    import pyarrow as pa

    if ref.format == "numpy":
        a = _npy(ref)
        if a.ndim != 2 or 2 not in a.shape:
            raise GraphImportError(f"{ref.path} holds an array of shape {a.shape}", "save the edges as (2, E) "
                                   "(row 0 sources) or (E, 2)", ref.path)
        pairs_first = a.shape[0] == 2 and a.shape[1] != 2
        for lo in range(0, a.shape[1] if pairs_first else a.shape[0], rows):
            part = a[:, lo : lo + rows] if pairs_first else a[lo : lo + rows].T
            yield np.asarray(part[0]), np.asarray(part[1])
        return
    try:
        if ref.format == "csv":
            reader = _csv_reader(ref, ["src", "dst"], None, 1 << 22)
            it = iter(reader)
        else:
            it = _parquet_batches(ref, rows)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            if batch.num_columns < 2:
                raise GraphImportError(f"{ref.path} holds {batch.num_columns} column(s)", "write two: src, dst",
                                       ref.path)
            out = []
            for k in range(2):
                col = batch.column(k)
                if col.null_count:
                    raise GraphImportError(f"{ref.path}: {col.null_count} edge(s) miss an endpoint",
                                           "every edge needs both ends", ref.path)
                out.append(col.to_numpy(zero_copy_only=False))
            yield out[0], out[1]
    except GraphImportError:
        raise
    except (OSError, EOFError, pa.ArrowException, ValueError) as e:
        raise _stream_error(ref, e) from None


def _parquet_batches(ref: FileRef, rows: int):
    """Record batches of the two endpoint columns, file by file (a folder: its .parquet files by name), one row
    group at a time: pyarrow.dataset's scanner reads many batches ahead (hundreds of MB on a large edge list)."""
    import pyarrow.parquet as pq

    files = sorted(ref.path.glob("*.parquet")) if ref.path.is_dir() else [ref.path]
    for file in files:
        pf = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
        names = pf.schema_arrow.names
        cols = [ref.options.get("src", "src"), ref.options.get("dst", "dst")]
        if not set(cols) <= set(names):
            if "src" in ref.options or len(names) < 2:
                raise GraphImportError(f"{file} has columns {names}, not {cols}", "name the endpoint columns with "
                                       "src: and dst: in the metadata", file)
            cols = names[:2]
        yield from pf.iter_batches(batch_size=rows, columns=cols, use_threads=False)


def _npy(ref: FileRef) -> np.ndarray:
    try:
        return np.load(ref.path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise GraphImportError(f"{ref.path} cannot be read as a .npy array ({e})", "save it with np.save",
                               ref.path) from None


def feature_shape(ref: FileRef) -> tuple[int | None, tuple[int, ...] | None]:
    """(rows, row shape) from the file's header; (None, None) for CSV, known only once it is read."""
    if ref.format == "numpy":
        a = _npy(ref)
        return a.shape[0], tuple(a.shape[1:]) or (1,)
    if ref.format == "zarr":
        import zarr

        try:
            a = zarr.open_array(str(ref.path), mode="r")
        except Exception as e:  # noqa: BLE001
            raise GraphImportError(f"{ref.path} cannot be opened as a zarr array ({e})", "write it with "
                                   "zarr.create_array", ref.path) from None
        return a.shape[0], tuple(a.shape[1:]) or (1,)
    if ref.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(ref.path).metadata.num_rows, None
    return None, None


def feature_chunks(ref: FileRef, rows: int = 1 << 16) -> Iterator[np.ndarray]:
    """The feature rows as float32 (n, dim) chunks of up to ``rows``."""
    import pyarrow as pa

    try:
        if ref.format in ("numpy", "zarr"):
            if ref.format == "numpy":
                a = _npy(ref)
            else:
                import zarr

                a = zarr.open_array(str(ref.path), mode="r")
            for lo in range(0, a.shape[0], rows):
                yield _float_rows(ref, np.asarray(a[lo : lo + rows]))
        elif ref.format == "parquet":
            import pyarrow.parquet as pq
            from plait.storage.feature_ingest import _batch_rows

            pf = pq.ParquetFile(ref.path)
            names = pf.schema_arrow.names
            is_list = len(names) == 1 and not pa.types.is_floating(pf.schema_arrow.field(0).type) and \
                not pa.types.is_integer(pf.schema_arrow.field(0).type)
            for batch in pf.iter_batches(batch_size=rows):
                yield _float_rows(ref, _batch_rows(batch, names, is_list, ref.path))
        else:
            for batch in _csv_reader(ref, None, None, 1 << 22):
                cols = [c.to_numpy(zero_copy_only=False) for c in batch.columns]
                yield _float_rows(ref, np.stack(cols, axis=1))
    except GraphImportError:
        raise
    except (OSError, EOFError, pa.ArrowException, ValueError, TypeError) as e:
        raise _stream_error(ref, e) from None


def _float_rows(ref: FileRef, x: np.ndarray) -> np.ndarray:
    if x.ndim == 1:
        x = x[:, None]
    if x.dtype.kind not in "fiub":
        raise GraphImportError(f"{ref.path} holds {x.dtype} features, not numbers", "write numeric features",
                               ref.path)
    return x.reshape(len(x), -1).astype(np.float32, copy=False)


def read_column(ref: FileRef) -> np.ndarray:
    """A one-column file (labels, node ids) as a 1-D array, in RAM; its own dtype (the caller checks it)."""
    import pyarrow as pa

    try:
        if ref.format == "numpy":
            a = np.load(ref.path, allow_pickle=False)
        elif ref.format == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(ref.path)
            col = table.column(ref.options.get("column", table.column_names[0]))
            if col.null_count:
                raise GraphImportError(f"{ref.path}: {col.null_count} empty value(s)", "give a value on every "
                                       "row", ref.path)
            a = col.to_numpy()
        else:
            import pyarrow.csv as pc

            read = pc.ReadOptions(autogenerate_column_names=not ref.options.get("header"))
            table = pc.read_csv(str(ref.path), read_options=read)
            if table.num_columns != 1:
                raise GraphImportError(f"{ref.path} holds {table.num_columns} columns", "write one value a row",
                                       ref.path)
            col = table.column(0)
            if col.null_count:
                raise GraphImportError(f"{ref.path}: {col.null_count} empty value(s) (unlabelled nodes?)",
                                       "give a value on every row", ref.path)
            a = col.to_numpy()
    except GraphImportError:
        raise
    except (OSError, EOFError, pa.ArrowException, ValueError) as e:
        raise _stream_error(ref, e) from None
    a = np.asarray(a)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        raise GraphImportError(f"{ref.path} holds an array of shape {a.shape}", "write one value per node", ref.path)
    return a
