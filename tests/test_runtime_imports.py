"""The runtime's own modules import each other in one direction only (no two modules need each other), and
the launchers use only the runtime's public names."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "plait.runtime", "launchers": "plait.launchers"}


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``plait.*`` import in the file, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("plait."):
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("plait.")]
    return found


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            name = f"{package}.{path.stem}"
            graph[name] = {module for module, _ in imports_of(path) if module != name}
    return graph


def test_no_two_runtime_modules_import_each_other():
    graph = module_graph()
    circles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert circles == []


def test_launchers_import_no_private_runtime_names():
    private = [(path.name, module, name) for path in sorted((REPO / "launchers").glob("*.py"))
               for module, names in imports_of(path) if module.startswith("plait.runtime")
               for name in names if name.startswith("_")]
    assert private == []
