"""Fixtures shared by the whole suite: real servers, started once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from training_job.mlflow_server import MlflowServer, start_mlflow_server
from training_job.result import TrainingResult

# Fixture modules of each area (tests/fixtures_<area>.py), shared across test files.
pytest_plugins: list[str] = [
    "tests.fixtures_chart",
    "tests.fixtures_node",
    "tests.fixtures_operator",
    "tests.fixtures_serving",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
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


# --- Kubernetes control plane (testing/controlplane.py) ---------------------------------------
# Imported here rather than at the top so this block stays self-contained.
from testing.controlplane import ControlPlane  # noqa: E402


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver + kube-controller-manager on loopback, shared by the session."""
    plane = ControlPlane.start()
    try:
        yield plane
    finally:
        plane.stop()


def run_training(
    mlflow_url: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the training Job's real entrypoint as a child process, as the container would."""
    return subprocess.run(
        [sys.executable, "-m", "training_job", "train", f"--tracking-uri={mlflow_url}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        cwd=REPO_ROOT,
    )


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
