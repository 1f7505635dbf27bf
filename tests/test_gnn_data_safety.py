"""GNN data safety: a dataset a user assembled is trained on and never replaced; a generated one of another recipe is
refused with the two choices; relative data paths under a Ray job land outside Ray's temporary copy; every path that
reads feature rows checks their checksums and packs check themselves; a damaged file's error names the command that
rebuilds it; build locks leave nothing behind; storage and gnn import one way; their data errors are user errors."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "gnn_sage_ooc.toml")
SMALL = ["train.batch_size=32", "train.hidden=16", "train.fanouts=[5, 5]", "train.eval_nodes=0", "train.epochs=1"]
GENERATED = ["data.num_nodes=400", "data.train_frac=0.2", "data.feat_dim=16", "data.num_classes=4"]


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
