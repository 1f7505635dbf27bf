"""Importing a user's graph (gnn/graph_import.py, import_sources.py, import_readers.py): every source kind gives the
dataset the in-memory truth gives; bad input is named before anything is written; a changed source is refused
unless rebuilt; the CLI and a job spec's data.source import; memory stays bounded; and a stochastic block model made
outside Plait's generator trains through the job above an MLP, alike through the packed and the in-memory loaders."""

import gzip
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from plait.gnn.data_path import DataConfig, dataset_action
from plait.gnn.dataset import check_dataset, load_labels, load_split, open_dataset, read_features
from plait.gnn.graph_build import graph_from_edges
from plait.gnn.graph_import import import_graph
from plait.gnn.import_readers import GraphImportError
from plait.runtime.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "gnn_sage_ooc.toml")


def make_graph(n=300, e=2000, dim=6, classes=3, seed=0, loops=True):
    rng = np.random.default_rng(seed)
    s, d = rng.integers(0, n, e), rng.integers(0, n, e)
    if loops:
        s[:5] = d[:5]
    perm = rng.permutation(n)
    return {"n": n, "src": s, "dst": d, "x": rng.standard_normal((n, dim)).astype(np.float32),
            "y": rng.integers(0, classes, n), "classes": classes,
            "split": {"train": np.sort(perm[:60]), "val": np.sort(perm[60:90]), "test": np.sort(perm[90:150])}}


def set_entry(key, path):
    return {key: [{"data": [{"name": "seeds", "format": "numpy", "path": path}]}]}


def write_metadata(folder: Path, g: dict, edges="parquet", features="numpy", suffix=".yaml") -> Path:
    """The graph ``g`` as files and a metadata file naming them (GraphBolt's fields)."""
    folder.mkdir(parents=True, exist_ok=True)
    if edges == "parquet":
        pq.write_table(pa.table({"src": g["src"], "dst": g["dst"]}), folder / "edges.parquet", row_group_size=500)
        edge_list = [{"format": "parquet", "path": "edges.parquet"}]
    else:  # half as CSV, a quarter as (2, E) .npy, a quarter as (E, 2) .npy
        h, q = len(g["src"]) // 2, 3 * len(g["src"]) // 4
        pairs = zip(g["src"][:h], g["dst"][:h], strict=True)
        (folder / "edges.csv").write_text("".join(f"{a},{b}\n" for a, b in pairs))
        np.save(folder / "e1.npy", np.stack([g["src"][h:q], g["dst"][h:q]]))
        np.save(folder / "e2.npy", np.stack([g["src"][q:], g["dst"][q:]], axis=1))
        edge_list = [{"format": "csv", "path": "edges.csv"}, {"format": "numpy", "path": "e1.npy"},
                     {"format": "numpy", "path": "e2.npy"}]
    if features == "numpy":
        np.save(folder / "feat.npy", g["x"])
        feat = {"domain": "node", "name": "feat", "format": "numpy", "path": "feat.npy"}
    elif features == "parquet":
        x = g["x"]
        pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])}),
                       folder / "feat.parquet", row_group_size=64)
        feat = {"domain": "node", "name": "feat", "format": "parquet", "path": "feat.parquet"}
    else:
        import zarr

        z = zarr.create_array(store=str(folder / "feat.zarr"), shape=g["x"].shape, dtype="float32", chunks=(64, 6))
        z[:] = g["x"]
        feat = {"domain": "node", "name": "feat", "format": "zarr", "path": "feat.zarr"}
    np.save(folder / "labels.npy", g["y"])
    for k, ids in g["split"].items():
        np.save(folder / f"{k}.npy", ids)
    doc = {"dataset_name": "test", "graph": {"nodes": [{"num": g["n"]}], "edges": edge_list},
           "feature_data": [feat, {"domain": "node", "name": "label", "format": "numpy", "path": "labels.npy"}],
           "tasks": [{"name": "node_classification", "num_classes": g["classes"],
                      **set_entry("train_set", "train.npy"), **set_entry("validation_set", "val.npy"),
                      **set_entry("test_set", "test.npy")}]}
    meta = folder / f"metadata{suffix}"
    if suffix == ".toml":
        meta.write_text(toml_text(doc))
    else:
        meta.write_text(yaml.safe_dump(doc))
    return meta


def toml_text(doc: dict) -> str:
    """The few shapes write_metadata uses, as TOML (inline tables)."""
    import json

    def value(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in doc.items())


def write_ogb(root: Path, g: dict) -> Path:
    raw, split = root / "raw", root / "split" / "random"
    raw.mkdir(parents=True)
    split.mkdir(parents=True)

    def gz(path, lines):
        with gzip.open(path, "wt") as f:
            f.write("".join(lines))

    gz(raw / "edge.csv.gz", [f"{a},{b}\n" for a, b in zip(g["src"], g["dst"], strict=True)])
    gz(raw / "node-feat.csv.gz", [",".join(repr(float(v)) for v in row) + "\n" for row in g["x"]])
    gz(raw / "node-label.csv.gz", [f"{v}\n" for v in g["y"]])
    gz(raw / "num-node-list.csv.gz", [f"{g['n']}\n"])
    for stem, k in (("train", "train"), ("valid", "val"), ("test", "test")):
        gz(split / f"{stem}.csv.gz", [f"{v}\n" for v in g["split"][k]])
    return root


def assert_matches(ds, g, undirected=False, dedupe=False, self_loops="keep"):
    check_dataset(ds)
    s, d = g["src"], g["dst"]
    if self_loops != "keep":
        s, d = s[s != d], d[s != d]
    if self_loops == "add":
        s, d = np.r_[s, np.arange(g["n"])], np.r_[d, np.arange(g["n"])]
    want, got = graph_from_edges(s, d, g["n"], undirected, dedupe), ds.load_graph()
    assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.indices, want.indices)
    assert np.array_equal(read_features(ds.root), g["x"])
    assert np.array_equal(load_labels(ds.root), g["y"])
    split = load_split(ds.root)
    for k in ("train", "val", "test"):
        assert np.array_equal(getattr(split, k), g["split"][k])
    assert ds.meta["num_classes"] == g["classes"] and ds.meta["feat_dim"] == g["x"].shape[1]


@pytest.mark.parametrize("edges,features,suffix", [("parquet", "numpy", ".yaml"), ("mixed", "parquet", ".toml"),
                                                   ("parquet", "zarr", ".yml")])
def test_a_metadata_source_imports_as_the_in_memory_truth(tmp_path, edges, features, suffix):
    g = make_graph()
    meta = write_metadata(tmp_path / "src", g, edges, features, suffix)
    assert_matches(import_graph(meta, tmp_path / "ds"), g)
    record = open_dataset(tmp_path / "ds").meta["imported"]
    assert record["kind"] == "metadata" and all({"bytes", "mtime_ns", "crc32"} <= f.keys() for f in record["files"])


@pytest.mark.parametrize("undirected,dedupe,self_loops", [(True, True, "drop"), (False, True, "add"),
                                                          (True, False, "keep")])
def test_the_ogb_layout_imports_with_each_option(tmp_path, undirected, dedupe, self_loops):
    g = make_graph(n=200, e=900)
    src = write_ogb(tmp_path / "ogbn-toy", g)
    assert_matches(import_graph(src, tmp_path / "ds", undirected, dedupe, self_loops), g, undirected, dedupe,
                   self_loops)


def test_labels_given_beside_each_sets_seeds_import(tmp_path):
    g = make_graph()
    meta = write_metadata(tmp_path / "src", g)
    doc = yaml.safe_load(meta.read_text())
    doc["feature_data"] = doc["feature_data"][:1]
    for key, k in (("train_set", "train"), ("validation_set", "val"), ("test_set", "test")):
        np.save(tmp_path / "src" / f"{k}_labels.npy", g["y"][g["split"][k]])
        doc["tasks"][0][key][0]["data"].append({"name": "labels", "format": "numpy", "path": f"{k}_labels.npy"})
    meta.write_text(yaml.safe_dump(doc))
    ds = import_graph(meta, tmp_path / "ds")
    labels = load_labels(ds.root)
    for ids in g["split"].values():
        assert np.array_equal(labels[ids], g["y"][ids])


def damage(case: str, folder: Path, meta: Path) -> str:
    """Break one thing in the source; returns a piece of the message that must name it."""
    doc = yaml.safe_load(meta.read_text())
    if case == "node id out of range":
        t = pq.read_table(folder / "edges.parquet").to_pydict()
        t["dst"][1234] = 300
        pq.write_table(pa.table(t), folder / "edges.parquet")
        return "edge row 1234 has dst=300"
    if case == "feature rows":
        np.save(folder / "feat.npy", np.zeros((299, 6), np.float32))
        return "299 feature rows"
    if case == "float labels":
        np.save(folder / "labels.npy", np.zeros(300, np.float64))
        return "float64 labels"
    if case == "string labels":
        pq.write_table(pa.table({"y": [str(i % 3) for i in range(300)]}), folder / "labels.parquet")
        doc["feature_data"][1].update(format="parquet", path="labels.parquet")
        meta.write_text(yaml.safe_dump(doc))
        return "labels, not integer class ids"
    if case == "overlapping splits":
        np.save(folder / "val.npy", np.r_[np.load(folder / "train.npy")[:3], np.load(folder / "val.npy")[3:]])
        return "share 3 node(s)"
    if case == "split out of range":
        np.save(folder / "test.npy", np.array([1, 2, 300]))
        return "outside [0, 300)"
    if case == "missing file":
        os.unlink(folder / "labels.npy")
        return "labels.npy does not exist"
    if case == "unknown format":
        doc["graph"]["edges"][0]["format"] = "graphml"
        meta.write_text(yaml.safe_dump(doc))
        return "format 'graphml'"
    raise AssertionError(case)


CASES = ["node id out of range", "feature rows", "float labels", "string labels", "overlapping splits",
         "split out of range", "missing file", "unknown format"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, case):
    meta = write_metadata(tmp_path / "src", make_graph())
    named = damage(case, tmp_path / "src", meta)
    with pytest.raises(GraphImportError, match=named.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        import_graph(meta, tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DEST, no build folder, no lock left


def test_a_truncated_gz_is_named_and_nothing_is_written(tmp_path):
    src = write_ogb(tmp_path / "ogb", make_graph(n=200, e=20000, loops=False))
    edges = src / "raw" / "edge.csv.gz"
    edges.write_bytes(edges.read_bytes()[: edges.stat().st_size // 2])
    with pytest.raises(GraphImportError, match="edge.csv.gz is truncated"):
        import_graph(src, tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ogb"]


def test_a_changed_source_is_refused_until_rebuilt_and_a_foreign_folder_never_replaced(tmp_path):
    g = make_graph()
    meta = write_metadata(tmp_path / "src", g)
    first = import_graph(meta, tmp_path / "ds").meta
    os.utime(tmp_path / "src" / "feat.npy")  # touched, same bytes: still the same source
    assert import_graph(meta, tmp_path / "ds").meta == first
    g["x"] = g["x"] + 1
    np.save(tmp_path / "src" / "feat.npy", g["x"])
    data = DataConfig(path=str(tmp_path / "ds"), source=str(meta))
    with pytest.raises(ConfigError, match="feat.npy: its contents changed"):
        dataset_action(data)
    with pytest.raises(GraphImportError, match="--rebuild"):
        import_graph(meta, tmp_path / "ds")
    assert open_dataset(tmp_path / "ds").meta == first
    data.rebuild = True
    assert dataset_action(data)[0] == "reimport"
    assert_matches(import_graph(meta, tmp_path / "ds", rebuild=True), g)
    with pytest.raises(ConfigError, match="changed since"):  # other options: another dataset
        dataset_action(DataConfig(path=str(tmp_path / "ds"), source=str(meta), undirected=True))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(GraphImportError, match="never replaced"):
        import_graph(meta, mine, rebuild=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_the_cli_imports_end_to_end(tmp_path):
    g = make_graph()
    src = write_ogb(tmp_path / "ogb", g)
    cmd = [sys.executable, "-m", "plait.runtime", "gnn", "import", str(src), str(tmp_path / "ds"), "--undirected",
           "--dedupe", "--self-loops", "drop"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "imported 300 nodes" in out.stdout
    assert_matches(open_dataset(tmp_path / "ds"), g, True, True, "drop")
    other = subprocess.run(cmd[:-4], capture_output=True, text=True, timeout=120)  # the same folder, other options
    assert other.returncode == 2 and "--rebuild" in other.stderr
    assert_matches(open_dataset(tmp_path / "ds"), g, True, True, "drop")
    gone = subprocess.run([sys.executable, "-m", "plait.runtime", "gnn", "import", str(tmp_path / "nothere.yaml"),
                           str(tmp_path / "ds3")], capture_output=True, text=True, timeout=120)
    assert gone.returncode == 2 and "nothere.yaml does not exist" in gone.stderr and not (tmp_path / "ds3").exists()


def test_import_memory_is_bounded_by_its_chunks_not_the_graph(tmp_path):
    """Edges 20x and features 20x a chunk: the peak of Python-heap allocations (numpy's included) stays far below
    either (the edges go through memory-mapped files, the rows stream into the feature file)."""
    n, e, dim = 20_000, 600_000, 256
    rng = np.random.default_rng(1)
    folder = tmp_path / "src"
    folder.mkdir()
    writer = pq.ParquetWriter(folder / "edges.parquet", pa.schema([("src", pa.int64()), ("dst", pa.int64())]))
    for _ in range(e // 50_000):
        writer.write_table(pa.table({"src": rng.integers(0, n, 50_000), "dst": rng.integers(0, n, 50_000)}))
    writer.close()
    np.save(folder / "feat.npy", rng.standard_normal((n, dim)).astype(np.float32))
    np.save(folder / "labels.npy", rng.integers(0, 5, n))
    np.save(folder / "train.npy", np.arange(100))
    doc = {"graph": {"nodes": [{"num": n}], "edges": [{"format": "parquet", "path": "edges.parquet"}]},
           "feature_data": [{"name": "feat", "format": "numpy", "path": "feat.npy"},
                            {"name": "label", "format": "numpy", "path": "labels.npy"}],
           "tasks": [set_entry("train_set", "train.npy")]}
    (folder / "g.yaml").write_text(yaml.safe_dump(doc))
    tracemalloc.start()
    try:
        ds = import_graph(folder / "g.yaml", tmp_path / "ds", undirected=True, edge_rows=1 << 15, feature_rows=1024,
                          sort_edges=1 << 15)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    edge_bytes, feature_bytes = 2 * e * 2 * 8, n * dim * 4  # both directions as int64 pairs; float32 rows
    assert ds.meta["num_edges"] == 2 * e
    assert peak < min(edge_bytes, feature_bytes) / 2, (peak, edge_bytes, feature_bytes)


def sbm(tmp_path: Path, n=3000, classes=4, seed=3) -> tuple[Path, dict]:
    """A stochastic block model with noisy features, written as Parquet edges and .npy files: not Plait's generator.
    Each node has ~8 neighbours in its block and ~2 outside; its features say little about its block alone."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    members = [np.flatnonzero(y == c) for c in range(classes)]
    s_in = np.repeat(np.arange(n), 4)
    d_in = np.array([rng.choice(members[y[v]]) for v in s_in])
    s_out, d_out = rng.integers(0, n, n), rng.integers(0, n, n)
    mu = rng.standard_normal((classes, 32))
    x = (0.35 * mu[y] / np.linalg.norm(mu, axis=1, keepdims=True)[y] * np.sqrt(32) / 4
         + rng.standard_normal((n, 32))).astype(np.float32)
    perm = rng.permutation(n)
    split = {"train": np.sort(perm[:600]), "val": np.sort(perm[600:900]), "test": np.sort(perm[900:1800])}
    g = {"n": n, "src": np.r_[s_in, s_out], "dst": np.r_[d_in, d_out], "x": x, "y": y, "classes": classes,
         "split": split}
    return write_metadata(tmp_path / "sbm", g), g


def mlp_accuracy(g: dict) -> float:
    torch.manual_seed(0)
    x, y, sp = torch.from_numpy(g["x"]), torch.from_numpy(g["y"]), g["split"]
    mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, g["classes"]))
    opt = torch.optim.Adam(mlp.parameters(), lr=0.01, weight_decay=5e-4)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x[sp["train"]]), y[sp["train"]]).backward()
        opt.step()
    with torch.no_grad():
        return (mlp(x[sp["test"]]).argmax(1) == y[sp["test"]]).float().mean().item()


def test_an_imported_block_model_trains_above_an_mlp_alike_through_packed_and_memory(ray_cluster, tmp_path):
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    meta, g = sbm(tmp_path)
    common = [f"data.path={tmp_path / 'ds'}", f"data.source={meta}", "data.undirected=true", "data.dedupe=true",
              "workers.num=1", "train.batch_size=100", "train.hidden=32", "train.fanouts=[8, 8]", "train.epochs=6",
              "train.eval_nodes=0", "train.lr=0.01", "train.checkpoint_every=0", "train.dropout=0.2"]
    acc = {}
    for loader in ("packed", "memory"):
        out = run_job(load_spec(EXAMPLE, [*common, f"train.loader={loader}", f"run_dir={tmp_path / loader}"]))
        acc[loader] = out["test_acc"]
    mlp = mlp_accuracy(g)
    print(f"test accuracy: packed {acc['packed']:.3f}, memory {acc['memory']:.3f}, MLP {mlp:.3f}")
    assert open_dataset(tmp_path / "ds").meta["imported"]["source"] == str(meta)
    assert min(acc.values()) > mlp + 0.15, (acc, mlp)
    assert abs(acc["packed"] - acc["memory"]) < 0.06, acc


def test_a_damaged_file_of_an_import_names_the_command_that_imports_it_again(tmp_path):
    from plait.gnn.data_path import with_rebuild_hint
    from plait.storage.feature_file import FeatureFileError

    meta = write_metadata(tmp_path / "src", make_graph())
    ds = import_graph(meta, tmp_path / "ds")
    error = FeatureFileError(f"{ds.features}: data block 3 fails its checksum", "rewrite it", ds.features)
    fixed = with_rebuild_hint(error, DataConfig(path=str(ds.root), source=str(meta)))
    assert "data.rebuild=true" in fixed.fix and f"plait gnn import {meta} {ds.root} --rebuild" in fixed.fix
