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

# Three pytest workers on the 2 cores, each taking whole test files (module fixtures are built once),
# the longest files first (tests/conftest.py SLOW_FILES): much of the suite waits on subprocesses,
# servers and heartbeats, and a third worker fills those waits (8 min 44 s against 9 min 18 s for two
# in one hour). Their OpenMP threads sleep while idle: spinning ones from two workers on 2 cores made
# the suite 15 min instead of 8 (BENCHMARKS.md "The test suite"). `pytest` alone runs the same tests
# in one process.
test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

bench: setup
	$(BIN)/python -m benchmarks.edit_overhead

clean-env:
	rm -rf $(VENV)
