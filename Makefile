# make run   - install into .venv and run the scheduler with the demo jobs and the web console (embedded Redis)
# make test  - install into .venv, lint, type-check and run the whole test suite
# make test-latest - the test suite on the newest versions pyproject.toml allows, in .venv-latest (no lock)
# make bench - run the benchmarks (see docs/benchmarks.md); never part of `make test`
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest-xdist processes: the suite mostly waits on real processes, so 3 share 2 cores well
TEST_WORKERS ?= 3

.PHONY: install run worker test test-latest lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	@echo "metrics: http://127.0.0.1:$${HTTP_PORT:-9808}/metrics  (probes: /healthz, /readyz)"
	$(BIN)/python run_scheduler.py --web

worker: install
	$(BIN)/python run_worker.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# The next release of a dependency, seen before a user sees it: a venv of its own with the newest
# versions the ranges of pyproject.toml allow (a lock, if any, is ignored), then the same pytest
# command as `make test`. tests/unit/test_compat.py names any private name that changed.
LATEST_VENV ?= .venv-latest
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	@$(LATEST_VENV)/bin/python -c 'import importlib.metadata as m; print("test-latest:", ", ".join(f"{d} {m.version(d)}" for d in ("redis", "kombu", "celery", "apscheduler", "fastapi", "uvicorn", "starlette", "pydantic")))'
	$(LATEST_VENV)/bin/python -m pytest -n $(TEST_WORKERS)

bench: install
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) var .pytest_cache .mypy_cache .ruff_cache
