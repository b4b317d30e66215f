# The single source of truth for setting up, testing, linting and benchmarking.
# `make demo` and `make test` set everything up on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench check clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (on this machine's disk), so nothing pulls a CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/merge demo --force

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check merge tests benchmarks
	$(BIN)/ruff format --check merge tests benchmarks
	$(BIN)/mypy merge

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

check: lint test

clean:
	rm -rf $(VENV) demo-output bench-data
