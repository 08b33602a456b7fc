"""The prediction service over real HTTP: every endpoint, every kind of bad input, the hardening
headers, metrics and logs. One server (session fixture) serves the registered model by alias."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import EXPORTED_METRICS
from serving.settings import Settings
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import ALLOWED_ORIGIN, Mnist, b64, on_paper, png_bytes, raw_png

DEFAULTS = Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def confident(client: httpx.Client, serving_mnist_test: Mnist) -> list[int]:
    """Indices of test images the model gets right with a clear margin (the fixture model is trained
    for one short epoch; checks of the image pipeline should not hinge on its borderline cases)."""
    images, labels = serving_mnist_test
    body = {"instances": [{"pixels": images[i].tolist()} for i in range(128)]}
    predictions = client.post("/predict/batch", json=body).json()["predictions"]
    chosen = [i for i, p in enumerate(predictions) if p["digit"] == labels[i] and p["confidence"] > 0.6]
    assert len(chosen) >= 10, "the fixture model is too weak for these tests"
    return chosen


def assert_still_serving(client: httpx.Client, mnist: Mnist) -> None:
    assert client.get("/health/ready").status_code == 200
    response = client.post("/predict", json={"pixels": mnist[0][0].tolist()})
    assert response.status_code == 200, response.text


# --- health and metadata -------------------------------------------------------------------------


def test_health_reports_model_version_and_uptime(
    client: httpx.Client, served_model: ServedModel, served_version: str
) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok"
    assert body["model"]["name"] == served_model.name
    assert body["model"]["alias"] == "champion"
    assert body["model"]["uri"] == f"models:/{served_model.name}@champion"
    assert body["model"]["version"] == served_version
    assert body["model"]["state"] == "ready"
    assert body["model"]["tags"].get("architecture")
    assert body["uptime_seconds"] > 0
    assert health.headers["x-model-name"] == served_model.name
    assert health.headers["x-model-version"] == served_version

    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["model_version"] == served_version


def test_served_version_is_what_the_alias_named_at_start(
    served_model: ServedModel, served_version: str
) -> None:
    # The fixture's training run promoted its version; nothing else in this module moves the alias.
    import mlflow

    resolved = mlflow.MlflowClient(served_model.tracking_uri).get_model_version_by_alias(
        served_model.name, "champion"
    )
    assert resolved.version == served_version


# --- /predict ------------------------------------------------------------------------------------


def test_predict_pixels(client: httpx.Client, serving_mnist_test: Mnist, served_version: str) -> None:
    images, labels = serving_mnist_test
    response = client.post(
        "/predict", json={"pixels": images[0].tolist()}, headers={"X-Request-ID": "trace-abc.123"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "digit",
        "confidence",
        "probabilities",
        "inverted",
        "model_name",
        "model_version",
        "request_id",
        "latency_ms",
    }
    assert body["digit"] == labels[0]
    assert len(body["probabilities"]) == 10
    assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert body["confidence"] == max(body["probabilities"])
    assert body["probabilities"].index(body["confidence"]) == body["digit"]
    assert body["model_version"] == served_version
    assert body["request_id"] == "trace-abc.123" == response.headers["x-request-id"]
    assert 0 < body["latency_ms"] < 5000
    assert body["inverted"] is False
    assert response.headers["x-content-type-options"] == "nosniff"


def test_pixels_in_unit_range_and_dark_on_light_give_the_same_digit(
    client: httpx.Client, serving_mnist_test: Mnist, confident: list[int]
) -> None:
    images, labels = serving_mnist_test
    index = confident[1]
    digit = images[index]
    as_255 = client.post("/predict", json={"pixels": digit.tolist()}).json()
    as_unit = client.post("/predict", json={"pixels": (digit / 255.0).tolist()}).json()
    inverted = client.post("/predict", json={"pixels": (255 - digit).tolist()}).json()
    assert as_255["digit"] == as_unit["digit"] == inverted["digit"] == labels[index]
    assert as_255["probabilities"] == pytest.approx(as_unit["probabilities"], abs=1e-6)
    assert inverted["inverted"] is True and as_255["inverted"] is False


@pytest.mark.parametrize(
    "variant", ["png-gray", "png-rgba-transparent", "jpeg-photo", "webp", "raw-png-body", "data-url"]
)
def test_predict_images_of_any_size_and_mode(
    client: httpx.Client, serving_mnist_test: Mnist, confident: list[int], variant: str
) -> None:
    images, labels = serving_mnist_test
    index = confident[2]
    paper = on_paper(images[index])
    if variant == "png-gray":
        kwargs: dict[str, Any] = {"json": {"image": b64(png_bytes(paper))}}
    elif variant == "png-rgba-transparent":
        # A canvas export: black strokes, transparent background (alpha carries the drawing).
        rgba = np.zeros((*paper.shape, 4), np.uint8)
        rgba[..., 3] = 255 - paper
        kwargs = {"json": {"image": b64(png_bytes(rgba, "RGBA"))}}
    elif variant == "jpeg-photo":
        # Grey paper, uneven light, colour sensor noise, JPEG artefacts.
        rng = np.random.default_rng(0)
        shade = np.linspace(150, 200, paper.shape[1])[np.newaxis, :]
        gray = paper.astype(np.float64) / 255 * shade + 20
        rgb = np.clip(gray[..., np.newaxis] + rng.normal(0, 6, (*paper.shape, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=70)
        kwargs = {"json": {"image": b64(buffer.getvalue())}}
    elif variant == "webp":
        buffer = io.BytesIO()
        Image.fromarray(paper).save(buffer, format="WEBP", lossless=True)
        kwargs = {"json": {"image": b64(buffer.getvalue())}}
    elif variant == "raw-png-body":
        kwargs = {"content": png_bytes(paper), "headers": {"Content-Type": "image/png"}}
    else:
        kwargs = {"json": {"image": "data:image/png;base64," + b64(png_bytes(paper))}}
    response = client.post("/predict", **kwargs)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["digit"] == labels[index]
    # Every variant is dark ink on a light (or transparent, composited light) background.
    assert body["inverted"] is True


def test_predict_batch_keeps_order_and_mixes_kinds(
    client: httpx.Client, serving_mnist_test: Mnist, confident: list[int], served_version: str
) -> None:
    images, labels = serving_mnist_test
    chosen = confident[:6]
    instances: list[dict[str, Any]] = []
    for n, i in enumerate(chosen):
        instances.append(
            {"pixels": images[i].tolist()} if n % 2 else {"image": b64(png_bytes(on_paper(images[i])))}
        )
    response = client.post("/predict/batch", json={"instances": instances})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [p["digit"] for p in body["predictions"]] == [int(labels[i]) for i in chosen]
    assert [p["inverted"] for p in body["predictions"]] == [n % 2 == 0 for n in range(len(chosen))]
    assert body["model_version"] == served_version
    assert body["request_id"] == response.headers["x-request-id"]


# --- bad input: a clear 4xx, and the server keeps serving ------------------------------------------

_ROW = [0] * 28
_GRID = [_ROW] * 28


def _pixels_json(token: str) -> bytes:
    rows = ["[" + ",".join(["0"] * 28) + "]"] * 27
    rows.append("[" + ",".join([token] + ["0"] * 27) + "]")
    return ('{"pixels": [' + ",".join(rows) + "]}").encode()


def _bad_requests() -> list[Any]:
    truncated = png_bytes(np.full((64, 64), 128, np.uint8))
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("invalid-base64", {"json": {"image": "not base64 at all!"}}, 422, "not valid base64"),
        ("not-an-image", {"json": {"image": b64(b"hello, world")}}, 422, "not a PNG, JPEG or WebP"),
        ("truncated-png", {"json": {"image": b64(truncated[: len(truncated) // 2])}}, 422, "truncated"),
        ("zero-by-zero-png", {"json": {"image": b64(raw_png(0, 0, rows=b""))}}, 422, "image"),
        ("empty-image", {"json": {"image": ""}}, 422, "empty"),
        (
            "blank-image",
            {"json": {"image": b64(png_bytes(np.full((50, 50), 255, np.uint8)))}},
            422,
            "no digit",
        ),
        ("decompression-bomb", {"json": {"image": b64(raw_png(20000, 20000))}}, 413, "pixels"),
        (
            "raw-bomb-body",
            {"content": raw_png(20000, 20000), "headers": {"Content-Type": "image/png"}},
            413,
            "pixels",
        ),
        ("27-rows", {"json": {"pixels": _GRID[:27]}}, 422, "at least 28"),
        ("29-columns", {"json": {"pixels": [[0] * 29] * 28}}, 422, "at most 28"),
        ("flat-array", {"json": {"pixels": [0] * 784}}, 422, "pixels"),
        (
            "nan",
            {"content": _pixels_json("NaN"), "headers": {"Content-Type": "application/json"}},
            422,
            "finite",
        ),
        (
            "infinity",
            {"content": _pixels_json("Infinity"), "headers": {"Content-Type": "application/json"}},
            422,
            "finite",
        ),
        (
            "overflow-to-infinity",
            {"content": _pixels_json("1e999"), "headers": {"Content-Type": "application/json"}},
            422,
            "finite",
        ),
        (
            "string-pixel",
            {"content": _pixels_json('"7"'), "headers": {"Content-Type": "application/json"}},
            422,
            "number",
        ),
        (
            "bool-pixel",
            {"content": _pixels_json("true"), "headers": {"Content-Type": "application/json"}},
            422,
            "number",
        ),
        (
            "null-pixel",
            {"content": _pixels_json("null"), "headers": {"Content-Type": "application/json"}},
            422,
            "number",
        ),
        (
            "negative-pixel",
            {"content": _pixels_json("-1"), "headers": {"Content-Type": "application/json"}},
            422,
            "greater than or equal to 0",
        ),
        (
            "pixel-over-255",
            {"content": _pixels_json("256"), "headers": {"Content-Type": "application/json"}},
            422,
            "less than or equal to 255",
        ),
        ("image-not-string", {"json": {"image": 12}}, 422, "string"),
        ("missing-fields", {"json": {}}, 422, "exactly one of"),
        ("both-fields", {"json": {"image": "AAAA", "pixels": _GRID}}, 422, "exactly one of"),
        ("unknown-field", {"json": {"pixels": _GRID, "colour": "red"}}, 422, "colour"),
        ("json-array-root", {"json": [1, 2, 3]}, 422, "object"),
        (
            "invalid-json",
            {"content": b'{"pixels": [', "headers": {"Content-Type": "application/json"}},
            400,
            "not valid JSON",
        ),
        (
            "empty-body",
            {"content": b"", "headers": {"Content-Type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ("text-plain", {"content": b"7", "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
        ("no-content-type", {"content": b"{}", "headers": {"Content-Type": ""}}, 415, "Content-Type"),
        ("form-urlencoded", {"data": {"pixels": "1"}}, 415, "Content-Type"),
    ]
    return [pytest.param(kwargs, status, message, id=name) for name, kwargs, status, message in cases]


@pytest.mark.parametrize(("kwargs", "status", "message"), _bad_requests())
def test_bad_predict_input_gets_a_clear_4xx(
    client: httpx.Client, serving_mnist_test: Mnist, kwargs: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert message.lower() in body["error"].lower(), body
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    assert_still_serving(client, serving_mnist_test)


def test_bad_batches(client: httpx.Client, serving_mnist_test: Mnist) -> None:
    one = {"pixels": _GRID}
    too_many = client.post("/predict/batch", json={"instances": [one] * (DEFAULTS.max_batch_size + 1)})
    assert too_many.status_code == 413, too_many.text
    assert f"limit is {DEFAULTS.max_batch_size}" in too_many.json()["error"]
    empty = client.post("/predict/batch", json={"instances": []})
    assert empty.status_code == 422 and "at least 1" in empty.json()["error"]
    bad_item = client.post("/predict/batch", json={"instances": [one, {"image": "%%%"}]})
    assert bad_item.status_code == 422 and bad_item.json()["error"].startswith("instances[1]:")
    not_list = client.post("/predict/batch", json={"instances": one})
    assert not_list.status_code == 422
    wrong_type = client.post("/predict/batch", content=b"{}", headers={"Content-Type": "image/png"})
    assert wrong_type.status_code == 415
    assert_still_serving(client, serving_mnist_test)


def test_oversized_bodies_get_413(client: httpx.Client, serving_mnist_test: Mnist) -> None:
    limit = DEFAULTS.max_body_bytes
    padding = b" " * (limit + 1)
    declared = client.post(
        "/predict", content=b'{"pixels": []}' + padding, headers={"Content-Type": "application/json"}
    )
    assert declared.status_code == 413, declared.text
    assert str(limit) in declared.json()["error"]

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the limit must hold while the body streams in.
        yield b'{"image": "'
        for _ in range(limit // 65536 + 2):
            yield b"A" * 65536
        yield b'"}'

    chunked = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert_still_serving(client, serving_mnist_test)


def test_unknown_routes_and_methods(client: httpx.Client) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "Not Found"
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405 and "request_id" in wrong_method.json()


# --- Open Inference Protocol -----------------------------------------------------------------------


def test_v2_metadata_and_health(
    client: httpx.Client, served_model: ServedModel, served_version: str, input_name: str
) -> None:
    server = client.get("/v2").json()
    assert server["name"] == "mnist-serving" and server["extensions"] == ["binary_tensor_data"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    metadata = client.get(f"/v2/models/{served_model.name}").json()
    assert metadata["name"] == served_model.name
    assert metadata["versions"] == [served_version]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": input_name, "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    assert [o["name"] for o in metadata["outputs"]][1] == "predicted_digit"
    versioned = client.get(f"/v2/models/{served_model.name}/versions/{served_version}")
    assert versioned.json() == metadata
    assert client.get(f"/v2/models/{served_model.name}/ready").json() == {
        "name": served_model.name,
        "ready": True,
    }
    assert client.get(f"/v2/models/{served_model.name}/versions/{served_version}/ready").status_code == 200
    assert client.get("/v2/models/other-model").status_code == 404
    assert client.get(f"/v2/models/{served_model.name}/versions/999999/ready").status_code == 404


@pytest.mark.parametrize("layout", [(28, 28), (28, 28, 1), (784,)])
def test_v2_infer_matches_predict(
    *,
    client: httpx.Client,
    serving_mnist_test: Mnist,
    served_model: ServedModel,
    served_version: str,
    input_name: str,
    layout: tuple[int, ...],
) -> None:
    images = serving_mnist_test[0]
    batch = images[:5]
    uint8 = {"name": input_name, "shape": [5, *layout], "datatype": "UINT8", "data": batch.ravel().tolist()}
    fp32 = {
        "name": input_name,
        "shape": [5, *layout],
        "datatype": "FP32",
        "data": (batch.astype(np.float32) / 255).reshape(5, *layout).tolist(),  # nested, as the spec allows
    }
    for tensor in (uint8, fp32):
        response = client.post(
            f"/v2/models/{served_model.name}/infer", json={"id": "req-7", "inputs": [tensor]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == served_model.name and body["model_version"] == served_version
        assert body["id"] == "req-7"
        probabilities, digits = body["outputs"]
        assert probabilities["shape"] == [5, 10] and probabilities["datatype"] == "FP32"
        assert digits == {
            "name": "predicted_digit",
            "shape": [5],
            "datatype": "INT64",
            "data": digits["data"],
        }
        expected = client.post(
            "/predict/batch", json={"instances": [{"pixels": b.tolist()} for b in batch]}
        ).json()
        assert digits["data"] == [p["digit"] for p in expected["predictions"]]
        flat = [p for prediction in expected["predictions"] for p in prediction["probabilities"]]
        assert probabilities["data"] == pytest.approx(flat, abs=1e-6)


def test_v2_requested_outputs_and_versioned_infer(
    client: httpx.Client,
    serving_mnist_test: Mnist,
    served_model: ServedModel,
    served_version: str,
    input_name: str,
) -> None:
    tensor = {
        "name": input_name,
        "shape": [1, 784],
        "datatype": "UINT8",
        "data": serving_mnist_test[0][0].ravel().tolist(),
    }
    body = {"inputs": [tensor], "outputs": [{"name": "predicted_digit"}]}
    response = client.post(f"/v2/models/{served_model.name}/versions/{served_version}/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = response.json()["outputs"]
    assert [o["name"] for o in outputs] == ["predicted_digit"]
    assert outputs[0]["data"] == [int(serving_mnist_test[1][0])]
    assert response.json()["id"] == response.headers["x-request-id"]


def _v2_bad_requests(input_name: str) -> list[tuple[str, dict[str, Any], int, str]]:
    def tensor(**overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"name": input_name, "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}
        return {"inputs": [{**base, **overrides}]}

    return [
        ("wrong-shape", tensor(shape=[1, 27, 27], data=[0] * 729), 422, "is not [N,28,28]"),
        ("zero-batch", tensor(shape=[0, 784], data=[]), 422, "at least 1"),
        ("batch-too-large", tensor(shape=[DEFAULTS.max_batch_size + 1, 784], data=[0]), 413, "limit"),
        ("size-mismatch", tensor(data=[0] * 783), 422, "needs 784"),
        ("ragged", tensor(shape=[2, 28, 28], data=[[0] * 28] * 28 + [[0] * 27] * 28), 422, "ragged"),
        ("string-data", tensor(data=["0"] * 784), 422, "only numbers"),
        ("null-data", tensor(data=[None] * 784), 422, "only numbers"),
        ("bool-data", tensor(data=[True] * 784), 422, "only numbers"),
        ("uint8-float", tensor(data=[0.5] * 784), 422, "integers"),
        ("uint8-range", tensor(data=[256] * 784), 422, "0..255"),
        ("fp32-range", tensor(datatype="FP32", data=[255.0] * 784), 422, "scaled to 0..1"),
        ("fp32-negative", tensor(datatype="FP32", data=[-0.5] * 784), 422, "scaled to 0..1"),
        ("unsupported-datatype", tensor(datatype="INT64"), 422, "not supported"),
        ("unknown-datatype", tensor(datatype="FLOAT"), 422, "datatype"),
        ("unknown-input", tensor(name="x"), 422, "unknown input"),
        ("two-inputs", {"inputs": [tensor()["inputs"][0]] * 2}, 422, "at most 1"),
        ("no-inputs", {"inputs": []}, 422, "at least 1"),
        ("missing-inputs", {}, 422, "inputs"),
        ("unknown-output", {**tensor(), "outputs": [{"name": "logits"}]}, 422, "unknown output"),
        ("shape-not-list", tensor(shape="1,784"), 422, "shape"),
        ("negative-dimension", tensor(shape=[1, -784]), 422, "greater than or equal to 0"),
    ]


def test_bad_v2_input_gets_a_clear_4xx(
    client: httpx.Client, serving_mnist_test: Mnist, served_model: ServedModel, input_name: str
) -> None:
    url = f"/v2/models/{served_model.name}/infer"
    for name, body, status, message in _v2_bad_requests(input_name):
        response = client.post(url, json=body)
        assert response.status_code == status, (name, response.text)
        assert message.lower() in response.json()["error"].lower(), (name, response.json())
    nan = (
        b'{"inputs": [{"name": "%s", "shape": [1, 784], "datatype": "FP32", "data": [NaN'
        % input_name.encode()
    )
    nan += b", 0" * 783 + b"]}]}"
    response = client.post(url, content=nan, headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422) and "nan" in response.json()["error"].lower(), response.text
    assert client.post("/v2/models/not-served/infer", json={}).status_code == 404
    assert client.post(f"/v2/models/{served_model.name}/versions/999999/infer", json={}).status_code == 404
    assert client.post(url, content=b"x", headers={"Content-Type": "text/csv"}).status_code == 415
    assert_still_serving(client, serving_mnist_test)


# --- metrics, logs, headers ------------------------------------------------------------------------


def _metrics(client: httpx.Client) -> tuple[dict[str, Any], str]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}, response.text


def _sample(families: dict[str, Any], name: str, sample: str, **labels: str) -> float:
    family = families[name]
    for s in family.samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


def test_metrics_follow_the_contract_and_count(
    client: httpx.Client, serving_mnist_test: Mnist, served_version: str
) -> None:
    images, labels = serving_mnist_test
    before, text = _metrics(client)
    declared = set(re.findall(r"^# TYPE (mnist_\w+) ", text, flags=re.MULTILINE))
    assert declared == set(EXPORTED_METRICS)
    assert not [name for name in declared if name.endswith("_created")]

    digit = int(labels[0])
    predicted_before = _sample(before, "mnist_predictions", "mnist_predictions_total", digit=str(digit))
    bad_before = _sample(
        before, "mnist_http_requests", "mnist_http_requests_total", route="/predict", status="422"
    )
    for _ in range(3):
        assert client.post("/predict", json={"pixels": images[0].tolist()}).status_code == 200
    assert client.post("/predict", json={"pixels": [[0]]}).status_code == 422
    after, _ = _metrics(client)

    assert (
        _sample(after, "mnist_predictions", "mnist_predictions_total", digit=str(digit))
        == predicted_before + 3
    )
    assert (
        _sample(after, "mnist_http_requests", "mnist_http_requests_total", route="/predict", status="422")
        == bad_before + 1
    )
    assert (
        _sample(
            after,
            "mnist_http_requests",
            "mnist_http_requests_total",
            method="POST",
            route="/predict",
            status="200",
        )
        >= 3
    )
    assert (
        _sample(
            after,
            "mnist_model_info",
            "mnist_model_info",
            model_version=served_version,
            model_alias="champion",
        )
        == 1
    )
    assert _sample(after, "mnist_model_ready", "mnist_model_ready") == 1
    assert 0 < _sample(after, "mnist_model_load_duration_seconds", "mnist_model_load_duration_seconds") < 120
    latency = _sample(
        after,
        "mnist_prediction_latency_seconds",
        "mnist_prediction_latency_seconds_count",
        endpoint="predict",
    )
    assert latency >= 3
    confidence_count = _sample(after, "mnist_prediction_confidence", "mnist_prediction_confidence_count")
    assert confidence_count >= 3
    assert 0 < _sample(after, "mnist_prediction_confidence_recent", "mnist_prediction_confidence_recent") <= 1
    intensity_sum = _sample(after, "mnist_input_mean_intensity", "mnist_input_mean_intensity_sum")
    intensity_count = _sample(after, "mnist_input_mean_intensity", "mnist_input_mean_intensity_count")
    assert 0.02 < intensity_sum / intensity_count < 0.4  # MNIST-like inputs average ~0.13
    assert (
        _sample(after, "mnist_http_requests_in_flight", "mnist_http_requests_in_flight") >= 1
    )  # this scrape


def test_structured_logs_carry_request_ids(
    client: httpx.Client, serving_server: ServingProcess, serving_mnist_test: Mnist
) -> None:
    client.post(
        "/predict",
        json={"pixels": serving_mnist_test[0][0].tolist()},
        headers={"X-Request-ID": "log-check-42"},
    )
    client.post("/predict", json={"image": "???"}, headers={"X-Request-ID": "log-check-43"})
    deadline = time.monotonic() + 10
    while True:
        # The access log line is written once the response is on its way: it may trail the reply.
        records = serving_server.log_records()
        access = {
            r["request_id"]: r for r in records if r.get("logger") == "serving.access" and "request_id" in r
        }
        if {"log-check-42", "log-check-43"} <= access.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all("unparsed" not in r for r in records), [r for r in records if "unparsed" in r][:3]
    assert access["log-check-42"]["status"] == 200 and access["log-check-42"]["route"] == "/predict"
    assert access["log-check-43"]["status"] == 422
    assert float(access["log-check-42"]["duration_ms"]) > 0  # type: ignore[arg-type]
    assert any(r.get("msg") == "model ready" for r in records)


def test_server_process_has_no_tensorflow(serving_server: ServingProcess) -> None:
    """The serving image ships without TensorFlow. This server fetched its model with a cold cache
    (so MLflow's client was imported) and has served requests: no TensorFlow library is mapped."""
    maps = Path(f"/proc/{serving_server.process.pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check can see native modules
    assert "tensorflow" not in maps.lower()


def test_request_ids_are_generated_or_sanitised(client: httpx.Client) -> None:
    generated = client.get("/health/live").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    hostile = client.get("/health/live", headers={"X-Request-ID": "a" * 200}).headers["x-request-id"]
    assert hostile != "a" * 200 and re.fullmatch(r"[0-9a-f]{32}", hostile)
    injected = client.get("/health/live", headers={"X-Request-ID": 'x"y<script>'}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", injected)


def test_cors(client: httpx.Client) -> None:
    preflight = client.options(
        "/predict",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    simple = client.get("/health/live", headers={"Origin": ALLOWED_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-model-version" in simple.headers["access-control-expose-headers"].lower()
    other = client.options(
        "/predict", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
    )
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers


def test_openapi_document_and_docs(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    for path in (
        "/predict",
        "/predict/batch",
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v2/models/{name}/infer",
    ):
        assert path in schema["paths"], path
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/PredictRequest"}
    assert "image/png" in body
    assert "PredictRequest" in schema["components"]["schemas"]
    assert "V2Tensor" in schema["components"]["schemas"]
    assert "/" not in schema["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_web_page_is_self_contained(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = [page.text]
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200, asset
        assets.append(response.text)
    for text in assets:
        # No CDN, no fonts, no analytics: an offline cluster must render the page.
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), text[:200]
        assert "url(http" not in text and "import(" not in text
    assert 'id="pad"' in page.text and 'id="upload"' in page.text
