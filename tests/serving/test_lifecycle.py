"""The service's life: start-up from the registry or from the cache alone, waiting for a model that
is not promoted yet, protective limits under load, several workers, and graceful shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from local_mode.processes import free_port
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import REPO_ROOT, Mnist, b64, png_bytes

SLOW_IMAGE_SIDE = 4000
# Slow requests are honest work: big photos to decode. Raising the per-request pixel budget (a
# setting) lets one request carry enough of them to stay in flight for a few seconds.
SLOW_ENV = {"SERVING_MAX_REQUEST_PIXELS": str(40 * SLOW_IMAGE_SIDE * SLOW_IMAGE_SIDE)}


@pytest.fixture(scope="module")
def slow_batch(serving_mnist_test: Mnist) -> dict[str, Any]:
    """Twenty 16-megapixel scans of a digit: tiny PNGs, seconds of decoding."""
    digit = serving_mnist_test[0][0]
    big = np.asarray(Image.fromarray(digit).resize((2000, 2000), Image.Resampling.BILINEAR))
    page = np.full((SLOW_IMAGE_SIDE, SLOW_IMAGE_SIDE), 255, np.uint8)
    page[1000:3000, 1000:3000] = 255 - big
    encoded = b64(png_bytes(page))
    return {"instances": [{"image": encoded}] * 20}


def in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "mnist_http_requests_in_flight":
            return float(sum(sample.value for sample in family.samples))
    raise AssertionError("no in-flight gauge")


class Background:
    """A request running in a thread, so the test can act while it is in flight."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict[str, Any]) -> None:
        try:
            self.response = httpx.post(url, json=body, timeout=120)
        except BaseException as exc:  # reported by result()
            self.error = exc

    def wait_in_flight(self, server: ServingProcess, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        # The scrape itself is one request in flight; the slow one makes two.
        while in_flight(server.url) < 2:
            assert time.monotonic() < deadline, "the slow request never arrived"
            assert self.thread.is_alive(), f"the slow request ended early: {self.response or self.error}"
            time.sleep(0.05)

    def result(self, timeout: float = 120) -> httpx.Response:
        self.thread.join(timeout)
        assert self.error is None, repr(self.error)
        assert self.response is not None, "the slow request did not finish"
        return self.response


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def start(served_model: ServedModel, cache: Path, workdir: Path, **kwargs: Any) -> ServingProcess:
    kwargs.setdefault("tracking_uri", served_model.tracking_uri)
    kwargs.setdefault("model_uri", served_model.pinned_uri)
    return ServingProcess.start(workdir, cache_dir=cache, **kwargs)


@pytest.fixture
def stopped_servers() -> Iterator[list[ServingProcess]]:
    servers: list[ServingProcess] = []
    yield servers
    for server in servers:
        server.stop()


def test_sigterm_lets_the_in_flight_request_finish(
    *,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    slow_batch: dict[str, Any],
    stopped_servers: list[ServingProcess],
) -> None:
    server = start(served_model, serving_cache_dir, workdir, env=SLOW_ENV)
    stopped_servers.append(server)
    slow = Background(server.url + "/predict/batch", slow_batch)
    slow.wait_in_flight(server)
    server.terminate()
    response = slow.result()
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 20 and len({p["digit"] for p in predictions}) == 1
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    log = server.log_text()
    assert "Shutting down" in log and "Finished server process" in log
    assert "unhandled error" not in log


def test_concurrency_limit_answers_503(
    *,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    slow_batch: dict[str, Any],
    serving_mnist_test: Mnist,
    stopped_servers: list[ServingProcess],
) -> None:
    server = start(served_model, serving_cache_dir, workdir, env={**SLOW_ENV, "SERVING_MAX_CONCURRENCY": "1"})
    stopped_servers.append(server)
    pixels = {"pixels": serving_mnist_test[0][0].tolist()}
    slow = Background(server.url + "/predict/batch", slow_batch)
    slow.wait_in_flight(server)
    busy = httpx.post(server.url + "/predict", json=pixels, timeout=30)
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"] == "1"
    assert "busy" in busy.json()["error"]
    # Probes and scrapes are not inference: they still answer while the server is saturated.
    assert httpx.get(server.url + "/health/ready", timeout=10).status_code == 200
    assert slow.result().status_code == 200
    assert httpx.post(server.url + "/predict", json=pixels, timeout=30).status_code == 200
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert re.search(r'mnist_http_rejected_requests_total\{reason="overloaded"\} 1\.0', metrics)


def test_ready_from_the_warm_cache_without_the_registry(
    *,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    serving_server: ServingProcess,
    stopped_servers: list[ServingProcess],
) -> None:
    # serving_server has fetched the artifact; a pinned version needs nothing else.
    assert serving_server.process.poll() is None
    unreachable = f"http://127.0.0.1:{free_port()}"
    server = start(served_model, serving_cache_dir, workdir, tracking_uri=unreachable)
    stopped_servers.append(server)
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["model"]["loaded_from_cache"] is True
    assert health["model"]["version"] == served_model.version
    response = httpx.post(server.url + "/predict", json={"pixels": [[0] * 28] * 28}, timeout=10)
    assert response.status_code == 200


def test_live_but_not_ready_until_the_alias_exists(
    *,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    stopped_servers: list[ServingProcess],
) -> None:
    import mlflow

    alias = f"serving-test-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(served_model.tracking_uri)
    server = start(
        served_model,
        serving_cache_dir,
        workdir,
        model_uri=f"models:/{served_model.name}@{alias}",
        env={"SERVING_LOAD_RETRY_MAX_SECONDS": "1"},
        wait_ready=False,
    )
    stopped_servers.append(server)
    try:
        assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200
        ready = httpx.get(server.url + "/health/ready", timeout=10)
        assert ready.status_code == 503
        deadline = time.monotonic() + 30
        while "alias" not in (ready.json()["reason"] or "").lower():  # first attempt may still be running
            assert time.monotonic() < deadline, ready.json()
            time.sleep(0.2)
            ready = httpx.get(server.url + "/health/ready", timeout=10)
        assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "loading"
        assert httpx.get(server.url + "/v2/health/ready", timeout=10).json() == {"ready": False}
        refused = httpx.post(server.url + "/predict", json={"pixels": [[0] * 28] * 28}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert "not loaded" in refused.json()["error"]

        # A promotion happens: the pod becomes ready by itself, no restart.
        client.set_registered_model_alias(served_model.name, alias, served_model.version)
        server.wait_ready(60)
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["model"]["version"] == served_model.version and health["model"]["alias"] == alias
    finally:
        client.delete_registered_model_alias(served_model.name, alias)


def load_failures(server: ServingProcess) -> list[dict[str, object]]:
    return [r for r in server.log_records() if str(r.get("msg", "")).startswith("model load failed")]


def wait_for_reason(server: ServingProcess, fragment: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        ready = httpx.get(server.url + "/health/ready", timeout=10)
        assert ready.status_code == 503, ready.text
        reason = ready.json()["reason"] or ""
        if fragment in reason:
            return str(reason)
        assert time.monotonic() < deadline, f"{reason!r}\n{server.log_tail()}"
        time.sleep(0.2)


@pytest.fixture
def not_onnx_version(served_model: ServedModel) -> Iterator[str]:
    """A registered version whose artifacts are the Keras model: a real version, but no model.onnx."""
    import mlflow

    assert served_model.keras_model_uri is not None
    run_id = served_model.keras_model_uri.removeprefix("runs:/").split("/")[0]
    client = mlflow.MlflowClient(served_model.tracking_uri)
    name = f"serving-test-keras-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    try:
        source = client.get_run(run_id).info.artifact_uri + "/keras-model"
        version = client.create_model_version(name, source, run_id=run_id)
        yield f"models:/{name}/{version.version}"
    finally:
        client.delete_registered_model(name)


@pytest.mark.parametrize(
    ("case", "expected"),
    [("missing-version", "999999"), ("not-onnx", "not an ONNX-flavor model")],
)
def test_permanent_load_errors_stop_retrying_and_say_why(
    *,
    request: pytest.FixtureRequest,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    stopped_servers: list[ServingProcess],
    case: str,
    expected: str,
) -> None:
    model_uri = (
        f"models:/{served_model.name}/999999"
        if case == "missing-version"
        else request.getfixturevalue("not_onnx_version")
    )
    server = start(
        served_model,
        serving_cache_dir,
        workdir,
        model_uri=model_uri,
        env={"SERVING_LOAD_RETRY_MAX_SECONDS": "0.5"},
        wait_ready=False,
    )
    stopped_servers.append(server)
    reason = wait_for_reason(server, "not retrying")
    assert expected in reason
    # Retrying every half second, a retrying server would have logged several failures by now.
    time.sleep(3)
    failures = load_failures(server)
    assert len(failures) == 1, failures
    assert failures[0]["level"] == "error" and "permanently" in str(failures[0]["msg"])
    assert expected in str(failures[0]["msg"])
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["model"]["last_error"] == reason
    assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200
    refused = httpx.post(server.url + "/predict", json={"pixels": [[0] * 28] * 28}, timeout=10)
    assert refused.status_code == 503 and "not loaded" in refused.json()["error"]
    assert server.process.poll() is None


def test_unreachable_registry_is_retried(
    *,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    stopped_servers: list[ServingProcess],
) -> None:
    server = start(
        served_model,
        serving_cache_dir,
        workdir,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        model_uri=f"models:/{served_model.name}@champion",
        env={"SERVING_LOAD_RETRY_MAX_SECONDS": "0.5"},
        wait_ready=False,
    )
    stopped_servers.append(server)
    reason = wait_for_reason(server, "unreachable")
    assert "not retrying" not in reason
    deadline = time.monotonic() + 30
    while len(load_failures(server)) < 3:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    assert all("retrying in" in str(r["msg"]) for r in load_failures(server))


def test_rate_limit_text_logs_and_docs_off(
    *,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    serving_mnist_test: Mnist,
    stopped_servers: list[ServingProcess],
) -> None:
    env = {
        "SERVING_RATE_LIMIT_PER_SECOND": "0.2",
        "SERVING_RATE_LIMIT_BURST": "2",
        "SERVING_DOCS_ENABLED": "false",
        "SERVING_LOG_FORMAT": "text",
    }
    server = start(served_model, serving_cache_dir, workdir, env=env)
    stopped_servers.append(server)
    body = {"pixels": serving_mnist_test[0][0].tolist()}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert [client.post("/predict", json=body).status_code for _ in range(2)] == [200, 200]
        limited = client.post("/predict", json=body)
        assert limited.status_code == 429, limited.text
        assert int(limited.headers["retry-after"]) >= 1
        assert "rate limit" in limited.json()["error"]
        # Only inference is rate limited; probes never are.
        assert all(client.get("/health/ready").status_code == 200 for _ in range(5))
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
        assert client.get("/").status_code == 200
    log = server.log_text()
    assert "INFO serving.access: request request_id=" in log
    assert "status=429" in log


def test_two_workers_serve_one_version_and_add_up_their_metrics(
    *,
    served_model: ServedModel,
    serving_cache_dir: Path,
    workdir: Path,
    serving_mnist_test: Mnist,
    stopped_servers: list[ServingProcess],
) -> None:
    server = start(
        served_model,
        serving_cache_dir,
        workdir,
        model_uri=f"models:/{served_model.name}@champion",
        env={"SERVING_WORKERS": "2"},
        timeout=120,
    )
    stopped_servers.append(server)
    pids: set[int] = set()
    versions: set[str] = set()
    deadline = time.monotonic() + 60
    while len(pids) < 2:
        assert time.monotonic() < deadline, f"only saw workers {pids}"
        # New connection each time so the kernel spreads them over both workers' accept queues.
        response = httpx.get(server.url + "/health", timeout=10, headers={"Connection": "close"})
        if response.status_code == 200:
            pids.add(response.json()["pid"])
            versions.add(response.json()["model"]["version"])
    assert len(versions) == 1
    images = serving_mnist_test[0]
    for i in range(20):
        response = httpx.post(
            server.url + "/predict", json={"pixels": images[i].tolist()}, headers={"Connection": "close"}
        )
        assert response.status_code == 200
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=10).text)
    }
    total = sum(s.value for s in families["mnist_predictions"].samples if s.name == "mnist_predictions_total")
    assert total == 20
    info = [s for s in families["mnist_model_info"].samples if s.value == 1]
    assert {s.labels["model_version"] for s in info} == versions


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVING_PORT": "eighty"}, "port"),
        ({"SERVING_MODEL_URI": "runs:/abc/model"}, "models:/<name>@<alias>"),
        ({"SERVING_LOG_FORMAT": "xml"}, "log_format"),
    ],
    ids=["port", "model-uri", "log-format"],
)
def test_invalid_configuration_exits_with_a_clear_message(env: dict[str, str], message: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "serving"],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "invalid serving configuration" in completed.stderr
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
