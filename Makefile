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
	@grep -hE '^[a-z][a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-20s %s\n", $$1, $$2}'

setup: setup-trainer setup-orchestrator ## install both environments from their locks (idempotent)

setup-trainer: $(VENV)/.installed
setup-orchestrator: $(AVENV)/.installed

$(VENV)/.installed: requirements/trainer.lock scripts/install-env.sh $(wildcard packages/*/pyproject.toml)
	@echo "==> trainer environment ($(VENV))"
	@PYTHON=$(PYTHON) scripts/install-env.sh $(VENV) requirements/trainer.lock $(TRAINER_PKGS)
	@touch $@

$(AVENV)/.installed: requirements/orchestrator.lock scripts/install-env.sh $(wildcard packages/*/pyproject.toml)
	@echo "==> orchestrator environment ($(AVENV))"
	@PYTHON=$(PYTHON) scripts/install-env.sh $(AVENV) requirements/orchestrator.lock $(ORCH_PKGS)
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

# --- local pipeline (owner: synthesis+evaluation helper) ---
.PHONY: pipeline
PIPELINE_ARGS ?=
pipeline: setup-trainer ## every stage in sequence on the tiny profile, no Airflow; last line = final metrics JSON
	$(VENV)/bin/python -m facial_r1_training.pipeline_local --config configs/tiny-cpu.yaml $(PIPELINE_ARGS)

# --- the paper's ablation in miniature (benchmarks/ablation.py) ---
.PHONY: ablation
ABLATION_ARGS ?=
ablation: setup-trainer ## arms sft / grpo / iteration2 over seeds 0 1 2 on the tiny profile; last line = JSON
	$(VENV)/bin/python benchmarks/ablation.py --config configs/tiny-cpu.yaml $(ABLATION_ARGS)

# --- orchestration (owner: pipeline; docs/operations.md) -----------------------------------
# Airflow on SQLite in a project-local, git-ignored AIRFLOW_HOME; the DAG runs the stages as
# local processes of .venv; MLflow store runs/mlflow.db; DVC remote .dvc-remote/.
AIRFLOW_PORT ?= 8080
export AIRFLOW_PORT
MLFLOW_PORT ?= 5000
DEMO_CONF ?=
AIRFLOW_ENV := . services/airflow/env.sh &&

.PHONY: demo airflow mlflow-ui k8s-render benchmark-orchestration
demo: setup ## THE main command: one full iteration through Airflow (SQLite) + summary table; again = next iteration
	$(AIRFLOW_ENV) $(AVENV)/bin/facial-r1 pipeline demo --quiet $(if $(DEMO_CONF),--conf '$(DEMO_CONF)')

airflow: setup ## airflow standalone on 127.0.0.1:8080 (AIRFLOW_PORT), DAG unpaused; then: source services/airflow/env.sh && airflow dags trigger facial_r1_iteration
	@echo "==> Airflow UI http://127.0.0.1:$(AIRFLOW_PORT) (admin password: airflow-home/simple_auth_manager_passwords.json.generated)"
	@echo "    in another shell: source services/airflow/env.sh && airflow dags trigger facial_r1_iteration"
	$(AIRFLOW_ENV) $(AVENV)/bin/airflow standalone

mlflow-ui: setup-trainer ## MLflow UI on 127.0.0.1:5000 (MLFLOW_PORT) over runs/mlflow.db (runs, registry, champion alias)
	mkdir -p runs
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
		--backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db \
		--default-artifact-root $(CURDIR)/runs/mlartifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

k8s-render: setup-orchestrator ## render + validate (offline) the kustomize overlays and every stage's pod/job into build/k8s/
	@mkdir -p build/k8s
	@for o in infra/overlays/*/; do n=$$(basename $$o); \
		kubectl kustomize $$o > build/k8s/$$n.yaml && echo "rendered build/k8s/$$n.yaml"; done
	$(AVENV)/bin/kubernetes-validate --strict -k 1.32 build/k8s/*.yaml
	FACIAL_R1_HOME=$(CURDIR) $(AVENV)/bin/facial-r1 pipeline render-k8s \
		--config configs/qwen2.5-vl-7b.yaml --out build/k8s/stages

benchmark-orchestration: setup ## time one embedded iteration: DAG wall time vs the stages' own time (overhead ratio)
	$(AIRFLOW_ENV) $(AVENV)/bin/python benchmarks/orchestration.py

clean: ## remove environments and run outputs (not data/ or the DVC cache)
	rm -rf $(VENV) $(AVENV) .tools .pytest_cache .ruff_cache
