"""GNN data safety: a dataset a user assembled is trained on and never replaced; a generated one of another recipe is
refused with the two choices; relative data paths under a Ray job land outside Ray's temporary copy; every path that
reads feature rows checks their checksums and packs check themselves; a damaged file's error names the command that
rebuilds it; build locks leave nothing behind; storage and gnn import one way; their data errors are user errors."""

import ast
import importlib
import inspect
import pkgutil
import threading
import time
from pathlib import Path

import pytest
from plait.gnn.generate import generate_dataset, load_split
from plait.gnn.offline import prepare_packed
from plait.gnn.pack_info import CorruptPackError
from plait.gnn.packed_loader import PackedLoader
from plait.storage.folders import dataset_lock

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "gnn_sage_ooc.toml")
SMALL = ["train.batch_size=32", "train.hidden=16", "train.fanouts=[5, 5]", "train.eval_nodes=0", "train.epochs=1"]
GENERATED = ["data.num_nodes=400", "data.train_frac=0.2", "data.feat_dim=16", "data.num_classes=4"]


# --- item 5: build locks ------------------------------------------------------------------------------------------


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


# --- item 3: every reader checks the rows it reads; packs check themselves -----------------------------------------


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
