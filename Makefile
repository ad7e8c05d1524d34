# The two commands of the README: `make demo` and `make test`. Each creates a virtualenv in
# .venv (override with VENV=...), installs what it needs there, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

demo: $(BIN)/python
	$(BIN)/python -m pip install -e '.[demo]'
	$(BIN)/python -m nm_sparse_jax demo $(DEMO_ARGS)

test: $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m ruff check nm_sparse_jax tests
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
