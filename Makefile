# Two entry points (README): `make demo` trains on the built-in demo data,
# `make test` runs the test suite (lint + every test; CI runs it). Each creates or reuses .venv
# and installs what it needs (the demo: requirements.txt only). `make test-fast` skips the tests
# marked slow (under 2 minutes on a quiet 2-core machine: BENCHMARKS.md, section "Test suite").
# `make bench` runs every CPU benchmark (README: its time) -> bench-results.json + bench-results.md.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-fast lint bench clean

# Two stamps: the demo needs only requirements.txt; the tests (and benchmarks) add the test tools,
# DALI's CPU wheel and the object-store clients.
$(VENV)/.deps-run: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.deps: $(VENV)/.deps-run requirements-test.txt requirements-dali.txt requirements-cloud.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

demo: $(VENV)/.deps-run
	$(PY) train_stream.py --output output/demo

lint: $(VENV)/.deps
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.deps
	$(PY) tools/bench_all.py --out bench-results.json

clean:
	rm -rf $(VENV) .demo output .pytest_cache
