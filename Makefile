# Two commands do all the set-up on a fresh machine (see README):
#   make pipeline   — create the environment, then run the whole DAG on the tiny profile
#   make test       — create the environment, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup pipeline test bench clean-env
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

pipeline: setup
	$(BIN)/loom pipeline

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.edit_overhead

clean-env:
	rm -rf $(VENV)
