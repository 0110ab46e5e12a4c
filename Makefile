# The README's Quickstart: `make demo` sets everything up and runs the offline demo;
# `make test` sets everything up and runs the test suite (what CI runs).
#   make demo [DEMO_DIR=runs/demo]      make test [PYTEST_ARGS="-k resume"]
# `make test-latest`: the library internals dsum relies on (tests marked contracts) and a short smoke run,
# with the newest transformers, accelerate and peft in a venv of their own (the rest as constraints.txt pins).
# On a GPU machine, choose the torch build first: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
LATEST ?= .venv-latest
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
BIN := $(VENV)/bin

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test slurm test-latest

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable ".[all,dev]"
	touch $@

demo: setup
	$(BIN)/dsum demo --output-dir $(DEMO_DIR)

# Debian's SLURM and munge: tests/test_slurm.py starts a one-node cluster on loopback and submits to it.
slurm:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || \
	  $(SUDO) apt-get install -y -q slurm-wlm munge >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q slurm-wlm munge >/dev/null; }

test: setup slurm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Upgrading transformers, accelerate or peft: what moves under dsum shows here first.
SMOKE := tests/test_contracts.py tests/test_equivalence.py tests/test_train.py::test_each_tiny_recipe_learns \
	tests/test_eval.py::test_the_growing_cache_gives_the_predictions_of_transformers_own

test-latest:
	$(PYTHON) -m venv $(LATEST)
	grep -v -E '^(transformers|accelerate|peft)==' constraints.txt > $(LATEST)/constraints.txt
	$(LATEST)/bin/pip install --quiet $(TORCH)
	$(LATEST)/bin/pip install --quiet --constraint $(LATEST)/constraints.txt --upgrade --editable ".[qlora,dev]" \
	  transformers accelerate peft
	$(LATEST)/bin/pip list 2>/dev/null | grep -E '^(transformers|accelerate|peft) '
	$(LATEST)/bin/python -m pytest -q $(SMOKE)
