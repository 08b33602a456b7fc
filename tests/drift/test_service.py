"""The drift job as it runs: `python -m drift once` logging its report to a real MLflow server, and
`python -m drift` (the loop) reading a real prediction log (SQLite), scraped by a real Prometheus that
evaluates the chart's MnistInputDrift rule and sends it to a real Alertmanager, which delivers it to a
webhook receiver run by the test.

The rule and the scrape job come from the rendered chart (drift enabled, `for` shortened to seconds):
the job label Prometheus gives the drift job's series is the one the rule selects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from mlflow import MlflowClient

from drift import __main__ as drift_main
from drift.features import EmbeddingModel
from drift.reference import ResolvedModel
from drift.report import REPORT_FILE
from drift.service import Detector, DriftService
from local_mode.mlflow_server import MlflowServer
from local_mode.processes import ChildProcess, free_port, http_ok, wait_until
from prediction_log import PredictionStore, encode_batch
from testing.alertmanager import Alertmanager, webhook_receiver
from testing.helm import NAMESPACE, RELEASE, Helm, parse_documents
from testing.prometheus import Prometheus
from testing.training import REPO_ROOT
from tests.drift.conftest import inverted, rotated

DRIFT_JOB = f"{RELEASE}-drift"
UInt8Array = npt.NDArray[np.uint8]


def _drift_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "drift", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'operator'}", "MLFLOW_TRACKING_URI": ""}


def test_once_logs_the_windows_report_to_mlflow(
    mlflow_server: MlflowServer, champion_uri: str, mnist_test: UInt8Array, mnist_path: Path, tmp_path: Path
) -> None:
    images = tmp_path / "window.npz"
    np.savez(images, images=rotated(mnist_test[:400], seed=5))
    completed = subprocess.run(
        _drift_command(
            "once", f"--images={images}", f"--model={champion_uri}", f"--tracking-uri={mlflow_server.url}",
            f"--data={mnist_path}", f"--cache-dir={tmp_path / 'cache'}", "--experiment=mnist-drift",
        ),
        capture_output=True, text=True, env=_env(), timeout=600, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["decided"] and result["detected"], result["reason"]
    assert result["samples"] == 400 and result["run_id"]

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(result["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "mnist-drift"
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["window_samples"] == 400 and metrics["detected"] == 1.0
    assert metrics["p_value_combined"] < float(run.data.params["alpha"])
    assert {"score_embedding", "p_value_confidence", "p_value_predicted_label"} <= set(metrics)
    assert run.data.tags["mnist-mlops.io/report-renderer"] == "evidently", run.data.tags
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [REPORT_FILE]
    page = Path(client.download_artifacts(run.info.run_id, REPORT_FILE, str(tmp_path / "dl"))).read_text()
    # Evidently's page: its columns are the tested ones, the digits as a categorical column.
    assert "<html" in page.lower() and "root_metric_" in page
    assert all(column in page for column in ("pc1", "confidence", "predicted_digit"))
    # Evidently ran the same KS tests on the same columns: its p-values are ours.
    for i in range(1, 4):
        assert metrics[f"evidently_p_value_pc{i}"] == pytest.approx(
            metrics[f"p_value_embedding_pc{i}"], rel=1e-6
        )


def test_once_explains_bad_input(tmp_path: Path) -> None:
    images = tmp_path / "x.npz"
    np.savez(images, images=np.zeros((3, 28, 28), np.uint8))
    completed = subprocess.run(
        _drift_command("once", "--model=models:/mnist-cnn@champion", "--alpha=2"),
        capture_output=True, text=True, env=_env(), timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 2 and "alpha must be in (0, 1)" in completed.stderr
    completed = subprocess.run(
        _drift_command("once", f"--images={images}", f"--model={tmp_path / 'missing.onnx'}"),
        capture_output=True, text=True, env=_env(), timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 1 and "neither an ONNX file nor a registry URI" in completed.stderr


def test_windows_leave_out_the_pages_live_previews(tmp_path: Path) -> None:
    """The page streams half-drawn digits over the WebSocket (`ws_predict`) while a person draws: a
    window of those would alarm on every busy day. By default windows judge the other sources only;
    `--exclude-sources=` (empty) keeps them all."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    store = PredictionStore(url)
    store.create_schema()
    now = datetime.now(UTC)
    for source, count in (("predict", 3), ("ws_predict", 5), ("v2_infer", 2)):
        store.insert_many(
            encode_batch(
                [f"{source}-{i}" for i in range(count)],
                created_at=now - timedelta(seconds=30),
                model_name="mnist-cnn",
                model_version="1",
                source=source,
                images=np.zeros((count, 28, 28), np.float32),
                probabilities=np.full((count, 10), 0.1, np.float32),
            )
        )
    store.close()

    def sources_judged(*argv: str) -> set[str]:
        args = drift_main.build_parser().parse_args(["once", f"--prediction-log-url={url}", *argv])
        detector = Detector(drift_main.settings_from(args))
        try:
            return set(detector.logged_window(now).sources)
        finally:
            detector.close()

    assert sources_judged() == {"predict", "v2_infer"}
    assert sources_judged("--exclude-sources=") == {"predict", "ws_predict", "v2_infer"}
    assert sources_judged("--exclude-sources=ws_predict,v2_infer") == {"predict"}


def test_a_log_serving_has_not_written_yet_is_an_empty_window(
    resolved_model: ResolvedModel, mnist_path: Path, drift_cache: Path, tmp_path: Path
) -> None:
    """The drift job starts beside serving, before serving's first write creates the log's table (the
    real node showed it: the pod stayed unready until the first prediction). The reference is still
    built, the service is ready, and the window is merely too small to decide; a database that does not
    answer stays an error."""

    def service(url: str) -> DriftService:
        args = drift_main.build_parser().parse_args(
            [
                f"--prediction-log-url={url}", f"--model={resolved_model.path}", f"--data={mnist_path}",
                f"--cache-dir={drift_cache}", "--no-report", "--host=127.0.0.1", "--port=0",
            ]
        )  # fmt: skip
        return DriftService(drift_main.settings_from(args))

    empty = service(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        evaluation = empty.evaluate_once()
        assert evaluation is not None and not evaluation.result.decided
        assert evaluation.result.samples == 0
        assert empty.ready.is_set()
    finally:
        empty.detector.close()
        empty.server.server_close()

    port = free_port()
    away = service(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/predictions")
    try:
        assert away.evaluate_once() is None  # logged and counted as an error
        assert away.ready.is_set()  # the reference was built before the log was read
        errors = away.metrics.registry.get_sample_value("mnist_drift_evaluations_total", {"outcome": "error"})
        assert errors == 1
    finally:
        away.detector.close()
        away.server.server_close()


# --- the loop, scraped by Prometheus, alerting through Alertmanager ---------------------------------


class _Receiver:
    """A webhook receiver: records every notification Alertmanager posts."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return [
            alert
            for notification in self.notifications
            for alert in notification["alerts"]
            if alert["labels"].get("alertname") == alertname and alert["status"] == "firing"
        ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    yield server
    server.stop()


def _rendered_drift(
    helm: Helm, tmp_path: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The chart's drift rule group, drift ServiceMonitor and Service, with drift on and `for` 2s."""
    values = tmp_path / "drift-values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "drift": {"enabled": True, "predictionLog": {"existingSecret": "prediction-log"}},
                "monitoring": {"prometheusRule": {"thresholds": {"driftFor": "2s"}}},
            }
        )
    )
    docs = parse_documents(helm.template([values]).stdout)
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    groups = [
        g for g in rule["spec"]["groups"] if any(r.get("alert") == "MnistInputDrift" for r in g["rules"])
    ]
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor" and d["metadata"]["name"] == DRIFT_JOB)
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == DRIFT_JOB)
    return groups, monitor, service


def _scrape_job(monitor: dict[str, Any], service: dict[str, Any], target: str) -> dict[str, Any]:
    """prometheus-operator's scrape job for the drift ServiceMonitor, on a static loopback target that
    carries the labels discovery would give the drift pod's endpoint (as tests/serving does)."""
    endpoint = monitor["spec"]["endpoints"][0]
    port_name = service["spec"]["ports"][0]["name"]
    assert endpoint["port"] == port_name
    return {
        "job_name": f"serviceMonitor/{NAMESPACE}/{monitor['metadata']['name']}/0",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "metrics_path": endpoint["path"],
        "static_configs": [
            {
                "targets": [target],
                "labels": {
                    "__meta_kubernetes_namespace": NAMESPACE,
                    "__meta_kubernetes_service_name": service["metadata"]["name"],
                    "__meta_kubernetes_endpoint_port_name": port_name,
                },
            }
        ],
        "relabel_configs": [
            {
                "source_labels": ["__meta_kubernetes_endpoint_port_name"],
                "regex": endpoint["port"],
                "action": "keep",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        ],
    }


def _log(store: PredictionStore, images: UInt8Array, prefix: str, embedder: EmbeddingModel) -> None:
    probabilities = embedder.features(images).probabilities
    ids = [f"{prefix}-{i}" for i in range(len(images))]
    store.insert_many(
        encode_batch(
            ids,
            created_at=datetime.now(UTC),
            model_name="mnist-cnn",
            model_version="1",
            source="predict",
            images=images / 255.0,
            probabilities=probabilities,
        )
    )


def _gauge(prometheus: Prometheus, expr: str) -> float | None:
    samples = prometheus.query(expr)
    return float(samples[0]["value"][1]) if samples else None


def test_the_loop_is_scraped_and_the_alert_reaches_a_webhook(  # noqa: PLR0917 - fixtures
    helm: Helm,
    mlflow_server: MlflowServer,
    champion_uri: str,
    embedder: EmbeddingModel,
    mnist_test: UInt8Array,
    mnist_path: Path,
    receiver: _Receiver,
    tmp_path: Path,
) -> None:
    groups, monitor, service = _rendered_drift(helm, tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    database = f"sqlite:///{tmp_path / 'predictions.db'}"
    store = PredictionStore(database)
    store.create_schema()
    port = free_port()
    drift = ChildProcess.spawn(
        "drift",
        _drift_command(
            f"--prediction-log-url={database}", f"--model={champion_uri}",
            f"--tracking-uri={mlflow_server.url}", f"--data={mnist_path}",
            f"--cache-dir={tmp_path / 'cache'}", f"--port={port}", "--host=127.0.0.1",
            "--window-seconds=3600", "--interval-seconds=1", "--window-samples=500", "--min-samples=100",
            "--report-interval-seconds=3600",
        ),
        tmp_path / "drift.log",
        env=_env(),
        die_with_parent=True,
    )  # fmt: skip
    alertmanager = Alertmanager([webhook_receiver("test", receiver.url)], tmp_path / "alertmanager")
    prometheus_binary = Path("/usr/bin/prometheus")
    prometheus = Prometheus(
        [_scrape_job(monitor, service, f"127.0.0.1:{port}")],
        tmp_path / "prometheus",
        prometheus_binary,
        scrape_interval="1s",
        rule_files=[rules],
        alertmanagers=[alertmanager.address],
    )
    try:
        drift.wait_ready(lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), 300, "the reference")
        job = f'job="{DRIFT_JOB}"'
        selector = f'{{{job}, namespace="{NAMESPACE}"}}'
        # An empty log: no decision, the sample count says why, nothing fires.
        wait_until(
            lambda: _gauge(prometheus, f'mnist_drift_evaluations_total{{outcome="insufficient", {job}}}'),
            60, "an undecided evaluation scraped",
        )  # fmt: skip
        assert _gauge(prometheus, f"mnist_drift_window_samples{selector}") == 0
        assert _gauge(prometheus, f"mnist_drift_detected{selector}") == 0
        assert not prometheus.query(f"mnist_drift_p_value{selector}")

        # Undrifted MNIST traffic, a random sample of the test set: decided, quiet. (Not its first 500:
        # those are all from NIST's SD-3 writers, a population the detector tells apart.)
        order = np.random.default_rng(21).permutation(len(mnist_test))
        _log(store, mnist_test[order[:500]], "undrifted", embedder)
        wait_until(lambda: _gauge(prometheus, f'mnist_drift_p_value{{test="combined", job="{DRIFT_JOB}"}}'),
                   60, "a decided window")  # fmt: skip
        assert _gauge(prometheus, f"mnist_drift_window_samples{selector}") == 500
        assert _gauge(prometheus, f"mnist_drift_detected{selector}") == 0
        assert not [a for a in prometheus.alerts() if a["labels"]["alertname"] == "MnistInputDrift"]

        # Inverted digits (what the model sees when serving's inversion detection misses) take over.
        _log(store, inverted(mnist_test[order[500:1000]]), "inverted", embedder)
        wait_until(lambda: receiver.firing("MnistInputDrift"), 90, "MnistInputDrift at the webhook")
        alert = receiver.firing("MnistInputDrift")[0]
        assert alert["labels"]["job"] == DRIFT_JOB and alert["labels"]["namespace"] == NAMESPACE
        assert alert["labels"]["severity"] == "warning"
        assert "drifted from the training data" in alert["annotations"]["description"]
        assert _gauge(prometheus, f"mnist_drift_detected{selector}") == 1
        combined = _gauge(prometheus, f'mnist_drift_p_value{{test="combined", job="{DRIFT_JOB}"}}')
        assert combined is not None and combined < (_gauge(prometheus, f"mnist_drift_alpha{selector}") or 0)
        assert (_gauge(prometheus, f'mnist_drift_score{{test="embedding", job="{DRIFT_JOB}"}}') or 0) > 0.2
        # One report per decision change, at least the first (no drift) and this one (drift).
        client = MlflowClient(tracking_uri=mlflow_server.url)
        experiment = client.get_experiment_by_name("mnist-drift")
        assert experiment is not None
        runs = client.search_runs(
            [experiment.experiment_id], filter_string="tags.`mnist-mlops.io/drift-detected` = 'true'"
        )
        assert runs, "the drifted window's report is in MLflow"
    except BaseException:
        print(drift.log_tail(80), prometheus.log_tail(), alertmanager.log_tail(), sep="\n----\n")
        raise
    finally:
        prometheus.stop()
        alertmanager.stop()
        code = drift.stop()
        store.close()
    assert code == 0, drift.log_tail()
    assert "Traceback" not in drift.log_path.read_text(), drift.log_tail(80)
