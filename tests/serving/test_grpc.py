"""The Open Inference Protocol over gRPC, as clients we do not write see it: Triton's `tritonclient.grpc`
(unmodified, in its own virtualenv: it needs protobuf < 7) against the real `python -m serving`
process, next to the HTTP answers of the same process; and the standard gRPC health service.

The clients run as scripts in the peer virtualenv: they read a JSON job on stdin and print JSON."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from local_mode.processes import free_port
from serving.grpc import health_pb2, health_pb2_grpc
from testing.peers import peer_python
from testing.serving import REPO_ROOT, ServedModel, ServingProcess
from tests.serving.payloads import Mnist

INFERENCE_SERVICE = "inference.GRPCInferenceService"

# Triton's client as its users call it: health, metadata, inference with raw tensors (its default).
TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

def call(method, *args, **kwargs):
    try:
        return method(*args, **kwargs)
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}

job = json.load(sys.stdin)
client = triton.InferenceServerClient(job["target"])
name = job["model"]
out = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model_ready": call(client.is_model_ready, name),
    "version_ready": call(client.is_model_ready, name, job["version"]),
    "server": client.get_server_metadata(as_json=True),
    "metadata": call(client.get_model_metadata, name, as_json=True),
    "results": [],
}
for request in job["requests"]:
    array = np.asarray(request["data"], dtype=request["dtype"]).reshape(request["shape"])
    tensor = triton.InferInput(request["input"], list(array.shape), request["datatype"])
    tensor.set_data_from_numpy(array)
    outputs = [triton.InferRequestedOutput(o) for o in request["outputs"]] or None
    result = call(
        client.infer, request.get("model", name), [tensor], model_version=request.get("version", ""),
        outputs=outputs, request_id=request.get("id", ""), headers=request.get("headers"),
    )
    if isinstance(result, dict):
        out["results"].append(result)
        continue
    response = result.get_response()
    out["results"].append({
        "status": "OK",
        "id": response.id,
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": {
            t.name: {"datatype": t.datatype, "shape": list(t.shape), "data": result.as_numpy(t.name).tolist()}
            for t in response.outputs
        },
    })
print(json.dumps(out))
"""

# The protocol's own messages (Triton's generated ones), for what the high-level client never sends:
# typed `contents` instead of raw bytes, two inputs, contents and raw bytes at once.
STUBS_SCRIPT = """
import json, sys
import grpc
from tritonclient.grpc import service_pb2 as pb, service_pb2_grpc

job = json.load(sys.stdin)
stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(job["target"]))
out = []
for case in job["cases"]:
    request = pb.ModelInferRequest(model_name=job["model"])
    for spec in case["inputs"]:
        tensor = request.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        if spec.get("uint"):
            tensor.contents.uint_contents.extend(spec["uint"])
        if spec.get("fp32"):
            tensor.contents.fp32_contents.extend(spec["fp32"])
    request.raw_input_contents.extend(bytes.fromhex(raw) for raw in case.get("raw", []))
    try:
        response = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as exc:
        out.append({"status": exc.code().name, "message": exc.details()})
        continue
    out.append({
        "status": "OK",
        "raw": len(response.raw_output_contents),
        "outputs": {
            t.name: {
                "shape": list(t.shape),
                "fp32": list(t.contents.fp32_contents),
                "int64": list(t.contents.int64_contents),
            }
            for t in response.outputs
        },
    })
print(json.dumps(out))
"""


def run_peer(script: str, job: dict[str, Any]) -> Any:
    completed = subprocess.run(
        [str(peer_python("tritonclient")), "-c", script],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=300,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout)


@pytest.fixture(scope="module")
def target(serving_server: ServingProcess) -> str:
    assert serving_server.grpc_port, "the test server runs without gRPC"
    return f"127.0.0.1:{serving_server.grpc_port}"


def rest_predictions(client: httpx.Client, images: np.ndarray[Any, Any]) -> list[dict[str, Any]]:
    response = client.post("/predict/batch", json={"instances": [{"pixels": i.tolist()} for i in images]})
    assert response.status_code == 200, response.text
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def infer_request(input_name: str, images: np.ndarray[Any, Any], **extra: Any) -> dict[str, Any]:
    """FP32 in 0..1, [N,28,28]: what the model metadata advertises."""
    return {
        "input": input_name,
        "datatype": "FP32",
        "dtype": "float32",
        "shape": list(images.shape),
        "data": (images.astype(np.float32) / 255).ravel().tolist(),
        "outputs": [],
        **extra,
    }


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# --- tritonclient --------------------------------------------------------------------------------


def test_tritonclient_health_metadata_and_inference_match_rest(
    *,
    client: httpx.Client,
    serving_server: ServingProcess,
    target: str,
    served_model: ServedModel,
    served_version: str,
    input_name: str,
    serving_mnist_test: Mnist,
) -> None:
    images, labels = serving_mnist_test
    batch = images[:64]
    uint8_flat = {
        "input": input_name,
        "datatype": "UINT8",
        "dtype": "uint8",
        "shape": [8, 784],
        "data": images[64:72].ravel().tolist(),
        "outputs": ["predicted_digit"],
        "version": served_version,
        "id": "req-42",
    }
    job = {
        "target": target,
        "model": served_model.name,
        "version": served_version,
        "requests": [infer_request(input_name, batch, headers={"x-request-id": "grpc-trace-7"}), uint8_flat],
    }
    out = run_peer(TRITON_SCRIPT, job)

    assert (out["live"], out["ready"], out["model_ready"], out["version_ready"]) == (True, True, True, True)
    assert out["server"]["name"] == "mnist-serving"
    metadata = out["metadata"]
    assert metadata["name"] == served_model.name and metadata["versions"] == [served_version]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [(input_name, "FP32")]
    assert {t["name"]: t["datatype"] for t in metadata["outputs"]}["predicted_digit"] == "INT64"
    # The same tensors as over HTTP (int64 dimensions are strings in protobuf's JSON).
    rest_metadata = client.get(f"/v2/models/{served_model.name}").json()
    for kind in ("inputs", "outputs"):
        tensors = [{**t, "shape": [int(d) for d in t["shape"]]} for t in metadata[kind]]
        assert tensors == rest_metadata[kind]
    assert rest_metadata["inputs"][0]["shape"][0] == -1

    fp32, flat = out["results"]
    assert fp32["status"] == "OK", fp32
    assert (fp32["model_name"], fp32["model_version"]) == (served_model.name, served_version)
    # No `id` in the request: the response carries the request id (the header's), as over HTTP.
    assert fp32["id"] == "grpc-trace-7"
    expected = rest_predictions(client, batch)
    digits = fp32["outputs"]["predicted_digit"]
    assert (digits["datatype"], digits["shape"]) == ("INT64", [64])
    assert digits["data"] == [p["digit"] for p in expected]
    probabilities = fp32["outputs"][metadata["outputs"][0]["name"]]
    assert (probabilities["datatype"], probabilities["shape"]) == ("FP32", [64, 10])
    assert np.asarray(probabilities["data"]) == pytest.approx(
        np.asarray([p["probabilities"] for p in expected]), abs=1e-6
    )
    # The fixture model is briefly trained, but far better than chance on MNIST.
    assert np.mean(np.asarray(digits["data"]) == labels[:64]) > 0.8

    assert flat["status"] == "OK", flat
    assert flat["id"] == "req-42"
    assert list(flat["outputs"]) == ["predicted_digit"]
    assert flat["outputs"]["predicted_digit"]["data"] == [
        p["digit"] for p in rest_predictions(client, images[64:72])
    ]

    # The access log line, under the request id the client sent.
    logged = [r for r in serving_server.log_records() if r.get("request_id") == "grpc-trace-7"]
    assert [(r["route"], r["status"]) for r in logged] == [
        ("/inference.GRPCInferenceService/ModelInfer", "OK")
    ], logged


def test_errors_are_grpc_statuses_with_reasons(
    target: str, served_model: ServedModel, input_name: str, serving_mnist_test: Mnist
) -> None:
    image = serving_mnist_test[0][:1]
    bad_shape = {**infer_request(input_name, image), "shape": [1, 28, 28], "data": [0.5] * 27 * 27}
    bad_shape["shape"] = [1, 27, 27]
    requests = [
        bad_shape,
        {**infer_request(input_name, image), "model": "no-such-model"},
        {**infer_request(input_name, image), "version": "999999"},
        {**infer_request(input_name, image), "input": "pixels"},
        {**infer_request(input_name, image), "outputs": ["logits"]},
        {**infer_request(input_name, image), "data": [2.0] * 784},
    ]
    out = run_peer(
        TRITON_SCRIPT, {"target": target, "model": served_model.name, "version": "", "requests": requests}
    )
    shape, model, version, name, output, scale = out["results"]
    assert shape["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "[1, 27, 27]" in shape["message"] and "[N,28,28]" in shape["message"]
    assert model["status"] == "StatusCode.NOT_FOUND" and "'no-such-model'" in model["message"]
    assert version["status"] == "StatusCode.NOT_FOUND" and "'999999'" in version["message"]
    assert name["status"] == "StatusCode.INVALID_ARGUMENT" and "'pixels'" in name["message"]
    assert output["status"] == "StatusCode.INVALID_ARGUMENT" and "'logits'" in output["message"]
    assert scale["status"] == "StatusCode.INVALID_ARGUMENT" and "0..1" in scale["message"]


def test_typed_contents_and_malformed_raw_contents(
    client: httpx.Client, target: str, served_model: ServedModel, input_name: str, serving_mnist_test: Mnist
) -> None:
    images = serving_mnist_test[0][:3]
    typed = {"name": input_name, "datatype": "UINT8", "shape": [3, 28, 28], "uint": images.ravel().tolist()}
    cases = [
        {"inputs": [typed]},
        {"inputs": [{**typed, "uint": [*images.ravel().tolist()[:-1], 256]}]},
        {"inputs": [{**typed, "uint": [], "fp32": [0.5] * 3 * 784}]},
        {"inputs": [typed, typed]},
        {"inputs": [typed], "raw": [images.tobytes().hex()]},
        {"inputs": [{**typed, "uint": []}], "raw": [images.tobytes().hex(), images.tobytes().hex()]},
        {"inputs": [{**typed, "uint": [], "datatype": "FP32"}], "raw": ["00" * 7]},
        {"inputs": [{**typed, "uint": [], "datatype": "FP64"}], "raw": ["00" * 8 * 3 * 784]},
    ]
    out = run_peer(STUBS_SCRIPT, {"target": target, "model": served_model.name, "cases": cases})
    ok, over_255, wrong_field, two_inputs, both, two_raws, ragged_raw, fp64 = out

    # Typed contents in, typed contents out (no raw bytes), the same digits as over HTTP.
    assert ok["status"] == "OK" and ok["raw"] == 0, ok
    assert ok["outputs"]["predicted_digit"]["int64"] == [p["digit"] for p in rest_predictions(client, images)]
    assert ok["outputs"]["predicted_digit"]["shape"] == [3]
    assert len(next(o for n, o in ok["outputs"].items() if n != "predicted_digit")["fp32"]) == 30

    assert over_255 == {"status": "INVALID_ARGUMENT", "message": "UINT8 data must be within 0..255"}
    assert wrong_field["status"] == "INVALID_ARGUMENT" and "uint_contents" in wrong_field["message"]
    assert two_inputs["status"] == "INVALID_ARGUMENT" and "2 input tensors" in two_inputs["message"]
    assert both["status"] == "INVALID_ARGUMENT" and "both contents and raw" in both["message"]
    assert two_raws["status"] == "INVALID_ARGUMENT" and "2 raw_input_contents" in two_raws["message"]
    assert ragged_raw["status"] == "INVALID_ARGUMENT" and "7 bytes" in ragged_raw["message"]
    assert fp64["status"] == "INVALID_ARGUMENT" and "FP64" in fp64["message"]


def test_grpc_inference_is_counted_in_the_prediction_metrics(
    *,
    client: httpx.Client,
    target: str,
    served_model: ServedModel,
    served_version: str,
    input_name: str,
    serving_mnist_test: Mnist,
) -> None:
    images = serving_mnist_test[0][100:110]
    latency = (
        "mnist_prediction_latency_seconds_count",
        (("endpoint", "grpc_infer"), ("version", served_version)),
    )
    batches = ("mnist_prediction_batch_size_count", ())
    before = metric_samples(client)
    requests = [infer_request(input_name, images[:4]), infer_request(input_name, images[4:])]
    out = run_peer(
        TRITON_SCRIPT, {"target": target, "model": served_model.name, "version": "", "requests": requests}
    )
    assert [result["status"] for result in out["results"]] == ["OK", "OK"]
    after = metric_samples(client)

    assert after[latency] - before.get(latency, 0.0) == 2
    assert after[batches] - before[batches] == 2
    digits = (
        out["results"][0]["outputs"]["predicted_digit"]["data"]
        + out["results"][1]["outputs"]["predicted_digit"]["data"]
    )
    for digit in set(digits):
        key = ("mnist_predictions_total", (("digit", str(digit)), ("version", served_version)))
        assert after[key] - before.get(key, 0.0) == digits.count(digit)


# --- gRPC health ---------------------------------------------------------------------------------


def test_grpc_health_follows_model_readiness(target: str) -> None:
    request = health_pb2.HealthCheckRequest
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", INFERENCE_SERVICE):
            assert (
                health.Check(request(service=service), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(request(service="no.such.Service"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = health.Watch(request(service=INFERENCE_SERVICE), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_before_the_model_loads_health_is_not_serving_and_inference_unavailable(
    tmp_path: Path, serving_cache_dir: Path, input_name: str, serving_mnist_test: Mnist
) -> None:
    """No registry to load from: gRPC answers at once, but nothing claims a model it does not have."""
    server = ServingProcess.start(
        tmp_path,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        model_uri="models:/never-registered@champion",
        cache_dir=serving_cache_dir,
        wait_ready=False,
    )
    try:
        target = f"127.0.0.1:{server.grpc_port}"
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        job = {
            "target": target,
            "model": "never-registered",
            "version": "",
            "requests": [infer_request(input_name, serving_mnist_test[0][:1])],
        }
        out = run_peer(TRITON_SCRIPT, job)
    finally:
        server.stop()
    assert (out["live"], out["ready"], out["model_ready"]) == (True, False, False)
    assert out["metadata"]["status"] == "StatusCode.UNAVAILABLE", out["metadata"]
    assert out["results"][0]["status"] == "StatusCode.UNAVAILABLE"
    assert "not loaded yet" in out["results"][0]["message"]


def test_a_taken_grpc_port_fails_the_start_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = subprocess.run(
            [sys.executable, "-m", "serving"],
            cwd=REPO_ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(REPO_ROOT),
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
                "SERVING_HOST": "127.0.0.1",
                "SERVING_PORT": str(free_port()),
                "SERVING_GRPC_PORT": str(port),
                "SERVING_MODEL_CACHE_DIR": str(tmp_path),
                "SERVING_LOG_FORMAT": "text",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    assert "Application startup failed" in output, output[-3000:]
    assert f"127.0.0.1:{port}" in output, output[-3000:]


# --- generated code ------------------------------------------------------------------------------


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    """`make grpc-stubs`' own command line, with the outputs in a temporary directory: byte-identical."""
    recipe = next(
        line.strip()
        for line in (REPO_ROOT / "Makefile").read_text().splitlines()
        if "grpc_tools.protoc" in line
    )
    args = shlex.split(recipe)
    assert args[:3] == ["$(PY)", "-m", "grpc_tools.protoc"]
    args = [sys.executable, *args[1:]]
    args = [
        f"{a.split('=')[0]}={tmp_path}" if a.startswith("--") and a.endswith("_out=.") else a for a in args
    ]
    completed = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    generated = sorted(path.relative_to(tmp_path) for path in (tmp_path / "serving" / "grpc").iterdir())
    protos = sorted((REPO_ROOT / "serving" / "grpc").glob("*.proto"))
    assert {path.name for path in generated} == {
        f"{proto.stem}{suffix}" for proto in protos for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    }
    for path in generated:
        assert (REPO_ROOT / path).read_bytes() == (tmp_path / path).read_bytes(), (
            f"{path} is stale: run `make grpc-stubs`"
        )
