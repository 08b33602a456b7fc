"""Fixtures more than one area of the suite uses: real servers, started once per session. Each area's
own fixtures are in its directory's conftest.py (tests/serving/, tests/mnist_operator/, tests/e2e/)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.result import TrainingResult
from local_mode.mlflow_server import MlflowServer, start_mlflow_server
from testing.controlplane import ControlPlane
from testing.helm import CI_DIR, SCENARIOS, Helm, Rendered, helm_binary, parse_documents, values_file
from testing.operator_harness import install_crd
from testing.postgres import PostgresServer
from testing.training import REPO_ROOT, run_training

MNIST_PATH = Path(os.environ.get("MNIST_NPZ", REPO_ROOT / "data" / "mnist.npz"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` process on a free loopback port, with SQLite and served artifacts."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    assert MNIST_PATH.exists(), f"the bundled MNIST file is missing at {MNIST_PATH}"
    return MNIST_PATH


@pytest.fixture(scope="session")
def crd_installed(control_plane: ControlPlane) -> None:
    """The TrainingRun CRD on the session's API server (the chart, contract and operator tests use it)."""
    install_crd(control_plane)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver + kube-controller-manager on loopback, shared by the session."""
    plane = ControlPlane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def registered_model(mlflow_server: MlflowServer, mnist_path: Path) -> TrainingResult:
    """A small CNN trained briefly by the real entrypoint, registered, and aliased `champion`."""
    completed = run_training(
        mlflow_server.url,
        "--architecture=baseline",
        "--epochs=1",
        "--max-train-samples=6000",
        "--run-name=fixture-baseline",
        f"--data={mnist_path}",
        "--promote",
    )
    assert completed.returncode == 0, f"training failed:\n{completed.stderr[-4000:]}"
    result = TrainingResult.from_json(completed.stdout.strip().splitlines()[-1])
    assert result.promoted, result.promotion_reason
    return result


# --- the chart, rendered once (the chart tests and the serving monitoring tests) -------------------


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


# --- PostgreSQL (the prediction log in the cluster; the drift, retraining and serving tests) ------------


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL 15 server (initdb'd throw-away cluster on a free loopback port); each test
    makes its own database with `create_database`."""
    server = PostgresServer.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()
