# edgefleet: `make demo` and `make test` do all set-up on a fresh Debian machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all setup system-deps demo test test-fast lint reformat typecheck clean

all: test

# Debian packages the tests and the demo need (a real Mosquitto broker).
system-deps:
	@./.ci/system-deps.sh

$(STAMP): pyproject.toml
	@./.ci/system-deps.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/edgefleet-sim demo

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -n 2 -m "not e2e and not slow and not qemu" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: setup
	$(BIN)/mypy

reformat: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache var build *.egg-info
