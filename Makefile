# make run   - install into .venv and run the scheduler with the demo jobs and the web console (embedded Redis)
# make test  - install into .venv, lint, type-check and run the whole test suite
# make bench - run the benchmarks (see docs/benchmarks.md); never part of `make test`
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest-xdist processes: the suite mostly waits on real processes, so 3 share 2 cores well
TEST_WORKERS ?= 3

.PHONY: install run worker test lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	@echo "metrics: http://127.0.0.1:$${HTTP_PORT:-9808}/metrics  (probes: /healthz, /readyz)"
	$(BIN)/chronoq scheduler --web

worker: install
	$(BIN)/chronoq worker

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

bench: install
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
