# hmlib: two entry points on a fresh machine (README "Quick start"):
#   make run    set everything up, then run the notebook series (hmlib run --profile default) -> reports/
#   make test   set everything up, then run every test (the slow tier included)
# Set-up creates .venv if missing, installs the pinned CPU-friendly torch FIRST (so nothing pulls an
# unpinned torch), then hmlib with its test extras. The data mirror defaults to ../shared/data.
# Set-up repairs itself: a .venv whose python cannot run pip (a first make interrupted while creating it) is
# recreated, an install that does not import is reinstalled, and the stamp is written only after the check.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# Optional pip index for a CPU-only torch build where the platform's default wheel is a CUDA one.
TORCH_INDEX ?=
PROFILE ?= default
CONFIG ?=
# Where every stage computes (hmlib run/benchmark --device): auto, cpu, cuda, cuda:N or mps; empty: the config's.
DEVICE ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.hmlib-installed
# Is the venv usable (its python runs pip)? If not, the stamp counts as out of date whatever its age.
VENV_OK := $(shell test -x $(BIN)/python && $(BIN)/python -m pip --version >/dev/null 2>&1 && echo yes)
VERIFY = $(BIN)/python -c "import torch, hmlib; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"
TORCH_ARGS = "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

# (Re)create $(VENV) unless its python runs pip; never delete a folder that is not a virtual environment.
define REPAIR_VENV
if $(BIN)/python -m pip --version >/dev/null 2>&1; then exit 0; fi; \
if [ -e "$(VENV)" ] && [ ! -f "$(VENV)/pyvenv.cfg" ] && [ -n "$$(ls -A "$(VENV)" 2>/dev/null)" ]; then \
  echo "make: $(VENV) exists but is not a virtual environment; move it away or set VENV=<another folder>" >&2; \
  exit 1; \
fi; \
echo "== $(VENV) is missing or broken (no working '$(BIN)/python -m pip'): creating it afresh"; \
rm -rf "$(VENV)" && $(PYTHON) -m venv "$(VENV)" && $(BIN)/python -m pip --version >/dev/null || { \
  echo "make: could not create $(VENV) with a working pip from $(PYTHON) (on Debian/Ubuntu: apt-get install" \
       "python3-venv); fix that and run make again" >&2; rm -rf "$(VENV)"; exit 1; }
endef

ifeq ($(strip $(HMLIB_DATA_DIR)),)
  ifneq ($(wildcard ../shared/data),)
    export HMLIB_DATA_DIR := $(abspath ../shared/data)
  endif
endif

.PHONY: setup setup-venv check-args run test test-fast bench benchmark benchmark-transductive folds results clean-reports help FORCE

help:
	@echo "make run        set up, then hmlib run --profile $(PROFILE) (HTML reports in reports/)"
	@echo "make test       set up, then every test (slow tier included)"
	@echo "make test-fast  set up, then the unit tests only (-m 'not slow')"
	@echo "make setup-venv only (re)create .venv when it is missing or broken (no download)"
	@echo "make bench      set up, then every benchmarks/bench_*.py (after make run: they time its checkpoints)"
	@echo "make benchmark  set up, then the full held-out grid on the pipeline's checkpoints (after make run; resumable)"
	@echo "make benchmark-transductive  the same datasets transductively (each train split adapted to first; resumable)"
	@echo "make folds      set up, then each leave-one-dataset-out fold of docs/lodo/ (its own home: lodo/<dataset>)"
	@echo "make results    docs/results.json and the README tables from the last make run, make benchmark(-transductive)"
	@echo "                and make bench (a part with no run in the artifact home is kept as committed)"
	@echo "make clean-reports  remove the HTML reports of the artifact home (\$$HMLIB_HOME/reports, else reports/)"
	@echo "variables: PROFILE=smoke|default|seed CONFIG=path.json DEVICE=cuda HMLIB_DATA_DIR=... TORCH_INDEX=... VENV=.venv"
	@echo "           PYTEST_ARGS='...' (make test, make test-fast)"
	@echo "           FOLDS='fashion_mnist hebrew_chars math_shapes' FOLDS_HOME=lodo (make folds)"

setup: $(STAMP)

# Only the virtual environment (no download): recreate it if its python cannot run pip.
setup-venv:
	@$(REPAIR_VENV)

$(STAMP): pyproject.toml $(if $(VENV_OK),,FORCE)
	@$(REPAIR_VENV)
	$(BIN)/python -m pip install $(TORCH_ARGS)
	$(BIN)/python -m pip install -e ".[test]" --config-settings editable_mode=compat
	@$(VERIFY) || { echo "== the install in $(VENV) does not import (an interrupted install?): reinstalling"; \
	  $(BIN)/python -m pip install --force-reinstall --no-deps $(TORCH_ARGS) && \
	  $(BIN)/python -m pip install --force-reinstall --no-deps -e ".[test]" --config-settings editable_mode=compat && \
	  $(VERIFY); }
	touch $@

FORCE:

# Arguments a run reads, checked before anything is installed (hmlib checks them again, with the config's details).
PROFILES = default smoke seed
check-args:
	@case " $(PROFILES) " in *" $(PROFILE) "*) ;; *) echo "make: PROFILE=$(PROFILE) is not a profile; choose one of:" \
	  "$(PROFILES)" >&2; exit 2;; esac
	@$(if $(CONFIG),test -f "$(CONFIG)" || { echo "make: CONFIG=$(CONFIG) is not a file; give the path of a JSON" \
	  "config file or leave CONFIG out" >&2; exit 2; },:)

run: check-args $(STAMP)
	$(BIN)/hmlib run --profile $(PROFILE) $(if $(CONFIG),--config $(CONFIG),) $(if $(DEVICE),--device $(DEVICE),)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script; done

BENCHMARK_ARGS = --profile $(PROFILE) $(if $(CONFIG),--config $(CONFIG),) $(if $(DEVICE),--device $(DEVICE),)

benchmark: check-args $(STAMP)
	$(BIN)/hmlib benchmark $(BENCHMARK_ARGS)

benchmark-transductive: check-args $(STAMP)
	$(BIN)/hmlib benchmark --setting transductive $(BENCHMARK_ARGS)

# The leave-one-dataset-out folds (docs/METHOD.md): each holds one meta-training dataset back from every stage and
# runs the whole series on it, in its own home (nothing of the default run is touched); settings may be chosen there.
FOLDS ?= fashion_mnist hebrew_chars math_shapes
FOLDS_HOME ?= lodo
FOLD_HOME = $(abspath $(FOLDS_HOME))/$$fold
FOLD_DEVICE = $(if $(DEVICE),--device $(DEVICE),)

folds: check-args $(STAMP)
	@set -e; for fold in $(FOLDS); do echo "== fold $$fold: held back from every stage; home $(FOLD_HOME)"; \
	  HMLIB_HOME=$(FOLD_HOME) $(BIN)/hmlib run --profile $(PROFILE) --config docs/lodo/$$fold.json $(FOLD_DEVICE); done

results: $(STAMP)
	$(BIN)/hmlib results --write

clean-reports:  # the reports of the artifact home the commands write to: $HMLIB_HOME/reports where it is set
	rm -rf "$(if $(HMLIB_HOME),$(HMLIB_HOME),.)/reports"
