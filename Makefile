# Two commands do all the set-up from a fresh clone:
#   make demo   creates .venv, installs Plait, trains the reference GPT on 2 Ray workers (embedded cluster)
#   make test   creates/updates .venv, runs the test suite
# Then `source .venv/bin/activate` once per shell puts plait, ray, torchrun, mpirun on PATH.
# Re-running is quick: the install step re-runs only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plait-installed
export RAY_USAGE_STATS_ENABLED ?= 0
SPEC ?= examples/gpt_dp2.toml
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plait run $(SPEC)
	@echo
	@echo "Next: activate the environment (once per shell) so that plait, ray, torchrun and mpirun are on PATH:"
	@echo "  source $(VENV)/bin/activate"
	@echo "  plait run examples/gpt_dp2.toml train.steps=50 plan.dp=2 run_dir=runs/short"
	@echo "(or, without activating, call $(VENV)/bin/plait)"

# DeepSpeed JIT-compiles a comm op on first use: built first, in the foreground, under this venv's own
# ~/.cache/plait/torch_extensions/<venv path> (tests/deepspeed_op.py says why), so no test waits for a compiler.
test: $(STAMP)
	$(PY) tests/deepspeed_op.py
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check runtime parallel storage gnn rl tests bench

clean:
	rm -rf runs data .pytest_cache
