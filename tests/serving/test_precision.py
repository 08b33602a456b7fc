"""SERVING_MODEL_PRECISION=int8: the same registered version served through the int8 model training
quantised from it, next to the session's float32 server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import yaml

from serving.model_store import INT8_ARTIFACT_TAG, ONNX_FILENAME
from testing.helm import Helm
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import CHAMPION, Mnist
from training_job.train import INT8_ARTIFACT_TAG as TRAINING_INT8_ARTIFACT_TAG

CHUNK = 250
IMAGES = 1000


@pytest.fixture(scope="module")
def int8_server(
    served_model: ServedModel, serving_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingProcess]:
    """The champion alias again, int8, sharing the float server's cache directory."""
    server = ServingProcess.start(
        tmp_path_factory.mktemp("serving-int8"),
        tracking_uri=served_model.tracking_uri,
        model_uri=f"models:/{served_model.name}@{CHAMPION}",
        cache_dir=serving_cache_dir,
        env={"SERVING_MODEL_PRECISION": "int8"},
    )
    yield server
    server.stop()


def predict(server: ServingProcess, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    digits: list[int] = []
    probabilities: list[list[float]] = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for start in range(0, len(images), CHUNK):
            batch = {"instances": [{"pixels": image.tolist()} for image in images[start : start + CHUNK]]}
            response = client.post("/predict/batch", json=batch)
            assert response.status_code == 200, response.text
            for prediction in response.json()["predictions"]:
                digits.append(prediction["digit"])
                probabilities.append(prediction["probabilities"])
    return np.asarray(digits), np.asarray(probabilities)


def test_the_tag_name_is_the_one_training_writes() -> None:
    assert INT8_ARTIFACT_TAG == TRAINING_INT8_ARTIFACT_TAG


def test_int8_serves_the_same_version_with_predictions_like_the_float_model(
    *,
    serving_server: ServingProcess,
    int8_server: ServingProcess,
    served_version: str,
    served_model: ServedModel,
    serving_cache_dir: Path,
    serving_mnist_test: Mnist,
) -> None:
    float_health = httpx.get(serving_server.url + "/health", timeout=10).json()["model"]
    int8_health = httpx.get(int8_server.url + "/health", timeout=10).json()["model"]
    assert float_health["precision"] == "float32"
    assert int8_health["precision"] == "int8"
    assert int8_health["version"] == served_version
    assert int8_health["tags"][INT8_ARTIFACT_TAG].endswith("/onnx-int8")

    # Both models in the one cache, side by side under the version; the int8 one is quantised.
    cached = serving_cache_dir / served_model.name
    int8_model = onnx.load(str(cached / f"{served_version}-int8" / ONNX_FILENAME))
    assert "QuantizeLinear" in {node.op_type for node in int8_model.graph.node}
    assert (cached / served_version / ONNX_FILENAME).is_file()

    images, labels = serving_mnist_test[0][:IMAGES], serving_mnist_test[1][:IMAGES]
    float_digits, float_probabilities = predict(serving_server, images)
    int8_digits, int8_probabilities = predict(int8_server, images)
    # A different model answers (quantised arithmetic moves every probability a little) ...
    assert not np.allclose(float_probabilities, int8_probabilities, atol=1e-6)
    # ... with the float model's digits but for an occasional borderline image.
    agreement = float(np.mean(float_digits == int8_digits))
    assert agreement >= 0.98, agreement
    float_accuracy, int8_accuracy = (
        float(np.mean(float_digits == labels)),
        float(np.mean(int8_digits == labels)),
    )
    assert abs(float_accuracy - int8_accuracy) <= 0.01, (float_accuracy, int8_accuracy)


@pytest.fixture
def version_without_int8(served_model: ServedModel) -> Iterator[str]:
    """A registered version without the int8 tag, as every version trained before quantisation."""
    import mlflow

    client = mlflow.MlflowClient(served_model.tracking_uri)
    # The served version's float model, registered again: a float32 server would serve it.
    served = client.get_model_version(served_model.name, served_model.version)
    assert served.source is not None
    name = f"serving-test-float-only-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    try:
        # MLflow 3 registers a logged model (source models:/m-...) only when told its id.
        model_id = served.source.removeprefix("models:/")
        version = client.create_model_version(name, served.source, run_id=served.run_id, model_id=model_id)
        yield f"models:/{name}/{version.version}"
    finally:
        client.delete_registered_model(name)


def test_int8_of_a_version_without_an_int8_model_is_a_permanent_error(
    served_model: ServedModel, version_without_int8: str, tmp_path: Path
) -> None:
    server = ServingProcess.start(
        tmp_path,
        tracking_uri=served_model.tracking_uri,
        model_uri=version_without_int8,
        cache_dir=tmp_path / "cache",
        env={"SERVING_MODEL_PRECISION": "int8", "SERVING_LOAD_RETRY_MAX_SECONDS": "0.5"},
        wait_ready=False,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            health = httpx.get(server.url + "/health", timeout=10)
            error = health.json()["model"]["last_error"] or ""
            if "not retrying" in error:
                break
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        assert health.status_code == 503
        assert health.json()["model"]["precision"] == "int8"
        assert "has no int8 model" in error and "SERVING_MODEL_PRECISION=float32" in error, error
        # Refused before any download: nothing was cached for it.
        assert not any((tmp_path / "cache").rglob(ONNX_FILENAME))
    finally:
        server.stop()


def test_the_chart_passes_the_precision_and_refuses_an_unknown_one(helm: Helm) -> None:
    def precision(*set_values: str) -> str | None:
        rendered = helm.template(set_values=list(set_values)).stdout
        (deployment,) = [
            doc
            for doc in yaml.safe_load_all(rendered)
            if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("-serving")
        ]
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        return next((item["value"] for item in env if item["name"] == "SERVING_MODEL_PRECISION"), None)

    assert precision() == "float32"
    assert precision("serving.modelPrecision=int8") == "int8"
    refused = helm.template(set_values=["serving.modelPrecision=int4"], check=False)
    assert refused.returncode != 0 and "modelPrecision" in refused.stderr
