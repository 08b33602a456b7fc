# mnist-mlops: every target sets up what it needs itself (virtualenv, binaries), so a fresh clone works.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
CACHE_DIR ?= $(HOME)/.cache/mnist-mlops
# The virtualenv lives outside the checkout, keyed by the requirement files, so a fresh clone with
# unchanged requirements reuses it and a changed pin gets a new one.
REQ_HASH := $(shell cat requirements/*.txt | sha256sum | cut -c1-12)
VENV ?= $(CACHE_DIR)/venv-$(REQ_HASH)
CHECKOV_VENV ?= $(CACHE_DIR)/checkov-$(shell sha256sum requirements/checkov.txt | cut -c1-12)
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR):$(CURDIR)/operator
export MNIST_MLOPS_CACHE := $(CACHE_DIR)
STATE_DIR ?= $(CURDIR)/.state
PYTEST_ARGS ?=

.PHONY: help venv system-deps demo test lint typecheck bench bench-train bench-serve bench-operator k8s-tools clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# flock: several make processes (parallel shells, CI) may ask for the same virtualenv at once.
$(VENV)/.ready: requirements/*.txt
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 ($(PYTHON)) is required" >&2; exit 1; }
	mkdir -p $(CACHE_DIR)
	flock $(VENV).lock bash -euo pipefail -c '\
		test -f $@ && exit 0; \
		$(PYTHON) -m venv $(VENV); \
		$(VENV)/bin/pip install --quiet --upgrade pip; \
		$(VENV)/bin/pip install --quiet -r requirements/dev.txt; \
		touch $@'

venv: $(VENV)/.ready ## Create or reuse the project virtualenv
	@echo "virtualenv: $(VENV)"

$(CHECKOV_VENV)/.ready: requirements/checkov.txt
	mkdir -p $(CACHE_DIR)
	flock $(CHECKOV_VENV).lock bash -euo pipefail -c '\
		test -f $@ && exit 0; \
		$(PYTHON) -m venv $(CHECKOV_VENV); \
		$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip; \
		$(CHECKOV_VENV)/bin/pip install --quiet -r requirements/checkov.txt; \
		touch $@'

k8s-tools: ## Build (once, cached) kube-apiserver, kube-controller-manager, etcd and helm
	bash scripts/build-k8s-tools.sh

demo: $(VENV)/.ready ## Run the whole pipeline locally: MLflow, the experiment, promotion, serving
	$(PY) -m training_job.demo --state-dir $(STATE_DIR)

system-deps: ## Debian packages the tests drive (chromium, prometheus, wrk); installs only what is missing
	bash scripts/install-system-deps.sh

test: $(VENV)/.ready $(CHECKOV_VENV)/.ready system-deps ## Lint, type checks and the whole suite against real components
	$(MAKE) --no-print-directory lint
	MNIST_MLOPS_K8S_BIN="$$(bash scripts/build-k8s-tools.sh | tail -n 1)" \
	CHECKOV="$(CHECKOV_VENV)/bin/checkov" \
		$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.ready ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: bench-train bench-serve bench-operator ## All benchmarks (tables on stdout, JSON in bench/results/)

bench-train: $(VENV)/.ready ## Train every architecture on the full data set
	$(PY) -m bench.train

clean: ## Remove local state (MLflow data, caches in the checkout)
	rm -rf $(STATE_DIR) .mypy_cache .ruff_cache .pytest_cache
