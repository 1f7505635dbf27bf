"""The house's shape, as a specification: imports point down the floors and never go round in a circle.

    launchers/  bench/  examples/          how people run it
    lm/   gnn/   rl/                       the capabilities (side by side: none imports another)
    runtime/   models/                     the runtime; the model families (neither imports the other)
    storage/   parallel/                   the ground: bytes; plan mechanisms that know no model family

Every ``import`` and ``from ... import`` of a ``plait.*`` module counts, also those inside functions: a lazy
import is still a dependency. The test reads the files (ast), imports nothing.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"storage": 1, "parallel": 1, "runtime": 2, "models": 2, "lm": 3, "gnn": 3, "rl": 3, "launchers": 4,
          "bench": 5, "examples": 5}
PACKAGES = ("storage", "parallel", "runtime", "models", "lm", "gnn", "rl", "launchers")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "plait." + ".".join(parts)


def plait_imports(path: Path) -> set[str]:
    """The plait modules a file imports (``from plait.x import y`` counts as plait.x, or plait.x.y when that is
    a module of its own)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("plait."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("plait"):
            out.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if resolve(sub) is not None:
                    out.add(sub)
    return {m for m in out if resolve(m) is not None}


def resolve(module: str) -> Path | None:
    parts = module.split(".")[1:]
    if not parts:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def source_files() -> list[Path]:
    files = []
    for package in PACKAGES:
        files.extend(sorted((ROOT / package).rglob("*.py")))
    return files


def floor(module: str) -> tuple[str, int]:
    top = module.split(".")[1]
    return top, FLOORS[top]


def test_imports_point_down_the_floors_only():
    upward = []
    for path in source_files() + sorted((ROOT / "bench").rglob("*.py")) + sorted((ROOT / "examples").glob("*.py")):
        top, mine = path.relative_to(ROOT).parts[0], FLOORS[path.relative_to(ROOT).parts[0]]
        for target in plait_imports(path):
            other, theirs = floor(target)
            if other != top and theirs >= mine:
                upward.append(f"{path.relative_to(ROOT)} imports {target} ({other} is floor {theirs}, {top} is {mine})")
    assert upward == [], "imports that do not point down:\n" + "\n".join(upward)


def test_no_module_imports_itself_round_a_circle():
    graph = {module_name(p): plait_imports(p) for p in source_files()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    circles = [c for c in circles if not all(m.endswith("__init__") for m in c)]
    assert circles == [], "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_floor_test_sees_an_upward_import_and_a_circle(tmp_path):
    """The two checks above are not vacuous: they find what they look for in files that have it."""
    assert "plait.models.gpt" in plait_imports(ROOT / "models" / "gpt_spec.py")
    assert floor("plait.lm.lm_job") == ("lm", 3) and floor("plait.parallel.plan") == ("parallel", 1)
