# The verbs a person uses. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
AVENV := .venv-airflow
PIP_QUIET := 2>&1 | { grep -v -e '^WARNING: Location' -e 'is neither a file nor a directory' || true; }
TRAINER_PKGS := $(wildcard packages/core packages/data packages/training packages/pipeline)
ORCH_PKGS := $(wildcard packages/core packages/pipeline)
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := 1

.PHONY: help setup setup-trainer setup-orchestrator test test-trainer test-orchestrator lint format lock clean

help: ## list the verbs
	@grep -hE '^[a-z][a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

setup: setup-trainer setup-orchestrator ## install both environments from their locks (idempotent)

setup-trainer: $(VENV)/.installed
setup-orchestrator: $(AVENV)/.installed

$(VENV)/.installed: requirements/trainer.lock $(wildcard packages/*/pyproject.toml)
	@echo "==> trainer environment ($(VENV))"
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements/trainer.lock $(PIP_QUIET)
	@$(VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps $(addprefix -e ,$(TRAINER_PKGS)) $(PIP_QUIET)
	@touch $@

$(AVENV)/.installed: requirements/orchestrator.lock $(wildcard packages/*/pyproject.toml)
	@echo "==> orchestrator environment ($(AVENV))"
	@test -x $(AVENV)/bin/python || $(PYTHON) -m venv $(AVENV)
	@$(AVENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements/orchestrator.lock $(PIP_QUIET)
	@$(AVENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps $(addprefix -e ,$(ORCH_PKGS)) $(PIP_QUIET)
	@touch $@

test: setup lint test-trainer test-orchestrator ## ruff, every package's tests and doctests, cross-package tests

test-trainer: setup-trainer
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

test-orchestrator: setup-orchestrator
	$(AVENV)/bin/python -m pytest -q -p no:cacheprovider -c tests/orchestrator/pytest.ini tests/orchestrator

lint: setup-trainer ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup-trainer ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lock: ## re-resolve both environments from requirements/*.in into requirements/*.lock
	rm -rf /tmp/fr1-lock-t /tmp/fr1-lock-o
	$(PYTHON) -m venv /tmp/fr1-lock-t && /tmp/fr1-lock-t/bin/pip install -q -U pip $(PIP_QUIET)
	/tmp/fr1-lock-t/bin/pip install -q -r requirements/trainer.in $(PIP_QUIET)
	/tmp/fr1-lock-t/bin/pip freeze --exclude-editable | sort -f > requirements/trainer.lock
	$(PYTHON) -m venv /tmp/fr1-lock-o && /tmp/fr1-lock-o/bin/pip install -q -U pip $(PIP_QUIET)
	/tmp/fr1-lock-o/bin/pip install -q -r requirements/orchestrator.in $(PIP_QUIET)
	/tmp/fr1-lock-o/bin/pip freeze --exclude-editable | sort -f > requirements/orchestrator.lock

clean: ## remove environments and run outputs (not data/ or the DVC cache)
	rm -rf $(VENV) $(AVENV) .pytest_cache .ruff_cache
