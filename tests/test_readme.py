"""Every Python snippet in the README runs as printed (each in a fresh namespace, no cluster needed)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, flags=re.M | re.S)]


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_snippets():
    assert BLOCKS, "README.md has no ```python block: did the fence change?"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_snippet_runs(line, code):
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_line_{line}"})
