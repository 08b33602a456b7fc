"""Fixtures for the Helm chart's tests: the real helm binary and every ci/ scenario rendered once.

Rendering is the slow part of most chart tests and its output never changes within a session, so
each ci/*-values.yaml scenario is rendered exactly once and shared by the lint, schema, dry-run,
checkov and monitoring tests.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testing.controlplane import BIN_ENV_VAR, locate_binaries

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


@pytest.fixture(scope="session")
def helm() -> Iterator[Helm]:
    with tempfile.TemporaryDirectory(prefix="mnist-helm-") as home:
        yield Helm(helm_binary(), Path(home))


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, Rendered]:
    """Every ci/ scenario rendered once for the session, keyed by scenario name."""
    assert SCENARIOS, f"no ci/*-values.yaml scenarios in {CI_DIR}"
    result: dict[str, Rendered] = {}
    for scenario in SCENARIOS:
        text = helm.template([values_file(scenario)]).stdout
        result[scenario] = Rendered(scenario, text, parse_documents(text))
    return result


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


KUBECTL = os.environ.get("KUBECTL", "/usr/bin/kubectl")
KUBECTL_TIMEOUT_SECONDS = 120.0


def kubectl(
    env: dict[str, str], *args: str, manifest: str | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """kubectl against the test control plane (env from ControlPlane.env())."""
    proc = subprocess.run(
        [KUBECTL, *args],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT_SECONDS,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


# Stand-ins for prometheus-operator's ServiceMonitor and PrometheusRule CRDs, so the API server
# accepts (and checks) those objects in tests. Not the upstream CRDs: they type only the fields
# this chart sets, keep everything else (x-kubernetes-preserve-unknown-fields), and say so in
# their annotations. A real cluster gets the real ones from kube-prometheus-stack.
STAND_IN_CRDS = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
  annotations:
    mnist-mlops.io/stand-in: "test stand-in for prometheus-operator's CRD; not the upstream schema"
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names:
    kind: ServiceMonitor
    listKind: ServiceMonitorList
    plural: servicemonitors
    singular: servicemonitor
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [selector, endpoints]
              x-kubernetes-preserve-unknown-fields: true
              properties:
                selector:
                  type: object
                  properties:
                    matchLabels: {type: object, additionalProperties: {type: string}}
                namespaceSelector:
                  type: object
                  properties:
                    any: {type: boolean}
                    matchNames: {type: array, items: {type: string}}
                endpoints:
                  type: array
                  minItems: 1
                  items:
                    type: object
                    x-kubernetes-preserve-unknown-fields: true
                    properties:
                      port: {type: string}
                      path: {type: string, pattern: "^/"}
                      interval: &duration
                        type: string
                        pattern: "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"
                      scrapeTimeout: *duration
                      relabelings: &relabel
                        type: array
                        items:
                          type: object
                          properties:
                            sourceLabels:
                              type: array
                              items: {type: string, pattern: "^[a-zA-Z_][a-zA-Z0-9_]*$"}
                            targetLabel: {type: string}
                            regex: {type: string}
                            replacement: {type: string}
                            separator: {type: string}
                            modulus: {type: integer}
                            action:
                              type: string
                              enum: [replace, Replace, keep, Keep, drop, Drop, hashmod, HashMod,
                                     labelmap, LabelMap, labeldrop, LabelDrop, labelkeep, LabelKeep,
                                     lowercase, Lowercase, uppercase, Uppercase, keepequal, KeepEqual,
                                     dropequal, DropEqual]
                      metricRelabelings: *relabel
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: prometheusrules.monitoring.coreos.com
  annotations:
    mnist-mlops.io/stand-in: "test stand-in for prometheus-operator's CRD; not the upstream schema"
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names:
    kind: PrometheusRule
    listKind: PrometheusRuleList
    plural: prometheusrules
    singular: prometheusrule
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                groups:
                  type: array
                  items:
                    type: object
                    required: [name, rules]
                    properties:
                      name: {type: string, minLength: 1}
                      interval: {type: string}
                      rules:
                        type: array
                        items:
                          type: object
                          required: [expr]
                          properties:
                            alert: {type: string}
                            record: {type: string}
                            expr: {x-kubernetes-int-or-string: true}
                            for: {type: string}
                            keep_firing_for: {type: string}
                            labels: {type: object, additionalProperties: {type: string}}
                            annotations: {type: object, additionalProperties: {type: string}}
"""
