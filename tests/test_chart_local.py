"""The laptop path: skaffold.yaml, the kind config, the kube-prometheus-stack and ingress values, and
manifests/values-local.yaml agree with the chart and with each other.

skaffold, kind and the two upstream charts cannot run here (no Docker, no registry), so these tests
hold the references between the files: a renamed value, Service, label or Dockerfile breaks a test
instead of `make kind-up` or `skaffold dev` on someone's laptop.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mnist_operator.builders import training_labels
from serving.schemas import PredictRequest
from tests.fixtures_chart import CHART_DIR, NAMESPACE, RELEASE, Helm, parse_documents

REPO_ROOT = CHART_DIR.parent.parent
MANIFESTS = REPO_ROOT / "manifests"
VALUES_LOCAL = MANIFESTS / "values-local.yaml"


def load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict), path
    return loaded


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} is not a chart value"
        node = node[part]
    return node


@pytest.fixture(scope="module")
def local(helm: Helm) -> list[dict[str, Any]]:
    return parse_documents(helm.template([VALUES_LOCAL]).stdout)


def test_values_local_lints_and_renders_the_laptop_setup(helm: Helm, local: list[dict[str, Any]]) -> None:
    proc = helm.run(
        ["lint", "--strict", str(CHART_DIR), "--namespace", NAMESPACE, "--values", str(VALUES_LOCAL)]
    )
    assert "0 chart(s) failed" in proc.stdout
    ingress = next(doc for doc in local if doc["kind"] == "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["rules"][0]["host"] == "mnist.localhost"
    trainingrun = next(doc for doc in local if doc["kind"] == "TrainingRun")
    assert trainingrun["metadata"]["name"] == "mnist-first-run"
    images = {
        container["image"]
        for doc in local
        if doc["kind"] == "Deployment"
        for container in doc["spec"]["template"]["spec"]["containers"]
    }
    assert {"mnist-mlops/serving:dev", "mnist-mlops/operator:dev"} <= images


def test_skaffold_builds_every_dockerfile_and_sets_existing_values() -> None:
    skaffold = load(REPO_ROOT / "skaffold.yaml")
    assert skaffold["apiVersion"].startswith("skaffold/v4")
    artifacts = {a["image"]: a for a in skaffold["build"]["artifacts"]}
    assert set(artifacts) == {"mnist-mlops/training", "mnist-mlops/serving", "mnist-mlops/operator"}
    for artifact in artifacts.values():
        assert (REPO_ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]).is_file()

    values = load(CHART_DIR / "values.yaml")
    (release,) = skaffold["deploy"]["helm"]["releases"]
    assert (REPO_ROOT / release["chartPath"] / "Chart.yaml").is_file()
    assert release["name"] == RELEASE and release["namespace"] == NAMESPACE
    for values_file in release["valuesFiles"]:
        assert (REPO_ROOT / values_file).is_file()
    templated = release["setValueTemplates"]
    for key, template in templated.items():
        lookup(values, key)
        image = re.fullmatch(r"\{\{\.IMAGE_(REPO|TAG)_([a-z_]+)\}\}", template)
        assert image, f"{key}: {template}"
        # skaffold's template variables name the artifact with non-alphanumerics as underscores.
        assert image.group(2) in {re.sub(r"[^a-zA-Z0-9]", "_", name) for name in artifacts}
        assert key.endswith(".repository" if image.group(1) == "REPO" else ".tag")
    # Every image the chart references is one skaffold builds, so none is left at a stale tag.
    repositories = {lookup(values, key) for key in templated if key.endswith(".repository")}
    assert repositories == set(artifacts)


def test_skaffold_port_forwards_name_rendered_services(local: list[dict[str, Any]]) -> None:
    skaffold = load(REPO_ROOT / "skaffold.yaml")
    services = {doc["metadata"]["name"]: doc for doc in local if doc["kind"] == "Service"}
    forwarded = set()
    for forward in skaffold["portForward"]:
        assert forward["address"] == "127.0.0.1"
        service = services[forward["resourceName"]]
        assert forward["port"] in {p["port"] for p in service["spec"]["ports"]}
        forwarded.add(forward["localPort"])
    assert forwarded == {8000, 5000}
    contexts = {p["name"]: p["activation"][0]["kubeContext"] for p in skaffold["profiles"]}
    kind_name = load(MANIFESTS / "kind-config.yaml")["name"]
    assert contexts == {"kind": f"kind-{kind_name}", "minikube": "minikube"}


def test_kind_cluster_publishes_the_ingress_ports_on_loopback() -> None:
    kind = load(MANIFESTS / "kind-config.yaml")
    (node,) = kind["nodes"]
    mappings = {(m["containerPort"], m["hostPort"], m["listenAddress"]) for m in node["extraPortMappings"]}
    assert mappings == {(80, 80, "127.0.0.1"), (443, 443, "127.0.0.1")}
    assert 'node-labels: "ingress-ready=true"' in node["kubeadmConfigPatches"][0]
    ingress = load(MANIFESTS / "ingress-nginx-values.yaml")["controller"]
    assert ingress["nodeSelector"] == {"ingress-ready": "true"}
    assert ingress["hostPort"]["enabled"] is True
    assert ingress["ingressClassResource"]["name"] == lookup(load(VALUES_LOCAL), "serving.ingress.className")


def test_monitoring_stack_loads_the_dashboard_and_selects_the_chart(local: list[dict[str, Any]]) -> None:
    stack = load(MANIFESTS / "kube-prometheus-stack-values.yaml")
    spec = stack["prometheus"]["prometheusSpec"]
    # With these false, Prometheus ignores objects lacking the stack's release label.
    assert spec["serviceMonitorSelectorNilUsesHelmValues"] is False
    assert spec["ruleSelectorNilUsesHelmValues"] is False
    sidecar = stack["grafana"]["sidecar"]["dashboards"]
    dashboard = next(
        doc for doc in local if doc["kind"] == "ConfigMap" and "mnist-serving.json" in doc["data"]
    )
    assert dashboard["metadata"]["labels"][sidecar["label"]] == sidecar["labelValue"]
    assert sidecar["folderAnnotation"] in dashboard["metadata"]["annotations"]
    assert sidecar["searchNamespace"] == "ALL"


def test_failed_training_alert_sees_the_operators_job_labels(local: list[dict[str, Any]]) -> None:
    """The alert joins kube_job_labels on labels kube-state-metrics exports only when allowlisted."""
    stack = load(MANIFESTS / "kube-prometheus-stack-values.yaml")
    (allow,) = stack["kube-state-metrics"]["metricLabelsAllowlist"]
    resource, _, labels = allow.partition("=")
    assert resource == "jobs"
    allowed = set(labels.strip("[]").split(","))
    rule = next(doc for doc in local if doc["kind"] == "PrometheusRule")
    alert = next(
        r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "MnistTrainingJobFailed"
    )
    used = set(re.findall(r"label_([a-z0-9_]+)", alert["expr"]))
    job_labels = training_labels("some-run")
    for label in allowed:
        assert label in job_labels, f"the operator does not set {label} on training Jobs"
    spelled = {re.sub(r"[^a-zA-Z0-9]", "_", label): label for label in allowed}
    for name in used:
        assert name in spelled, f"label_{name} is not in the kube-state-metrics allowlist"
        if f'label_{name}="' in alert["expr"]:
            value = re.search(rf'label_{name}="([^"]*)"', alert["expr"])
            assert value and job_labels[spelled[name]] == value.group(1)


def test_sample_digit_is_a_valid_request() -> None:
    body = json.loads((MANIFESTS / "sample-digit.json").read_text())
    PredictRequest.model_validate(body)
