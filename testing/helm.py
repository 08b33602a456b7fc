"""Helm as the tests and the harness use it: the built helm binary with its state kept out of the
developer's home, the chart's ci/ scenarios rendered and parsed, and selectors matched the way the
API server matches them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testing.controlplane import BIN_ENV_VAR, locate_binaries
from testing.upstream import keda_crds, module_file, prometheus_operator_crds

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = REPO_ROOT / "charts" / "mnist-mlops"
CI_DIR = CHART_DIR / "ci"
CRD_PATH = CHART_DIR / "crds" / "trainingruns.mnist-mlops.io.yaml"

# Release and namespace every scenario is rendered for: with the release named like the chart,
# resources are called mnist-mlops-serving, mnist-mlops-mlflow, ... as in the README.
RELEASE = "mnist-mlops"
NAMESPACE = "mnist-mlops"

HELM_TIMEOUT_SECONDS = 120.0

SCENARIOS: tuple[str, ...] = tuple(
    sorted(path.name.removesuffix("-values.yaml") for path in CI_DIR.glob("*-values.yaml"))
)


def helm_env(home: Path) -> dict[str, str]:
    """helm's own state (repositories, caches, plugins) kept out of the developer's home."""
    env = dict(os.environ)
    env["HELM_CACHE_HOME"] = str(home / "cache")
    env["HELM_CONFIG_HOME"] = str(home / "config")
    env["HELM_DATA_HOME"] = str(home / "data")
    return env


def run_helm(
    helm: Path, args: Sequence[str], home: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(helm), *args],
        capture_output=True,
        text=True,
        timeout=HELM_TIMEOUT_SECONDS,
        env=helm_env(home),
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def values_file(scenario: str) -> Path:
    return CI_DIR / f"{scenario}-values.yaml"


@dataclass(frozen=True)
class Rendered:
    """One scenario's `helm template` output, as text and as parsed documents."""

    scenario: str
    text: str
    documents: list[dict[str, Any]] = field(repr=False)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.documents if doc["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [doc for doc in self.of_kind(kind) if name is None or doc["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.scenario}: expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def values(self) -> dict[str, Any]:
        loaded = yaml.safe_load(values_file(self.scenario).read_text())
        return loaded if isinstance(loaded, dict) else {}


def parse_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@dataclass(frozen=True)
class Helm:
    binary: Path
    home: Path

    def template(
        self,
        values: Sequence[Path] = (),
        set_values: Sequence[str] = (),
        namespace: str = NAMESPACE,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["template", RELEASE, str(CHART_DIR), "--namespace", namespace]
        for path in values:
            args += ["--values", str(path)]
        for item in set_values:
            args += ["--set", item]
        return run_helm(self.binary, args, self.home, check=check)

    def run(self, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_helm(self.binary, args, self.home, check=check)


def helm_binary() -> Path:
    if os.environ.get(BIN_ENV_VAR):
        return Path(os.environ[BIN_ENV_VAR]) / "helm"
    return locate_binaries() / "helm"


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod template(s) of a workload object; empty for kinds that run no pods."""
    kind = doc["kind"]
    spec = doc.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [spec["template"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]]
    if kind == "Pod":
        return [{"metadata": doc.get("metadata", {}), "spec": spec}]
    return []


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels and matchExpressions); {} matches everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


# The custom resources the chart renders beside its own are checked against their real CRDs:
# prometheus-operator's ServiceMonitor and PrometheusRule, the Gateway API's HTTPRoute and KEDA's
# ScaledObject, fetched at test time into the Go module cache (testing/upstream.py); no upstream file is
# in this repository.
GATEWAY_API = ("sigs.k8s.io/gateway-api", "v1.5.1")
GATEWAY_API_CRDS = {"HTTPRoute": "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml"}


def upstream_crd_files() -> list[Path]:
    module, version = GATEWAY_API
    gateway = [module_file(module, version, relative) for relative in GATEWAY_API_CRDS.values()]
    return [*prometheus_operator_crds(), *gateway, *keda_crds()]
