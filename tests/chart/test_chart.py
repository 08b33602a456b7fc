"""The Helm chart, checked with real tools: helm lint, the Kubernetes OpenAPI schemas, a real
kube-apiserver (server-side dry run and a real `helm install` under the restricted Pod Security
profile) and checkov. Every ci/*-values.yaml scenario is rendered once (tests/fixtures_chart.py).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import kubernetes_validate
import pytest
import yaml

from contract.spec import MODEL_VERSION_ANNOTATION, TrainingRunSpec
from local_mode.mlflow_server import mlflow_executable
from local_mode.processes import ChildProcess, free_port, wait_until
from mnist_operator.builders import build_job_spec, build_rollout_patch
from mnist_operator.config import OperatorConfig
from serving.metrics import EXPORTED_METRICS
from testing.controlplane import ControlPlane
from testing.helm import (
    CHART_DIR,
    CRD_PATH,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    Helm,
    Rendered,
    parse_documents,
    pod_templates,
    selector_matches,
    upstream_crd_files,
    values_file,
)
from testing.kubectl import kubectl

REPO_ROOT = CHART_DIR.parent.parent
APP_UID = 10001
# kubernetes-validate re-reads and re-parses its megabyte-sized definitions file for every
# document it checks; the files never change, so parsing each once keeps hundreds of validations
# to seconds. (validate() calls schema_contents through the module, so the cache takes effect.)
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents
)
# The oldest version the chart supports (Chart.yaml kubeVersion), the kubectl here, the newest.
SCHEMA_VERSIONS = ("1.29.0", "1.32.0", "1.37.0")
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "TrainingRun", "HTTPRoute", "ScaledObject"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}
REQUIRED_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
)


def name_of(component: str) -> str:
    return f"{RELEASE}-{component}"


def is_hook(doc: dict[str, Any]) -> bool:
    """A Helm hook (the `helm test` pod): run once on demand, not part of the running release."""
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


# --- helm lint and values -----------------------------------------------------------------------


def test_scenarios_cover_the_required_setups() -> None:
    assert {
        "default",
        "postgresql",
        "ingress-tls",
        "monitoring-off",
        "namespaced-rbac",
        "gateway-api",
    } <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(helm: Helm, scenario: str) -> None:
    proc = helm.run(
        [
            "lint",
            "--strict",
            str(CHART_DIR),
            "--namespace",
            NAMESPACE,
            "--values",
            str(values_file(scenario)),
        ],
        check=False,
    )
    assert proc.returncode == 0, f"helm lint --strict ({scenario}):\n{proc.stdout}\n{proc.stderr}"
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        (["serving.autoscaling.targetCPUUtilizationPercentage=500"], "targetCPUUtilizationPercentage"),
        (["mlflow.backendStore.type=mysql"], "backendStore"),
        (["operator.rbac.namespaced=true"], "watchNamespaces"),
        (["mlflow.backendStore.type=postgresql"], "existingSecret"),
        (["mlflow.artifacts.type=s3"], "s3"),
        (["serving.ingress.enabled=true", "serving.ingress.tls.enabled=true"], "secretName"),
        (["serving.image.digest=latest"], "digest"),
        (["serving.resources.limits=null"], "limits"),
        (["unknownTopLevelKey=1"], "unknownTopLevelKey"),
        (["serving.predictionLog.enabled=true"], "predictionLog/existingSecret"),
        (["serving.predictionLog.sample=1.5"], "predictionLog/sample"),
        (["operator.alertmanagerWebhook.secretKey="], "alertmanagerWebhook/secretKey"),
        (["drift.enabled=maybe"], "drift/enabled"),
        (["drift.excludeSources={ws-predict}"], "drift/excludeSources"),
    ],
)
def test_values_schema_rejects_bad_values(helm: Helm, set_values: list[str], message: str) -> None:
    proc = helm.template(set_values=set_values, check=False)
    assert proc.returncode != 0, f"--set {set_values} should be rejected"
    assert message in proc.stderr, proc.stderr


def test_templates_fail_with_a_reason_for_incomplete_options(helm: Helm) -> None:
    # The schema can be bypassed by disabling validation; the templates still refuse.
    proc = helm.template(set_values=["mlflow.auth.enabled=true"], check=False)
    assert proc.returncode != 0
    assert "existingSecret" in proc.stderr


def test_notes_tell_the_user_what_to_do_next(
    helm: Helm, control_plane: ControlPlane, cluster: ControlPlane
) -> None:
    # helm prints NOTES.txt only on install; a client-side dry run still wants a reachable cluster
    # that knows the chart's kinds (the cluster fixture installs the CRDs).
    proc = helm.run(
        [
            "install", RELEASE, str(CHART_DIR), "--dry-run=client", "--namespace", NAMESPACE,
            "--values", str(values_file("ingress-tls")), "--kubeconfig", str(control_plane.kubeconfig_path),
        ]
    )  # fmt: skip
    notes = proc.stdout.split("NOTES:", 1)[1]
    for expected in (
        f"rollout status deployment/{name_of('mlflow')}",
        "kubectl -n mnist-mlops apply -f manifests/trainingruns/",
        "https://mnist.example.com/predict",
        f"port-forward service/{name_of('mlflow')} 5000:5000",
        'TrainingRun "mnist-first-run"',
        f"helm test {RELEASE} -n {NAMESPACE}",
    ):
        assert expected in notes, f"NOTES lacks {expected!r}:\n{notes}"
    gateway = helm.run(
        [
            "install", RELEASE, str(CHART_DIR), "--dry-run=client", "--namespace", NAMESPACE,
            "--values", str(values_file("gateway-api")), "--kubeconfig", str(control_plane.kubeconfig_path),
        ]
    )  # fmt: skip
    notes = gateway.stdout.split("NOTES:", 1)[1]
    assert "curl -s -X POST http://mnist.example.com/predict" in notes, notes
    assert "through the Gateway shared-gateway" in notes, notes


# --- what every scenario renders ----------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_labels_names_and_namespaces(rendered: dict[str, Rendered], scenario: str) -> None:
    result = rendered[scenario]
    watch = result.values().get("operator", {}).get("watchNamespaces", [])
    seen: set[tuple[str, str, str]] = set()
    for doc in result.documents:
        meta = doc["metadata"]
        key = (doc["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in seen, f"{scenario}: duplicate {key}"
        seen.add(key)
        assert len(meta["name"]) <= 63
        labels = meta.get("labels", {})
        missing = [label for label in REQUIRED_LABELS if label not in labels]
        assert not missing, f"{scenario}: {doc['kind']}/{meta['name']} lacks labels {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta
        else:
            assert meta.get("namespace") in {NAMESPACE, *watch}, f"{doc['kind']}/{meta['name']}"
        for template in pod_templates(doc) if doc["kind"] != "Pod" else []:
            template_labels = template["metadata"]["labels"]
            assert selector_matches(doc["spec"]["selector"], template_labels), f"{meta['name']}: selector"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_meets_the_restricted_profile(rendered: dict[str, Rendered], scenario: str) -> None:
    """The explicit fields, beyond PodSecurity's own check below: uid 10001, read-only root, /tmp."""
    templates = [(doc, t) for doc in rendered[scenario].documents for t in pod_templates(doc)]
    assert len(templates) >= 2
    for doc, template in templates:
        where = f"{scenario}: {doc['kind']}/{doc['metadata']['name']}"
        spec = template["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] == APP_UID, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        init = spec.get("initContainers", [])
        for container in spec["containers"] + init:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc.get("runAsUser", pod_sc["runAsUser"]) == APP_UID, where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp scratch"
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind}"
            # Init containers and hook pods run to completion: probes do not apply to them.
            if container not in init and not is_hook(doc):
                assert container["livenessProbe"] and container["readinessProbe"], where


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_manifests_validate_against_the_kubernetes_openapi_schemas(
    rendered: dict[str, Rendered], scenario: str, version: str
) -> None:
    custom = []
    for doc in rendered[scenario].documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            # Custom resources have no OpenAPI schema here; the API server checks them below.
            custom.append(doc["kind"])
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            raise AssertionError(
                f"{scenario} on {version}: {doc['kind']}/{doc['metadata']['name']}: {path}: {error.message}"
            ) from None
    assert set(custom) <= CUSTOM_KINDS, f"unexpected kinds without a schema: {set(custom) - CUSTOM_KINDS}"


def test_serving_deployment_contract(rendered: dict[str, Rendered]) -> None:
    result = rendered["default"]
    deployment = result.one("Deployment", name_of("serving"))
    labels = deployment["metadata"]["labels"]
    assert labels["mnist-mlops.io/registered-model"] == "mnist-cnn"
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    # The HPA owns the replica count; a fixed one in the Deployment would reset it on each upgrade.
    assert "replicas" not in deployment["spec"]
    template = deployment["spec"]["template"]
    assert "mnist-mlops.io/model-version" not in (template["metadata"].get("annotations") or {})
    container = template["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SERVING_MODEL_URI"] == "models:/mnist-cnn@champion"
    assert env["MLFLOW_TRACKING_URI"] == f"http://{name_of('mlflow')}.{NAMESPACE}.svc:5000"
    pod_labels = template["metadata"]["labels"]

    hpa = result.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name_of("serving"),
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = result.one("PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every drain"
    service = result.one("Service", name_of("serving"))
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels)
    monitor = result.one("ServiceMonitor")
    assert selector_matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]

    assert not rendered["default"].of_kind("Ingress")
    ingress = rendered["ingress-tls"].one("Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["mnist.example.com"], "secretName": "mnist-example-com-tls"}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": name_of("serving"), "port": {"name": "http"}}
    pinned = rendered["ingress-tls"].one("Deployment", name_of("serving"))
    image = pinned["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith("@sha256:" + "0" * 63 + "1")
    assert "checkov.io/skip1" not in pinned["metadata"].get("annotations", {}), (
        "a pinned digest needs no skip"
    )


def test_serving_logs_predictions_to_the_database_in_a_secret(rendered: dict[str, Rendered]) -> None:
    """serving.predictionLog: the URL (and its password) only through a secretKeyRef; off by default."""
    default = rendered["default"].one("Deployment", name_of("serving"))
    names = {e["name"] for e in default["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {name for name in names if name.startswith("SERVING_PREDICTION_LOG")}
    deployment = rendered["postgresql"].one("Deployment", name_of("serving"))
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    url = env["SERVING_PREDICTION_LOG_URL"]
    assert "value" not in url
    assert url["valueFrom"]["secretKeyRef"] == {"name": "prediction-log-postgresql", "key": "url"}
    assert env["SERVING_PREDICTION_LOG_SAMPLE"]["value"] == "1"
    assert env["SERVING_PREDICTION_LOG_QUEUE_SIZE"]["value"] == "10000"
    assert env["SERVING_PREDICTION_LOG_RETENTION_DAYS"]["value"] == "30"
    # The drift job reads the same database serving writes.
    drift = rendered["postgresql"].one("Deployment", name_of("drift"))
    drift_env = {e["name"]: e for e in drift["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert drift_env["DRIFT_PREDICTION_LOG_URL"]["valueFrom"] == url["valueFrom"]


def test_drift_job_follows_the_prediction_log(helm: Helm) -> None:
    """drift.enabled unset: on exactly when serving logs predictions; false turns it off; on without a
    prediction log to read, the chart refuses with the setting to fix."""

    def drift_deployments(set_values: list[str]) -> list[dict[str, Any]]:
        docs = parse_documents(helm.template(set_values=set_values).stdout)
        return [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name_of("drift")]

    log = ["serving.predictionLog.enabled=true", "serving.predictionLog.existingSecret=log"]
    assert not drift_deployments([])
    (drift,) = drift_deployments(log)
    # The page's live previews stay out of the windows unless the values say otherwise.
    assert "--exclude-sources=ws_predict" in drift["spec"]["template"]["spec"]["containers"][0]["args"]
    (drift,) = drift_deployments([*log, "drift.excludeSources={ws_predict,explain}"])
    args = drift["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--exclude-sources=ws_predict,explain" in args
    assert not drift_deployments([*log, "drift.enabled=false"])
    refused = helm.template(set_values=["drift.enabled=true"], check=False)
    assert refused.returncode != 0 and "serving.predictionLog.existingSecret" in refused.stderr, (
        refused.stderr
    )


def _secret_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would give it, with each Secret value stood in for
    by "<secret>/<key>" (what the operator's settings parse does not depend on the values)."""
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = f"{ref['name']}/{ref['key']}"
    return env


@pytest.mark.parametrize("scenario", ["monitoring-off", "postgresql"])
def test_operator_webhooks_reach_the_operator_through_its_service(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    """MLflow's and Alertmanager's webhooks: the operator registers MLflow's to its own Service (no
    hook Job), reads both secrets from Secrets, and its NetworkPolicy admits both callers."""
    result = rendered[scenario]
    deployment = result.one("Deployment", name_of("operator"))
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    env = _env(container)
    url = urllib.parse.urlsplit(env["MNIST_OPERATOR_MLFLOW_WEBHOOK_URL"]["value"])
    assert url.scheme == "http" and url.path == "/webhooks/mlflow"
    host, _, port = url.netloc.partition(":")
    service_name, namespace = host.split(".")[:2]
    service = result.one("Service", service_name)
    assert namespace == NAMESPACE
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"])
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert service_port["targetPort"] in {p["name"] for p in container["ports"]}
    # Every Secret a key is read from is the user's (named in the values) or rendered with that key.
    secrets = {doc["metadata"]["name"]: doc for doc in result.of_kind("Secret")}
    for variable in ("MNIST_OPERATOR_MLFLOW_WEBHOOK_SECRET", "MNIST_OPERATOR_ALERTMANAGER_TOKEN"):
        assert "value" not in env[variable], variable
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:
            assert ref["key"] in secrets[ref["name"]]["data"], variable
        else:
            assert ref["name"] in json.dumps(result.values()), f"{variable}: {ref['name']} is nobody's"
    # No Job (it would need a kubelet to finish before helm's --wait does): only the test pod hooks.
    assert not result.of_kind("Job")
    assert all(doc["kind"] in {"Pod", "NetworkPolicy"} for doc in result.documents if is_hook(doc))
    # The operator's NetworkPolicy admits MLflow's pod and an Alertmanager in another namespace.
    policy = result.one("NetworkPolicy", name_of("operator"))
    mlflow_labels = result.one("Deployment", name_of("mlflow"))["spec"]["template"]["metadata"]["labels"]
    alertmanager = {"app.kubernetes.io/name": "alertmanager"}
    for labels, peer_namespace in ((mlflow_labels, NAMESPACE), (alertmanager, "monitoring")):
        assert _policy_admits(policy, labels, peer_namespace, "health"), (labels, peer_namespace)
    assert service_port["targetPort"] == "health"
    # The operator's own settings parse from what the chart sets.
    config = OperatorConfig.from_env(_secret_env(container))
    assert config.mlflow_webhook_secret and config.alertmanager_token
    assert config.mlflow_webhook_url == env["MNIST_OPERATOR_MLFLOW_WEBHOOK_URL"]["value"]
    assert config.mlflow_webhook_name == name_of("operator"), "one webhook per release in MLflow"


def test_operator_and_training_read_the_prediction_log_secret(rendered: dict[str, Rendered]) -> None:
    """The operator counts feedback in the prediction log serving writes, and training Jobs of runs
    with includeFeedback read its URL from the same Secret (in their own namespace), never a value."""
    default = _env(
        rendered["default"].one("Deployment", name_of("operator"))["spec"]["template"]["spec"]["containers"][
            0
        ]
    )
    assert not {name for name in default if "PREDICTION_LOG" in name or "FEEDBACK" in name}
    result = rendered["postgresql"]
    serving = _env(result.one("Deployment", name_of("serving"))["spec"]["template"]["spec"]["containers"][0])
    log_ref = serving["SERVING_PREDICTION_LOG_URL"]["valueFrom"]
    container = result.one("Deployment", name_of("operator"))["spec"]["template"]["spec"]["containers"][0]
    operator = _env(container)
    assert operator["MNIST_OPERATOR_PREDICTION_LOG_URL"]["valueFrom"] == log_ref
    config = OperatorConfig.from_env(_secret_env(container))
    assert config.prediction_log_url
    job = build_job_spec(
        name="feedback-probe",
        namespace=NAMESPACE,
        uid=str(uuid.uuid4()),
        spec=TrainingRunSpec(include_feedback=True),
        config=config,
    )
    job_env = _env(job["spec"]["template"]["spec"]["containers"][0])
    assert job_env["MNIST_FEEDBACK_DB_URL"] == {"name": "MNIST_FEEDBACK_DB_URL", "valueFrom": log_ref}


def test_serving_scales_on_load_through_prometheus_adapter_or_keda(rendered: dict[str, Rendered]) -> None:
    # The HPA path: CPU plus requests in flight per pod, a metric the service really exports.
    hpa = rendered["ingress-tls"].one("HorizontalPodAutoscaler")
    pods_metric = next(m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    assert pods_metric["metric"]["name"] == "mnist_http_requests_in_flight"
    assert pods_metric["metric"]["name"] in EXPORTED_METRICS
    assert pods_metric["target"] == {"type": "AverageValue", "averageValue": "8"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    assert [m["type"] for m in rendered["default"].one("HorizontalPodAutoscaler")["spec"]["metrics"]] == [
        "Resource"
    ], "scaling on load is opt-in"

    # The KEDA path: a ScaledObject instead of the chart's HPA (KEDA makes its own), never to zero.
    keda = rendered["autoscaling-keda"]
    assert not keda.of_kind("HorizontalPodAutoscaler"), "two autoscalers would fight over the replicas"
    scaled = keda.one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == name_of("serving")
    assert scaled["spec"]["minReplicaCount"] >= 1
    triggers = {trigger["type"]: trigger for trigger in scaled["spec"]["triggers"]}
    query = triggers["prometheus"]["metadata"]["query"]
    assert "mnist_http_requests_in_flight" in query and f'service="{name_of("serving")}"' in query, query
    assert triggers["prometheus"]["metadata"]["threshold"] == "4"
    assert triggers["cpu"]["metadata"]["value"] == "70"
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 60


def test_operator_deployment_contract(rendered: dict[str, Rendered]) -> None:
    deployment = rendered["default"].one("Deployment", name_of("operator"))
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["replicas"] == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == f"http://{name_of('mlflow')}.{NAMESPACE}.svc:5000"
    assert env["MNIST_OPERATOR_TRAINING_IMAGE"] == "mnist-mlops/training:0.1.0"
    assert env["MNIST_OPERATOR_NAMESPACES"] == ""
    port = next(p for p in container["ports"] if p["name"] == "health")["containerPort"]
    assert env["MNIST_OPERATOR_HEALTH_PORT"] == str(port)
    namespaced = rendered["namespaced-rbac"].one("Deployment", name_of("operator"))
    namespaced_env = {
        e["name"]: e.get("value") for e in namespaced["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert namespaced_env["MNIST_OPERATOR_NAMESPACES"] == "mnist-mlops,mnist-team-a"


def test_mlflow_backends(rendered: dict[str, Rendered]) -> None:
    default = rendered["default"].one("Deployment", name_of("mlflow"))
    container = default["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/mlflow/mlflow:v3.17.2"
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in container["args"]
    assert "--artifacts-destination=/mlflow/artifacts" in container["args"]
    assert "--serve-artifacts" in container["args"]
    assert default["spec"]["strategy"] == {"type": "Recreate"}
    pvc = rendered["default"].one("PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    production = rendered["postgresql"].one("Deployment", name_of("mlflow"))
    container = production["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/mlflow/mlflow:v3.17.2-full"
    assert not any(arg.startswith("--backend-store-uri") for arg in container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-postgresql",
        "key": "uri",
    }
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    assert "--artifacts-destination=s3://mlflow/artifacts" in container["args"]
    assert "--app-name=basic-auth" in container["args"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
    # Every MLflow client in the release logs in with the same admin credentials.
    for component in ("serving", "operator"):
        deployment = rendered["postgresql"].one("Deployment", name_of(component))
        client_env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert client_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_mlflow_migrates_its_database_before_the_server_starts(rendered: dict[str, Rendered]) -> None:
    for scenario in ("default", "postgresql"):
        spec = rendered[scenario].one("Deployment", name_of("mlflow"))["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        server = spec["containers"][0]
        assert init["name"] == "db-upgrade"
        assert init["image"] == server["image"], "the migrations are the server's own version's"
        assert init["command"] == ["mlflow", "db", "upgrade"]
        assert init["securityContext"] == server["securityContext"]
        assert {m["mountPath"] for m in init["volumeMounts"]} == {"/mlflow", "/tmp"}
        if scenario == "default":
            # The same database the server is started on.
            assert init["args"] == ["sqlite:////mlflow/mlflow.db"]
            assert f"--backend-store-uri={init['args'][0]}" in server["args"]
        else:
            # The kubelet expands $(VAR) from the container's own env: the URI stays in the Secret.
            assert init["args"] == ["$(MLFLOW_BACKEND_STORE_URI)"]
            assert _env(init)["MLFLOW_BACKEND_STORE_URI"] == _env(server)["MLFLOW_BACKEND_STORE_URI"]
            assert _env(init)["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
                "name": "mlflow-postgresql",
                "key": "uri",
            }


def _expand(arguments: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(VAR) expansion of command and args (unknown references stay as written)."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), a) for a in arguments]


@pytest.mark.parametrize("scenario", ["default", "postgresql"])
def test_rendered_db_upgrade_command_migrates_a_database(
    rendered: dict[str, Rendered], scenario: str, tmp_path: Path
) -> None:
    """The init container's command, run with the real mlflow: the SQLite file on the volume, and
    for PostgreSQL the URI the Secret provides (a SQLite URI here: no PostgreSQL server in tests;
    the URI's scheme only picks the SQLAlchemy driver)."""
    spec = rendered[scenario].one("Deployment", name_of("mlflow"))["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    database = tmp_path / "mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"HOME": str(tmp_path), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{database}"})
    command = _expand([*init["command"], *init["args"]], env)
    command = [arg.replace("sqlite:////mlflow/", f"sqlite:///{tmp_path}/") for arg in command]
    assert command[:3] == ["mlflow", "db", "upgrade"] and command[3] == f"sqlite:///{database}"
    proc = subprocess.run(
        [mlflow_executable(), *command[1:]], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(database) as connection:
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert version, "the schema is at a migration head"
    if scenario != "default":
        return
    # Run again on an up-to-date database (every restart does): nothing to do, still success.
    again = subprocess.run(
        [mlflow_executable(), *command[1:]], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]


def test_mlflow_image_and_storage_for_an_air_gapped_cluster(
    rendered: dict[str, Rendered], helm: Helm
) -> None:
    result = rendered["gateway-api"]
    mlflow = result.one("Deployment", name_of("mlflow"))["spec"]["template"]["spec"]
    # A custom image carries the extras itself: no "-full" appended, though PostgreSQL is on.
    for container in (*mlflow["initContainers"], *mlflow["containers"]):
        assert container["image"] == "registry.example.com/mnist-mlops/mlflow:3.17.2"
        # Plain `mlflow` from the PATH, no shell or entrypoint of the official image needed.
        assert container["command"][0] == "mlflow"
    assert mlflow["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert result.one("PersistentVolumeClaim")["spec"]["storageClassName"] == "local-manual"
    # "-" asks for no class at all (binds class-less PersistentVolumes); empty leaves the default.
    none = parse_documents(helm.template(set_values=["mlflow.persistence.storageClass=-"]).stdout)
    (claim,) = [doc for doc in none if doc["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["storageClassName"] == ""
    assert "storageClassName" not in rendered["default"].one("PersistentVolumeClaim")["spec"]


def test_training_jobs_get_the_mlflow_credentials_and_pull_secrets(rendered: dict[str, Rendered]) -> None:
    """The Job the chart's operator builds logs in to MLflow like the operator does, and pulls with
    the chart's imagePullSecrets."""
    for scenario, secrets in (("postgresql", ()), ("gateway-api", ("registry-credentials",))):
        result = rendered[scenario]
        container = result.one("Deployment", name_of("operator"))["spec"]["template"]["spec"]["containers"][0]
        config = OperatorConfig.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
        job = build_job_spec(
            name="probe", namespace=NAMESPACE, uid=str(uuid.uuid4()), spec=TrainingRunSpec(), config=config
        )
        pod = job["spec"]["template"]["spec"]
        assert tuple(s["name"] for s in pod.get("imagePullSecrets", [])) == secrets
        env = _env(pod["containers"][0])
        if result.values().get("mlflow", {}).get("auth", {}).get("enabled"):
            operator_env = _env(container)
            for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert env[variable]["valueFrom"] == operator_env[variable]["valueFrom"], variable
        else:
            assert "MLFLOW_TRACKING_PASSWORD" not in env


def test_httproute_routes_to_the_serving_service(rendered: dict[str, Rendered]) -> None:
    route = rendered["gateway-api"].one("HTTPRoute", name_of("serving"))
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    values = rendered["gateway-api"].values()["serving"]["httpRoute"]
    assert route["spec"]["parentRefs"] == values["parentRefs"]
    assert route["spec"]["hostnames"] == ["mnist.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    service = rendered["gateway-api"].one("Service", name_of("serving"))
    assert rule["backendRefs"] == [{"name": name_of("serving"), "port": service["spec"]["ports"][0]["port"]}]
    for scenario in SCENARIOS:
        if scenario != "gateway-api":
            assert not rendered[scenario].of_kind("HTTPRoute"), scenario


def test_httproute_without_a_gateway_is_refused(helm: Helm) -> None:
    proc = helm.template(set_values=["serving.httpRoute.enabled=true"], check=False)
    assert proc.returncode != 0 and "parentRefs" in proc.stderr, proc.stderr


def _helm_test_pod(result: Rendered) -> dict[str, Any]:
    (pod,) = [doc for doc in result.of_kind("Pod") if is_hook(doc)]
    return pod


def test_helm_test_pod_checks_serving_and_mlflow(rendered: dict[str, Rendered]) -> None:
    for scenario in SCENARIOS:
        result = rendered[scenario]
        pod = _helm_test_pod(result)
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        container = pod["spec"]["containers"][0]
        serving = result.one("Deployment", name_of("serving"))["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == serving["image"], "the serving image, which has Python"
        assert container["command"][:2] == ["python", "-c"]
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["automountServiceAccountToken"] is False
        services = {doc["metadata"]["name"]: doc for doc in result.of_kind("Service")}
        urls = container["args"]
        assert [urllib.parse.urlsplit(url).path for url in urls] == ["/health/ready", "/health"]
        for url in urls:
            host, _, port = urllib.parse.urlsplit(url).netloc.partition(":")
            name, namespace = host.split(".")[:2]
            assert namespace == NAMESPACE
            assert int(port) in {p["port"] for p in services[name]["spec"]["ports"]}, url
        # MLflow's NetworkPolicy admits the test pod (the release's own pods); its own admits nothing.
        policy = result.one("NetworkPolicy", name_of("mlflow"))
        assert _mlflow_admits(policy, pod["metadata"]["labels"], NAMESPACE)
        own = result.one("NetworkPolicy", pod["metadata"]["name"])
        assert is_hook(own) and selector_matches(own["spec"]["podSelector"], pod["metadata"]["labels"])
        assert own["spec"]["policyTypes"] == ["Ingress"] and not own["spec"].get("ingress")


class _Health(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        status = self.statuses.get(self.path, 404)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.parametrize(("ready", "exit_ok"), [(200, True), (503, False)])
def test_helm_test_pod_command_passes_only_when_both_answer(
    rendered: dict[str, Rendered], ready: int, exit_ok: bool
) -> None:
    """The pod's python -c, run here against loopback stand-ins for the two Services."""
    container = _helm_test_pod(rendered["default"])["spec"]["containers"][0]
    _Health.statuses = {"/health/ready": ready, "/health": 200}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        args = [base + urllib.parse.urlsplit(url).path for url in container["args"]]
        proc = subprocess.run(
            [sys.executable, *container["command"][1:], *args], capture_output=True, text=True, timeout=60
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode == 0) is exit_ok, proc.stdout + proc.stderr
    if exit_ok:
        assert proc.stdout.count(" 200") == 2
    else:
        assert "503" in proc.stderr


def test_monitoring_off_renders_no_monitoring_kinds(rendered: dict[str, Rendered]) -> None:
    kinds = {doc["kind"] for doc in rendered["monitoring-off"].documents}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert not [
        d for d in rendered["monitoring-off"].of_kind("ConfigMap") if "dashboard" in d["metadata"]["name"]
    ]
    serving = rendered["monitoring-off"].one("Deployment", name_of("serving"))
    assert serving["spec"]["replicas"] == 1


def _pods_of(result: Rendered) -> dict[str, dict[str, str]]:
    return {
        doc["metadata"]["name"]: template["metadata"]["labels"]
        for doc in result.documents
        for template in pod_templates(doc)
    }


def _peer_admits(peer: dict[str, Any], labels: dict[str, str], namespace_labels: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return True
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], namespace_labels):
            return False
    elif namespace_labels.get("kubernetes.io/metadata.name") != NAMESPACE:
        return False
    return selector_matches(peer.get("podSelector", {}), labels)


def _mlflow_admits(policy: dict[str, Any], labels: dict[str, str], namespace: str) -> bool:
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    return any(
        _peer_admits(peer, labels, namespace_labels)
        for rule in policy["spec"]["ingress"]
        for peer in rule.get("from", [{}])
    )


def _policy_admits(policy: dict[str, Any], labels: dict[str, str], namespace: str, port: str) -> bool:
    """Whether an ingress rule of the policy admits a pod to the named port: a rule without ports
    admits every port, one without `from` every peer (NetworkPolicy semantics)."""
    namespace_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port for p in ports):
            continue
        if "from" not in rule or any(_peer_admits(peer, labels, namespace_labels) for peer in rule["from"]):
            return True
    return False


@pytest.mark.parametrize("scenario", ["default", "namespaced-rbac"])
def test_mlflow_is_reachable_only_from_the_platforms_pods(
    rendered: dict[str, Rendered], scenario: str
) -> None:
    result = rendered[scenario]
    pods = _pods_of(result)
    policy = result.one("NetworkPolicy", name_of("mlflow"))
    assert selector_matches(policy["spec"]["podSelector"], pods[name_of("mlflow")])
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for component in ("operator", "serving"):
        assert _mlflow_admits(policy, pods[name_of(component)], NAMESPACE), component
    training = {"app.kubernetes.io/part-of": "mnist-mlops", "app.kubernetes.io/component": "training"}
    watched = result.values().get("operator", {}).get("watchNamespaces", ["any-namespace"])
    for namespace in watched:
        assert _mlflow_admits(policy, training, namespace), f"training pods in {namespace}"
    if scenario == "namespaced-rbac":
        assert not _mlflow_admits(policy, training, "some-other-team")
    for outsider in ({"app": "notebook"}, {"app.kubernetes.io/part-of": "something-else"}, {}):
        assert not _mlflow_admits(policy, outsider, NAMESPACE), outsider
    # Every pod of the chart is covered by some NetworkPolicy (the helm test pod by a deny-all one).
    policies = result.of_kind("NetworkPolicy")
    for name, labels in pods.items():
        assert any(selector_matches(p["spec"]["podSelector"], labels) for p in policies), name


# --- the chart's RBAC against the operator's own rules ------------------------------------------

OPERATOR_RBAC = REPO_ROOT / "operator" / "rbac.yaml"
# operator/rbac.yaml names everything after the operator; the chart after the release.
REFERENCE_NAME = "mnist-operator"


def _normalise(rules: list[dict[str, Any]], rename: str = "") -> set[tuple[str, str, str, str]]:
    return {
        (group, resource, verb, name.replace(REFERENCE_NAME, rename) if rename else name)
        for rule in rules
        for group in rule.get("apiGroups", [""])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
        for name in rule.get("resourceNames", ["*"])
    }


def _reference(kind: str) -> dict[str, Any]:
    assert OPERATOR_RBAC.exists(), f"{OPERATOR_RBAC} (the operator's least-privilege rules) is missing"
    docs = [d for d in yaml.safe_load_all(OPERATOR_RBAC.read_text()) if d]
    return next(d for d in docs if d["kind"] == kind)


@pytest.mark.parametrize("scenario", ["default", "namespaced-rbac"])
def test_chart_rbac_is_the_operators_own_rules(rendered: dict[str, Rendered], scenario: str) -> None:
    result = rendered[scenario]
    operator = name_of("operator")
    subject = [{"kind": "ServiceAccount", "name": operator, "namespace": NAMESPACE}]
    role = result.one("ClusterRole", operator)
    assert _normalise(role["rules"]) == _normalise(_reference("ClusterRole")["rules"])
    leader = result.one("Role", f"{operator}-leader-election")
    assert leader["metadata"]["namespace"] == NAMESPACE
    assert _normalise(leader["rules"]) == _normalise(_reference("Role")["rules"], rename=operator)
    deployment = result.one("Deployment", operator)
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MNIST_OPERATOR_LEASE_NAME"] == operator, "the Role allows only this Lease"
    assert result.one("RoleBinding", f"{operator}-leader-election")["subjects"] == subject

    role_bindings = [b for b in result.of_kind("RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"]
    if scenario == "default":
        binding = result.one("ClusterRoleBinding", operator)
        assert binding["subjects"] == subject and binding["roleRef"]["name"] == operator
        assert not role_bindings
    else:
        assert not result.of_kind("ClusterRoleBinding"), "namespaced mode grants nothing cluster-wide"
        watched = result.values()["operator"]["watchNamespaces"]
        assert sorted(b["metadata"]["namespace"] for b in role_bindings) == sorted(watched)
        for binding in role_bindings:
            assert binding["subjects"] == subject and binding["roleRef"]["name"] == operator


# --- the real API server ------------------------------------------------------------------------

RESTRICTED_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/audit": "restricted",
}


def _namespace_manifest(name: str, labels: dict[str, str]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """The control plane with the chart's CRD, the real upstream CRDs of the other custom resources
    it renders (ServiceMonitor, PrometheusRule, HTTPRoute) and restricted namespaces."""
    assert CRD_PATH.exists(), f"the TrainingRun CRD is missing at {CRD_PATH}"
    files = upstream_crd_files()
    for path in [*files, CRD_PATH]:
        kubectl(control_plane, "apply", "--server-side", "--force-conflicts", "-f", str(path), check=True)
    kubectl(control_plane, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all", check=True)
    for namespace in (NAMESPACE, "mnist-team-a"):
        kubectl(
            control_plane,
            "apply",
            "-f",
            "-",
            manifest=_namespace_manifest(namespace, RESTRICTED_LABELS),
            check=True,
        )
    yield control_plane


def _pods_from_templates(result: Rendered) -> list[dict[str, Any]]:
    pods = []
    for doc in result.documents:
        for template in pod_templates(doc):
            pods.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"{doc['metadata']['name']}-probe",
                        "namespace": doc["metadata"]["namespace"],
                        "labels": template["metadata"].get("labels", {}),
                    },
                    "spec": template["spec"],
                }
            )
    return pods


def _object_list(docs: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_server_side_dry_run_in_a_restricted_namespace(
    cluster: ControlPlane, rendered: dict[str, Rendered], scenario: str
) -> None:
    result = rendered[scenario]
    # A Pod naming a ServiceAccount that does not exist is refused (the chart's helm test pod, and
    # the pod templates below), so those are created for real first.
    accounts = result.of_kind("ServiceAccount")
    kubectl(cluster, "apply", "-f", "-", manifest=_object_list(accounts), check=True)
    proc = kubectl(cluster, "apply", "--dry-run=server", "-f", "-", manifest=_object_list(result.documents))
    assert proc.returncode == 0, f"{scenario}: the API server rejected the chart:\n{proc.stderr}"
    assert "PodSecurity" not in proc.stderr, f"{scenario}: PodSecurity warnings:\n{proc.stderr}"
    # Workload objects only draw PodSecurity warnings; Pods are what `enforce` rejects. Submitting
    # each pod template as a Pod has admission judge exactly what the controllers will create.
    pods = _pods_from_templates(result)
    proc = kubectl(cluster, "apply", "--dry-run=server", "-f", "-", manifest=_object_list(pods))
    assert proc.returncode == 0, f"{scenario}: PodSecurity (restricted) rejected a pod:\n{proc.stderr}"
    assert proc.stdout.count("(server dry run)") == len(pods)


def test_training_job_of_the_charts_operator_is_admitted(
    cluster: ControlPlane, rendered: dict[str, Rendered]
) -> None:
    """The Job the operator builds with the settings this chart gives it passes restricted too."""
    container = rendered["default"].one("Deployment", name_of("operator"))["spec"]["template"]["spec"][
        "containers"
    ][0]
    config = OperatorConfig.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    job = build_job_spec(
        name="admission-probe",
        namespace=NAMESPACE,
        uid=str(uuid.uuid4()),
        spec=TrainingRunSpec(),
        config=config,
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "mnist-mlops/training:0.1.0"
    pods = _pods_from_templates(Rendered("operator-job", "", [job]))
    proc = kubectl(cluster, "apply", "--dry-run=server", "-f", "-", manifest=_object_list([job, *pods]))
    assert proc.returncode == 0, f"the training Job or its pod was rejected:\n{proc.stderr}"
    assert "PodSecurity" not in proc.stderr, proc.stderr


def test_a_policy_violation_is_rejected(cluster: ControlPlane, rendered: dict[str, Rendered]) -> None:
    """The dry run above would catch a violation: the same pod with escalation allowed is refused."""
    pod = _pods_from_templates(rendered["default"])[0]
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    proc = kubectl(cluster, "apply", "--dry-run=server", "-f", "-", manifest=json.dumps(pod))
    assert proc.returncode != 0
    assert "violates PodSecurity" in proc.stderr and "allowPrivilegeEscalation" in proc.stderr


def test_helm_install_runs_every_pod_under_the_restricted_profile(
    cluster: ControlPlane, helm: Helm, control_plane: ControlPlane
) -> None:
    """One real `helm install`: the controllers create the pods, and PodSecurity admits every one."""
    namespace = f"mnist-install-{uuid.uuid4().hex[:6]}"
    kubectl(
        cluster, "apply", "-f", "-", manifest=_namespace_manifest(namespace, RESTRICTED_LABELS), check=True
    )
    control_plane.wait_for_serviceaccount(namespace)
    env_args = ["--kubeconfig", str(control_plane.kubeconfig_path)]
    install = helm.run(
        ["install", RELEASE, str(CHART_DIR), "--namespace", namespace, "--values",
         str(values_file("ingress-tls")), *env_args],
        check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    try:
        deployments = ("operator", "mlflow", "serving")

        def every_deployment_has_a_pod() -> bool:
            proc = kubectl(cluster, "get", "pods", "-n", namespace, "-o", "json", check=True)
            components = {
                pod["metadata"]["labels"].get("app.kubernetes.io/component")
                for pod in json.loads(proc.stdout)["items"]
            }
            return all(component in components for component in deployments)

        try:
            wait_until(every_deployment_has_a_pod, 60, "a pod of every Deployment")
        except TimeoutError:
            events = kubectl(cluster, "get", "events", "-n", namespace).stdout
            raise AssertionError(f"pods were not created; events:\n{events}") from None
        replica_sets = json.loads(
            kubectl(cluster, "get", "rs", "-n", namespace, "-o", "json", check=True).stdout
        )
        for rs in replica_sets["items"]:
            failures = [
                c for c in rs.get("status", {}).get("conditions", []) if c["type"] == "ReplicaFailure"
            ]
            assert not failures, f"{rs['metadata']['name']}: {failures}"
        trainingrun = kubectl(cluster, "get", "trainingrun", "mnist-first-run", "-n", namespace)
        assert trainingrun.returncode == 0, trainingrun.stderr
    finally:
        uninstall = helm.run(
            ["uninstall", RELEASE, "--namespace", namespace, "--wait", *env_args], check=False
        )
        assert uninstall.returncode == 0, uninstall.stderr
    # The MLflow volume outlives the release (helm.sh/resource-policy: keep).
    kept = kubectl(cluster, "get", "pvc", name_of("mlflow"), "-n", namespace)
    assert kept.returncode == 0, "the MLflow PVC should survive helm uninstall"
    kubectl(cluster, "delete", "namespace", namespace, "--wait=false")


def _serving_uri(cluster: ControlPlane, namespace: str) -> str:
    deployment = json.loads(
        kubectl(
            cluster, "get", "deployment", name_of("serving"), "-n", namespace, "-o", "json", check=True
        ).stdout
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return str(_env(container)["SERVING_MODEL_URI"]["value"])


# Secrets the chart generates for the monitoring-off scenario (both webhooks on, no existing Secret).
GENERATED_SECRETS = (name_of("mlflow-webhook"), name_of("alertmanager-webhook"))


def _secret_data(cluster: ControlPlane, namespace: str, name: str) -> dict[str, str]:
    proc = kubectl(cluster, "get", "secret", name, "-n", namespace, "-o", "json", check=True)
    return dict(json.loads(proc.stdout).get("data") or {})


def test_helm_upgrade_keeps_the_version_the_operator_pinned(
    cluster: ControlPlane, helm: Helm, control_plane: ControlPlane
) -> None:
    """The operator pins SERVING_MODEL_URI on a promotion; an upgrade of the release (here changing
    another setting of the same container) must not put the alias back, or every upgrade would roll
    serving to whatever the alias says and lose the Deployment's model history."""
    namespace = f"mnist-upgrade-{uuid.uuid4().hex[:6]}"
    kubectl(
        cluster, "apply", "-f", "-", manifest=_namespace_manifest(namespace, RESTRICTED_LABELS), check=True
    )
    control_plane.wait_for_serviceaccount(namespace)
    common = ["--namespace", namespace, "--values", str(values_file("monitoring-off")),
              "--kubeconfig", str(control_plane.kubeconfig_path)]  # fmt: skip
    try:
        helm.run(["install", RELEASE, str(CHART_DIR), *common])
        assert _serving_uri(cluster, namespace) == "models:/mnist-cnn@champion"
        generated = {name: _secret_data(cluster, namespace, name) for name in GENERATED_SECRETS}
        assert all(generated.values()), generated
        # What the operator's rollout does (builders.build_rollout_patch): a strategic merge patch.
        patch = build_rollout_patch("4", "models:/mnist-cnn/4", ["serving"])
        kubectl(
            cluster, "patch", "deployment", name_of("serving"), "-n", namespace, "--type=strategic",
            "-p", json.dumps(patch), check=True,
        )  # fmt: skip
        helm.run(["upgrade", RELEASE, str(CHART_DIR), *common, "--set", "serving.logLevel=debug"])
        deployment = json.loads(
            kubectl(
                cluster, "get", "deployment", name_of("serving"), "-n", namespace, "-o", "json", check=True
            ).stdout
        )
        env = _env(deployment["spec"]["template"]["spec"]["containers"][0])
        assert env["SERVING_LOG_LEVEL"]["value"] == "debug", "the upgrade was applied"
        assert env["SERVING_MODEL_URI"]["value"] == "models:/mnist-cnn/4", "the pin survived the upgrade"
        assert deployment["spec"]["template"]["metadata"]["annotations"][MODEL_VERSION_ANNOTATION] == "4"
        # The webhook secrets the chart generated are kept (lookup): MLflow and Alertmanager still
        # hold the old ones, and MLflow could no longer decrypt its stored webhook secret.
        for name, data in generated.items():
            assert _secret_data(cluster, namespace, name) == data, f"{name} was regenerated"
        # Serving another registered model: the old model's pin no longer applies.
        helm.run(["upgrade", RELEASE, str(CHART_DIR), *common, "--set", "serving.registeredModel=digits"])
        assert _serving_uri(cluster, namespace) == "models:/digits@champion"
    finally:
        helm.run(["uninstall", RELEASE, "--namespace", namespace, "--kubeconfig",
                  str(control_plane.kubeconfig_path)], check=False)  # fmt: skip
        kubectl(cluster, "delete", "namespace", namespace, "--wait=false")


def test_mlflow_volume_binds_a_pre_created_persistent_volume(
    cluster: ControlPlane, rendered: dict[str, Rendered]
) -> None:
    """mlflow.persistence.storageClass lets the claim bind a PersistentVolume made by hand (a local
    volume on a single-node cluster): the volume binder of kube-controller-manager pairs them."""
    claim = rendered["gateway-api"].one("PersistentVolumeClaim")
    namespace = f"mnist-pv-{uuid.uuid4().hex[:6]}"
    volume = f"mlflow-{namespace}"
    kubectl(cluster, "create", "namespace", namespace, check=True)
    persistent_volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": volume},
        "spec": {
            "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
            "accessModes": claim["spec"]["accessModes"],
            "storageClassName": claim["spec"]["storageClassName"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": f"/var/lib/{volume}", "type": "DirectoryOrCreate"},
        },
    }
    claim["metadata"]["namespace"] = namespace
    try:
        kubectl(cluster, "apply", "-f", "-", manifest=json.dumps(persistent_volume), check=True)
        kubectl(cluster, "apply", "-f", "-", manifest=json.dumps(claim), check=True)
        bound = kubectl(
            cluster, "wait", "pvc", claim["metadata"]["name"], "-n", namespace,
            "--for=jsonpath={.status.phase}=Bound", "--timeout=60s",
        )  # fmt: skip
        assert bound.returncode == 0, bound.stderr
        found = json.loads(
            kubectl(cluster, "get", "pvc", claim["metadata"]["name"], "-n", namespace, "-o", "json").stdout
        )
        assert found["spec"]["volumeName"] == volume
    finally:
        kubectl(cluster, "delete", "namespace", namespace, "--wait=false")
        kubectl(cluster, "delete", "pv", volume, "--wait=false")


# --- the MLflow container as rendered ----------------------------------------------------------


def test_rendered_mlflow_command_serves_its_service_name(
    rendered: dict[str, Rendered], tmp_path: Path
) -> None:
    """Runs the rendered MLflow container's command and env with a real mlflow server.

    The in-cluster clients reach MLflow as http://<service>.<namespace>.svc:5000, a Host header the
    server's DNS-rebinding protection rejects unless --allowed-hosts names it.
    """
    deployment = rendered["default"].one("Deployment", name_of("mlflow"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    data = tmp_path / "mlflow"
    (data / "artifacts").mkdir(parents=True)
    args = []
    for rendered_arg in container["args"]:
        # The volume's mount point moves into the temp dir; sqlite:////mlflow/x stays absolute.
        arg = rendered_arg.replace("/mlflow/", f"{data}/")
        arg = re.sub(r"^--host=.*", "--host=127.0.0.1", arg)
        arg = re.sub(r"^--port=.*", f"--port={port}", arg)
        arg = re.sub(r"^--workers=.*", "--workers=1", arg)
        args.append(arg)
    assert any(a.startswith(f"--backend-store-uri=sqlite:///{data}/mlflow.db") for a in args), args
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env["HOME"] = str(tmp_path)
    assert container["command"] == ["mlflow", "server"]
    server = ChildProcess.spawn(
        "the rendered mlflow server", [mlflow_executable(), "server", *args], tmp_path / "mlflow.log", env=env
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str, host: str) -> int:
        request = urllib.request.Request(base + path, headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    try:

        def healthy() -> bool:
            try:
                return get("/health", "localhost") == 200
            except (urllib.error.URLError, OSError):
                return False

        server.wait_ready(healthy, 120, "its /health answered")
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        for host in (f"{name_of('mlflow')}.{NAMESPACE}.svc:5000", f"{name_of('mlflow')}:5000"):
            assert get(search, host) == 200, f"Host {host} rejected"
        assert get(search, "attacker.example:5000") == 403
    finally:
        server.stop(30)


# --- checkov ------------------------------------------------------------------------------------


def _checkov_binary() -> Path:
    configured = os.environ.get("CHECKOV")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops"))
    found = sorted(cache.glob("checkov-*/bin/checkov"))
    assert found, (
        "checkov is not installed: run `make test` (it builds its venv) or set CHECKOV=/path/to/checkov"
    )
    return found[-1]


def test_checkov_passes_every_scenario(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    for scenario, result in rendered.items():
        (tmp_path / f"{scenario}.yaml").write_text(result.text)
    proc = subprocess.run(
        [str(_checkov_binary()), "--directory", str(tmp_path), "--framework", "kubernetes",
         "--output", "json", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.stdout.strip(), f"checkov printed nothing:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['resource']} ({Path(c['file_path']).name}): {c['check_name']}"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 100, f"checkov ran only {passed} checks"
    for r in reports:
        for skipped in r["results"]["skipped_checks"]:
            comment = (skipped.get("check_result") or {}).get("suppress_comment", "")
            assert len(comment) > 20, (
                f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"
            )
