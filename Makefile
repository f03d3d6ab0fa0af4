# Every target creates the virtual environment on first use; re-running is safe and fast.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Optional extra wheel index, e.g. PyTorch's CPU-only wheels (see README: "Save disk with CPU-only torch").
TORCH_INDEX ?=
PIP_EXTRA := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# nbgrader and `mlflow models serve` call executables (alembic, uvicorn) that live in the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help venv demo test test-fast lab release bench lint format clean

help:
	@echo "make demo     run the production loop end to end (creates .venv on first use)"
	@echo "make test     lint + the whole test suite"
	@echo "make lab      JupyterLab on labs/"
	@echo "make release  regenerate labs/ from solutions/ with nbgrader"
	@echo "make bench    performance and drift measurements (benchmarks/)"

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet $(PIP_EXTRA) -c requirements/constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m reference_impl demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check reference_impl courseware tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=labs

release: $(STAMP)
	$(PY) -m courseware release

bench: $(STAMP)
	$(PY) -m benchmarks

lint: $(STAMP)
	$(PY) -m ruff check reference_impl courseware tests benchmarks
	$(PY) -m ruff format --check reference_impl courseware tests benchmarks

format: $(STAMP)
	$(PY) -m ruff check --fix reference_impl courseware tests benchmarks
	$(PY) -m ruff format reference_impl courseware tests benchmarks

clean:
	rm -rf .mlops .pytest_cache .ruff_cache
