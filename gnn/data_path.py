"""The GNN job's data: where its dataset and packs live, what the job does with them, and the command that
rebuilds a damaged one.

    resolve_paths(data)           # validate: under `ray job submit`, relative paths go under $PLAIT_RUN_ROOT
    dataset_action(data)          # validate: "generate" / "rebuild" / "use", or a refusal (ConfigError)
    ds = ensure_dataset(data)     # prepare: does it, then check_dataset (gnn/dataset.py) on what is there
    with rebuild_hints(data): ... # a damaged file's error ends with the command that rebuilds what it belongs to

What the job does at ``data.path`` (reads only, until it generates):

| data.path holds                           | data.rebuild=false (default)                    | data.rebuild=true   |
|-------------------------------------------|-------------------------------------------------|---------------------|
| nothing (absent, or an empty folder)      | a dataset is generated there                    | the same            |
| a dataset Plait generated, this recipe    | used                                            | generated again     |
| a dataset Plait generated, another recipe | refused: another data.path, or data.rebuild     | generated again     |
| a dataset Plait did not generate          | used as it is (one line says so); never written | refused             |
| anything else                             | refused; never written                          | refused             |

With ``data.source`` set (a graph's metadata file or OGB folder: gnn/graph_import.py) the job imports instead of
generating:

| data.path holds                                  | data.rebuild=false (default)        | data.rebuild=true     |
|--------------------------------------------------|-------------------------------------|-----------------------|
| nothing (absent, or an empty folder)             | data.source is imported there       | the same              |
| an import of data.source, unchanged, same options| used                                | imported again        |
| an import whose sources or options changed       | refused: data.rebuild, or a new path| imported again        |
| anything else                                    | refused; never written              | refused               |

With ``data.generate=false`` a dataset of either kind is used as it is and nothing is ever generated. "Plait
generated" is ``generated_recipe`` (gnn/generate.py): the recipe in meta.json, and features.bin, labels.npy and
split.npz as the generator wrote them. A dataset you assembled (graph_from_parquet, write_features_from_parquet,
your labels and split) is yours even with a meta.json copied from a generated one.

Packs (``data.packs``, default ``<data.path>.packs``) are Plait's: a folder per recipe, reused while it was made
from the same graph, features, train ids and settings, rebuilt otherwise; ``data.rebuild_packs=true`` (or
``data.rebuild=true``) rebuilds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plait.gnn.dataset import GraphDataset, check_dataset, is_dataset_folder, open_dataset
from plait.gnn.generate import generate_dataset, generated_recipe, generation_recipe
from plait.gnn.graph_import import import_graph, import_options, import_record, import_state
from plait.runtime.config import ConfigError
from plait.runtime.storage_location import persistent_path
from plait.storage.errors import ProblemAndFix
from plait.storage.row_shards import describe_entries

SETTINGS = ("num_nodes", "avg_degree", "num_classes", "feat_dim", "train_frac", "seed")  # data.* -> generate_dataset


@dataclass
class DataConfig:
    path: str = "data/gnn"  # the dataset folder; generated here when it holds none (see the module doc)
    generate: bool = True  # False: data.path must already hold a dataset, used as it is
    rebuild: bool = False  # generate the dataset Plait generated at data.path again (another recipe, or damaged)
    rebuild_packs: bool = False  # build this recipe's packs again (damaged ones); the dataset is not touched
    num_nodes: int = 20_000  # generate settings (gnn/generate.py): the recipe of a generated dataset
    avg_degree: float = 20.0
    num_classes: int = 10
    feat_dim: int = 128
    train_frac: float = 0.02
    seed: int = 0
    packs: str = ""  # folder of packed batches; "" = "<path>.packs"
    source: str = ""  # a graph to import into data.path (metadata file or OGB folder); "" = generate one
    undirected: bool = False  # import options (gnn/graph_import.py): add every edge both ways,
    dedupe: bool = False  # drop repeated edges,
    self_loops: str = "keep"  # keep | drop | add

    def check(self) -> None:
        if self.num_nodes < 100 or self.feat_dim < 1 or self.num_classes < 2:
            raise ValueError(f"data.num_nodes={self.num_nodes}, data.feat_dim={self.feat_dim}, data.num_classes="
                             f"{self.num_classes}: need >= 100 nodes, >= 1 feature and >= 2 classes")
        if not 0 < self.train_frac <= 0.85:
            raise ValueError(f"data.train_frac={self.train_frac}: choose a share in (0, 0.85]")
        if self.source:
            import_options(self.undirected, self.dedupe, self.self_loops)
        if self.rebuild and not self.generate and not self.source:
            raise ConfigError("data.rebuild=true generates the dataset at data.path again, but data.generate=false "
                              "says never to generate one: drop one of the two")


def resolve_paths(data: DataConfig) -> None:
    """data.path and data.packs as the ranks will use them. Under ``ray job submit --working-dir`` a relative path
    would land in Ray's temporary copy of the working directory (rebuilt every submission, deleted by Ray): it
    goes under $PLAIT_RUN_ROOT instead, said in one line, as run_dir does; a path inside that copy is refused."""
    for key in ("path", "packs"):
        if value := getattr(data, key):
            resolved, note = persistent_path(value, f"data.{key}")
            if note:
                print(f"[plait] {note}", flush=True)
            setattr(data, key, str(resolved))


def wanted_recipe(data: DataConfig) -> dict:
    return generation_recipe(**{k: getattr(data, k) for k in SETTINGS})


def dataset_action(data: DataConfig) -> tuple[str, str]:
    """What prepare does at data.path (the module doc's table): ("generate" | "rebuild" | "use", a line to print
    or ""); raises ConfigError naming the folder and the choices for what it refuses. Reads only."""
    path = Path(data.path)
    if data.source:
        return import_action(data)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ConfigError(f"data.path={data.path!r} is {'a symbolic link' if path.is_symlink() else 'a file'}, not a "
                          "dataset folder: choose a folder (a dataset is generated there when it holds none)")
    if not path.exists() or not any(path.iterdir()):
        if not data.generate:
            raise ConfigError(f"data.path={data.path!r} holds no dataset and data.generate=false: generate one "
                              "(data.generate=true) or point data.path at a dataset")
        return "generate", f"generating a {data.num_nodes:,}-node graph in {path}"
    if not is_dataset_folder(path):
        raise ConfigError(f"data.path={data.path!r} is not a Plait GNN dataset (it holds "
                          f"{describe_entries(sorted(p.name for p in path.iterdir()))}, no meta.json of a dataset); "
                          "it is never overwritten (data.rebuild does not apply): choose an empty or new folder, "
                          "a generated dataset, or one assembled as plait.gnn.dataset describes")
    found, why = generated_recipe(path)
    if found is None:
        if data.rebuild:
            raise ConfigError(f"data.rebuild=true: data.path={path} holds a GNN dataset Plait did not generate "
                              f"({why}); Plait never replaces it. Choose another data.path to generate a dataset "
                              "there; to rebuild only the packed batches made from this one, use "
                              "data.rebuild_packs=true")
        if not data.generate:
            return "use", ""
        return "use", (f"data.path={path} holds a GNN dataset Plait did not generate ({why}): training on it as it "
                       "is and never writing it; the generation settings (data.num_nodes, ...) do not apply")
    if data.rebuild:
        return "rebuild", (f"data.rebuild=true: generating the {data.num_nodes:,}-node graph in {path} again (jobs "
                           "reading the old one keep reading their copy)")
    want = wanted_recipe(data)
    differ = [k for k in want if found.get(k) != want[k]]
    if not differ or not data.generate:
        return "use", ""
    beside = path.with_name(path.name + "".join(f"-{k}{want[k]}" for k in differ if k in SETTINGS) or "-new")
    raise ConfigError(f"data.path={path} holds a dataset Plait generated with another recipe ({_text(found, differ)});"
                      f" this job asks for {_text(want, differ)}. Choose one: data.path={beside} generates a new "
                      "dataset there and leaves this one as it is, or data.rebuild=true replaces this one (jobs "
                      "reading it now keep reading their copy).")


def import_action(data: DataConfig) -> tuple[str, str]:
    """dataset_action with data.source set: ("import" | "reimport" | "use", a line), or a refusal."""
    options = import_options(data.undirected, data.dedupe, data.self_loops)
    state, why = import_state(data.path, data.source, options)
    if state == "absent":
        return "import", f"importing {data.source} into {data.path}"
    if state == "foreign":
        raise ConfigError(f"data.path={data.path!r} holds something other than an import of data.source ({why}); "
                          "it is never overwritten (data.rebuild does not apply): choose an empty or new folder")
    if state == "same":
        return ("reimport", f"data.rebuild=true: importing {data.source} into {data.path} again") if data.rebuild \
            else ("use", "")
    if data.rebuild:
        return "reimport", f"data.rebuild=true: importing {data.source} into {data.path} again ({why})"
    raise ConfigError(f"data.path={data.path} was imported from data.source={data.source}, which changed since "
                      f"({why}): import it again with data.rebuild=true, or choose another data.path")


def _text(recipe: dict, keys) -> str:
    return ", ".join(f"{k}={recipe.get(k)!r}" for k in keys)


def ensure_dataset(data: DataConfig) -> GraphDataset:
    """On the driver: do dataset_action's action, then check what is at data.path (check_dataset); data.path
    becomes absolute, for the ranks."""
    action, note = dataset_action(data)
    data.path = str(Path(data.path).resolve())
    if data.packs:
        data.packs = str(Path(data.packs).resolve())
    if data.source:
        data.source = str(Path(data.source).absolute())
    if note:
        print(f"[plait] {note}", flush=True)
    if action in ("import", "reimport"):
        import_graph(data.source, data.path, data.undirected, data.dedupe, data.self_loops, rebuild=True)
    elif action in ("generate", "rebuild"):
        generate_dataset(data.path, **{k: getattr(data, k) for k in SETTINGS})
    ds = open_dataset(data.path)
    check_dataset(ds)
    return ds


def pack_root(data: DataConfig) -> Path:
    """The folder of this dataset's pack folders (one per recipe)."""
    path = Path(data.path)
    return Path(data.packs) if data.packs else path.with_name(path.name + ".packs")


@contextlib.contextmanager
def rebuild_hints(data: DataConfig) -> Iterator[None]:
    """Re-raise the error of a damaged file of this job's dataset or packs (storage/errors.py) with the command
    that rebuilds what the file belongs to; any other error passes unchanged."""
    try:
        yield
    except ProblemAndFix as e:
        raise with_rebuild_hint(e, data) from None


def with_rebuild_hint(error: ProblemAndFix, data: DataConfig) -> ProblemAndFix:
    if error.path is None:
        return error
    file, root, packs = error.path.absolute(), Path(data.path).absolute(), pack_root(data).absolute()
    if file.is_relative_to(packs):
        return error.with_fix(f"the packed batches under {packs} are Plait's, made from data.path={root}: rebuild "
                              "them with `plait run SPEC data.rebuild_packs=true` (this job's spec and overrides; the "
                              "dataset is not touched)")
    if not file.is_relative_to(root):
        return error
    recipe, why = generated_recipe(root)
    if (record := import_record(root)) is not None:
        return error.with_fix(f"{file.name} is part of data.path={root}, imported from {record.get('source')}: "
                              "import it again with `plait run SPEC data.rebuild=true` (or `plait gnn import "
                              f"{record.get('source')} {root} --rebuild`; the packs are rebuilt too)")
    if recipe is not None:
        return error.with_fix(f"{file.name} is part of the dataset Plait generated at data.path={root}: generate it "
                              "again with `plait run SPEC data.rebuild=true` (this job's spec and overrides; its "
                              "packs are rebuilt too)")
    return error.with_fix(f"{file.name} is part of data.path={root}, a dataset Plait did not generate ({why}) and "
                          f"never rewrites: make {file.name} again from your data as you made it (graph_from_parquet, "
                          "write_features_from_parquet; see plait.gnn.dataset), or move the folder away and run "
                          "again to generate a new dataset there")
