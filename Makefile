# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv and run the demo pipeline end to end
#   make test   create .venv and run lint, type checks, the docs build and the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Some machines set PYTHONDONTWRITEBYTECODE: every import then recompiles from source (lancedb
# alone takes ~15 s), which multiplies the cost of the many subprocesses the tests start.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup demo dev test lint bench clean

# The code location reads the dbt manifest but never builds it: it lives under the data
# directory, with everything else dbt writes (the dbt project itself is dbt_models/).
DATA_DIR := $(or $(QWEN3_PIPELINE_DATA_DIR),data)
DBT_MANIFEST := $(DATA_DIR)/dbt/target/manifest.json

setup: $(STAMP) $(DBT_MANIFEST)

# torch goes in first with plain pip: on these machines `torch==2.13.0` is a small CPU wheel on
# local disk, while a resolver left to itself would pull a multi-GB CUDA build. Everything else
# is resolved by uv (pip's resolver backtracks for many minutes on this stack) under the
# versions pinned in constraints.txt. uv writes no bytecode unless asked: a process started
# with PYTHONDONTWRITEBYTECODE=1 (each run worker of a `dagster dev` started by hand on such a
# machine) would then recompile transformers, torch and lancedb from source on every start.
# --compile-bytecode compiles the whole site-packages once here (a minute or two of CPU).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)" uv
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt \
		-e '.[dev]'
	touch $(STAMP)

$(DBT_MANIFEST): $(STAMP) $(wildcard dbt_models/*.yml dbt_models/models/*/*)
	$(PY) -m qwen3_pipeline.demo.dbt --force

demo: setup
	$(PY) -m qwen3_pipeline.demo

# The Airflow twin of `make demo`: the example DAG airflow_dags/qwen3_demo.py, run once in-process
# with dag.test() (no scheduler, no API server), then its downstream DAG for the sample search;
# it prints the same summary. Airflow's SQLite metadata DB lives in $(DATA_DIR)/airflow_home
# unless AIRFLOW_HOME is set. (`python -m qwen3_pipeline.demo.airflow_run --limit N` loads a sample.)
.PHONY: airflow-demo
airflow-demo: $(STAMP)
	$(PY) -m qwen3_pipeline.demo.airflow_run

# The Dagster UI on the demo code location (runs are kept under data/dagster_home). The
# instance is prepared first: the `gpu` concurrency pool gets a limit, enforced per run, so runs
# that load the model queue instead of sharing the GPU. GPU_POOL_LIMIT=N (or
# QWEN3_PIPELINE_GPU_POOL_LIMIT) sets it; unset, a limit set earlier (in the UI) is kept, else 1.
DAGSTER_HOME_DIR := $(abspath data/dagster_home)
GPU_POOL_LIMIT ?=

dev: setup
	DAGSTER_HOME=$(DAGSTER_HOME_DIR) $(PY) -m qwen3_pipeline.dagster.instance \
		$(if $(GPU_POOL_LIMIT),--gpu-pool-limit $(GPU_POOL_LIMIT))
	DAGSTER_HOME=$(DAGSTER_HOME_DIR) $(VENV)/bin/dagster dev -w workspace.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# The documentation site (docs/, mkdocs.yml) into site/; --strict fails on any warning: a
# broken link, a missing page, a docstring mkdocstrings cannot render.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

# One pytest worker per core; a test file stays on one worker (its module fixtures, such as
# the Ray instance of test_ray_engine.py, start once). --durations keeps the slowest in the log.
test: setup lint docs
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15

bench: setup
	$(PY) benchmarks/encode_bench.py

clean:
	rm -rf $(VENV) data dbt_models/target dbt_models/logs .pytest_cache .mypy_cache .ruff_cache site
