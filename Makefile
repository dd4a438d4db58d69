# Set-up:  make run   (installs into .venv, then runs the main job on the bundled default)
#          make test  (installs if needed, then runs the test suite)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# mamba-ssm's pin has one home, pyproject.toml's dependencies
MAMBA_SSM := $(shell grep -o '"mamba-ssm==[^"]*"' pyproject.toml | tr -d '"')
export HF_UPDATE_DOWNLOAD_COUNTS := 0
export WANDB_MODE ?= offline

.PHONY: install run test test-full suite tables figures docs clean help

help:
	@echo "make run | test | test-full | suite | tables | figures | docs | clean"

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# mamba-ssm ships as an sdist whose setup.py needs torch at build time; no CUDA build here (see compat.py)
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(PY) -m pip install -q --no-cache-dir --no-build-isolation --no-deps $(MAMBA_SSM)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: install
	$(PY) run.py

# two test processes (pytest-xdist; a file's tests share one, so its module fixtures are built once), one thread
# each: tiny tensors gain nothing from a second thread; on two cores this takes ~40 % off the serial run
TEST_PROCESSES ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile
test: install
	$(PYTEST)

test-full: install
	$(PYTEST) -m "not gpu"

suite: install
	$(PY) -m ssmcompress.suite.build

# the committed tables (results/tables), the figures drawn from the same store, and the pages that quote them
tables: install
	$(PY) -m ssmcompress.tables
	$(MAKE) --no-print-directory figures
	$(PY) -m ssmcompress.tables.docs

# the pages that quote results (README.md, docs/ from docs/templates/), then the documentation site (site/)
docs: install
	$(PY) -m ssmcompress.tables.docs
	$(PY) -m mkdocs build --strict --quiet

# the accuracy-vs-FLOPs figures of the main and positional tables and the long-context accuracy-vs-speed-up figures
# (results/figures), by the analysis notebooks
figures: install
	mkdir -p outputs/notebooks
	for table in main positional; do \
	  $(PY) -m papermill --no-progress-bar --log-level WARNING -k python3 --cwd analysis -p table $$table analysis/accuracy_vs_flops.ipynb \
	    outputs/notebooks/accuracy_vs_flops_$$table.ipynb || exit 1; \
	done
	$(PY) -m papermill --no-progress-bar --log-level WARNING -k python3 --cwd analysis analysis/accuracy_vs_speed.ipynb \
	  outputs/notebooks/accuracy_vs_speed.ipynb

clean:
	rm -rf outputs multirun wandb site .pytest_cache
