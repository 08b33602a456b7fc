"""Accuracy over the whole MNIST test set through the HTTP API equals the model's offline accuracy:
the service neither drops nor distorts anything between the wire and the model."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image

from serving import preprocess
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import Mnist, b64

CHUNK = 250
# The encoded-image path decodes and re-centres every image on both sides; a fifth of the test set
# shows it changes no prediction, and keeps the test short. Arrays and v2 tensors cover all 10,000.
PNG_IMAGES = 2000


def offline_session(served_model: ServedModel, version: str, tmp_path: Path) -> ort.InferenceSession:
    """The served version's model.onnx, fetched with MLflow's own client (not the service's code)."""
    import mlflow

    uri = served_model.tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(served_model.name, version),
            dst_path=str(tmp_path),
            tracking_uri=served_model.tracking_uri,
        )
    )
    return ort.InferenceSession(str(next(local.rglob("model.onnx"))), providers=["CPUExecutionProvider"])


def offline_predict(session: ort.InferenceSession, images: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    model_input = session.get_inputs()[0]
    shape = [int(d) for d in model_input.shape[1:]]
    predictions = [
        session.run(None, {model_input.name: images[i : i + 1000].reshape(-1, *shape)})[0].argmax(axis=1)
        for i in range(0, len(images), 1000)
    ]
    return np.concatenate(predictions)


def png(image: npt.NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_http_accuracy_equals_offline_accuracy(
    serving_server: ServingProcess,
    served_model: ServedModel,
    served_version: str,
    serving_mnist_test: Mnist,
    tmp_path: Path,
) -> None:
    images, labels = serving_mnist_test
    session = offline_session(served_model, served_version, tmp_path)
    raw = images.astype(np.float32) / np.float32(255)
    offline_raw = offline_predict(session, raw)
    encoded = [png(image) for image in images[:PNG_IMAGES]]
    offline_png = offline_predict(
        session, np.stack([preprocess.from_image_bytes(data, max_pixels=10**6)[0] for data in encoded])
    )

    http_v2: list[int] = []
    http_pixels: list[int] = []
    http_png: list[int] = []
    with httpx.Client(base_url=serving_server.url, timeout=120) as client:
        input_name = client.get(f"/v2/models/{served_model.name}").json()["inputs"][0]["name"]
        for start in range(0, len(images), CHUNK):
            chunk = images[start : start + CHUNK]
            tensor = {
                "name": input_name,
                "shape": [len(chunk), 784],
                "datatype": "UINT8",
                "data": chunk.ravel().tolist(),
            }
            response = client.post(f"/v2/models/{served_model.name}/infer", json={"inputs": [tensor]})
            assert response.status_code == 200, response.text
            digits = next(o for o in response.json()["outputs"] if o["name"] == "predicted_digit")
            http_v2.extend(digits["data"])

            batch = {"instances": [{"pixels": image.tolist()} for image in chunk]}
            response = client.post("/predict/batch", json=batch)
            assert response.status_code == 200, response.text
            http_pixels.extend(p["digit"] for p in response.json()["predictions"])

            if start < PNG_IMAGES:
                batch = {"instances": [{"image": b64(data)} for data in encoded[start : start + CHUNK]]}
                response = client.post("/predict/batch", json=batch)
                assert response.status_code == 200, response.text
                http_png.extend(p["digit"] for p in response.json()["predictions"])

    assert len(http_v2) == len(http_pixels) == len(labels) == 10_000
    assert len(http_png) == PNG_IMAGES
    # Same predictions, image by image, so the same accuracy.
    assert np.array_equal(np.asarray(http_v2), offline_raw)
    assert np.array_equal(np.asarray(http_pixels), offline_raw)
    assert np.array_equal(np.asarray(http_png), offline_png)
    accuracy = float((offline_raw == labels).mean())
    assert float((np.asarray(http_v2) == labels).mean()) == accuracy
    png_labels = labels[:PNG_IMAGES]
    assert float((np.asarray(http_png) == png_labels).mean()) == float((offline_png == png_labels).mean())

    # And it is the accuracy training measured with Keras on the same version (ONNX conversion may
    # flip a borderline image or two).
    tags = httpx.get(serving_server.url + "/health", timeout=10).json()["model"]["tags"]
    assert abs(accuracy - float(tags["test_accuracy"])) <= 0.002, (accuracy, tags["test_accuracy"])
