"""Fixtures of the operator tests: the CRD on the test control plane, the operator's own RBAC and
ServiceAccount, a restartable MLflow server, the fake kubelet, and the operator as a real process.

The operator always runs as `python -m mnist_operator` with a kubeconfig holding a real token of
its ServiceAccount, so it has exactly the permissions of operator/rbac.yaml and nothing more.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from testing.controlplane import ControlPlane, wait_until
from tests.fake_kubelet import FakeKubelet
from training_job.mlflow_server import MlflowServer, free_port, start_mlflow_server

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_PATH = REPO_ROOT / "charts" / "mnist-mlops" / "crds" / "trainingruns.mnist-mlops.io.yaml"
RBAC_PATH = REPO_ROOT / "operator" / "rbac.yaml"
SEED_MANIFESTS = sorted((REPO_ROOT / "manifests" / "trainingruns").glob("*.yaml"))
KUBECTL = "/usr/bin/kubectl"
COMMAND_TIMEOUT_SECONDS = 60.0

OPERATOR_NAMESPACE = "mnist-operator-system"
OPERATOR_ACCOUNT = "mnist-operator"
LEASE_NAME = "mnist-operator"
WATCHED_PLACEHOLDER = "WATCHED_NAMESPACE"


def load_crd() -> dict[str, Any]:
    document = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(document, dict)
    return document


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def kubectl(
    plane: ControlPlane,
    *args: str,
    manifest: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    kubeconfig: Path | None = None,
    timeout: float = COMMAND_TIMEOUT_SECONDS,
) -> subprocess.CompletedProcess[str]:
    if isinstance(manifest, list):
        stdin: str | None = json.dumps({"apiVersion": "v1", "kind": "List", "items": manifest})
    else:
        stdin = json.dumps(manifest) if manifest is not None else None
    return subprocess.run(
        [KUBECTL, *args],
        input=stdin,
        env=plane.env(kubeconfig=kubeconfig),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def kubectl_ok(plane: ControlPlane, *args: str, **kwargs: Any) -> str:
    result = kubectl(plane, *args, **kwargs)
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def get_json(plane: ControlPlane, *args: str) -> Any:
    return json.loads(kubectl_ok(plane, "get", *args, "-o", "json"))


@pytest.fixture(scope="session")
def crd_installed(control_plane: ControlPlane) -> None:
    install_crd(control_plane)


# ------------------------------------------------------------------------ namespaces and RBAC


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
    kubectl_ok(plane, "apply", "--server-side", "-f", str(CRD_PATH))
    kubectl_ok(
        plane, "wait", "--for=condition=Established", "--timeout=60s", "crd/trainingruns.mnist-mlops.io"
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


@pytest.fixture(scope="session")
def operator_account(control_plane: ControlPlane, crd_installed: None) -> OperatorAccount:
    return install_operator_account(control_plane)


# ------------------------------------------------------------------------ MLflow and the fake kubelet


@dataclass
class RestartableMlflow:
    """A real MLflow server the tests may stop and start again on the same port and state."""

    state_dir: Path
    port: int
    server: MlflowServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = start_mlflow_server(self.state_dir, port=self.port)

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


@pytest.fixture(scope="session")
def operator_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableMlflow]:
    """The operator tests' own MLflow server: unlike the shared one, it may be stopped for a while."""
    mlflow = RestartableMlflow(tmp_path_factory.mktemp("operator-mlflow"), free_port())
    mlflow.start()
    yield mlflow
    mlflow.stop()


@pytest.fixture(scope="session")
def fake_kubelet(control_plane: ControlPlane, operator_mlflow: RestartableMlflow) -> Iterator[FakeKubelet]:
    kubelet = FakeKubelet(control_plane.kubeconfig_path, mlflow_url=operator_mlflow.url).start()
    yield kubelet
    kubelet.stop()


# ------------------------------------------------------------------------ the operator process


@dataclass
class OperatorProcess:
    """`python -m mnist_operator` as a child process with the ServiceAccount's kubeconfig."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MNIST_OPERATOR_HEALTH_PORT']}/healthz"

    def start(self) -> OperatorProcess:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mnist_operator"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                document = json.loads(response.read())
                return document if isinstance(document, dict) else {"body": document}
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def wait_healthy(self, timeout: float = 120.0) -> dict[str, Any]:
        """Until /healthz answers: as a standby, or as the leader (use is_leading to tell)."""

        def check() -> dict[str, Any] | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"the operator exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            return self.health()

        result: dict[str, Any] = wait_until(check, timeout, "the operator's /healthz")
        return result

    def is_leading(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log_tail()}")
        health = self.health()
        return health is not None and health.get("role") != "standby"

    def wait_leading(self, timeout: float = 120.0) -> None:
        wait_until(self.is_leading, timeout, "the operator to lead")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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
            }
        )
        environment.update({f"MNIST_OPERATOR_{key.upper()}": value for key, value in settings.items()})
        return environment

    def start(self, namespaces: list[str], identity: str | None = None, **settings: str) -> OperatorProcess:
        identity = identity or unique_name("operator")
        process = OperatorProcess(
            self.env(namespaces, identity, **settings), self.directory / f"{identity}.log"
        )
        self.started.append(process.start())
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture
def operators(
    control_plane: ControlPlane,
    operator_account: OperatorAccount,
    operator_mlflow: RestartableMlflow,
    tmp_path: Path,
) -> Iterator[OperatorFactory]:
    factory = OperatorFactory(control_plane, operator_account, operator_mlflow, tmp_path)
    yield factory
    factory.stop_all()
    # Keep the logs of a failing test visible in its report.
    for process in factory.started:
        print(f"--- operator log {process.log_path.name} ---\n{process.log_tail(40)}")


@pytest.fixture
def watched_namespace(
    control_plane: ControlPlane, operator_account: OperatorAccount, fake_kubelet: FakeKubelet
) -> Iterator[str]:
    """A fresh restricted namespace the operator may work in and the fake kubelet runs pods of."""
    namespace = create_namespace(control_plane, unique_name("tr"))
    operator_account.bind_namespace(namespace)
    fake_kubelet.watch(namespace)
    yield namespace
    kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


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


def seconds_since(start: float) -> float:
    return time.monotonic() - start
