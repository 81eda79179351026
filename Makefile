# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test services tools lint sdl lock clean fuzz

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## Serve the gateway (embedded PostgreSQL under ./.data/ when ANALYTICS_DATABASE_URL is unset).
run: install
	$(BIN)/analytics-gateway serve

## Start any local service that is down, then run the whole suite.
test: install services tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

services:
	bash .ci/services.sh

## promtool and amtool for the rule and route tests (Debian's prometheus and prometheus-alertmanager). Only the
## binaries are wanted: a daemon the packages start (systemd machines) is stopped and disabled at once.
tools:
	command -v promtool >/dev/null && command -v amtool >/dev/null && test -x /usr/bin/chromium || ( \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			prometheus prometheus-alertmanager chromium \
		&& for unit in prometheus prometheus-alertmanager; do \
			(command -v systemctl >/dev/null && systemctl disable --now $$unit 2>/dev/null) \
				|| service $$unit stop 2>/dev/null || true; \
		done )

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Hostile-input fuzzing, longer than the short runs in `make test` (fixed seeds; about 12 minutes):
## Schemathesis against /graphql of a real gateway, then hypothesis against both ingestion paths.
FUZZ_SECONDS ?= 600
FUZZ_EXAMPLES ?= 2000
FUZZ_INGEST_TESTS := tests/unit/test_event_validation.py tests/integration/test_ingest_hostile.py::test_fuzz_both_ingestion_paths
fuzz: install services
	$(BIN)/python -m tests.fuzz.graphql --examples $(FUZZ_EXAMPLES) --max-time $(FUZZ_SECONDS)
	ANALYTICS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q $(FUZZ_INGEST_TESTS)

## Re-export schema/schema.graphql after an API change.
sdl: install
	$(BIN)/python -m resolvers.sdl

## Re-pin every dependency (after changing pyproject.toml).
lock: install
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## Benchmarks: ingestion, then usage/GraphQL/publish-to-visible (writes docs/benchmarks.md), then the
## reliability query (bench/results/reliability.json; reloads the 10M data set unless BENCH_ARGS has --keep-db).
.PHONY: bench
bench: install services
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -c 'import shutil, sys; sys.exit(shutil.which("py-spy", path="$(BIN)") is None)' \
		|| $(BIN)/python -m pip install --quiet --disable-pip-version-check py-spy
	$(BIN)/python -m bench.ingest_bench
	$(BIN)/python -m bench.graphql_bench --keep-db $(BENCH_ARGS)
	$(BIN)/python -m bench.three_way --keep-db  # gateway, PostGraphile 5.1.5 (npm ci into bench/peer), floor
	$(BIN)/python -m bench.report
	$(BIN)/python -m bench.reliability_bench $(BENCH_ARGS)  # reuses graphql_bench's data set, then drops it
	$(BIN)/python -m bench.detection_quality  # spike detection quality on its labelled corpus (about 1 min)
	$(BIN)/python -m bench.export_bench $(BENCH_ARGS)  # COST and INCIDENT exports of 1M rows vs COPY (about 15 min)
