"""GNN data safety: a dataset a user assembled is trained on and never replaced; a generated one of another recipe is
refused with the two choices; relative data paths under a Ray job land outside Ray's temporary copy; every path that
reads feature rows checks their checksums and packs check themselves; a damaged file's error names the command that
rebuilds it; build locks leave nothing behind; storage and gnn import one way; their data errors are user errors."""

import ast
import importlib
import inspect
import json
import pkgutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from plait.gnn.data_path import dataset_action, rebuild_hints
from plait.gnn.dataset import is_dataset_folder, load_split, open_dataset
from plait.gnn.generate import generate_dataset, generated_recipe
from plait.gnn.gnn_job import make_loader
from plait.gnn.graph_build import graph_from_parquet
from plait.gnn.models import build_model
from plait.gnn.offline import prepare_packed
from plait.gnn.pack_info import CorruptPackError
from plait.gnn.packed_loader import PackedLoader
from plait.gnn.scoring import Scorer
from plait.runtime.cli import main
from plait.runtime.config import ConfigError
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec
from plait.runtime.worker_group import RankError
from plait.storage.feature_file import FeatureFileError, open_feature_file
from plait.storage.feature_ingest import write_features_from_parquet
from plait.storage.folders import dataset_lock

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "gnn_sage_ooc.toml")
SMALL = ["train.batch_size=32", "train.hidden=16", "train.fanouts=[5, 5]", "train.eval_nodes=0", "train.epochs=1"]
GENERATED = ["data.num_nodes=400", "data.train_frac=0.2", "data.feat_dim=16", "data.num_classes=4"]


def assemble_dataset(root: Path, n: int = 500, dim: int = 16, classes: int = 4) -> None:
    """A dataset in Plait's layout made the way a user would: graph and features imported from Parquet with
    Plait's importers, labels and split written with numpy, meta.json by hand."""
    rng = np.random.default_rng(7)
    sources = root.parent / f"{root.name}-sources"
    sources.mkdir()
    pq.write_table(pa.table({"src": rng.integers(0, n, 3000), "dst": rng.integers(0, n, 3000)}),
                   sources / "edges.parquet")
    x = rng.standard_normal((n, dim)).astype(np.float32)
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}), sources / "x.parquet")
    root.mkdir()
    graph_from_parquet(sources / "edges.parquet", out=root / "graph", num_nodes=n, undirected=True, dedupe=True)
    write_features_from_parquet(root / "features.bin", sources / "x.parquet")
    np.save(root / "labels.npy", rng.integers(0, classes, n))
    ids = rng.permutation(n)
    np.savez(root / "split.npz", train=np.sort(ids[:200]), val=np.sort(ids[200:300]), test=np.sort(ids[300:400]))
    (root / "meta.json").write_text(json.dumps({"format": "plait-gnn-dataset", "version": 1, "num_nodes": n,
                                                "feat_dim": dim, "num_classes": classes}))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def spec(tmp_path: Path, data: Path, *overrides: str):
    return load_spec(EXAMPLE, [f"data.path={data}", f"run_dir={tmp_path / 'run'}", *SMALL, *overrides])


def driver_side(tmp_path: Path, data: Path, *overrides: str):
    """What `plait run` does on the driver before the ranks start: validate, then prepare."""
    s = spec(tmp_path, data, *overrides)
    s.module.validate(s.config, s.workers.num)
    s.module.prepare(s.config, tmp_path / "run")
    return s.config


def flip_block_of_row(features: Path, row: int) -> int:
    """Flip 64 bytes inside the 4 KiB block holding feature row ``row``; returns the block."""
    info = open_feature_file(features)
    block = row * info.row_bytes // info.block_size
    with open(features, "r+b") as f:
        f.seek(info.data_offset + block * info.block_size + 100)
        damaged = bytes(b ^ 0x5A for b in f.read(64))
        f.seek(info.data_offset + block * info.block_size + 100)
        f.write(damaged)
    return block


# --- item 1: whose dataset is it -------------------------------------------------------------------------------


def test_a_dataset_the_user_assembled_is_used_as_it_is_and_never_replaced(tmp_path, capsys):
    mine = tmp_path / "my-dataset"
    assemble_dataset(mine)
    before = snapshot(mine)
    cfg = driver_side(tmp_path, mine)  # data.generate is left at its default (true), as in the issue
    out = capsys.readouterr().out
    assert "Plait did not generate" in out and "training on it as it is" in out and "generating" not in out
    assert snapshot(mine) == before  # labels, split, features, graph and meta.json byte for byte
    assert Path(cfg.pack_path).is_relative_to(tmp_path / "my-dataset.packs")  # packs beside it, not in it


def test_rebuild_is_refused_for_a_dataset_the_user_assembled_with_exit_code_2(tmp_path, capsys):
    mine = tmp_path / "my-dataset"
    assemble_dataset(mine)
    before = snapshot(mine)
    rc = main(["run", EXAMPLE, f"data.path={mine}", f"run_dir={tmp_path / 'run'}", "data.rebuild=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a GNN dataset Plait did not generate" in err and "never replaces it" in err
    assert "data.rebuild_packs=true" in err  # what it can rebuild instead
    assert snapshot(mine) == before and not (tmp_path / "run").exists()


def test_a_meta_json_copied_from_a_generated_dataset_does_not_make_a_users_dataset_replaceable(tmp_path):
    generated = generate_dataset(tmp_path / "gen", num_nodes=500, feat_dim=16, num_classes=4)
    mine = tmp_path / "mine"
    assemble_dataset(mine)
    (mine / "meta.json").write_text((generated.root / "meta.json").read_text())  # a template, edited or not
    before = snapshot(mine)
    assert generated_recipe(generated.root)[0] is not None
    assert generated_recipe(mine) == (None, "its features.bin is not the one generated with the recipe in meta.json")
    with pytest.raises(ValueError, match="not a generated dataset folder written by Plait"):
        generate_dataset(mine, num_nodes=500, feat_dim=16, num_classes=4)
    assert snapshot(mine) == before


def test_a_generated_dataset_of_another_recipe_is_refused_with_the_two_choices(tmp_path, capsys):
    data = tmp_path / "gnn"
    driver_side(tmp_path, data, *GENERATED, "train.loader=memory")
    before = snapshot(data)
    rc = main(["run", EXAMPLE, f"data.path={data}", f"run_dir={tmp_path / 'run2'}", *GENERATED, "data.num_nodes=500"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds a dataset Plait generated with another recipe (num_nodes=400)" in err
    assert f"data.path={tmp_path / 'gnn-num_nodes500'} generates a new dataset there" in err
    assert "or data.rebuild=true replaces this one" in err
    assert snapshot(data) == before
    driver_side(tmp_path, data, *GENERATED, "data.num_nodes=500", "data.rebuild=true", "train.loader=memory")
    assert open_dataset(data).meta["num_nodes"] == 500


def test_a_users_dataset_whose_files_disagree_is_refused_before_launch_naming_the_file(tmp_path, capsys):
    mine = tmp_path / "mine"
    assemble_dataset(mine)
    np.save(mine / "labels.npy", np.zeros(499, dtype=np.int64))  # one node short
    rc = main(["run", EXAMPLE, f"data.path={mine}", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "labels.npy holds int64 of shape (499,), expected integer class ids of shape (500,)" in err
    assert not (tmp_path / "run").exists()


# --- item 5: build locks ------------------------------------------------------------------------------------------


def test_a_graph_built_inside_a_dataset_folder_leaves_no_lock_file_there(tmp_path):
    mine = tmp_path / "mine"
    assemble_dataset(mine)
    assert sorted(p.name for p in mine.iterdir()) == ["features.bin", "graph", "labels.npy", "meta.json",
                                                      "split.npz"]
    (mine / "graph.lock").write_bytes(b"")  # as a build killed while holding the lock (or an older Plait) left it
    assert is_dataset_folder(mine) and dataset_action(spec(tmp_path, mine).config.data)[0] == "use"


def test_a_graph_build_that_fails_inside_a_dataset_folder_leaves_no_lock_file_either(tmp_path):
    pq.write_table(pa.table({"src": [0, 1, 5], "dst": [1, 2, 0]}), tmp_path / "edges.parquet")
    (tmp_path / "ds").mkdir()
    with pytest.raises(IndexError, match="src=5; node ids must be in"):
        graph_from_parquet(tmp_path / "edges.parquet", out=tmp_path / "ds" / "graph", num_nodes=3)
    assert list((tmp_path / "ds").iterdir()) == []
    graph_from_parquet(tmp_path / "edges.parquet", out=tmp_path / "ds" / "graph", num_nodes=6)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["graph"]


def test_the_build_lock_excludes_other_holders_while_its_file_comes_and_goes(tmp_path):
    inside, overlaps, errors = [0], [], []

    def hold() -> None:
        try:
            for _ in range(40):
                with dataset_lock(tmp_path / "ds"):
                    inside[0] += 1
                    if inside[0] != 1:
                        overlaps.append(inside[0])
                    time.sleep(0.0005)
                    inside[0] -= 1
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and overlaps == [] and not any(t.is_alive() for t in threads)
    assert list(tmp_path.iterdir()) == []  # the lock file went with its last holder


def test_a_file_named_like_the_lock_that_is_not_one_is_left_alone(tmp_path):
    (tmp_path / "ds.lock").write_text("my notes")
    with dataset_lock(tmp_path / "ds"):
        pass
    assert (tmp_path / "ds.lock").read_text() == "my notes"


# --- item 2: relative data paths under `ray job submit` ------------------------------------------------------------


def test_relative_data_paths_under_a_ray_job_go_under_the_run_root_and_say_so(tmp_path, inside_a_ray_job, capsys):
    s = load_spec(EXAMPLE, ["data.path=data/gnn-x", "data.packs=packs/x", f"run_dir={tmp_path / 'run'}"])
    s.module.validate(s.config, s.workers.num)
    out = capsys.readouterr().out
    assert s.config.data.path == str(tmp_path / "runs-root" / "data" / "gnn-x")
    assert s.config.data.packs == str(tmp_path / "runs-root" / "packs" / "x")
    assert "data.path='data/gnn-x' is relative" in out and "data.packs='packs/x' is relative" in out
    assert not (inside_a_ray_job / "data").exists()


def test_a_data_path_inside_rays_temporary_copy_is_refused(tmp_path, inside_a_ray_job):
    s = load_spec(EXAMPLE, [f"data.path={inside_a_ray_job / 'data'}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"data.path=.* lies inside Ray's temporary working directory"):
        s.module.validate(s.config, s.workers.num)


# --- item 3: every reader checks the rows it reads; packs check themselves -----------------------------------------


@pytest.fixture
def flipped(tmp_path):
    """A generated dataset with 64 bytes flipped in the block holding the first validation node's row."""
    cfg = driver_side(tmp_path, tmp_path / "gnn", *GENERATED, "train.loader=memory")
    ds = open_dataset(cfg.data.path)
    row = int(load_split(ds.root).val[0])
    return cfg, ds, row, flip_block_of_row(ds.features, row)


@pytest.mark.parametrize("loader", ["online-mmap", "online-ginex", "memory"])
def test_every_online_loader_refuses_a_flipped_block_of_the_features(flipped, loader):
    cfg, ds, _, block = flipped
    cfg.train.loader, cfg.train.prefetch = loader, 0
    everything = np.arange(ds.meta["num_nodes"])  # one batch of seeds per node: every row is read
    with pytest.raises(FeatureFileError, match=rf"features\.bin: data block {block} .* fails its checksum"):
        loader = make_loader(cfg, SimpleNamespace(rank=0, world_size=1), ds, everything)
        for _ in loader.epoch(0):
            pass


def test_the_scorer_refuses_a_flipped_block_of_the_features(flipped):
    cfg, ds, row, block = flipped
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    model = build_model("sage", 16, 8, 4, num_layers=2)
    with pytest.raises(FeatureFileError, match=rf"data block {block} .* fails its checksum"):
        Scorer(ds, cfg.train, ctx).accuracy(model, np.array([row]), epoch=0)


@pytest.fixture
def packed(tmp_path):
    ds = generate_dataset(tmp_path / "gnn", num_nodes=600, feat_dim=16, num_classes=4, train_frac=0.3)
    prepare_packed(ds.load_graph(), ds.features, load_split(ds.root).train, [5, 5], 32, 0, 60, tmp_path / "p")
    return tmp_path / "p"


def flip_npy(file: Path, at_end: int = 64) -> None:
    raw = bytearray(file.read_bytes())
    raw[-at_end] ^= 0x01  # the lowest bit of a value near the end: still a valid array, silently wrong
    file.write_bytes(bytes(raw))


def test_a_changed_index_entry_of_a_pack_is_caught_when_its_batch_is_read(packed):
    flip_npy(packed / "n_id.npy")
    with PackedLoader(packed, prefetch=0) as loader, \
            pytest.raises(CorruptPackError, match=r"index entries of batch \d+ .* fail their checksum"):
        for _ in loader.epoch(0):
            pass


def test_a_changed_small_index_array_of_a_pack_is_caught_when_it_is_opened(packed):
    flip_npy(packed / "sizes.npy", at_end=8)
    with pytest.raises(CorruptPackError, match=r"small index arrays .* fail their checksum"):
        PackedLoader(packed)


# --- item 4: a damaged file's error names the command that rebuilds it ---------------------------------------------


def test_a_damaged_generated_dataset_names_the_command_that_generates_it_again(tmp_path):
    data = tmp_path / "gnn"
    driver_side(tmp_path, data, *GENERATED, "train.loader=memory")
    flip_block_of_row(data / "features.bin", int(load_split(data).train[0]))
    with pytest.raises(FeatureFileError) as caught:  # packing reads the rows of the batches, on the driver
        driver_side(tmp_path, data, *GENERATED)
    message = str(caught.value)
    assert "fails its checksum" in message and "write_features" not in message
    assert message.endswith("generate it again with `plait run SPEC data.rebuild=true` (this job's spec and "
                            "overrides; its packs are rebuilt too)")
    assert type(caught.value).user_error is True
    driver_side(tmp_path, data, *GENERATED, "data.rebuild=true")  # the command works: generated and packed again
    assert generated_recipe(data)[0] is not None


def test_a_damaged_file_of_a_users_dataset_says_plait_never_rewrites_it(tmp_path):
    mine = tmp_path / "mine"
    assemble_dataset(mine)
    flip_block_of_row(mine / "features.bin", 0)
    cfg = driver_side(tmp_path, mine, "train.loader=memory")
    with pytest.raises(FeatureFileError, match=r"features.bin is part of data.path=.*mine, a dataset Plait did not "
                                               r"generate .* never rewrites: make features.bin again from your data"), \
            rebuild_hints(cfg.data):
        make_loader(cfg, SimpleNamespace(rank=0, world_size=1), open_dataset(mine), np.arange(10))


def test_damaged_packs_name_the_command_that_rebuilds_them_which_does(tmp_path):
    data = tmp_path / "gnn"
    cfg = driver_side(tmp_path, data, *GENERATED)
    packs = Path(cfg.pack_path) / "packs.feat"
    raw = bytearray(packs.read_bytes())
    raw[4096 + 100] ^= 0xFF  # in the first pack
    packs.write_bytes(bytes(raw))
    with pytest.raises(FeatureFileError) as caught, rebuild_hints(cfg.data):
        with PackedLoader(cfg.pack_path, prefetch=0) as loader:  # one rank reading every batch
            for _ in loader.epoch(0):
                pass
    assert "packs.feat: data block 0" in str(caught.value)
    assert str(caught.value).endswith("rebuild them with `plait run SPEC data.rebuild_packs=true` (this job's spec "
                                      "and overrides; the dataset is not touched)")
    before = snapshot(data)
    rebuilt = driver_side(tmp_path, data, *GENERATED, "data.rebuild_packs=true")
    assert snapshot(data) == before and rebuilt.pack_path == cfg.pack_path
    with PackedLoader(rebuilt.pack_path, prefetch=0) as loader:
        assert sum(1 for _ in loader.epoch(0)) == loader.num_batches()


def test_a_flipped_block_of_the_packs_host_cache_names_the_command_that_rebuilds_the_packs(tmp_path):
    data = tmp_path / "gnn"
    cfg = driver_side(tmp_path, data, *GENERATED)
    cache = Path(cfg.pack_path) / "cache.feat"
    assert open_feature_file(cache).num_rows > 0
    raw = bytearray(cache.read_bytes())
    raw[4096 + 100] ^= 0xFF  # a cached row
    cache.write_bytes(bytes(raw))
    with pytest.raises(FeatureFileError) as caught, rebuild_hints(cfg.data):
        PackedLoader(cfg.pack_path, prefetch=0)  # the cache is read (and checked) as the loader opens
    assert "cache.feat: data block 0" in str(caught.value) and "fails its checksum" in str(caught.value)
    assert str(caught.value).endswith("rebuild them with `plait run SPEC data.rebuild_packs=true` (this job's spec "
                                      "and overrides; the dataset is not touched)")


def test_a_flipped_pack_of_a_later_sampled_epoch_is_caught_when_that_epoch_reads_it(tmp_path):
    ds = generate_dataset(tmp_path / "gnn", num_nodes=600, feat_dim=16, num_classes=4, train_frac=0.3)
    info = prepare_packed(ds.load_graph(), ds.features, load_split(ds.root).train, [5, 5], 32, 0, 60,
                          tmp_path / "p", epochs=2)
    first_of_epoch_1 = int(np.load(tmp_path / "p" / "pack_page.npy")[info.num_batches])
    packs = tmp_path / "p" / "packs.feat"
    raw = bytearray(packs.read_bytes())
    raw[4096 * (1 + first_of_epoch_1) + 100] ^= 0xFF
    packs.write_bytes(bytes(raw))
    with PackedLoader(tmp_path / "p", prefetch=0) as loader:
        assert sum(1 for _ in loader.epoch(0)) == loader.num_batches()  # sampled epoch 0: untouched
        with pytest.raises(FeatureFileError, match=rf"packs\.feat: data block {first_of_epoch_1} .* fails its "
                                                   rf"checksum .*the pack of batch {info.num_batches} "):
            for _ in loader.epoch(1):
                pass


# --- items 6 and 7: imports one way; data errors are user errors --------------------------------------------------


def local_imports(folder: str) -> dict[str, set[str]]:
    """For each module of ``plait.<folder>``: the modules of that folder it imports (at any depth in the file)."""
    graph = {}
    for file in sorted((ROOT / folder).glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1:
                    found.add(base.split(".")[0] if base else "")
                elif base.startswith(f"plait.{folder}."):
                    found.add(base.split(".")[2])
        graph[file.stem] = found - {"", file.stem}
    return graph


@pytest.mark.parametrize("folder", ["storage", "gnn"])
def test_modules_of_storage_and_gnn_import_each_other_one_way_only(folder):
    graph = local_imports(folder)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for m in graph.get(todo.pop(), ()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reachable(b)})
    assert circles == []


def test_every_error_class_of_gnn_and_storage_is_marked_as_a_user_input_error():
    import plait.gnn
    import plait.storage

    classes = {}
    for package in (plait.gnn, plait.storage):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            members = inspect.getmembers(module, inspect.isclass)
            classes.update({f"{module.__name__}.{name}": cls for name, cls in members
                            if issubclass(cls, Exception) and cls.__module__ == module.__name__})
    assert {"plait.storage.feature_file.FeatureFileError", "plait.gnn.pack_info.CorruptPackError",
            "plait.gnn.graph.CorruptGraphError", "plait.storage.folders.ForeignFolderError",
            "plait.storage.row_shards.CorruptDataError"} <= set(classes)
    assert [name for name, cls in classes.items() if getattr(cls, "user_error", False) is not True] == []


# --- the scenarios end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_example_trains_on_a_dataset_the_user_assembled_and_leaves_it_as_it_was(ray_cluster, tmp_path):
    mine = tmp_path / "my-dataset"
    assemble_dataset(mine)
    before = snapshot(mine)
    summary = run_job(spec(tmp_path, mine))
    assert len(summary["val_acc"]) == 1 and summary["first_loss"] is not None
    assert snapshot(mine) == before


@pytest.mark.slow
def test_flipped_features_under_reused_packs_stop_the_job_with_the_command_that_repairs_them(ray_cluster, tmp_path):
    data = tmp_path / "gnn"
    driver_side(tmp_path, data, *GENERATED)  # generated and packed by an earlier run
    flip_block_of_row(data / "features.bin", int(load_split(data).val[0]))
    with pytest.raises(RankError) as caught:  # the packs are reused; scoring reads the damaged block
        run_job(spec(tmp_path, data, *GENERATED))
    assert caught.value.kind == "FeatureFileError" and "fails its checksum" in caught.value.message
    assert "`plait run SPEC data.rebuild=true`" in caught.value.message
    repaired = run_job(spec(tmp_path, data, *GENERATED, "data.rebuild=true", f"run_dir={tmp_path / 'run2'}"))
    assert len(repaired["val_acc"]) == 1
