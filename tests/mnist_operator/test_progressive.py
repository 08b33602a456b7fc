"""Canary and shadow rollouts end to end: the operator (`python -m mnist_operator`, its own
ServiceAccount) against the real API server and fake kubelet, a real MLflow, a real Prometheus
scraping two real serving processes (`python -m serving`, pinned to the stable version, polling the
registry's traffic tag every second), and live traffic posted by the test.

The candidate TrainingRuns go through the whole operator path (Job, result, offline gate, canary);
their training pod is a stand-in that registers a new version of a model prepared once per module, so a
rollout does not wait for TensorFlow each time: `healthy` (trained by the real entrypoint; also the
stable: a candidate that behaves like stable) and `degraded` (the same network with its output layer
flattened and tilted towards one digit: answers with a fraction of the confidence and disagrees with
stable on a tenth or more of the digits, which the offline gate lets through with mustBeatChampion
false). Deriving it from `healthy` instead of training a second model saves a TensorFlow run.

Marked slow: the module trains its model with the real entrypoint (a minute or two on two shared
cores); the rollouts themselves take under a minute each.

Measured and printed: per-step timings (weight written → applied by every pod → analysis) and the
abort latency (the traffic tag removed → no candidate answer from serving, and → Prometheus showing
no candidate weight).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from contract.constants import PROMOTED_TAG
from contract.registry import alias_version, promote
from contract.result import TrainingResult
from contract.spec import API_GROUP, API_VERSION, CHAMPION_ALIAS, KIND, PREVIOUS_ALIAS
from contract.traffic import TRAFFIC_TAG, parse
from local_mode.processes import wait_until
from mnist_operator import tracking
from mnist_operator.progressive import ROLLOUT_ACTION_ANNOTATION
from testing.controlplane import ControlPlane
from testing.fake_kubelet import FakeKubelet
from testing.kubectl import get_json, kubectl_ok, kubectl_watch, unique_name
from testing.operator_harness import (
    REPO_ROOT,
    OperatorFactory,
    OperatorProcess,
    RestartableMlflow,
    wait_for_trainingrun,
)
from testing.prometheus import Prometheus
from testing.serving import ServingProcess
from testing.training import run_training

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MNIST = REPO_ROOT / "data" / "mnist.npz"
# The spec's minimum hold: a step with too few requests to judge is extended, not failed.
HOLD_SECONDS = 10
# Requests per version per window: at 10% the candidate needs ~ MIN_REQUESTS / 0.1 / HOLD requests/s.
MIN_REQUESTS = 20
IMAGES = 200
ROLLOUT_TIMEOUT = 240.0
# Prometheus scrapes every second; serving polls the tag every second.
SCRAPE_INTERVAL = "1s"


# ------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class Pretrained:
    run_id: str
    source: str
    accuracy: float


def _pretrain(url: str, model: str, *args: str) -> Pretrained:
    completed = run_training(
        url,
        "--architecture=baseline",
        "--epochs=1",
        "--batch-size=64",
        f"--registered-model={model}",
        "--experiment=progressive-pretrained",
        f"--data={MNIST}",
        *args,
        timeout=900,
    )
    assert completed.returncode == 0, f"training failed:\n{completed.stderr[-4000:]}"
    result = TrainingResult.from_json(completed.stdout.strip().splitlines()[-1])
    client = tracking.make_client(url)
    source = str(client.get_model_version(model, result.model_version).source)
    return Pretrained(result.run_id, source, float(result.metrics["test_accuracy"]))


# The degraded candidate's output layer: logits scaled down (confidence falls far more than the 5% the
# analysis allows) plus a bias towards one digit (agreement with stable falls well under 97%).
DEGRADED_LOGIT_SCALE = 0.25
DEGRADED_BIAS = 1.5
DEGRADED_DIGIT = 1


def _degrade(source: Path, target: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    # The dense output layer: a [features, 10] float weight and its [10] bias, before the softmax.
    changed = 0
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.dtype != np.float32 or weights.shape[-1:] != (10,) or weights.ndim > 2:
            continue
        weights = weights * np.float32(DEGRADED_LOGIT_SCALE)
        if weights.ndim == 1:
            weights[DEGRADED_DIGIT] += DEGRADED_BIAS
        initializer.CopyFrom(numpy_helper.from_array(weights.astype(np.float32), initializer.name))
        changed += 1
    assert changed == 2, f"expected the output layer's weight and bias, changed {changed} tensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


def _onnx_accuracy(path: Path) -> float:
    import onnxruntime as ort

    with np.load(MNIST) as data:
        images = data["x_test"].astype(np.float32)[..., None] / np.float32(255)
        labels = data["y_test"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: images})
    return float((np.asarray(probabilities).argmax(axis=1) == labels).mean())


def _derive_degraded(url: str, healthy: Pretrained, workdir: Path) -> Pretrained:
    """A run holding the degraded ONNX model, with the healthy run's metrics except its measured
    accuracy (the stand-in trainer reports the run's metrics as the training result)."""
    import mlflow.artifacts
    from mlflow.entities import Metric

    client = tracking.make_client(url)
    # An MLflow 3 logged model (models:/m-...): its artifact location, which needs no registry lookup.
    location = (
        client.get_logged_model(healthy.source.removeprefix("models:/")).artifact_location
        if healthy.source.startswith("models:/m-")
        else healthy.source
    )
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=location, dst_path=str(workdir / "healthy"), tracking_uri=url
        )
    )
    degraded = workdir / "degraded" / "model.onnx"
    _degrade(next(local.rglob("model.onnx")), degraded)
    accuracy = _onnx_accuracy(degraded)
    assert accuracy < healthy.accuracy, (accuracy, healthy.accuracy)
    metrics = dict(client.get_run(healthy.run_id).data.metrics)
    metrics.update({key: accuracy for key in ("test_accuracy", "onnx_test_accuracy") if key in metrics})
    experiment = client.get_experiment_by_name("progressive-pretrained")
    assert experiment is not None
    run = client.create_run(experiment.experiment_id, run_name="degraded")
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.log_artifacts(run.info.run_id, str(degraded.parent), "onnx")
    client.set_terminated(run.info.run_id)
    return Pretrained(run.info.run_id, f"runs:/{run.info.run_id}/onnx", accuracy)


@pytest.fixture(scope="module")
def pretrained(
    operator_mlflow: RestartableMlflow, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Pretrained]:
    healthy = _pretrain(operator_mlflow.url, unique_name("pretrained"), "--max-train-samples=3000")
    degraded = _derive_degraded(operator_mlflow.url, healthy, tmp_path_factory.mktemp("degraded"))
    print(f"pretrained: healthy test accuracy {healthy.accuracy:.3f}, degraded {degraded.accuracy:.3f}")
    return {"healthy": healthy, "degraded": degraded}


# `python -m training_job` as the fake kubelet runs it: registers a new version of a pretrained model
# (CLONE_RUN_ID / CLONE_SOURCE) and reports it as the Job's result, as the real trainer would.
CLONE_INIT = """
__path__.append({real!r})
"""
CLONE_MAIN = """
import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from contract.result import TrainingResult, write_termination_message
from contract.train_command import parse_train_command

spec = parse_train_command(sys.argv[1:]).spec
client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
run = client.get_run(os.environ["CLONE_RUN_ID"])
try:
    client.create_registered_model(spec.registered_model)
except MlflowException:
    pass  # registered by an earlier run
source = os.environ["CLONE_SOURCE"]
# An MLflow 3 logged model (models:/m-...) is registered by its id.
model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
version = client.create_model_version(spec.registered_model, source, run.info.run_id, model_id=model_id)
result = TrainingResult(
    run_id=run.info.run_id,
    experiment_id=run.info.experiment_id,
    registered_model=spec.registered_model,
    model_version=str(version.version),
    architecture=spec.architecture.value,
    metrics={key: float(value) for key, value in run.data.metrics.items()},
    onnx_model_uri=f"runs:/{run.info.run_id}/onnx",
    keras_model_uri=f"runs:/{run.info.run_id}/keras",
)
write_termination_message(result)
print(result.to_json())
"""


@pytest.fixture(scope="module")
def clone_trainer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clone-trainer")
    package = root / "training_job"
    package.mkdir()
    (package / "__init__.py").write_text(CLONE_INIT.format(real=str(REPO_ROOT / "training_job")))
    (package / "__main__.py").write_text(CLONE_MAIN)
    return root


def register_clone(client: MlflowClient, model: str, source: Pretrained) -> str:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # registered by an earlier test
        client.create_registered_model(model)
    model_id = source.source.removeprefix("models:/") if source.source.startswith("models:/m-") else None
    return str(client.create_model_version(model, source.source, source.run_id, model_id=model_id).version)


# ------------------------------------------------------------------------ live traffic


def mnist_images() -> npt.NDArray[np.uint8]:
    with np.load(MNIST) as data:
        images: npt.NDArray[np.uint8] = data["x_test"][:IMAGES]
    return images


@dataclass
class Traffic:
    """A thread POSTing MNIST test images to every serving process in turn, recording which version
    answered each request (X-Model-Version) and when."""

    urls: list[str]
    bodies: list[bytes]
    answers: list[tuple[float, str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        clients = [httpx.Client(base_url=url, timeout=30) for url in self.urls]
        index = 0
        try:
            while not self.stop.is_set():
                for client in clients:
                    image = index % len(self.bodies)
                    index += 1
                    try:
                        response = client.post(
                            "/predict",
                            content=self.bodies[image],
                            headers={"Content-Type": "application/json"},
                        )
                    except httpx.HTTPError as error:
                        self.errors.append(str(error))
                        continue
                    if response.status_code != 200:
                        self.errors.append(f"{response.status_code} {response.text[:200]}")
                        continue
                    self.answers.append(
                        (time.monotonic(), response.headers.get("x-model-version", ""), image)
                    )
                # ~40 requests/s in all: at 10% the candidate answers ~40 in a 10 s step.
                self.stop.wait(0.02)
        finally:
            for client in clients:
                client.close()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def share(self, version: str, since: float, until: float | None = None) -> tuple[float, int]:
        """(share of answers by `version`, answers) in [since, until]."""
        window = [v for t, v, _ in list(self.answers) if t >= since and (until is None or t <= until)]
        if not window:
            return 0.0, 0
        return sum(1 for v in window if v == version) / len(window), len(window)

    def last_answer_by(self, version: str) -> float | None:
        times = [t for t, v, _ in list(self.answers) if v == version]
        return max(times) if times else None


# ------------------------------------------------------------------------ one rollout environment


@dataclass
class Timeline:
    """Status changes of one TrainingRun, polled every half second (with the test's monotonic clock)."""

    plane: ControlPlane
    namespace: str
    name: str
    changes: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    # `kubectl get tr -w` beside the poller: what a person watching the rollout sees (the README's example).
    watch: subprocess.Popen[str] | None = None
    watched: str = ""

    def start(self) -> Timeline:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.watch = kubectl_watch(self.plane, "get", "tr", self.name, "-n", self.namespace, "-w")
        return self

    def _run(self) -> None:
        last: tuple[Any, ...] | None = None
        while not self.stop.is_set():
            try:
                document = get_json(self.plane, "tr", self.name, "-n", self.namespace)
            except Exception:  # not created yet, or a transient kubectl failure
                self.stop.wait(0.5)
                continue
            status = document.get("status") or {}
            traffic = status.get("traffic") or {}
            key = (
                status.get("phase"),
                traffic.get("step"),
                traffic.get("weight"),
                traffic.get("appliedAt"),
                traffic.get("paused"),
                traffic.get("lastAnalysis"),
            )
            if key != last:
                self.changes.append((time.monotonic(), status))
                last = key
            self.stop.wait(0.5)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self.watch is not None:
            self.watch.terminate()
            self.watched = self.watch.communicate(timeout=10)[0]

    def report(self) -> str:
        if not self.changes:
            return "(no status seen)"
        start = self.changes[0][0]
        lines = []
        for moment, status in self.changes:
            traffic = status.get("traffic") or {}
            lines.append(
                f"  +{moment - start:6.1f}s {status.get('phase')!s:11} step={traffic.get('step')} "
                f"weight={traffic.get('weight')} applied={traffic.get('appliedAt')} "
                f"paused={traffic.get('paused')} analysis={traffic.get('lastAnalysis')}"
            )
        return "\n".join(lines)

    def first(self, predicate: Callable[[dict[str, Any]], bool]) -> float | None:
        for moment, status in self.changes:
            if predicate(status):
                return moment
        return None


@dataclass
class Env:
    plane: ControlPlane
    namespace: str
    model: str
    stable: str
    mlflow_url: str
    client: MlflowClient
    servers: list[ServingProcess]
    prometheus: Prometheus
    traffic: Traffic
    operators: OperatorFactory
    fake_kubelet: FakeKubelet
    trainer: Path
    pretrained: dict[str, Pretrained]
    operator: OperatorProcess | None = None
    timelines: list[Timeline] = field(default_factory=list)

    def start_operator(self, **settings: str) -> OperatorProcess:
        self.operator = self.operators.start(
            [self.namespace], prometheus_url=self.prometheus.url, prometheus_timeout_seconds="5", **settings
        )
        return self.operator

    def run(self, source: str, rollout: dict[str, Any], *, name: str | None = None) -> tuple[str, Timeline]:
        name = name or unique_name("canary")
        pretrained = self.pretrained[source]
        self.fake_kubelet.override_env(
            name,
            PYTHONPATH=f"{self.trainer}:{REPO_ROOT}",
            CLONE_RUN_ID=pretrained.run_id,
            CLONE_SOURCE=pretrained.source,
        )
        spec = {
            "architecture": "baseline",
            "hyperparameters": {"epochs": 1, "batchSize": 64},
            "experiment": f"exp-{self.model}",
            "registeredModel": self.model,
            "promotion": {"minimum": 0.0, "mustBeatChampion": False},
            "rollout": rollout,
        }
        manifest = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }
        kubectl_ok(self.plane, "apply", "-f", "-", manifest=manifest)
        timeline = Timeline(self.plane, self.namespace, name).start()
        self.timelines.append(timeline)
        return name, timeline

    def wait(self, name: str, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        return wait_for_trainingrun(
            self.plane, self.namespace, name, predicate=predicate, timeout=ROLLOUT_TIMEOUT, what=what
        )

    def tag(self) -> str | None:
        tags = self.client.get_registered_model(self.model).tags or {}
        value = tags.get(TRAFFIC_TAG)
        return None if value is None else str(value)

    def candidate_weight_series(self, candidate: str) -> list[dict[str, Any]]:
        return self.prometheus.query(f'mnist_traffic_weight{{candidate="{candidate}"}} > 0')

    def events(self, name: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = get_json(
            self.plane,
            "events",
            "-n",
            self.namespace,
            "--field-selector",
            f"involvedObject.name={name},involvedObject.kind={KIND}",
        )["items"]
        return found

    def annotate(self, name: str, action: str) -> None:
        kubectl_ok(
            self.plane, "annotate", "tr", name, "-n", self.namespace, f"{ROLLOUT_ACTION_ANNOTATION}={action}"
        )


@pytest.fixture
def env(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    operator_mlflow: RestartableMlflow,
    pretrained: dict[str, Pretrained],
    clone_trainer: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Env]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    client = tracking.make_client(operator_mlflow.url)
    model = unique_name("progressive")
    stable = register_clone(client, model, pretrained["healthy"])
    promote(client, model, stable)
    servers: list[ServingProcess] = []
    prometheus: Prometheus | None = None
    traffic: Traffic | None = None
    environment: Env | None = None
    try:
        for index in range(2):
            servers.append(
                ServingProcess.start(
                    tmp_path / f"serving-{index}",
                    tracking_uri=operator_mlflow.url,
                    model_uri=f"models:/{model}/{stable}",
                    cache_dir=tmp_path / f"cache-{index}",
                    env={"SERVING_TRAFFIC_POLL_SECONDS": "1"},
                )
            )
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: apt-get install prometheus (scripts/install-system-deps.sh)"
        job = {
            "job_name": "serving",
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "static_configs": [{"targets": [server.url.removeprefix("http://") for server in servers]}],
        }
        prometheus = Prometheus([job], tmp_path / "prometheus", Path(binary), scrape_interval=SCRAPE_INTERVAL)
        bodies = [json.dumps({"pixels": image.tolist()}).encode() for image in mnist_images()]
        traffic = Traffic([server.url for server in servers], bodies).start()
        environment = Env(
            plane=control_plane,
            namespace=watched_namespace,
            model=model,
            stable=stable,
            mlflow_url=operator_mlflow.url,
            client=client,
            servers=servers,
            prometheus=prometheus,
            traffic=traffic,
            operators=operators,
            fake_kubelet=fake_kubelet,
            trainer=clone_trainer,
            pretrained=pretrained,
        )
        # Both serving targets up and answering before any rollout starts.
        wait_until(
            lambda: (
                len(prometheus.query(f'mnist_model_info{{model_name="{model}"}}')) == 2
                and len(traffic.answers) > 20
            ),
            60,
            "Prometheus to scrape both serving processes under traffic",
        )
        yield environment
    finally:
        if traffic is not None:
            traffic.close()
            print(
                f"traffic: {len(traffic.answers)} answers, {len(traffic.errors)} errors {traffic.errors[:3]}"
            )
        if environment is not None:
            for timeline in environment.timelines:
                timeline.close()
                print(f"--- timeline of {timeline.name} ---\n{timeline.report()}")
                print(f"--- kubectl get tr {timeline.name} -w ---\n{timeline.watched}")
        if prometheus is not None:
            prometheus.stop()
        for server in servers:
            server.stop()


# Two cores shared with the control plane, MLflow, Prometheus and other test sessions: a p99 over a
# hundred-odd requests moves by whole histogram buckets, so the latency bound is loose here (the
# degraded model fails on what it predicts, not on its speed).
LOOSE_LATENCY = {"maxP99LatencyRatio": 5.0, "p99LatencyFloorMs": 50.0}


def canary(*weights: int, hold: int = HOLD_SECONDS, **analysis: Any) -> dict[str, Any]:
    return {
        "strategy": "canary",
        "steps": [{"weight": weight, "holdSeconds": hold} for weight in weights],
        "analysis": {"minRequests": MIN_REQUESTS, "applyTimeoutSeconds": 60, **LOOSE_LATENCY, **analysis},
    }


def phase(*phases: str) -> Callable[[dict[str, Any]], bool]:
    return lambda document: (document.get("status") or {}).get("phase") in phases


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    for item in status.get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    raise AssertionError(f"no {type_} condition in {json.dumps(status, indent=1)}")


@dataclass
class AbortLatency:
    tag_removed: float
    serving_zero: float | None
    prometheus_zero: float | None


def watch_abort(environment: Env, candidate: str) -> Callable[[], AbortLatency]:
    """Polls the tag (every 50 ms) and Prometheus until the candidate is gone from both; returns a
    function giving the moments, relative to the tag's removal."""
    removed: list[float] = []
    prometheus_zero: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set() and not removed:
            with contextlib.suppress(Exception):  # MLflow busy: poll again
                if environment.tag() is None and environment.traffic.last_answer_by(candidate) is not None:
                    removed.append(time.monotonic())
            stop.wait(0.05)
        while not stop.is_set() and not prometheus_zero:
            if not environment.candidate_weight_series(candidate):
                prometheus_zero.append(time.monotonic())
            stop.wait(0.1)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()

    def result() -> AbortLatency:
        wait_until(lambda: bool(removed and prometheus_zero), 60, "the tag and the gauge to go")
        stop.set()
        thread.join(timeout=5)
        # Answers already in flight when the route was dropped may finish later: give them 3 s.
        time.sleep(3)
        last = environment.traffic.last_answer_by(candidate)
        # Signed: negative when serving dropped the route before the test's poller saw the tag go.
        return AbortLatency(
            tag_removed=removed[0],
            serving_zero=None if last is None else last - removed[0],
            prometheus_zero=prometheus_zero[0] - removed[0],
        )

    return result


def print_steps(name: str, timeline: Timeline, status: dict[str, Any]) -> None:
    print(f"--- {name}: analyses ---")
    for record in (status.get("traffic") or {}).get("analyses") or []:
        checks = ", ".join(
            f"{check['name']}={check.get('value')}{'' if check['passed'] else ' FAILED'}"
            for check in record.get("checks") or []
        )
        print(f"  step {record['step']} at {record['weight']}%: passed={record['passed']} "
              f"window={record.get('windowSeconds')}s at {record.get('at')}: {checks}")  # fmt: skip
    print(timeline.report())


# ------------------------------------------------------------------------ the tests


@pytest.mark.slow
def test_a_degraded_canary_is_aborted_at_its_first_step_and_a_healthy_one_goes_10_50_100(env: Env) -> None:
    operator = env.start_operator()
    operator.wait_leading()

    # A model that answers unsure and often wrong: the offline gate lets it through, live traffic does not.
    degraded, timeline = env.run("degraded", canary(10, 50))
    applied = env.wait(
        degraded,
        lambda d: bool(((d.get("status") or {}).get("traffic") or {}).get("appliedAt")),
        "to apply 10%",
    )
    candidate = applied["status"]["modelVersion"]
    assert applied["status"]["phase"] == "Canary"
    latency = watch_abort(env, candidate)
    aborted = env.wait(degraded, phase("Aborted", "Promoted", "RollingOut"), "to be aborted")
    status = aborted["status"]
    print_steps(degraded, timeline, status)
    assert status["phase"] == "Aborted", status
    analysis = condition(status, "Analysis")
    assert (analysis["status"], analysis["reason"]) == ("False", "AnalysisFailed")
    assert "step 1/2 (10%)" in analysis["message"]
    (record,) = status["traffic"]["analyses"]
    assert (record["step"], record["weight"], record["passed"]) == (0, 10, False)
    failed = {check["name"] for check in record["checks"] if not check["passed"]}
    assert failed & {"confidenceDrop", "digitDivergence"}, record
    for name in failed:
        assert name in analysis["message"]
    assert status["promoted"] is False
    assert alias_version(env.client, env.model, CHAMPION_ALIAS) == env.stable, "the alias never moved"
    reasons = [event["reason"] for event in env.events(degraded)]
    assert "RolloutAborted" in reasons and "Promoted" not in reasons
    moments = latency()
    assert env.tag() is None
    print(
        f"ABORT LATENCY (degraded canary): tag removed → last candidate answer from serving "
        f"{moments.serving_zero:.2f}s, → Prometheus shows no candidate weight {moments.prometheus_zero:.2f}s"
    )
    assert moments.serving_zero is not None and moments.serving_zero < 5.0
    # The candidate's share while it was live: ~10% of the answers.
    start = timeline.first(lambda s: bool((s.get("traffic") or {}).get("appliedAt")))
    assert start is not None
    share, answers = env.traffic.share(candidate, start, moments.tag_removed)
    print(f"measured candidate share at 10%: {share:.3f} over {answers} answers")

    # A candidate that behaves like stable walks 10 → 50 → 100 and is promoted.
    healthy, timeline = env.run("healthy", canary(10, 50))
    promoted = env.wait(healthy, phase("Promoted", "Aborted", "RolledBack", "Failed"), "to be promoted")
    status = promoted["status"]
    print_steps(healthy, timeline, status)
    assert status["phase"] == "Promoted", status
    version = status["modelVersion"]
    records = status["traffic"]["analyses"]
    assert [(r["step"], r["weight"], r["passed"]) for r in records] == [(0, 10, True), (1, 50, True)]
    assert (status["traffic"]["step"], status["traffic"]["weight"]) == (2, 100)
    weights = [s.get("traffic", {}).get("weight") for _, s in timeline.changes if s.get("traffic")]
    weights.append(status["traffic"]["weight"])
    assert [w for i, w in enumerate(weights) if i == 0 or w != weights[i - 1]][-3:] == [10, 50, 100]
    assert condition(status, "Analysis")["status"] == "True"
    assert condition(status, "Promoted")["reason"] == "AnalysisPassed"
    assert alias_version(env.client, env.model, CHAMPION_ALIAS) == version
    assert alias_version(env.client, env.model, PREVIOUS_ALIAS) == env.stable
    assert env.tag() is None, "the tag is removed once serving rolled"
    table = kubectl_ok(env.plane, "get", "tr", "-n", env.namespace)
    print(table)
    header = table.splitlines()[0].split()
    assert {"STRATEGY", "WEIGHT", "ANALYSIS"} <= set(header)


@pytest.mark.slow
def test_shadow_reports_the_agreement_of_the_two_versions(env: Env, tmp_path: Path) -> None:
    operator = env.start_operator()
    operator.wait_leading()
    shadow = {
        "strategy": "shadow",
        "shadowSeconds": HOLD_SECONDS,
        "analysis": {"minRequests": MIN_REQUESTS, **LOOSE_LATENCY},
    }

    degraded, timeline = env.run("degraded", shadow)
    aborted = env.wait(degraded, phase("Aborted", "Promoted", "RollingOut"), "to be judged")
    status = aborted["status"]
    print_steps(degraded, timeline, status)
    assert status["phase"] == "Aborted", status
    candidate = status["modelVersion"]
    (record,) = status["traffic"]["analyses"]
    checks = {check["name"]: check for check in record["checks"]}
    assert not checks["agreement"]["passed"]
    measured = float(checks["agreement"]["value"])
    # Users never saw the candidate's answers.
    assert env.traffic.last_answer_by(candidate) is None

    # The offline agreement of the same two versions on the same images, through a server pinned to
    # the candidate and one of the stable servers.
    offline = ServingProcess.start(
        tmp_path / "offline",
        tracking_uri=env.mlflow_url,
        model_uri=f"models:/{env.model}/{candidate}",
        cache_dir=tmp_path / "offline-cache",
        env={"SERVING_TRAFFIC_POLL_SECONDS": "0"},
    )
    try:
        agree = 0
        with httpx.Client(timeout=30) as http:
            for body in env.traffic.bodies:
                answers = [
                    http.post(f"{url}/predict", content=body, headers={"Content-Type": "application/json"})
                    for url in (env.servers[0].url, offline.url)
                ]
                digits = [answer.json()["digit"] for answer in answers]
                agree += digits[0] == digits[1]
        expected = agree / len(env.traffic.bodies)
    finally:
        offline.stop()
    print(f"SHADOW AGREEMENT: reported {measured:.4f}, offline {expected:.4f} on the same {IMAGES} images")
    assert abs(measured - expected) <= 0.02

    healthy, timeline = env.run("healthy", shadow)
    promoted = env.wait(healthy, phase("Promoted", "Aborted", "RolledBack", "Failed"), "to be promoted")
    print_steps(healthy, timeline, promoted["status"])
    assert promoted["status"]["phase"] == "Promoted", promoted["status"]
    (record,) = promoted["status"]["traffic"]["analyses"]
    agreement = next(check for check in record["checks"] if check["name"] == "agreement")
    assert agreement["value"] == pytest.approx(1.0)


@pytest.mark.slow
def test_pause_resume_and_a_manual_abort(env: Env) -> None:
    operator = env.start_operator()
    operator.wait_leading()
    name, timeline = env.run("healthy", canary(10, 50))
    env.wait(
        name, lambda d: bool(((d.get("status") or {}).get("traffic") or {}).get("appliedAt")), "to apply"
    )
    env.annotate(name, "pause")
    paused = env.wait(
        name,
        lambda d: (
            bool(((d.get("status") or {}).get("traffic") or {}).get("paused"))
            and ROLLOUT_ACTION_ANNOTATION not in (d["metadata"].get("annotations") or {})
        ),
        "to pause and remove the annotation",
    )
    assert [o["action"] for o in paused["status"]["traffic"]["overrides"]] == ["pause"]
    # Paused longer than the hold: the step does not end.
    time.sleep(HOLD_SECONDS + 5)
    still = get_json(env.plane, "tr", name, "-n", env.namespace)["status"]
    assert (still["phase"], still["traffic"]["step"], still["traffic"].get("analyses", [])) == (
        "Canary",
        0,
        [],
    )
    assert "paused" in still["message"]
    env.annotate(name, "resume")
    env.wait(name, lambda d: ((d.get("status") or {}).get("traffic") or {}).get("step") == 1, "to reach 50%")
    candidate = still["modelVersion"]
    latency = watch_abort(env, candidate)
    env.wait(
        name,
        lambda d: ((d.get("status") or {}).get("traffic") or {}).get("appliedAt") is not None,
        "to apply 50%",
    )
    env.annotate(name, "abort")
    aborted = env.wait(name, phase("Aborted", "Promoted"), "to abort")
    status = aborted["status"]
    print_steps(name, timeline, status)
    assert status["phase"] == "Aborted"
    assert condition(status, "Analysis")["reason"] == "ManualAbort"
    assert [o["action"] for o in status["traffic"]["overrides"]] == ["pause", "resume", "abort"]
    assert ROLLOUT_ACTION_ANNOTATION not in (aborted["metadata"].get("annotations") or {})
    assert alias_version(env.client, env.model, CHAMPION_ALIAS) == env.stable
    reasons = [event["reason"] for event in env.events(name)]
    assert {"RolloutPaused", "RolloutResumed", "RolloutAborted"} <= set(reasons), reasons
    moments = latency()
    print(
        f"ABORT LATENCY (manual, at 50%): tag removed → last candidate answer {moments.serving_zero:.2f}s, "
        f"→ Prometheus shows none {moments.prometheus_zero:.2f}s"
    )
    assert env.tag() is None


@pytest.mark.slow
def test_an_operator_restarted_mid_step_resumes_it_and_promotes_once(env: Env) -> None:
    first = env.start_operator()
    first.wait_leading()
    name, timeline = env.run("healthy", canary(10, 50, hold=HOLD_SECONDS + 5))
    mid = env.wait(
        name,
        lambda d: (
            ((d.get("status") or {}).get("traffic") or {}).get("step") == 1
            and bool(d["status"]["traffic"].get("appliedAt"))
        ),
        "to hold 50%",
    )
    step_started, applied = mid["status"]["traffic"]["stepStartedAt"], mid["status"]["traffic"]["appliedAt"]
    candidate = mid["status"]["modelVersion"]
    first.kill()
    # The next operator dies right after moving the alias, before it records the promotion.
    second = env.start_operator(**{"test_failpoint": "after-alias-move"})
    wait_until(lambda: second.child is not None and second.child.popen.poll() is not None, 180, "the crash")
    assert alias_version(env.client, env.model, CHAMPION_ALIAS) == candidate
    resumed = get_json(env.plane, "tr", name, "-n", env.namespace)["status"]
    assert resumed["phase"] == "Canary", "the crash came before the promotion was recorded"
    assert (resumed["traffic"]["stepStartedAt"], resumed["traffic"]["appliedAt"]) == (step_started, applied)
    third = env.start_operator()
    promoted = env.wait(name, phase("Promoted", "Aborted", "RolledBack", "Failed"), "to be promoted")
    status = promoted["status"]
    print_steps(name, timeline, status)
    assert status["phase"] == "Promoted", status
    # Never restarted from zero: step 1 (10%) was analysed once.
    assert [r["step"] for r in status["traffic"]["analyses"]].count(0) == 1
    assert status["traffic"]["stepStartedAt"] == step_started
    assert status["previousChampionVersion"] == env.stable
    assert alias_version(env.client, env.model, CHAMPION_ALIAS) == candidate
    assert alias_version(env.client, env.model, PREVIOUS_ALIAS) == env.stable
    tags = env.client.get_model_version(env.model, candidate).tags or {}
    assert tags.get(PROMOTED_TAG) == "true"
    promoted_events = [event for event in env.events(name) if event["reason"] == "Promoted"]
    assert len(promoted_events) == 1, promoted_events
    assert env.tag() is None
    third.stop()


def test_the_contract_document_is_what_serving_parses() -> None:
    """contract/traffic.py and serving/routing.py agree on the tag and every field."""
    from contract.traffic import TrafficDocument, TrafficMode, dumps
    from serving import routing

    assert routing.TRAFFIC_TAG == TRAFFIC_TAG
    document = TrafficDocument(
        mode=TrafficMode.CANARY, stable="6", candidate="7", weight=10, rollout="ns/run", step=1
    )
    parsed = routing.parse(dumps(document))
    assert parsed is not None
    assert (parsed.mode, parsed.stable, parsed.candidate, parsed.weight, parsed.rollout, parsed.step) == (
        "canary",
        "6",
        "7",
        10.0,
        "ns/run",
        1,
    )
    assert parse(dumps(document)) == document
