# make run          - install into .venv and run the scheduler with the demo jobs and the web console (embedded Redis)
# make test         - install into .venv, install the machine's test tools (scripts/test-deps), lint, type-check, run the suite
# make install      - a new .venv with exactly the locked versions (requirements.lock, hashes checked)
# make lock         - resolve pyproject.toml's ranges again into requirements.lock (a deliberate upgrade: commit it)
# make test-latest  - the suite on the newest versions pyproject.toml allows, in .venv-latest (no lock)
# make docs         - build the manual (docs/, mkdocs.yml) strictly into site/: a broken link fails; part of `make test`
# make bench        - run the benchmarks (see docs/benchmarks.md); never part of `make test`
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pytest-xdist processes: the suite mostly waits on real processes, so more processes than cores
TEST_WORKERS ?= 5
UV_VERSION := 0.13.8

.PHONY: install run worker test test-deps test-latest lint docs format lock durations bench clean

install: $(VENV)/.installed

# A new virtualenv whenever the lock changes, so it holds the lock and nothing else.
$(VENV)/.installed: requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "chronoq needs Python >= 3.11 ($(PYTHON) is $$($(PYTHON) -V 2>&1))" >&2; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet uv==$(UV_VERSION)
	.venv-lock/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --no-header --quiet -o requirements.lock

run: install
	@echo "metrics: http://127.0.0.1:$${HTTP_PORT:-9808}/metrics  (probes: /healthz, /readyz)"
	$(BIN)/chronoq scheduler --web

worker: install
	$(BIN)/chronoq worker

test-deps:
	scripts/test-deps

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The manual, built as CI builds it: --strict makes every warning (a link to a missing page or
# anchor, a page missing from the nav) a failure. Never add --quiet: it drops the warnings before
# strict mode counts them, and a broken link then builds with exit 0. NO_MKDOCS_2_WARNING hides
# mkdocs-material's banner about MkDocs 2.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: test-deps lint docs
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# Refresh tests/durations.json, the measured times that order the suite slowest first.
durations: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --record-durations

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
	rm -rf $(VENV) $(LATEST_VENV) .venv-lock var site .pytest_cache .mypy_cache .ruff_cache
