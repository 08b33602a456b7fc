"""The operator under test: its CRD and RBAC on a control plane, its ServiceAccount, a restartable MLflow
server, and `python -m mnist_operator` as a real child process; used by the tests and `bench/operator.py`.

The operator always runs with a kubeconfig holding a real token of its ServiceAccount, so it has exactly
the permissions of operator/rbac.yaml and nothing more.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from local_mode.mlflow_server import MlflowServer, start_mlflow_server
from local_mode.processes import ChildProcess, free_port, wait_until
from testing.controlplane import ControlPlane
from testing.kubectl import kubectl, kubectl_ok, unique_name

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = REPO_ROOT / "charts" / "mnist-mlops" / "crds" / "trainingruns.mnist-mlops.io.yaml"
RETRAINING_CRD_PATH = REPO_ROOT / "charts" / "mnist-mlops" / "crds" / "retrainingpolicies.mnist-mlops.io.yaml"
RBAC_PATH = REPO_ROOT / "operator" / "rbac.yaml"
SEED_MANIFESTS = sorted((REPO_ROOT / "manifests" / "trainingruns").glob("*.yaml"))

OPERATOR_NAMESPACE = "mnist-operator-system"
OPERATOR_ACCOUNT = "mnist-operator"
LEASE_NAME = "mnist-operator"
WATCHED_PLACEHOLDER = "WATCHED_NAMESPACE"


def load_crd() -> dict[str, Any]:
    document = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(document, dict)
    return document


def rbac_documents() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(RBAC_PATH.read_text()) if document]


def _retarget(document: dict[str, Any]) -> dict[str, Any]:
    """operator/rbac.yaml, moved into the test's operator namespace."""
    document = copy.deepcopy(document)
    if document["metadata"].get("namespace") == "mnist-mlops":
        document["metadata"]["namespace"] = OPERATOR_NAMESPACE
    for subject in document.get("subjects") or []:
        subject["namespace"] = OPERATOR_NAMESPACE
    return document


def create_namespace(plane: ControlPlane, name: str, *, restricted: bool = True) -> str:
    labels = {"pod-security.kubernetes.io/enforce": "restricted"} if restricted else {}
    kubectl_ok(
        plane,
        "apply",
        "-f",
        "-",
        manifest={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}},
    )
    plane.wait_for_serviceaccount(name)
    return name


@dataclass
class OperatorAccount:
    """The operator's ServiceAccount with the ClusterRole and Lease Role of operator/rbac.yaml."""

    plane: ControlPlane
    kubeconfig: Path
    bindings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"

    def bind_namespace(self, namespace: str) -> None:
        """Namespaced mode: the ClusterRole's rules, granted in `namespace` only."""
        (binding,) = [
            _retarget(doc)
            for doc in rbac_documents()
            if doc["kind"] == "RoleBinding" and doc["metadata"]["namespace"] == WATCHED_PLACEHOLDER
        ]
        binding["metadata"]["namespace"] = namespace
        kubectl_ok(self.plane, "apply", "-f", "-", manifest=binding)
        self.bindings.append(("rolebinding", namespace))

    @contextlib.contextmanager
    def clusterwide(self) -> Iterator[None]:
        """Cluster-wide mode, for the duration of the block."""
        (binding,) = [_retarget(doc) for doc in rbac_documents() if doc["kind"] == "ClusterRoleBinding"]
        kubectl_ok(self.plane, "apply", "-f", "-", manifest=binding)
        try:
            yield
        finally:
            kubectl(
                self.plane, "delete", "clusterrolebinding", binding["metadata"]["name"], "--ignore-not-found"
            )

    def can(self, verb: str, resource: str, namespace: str | None = None) -> bool:
        args = ["auth", "can-i", verb, resource, f"--as={self.user}"]
        args += ["-n", namespace] if namespace else []
        result = kubectl(self.plane, *args)
        return result.stdout.strip() == "yes"


def install_crd(plane: ControlPlane) -> None:
    """The chart's CRDs: TrainingRun and RetrainingPolicy."""
    for path in (CRD_PATH, RETRAINING_CRD_PATH):
        kubectl_ok(plane, "apply", "--server-side", "-f", str(path))
    kubectl_ok(
        plane,
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/trainingruns.mnist-mlops.io",
        "crd/retrainingpolicies.mnist-mlops.io",
    )


def install_operator_account(plane: ControlPlane) -> OperatorAccount:
    """operator/rbac.yaml without the bindings that choose the mode (cluster-wide or namespaced)."""
    create_namespace(plane, OPERATOR_NAMESPACE, restricted=False)
    documents = [
        _retarget(doc)
        for doc in rbac_documents()
        if doc["kind"] in {"ServiceAccount", "ClusterRole", "Role"}
        or (doc["kind"] == "RoleBinding" and doc["metadata"]["namespace"] == "mnist-mlops")
    ]
    kubectl_ok(plane, "apply", "-f", "-", manifest=documents)
    return OperatorAccount(plane, plane.serviceaccount_kubeconfig(OPERATOR_NAMESPACE, OPERATOR_ACCOUNT))


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@dataclass
class RestartableMlflow:
    """A real MLflow server the tests may stop and start again on the same port and state.

    It delivers registry webhooks to the operator on loopback: MLflow's defaults allow https only and
    public addresses only; the key that encrypts stored webhook secrets is fixed, or a restarted
    server could no longer read (and sign with) the secrets stored before; and the list of webhooks
    per event is cached for 1s instead of 60s, so a webhook a test registers is used at once."""

    state_dir: Path
    port: int
    server: MlflowServer | None = None
    webhook_key: str = field(default_factory=_fernet_key)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def webhook_env(self) -> dict[str, str]:
        return {
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": self.webhook_key,
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        }

    def start(self) -> None:
        # start_mlflow_server passes this process's environment on to the server.
        saved = {key: os.environ.get(key) for key in self.webhook_env}
        os.environ.update(self.webhook_env)
        try:
            self.server = start_mlflow_server(self.state_dir, port=self.port)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@dataclass
class OperatorProcess:
    """`python -m mnist_operator` as a child process with the ServiceAccount's kubeconfig.

    `python` defaults to this interpreter; the benchmark passes one with only the operator image's
    requirements, so its memory figures are those of what ships."""

    env: dict[str, str]
    log_path: Path
    python: str = sys.executable
    child: ChildProcess | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return None if self.child is None else self.child.popen

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MNIST_OPERATOR_HEALTH_PORT']}/healthz"

    def start(self) -> OperatorProcess:
        self.child = ChildProcess.spawn(
            "the operator",
            [self.python, "-m", "mnist_operator"],
            self.log_path,
            env=self.env,
            cwd=REPO_ROOT,
            append_log=True,
        )
        return self

    def health(self) -> dict[str, Any] | None:
        """The /healthz document while it answers 200; None otherwise (down, or 503)."""
        found = self.health_status()
        return found[1] if found is not None and found[0] == 200 else None

    def health_status(self) -> tuple[int, dict[str, Any]] | None:
        """(HTTP status, document) of /healthz, a 503 included; None while nothing answers."""
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                return int(response.status), _document(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), _document(error.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def _running(self) -> ChildProcess:
        assert self.child is not None, "the operator was never started"
        self.child.check_running("the test was done with it")
        return self.child

    def wait_healthy(self, timeout: float = 120.0) -> dict[str, Any]:
        """Until /healthz answers: as a standby, or as the leader (use is_leading to tell)."""
        return self._running().wait_ready(self.health, timeout, "its /healthz answered")

    def is_leading(self) -> bool:
        self._running()
        health = self.health()
        return health is not None and health.get("role") != "standby"

    def wait_leading(self, timeout: float = 120.0) -> None:
        wait_until(self.is_leading, timeout, "the operator to lead")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`: the exit code, or None if it had to be killed."""
        return None if self.child is None else self.child.stop(timeout)

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def log_tail(self, lines: int = 60) -> str:
        return "" if self.child is None else self.child.log_tail(lines)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _document(raw: bytes) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError:
        return {"body": raw.decode(errors="replace")}
    return document if isinstance(document, dict) else {"body": document}


@dataclass
class OperatorFactory:
    plane: ControlPlane
    account: OperatorAccount
    mlflow: RestartableMlflow
    directory: Path
    started: list[OperatorProcess] = field(default_factory=list)

    def env(self, namespaces: list[str], identity: str, **settings: str) -> dict[str, str]:
        environment = {
            key: value
            for key, value in os.environ.items()
            if key in {"PATH", "LANG", "LC_ALL", "HOME"} or key.startswith("OPENBLAS_")
        }
        environment.update(
            {
                "KUBECONFIG": str(self.account.kubeconfig),
                "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'operator'}",
                "MLFLOW_TRACKING_URI": self.mlflow.url,
                "MNIST_OPERATOR_NAMESPACES": ",".join(namespaces),
                "MNIST_OPERATOR_TRAINING_IMAGE": "mnist-mlops/training:test",
                "MNIST_OPERATOR_HEALTH_HOST": "127.0.0.1",
                "MNIST_OPERATOR_HEALTH_PORT": str(free_port()),
                "MNIST_OPERATOR_LEASE_NAMESPACE": OPERATOR_NAMESPACE,
                "MNIST_OPERATOR_LEASE_NAME": LEASE_NAME,
                "MNIST_OPERATOR_LEASE_DURATION_SECONDS": "10",
                "MNIST_OPERATOR_IDENTITY": identity,
                "MNIST_OPERATOR_RECONCILE_INTERVAL_SECONDS": "0.5",
                "MNIST_OPERATOR_PROGRESS_INTERVAL_SECONDS": "1",
                "MNIST_OPERATOR_MLFLOW_BACKOFF_SECONDS": "1",
                "MNIST_OPERATOR_MLFLOW_MAX_BACKOFF_SECONDS": "4",
                "MNIST_OPERATOR_MLFLOW_TIMEOUT_SECONDS": "3",
                "MNIST_OPERATOR_DEFAULT_MEMORY": "1Gi",
                # Liveness after 60s without a reconcile (120 ticks of 0.5s): a loaded test machine
                # must not fail the probe; the liveness test sets its own.
                "MNIST_OPERATOR_LIVENESS_TICKS": "120",
                # The fake kubelet's pods have no process behind them (podIP 127.0.0.1, which the API
                # server's pod proxy refuses): the fast tier cannot ask them which version they serve.
                "MNIST_OPERATOR_CONFIRM_FROM_PODS": "false",
            }
        )
        environment.update({f"MNIST_OPERATOR_{key.upper()}": value for key, value in settings.items()})
        return environment

    def start(
        self,
        namespaces: list[str],
        identity: str | None = None,
        *,
        test_failpoint: str | None = None,
        **settings: str,
    ) -> OperatorProcess:
        """`settings` become MNIST_OPERATOR_<NAME> variables; `test_failpoint` arms one of
        mnist_operator.testing_hooks' test-only failpoints."""
        identity = identity or unique_name("operator")
        env = self.env(namespaces, identity, **settings)
        if test_failpoint is not None:
            env["MNIST_OPERATOR_TEST_FAILPOINT"] = test_failpoint
        process = OperatorProcess(env, self.directory / f"{identity}.log")
        self.started.append(process.start())
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


def wait_for_trainingrun(
    plane: ControlPlane, namespace: str, name: str, *, predicate: Any, timeout: float, what: str
) -> dict[str, Any]:
    """Polls the TrainingRun until predicate(object) holds; returns the object."""

    def check() -> dict[str, Any] | None:
        result = kubectl(plane, "get", "tr", name, "-n", namespace, "-o", "json")
        if result.returncode != 0:
            return None
        document: dict[str, Any] = json.loads(result.stdout)
        return document if predicate(document) else None

    try:
        found: dict[str, Any] = wait_until(
            check, timeout, f"TrainingRun {namespace}/{name} {what}", interval=0.5
        )
    except TimeoutError as error:
        current = kubectl(plane, "get", "tr", name, "-n", namespace, "-o", "yaml").stdout
        raise AssertionError(f"{error}; the TrainingRun is now:\n{current}") from error
    return found


def phase_in(*phases: str) -> Any:
    return lambda document: document.get("status", {}).get("phase") in phases


def serving_deployment(name: str, namespace: str, registered_model: str, replicas: int = 1) -> dict[str, Any]:
    """A stand-in for the chart's serving Deployment: the operator only sees labels and the template."""
    labels = {"app.kubernetes.io/name": "mnist-serving", "app.kubernetes.io/instance": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {**labels, "mnist-mlops.io/registered-model": registered_model},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "serving",
                            "image": "mnist-mlops/serving:test",
                            "env": [
                                {"name": "SERVING_MODEL_URI", "value": f"models:/{registered_model}@champion"}
                            ],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "readOnlyRootFilesystem": True,
                            },
                        }
                    ],
                },
            },
        },
    }


def wait_deployment_available(plane: ControlPlane, namespace: str, name: str, timeout: float = 60.0) -> None:
    kubectl_ok(
        plane, "rollout", "status", f"deployment/{name}", "-n", namespace, f"--timeout={int(timeout)}s"
    )
