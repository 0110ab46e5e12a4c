# The README's Quickstart: `make demo` sets everything up and runs the offline demo;
# `make test` sets everything up and runs the test suite (what CI runs).
#   make demo [DEMO_DIR=runs/demo]      make test [PYTEST_ARGS="-k resume"]
# On a GPU machine, choose the torch build first: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup demo test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable ".[all,dev]"
	touch $@

demo: setup
	$(BIN)/dsum demo --output-dir $(DEMO_DIR)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)
