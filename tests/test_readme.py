"""The README runs as printed.

Every ```python block runs in a fresh namespace (no cluster needed). Every ```bash block runs in README order,
each in a new clean shell (``env -i HOME=$HOME PATH=/usr/local/bin:/usr/bin:/bin bash``) in a fresh copy of
this checkout (tracked and untracked files, no runs/ or data/) whose ``.venv`` is the one running the tests,
after the README's own activation block. Blocks share the copy, so a later block sees what an earlier one made
(``plait plot runs/gpt_dp2`` after ``make demo``).

An HTML comment on the line(s) just above a block's fence says what the test does differently, and why:

    <!-- readme-test: prelude -->                   this block starts every later block's shell (activation)
    <!-- readme-test: skip: REASON -->              the block is not run (Slurm, a GPU, a bucket, a model ...)
    <!-- readme-test: skip "PREFIX": REASON -->     its lines starting with PREFIX are not run
    <!-- readme-test: append "ARGS": REASON -->     ARGS go at the end of each of its ``plait run`` commands
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cleanup import run_process_group

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELLS = ("bash", "sh", "shell")
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
BLOCK_TIMEOUT_S = 840  # under pytest-timeout's 900 s per test; a block's runs take 1-4 min on an idle 2-core box
MARKER = re.compile(r"^<!-- readme-test: (.*?) -->[ \t]*$")
DIRECTIVE = re.compile(r'^(prelude|skip|append)(?: "([^"]+)")?(?:: (.+))?$')


@dataclass
class Block:
    line: int  # of the first line inside the fence
    lang: str
    code: str
    prelude: bool = False
    skip: str | None = None  # the reason the whole block is not run
    skip_lines: dict[str, str] = field(default_factory=dict)  # prefix -> reason
    append: str = ""  # arguments added to each `plait run`


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block with a language, its markers applied; an unknown marker is an error."""
    lines, blocks = text.splitlines(), []
    for m in re.finditer(r"^```(\w+)[ \t]*\n(.*?)^```", text, flags=re.M | re.S):
        first = text.count("\n", 0, m.start()) + 2
        block = Block(first, m.group(1), m.group(2))
        i = first - 3  # the line above the fence (0-based)
        while i >= 0 and (marker := MARKER.match(lines[i])):
            directive = DIRECTIVE.match(marker.group(1))
            if directive is None:
                raise ValueError(f"README.md:{i + 1}: unknown readme-test marker {marker.group(1)!r}; use "
                                 "prelude, skip: REASON, skip \"PREFIX\": REASON or append \"ARGS\": REASON")
            kind, arg, reason = directive.groups()
            if kind != "prelude" and not reason:
                raise ValueError(f"README.md:{i + 1}: a {kind} marker says why: '{kind} ...: REASON'")
            if kind == "prelude":
                block.prelude = True
            elif kind == "skip" and arg:
                block.skip_lines[arg] = reason
            elif kind == "skip":
                block.skip = reason
            else:
                block.append = arg or ""
            i -= 1
        blocks.append(block)
    return blocks


BLOCKS = parse_blocks(README.read_text())
PYTHON = [b for b in BLOCKS if b.lang == "python"]
SHELL = [b for b in BLOCKS if b.lang in SHELLS]


def script(block: Block) -> str:
    """The block's text as it runs: skipped lines left out (a backslash continuation goes with its line),
    ``append`` arguments passed through a ``plait`` function that adds them to ``plait run``."""
    out, dropping = [], False
    for line in block.code.splitlines():
        if dropping or any(line.startswith(prefix) for prefix in block.skip_lines):
            dropping = line.rstrip().endswith("\\")
            continue
        out.append(line)
    body = "\n".join(out)
    if block.append:
        body = ('plait() { if [ "$1" = run ]; then command plait "$@" ' + block.append +
                '; else command plait "$@"; fi; }\n' + body)
    return body


# ---------------------------------------------------------------- Python snippets

def test_the_readme_has_python_snippets():
    assert PYTHON, "README.md has no ```python block: did the fence change?"


@pytest.mark.parametrize("block", PYTHON, ids=[f"README.md:{b.line}" for b in PYTHON])
def test_readme_python_snippet_runs(block):
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": f"readme_line_{block.line}"})


# ---------------------------------------------------------------- shell blocks

def test_the_readme_activates_the_venv_before_its_first_plait_command():
    preludes = [b for b in SHELL if b.prelude]
    assert [b.code.strip() for b in preludes] == ["source .venv/bin/activate"], preludes
    first_plait = next(b for b in SHELL if re.search(r"^plait ", b.code, flags=re.M))
    assert preludes[0].line < first_plait.line  # said once at the top, before the first `plait` command


def test_every_shell_block_runs_or_says_why_not():
    for block in SHELL:
        run = script(block).strip()
        assert block.skip or block.prelude or run, f"README.md:{block.line}: a block with nothing to run"
    ran = [b for b in SHELL if not b.skip and not b.prelude]
    assert len(ran) >= 8, [b.line for b in ran]  # the marker grammar still matches the README


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """This checkout as a fresh clone sees it (tracked files and new ones git does not ignore), with this test
    run's .venv linked in."""
    venv = Path(sys.prefix)
    if sys.prefix == sys.base_prefix or not (venv / "bin" / "activate").is_file():
        pytest.skip(f"the tests run outside a virtual environment ({sys.prefix}); the README's commands need one")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"{REPO} is not a git checkout: the test copies what a clone (plus your new files) holds")
    copy = tmp_path_factory.mktemp("readme") / "plait"
    for rel in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / rel).is_file():  # a tracked file deleted in the work tree is not copied
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, copy / rel)  # mtimes kept: make sees the venv up to date
    (copy / ".venv").symlink_to(venv)
    # `make demo` must not reinstall: an editable install from the copy would point the venv at it.
    stale = subprocess.run(["make", "-q", ".venv/.plait-installed"], cwd=copy, capture_output=True)
    assert stale.returncode == 0, f"{venv} is older than pyproject.toml: run `make setup` before the tests"
    return copy


def run_in_clean_shell(copy: Path, prelude: str, body: str, timeout_s: float):
    """``body`` under ``bash -e`` after ``prelude``, from an empty environment but HOME and a plain PATH; its
    process group is killed if it times out or the test is interrupted."""
    env = [f"HOME={os.environ.get('HOME', copy)}", f"PATH={CLEAN_PATH}"]
    return run_process_group(["env", "-i", *env, "bash", "-e", "-c", f"{prelude}\n{body}"], timeout_s, cwd=copy,
                             merge_stderr=True)


RUN = [b for b in SHELL if not b.prelude]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[f"README.md:{b.line}" for b in RUN])
def test_readme_shell_block_runs_in_a_clean_shell(block, fresh_copy):
    if block.skip:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    prelude = "\n".join(b.code for b in SHELL if b.prelude)
    done = run_in_clean_shell(fresh_copy, prelude, script(block), BLOCK_TIMEOUT_S)
    shown = f"README.md:{block.line} ran as:\n{script(block)}\nand printed (last 4000 characters):\n" \
            f"{done.stdout[-4000:]}"
    assert done.returncode == 0, shown
    assert "command not found" not in done.stdout, shown
    if re.search(r"^make demo\b", block.code, flags=re.M):  # the next command is said where the run ends
        tail = done.stdout.strip().splitlines()[-4:]
        assert any(line.strip() == "source .venv/bin/activate" for line in tail), tail
        assert (fresh_copy / "runs" / "gpt_dp2" / "summary.json").is_file()
    for path in re.findall(r"^plait plot (\S+)", script(block), flags=re.M):  # a plot a user can open
        if "://" not in path:
            assert (fresh_copy / path / "metrics.png").stat().st_size > 0, shown


def test_a_skip_marker_leaves_out_its_lines_and_their_continuations():
    block = parse_blocks('<!-- readme-test: skip "make test": the suite -->\n'
                         '<!-- readme-test: append "train.steps=3": time -->\n'
                         "```bash\nmake demo\nmake test \\\n  -k x\nplait run a.toml\n```\n")[0]
    assert block.skip_lines == {"make test": "the suite"} and block.append == "train.steps=3"
    body = script(block)
    assert "make test" not in body and "-k x" not in body and body.endswith("make demo\nplait run a.toml")
    assert body.startswith("plait() {") and 'command plait "$@" train.steps=3;' in body.splitlines()[0]
    with pytest.raises(ValueError, match="unknown readme-test marker 'skipp: x'"):
        parse_blocks("<!-- readme-test: skipp: x -->\n```bash\ntrue\n```\n")
