"""The laptop path: skaffold.yaml, the kind config, the kube-prometheus-stack and ingress values, and
manifests/values-local.yaml agree with the chart and with each other.

skaffold, kind and the two upstream charts cannot run here (no Docker, no registry), so these tests
hold the references between the files: a renamed value, Service, label or Dockerfile breaks a test
instead of `make kind-up` or `skaffold dev` on someone's laptop.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mnist_operator.builders import training_labels
from serving.schemas import PredictRequest
from testing.controlplane import ControlPlane
from testing.helm import CHART_DIR, NAMESPACE, RELEASE, Helm, parse_documents
from testing.kubectl import kubectl, kubectl_ok
from testing.operator_harness import create_namespace

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


def _names(text: str) -> set[str]:
    return set(text.split())


# The latest skaffold config schema (skaffold v2.19) and the fields of it this file may use: a
# misspelt or misplaced key is an error for skaffold, which cannot be built here to say so.
SKAFFOLD_SCHEMA = "skaffold/v4beta14"
SKAFFOLD_FIELDS: dict[str, set[str]] = {
    "": _names(
        "apiVersion kind metadata requires build test manifests deploy verify customActions "
        "portForward resourceSelector profiles"
    ),
    "build": _names("artifacts insecureRegistries tagPolicy platforms local googleCloudBuild cluster"),
    "build.local": _names("push tryImportMissing useDockerCLI useBuildkit concurrency"),
    "build.artifacts[]": _names(
        "image context sync platforms runtimeType requires hooks docker bazel jib kaniko buildpacks custom ko"
    ),
    "build.artifacts[].docker": _names(
        "dockerfile target buildArgs network addHost cacheFrom cliFlags pullParent noCache cacheTag "
        "secrets ssh"
    ),
    "deploy": _names(
        "docker helm kpt kubectl cloudrun statusCheck statusCheckDeadlineSeconds "
        "tolerateFailuresUntilDeadline kubeContext logs transformableAllowList"
    ),
    "deploy.helm": _names("releases flags hooks concurrency"),
    "deploy.helm.releases[]": _names(
        "name chartPath remoteChart valuesFiles namespace version setValues setValueTemplates "
        "setFiles createNamespace wait recreatePods skipBuildDependencies skipTests useHelmSecrets "
        "repo upgradeOnChange overrides packaged dependsOn"
    ),
    "portForward[]": _names("resourceType resourceName namespace port address localPort"),
    "profiles[]": _names(
        "name activation requiresAllActivations patches build test manifests deploy verify "
        "customActions portForward resourceSelector"
    ),
}


def _fields_at(document: dict[str, Any], path: str) -> list[set[str]]:
    nodes: list[Any] = [document]
    for part in filter(None, path.split(".")):
        key, many = part.removesuffix("[]"), part.endswith("[]")
        nodes = [node[key] for node in nodes if isinstance(node, dict) and key in node]
        if many:
            nodes = [item for node in nodes for item in node]
    return [set(node) for node in nodes if isinstance(node, dict)]


def test_skaffold_config_is_the_latest_schema_with_known_fields() -> None:
    skaffold = load(REPO_ROOT / "skaffold.yaml")
    assert skaffold["apiVersion"] == SKAFFOLD_SCHEMA and skaffold["kind"] == "Config"
    for path, allowed in SKAFFOLD_FIELDS.items():
        for fields in _fields_at(skaffold, path):
            assert fields <= allowed, f"skaffold.yaml {path or '(top)'}: unknown {sorted(fields - allowed)}"
    for profile in skaffold["profiles"]:
        for patch in profile.get("patches", []):
            assert patch["op"] in {"add", "remove", "replace", "move", "copy", "test"}
            assert patch["path"].startswith("/"), patch


def test_skaffold_builds_every_dockerfile_and_sets_existing_values() -> None:
    skaffold = load(REPO_ROOT / "skaffold.yaml")
    assert skaffold["apiVersion"] == SKAFFOLD_SCHEMA
    every = {a["image"]: a for a in skaffold["build"]["artifacts"]}
    for artifact in every.values():
        assert (REPO_ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]).is_file()
    # The shared Python bases are built first and reach the app images as build arguments.
    bases = {required["image"] for a in every.values() for required in a.get("requires", [])}
    assert bases == {"mnist-mlops/python-builder", "mnist-mlops/python-runtime"}
    artifacts = {name: a for name, a in every.items() if name not in bases}
    assert set(artifacts) == {"mnist-mlops/training", "mnist-mlops/serving", "mnist-mlops/operator"}
    for artifact in artifacts.values():
        aliases = {required["alias"] for required in artifact["requires"]}
        assert aliases == {"BUILDER_IMAGE", "RUNTIME_IMAGE"}, artifact
        assert f"ARG {aliases.pop()}" in (REPO_ROOT / artifact["docker"]["dockerfile"]).read_text()

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


# --- make deploy's wait for the first TrainingRun ------------------------------------------------

WAIT_SCRIPT = REPO_ROOT / "scripts" / "wait-trainingrun.sh"


def _wait(plane: ControlPlane, namespace: str, name: str, timeout: int) -> subprocess.Popen[str]:
    # plane.env() puts the built kubectl first on PATH, which the script runs as plain `kubectl`.
    env = {**plane.env(), "WAIT_INTERVAL_SECONDS": "0.2"}
    return subprocess.Popen(
        ["bash", str(WAIT_SCRIPT), namespace, name, str(timeout)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _set_status(plane: ControlPlane, namespace: str, name: str, status: dict[str, Any]) -> None:
    kubectl_ok(
        plane, "patch", "trainingrun", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def test_wait_script_fails_fast_with_the_reason_and_passes_on_promotion(
    control_plane: ControlPlane, crd_installed: None
) -> None:
    """scripts/wait-trainingrun.sh against the real API server, the status set as the operator would."""
    namespace = create_namespace(control_plane, f"wait-{uuid.uuid4().hex[:6]}", restricted=False)
    runs = [
        {
            "apiVersion": "mnist-mlops.io/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {},
        }
        for name in ("failing", "promoted", "stuck")
    ]
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=runs)
    try:
        # Waiting on a run that is still training, then fails: the script sees it within a poll.
        _set_status(control_plane, namespace, "failing", {"phase": "Training", "message": "training"})
        waiting = _wait(control_plane, namespace, "failing", timeout=600)
        time.sleep(1.5)
        assert waiting.poll() is None, waiting.communicate()
        started = time.monotonic()
        reason = "pod failing-train-x exited with code 4: error: bad training data: no such file"
        _set_status(
            control_plane,
            namespace,
            "failing",
            {
                "phase": "Failed",
                "message": f"training failed: PodFailurePolicy; {reason}",
                "conditions": [
                    {"type": "JobCreated", "status": "True", "reason": "Created", "message": "created Job",
                     "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "Trained", "status": "False", "reason": "PodFailurePolicy", "message": reason,
                     "lastTransitionTime": "2026-01-01T00:00:00Z"},
                ],
            },
        )  # fmt: skip
        _, stderr = waiting.communicate(timeout=60)
        assert waiting.returncode == 1, stderr
        assert time.monotonic() - started < 30, "it should fail within a poll, not at the timeout"
        assert "ended Failed: training failed: PodFailurePolicy" in stderr
        assert f"Trained=False (PodFailurePolicy): {reason}" in stderr

        _set_status(control_plane, namespace, "promoted", {"phase": "Promoted", "message": "serving"})
        proc = _wait(control_plane, namespace, "promoted", timeout=60)
        assert proc.wait(60) == 0, proc.communicate()

        _set_status(control_plane, namespace, "stuck", {"phase": "Training", "message": "training"})
        proc = _wait(control_plane, namespace, "stuck", timeout=2)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "timed out after 2s" in stderr and "phase: Training" in stderr

        proc = _wait(control_plane, namespace, "never-created", timeout=1)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "NotFound" in stderr, stderr
    finally:
        kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


# --- make kind-up ---------------------------------------------------------------------------------


def test_kind_up_installs_metrics_server_for_the_hpa() -> None:
    """kind's kubelets serve self-signed certificates: metrics-server must skip their verification,
    or it reports no CPU and the HPA never scales."""
    values = load(MANIFESTS / "metrics-server-values.yaml")
    assert "--kubelet-insecure-tls" in values["args"]
    makefile = (REPO_ROOT / "Makefile").read_text()
    kind_up = makefile.split("\nkind-up:", 1)[1].split("\n\n", 1)[0]
    assert "metrics-server" in kind_up and "-f manifests/metrics-server-values.yaml" in kind_up
    assert lookup(load(CHART_DIR / "values.yaml"), "serving.autoscaling.enabled") is True


# --- arm64 laptops: the training requirements have aarch64 wheels -------------------------------

TRAINING_REQUIREMENTS = REPO_ROOT / "requirements" / "training.txt"
# What `pip install -r requirements/training.txt` sees inside a linux/arm64 training image.
AARCH64_LINUX = {
    "implementation_name": "cpython",
    "os_name": "posix",
    "platform_machine": "aarch64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.11.13",
    "python_version": "3.11",
    "sys_platform": "linux",
}
# The training image's glibc (python:3.11-slim-bookworm: 2.36) accepts every manylinux tag up to it;
# pip takes --platform tags literally, so each is named.
AARCH64_PLATFORMS = ["manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37))]


def _pins_for(environment: dict[str, str]) -> dict[str, str]:
    pins = {}
    for raw in TRAINING_REQUIREMENTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{line}: the image's requirements are exact pins"
            pins[requirement.name] = specifier.version
    return pins


def test_training_requirements_pick_tensorflow_per_architecture() -> None:
    x86 = _pins_for({**AARCH64_LINUX, "platform_machine": "x86_64"})
    arm = _pins_for(AARCH64_LINUX)
    assert "tensorflow-cpu" in x86 and "tensorflow" not in x86
    assert "tensorflow" in arm and "tensorflow-cpu" not in arm
    # The same TensorFlow either way, and the same everything else.
    assert x86.pop("tensorflow-cpu") == arm.pop("tensorflow")
    assert x86 == arm


def test_training_requirements_have_aarch64_wheels(tmp_path: Path) -> None:
    """Every pin, as a linux/arm64 image resolves it, has a cp311 aarch64 (or pure-Python) wheel on
    the index: one pip resolution in report mode (--dry-run, metadata only), not one per package.
    The markers are evaluated here for aarch64, since pip evaluates them for the machine it runs on."""
    pins = _pins_for(AARCH64_LINUX)
    requirements = tmp_path / "aarch64.txt"
    requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    report = tmp_path / "report.json"
    platforms = [argument for tag in AARCH64_PLATFORMS for argument in ("--platform", tag)]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
         "--target", str(tmp_path / "target"), *platforms, "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
         "--abi", "none", "--report", str(report), "--quiet", "--requirement", str(requirements)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"a pin has no aarch64 wheel for CPython 3.11:\n{proc.stderr[-3000:]}"
    found = {
        canonicalize_name(item["metadata"]["name"]): (
            item["metadata"]["version"],
            item["download_info"]["url"].rsplit("/", 1)[-1],
        )
        for item in json.loads(report.read_text())["install"]
    }
    assert set(found) == {canonicalize_name(name) for name in pins}
    for name, version in pins.items():
        found_version, wheel = found[canonicalize_name(name)]
        assert found_version == version, name
        assert wheel.endswith(".whl") and ("aarch64" in wheel or wheel.endswith("-none-any.whl")), wheel
