"""What a user's graph is made of, and reading its files in bounded memory: the sources of gnn/graph_import.py.

    src = read_source("my-graph/metadata.yaml")      # a metadata file (TOML or YAML, GraphBolt's field names), or
    src = read_source("ogbn-arxiv/")                 # an OGB node-property folder, read as it is
    src.edges, src.features, src.labels, src.splits  # FileRefs, read by gnn/import_readers.py

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
from dataclasses import dataclass, field
from pathlib import Path

from plait.gnn.import_readers import FileRef, GraphImportError, read_column

EDGE_FORMATS = ("csv", "numpy", "parquet")
FEATURE_FORMATS = ("numpy", "parquet", "zarr", "csv")
COLUMN_FORMATS = ("numpy", "parquet", "csv")
SETS = {"train_set": "train", "validation_set": "val", "test_set": "test"}
OGB_SPLITS = {"train": "train", "valid": "val", "test": "test"}


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
