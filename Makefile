# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint docs bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,lightning,hf,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ess-reg train --out runs/demo --overwrite
	$(BIN)/ess-reg analyze runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/mkdocs build --strict

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site (mkdocs.yml), built into site/.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ess_routes.py

# On a machine with a CUDA device: agreement with the CPU, no host sync, costs (a few minutes).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis site
