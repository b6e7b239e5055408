# hmlib: two entry points on a fresh machine (README "Quick start"):
#   make run    set everything up, then run the notebook series (hmlib run --profile default) -> reports/
#   make test   set everything up, then run every test (the slow tier included)
# Set-up creates .venv if missing, installs the pinned CPU-friendly torch FIRST (so nothing pulls an
# unpinned torch), then hmlib with its test extras. The data mirror defaults to ../shared/data.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# Optional pip index for a CPU-only torch build where the platform's default wheel is a CUDA one.
TORCH_INDEX ?=
PROFILE ?= default
CONFIG ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.hmlib-installed

ifeq ($(strip $(HMLIB_DATA_DIR)),)
  ifneq ($(wildcard ../shared/data),)
    export HMLIB_DATA_DIR := $(abspath ../shared/data)
  endif
endif

.PHONY: setup run test test-fast bench results clean-reports help

help:
	@echo "make run        set up, then hmlib run --profile $(PROFILE) (HTML reports in reports/)"
	@echo "make test       set up, then every test (slow tier included)"
	@echo "make test-fast  set up, then the unit tests only (-m 'not slow')"
	@echo "make bench      set up, then every benchmarks/bench_*.py (after make run: they time its checkpoints)"
	@echo "make results    docs/results.json and the README tables from the last make run + make bench"
	@echo "variables: PROFILE=smoke|default|seed CONFIG=path.json HMLIB_DATA_DIR=... TORCH_INDEX=..."

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(BIN)/python -m pip install -e ".[test]" --config-settings editable_mode=compat
	$(BIN)/python -c "import torch, hmlib; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
	touch $@

run: $(STAMP)
	$(BIN)/hmlib run --profile $(PROFILE) $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script; done

results: $(STAMP)
	$(BIN)/hmlib results --write

clean-reports:
	rm -rf reports
