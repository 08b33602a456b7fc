"""Fixtures of the serving tests: the real `python -m serving` process (uvicorn over HTTP on
loopback) serving the registered model from the real MLflow server."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from contract.result import TrainingResult
from local_mode.mlflow_server import MlflowServer
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import ALLOWED_ORIGIN, CHAMPION, Mnist


@pytest.fixture(scope="session")
def served_model(registered_model: TrainingResult, mlflow_server: MlflowServer) -> ServedModel:
    """The registered model our servers serve: the lead's briefly-trained CNN, ONNX flavor."""
    return ServedModel(
        name=registered_model.registered_model,
        version=registered_model.model_version,
        tracking_uri=mlflow_server.url,
        keras_model_uri=registered_model.keras_model_uri,
    )


@pytest.fixture(scope="session")
def serving_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared artifact cache: the first server downloads, later ones start warm."""
    return tmp_path_factory.mktemp("serving-cache")


@pytest.fixture(scope="session")
def serving_server(
    served_model: ServedModel, serving_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingProcess]:
    """The service with its production defaults, resolving the `champion` alias at start-up."""
    server = ServingProcess.start(
        tmp_path_factory.mktemp("serving"),
        tracking_uri=served_model.tracking_uri,
        model_uri=f"models:/{served_model.name}@{CHAMPION}",
        cache_dir=serving_cache_dir,
        env={"SERVING_CORS_ORIGINS": ALLOWED_ORIGIN},
    )
    yield server
    code = server.stop()
    log = server.log_text()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status names the signal.
    assert code in (0, -signal.SIGTERM), f"serving exited with {code}:\n{server.log_tail()}"
    assert "Finished server process" in log
    assert "unhandled error" not in log, f"the server hit an unexpected exception:\n{server.log_tail(200)}"


@pytest.fixture(scope="session")
def served_version(serving_server: ServingProcess) -> str:
    """The version the champion alias resolved to when the server started."""
    version = httpx.get(serving_server.url + "/health", timeout=5).json()["model"]["version"]
    assert isinstance(version, str)
    return version


@pytest.fixture(scope="session")
def serving_mnist_test(mnist_path: Path) -> Mnist:
    with np.load(mnist_path) as data:
        return data["x_test"], data["y_test"]


@pytest.fixture(scope="module")
def client(serving_server: ServingProcess) -> Iterator[httpx.Client]:
    """An HTTP client on the session's server, one per test module."""
    with httpx.Client(base_url=serving_server.url, timeout=30) as http:
        yield http


@pytest.fixture(scope="module")
def input_name(client: httpx.Client, served_model: ServedModel) -> str:
    """The served model's input tensor name, as its OIP metadata gives it."""
    name: str = client.get(f"/v2/models/{served_model.name}").json()["inputs"][0]["name"]
    return name
