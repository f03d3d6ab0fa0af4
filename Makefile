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

.PHONY: help venv demo test test-fast test-cpus lab instructor release bench lint format clean

help:
	@echo "make demo     run the production loop end to end (creates .venv on first use)"
	@echo "make test     lint + the whole test suite"
	@echo "make test-cpus  the demo and grading tests under two emulated CPUs (AVX2, SSE4.1)"
	@echo "make lab      the trainee's JupyterLab: labs, rendered chapter, no instructor tools"
	@echo "make instructor  JupyterLab with nbgrader's formgrader (grading written answers)"
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

# The tests whose outcome depends on training numerics, again under two emulated CPUs: a typical AVX2 laptop and an
# old SSE4.1 one (oneDNN and ATen then pick those CPUs' kernels). CPU_TESTS narrows it, e.g. CPU_TESTS=tests/test_demo.py
CPU_TESTS ?= tests/test_demo.py tests/test_grading.py
test-cpus: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest $(PYTEST_ARGS) $(CPU_TESTS)
	ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default $(PY) -m pytest $(PYTEST_ARGS) $(CPU_TESTS)

# The trainee's JupyterLab (courseware/lab.py): the chapter rendered with the overlay, the repository as the root, no
# nbgrader instructor tools, one state dir for every lab. LAB_ARGS go to JupyterLab, e.g. LAB_ARGS="--no-browser".
lab: $(STAMP)
	$(PY) -m courseware lab $(LAB_ARGS)

# The instructor's JupyterLab: nbgrader's formgrader and assignment tools (INSTRUCTORS.md, step 5).
# (--allow-root only where make runs as root, e.g. in a container, as the trainee configuration does.)
instructor: $(STAMP)
	MLOPS_STATE_DIR=$(abspath .mlops) $(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

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

# --- The course around the labs: chapter, SME overlay, quizzes, grading a term (INSTRUCTORS.md) -----------------
.PHONY: help-course book book-deps overlay quiz collect autograde feedback grades
LAB ?=
FROM ?=
GRADES ?= grades.csv

help-course:
	@echo "make book                   chapter + SME overlay -> _build/book (HTML if the book extra is installed)"
	@echo "make book-deps              install the book toolchain (Sphinx + myst-parser, works offline)"
	@echo "make overlay                check chapters/organization.yaml and summarise it"
	@echo "make quiz                   regenerate the quiz and the self-check notebook from quizzes/bank.yaml"
	@echo "make collect LAB=id FROM=dir   copy dir/<student>/<id>/*.ipynb into submitted/"
	@echo "make autograde LAB=id       autograde submitted/<student>/<id> (every student)"
	@echo "make feedback LAB=id        HTML feedback in feedback/<student>/<id>/"
	@echo "make grades                 export the gradebook to $(GRADES)"

book: $(STAMP)
	$(PY) -m courseware book

book-deps: $(STAMP)
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[book]'

overlay: $(STAMP)
	$(PY) -m courseware overlay

quiz: $(STAMP)
	$(PY) -m courseware quiz

collect: $(STAMP)
	@test -n "$(LAB)" -a -n "$(FROM)" || { echo "usage: make collect LAB=<assignment id> FROM=<folder of student folders>"; exit 2; }
	$(PY) -m courseware collect $(LAB) $(FROM)

autograde: $(STAMP)
	@test -n "$(LAB)" || { echo "usage: make autograde LAB=<assignment id>, e.g. LAB=lab01-packaging"; exit 2; }
	$(PY) -m courseware autograde $(LAB)

feedback: $(STAMP)
	@test -n "$(LAB)" || { echo "usage: make feedback LAB=<assignment id>"; exit 2; }
	$(PY) -m courseware feedback $(LAB)

grades: $(STAMP)
	$(PY) -m courseware export --out $(GRADES)
