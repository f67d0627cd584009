# Two entry points (README): `make demo` trains on the built-in demo data,
# `make test` runs the test suite. Each creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.deps: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

demo: $(VENV)/.deps
	$(PY) train_stream.py --output output/demo

test: $(VENV)/.deps
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .demo output .pytest_cache
