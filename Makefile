# The single source of truth for setting up, testing, linting and benchmarking.
# `make demo` and `make test` set everything up on a fresh machine first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOCK := requirements.lock
LOCK_TOOLS := .venv-lock
LATEST := .venv-latest

.PHONY: setup demo test lint bench check clean lock test-latest gpu-check

# Exactly the versions the suite passed with (every transitive dependency, torch's CPU build
# included), then the project itself without resolving anything again.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
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

# Refresh requirements.lock from pyproject.toml's ranges and lock.in (pip-tools' pip-compile,
# which reads pip's own configuration, so torch's CPU build on disk is found as `pip install`
# finds it). Run after changing a dependency, then `make test` and commit both files.
lock:
	test -x $(LOCK_TOOLS)/bin/pip-compile || { $(PY) -m venv $(LOCK_TOOLS) && \
		$(LOCK_TOOLS)/bin/python -m pip install -q --upgrade pip "pip-tools>=7.6,<8"; }
	rm -f $(LOCK)
	$(LOCK_TOOLS)/bin/pip-compile -q --extra dev --extra compare --extra ray --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml lock.in

# Not in CI: the newest releases within pyproject.toml's ranges, in a venv of their own, to see
# the next upstream break coming before it reaches the lock.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "torch==2.13.0"
	# lock.in holds torch at the CPU build on disk: anything newer would be a multi-GB CUDA build.
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c lock.in -e ".[dev,compare,ray]"
	$(LATEST)/bin/python -m pip list --format=freeze > $(LATEST)/resolved.txt
	$(LATEST)/bin/python -m pytest

# The `cuda`-marked tests and the core benchmark on the GPU (a machine with CUDA torch).
gpu-check: $(STAMP)
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) $(LATEST) $(LOCK_TOOLS) demo-output bench-data
