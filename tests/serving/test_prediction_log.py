"""The prediction log: the `prediction_log` store on real SQLite and PostgreSQL, and real serving
processes writing to it over real HTTP, gRPC and WebSocket traffic.

What must hold: every prediction of every endpoint is logged with its id, version, input and
probabilities; a SIGTERM under load loses nothing (every request answered 200 has its row once the
process has exited); a full queue in front of a slow or unreachable database drops and counts instead of
blocking; the retention purge deletes old rows only.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from local_mode.processes import free_port, wait_until
from prediction_log import (
    REQUEST_ID_MAX,
    FeedbackResult,
    PredictionStore,
    encode_batch,
    encode_images,
    predictions,
)
from serving import preprocess
from serving.grpc import inference_pb2 as pb
from serving.grpc import inference_pb2_grpc
from serving.rest import feedback
from testing.postgres import PostgresServer
from testing.serving import REPO_ROOT, ServedModel, ServingProcess
from tests.serving.payloads import Mnist, png_bytes

BACKENDS = ("sqlite", "postgresql")


def database_url(backend: str, tmp_path: Path, postgres: PostgresServer | None, name: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'{name}.db'}"
    assert postgres is not None
    return postgres.create_database(name)


@pytest.fixture(params=BACKENDS)
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh prediction log database on each backend (PostgreSQL only started when needed)."""
    backend: str = request.param
    postgres = request.getfixturevalue("postgres") if backend == "postgresql" else None
    name = "log_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[-40:]
    return database_url(backend, tmp_path, postgres, name)


def start_logging_server(
    workdir: Path, served_model: ServedModel, cache_dir: Path, url: str, **env: str
) -> ServingProcess:
    """A serving process (the pinned registered version) writing its predictions to `url`."""
    return ServingProcess.start(
        workdir,
        tracking_uri=served_model.tracking_uri,
        model_uri=served_model.pinned_uri,
        cache_dir=cache_dir,
        env={"SERVING_PREDICTION_LOG_URL": url, **env},
    )


def metric_value(base_url: str, sample: str, **labels: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{sample}{labels} not on /metrics")


def stop_cleanly(server: ServingProcess) -> list[dict[str, object]]:
    """SIGTERM, wait, check the exit was clean; the JSON log records."""
    code = server.stop()
    assert code in (0, -15), f"serving exited with {code}:\n{server.log_tail(60)}"
    records = server.log_records()
    assert not [r for r in records if r.get("level") == "error"], server.log_tail(60)
    return records


# --- the store itself, on both databases --------------------------------------------------------------


def test_store_contract(log_url: str) -> None:
    store = PredictionStore(log_url)
    store.create_schema()
    store.create_schema()  # idempotent
    now = datetime.now(UTC)
    rng = np.random.default_rng(7)
    images = rng.random((6, 28, 28), dtype=np.float32)
    probs = rng.dirichlet(np.ones(10), 6).astype(np.float32)
    old = now - timedelta(days=40)
    store.insert_many(
        encode_batch(
            [f"old-{i}" for i in range(2)],
            created_at=old,
            model_name="m",
            model_version="1",
            source="predict",
            images=images[:2],
            probabilities=probs[:2],
        )
    )
    store.insert_many(
        encode_batch(
            [f"new-{i}" for i in range(4)],
            created_at=now,
            model_name="m",
            model_version="2",
            source="predict_batch",
            images=images[2:],
            probabilities=probs[2:],
        )
    )
    # A reused id keeps its first row rather than failing the batch it arrives in.
    store.insert_many(
        encode_batch(
            ["new-0"],
            created_at=now,
            model_name="m",
            model_version="9",
            source="v2",
            images=images[:1],
            probabilities=probs[:1],
        )
    )
    assert store.count() == 6
    row = store.get("new-0")
    assert row is not None and row.model_version == "2" and row.source == "predict_batch"
    assert np.array_equal(row.image, np.rint(images[2] * 255).astype(np.uint8))
    assert np.array_equal(row.probabilities, probs[2])
    assert row.predicted == int(probs[2].argmax()) and row.confidence == pytest.approx(float(probs[2].max()))
    assert row.created_at == now and row.created_at.tzinfo is not None

    window = store.window(now - timedelta(minutes=1))
    assert len(window) == 4 and window.images.shape == (4, 28, 28) and window.images.dtype == np.uint8
    assert window.probabilities.shape == (4, 10) and window.versions == ["2"] * 4
    assert len(store.window(old - timedelta(seconds=1), until=now)) == 2
    assert len(store.window(old - timedelta(seconds=1), limit=3)) == 3

    assert store.add_feedback("new-1", 3) is FeedbackResult.CREATED
    assert store.add_feedback("new-1", 3) is FeedbackResult.UNCHANGED
    assert store.add_feedback("new-1", 4) is FeedbackResult.CONFLICT
    assert store.add_feedback("nope", 4) is FeedbackResult.UNKNOWN
    assert store.add_feedback("old-0", 0) is FeedbackResult.CREATED
    labelled = store.labelled()
    assert labelled.request_ids == ["new-1", "old-0"] and labelled.labels.tolist() == [3, 0]
    assert labelled.images.shape == (2, 28, 28)
    assert store.count_labelled() == 2
    assert store.count_labelled(since=now + timedelta(hours=1)) == 0
    with pytest.raises(ValueError, match="naive"):
        store.window(datetime.now())  # naive: refused

    assert store.purge(now - timedelta(days=30)) == 2
    assert store.count() == 4 and store.get("old-0") is None
    store.close()


def test_a_new_log_reads_as_empty_until_serving_creates_its_table(log_url: str) -> None:
    """The readers that watch the log (the drift job, the operator's feedback trigger) start beside
    serving, before its first write creates the table: they read no rows rather than fail. A database
    that does not answer still raises."""
    store = PredictionStore(log_url)
    try:
        since = datetime.now(UTC) - timedelta(minutes=5)
        assert len(store.window(since)) == 0
        assert store.count_labelled() == 0
        store.create_schema()
        store.insert_many(
            encode_batch(
                ["first"], created_at=datetime.now(UTC), model_name="m", model_version="1", source="predict",
                images=np.zeros((1, 28, 28), np.float32), probabilities=np.full((1, 10), 0.1, np.float32),
            )
        )  # fmt: skip
        assert store.window(since).request_ids == ["first"]
    finally:
        store.close()
    away = PredictionStore(f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/predictions")
    try:
        with pytest.raises(sa.exc.OperationalError):
            away.window(datetime.now(UTC) - timedelta(minutes=5))
        with pytest.raises(sa.exc.OperationalError):
            away.count_labelled()
    finally:
        away.close()


def test_the_feedback_route_and_the_store_agree_on_the_id_length() -> None:
    column = predictions.c.request_id.type
    assert isinstance(column, sa.String)
    assert feedback.REQUEST_ID_MAX == REQUEST_ID_MAX == column.length


def test_serving_without_the_log_never_imports_sqlalchemy() -> None:
    code = (
        "import sys\n"
        "from serving.app import create_app\n"
        "app = create_app()\n"
        "assert any(getattr(r, 'path', '') == '/feedback' for r in app.routes)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'prediction_log')))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


# --- every source, logged -----------------------------------------------------------------------------


def _v2_request(input_name: str, images: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": input_name,
                "datatype": "FP32",
                "shape": list(images.shape),
                "data": (images.astype(np.float32) / 255).ravel().tolist(),
            }
        ]
    }


def _grpc_probabilities(reply: Any, output_name: str) -> list[list[float]]:
    for i, output in enumerate(reply.outputs):
        if output.name == output_name:
            if reply.raw_output_contents:
                values = np.frombuffer(reply.raw_output_contents[i], "<f4")
            else:
                values = np.asarray(output.contents.fp32_contents, np.float32)
            rows: list[list[float]] = values.reshape(-1, 10).tolist()
            return rows
    raise AssertionError(f"no {output_name} output in {reply}")


def test_every_prediction_of_every_source_is_logged(
    tmp_path: Path, served_model: ServedModel, serving_cache_dir: Path, serving_mnist_test: Mnist
) -> None:
    images, _ = serving_mnist_test
    url = f"sqlite:///{tmp_path / 'log.db'}"
    server = start_logging_server(tmp_path, served_model, serving_cache_dir, url)
    # id -> (source, the image sent, the probabilities answered)
    expected: dict[str, tuple[str, np.ndarray[Any, Any], list[float]]] = {}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            meta = http.get(f"/v2/models/{served_model.name}").json()
            input_name, output_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]

            answer = http.post(
                "/predict", json={"pixels": images[0].tolist()}, headers={"X-Request-ID": "h4-json"}
            )
            assert answer.status_code == 200, answer.text
            expected["h4-json"] = ("predict", images[0], answer.json()["probabilities"])

            png = png_bytes(images[1])
            answer = http.post("/predict", content=png, headers={"Content-Type": "image/png"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["request_id"] == answer.headers["x-request-id"]
            # An image is resized and centred on the way in: the log holds what the model saw.
            seen = encode_images(preprocess.from_image_bytes(png, max_pixels=10**7)[0])[0]
            expected[answer.headers["x-request-id"]] = ("predict", seen, answer.json()["probabilities"])

            body = {"instances": [{"pixels": images[i].tolist()} for i in (2, 3, 4)]}
            answer = http.post("/predict/batch", json=body, headers={"X-Request-ID": "h4-batch"})
            assert answer.status_code == 200, answer.text
            for i, prediction in enumerate(answer.json()["predictions"]):
                expected[f"h4-batch-{i}"] = ("predict_batch", images[2 + i], prediction["probabilities"])

            answer = http.post(
                f"/v2/models/{served_model.name}/infer",
                json=_v2_request(input_name, images[5:7]),
                headers={"X-Request-ID": "h4-v2"},
            )
            assert answer.status_code == 200, answer.text
            output = next(o for o in answer.json()["outputs"] if o["name"] == output_name)
            v2_rows = np.asarray(output["data"], np.float32).reshape(-1, 10).tolist()
            for i in range(2):
                expected[f"h4-v2-{i}"] = ("v2_infer", images[5 + i], v2_rows[i])

            answer = http.post(
                "/explain", json={"pixels": images[7].tolist()}, headers={"X-Request-ID": "h4-explain"}
            )
            assert answer.status_code == 200, answer.text
            expected["h4-explain"] = ("explain", images[7], answer.json()["probabilities"])

        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            tensor = pb.ModelInferRequest.InferInputTensor(
                name=input_name,
                datatype="FP32",
                shape=[2, 28, 28],
                contents=pb.InferTensorContents(fp32_contents=(images[8:10] / 255).ravel().tolist()),
            )
            reply = stub.ModelInfer(
                pb.ModelInferRequest(model_name=served_model.name, inputs=[tensor]),
                metadata=[("x-request-id", "h4-grpc")],
                timeout=30,
            )
            for i, answered in enumerate(_grpc_probabilities(reply, output_name)):
                expected[f"h4-grpc-{i}"] = ("grpc_infer", images[8 + i], answered)

        with connect(f"ws://127.0.0.1:{server.port}/ws/predict", open_timeout=10) as ws:
            ws.send(json.dumps({"id": 1, "pixels": images[10].tolist()}))
            message = json.loads(ws.recv(timeout=30))
            assert message["type"] == "prediction", message
            expected[message["request_id"]] = ("ws_predict", images[10], message["probabilities"])
    finally:
        stop_cleanly(server)

    store = PredictionStore(url)
    assert store.count() == len(expected) == 11
    for request_id, (source, image, probabilities) in expected.items():
        row = store.get(request_id)
        assert row is not None, f"{request_id} ({source}) was not logged"
        assert row.source == source, (request_id, row.source)
        assert row.model_name == served_model.name and row.model_version == served_model.version
        assert np.array_equal(row.image, image), f"{request_id}: the logged input is not what was sent"
        assert np.allclose(row.probabilities, probabilities, atol=1e-6), request_id
        assert row.predicted == int(np.argmax(probabilities)) and row.label is None
    store.close()


# --- SIGTERM under load ---------------------------------------------------------------------------------


def _load(base_url: str, images: np.ndarray[Any, Any], ok: list[str], stop: threading.Event) -> None:
    """Sends /predict until the server goes away; collects the request ids answered 200."""
    bodies = [json.dumps({"pixels": image.tolist()}).encode() for image in images]
    with httpx.Client(base_url=base_url, timeout=30) as http:
        i = 0
        while not stop.is_set():
            try:
                answer = http.post(
                    "/predict", content=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
                )
            except httpx.HTTPError:
                if stop.wait(0.01):
                    return
                continue
            if answer.status_code == 200:
                ok.append(answer.headers["x-request-id"])
            i += 1


def test_sigterm_under_load_loses_nothing(
    log_url: str,
    tmp_path: Path,
    served_model: ServedModel,
    serving_cache_dir: Path,
    serving_mnist_test: Mnist,
) -> None:
    images = serving_mnist_test[0][:64]
    # Flushes only every minute and never for a full batch (a batch of 500 could otherwise empty the
    # queue between the 300th answer and the SIGTERM): every answered record is still queued at the
    # SIGTERM, and only the shutdown flush can save them.
    server = start_logging_server(
        tmp_path,
        served_model,
        serving_cache_dir,
        log_url,
        SERVING_PREDICTION_LOG_FLUSH_SECONDS="60",
        SERVING_PREDICTION_LOG_BATCH_RECORDS="100000",
        SERVING_PREDICTION_LOG_QUEUE_SIZE="100000",
    )
    ok: list[list[str]] = [[] for _ in range(4)]
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(server.url, images, ok[i], stop)) for i in range(4)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: sum(map(len, ok)) >= 300, 60, "300 answered predictions")
        server.terminate()  # SIGTERM while the four clients keep sending
        server.process.wait(60)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        server.stop()
    records = stop_cleanly(server)
    answered = {request_id for ids in ok for request_id in ids}
    assert len(answered) == sum(map(len, ok)) >= 300

    store = PredictionStore(log_url)
    logged = set(store.window(datetime.now(UTC) - timedelta(hours=1)).request_ids)
    store.close()
    lost = answered - logged
    assert not lost, f"{len(lost)} of {len(answered)} answered predictions are not in the log"
    # The shutdown flush had records to write: the test exercised it, not only the periodic flush.
    flushed = [r for r in records if r.get("msg") == "prediction log flushed at shutdown"]
    assert flushed and int(str(flushed[0]["records"])) > 0, flushed


def test_a_full_batch_is_written_without_waiting_for_the_flush_interval(log_url: str) -> None:
    """The writer wakes for a full batch (SERVING_PREDICTION_LOG_BATCH_RECORDS) long before its
    minute-long interval, and leaves a partial batch queued until then."""
    from serving.dataplane import PredictionEvent
    from serving.prediction_log import PredictionLog

    def event(request_id: str, count: int) -> PredictionEvent:
        images = np.random.default_rng(0).random((count, 28, 28), dtype=np.float32)
        probabilities = np.full((count, 10), 0.1, dtype=np.float32)
        return PredictionEvent(request_id, "predict_batch", "1", images, probabilities)

    async def scenario() -> tuple[int, int]:
        writer = PredictionLog(log_url, "mnist-cnn", flush_seconds=60, batch_records=4)
        writer.start()
        try:
            writer.record(event("partial", 3))
            await asyncio.sleep(1.0)
            queued_below_a_batch = writer.queued
            writer.record(event("fills-it", 2))
            for _ in range(200):  # 10 s at most
                if not writer.queued:
                    break
                await asyncio.sleep(0.05)
            return queued_below_a_batch, writer.queued
        finally:
            await writer.stop()

    queued_below_a_batch, queued_after = asyncio.run(scenario())
    assert queued_below_a_batch == 3
    assert queued_after == 0
    store = PredictionStore(log_url)
    logged = set(store.window(datetime.now(UTC) - timedelta(hours=1)).request_ids)
    store.close()
    assert logged == {"partial-0", "partial-1", "partial-2", "fills-it-0", "fills-it-1"}


# --- a full queue drops, never blocks --------------------------------------------------------------------


def _latencies(base_url: str, images: np.ndarray[Any, Any], count: int) -> list[float]:
    seconds = []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for i in range(count):
            body = {"pixels": images[i % len(images)].tolist()}
            started = time.perf_counter()
            answer = http.post("/predict", json=body)
            seconds.append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
    return seconds


@pytest.mark.parametrize("database", ["unreachable", "locked"])
def test_a_full_queue_drops_and_counts_without_slowing_predictions(
    *,
    database: str,
    tmp_path: Path,
    served_model: ServedModel,
    serving_cache_dir: Path,
    serving_server: ServingProcess,
    serving_mnist_test: Mnist,
) -> None:
    """Queue of 5 in front of a PostgreSQL nobody listens for (every write fails at once), or of a
    SQLite database another process holds locked (every write waits out the busy timeout)."""
    images = serving_mnist_test[0][:32]
    holder: sqlite3.Connection | None = None
    if database == "unreachable":
        url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/nothing"
    else:
        path = tmp_path / "locked.db"
        PredictionStore(f"sqlite:///{path}").create_schema()
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        url = f"sqlite:///{path}"
    server = start_logging_server(
        tmp_path, served_model, serving_cache_dir, url, SERVING_PREDICTION_LOG_QUEUE_SIZE="5"
    )
    try:
        _latencies(server.url, images, 20)  # warm both servers the same way
        _latencies(serving_server.url, images, 20)
        with_log = _latencies(server.url, images, 200)
        without_log = _latencies(serving_server.url, images, 200)
        dropped = metric_value(server.url, "mnist_prediction_log_records_total", outcome="dropped")
        depth = metric_value(server.url, "mnist_prediction_log_queue_depth")
        written = metric_value(server.url, "mnist_prediction_log_records_total", outcome="written")
        # Everything past the first five was dropped, and counted; nothing got written.
        assert dropped >= 220 - 5 - 2, dropped
        assert depth <= 5 and written == 0
        # Predictions did not wait for the database: the same latency as a server without the log.
        # Sequential requests on a shared machine: a generous bound, far below a blocked write (seconds).
        p50_on, p50_off = statistics.median(with_log), statistics.median(without_log)
        assert p50_on < 2 * p50_off + 0.005, (p50_on, p50_off)
        assert max(with_log) < 1.0, max(with_log)

        if holder is not None:
            # Once the database is back, the kept records (up to the queue's bound) are written.
            holder.execute("ROLLBACK")
            holder.close()
            holder = None
            wait_until(
                lambda: (
                    metric_value(server.url, "mnist_prediction_log_records_total", outcome="written") == 5
                ),
                60,
                "the five kept records to be written",
            )
            assert PredictionStore(url).count() == 5
    finally:
        if holder is not None:
            holder.close()
        code = server.stop()
        assert code in (0, -15), server.log_tail(60)
    if database == "unreachable":
        # At shutdown the five kept records could not be written either: said so, counted as failed.
        assert "5 records could not be written before shutdown" in server.log_text()


# --- retention ---------------------------------------------------------------------------------------------


def test_the_retention_purge_deletes_old_rows_only(
    tmp_path: Path, served_model: ServedModel, serving_cache_dir: Path, serving_mnist_test: Mnist
) -> None:
    url = f"sqlite:///{tmp_path / 'retention.db'}"
    store = PredictionStore(url)
    store.create_schema()
    now = datetime.now(UTC)
    image = serving_mnist_test[0][:1].astype(np.float32) / 255
    probs = np.full((1, 10), 0.1, np.float32)
    for age_days in (45, 31, 20, 1):
        store.insert_many(
            encode_batch(
                [f"aged-{age_days}"],
                created_at=now - timedelta(days=age_days),
                model_name="m",
                model_version="1",
                source="predict",
                images=image,
                probabilities=probs,
            )
        )
    server = start_logging_server(
        tmp_path, served_model, serving_cache_dir, url, SERVING_PREDICTION_LOG_RETENTION_DAYS="30"
    )
    try:
        # The purge runs as the writer starts, then hourly.
        wait_until(lambda: store.count() == 2, 30, "the rows older than 30 days to be purged")
        assert store.get("aged-20") is not None and store.get("aged-1") is not None
        assert "purged 2 prediction log rows" in server.log_text()
    finally:
        stop_cleanly(server)
        store.close()
