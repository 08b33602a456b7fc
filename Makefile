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
# Only the operator image's requirements: the operator benchmark measures memory on what ships.
OPERATOR_VENV ?= $(CACHE_DIR)/operator-$(shell sha256sum requirements/operator.txt | cut -c1-12)
PY := $(VENV)/bin/python
# The packages are installable (each image pip-installs its own: contract/, training_job/, serving/,
# operator/), but the development virtualenv is shared by every checkout with the same requirements, so
# an editable install would point at whichever checkout ran last. The source roots go on the path here
# instead, once; pytest's `pythonpath` setting in pyproject.toml says the same for in-process imports.
export PYTHONPATH := $(CURDIR):$(CURDIR)/operator
export MNIST_MLOPS_CACHE := $(CACHE_DIR)
STATE_DIR ?= $(CURDIR)/.state
KIND_CLUSTER ?= mnist-mlops
IMAGE_TAG ?= dev
K8S_NAMESPACE ?= mnist-mlops
RELEASE ?= mnist-mlops
PYTEST_ARGS ?=

.PHONY: help venv system-deps demo test lint bench bench-train bench-workers bench-serve bench-operator bench-drift k8s-tools clean
.PHONY: kind-up images deploy port-forward undeploy cluster-up cluster-down prerequisites
.PHONY: check audit chart-readme grpc-stubs

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# One recipe for every virtualenv: $(call make_venv,DIR,REQUIREMENTS). flock, because several make
# processes (parallel shells, CI) may ask for the same virtualenv at once; `.ready` is written last, so
# an interrupted install is redone rather than half-used.
define make_venv
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 ($(PYTHON)) is required" >&2; exit 1; }
	mkdir -p $(CACHE_DIR)
	flock $(1).lock bash -euo pipefail -c '\
		test -f $(1)/.ready && exit 0; \
		$(PYTHON) -m venv $(1); \
		$(1)/bin/pip install --quiet --upgrade pip; \
		$(1)/bin/pip install --quiet -r $(2); \
		touch $(1)/.ready'
endef

$(VENV)/.ready: requirements/*.txt
	$(call make_venv,$(VENV),requirements/dev.txt)

$(CHECKOV_VENV)/.ready: requirements/checkov.txt
	$(call make_venv,$(CHECKOV_VENV),requirements/checkov.txt)

$(OPERATOR_VENV)/.ready: requirements/operator.txt
	$(call make_venv,$(OPERATOR_VENV),requirements/operator.txt)

venv: $(VENV)/.ready ## Create or reuse the project virtualenv
	@echo "virtualenv: $(VENV)"

k8s-tools: ## Build (once, cached) kube-apiserver, kube-controller-manager, etcd and helm
	bash scripts/build-k8s-tools.sh

demo: $(VENV)/.ready ## Run the whole pipeline locally: MLflow, the experiment, promotion, serving
	$(PY) -m local_mode --state-dir $(STATE_DIR)

.PHONY: demo-loop
demo-loop: $(VENV)/.ready ## The closed loop once, small: drifted traffic and labels, the drift alert, retraining, the gate
	$(PY) -m local_mode --loop --state-dir $(STATE_DIR)

system-deps: ## Debian packages the tests drive (chromium, prometheus, wrk); installs only what is missing
	bash scripts/install-system-deps.sh

# The Go build is CPU-bound and the image builds mostly wait on downloads, so they run side by
# side; both are cached by content and take seconds when nothing changed.
prerequisites: system-deps ## Build (or find cached) the Kubernetes binaries and the images, side by side
	mkdir -p $(CACHE_DIR)/logs
	bash scripts/build-k8s-tools.sh >$(CACHE_DIR)/logs/k8s-tools.out 2>$(CACHE_DIR)/logs/k8s-tools.log & tools=$$!; \
	bash scripts/build-images.sh >$(CACHE_DIR)/logs/images.out 2>$(CACHE_DIR)/logs/images.log & images=$$!; \
	status=0; \
	wait $$tools || { status=1; echo "building the Kubernetes binaries failed:" >&2; tail -n 40 $(CACHE_DIR)/logs/k8s-tools.log >&2; }; \
	wait $$images || { status=1; echo "building the images failed:" >&2; tail -n 40 $(CACHE_DIR)/logs/images.log >&2; }; \
	exit $$status

# The virtualenvs (mostly downloads) and the binaries and images (mostly CPU) are made side by side.
test: ## Lint, type checks and the whole suite against real components (a real node included)
	$(MAKE) --no-print-directory -j3 $(VENV)/.ready $(CHECKOV_VENV)/.ready prerequisites
	$(MAKE) --no-print-directory lint
	MNIST_MLOPS_K8S_BIN="$$(bash scripts/build-k8s-tools.sh | tail -n 1)" \
	CHECKOV="$(CHECKOV_VENV)/bin/checkov" \
		$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.ready ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The inner loop: lint, type checks (mypy's incremental cache) and the unit tests that need no cluster,
# no training, no browser and no network (the audit's own logic included, its PyPI queries not).
# scripts/ is type-checked on its own: with PYTHONPATH exported, mypy silences what only tests import.
CHECK_TESTS := tests/contract/test_spec_and_policy.py tests/serving/test_preprocess.py tests/serving/test_explain.py \
	tests/mnist_operator/test_units.py tests/mnist_operator/test_registry_units.py tests/mnist_operator/test_progressive_units.py tests/training/test_data.py tests/images/test_audit.py \
	tests/chart/test_readme.py tests/serving/test_grpc.py::test_checked_in_stubs_match_the_protos tests/bench/test_serve_summary.py
check: $(VENV)/.ready ## Fast inner loop, <2 min warm: ruff, format, mypy, unit tests needing no cluster/training/browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q $(CHECK_TESTS) -k 'not requirement_set_has and not ignore_entries_are' $(PYTEST_ARGS)

chart-readme: $(VENV)/.ready ## Regenerate charts/mnist-mlops/README.md from the comments in values.yaml
	$(PY) scripts/chart_readme.py

# Checked in, so the images need no protoc; tests/serving/test_grpc.py reruns this line into a temporary
# directory and compares.
grpc-stubs: $(VENV)/.ready ## Regenerate serving/grpc's Python modules (messages, .pyi, services) from its .proto files
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. serving/grpc/health.proto serving/grpc/inference.proto

# `make test` runs the same audit as tests/test_audit.py, where an unaudited package is a warning.
audit: $(VENV)/.ready $(CHECKOV_VENV)/.ready ## Known vulnerabilities in every requirements/*.txt set (strict; ignores: requirements/audit-ignore.conf)
	CHECKOV="$(CHECKOV_VENV)/bin/checkov" $(PY) scripts/audit_requirements.py --strict

bench: bench-train bench-serve bench-operator bench-drift ## All benchmarks (tables on stdout, JSON in bench/results/)

bench-train: $(VENV)/.ready ## Train every architecture on the full data set
	$(PY) -m bench.train

bench-workers: $(VENV)/.ready ## The champion trained by 1, then 2 local workers on the full data: wall time, accuracy
	$(PY) -m bench.train --workers-comparison

# BENCH_ARGS: e.g. `--quick --output /tmp/serve.json` for a smoke run (a busy machine's figures are not results).
bench-serve: $(VENV)/.ready system-deps ## Ours vs MLServer, KServe, `mlflow models serve` (ONNX, Keras), each alone, one worker; wrk/ghz
	$(PY) -m bench.serve $(BENCH_ARGS)

bench-operator: $(VENV)/.ready $(OPERATOR_VENV)/.ready ## Operator: apply → Job latency, 1,000 TrainingRuns in 10 namespaces, writes per run, RSS
	MNIST_MLOPS_K8S_BIN="$$(bash scripts/build-k8s-tools.sh | tail -n 1)" $(PY) -m bench.operator --python $(OPERATOR_VENV)/bin/python

# Trains (once, cached) the baseline CNN unless BENCH_ARGS names a model: `--model path.onnx`.
bench-drift: $(VENV)/.ready ## Drift detection: false-alarm rate on undrifted MNIST windows, power on shifted ones
	$(PY) -m bench.drift $(BENCH_ARGS)

clean: ## Remove local state (MLflow data, caches in the checkout)
	rm -rf $(STATE_DIR) .mypy_cache .ruff_cache .pytest_cache

# ---- This machine as a one-node cluster (Linux, root; see README "On this machine, without kind") ----

cluster-up: $(VENV)/.ready prerequisites ## Start a real one-node cluster here (kubelet on containerd); prints KUBECONFIG
	$(PY) -m testing.cluster up --state-dir $(STATE_DIR)/cluster

cluster-down: $(VENV)/.ready ## Stop the cluster that cluster-up started and remove its pods, routes and rules
	$(PY) -m testing.cluster down --state-dir $(STATE_DIR)/cluster

# ---- The cluster path (a laptop with docker, kind, kubectl and helm; see README "On a cluster") ----

kind-up: ## Create the kind cluster with ingress-nginx, metrics-server and kube-prometheus-stack
	kind get clusters | grep -qx '$(KIND_CLUSTER)' || kind create cluster --config manifests/kind-config.yaml
	helm upgrade --install metrics-server metrics-server --repo https://kubernetes-sigs.github.io/metrics-server/ \
		--namespace kube-system -f manifests/metrics-server-values.yaml --wait --timeout 5m
	helm upgrade --install ingress-nginx ingress-nginx --repo https://kubernetes.github.io/ingress-nginx \
		--namespace ingress-nginx --create-namespace -f manifests/ingress-nginx-values.yaml --wait --timeout 10m
	helm upgrade --install monitoring kube-prometheus-stack --repo https://prometheus-community.github.io/helm-charts \
		--namespace monitoring --create-namespace -f manifests/kube-prometheus-stack-values.yaml --wait --timeout 15m

# Where `make images` puts the images: kind (the default when kind is installed and the cluster
# exists), local (the containerd at SOCK, in the CRI's k8s.io namespace) or none (docker only).
NODE ?= $(shell command -v kind >/dev/null 2>&1 && kind get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' && echo kind || echo none)
SOCK ?= /run/containerd/containerd.sock
KIND_IMAGES := training serving operator mlflow

images: ## Build every image, cached by content (scripts/build-images.sh); NODE=kind|local|none: load into kind (default if the cluster exists), or SOCK's containerd, or neither
	case '$(NODE)' in \
	kind) bash scripts/build-images.sh; \
		for image in $(KIND_IMAGES); do docker tag "mnist-mlops/$$image:dev" "mnist-mlops/$$image:$(IMAGE_TAG)"; done; \
		kind load docker-image --name '$(KIND_CLUSTER)' $(foreach image,$(KIND_IMAGES),mnist-mlops/$(image):$(IMAGE_TAG)) ;; \
	local) bash scripts/build-images.sh --import-into '$(SOCK)' ;; \
	none) bash scripts/build-images.sh ;; \
	*) echo "NODE=$(NODE): use kind, local or none" >&2; exit 2 ;; \
	esac

# No `helm --wait`: serving turns ready only once a model is promoted, so wait on the TrainingRun instead;
# the wait stops with the operator's reason as soon as the run is Rejected, RolledBack or Failed.
# Helm never upgrades CRDs: apply them first, server-side, taking over fields an earlier client-side
# apply or `helm install` owned (--force-conflicts), so a changed CRD reaches the cluster.
deploy: ## Install the chart into a restricted namespace and wait for the first model to be served
	kubectl create namespace '$(K8S_NAMESPACE)' --dry-run=client -o yaml | kubectl apply -f -
	kubectl label namespace '$(K8S_NAMESPACE)' --overwrite \
		pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted
	kubectl apply --server-side --force-conflicts -f charts/mnist-mlops/crds/
	helm upgrade --install '$(RELEASE)' charts/mnist-mlops --namespace '$(K8S_NAMESPACE)' \
		-f manifests/values-local.yaml --set operator.image.tag=$(IMAGE_TAG) \
		--set operator.training.image.tag=$(IMAGE_TAG) --set serving.image.tag=$(IMAGE_TAG)
	kubectl -n '$(K8S_NAMESPACE)' rollout status deployment/$(RELEASE)-mlflow --timeout=10m
	kubectl -n '$(K8S_NAMESPACE)' rollout status deployment/$(RELEASE)-operator --timeout=5m
	bash scripts/wait-trainingrun.sh '$(K8S_NAMESPACE)' mnist-first-run 1800
	kubectl -n '$(K8S_NAMESPACE)' rollout status deployment/$(RELEASE)-serving --timeout=10m

port-forward: ## Serving on 127.0.0.1:8000, MLflow on :5000, Grafana on :3000 (Ctrl-C stops all three)
	trap 'kill 0' EXIT; \
	kubectl -n '$(K8S_NAMESPACE)' port-forward service/$(RELEASE)-serving 8000:80 & \
	kubectl -n '$(K8S_NAMESPACE)' port-forward service/$(RELEASE)-mlflow 5000:5000 & \
	kubectl -n monitoring port-forward service/monitoring-grafana 3000:80 & \
	wait

undeploy: ## Uninstall the chart and delete its namespace (and with it the MLflow volume)
	-helm uninstall '$(RELEASE)' --namespace '$(K8S_NAMESPACE)' --wait
	kubectl delete namespace '$(K8S_NAMESPACE)' --ignore-not-found
