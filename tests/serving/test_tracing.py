"""Tracing of the prediction service: the real `python -m serving` exporting over OTLP/gRPC to a real
OTLP receiver (testing/otlp_receiver.py), and the same server with tracing off."""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from websockets.sync.client import connect

from testing.helm import Helm
from testing.otlp_receiver import OtlpReceiver, ReceivedSpan
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import Mnist

# Spans leave within 50 ms instead of the SDK's 5 s, so the tests need not wait.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
# The interpreter reports every module it imports, whenever it imports it, on stderr (the log).
IMPORT_LOG = {"PYTHONPROFILEIMPORTTIME": "1"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as found:
        yield found


def start(served_model: ServedModel, cache: Path, workdir: Path, env: dict[str, str]) -> ServingProcess:
    return ServingProcess.start(
        workdir,
        tracking_uri=served_model.tracking_uri,
        model_uri=served_model.pinned_uri,
        cache_dir=cache,
        env={"SERVING_GRPC_PORT": "0", **env},
    )


@pytest.fixture(scope="module")
def traced_server(
    served_model: ServedModel,
    serving_cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    receiver: OtlpReceiver,
) -> Iterator[ServingProcess]:
    """Every body decoded in a worker thread (inline limit 0): the spans must cross into it."""
    env = {
        "SERVING_OTLP_ENDPOINT": receiver.endpoint,
        "SERVING_INLINE_MAX_BYTES": "0",
        "OTEL_SERVICE_NAME": "mnist-serving-under-test",
        **FAST_EXPORT,
        **IMPORT_LOG,
    }
    server = start(served_model, serving_cache_dir, tmp_path_factory.mktemp("traced"), env)
    yield server
    server.stop()


def server_span(receiver: OtlpReceiver, request_id: str) -> ReceivedSpan:
    spans = receiver.wait_for(
        lambda spans: any(span.attributes.get("serving.request_id") == request_id for span in spans),
        30,
        f"server span of request {request_id}",
    )
    (found,) = [span for span in spans if span.attributes.get("serving.request_id") == request_id]
    return found


def children(receiver: OtlpReceiver, parent: ReceivedSpan, count: int) -> dict[str, ReceivedSpan]:
    spans = receiver.trace(parent.trace_id, count + 1)
    found = {span.name: span for span in spans if span.parent_span_id == parent.span_id}
    assert len(found) == count, f"children of {parent.name}: {sorted(found)}"
    return found


def traceparent(trace_id: str, parent_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{parent_id}-{'01' if sampled else '00'}"


def test_a_prediction_is_one_trace_a_server_span_with_decode_and_onnx_children(
    traced_server: ServingProcess, receiver: OtlpReceiver, serving_mnist_test: Mnist
) -> None:
    request_id = f"trace-{secrets.token_hex(4)}"
    response = httpx.post(
        traced_server.url + "/predict",
        json={"pixels": serving_mnist_test[0][0].tolist()},
        headers={"X-Request-ID": request_id},
        timeout=30,
    )
    assert response.status_code == 200, response.text

    server = server_span(receiver, request_id)
    assert (server.name, server.kind, server.status, server.parent_span_id) == (
        "POST /predict",
        "SERVER",
        "UNSET",
        "",
    )
    attributes = server.attributes
    assert attributes["http.route"] == "/predict"
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.response.status_code"] == 200
    assert attributes["serving.model.version"] == response.json()["model_version"]
    assert attributes["serving.model.name"] == response.json()["model_name"]
    assert server.resource["service.name"] == "mnist-serving-under-test"
    assert server.scope == "serving"

    spans = children(receiver, server, 2)
    decode, run = spans["decode"], spans["onnx.run"]
    assert decode.kind == run.kind == "INTERNAL"
    assert run.attributes["serving.batch_size"] == 1
    # In order, and inside the request: decoding, then the model, both before the response.
    assert server.start_ns <= decode.start_ns <= decode.end_ns <= run.start_ns <= run.end_ns <= server.end_ns


def test_an_incoming_traceparent_is_continued_and_routes_name_the_spans(
    traced_server: ServingProcess, receiver: OtlpReceiver, serving_mnist_test: Mnist
) -> None:
    images = serving_mnist_test[0]
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(
        traced_server.url + "/predict/batch",
        json={"instances": [{"pixels": images[i].tolist()} for i in range(3)]},
        headers={"traceparent": traceparent(trace_id, parent_id), "X-Request-ID": f"b-{trace_id[:8]}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    server = server_span(receiver, f"b-{trace_id[:8]}")
    assert (server.trace_id, server.parent_span_id) == (trace_id, parent_id)
    assert server.name == "POST /predict/batch"
    assert children(receiver, server, 2)["onnx.run"].attributes["serving.batch_size"] == 3

    # The Open Inference Protocol route: named by its template, not by the path with the model in it.
    name = response.json()["model_name"]
    (tensor,) = httpx.get(f"{traced_server.url}/v2/models/{name}", timeout=10).json()["inputs"]
    pixels = (images[0] / 255).reshape(1, 28, 28, 1).tolist()
    body = {"inputs": [{"name": tensor["name"], "shape": [1, 28, 28, 1], "datatype": "FP32", "data": pixels}]}
    v2_trace = secrets.token_hex(16)
    response = httpx.post(
        f"{traced_server.url}/v2/models/{name}/infer",
        json=body,
        headers={"traceparent": traceparent(v2_trace, secrets.token_hex(8)), "X-Request-ID": "v2-trace"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    server = server_span(receiver, "v2-trace")
    assert server.trace_id == v2_trace
    assert (server.name, server.attributes["http.route"]) == (
        "POST /v2/models/{name}/infer",
        "/v2/models/{name}/infer",
    )
    assert server.attributes["url.path"] == f"/v2/models/{name}/infer"


def test_client_errors_unsampled_callers_probes_and_websockets(
    traced_server: ServingProcess, receiver: OtlpReceiver, serving_mnist_test: Mnist
) -> None:
    response = httpx.post(
        traced_server.url + "/predict", json={"pixels": [[0.5] * 3]}, headers={"X-Request-ID": "bad-input"}
    )
    assert 400 <= response.status_code < 500, response.text
    server = server_span(receiver, "bad-input")
    # A client's mistake is no server error; the decode span that refused the input says why.
    assert server.attributes["http.response.status_code"] == response.status_code
    assert server.status == "UNSET"
    decode = children(receiver, server, 1)["decode"]
    assert decode.status == "ERROR" and decode.events == ["exception"]

    # A caller that decided not to sample: parent-based sampling records nothing of its trace.
    unsampled = secrets.token_hex(16)
    for path in ("/health/ready", "/health/live", "/metrics"):
        assert httpx.get(traced_server.url + path, timeout=10).status_code == 200
    httpx.post(
        traced_server.url + "/predict",
        json={"pixels": serving_mnist_test[0][1].tolist()},
        headers={"traceparent": traceparent(unsampled, secrets.token_hex(8), sampled=False)},
        timeout=30,
    ).raise_for_status()
    # A WebSocket frame has no server span: its inference must not leave an orphan root span either.
    with connect(traced_server.url.replace("http://", "ws://") + "/ws/predict", open_timeout=10) as ws:
        ws.send(json.dumps({"pixels": serving_mnist_test[0][3].tolist()}))
        assert json.loads(ws.recv(timeout=20))["type"] == "prediction"
    # Probes and scrapes are not traced; a request after them marks when their spans would be in.
    server_span_of_marker = httpx.post(
        traced_server.url + "/predict",
        json={"pixels": serving_mnist_test[0][2].tolist()},
        headers={"X-Request-ID": "marker"},
        timeout=30,
    )
    assert server_span_of_marker.status_code == 200
    server_span(receiver, "marker")
    spans = receiver.spans
    assert not [span for span in spans if span.trace_id == unsampled]
    assert not [span for span in spans if span.kind != "SERVER" and not span.parent_span_id]
    assert not [
        span for span in spans if str(span.attributes.get("url.path", "")).startswith(("/health", "/met"))
    ]


def test_spans_still_queued_are_exported_when_the_server_stops(
    served_model: ServedModel,
    serving_cache_dir: Path,
    tmp_path: Path,
    receiver: OtlpReceiver,
    serving_mnist_test: Mnist,
) -> None:
    # A minute between exports: only the shutdown can send this request's spans in time.
    env = {"SERVING_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    server = start(served_model, serving_cache_dir, tmp_path, env)
    try:
        response = httpx.post(
            server.url + "/predict",
            json={"pixels": serving_mnist_test[0][0].tolist()},
            headers={"X-Request-ID": "at-shutdown"},
            timeout=30,
        )
        assert response.status_code == 200
        time.sleep(1)
        assert not [
            span for span in receiver.spans if span.attributes.get("serving.request_id") == "at-shutdown"
        ]
        server.terminate()
        assert server.process.wait(30) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    span = server_span(receiver, "at-shutdown")
    assert len(receiver.trace(span.trace_id, 3, timeout=1)) == 3


def imported(server: ServingProcess, prefix: str) -> list[str]:
    """Modules under `prefix` the server imported (PYTHONPROFILEIMPORTTIME lines: `... | name`)."""
    names = [
        line.rsplit("|", 1)[-1].strip() for line in server.log_text().splitlines() if "import time:" in line
    ]
    return [name for name in names if name == prefix or name.startswith(prefix + ".")]


def test_tracing_off_imports_neither_the_sdk_nor_the_exporter(
    served_model: ServedModel,
    serving_cache_dir: Path,
    tmp_path: Path,
    traced_server: ServingProcess,
    serving_mnist_test: Mnist,
) -> None:
    # Blank wins over any OTEL_EXPORTER_OTLP_* endpoint the test run's environment may carry.
    server = start(served_model, serving_cache_dir, tmp_path, {"SERVING_OTLP_ENDPOINT": "", **IMPORT_LOG})
    try:
        for index in range(3):
            response = httpx.post(
                server.url + "/predict", json={"pixels": serving_mnist_test[0][index].tolist()}, timeout=30
            )
            assert response.status_code == 200
    finally:
        server.stop()
    # The same model from the same warm cache: the registry client, and mlflow with it, stay unloaded,
    # so nothing but tracing could bring the SDK in.
    assert imported(server, "mlflow") == []
    assert imported(server, "opentelemetry.sdk") == []
    assert imported(server, "opentelemetry.exporter") == []
    # The check can fail: the traced server, started the same way, imported both.
    assert "opentelemetry.exporter.otlp.proto.grpc.trace_exporter" in imported(traced_server, "opentelemetry")
    assert "opentelemetry.sdk.trace.export" in imported(traced_server, "opentelemetry.sdk")


def serving_env(helm: Helm, *set_values: str) -> dict[str, Any]:
    text = helm.template(set_values=list(set_values)).stdout
    (deployment,) = [
        doc
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("-serving")
    ]
    return {
        item["name"]: item.get("value")
        for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_the_chart_sets_the_endpoint_only_when_one_is_given(helm: Helm) -> None:
    assert "SERVING_OTLP_ENDPOINT" not in serving_env(helm)
    endpoint = "http://otel-collector.observability:4317"
    assert serving_env(helm, f"serving.tracing.otlpEndpoint={endpoint}")["SERVING_OTLP_ENDPOINT"] == endpoint
    # Without a scheme the exporter would guess TLS or not from another variable: refused up front.
    refused = helm.template(set_values=["serving.tracing.otlpEndpoint=otel-collector:4317"], check=False)
    assert refused.returncode != 0 and "otlpEndpoint" in refused.stderr
