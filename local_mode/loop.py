"""`make demo-loop`: the closed loop once, on a small scale: serve → log → detect → label → retrain →
gate → roll, with the real pieces, on one machine.

What runs, in order (a timeline with the figures is printed as it goes, and kept as JSON in
`<state dir>/loop/summary.json`):

1. The demo's MLflow server (same state directory as `make demo`) and a champion of the loop's own
   registered model, `mnist-cnn-loop`, trained now (baseline CNN, two epochs on 5,000 images)
   if the state has none. Its own model, because the loop retrains at that small scale: judged against
   `make demo`'s full-size champion, every retraining would lose at the gate, and the loop must never
   move the alias `make demo` serves.
2. The prediction service on that champion with its prediction log on SQLite
   (`SERVING_PREDICTION_LOG_URL`, in the state directory, fresh each run).
3. Undrifted traffic (MNIST test digits) and a drift evaluation of that window: quiet.
4. Drifted traffic (other test digits, rotated and thickened: what a new population of writers or a
   new scanner does), and labels for part of it through `POST /feedback`, as users of the page's
   "Wrong? It was a …" would send them. The drift evaluation of that window: detected.
5. The alert. With Prometheus and Alertmanager installed (Debian's `prometheus` and
   `prometheus-alertmanager`), for real: `python -m drift` exports its metrics, Prometheus scrapes
   them and evaluates the `MnistInputDrift` rule, Alertmanager delivers the firing alert to a webhook
   receiver here, which checks the bearer token and plays the operator's `/webhooks/alertmanager`.
   Without them, the detector's decision triggers the retraining directly, and the output says so.
6. The retraining: a RetrainingPolicy (contract/retraining.py) whose alert trigger names the alert
   creates a TrainingRun from its template (`includeFeedback: true`); the local runner trains it
   with the prediction log as `MNIST_FEEDBACK_DB_URL`, so the labelled feedback joins the training
   split (never the test set, which stays MNIST's so versions stay comparable), and MLflow records the
   dataset's composition.
7. The usual promotion gate decides; if it promotes, serving is restarted on the alias (what the
   operator's direct rollout does to the pods) and the held-out drifted digits (never labelled, never
   trained on) are sent again: accuracy on the drifted traffic before and after.

Bounded: every wait has a timeout, and the default sizes finish in a few minutes on two busy cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from contract.spec import CHAMPION_ALIAS
from local_mode.mlflow_server import MlflowServer, start_mlflow_server
from local_mode.processes import LOOPBACK, ChildProcess, free_port, http_ok, wait_until

log = logging.getLogger("local_mode.loop")

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOP_MODEL = "mnist-cnn-loop"
LOOP_EXPERIMENT = "mnist-loop"
POLICY_NAME = "drift-retrain"
ALERT_NAME = "MnistInputDrift"
PROMETHEUS = Path("/usr/bin/prometheus")
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")
# The operator's endpoint path (contract G), so the receiver here reads like the one it stands in for.
WEBHOOK_PATH = "/webhooks/alertmanager"
# Prometheus labels of the demo's drift job, which the chart's rule selects by (namespace, job).
DEMO_NAMESPACE = "local"
DRIFT_JOB = "drift"
BATCH = 100  # images per /predict/batch request
HTTP_TIMEOUT = 30.0
ALERT_TIMEOUT_SECONDS = 120.0
MNIST_TEST_IMAGES = 10_000
MIN_WINDOW = 100  # the drift job's default min_samples: a smaller window gets no decision


# --- the drifted traffic ----------------------------------------------------------------------------


def drift_images(
    images: npt.NDArray[np.uint8], rotation: float, rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """MNIST digits as another population would write them: turned by ±`rotation` degrees (the sign
    drawn per image) and with strokes thickened by a 2x2 grey dilation. The digit stays whole and
    centred, so a person still reads it, and the page's preprocessing would hand the model the same."""
    from scipy import ndimage

    out = np.empty_like(images)
    signs = rng.choice(np.array([-1.0, 1.0]), size=len(images))
    for i, (image, sign) in enumerate(zip(images, signs, strict=True)):
        turned = ndimage.rotate(image.astype(np.float32), sign * rotation, reshape=False, order=1)
        thick = ndimage.grey_dilation(turned, size=(2, 2))
        out[i] = np.clip(np.rint(thick), 0, 255).astype(np.uint8)
    return out


# --- HTTP to the prediction service ------------------------------------------------------------------


def _post_json(url: str, payload: Any, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return int(error.code), json.loads(body)
        except ValueError:
            return int(error.code), body.decode(errors="replace")


@dataclass(frozen=True)
class Answers:
    """What serving answered for a run of images, in order."""

    request_ids: list[str]
    digits: npt.NDArray[np.int64]
    versions: list[str]

    def accuracy(self, labels: npt.NDArray[np.int64], part: slice = slice(None)) -> float:
        """The share answered right of `part` of the images, whose true digits are `labels[part]`."""
        return float(np.mean(self.digits[part] == labels[part]))


def send_traffic(url: str, images: npt.NDArray[np.uint8], prefix: str) -> Answers:
    """`images` to `POST /predict/batch`, `BATCH` at a time, each batch with its own `X-Request-ID`;
    its images are logged (and take feedback) as `<request id>-<i>`."""
    request_ids: list[str] = []
    digits: list[int] = []
    versions: list[str] = []
    for start in range(0, len(images), BATCH):
        chunk = images[start : start + BATCH]
        request_id = f"{prefix}-{start // BATCH:04d}"
        status, body = _post_json(
            f"{url}/predict/batch",
            {"instances": [{"pixels": image.tolist()} for image in chunk]},
            {"X-Request-ID": request_id},
        )
        if status != 200:
            raise RuntimeError(f"/predict/batch answered {status}: {body}")
        if body["request_id"] != request_id:
            raise RuntimeError(f"serving answered request {request_id} as {body['request_id']}")
        request_ids.extend(f"{request_id}-{i}" for i in range(len(chunk)))
        digits.extend(int(p["digit"]) for p in body["predictions"])
        versions.extend([str(body["model_version"])] * len(chunk))
    return Answers(request_ids, np.array(digits, dtype=np.int64), versions)


def send_feedback(url: str, request_ids: Sequence[str], labels: npt.NDArray[np.int64]) -> Counter[str]:
    """One `POST /feedback` per labelled image; how many of each outcome (`created`, `unchanged`)."""
    outcomes: Counter[str] = Counter()
    for request_id, label in zip(request_ids, labels, strict=True):
        status, body = _post_json(f"{url}/feedback", {"request_id": request_id, "label": int(label)})
        if status >= 300:
            raise RuntimeError(f"/feedback for {request_id} answered {status}: {body}")
        outcomes[str(body.get("outcome", status)) if isinstance(body, dict) else str(status)] += 1
    return outcomes


# --- the timeline ------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """Events as they happen, printed at once (the demo is watched) and kept for the summary."""

    started: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: str, text: str, **figures: Any) -> None:
        at = time.monotonic() - self.started
        self.events.append({"at_seconds": round(at, 1), "step": step, "text": text, **figures})
        print(f"{at:7.1f}s  {step:<12} {text}", flush=True)


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2g}" if value < 0.01 else f"{value:.2f}"


def describe_drift(result: Mapping[str, Any]) -> str:
    if not result.get("decided"):
        return f"no decision: {result.get('reason')}"
    p_values = result.get("p_values", {})
    tests = ", ".join(
        f"{name} {_p(p_values[name])}"
        for name in ("embedding", "predicted_label", "confidence")
        if name in p_values
    )
    verdict = "DRIFT" if result.get("detected") else "quiet"
    return (
        f"{verdict}: {result.get('samples')} inputs, combined p {_p(result.get('p_value'))} against "
        f"alpha {result.get('alpha')} (per family: {tests})"
    )


# --- the alert: Prometheus → Alertmanager → a webhook receiver ---------------------------------------


class WebhookReceiver:
    """Alertmanager's webhook receiver, standing in for the operator's `POST /webhooks/alertmanager`:
    the same bearer-token check, and the firing alerts' names handed to whoever waits for them."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.firing: queue.Queue[dict[str, Any]] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != WEBHOOK_PATH:
                    self._answer(404, {"error": f"no route {self.path}"})
                    return
                if self.headers.get("Authorization") != f"Bearer {receiver.token}":
                    self._answer(401, {"error": "missing or wrong bearer token"})
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    payload = json.loads(self.rfile.read(length))
                    alerts = [a for a in payload["alerts"] if a.get("status") == "firing"]
                except (ValueError, KeyError, TypeError) as error:
                    self._answer(400, {"error": f"not an Alertmanager webhook payload: {error}"})
                    return
                for alert in alerts:
                    receiver.firing.put({**alert, "received_monotonic": time.monotonic()})
                self._answer(200, {"received": len(alerts)})

            def _answer(self, status: int, body: Mapping[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("webhook: " + format, *args)

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}{WEBHOOK_PATH}"

    def wait_for(self, alertname: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"timed out after {timeout:.0f}s waiting for Alertmanager to deliver {alertname}"
                )
            try:
                alert = self.firing.get(timeout=remaining)
            except queue.Empty:
                continue
            if alert.get("labels", {}).get("alertname") == alertname:
                return alert

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alert_rule(namespace: str, job: str) -> dict[str, Any]:
    """The chart's `MnistInputDrift` rule (charts/mnist-mlops/templates/monitoring/prometheusrule.yaml),
    selecting the demo's scrape target instead of the release's drift Service, and without its `for`:
    the demo has no minutes to wait for the persistence the cluster's rule asks for. A test keeps the
    expression equal to the rendered chart's."""
    selector = f'namespace="{namespace}", job="{job}"'
    return {
        "alert": ALERT_NAME,
        "expr": f"max by (namespace, job) (mnist_drift_detected{{{selector}}}) == 1",
        "labels": {"severity": "warning"},
        "annotations": {"summary": "The inputs being served no longer look like the training data."},
    }


class AlertStack:
    """`python -m drift` (the exporter), Prometheus scraping it with the alert rule, Alertmanager
    delivering to a `WebhookReceiver`: all real processes on loopback."""

    def __init__(
        self,
        directory: Path,
        *,
        tracking_uri: str,
        model: str,
        prediction_log_url: str,
        window_samples: int,
        data_path: Path | None,
        cache_dir: Path,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.children: list[ChildProcess] = []
        self.receiver = WebhookReceiver(secrets.token_urlsafe(24))
        try:
            self._start(
                directory,
                tracking_uri=tracking_uri,
                model=model,
                prediction_log_url=prediction_log_url,
                window_samples=window_samples,
                data_path=data_path,
                cache_dir=cache_dir,
            )
        except BaseException:
            self.stop()
            raise

    def _start(
        self,
        directory: Path,
        *,
        tracking_uri: str,
        model: str,
        prediction_log_url: str,
        window_samples: int,
        data_path: Path | None,
        cache_dir: Path,
    ) -> None:
        exporter_port, alertmanager_port, prometheus_port = free_port(), free_port(), free_port()
        command = [
            sys.executable, "-m", "drift",
            "--prediction-log-url", prediction_log_url,
            "--tracking-uri", tracking_uri,
            "--model", model,
            # The newest `window_samples` inputs: once the drifted traffic outnumbers them, the window
            # holds nothing else.
            "--window-seconds", "3600",
            "--window-samples", str(window_samples),
            "--interval-seconds", "1",
            "--port", str(exporter_port),
            "--host", LOOPBACK,
            "--cache-dir", str(cache_dir),
            "--no-report",
            *(["--data", str(data_path)] if data_path else []),
        ]  # fmt: skip
        exporter = self._spawn("drift exporter", command, directory / "drift.log")
        exporter.wait_ready(
            lambda: http_ok(f"http://{LOOPBACK}:{exporter_port}/readyz"), 120, "its reference was built"
        )

        am_config = {
            "route": {
                "receiver": "retraining",
                "group_by": ["alertname"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [
                {
                    "name": "retraining",
                    "webhook_configs": [
                        {
                            "url": self.receiver.url,
                            "send_resolved": False,
                            "http_config": {
                                "authorization": {"type": "Bearer", "credentials": self.receiver.token}
                            },
                        }
                    ],
                }
            ],
        }
        am_dir = directory / "alertmanager"
        am_dir.mkdir(exist_ok=True)
        (am_dir / "alertmanager.yml").write_text(yaml.safe_dump(am_config, sort_keys=False))
        alertmanager = self._spawn(
            "alertmanager",
            [
                str(ALERTMANAGER),
                f"--config.file={am_dir / 'alertmanager.yml'}",
                f"--storage.path={am_dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{alertmanager_port}",
                # A lone instance: no gossip port to bind, nothing to wait for.
                "--cluster.listen-address=",
            ],
            am_dir / "alertmanager.log",
        )
        alertmanager.wait_ready(
            lambda: http_ok(f"http://{LOOPBACK}:{alertmanager_port}/-/ready"), 60, "/-/ready"
        )

        prom_dir = directory / "prometheus"
        prom_dir.mkdir(exist_ok=True)
        (prom_dir / "rules.yaml").write_text(
            yaml.safe_dump(
                {"groups": [{"name": "mnist-drift", "rules": [alert_rule(DEMO_NAMESPACE, DRIFT_JOB)]}]},
                sort_keys=False,
            )
        )
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(prom_dir / "rules.yaml")],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [f"{LOOPBACK}:{alertmanager_port}"]}]}]
            },
            "scrape_configs": [
                {
                    "job_name": DRIFT_JOB,
                    "scrape_timeout": "1s",
                    # The namespace label prometheus-operator would add: the chart's rule selects by it.
                    "static_configs": [
                        {"targets": [f"{LOOPBACK}:{exporter_port}"], "labels": {"namespace": DEMO_NAMESPACE}}
                    ],
                }
            ],
        }
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(prom_config, sort_keys=False))
        self.prometheus_url = f"http://{LOOPBACK}:{prometheus_port}"
        prometheus = self._spawn(
            "prometheus",
            [
                str(PROMETHEUS),
                f"--config.file={prom_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{prometheus_port}",
                "--storage.tsdb.retention.time=1h",
            ],
            prom_dir / "prometheus.log",
        )
        prometheus.wait_ready(lambda: http_ok(f"{self.prometheus_url}/-/ready"), 60, "/-/ready")

    def _spawn(self, name: str, command: Sequence[str], log_path: Path) -> ChildProcess:
        child = ChildProcess.spawn(name, command, log_path, env=dict(os.environ), die_with_parent=True)
        self.children.append(child)
        return child

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        result = body["data"]["result"]
        assert isinstance(result, list)
        return result

    def scraped_value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def check_running(self) -> None:
        for child in self.children:
            child.check_running("the loop finished")

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(10)
        self.receiver.stop()


# --- the loop ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopOptions:
    state_dir: Path
    data: Path | None = None
    model: str = LOOP_MODEL
    train_samples: int = 5000  # MNIST examples per training (the champion's and the retraining's)
    epochs: int = 2
    traffic: int = 500  # images per traffic phase: the window each drift evaluation tests
    labelled: int = 300  # drifted images that get a label through /feedback
    held_out: int = 300  # drifted images never labelled: accuracy before and after
    rotation: float = 30.0  # degrees, either way
    alert: str = "auto"  # auto | prometheus | direct
    seed: int = 11

    def __post_init__(self) -> None:
        if self.traffic < MIN_WINDOW:
            raise ValueError(
                f"traffic must be at least {MIN_WINDOW} images: a smaller window gets no decision"
            )
        if self.labelled < 1 or self.held_out < 1:
            raise ValueError("labelled and held out need at least one image each")
        if self.traffic + self.drifted > MNIST_TEST_IMAGES:
            raise ValueError(
                f"the traffic needs {self.traffic + self.drifted} of MNIST's {MNIST_TEST_IMAGES} test images"
            )
        if self.alert not in {"auto", "prometheus", "direct"}:
            raise ValueError(f"alert must be auto, prometheus or direct, not {self.alert!r}")

    @property
    def drifted(self) -> int:
        """Drifted images sent: a whole window, and enough for disjoint labelled and held-out parts."""
        return max(self.traffic, self.labelled + self.held_out)

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model}@{CHAMPION_ALIAS}"


def alert_binaries_installed() -> bool:
    return PROMETHEUS.exists() and ALERTMANAGER.exists()


def retraining_policy(options: LoopOptions) -> Any:
    """The RetrainingPolicy the loop acts out: its template is the champion's spec with includeFeedback,
    and its alert trigger names the drift alert. The gate asks for a version better than the champion
    on MNIST's test set (the floor of 0.5 only rules out a broken run)."""
    from contract.retraining import AlertTrigger, RetrainingPolicySpec, Triggers
    from contract.spec import Architecture, Hyperparameters, PromotionPolicySpec, TrainingRunSpec

    template = TrainingRunSpec(
        architecture=Architecture.BASELINE,
        hyperparameters=Hyperparameters(epochs=options.epochs),
        experiment=LOOP_EXPERIMENT,
        registered_model=options.model,
        promotion=PromotionPolicySpec(minimum=0.5, must_beat_champion=True),
        max_train_samples=options.train_samples,
        include_feedback=True,
    )
    return RetrainingPolicySpec(
        training_run_template=template, triggers=Triggers(alert=AlertTrigger(names=[ALERT_NAME]))
    )


def _manifest(name: str, spec: Any) -> Any:
    from contract.spec import API_GROUP, API_VERSION, KIND, TrainingRunManifest

    return TrainingRunManifest.model_validate(
        {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "metadata": {"name": name}, "spec": spec}
    )


def version_info(client: Any, model: str, version: str) -> dict[str, Any]:
    """A version's test accuracy and what it learned from (the training's MLflow params and inputs)."""
    model_version = client.get_model_version(model, version)
    run = client.get_run(model_version.run_id)
    params = run.data.params
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return {
        "version": version,
        "run_id": model_version.run_id,
        "test_accuracy": run.data.metrics.get("test_accuracy"),
        "mnist_train_samples": int(params.get("mnist_train_samples", 0) or 0),
        "feedback_samples": int(params.get("feedback_samples", 0) or 0),
        "train_digest": params.get("train_digest"),
        "dataset_inputs": sorted({item.dataset.name for item in inputs}),
    }


@dataclass(frozen=True)
class Traffic:
    """The images the loop sends: undrifted test digits, and other test digits drifted."""

    clean: npt.NDArray[np.uint8]
    clean_labels: npt.NDArray[np.int64]
    drifted: npt.NDArray[np.uint8]
    drifted_labels: npt.NDArray[np.int64]
    labelled: slice  # of `drifted`: sent to /feedback with their labels
    held_out: slice  # of `drifted`: never labelled, never trained on

    @classmethod
    def make(cls, options: LoopOptions) -> Traffic:
        from training_job.data import load_raw

        arrays, _ = load_raw(options.data)
        images, labels = np.asarray(arrays["x_test"], np.uint8), np.asarray(arrays["y_test"], np.int64)
        rng = np.random.default_rng(options.seed)
        order = rng.permutation(len(images))
        clean = order[: options.traffic]
        drifted = order[options.traffic : options.traffic + options.drifted]
        return cls(
            clean=images[clean],
            clean_labels=labels[clean],
            drifted=drift_images(images[drifted], options.rotation, rng),
            drifted_labels=labels[drifted],
            labelled=slice(0, options.labelled),
            held_out=slice(options.drifted - options.held_out, options.drifted),
        )


class Loop:
    """One run of the loop: each step a method, the processes in `stop`, the figures in `summary`."""

    def __init__(self, options: LoopOptions) -> None:
        self.options = options
        self.timeline = Timeline()
        self.summary: dict[str, Any] = {"model": options.model}
        self.directory = options.state_dir / "loop"
        self.prediction_log_url = f"sqlite:///{self.directory / 'prediction-log.db'}"
        self.policy = retraining_policy(options)
        self.mlflow: MlflowServer | None = None
        self.serving: ChildProcess | None = None
        self.alerts: AlertStack | None = None
        self.store: Any = None
        self.detector: Any = None
        self.url = ""
        self.drift_started = 0.0

    @property
    def tracking_uri(self) -> str:
        assert self.mlflow is not None
        return self.mlflow.url

    def run(self) -> dict[str, Any]:
        options = self.options
        if options.alert == "prometheus" and not alert_binaries_installed():
            raise RuntimeError(f"--alert=prometheus needs {PROMETHEUS} and {ALERTMANAGER} (make system-deps)")
        # A fresh prediction log each run: the windows below are this run's traffic and nothing older.
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        traffic = Traffic.make(options)
        try:
            champion = self.start(options.alert != "direct" and alert_binaries_installed())
            self.quiet_phase(traffic)
            answers = self.drift_phase(traffic)
            if self.alert():
                new_version, promoted = self.retrain()
                self.roll(traffic, answers, champion, new_version if promoted else None)
        finally:
            self.stop()
        return self.finish()

    def start(self, alert_stack: bool) -> str:
        """MLflow, the champion (trained now if there is none), serving with its log, the alerting."""
        from mlflow import MlflowClient

        from contract.registry import alias_version
        from local_mode.demo import PREFERRED_MLFLOW_PORT, _port
        from local_mode.runner import run_manifests
        from prediction_log import PredictionStore

        options = self.options
        self.mlflow = start_mlflow_server(options.state_dir / "mlflow", _port(PREFERRED_MLFLOW_PORT))
        self.client = MlflowClient(self.tracking_uri)
        # For everything that resolves models:/ URIs through MLflow's defaults (the drift job's download,
        # here and in its child process), as in a pod, where the chart sets it.
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        self.timeline.add("mlflow", f"{self.tracking_uri} (state {options.state_dir / 'mlflow'})")
        champion = alias_version(self.client, options.model)
        how = "already in the registry"
        if champion is None:
            spec = self.policy.training_run_template.model_copy(update={"include_feedback": False})
            manifest = _manifest("loop-champion", spec)
            outcome = run_manifests([manifest], self.tracking_uri, options.data, options.train_samples)[0]
            champion = alias_version(self.client, options.model)
            if champion is None:
                raise RuntimeError(f"the first version was not promoted: {outcome.result.promotion_reason}")
            how = f"trained now ({options.epochs} epoch(s) on {options.train_samples} MNIST images)"
        before = version_info(self.client, options.model, champion)
        self.summary["champion"] = before
        self.timeline.add(
            "champion", f"{options.model} v{champion}, {how}; test accuracy {before['test_accuracy']:.4f}"
        )

        self.store = PredictionStore(self.prediction_log_url)
        # Serving creates it too, in its writer task; the counts below must not race that.
        self.store.create_schema()
        self.start_serving()
        self.timeline.add("serving", f"{self.url} on v{champion}, prediction log {self.prediction_log_url}")
        if alert_stack:
            self.alerts = AlertStack(
                self.directory / "alerting",
                tracking_uri=self.tracking_uri,
                model=options.model_uri,
                prediction_log_url=self.prediction_log_url,
                window_samples=options.traffic,
                data_path=options.data,
                cache_dir=self.directory / "drift-cache",
            )
            self.timeline.add(
                "alerting",
                f"python -m drift every 1s → Prometheus {self.alerts.prometheus_url} ({ALERT_NAME} rule) → "
                f"Alertmanager → {self.alerts.receiver.url}",
            )
        self.detector = make_detector(options, self.tracking_uri, self.directory / "drift-cache")
        return champion

    def start_serving(self) -> None:
        from local_mode.demo import start_serving

        assert self.mlflow is not None
        environment = {"SERVING_PREDICTION_LOG_URL": self.prediction_log_url, "SERVING_LOG_FORMAT": "text"}
        self.serving, self.url = start_serving(self.mlflow, self.options.model, self.directory, environment)

    def send(self, images: npt.NDArray[np.uint8], prefix: str) -> tuple[Answers, datetime, datetime]:
        """Sends `images` and waits until serving has logged them: the window they make."""
        start = datetime.now(UTC)
        logged = self.store.count()
        answers = send_traffic(self.url, images, prefix)
        wait_until(
            lambda: self.store.count() >= logged + len(images),
            30,
            f"{len(images)} more predictions in the prediction log",
            0.2,
        )
        return answers, start, datetime.now(UTC)

    def evaluate(self, start: datetime, end: datetime) -> dict[str, Any]:
        """The drift job's evaluation of the inputs logged in [start, end)."""
        images = self.store.window(start, end).images
        evaluation = self.detector.evaluate_images(images, window_start=start, window_end=end)
        result: dict[str, Any] = evaluation.to_dict()
        report = f"; report in MLflow run {result['run_id']}" if result.get("run_id") else ""
        self.timeline.add("drift check", describe_drift(result) + report)
        return result

    def quiet_phase(self, traffic: Traffic) -> None:
        answers, start, end = self.send(traffic.clean, "loop-clean")
        self.timeline.add(
            "traffic",
            f"{len(traffic.clean)} MNIST test digits → logged; "
            f"{answers.accuracy(traffic.clean_labels):.3f} answered right",
        )
        self.summary["quiet"] = self.evaluate(start, end)
        if self.alerts is not None:
            alerts, window = self.alerts, self.options.traffic
            wait_until(
                lambda: (
                    (alerts.scraped_value(f'mnist_drift_window_samples{{job="{DRIFT_JOB}"}}') or 0) >= window
                ),
                60,
                "Prometheus to scrape the exporter's evaluation of the undrifted window",
            )
            detected = alerts.scraped_value(f'mnist_drift_detected{{job="{DRIFT_JOB}"}}')
            firing = alerts.query(f'ALERTS{{alertname="{ALERT_NAME}"}}')
            self.summary["quiet_prometheus"] = {
                "mnist_drift_detected": detected,
                "alert_active": bool(firing),
            }
            state = "inactive" if not firing else f"{firing[0]['metric'].get('alertstate')} (a false alarm)"
            self.timeline.add("prometheus", f"mnist_drift_detected {detected:g}; {ALERT_NAME} {state}")

    def drift_phase(self, traffic: Traffic) -> Answers:
        self.drift_started = time.monotonic()
        answers, start, end = self.send(traffic.drifted, "loop-drifted")
        self.timeline.add(
            "traffic",
            f"{len(traffic.drifted)} drifted digits (turned ±{self.options.rotation:g}°, thickened) → "
            f"logged; {answers.accuracy(traffic.drifted_labels):.3f} answered right",
        )
        labelled = traffic.labelled
        outcomes = send_feedback(self.url, answers.request_ids[labelled], traffic.drifted_labels[labelled])
        in_log = self.store.count_labelled()
        self.summary["feedback"] = {
            "sent": labelled.stop,
            "answers": dict(outcomes),
            "labelled_in_log": in_log,
        }
        answered = ", ".join(f"{count} {result}" for result, count in sorted(outcomes.items()))
        self.timeline.add(
            "feedback",
            f"{labelled.stop} labels via POST /feedback ({answered}); {in_log} labelled in the log",
        )
        self.summary["detected"] = self.evaluate(start, end)
        return answers

    def alert(self) -> bool:
        """Whether the retraining is triggered: by the alert Alertmanager delivers, or without the
        alerting stack by the detector's decision itself."""
        if self.alerts is not None:
            alert = self.alerts.receiver.wait_for(ALERT_NAME, ALERT_TIMEOUT_SECONDS)
            delay = alert["received_monotonic"] - self.drift_started
            self.summary["alert"] = {
                "mode": "prometheus",
                "fired": True,
                "labels": alert.get("labels", {}),
                "seconds_after_drift_began": round(delay, 1),
            }
            self.timeline.add(
                "alert",
                f"{ALERT_NAME} fired: Prometheus → Alertmanager → webhook (bearer token checked), "
                f"{delay:.1f}s after the first drifted request",
            )
            # The training needs the cores more than the alerting does from here on.
            self.alerts.stop()
            self.alerts = None
            return True
        fired = bool(self.summary["detected"]["detected"])
        self.summary["alert"] = {"mode": "direct", "fired": fired}
        if fired:
            self.timeline.add(
                "alert",
                f"no Prometheus/Alertmanager ({PROMETHEUS}, {ALERTMANAGER}): the detector's decision "
                f"stands in for {ALERT_NAME}",
            )
        else:
            self.timeline.add("alert", "no drift detected: no alert, no retraining")
        return fired

    def retrain(self) -> tuple[str, bool]:
        """The policy's TrainingRun, trained with the prediction log's feedback, and the gate's decision."""
        from contract.retraining import FEEDBACK_DB_URL_ENV, TRIGGER_ANNOTATION
        from local_mode.runner import run_manifests

        triggers = self.policy.triggers.alert.names if self.policy.triggers.alert else []
        if ALERT_NAME not in triggers:
            raise RuntimeError(f"RetrainingPolicy {POLICY_NAME} does not answer {ALERT_NAME}")
        # The operator's naming for a policy's runs: <policy>-<10 hex digits>.
        name, trigger = f"{POLICY_NAME}-{secrets.token_hex(5)}", f"alert:{ALERT_NAME}"
        self.timeline.add(
            "retraining",
            f"RetrainingPolicy {POLICY_NAME} → TrainingRun {name} ({TRIGGER_ANNOTATION}: {trigger}), "
            f"includeFeedback, {FEEDBACK_DB_URL_ENV} = the prediction log",
        )
        manifest = _manifest(name, self.policy.training_run_template)
        result = run_manifests(
            [manifest],
            self.tracking_uri,
            self.options.data,
            self.options.train_samples,
            feedback_db_url=self.prediction_log_url,
        )[0].result
        retrained = version_info(self.client, self.options.model, result.model_version)
        self.summary["retrained"] = {**retrained, "trainingrun": name, "trigger": trigger}
        self.timeline.add(
            "trained",
            f"v{result.model_version} learned from {retrained['mnist_train_samples']} MNIST + "
            f"{retrained['feedback_samples']} feedback examples (train digest "
            f"{str(retrained['train_digest'])[:12]}); test accuracy {retrained['test_accuracy']:.4f}",
        )
        promoted = bool(result.promoted)
        self.summary["gate"] = {"promoted": promoted, "reason": result.promotion_reason}
        verdict = "promoted" if promoted else "rejected"
        self.timeline.add("gate", f"v{result.model_version} {verdict}: {result.promotion_reason}")
        return result.model_version, promoted

    def roll(self, traffic: Traffic, answers: Answers, champion: str, promoted: str | None) -> None:
        """Serving onto the promoted version (a restart resolves the alias again: what the operator's
        direct rollout does to the pods), then the held-out drifted digits again."""
        held_out = traffic.held_out
        before = answers.accuracy(traffic.drifted_labels, held_out)
        after: float | None = None
        serving_version = champion
        if promoted is not None:
            assert self.serving is not None
            self.serving.stop(30)
            self.serving = None
            self.start_serving()
            again = send_traffic(self.url, traffic.drifted[held_out], "loop-after")
            serving_version, after = again.versions[0], again.accuracy(traffic.drifted_labels[held_out])
            self.timeline.add(
                "rolled", f"serving restarted on {self.options.model_uri}: now v{serving_version}"
            )
        self.summary["serving_version"] = serving_version
        count = held_out.stop - held_out.start
        self.summary["drifted_accuracy"] = {"held_out": count, "before": before, "after": after}
        change = (
            f" → v{serving_version} {after:.3f}" if after is not None else f" (serving stays on v{champion})"
        )
        self.timeline.add("accuracy", f"{count} held-out drifted digits: v{champion} {before:.3f}{change}")

    def stop(self) -> None:
        if self.alerts is not None:
            self.alerts.stop()
            self.alerts = None
        if self.serving is not None:
            self.serving.stop(30)
            self.serving = None
        if self.detector is not None:
            self.detector.close()
        if self.store is not None:
            self.store.close()
        if self.mlflow is not None:
            self.mlflow.stop()
            self.mlflow = None

    def finish(self) -> dict[str, Any]:
        self.summary["seconds"] = round(time.monotonic() - self.timeline.started, 1)
        self.summary["timeline"] = self.timeline.events
        path = self.directory / "summary.json"
        path.write_text(json.dumps(self.summary, indent=2, default=str))
        print(f"{self.summary['seconds']:7.1f}s  {'done':<12} summary in {path}", flush=True)
        return self.summary


def make_detector(options: LoopOptions, tracking_uri: str, cache_dir: Path) -> Any:
    """The drift job's evaluation in-process, so each window is cut exactly at a phase's boundaries;
    each evaluation logs its report to MLflow (experiment mnist-drift) as the job does."""
    from drift.report import ReportLogger
    from drift.service import Detector, Settings

    settings = Settings(
        model=options.model_uri,
        tracking_uri=tracking_uri,
        window_samples=options.traffic,
        data_path=options.data,
        cache_dir=cache_dir,
    )
    return Detector(settings, ReportLogger.create(settings))


def main(argv: Sequence[str] | None = None) -> int:
    defaults = LoopOptions(state_dir=REPO_ROOT / ".state")
    parser = argparse.ArgumentParser(
        prog="python -m local_mode --loop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", type=Path, default=defaults.state_dir)
    parser.add_argument("--data", type=Path, help="MNIST .npz (default: the bundled copy)")
    parser.add_argument(
        "--model", default=defaults.model, help="the registered model the loop trains and serves"
    )
    parser.add_argument("--max-train-samples", type=int, default=defaults.train_samples)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--traffic", type=int, default=defaults.traffic, help="images per phase (the window)")
    parser.add_argument("--labelled", type=int, default=defaults.labelled, help="drifted images labelled")
    parser.add_argument(
        "--held-out", type=int, default=defaults.held_out, help="drifted images never labelled"
    )
    parser.add_argument(
        "--rotation", type=float, default=defaults.rotation, help="degrees the drifted digits turn"
    )
    parser.add_argument(
        "--alert",
        choices=["auto", "prometheus", "direct"],
        default=defaults.alert,
        help="auto: Prometheus and Alertmanager when installed; direct: the detector triggers the retraining",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        options = LoopOptions(
            state_dir=args.state_dir.resolve(),
            data=args.data,
            model=args.model,
            train_samples=args.max_train_samples,
            epochs=args.epochs,
            traffic=args.traffic,
            labelled=args.labelled,
            held_out=args.held_out,
            rotation=args.rotation,
            alert=args.alert,
        )
    except ValueError as error:
        parser.error(str(error))
    Loop(options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
