"""Progressive delivery in the serving pods (serving/routing.py), against the real MLflow server and a
real `python -m serving` process over HTTP.

The registered model here has two versions: 1, the session's trained model registered again, and 2,
the same network with noise added to its weights (a different model that mostly agrees with 1). The
server pins version 1; the tests drive it only through the registered model's traffic tag, as the
operator does, and measure from the outside:

- canary weight accuracy: the candidate's share of 2,000 requests without a routing key, at 10% and
  50%, from each response's X-Model-Version;
- stickiness: 200 clients (x-client-id), 5 requests each: one version per client, and every client on
  the candidate at 10% is still there at 50%;
- the metrics: `version` labels, `mnist_traffic_weight`, and how long after the tag is removed the last
  candidate answer comes (the serving half of an abort's latency);
- shadow: stable answers everything, the candidate's shadow runs are counted per image, and the
  agreement rate from the counters is the two models' agreement computed offline with ONNX Runtime;
- a malformed tag and a candidate version that does not exist: stable keeps answering and /health
  says why.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from contract import traffic as contract_traffic
from local_mode.processes import wait_until
from serving import routing
from serving.dataplane import Batch, DataPlane, Inference, LoadedModel, PredictionEvent
from serving.settings import ModelRef, Settings
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import Mnist

STABLE, CANDIDATE = "1", "2"
REQUESTS = 2000
CLIENTS, REQUESTS_PER_CLIENT = 200, 5
SHADOW_IMAGES = 1000
# Noise on the candidate's weights, relative to each weight tensor's spread: enough for the two models
# to disagree on a few percent of the test digits, not so much that the candidate is useless.
NOISE = 0.6
SWITCH_OFF_LIMIT_SECONDS = 3.0


@dataclass(frozen=True)
class TwoVersions:
    name: str
    tracking_uri: str
    stable_onnx: Path
    candidate_onnx: Path


def _perturbed(source: Path, target: Path, seed: int) -> None:
    model = onnx.load(str(source))
    rng = np.random.default_rng(seed)
    for initializer in model.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.ndim < 2 or weights.dtype != np.float32:
            continue  # biases and shapes stay
        noise = rng.normal(0.0, NOISE * float(weights.std()), weights.shape).astype(np.float32)
        initializer.CopyFrom(numpy_helper.from_array(weights + noise, initializer.name))
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))


@pytest.fixture(scope="module")
def two_versions(
    served_model: ServedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoVersions]:
    """A registered model of its own (its tag must not steer the session's other servers)."""
    import mlflow
    import mlflow.artifacts

    client = mlflow.MlflowClient(served_model.tracking_uri)
    served = client.get_model_version(served_model.name, served_model.version)
    assert served.source is not None
    workdir = tmp_path_factory.mktemp("routing-models")
    stable_dir = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(served_model.name, served_model.version),
            dst_path=str(workdir / "stable"),
            tracking_uri=served_model.tracking_uri,
        )
    )
    stable_onnx = next(stable_dir.rglob("model.onnx"))
    candidate_onnx = workdir / "candidate" / "model.onnx"
    _perturbed(stable_onnx, candidate_onnx, seed=7)

    name = f"routing-test-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    try:
        model_id = served.source.removeprefix("models:/")
        first = client.create_model_version(name, served.source, run_id=served.run_id, model_id=model_id)
        experiment = client.create_experiment(f"{name}-candidates")
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(candidate_onnx.parent), "onnx")
        client.set_terminated(run.info.run_id)
        second = client.create_model_version(name, f"runs:/{run.info.run_id}/onnx", run.info.run_id)
        assert (first.version, second.version) == (STABLE, CANDIDATE)
        yield TwoVersions(name, served_model.tracking_uri, stable_onnx, candidate_onnx)
    finally:
        client.delete_registered_model(name)


@pytest.fixture(scope="module")
def server(two_versions: TwoVersions, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingProcess]:
    """Pinned to version 1, the production defaults otherwise (poll every second, x-client-id)."""
    process = ServingProcess.start(
        tmp_path_factory.mktemp("serving-routing"),
        tracking_uri=two_versions.tracking_uri,
        model_uri=f"models:/{two_versions.name}/{STABLE}",
        cache_dir=tmp_path_factory.mktemp("routing-cache"),
    )
    yield process
    process.stop()
    assert "unhandled error" not in process.log_text(), process.log_tail(200)


@pytest.fixture(scope="module")
def http(server: ServingProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def registry(two_versions: TwoVersions) -> Any:
    import mlflow

    return mlflow.MlflowClient(two_versions.tracking_uri)


@pytest.fixture
def tag(registry: Any, two_versions: TwoVersions, http: httpx.Client) -> Iterator[TagWriter]:
    writer = TagWriter(registry, two_versions.name, http)
    yield writer
    writer.remove()
    wait_until(lambda: writer.traffic()["state"] == "none", 15, "the server to drop the document")


class TagWriter:
    """Writes the traffic tag as the operator does, and reads back what the server applied."""

    def __init__(self, registry: Any, name: str, http: httpx.Client) -> None:
        self.registry, self.name, self.http = registry, name, http

    def write(self, value: str) -> None:
        self.registry.set_registered_model_tag(self.name, routing.TRAFFIC_TAG, value)

    def set(self, mode: str, weight: float, candidate: str = CANDIDATE, step: int = 0) -> None:
        document = contract_traffic.TrafficDocument(
            mode=contract_traffic.TrafficMode(mode),
            stable=STABLE,
            candidate=candidate,
            weight=weight,
            rollout="mnist-mlops/routing-test",
            step=step,
        )
        self.write(contract_traffic.dumps(document))

    def remove(self) -> None:
        tags = self.registry.get_registered_model(self.name).tags
        if routing.TRAFFIC_TAG in tags:
            self.registry.delete_registered_model_tag(self.name, routing.TRAFFIC_TAG)

    def traffic(self) -> dict[str, Any]:
        status: dict[str, Any] = self.http.get("/health").json()["traffic"]
        return status

    def applied(self, mode: str, weight: float, timeout: float = 60) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.traffic()
            done = status["state"] == "applied" and status["mode"] == mode and status["weight"] == weight
            return status if done else None

        return wait_until(check, timeout, f"the server to apply {mode} at {weight}%", 0.1)


def _pixels(images: npt.NDArray[np.uint8], index: int) -> dict[str, Any]:
    return {"pixels": images[index % len(images)].tolist()}


def _candidate_share(http: httpx.Client, images: npt.NDArray[np.uint8], count: int) -> float:
    on_candidate = 0
    for i in range(count):
        response = http.post("/predict", json=_pixels(images, i))
        assert response.status_code == 200, response.text
        version = response.headers["x-model-version"]
        assert version == response.json()["model_version"] and version in (STABLE, CANDIDATE)
        on_candidate += version == CANDIDATE
    return on_candidate / count


def _metrics(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


# --- the document ----------------------------------------------------------------------------------


def test_serving_reads_the_document_the_operator_writes() -> None:
    assert routing.TRAFFIC_TAG == contract_traffic.TRAFFIC_TAG
    assert tuple(f for f in routing.TrafficDocument.__dataclass_fields__) == contract_traffic.FIELDS
    for mode, weight in (("canary", 10), ("canary", 12.5), ("shadow", 0)):
        written = contract_traffic.TrafficDocument(
            mode=contract_traffic.TrafficMode(mode),
            stable="6",
            candidate="7",
            weight=weight,
            rollout="ns/run",
            step=2,
        )
        read = routing.parse(contract_traffic.dumps(written))
        assert read == routing.TrafficDocument(mode, "6", "7", weight, "ns/run", 2)  # type: ignore[arg-type]
    assert routing.parse(None) is None and routing.parse("{}") is None
    # What the operator's parser refuses, serving refuses too.
    for bad in ('{"mode": "blue"}', "[1]", "{", '{"mode": "canary", "stable": "6", "candidate": "7"}'):
        with pytest.raises(contract_traffic.TrafficDocumentError):
            contract_traffic.parse(bad)
        with pytest.raises(routing.MalformedTrafficError):
            routing.parse(bad)
    with pytest.raises(routing.MalformedTrafficError, match="weight"):
        routing.parse('{"mode": "canary", "stable": "6", "candidate": "7", "weight": 101}')


def test_routing_keys_are_sticky_and_monotone() -> None:
    keys = [f"client-{i}" for i in range(10_000)]
    points = [routing.key_point(key, b"7") for key in keys]
    assert all(0 <= p < 1 for p in points)
    # Uniform: a tenth of the keys below 0.1 (binomial sd 0.3 points over 10,000 keys).
    assert abs(sum(p < 0.1 for p in points) / len(keys) - 0.1) < 0.015
    # Another candidate draws other clients (the salt), so one canary's 10% is not every canary's.
    other = [routing.key_point(key, b"8") < 0.1 for key in keys]
    assert sum(a and b for a, b in zip((p < 0.1 for p in points), other, strict=True)) < 200


# --- canary over real HTTP ---------------------------------------------------------------------------


def test_canary_weight_is_exact_over_2000_requests(
    tag: TagWriter, http: httpx.Client, serving_mnist_test: Mnist
) -> None:
    images = serving_mnist_test[0][:500]
    measured = {}
    for weight in (10, 50):
        tag.set("canary", weight)
        status = tag.applied("canary", weight)
        assert (status["stable"], status["candidate"], status["error"]) == (STABLE, CANDIDATE, None)
        measured[weight] = share = _candidate_share(http, images, REQUESTS)
        print(f"\ncanary weight {weight}%: candidate answered {share:.2%} of {REQUESTS} requests")
        assert abs(share * 100 - weight) <= 3, (weight, share)
    # The golden-ratio sequence, not chance: far tighter than a coin's sd (0.7 and 1.1 points here).
    assert all(abs(share * 100 - weight) <= 0.5 for weight, share in measured.items()), measured


def test_a_client_stays_on_one_version_and_keeps_the_candidate_as_it_grows(
    tag: TagWriter, http: httpx.Client, serving_mnist_test: Mnist
) -> None:
    images = serving_mnist_test[0][:100]
    on_candidate: dict[int, set[str]] = {}
    for weight in (10, 50):
        tag.set("canary", weight)
        tag.applied("canary", weight)
        versions: dict[str, set[str]] = {}
        for i in range(CLIENTS):
            client_id = f"client-{i}"
            for j in range(REQUESTS_PER_CLIENT):
                response = http.post(
                    "/predict", json=_pixels(images, i + j), headers={"X-Client-ID": client_id}
                )
                assert response.status_code == 200, response.text
                versions.setdefault(client_id, set()).add(response.headers["x-model-version"])
        assert all(len(seen) == 1 for seen in versions.values()), {
            k: v for k, v in versions.items() if len(v) > 1
        }
        on_candidate[weight] = {key for key, seen in versions.items() if seen == {CANDIDATE}}
        share = len(on_candidate[weight]) / CLIENTS
        print(f"\nsticky canary {weight}%: {len(on_candidate[weight])} of {CLIENTS} clients on the candidate")
        # 200 clients hashed: binomial sd 2.1 points at 10%, 3.5 at 50%.
        assert abs(share * 100 - weight) <= 12, share
    assert on_candidate[10] and on_candidate[10] <= on_candidate[50]


def test_metrics_carry_the_version_and_removing_the_tag_ends_the_canary_within_3s(
    tag: TagWriter, http: httpx.Client, serving_mnist_test: Mnist
) -> None:
    images = serving_mnist_test[0][:200]
    tag.set("canary", 50)
    tag.applied("canary", 50)
    before = _metrics(http)
    _candidate_share(http, images, 200)
    after = _metrics(http)
    weight_series = [
        (dict(labels), value) for (name, labels), value in after.items() if name == "mnist_traffic_weight"
    ]
    assert weight_series == [({"stable": STABLE, "candidate": CANDIDATE, "mode": "canary"}, 50.0)]
    for version in (STABLE, CANDIDATE):
        served = _sum(after, "mnist_inference_requests_total", version=version, outcome="ok") - _sum(
            before, "mnist_inference_requests_total", version=version, outcome="ok"
        )
        predicted = _sum(after, "mnist_predictions_total", version=version) - _sum(
            before, "mnist_predictions_total", version=version
        )
        latency = _sum(after, "mnist_prediction_latency_seconds_count", endpoint="predict", version=version)
        assert 60 <= served == predicted <= 140, (version, served, predicted)
        assert latency >= served
    assert _sum(after, "mnist_prediction_confidence_count", version=CANDIDATE) > 0

    # Abort: the tag goes; requests keep coming until a long run of them is all stable's.
    tag.remove()
    removed = time.monotonic()
    last_candidate = removed
    streak = 0
    i = 0
    while streak < 300:
        response = http.post("/predict", json=_pixels(images, i))
        i += 1
        if response.headers["x-model-version"] == CANDIDATE:
            last_candidate, streak = time.monotonic(), 0
        else:
            streak += 1
        assert time.monotonic() - removed < 30, "the candidate kept answering"
    switch_off = last_candidate - removed
    print(f"\ntag removed -> last candidate answer after {switch_off:.3f}s (poll interval 1s)")
    assert switch_off < SWITCH_OFF_LIMIT_SECONDS
    assert tag.traffic()["state"] == "none"
    assert not [name for (name, _), _ in _metrics(http).items() if name == "mnist_traffic_weight"]


# --- shadow -----------------------------------------------------------------------------------------


def _model_input(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """What the server makes of 0..255 pixel arrays (serving/preprocess.py: MNIST digits are light on
    dark, so none is inverted)."""
    scaled: npt.NDArray[np.float32] = images.astype(np.float32) * np.float32(1 / 255)
    return scaled


def _offline_digits(path: Path, images: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    shape = [len(images), *[d if isinstance(d, int) else -1 for d in model_input.shape[1:]]]
    (probabilities,) = session.run(None, {model_input.name: images.reshape(shape)})
    digits: npt.NDArray[np.int64] = np.asarray(probabilities).argmax(axis=1)
    return digits


def test_shadow_answers_from_stable_and_measures_the_offline_agreement(
    tag: TagWriter, http: httpx.Client, serving_mnist_test: Mnist, two_versions: TwoVersions
) -> None:
    images = serving_mnist_test[0][1000 : 1000 + SHADOW_IMAGES]
    stable_digits = _offline_digits(two_versions.stable_onnx, _model_input(images))
    candidate_digits = _offline_digits(two_versions.candidate_onnx, _model_input(images))
    offline = float(np.mean(stable_digits == candidate_digits))
    # A candidate worth shadowing, and one that is measurably different.
    assert 0.5 < offline < 0.99, offline

    tag.set("shadow", 0)
    status = tag.applied("shadow", 0)
    assert status["candidate"] == CANDIDATE
    before = _metrics(http)
    assert [
        value
        for (name, labels), value in before.items()
        if name == "mnist_traffic_weight" and dict(labels)["mode"] == "shadow"
    ] == [100.0]
    answered: list[int] = []
    # Batches and single images: every image is one comparison either way.
    for start in range(0, 800, 50):
        batch = {"instances": [{"pixels": image.tolist()} for image in images[start : start + 50]]}
        response = http.post("/predict/batch", json=batch)
        assert response.status_code == 200 and response.headers["x-model-version"] == STABLE
        answered += [p["digit"] for p in response.json()["predictions"]]
    for index in range(800, SHADOW_IMAGES):
        response = http.post("/predict", json=_pixels(images, index))
        assert response.status_code == 200 and response.headers["x-model-version"] == STABLE
        answered.append(response.json()["digit"])
    # Stable answered: its answers are the stable model's own (batch shapes may move a last bit).
    assert np.mean(np.asarray(answered) == stable_digits) >= 0.998

    def compared() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        now = _metrics(http)
        total = _sum(now, "mnist_shadow_comparisons_total") - _sum(before, "mnist_shadow_comparisons_total")
        return now if total >= SHADOW_IMAGES else None

    after = wait_until(compared, 30, "every image's shadow comparison", 0.1)

    def delta(**labels: str) -> float:
        return _sum(after, "mnist_shadow_comparisons_total", **labels) - _sum(
            before, "mnist_shadow_comparisons_total", **labels
        )

    pair = {"stable": STABLE, "candidate": CANDIDATE}
    agree, disagree, errors = (
        delta(**pair, result="agree"),
        delta(**pair, result="disagree"),
        delta(result="error"),
    )
    skipped = _sum(after, "mnist_shadow_skipped_total") - _sum(before, "mnist_shadow_skipped_total")
    assert (agree + disagree, errors, skipped) == (SHADOW_IMAGES, 0, 0)
    measured = agree / (agree + disagree)
    print(
        f"\nshadow agreement: {measured:.2%} from the counters, {offline:.2%} offline"
        f" ({SHADOW_IMAGES} images)"
    )
    assert abs(measured - offline) <= 0.02
    # The candidate's model time is there (endpoint "shadow"); none of its answers were served.
    shadow_runs = _sum(after, "mnist_prediction_latency_seconds_count", endpoint="shadow", version=CANDIDATE)
    runs_before = _sum(before, "mnist_prediction_latency_seconds_count", endpoint="shadow", version=CANDIDATE)
    assert shadow_runs - runs_before == 800 // 50 + (SHADOW_IMAGES - 800)
    assert _sum(after, "mnist_inference_requests_total", version=CANDIDATE) == _sum(
        before, "mnist_inference_requests_total", version=CANDIDATE
    )


# --- what must not break serving ----------------------------------------------------------------------


def test_a_malformed_tag_and_a_missing_candidate_leave_stable_serving(
    tag: TagWriter, http: httpx.Client, server: ServingProcess, serving_mnist_test: Mnist
) -> None:
    images = serving_mnist_test[0][:50]
    malformed = '{"mode": "canary", "stable": "1", "candidate": "2", "weight": "lots"}'
    tag.write(malformed)
    status = wait_until(
        lambda: (s := tag.traffic())["state"] == "failed" and s,
        15,
        "the server to report the malformed document",
        0.1,
    )
    assert "malformed" in status["error"] and "weight" in status["error"], status
    assert _candidate_share(http, images, 50) == 0
    # Logged once, however many polls see it.
    time.sleep(2.5)
    warnings = [r for r in server.log_records() if "malformed traffic document" in str(r.get("msg"))]
    assert len(warnings) == 1, warnings

    tag.set("canary", 50, candidate="999")
    status = wait_until(
        lambda: (s := tag.traffic())["state"] == "failed" and s.get("candidate") == "999" and s,
        30,
        "the server to report the missing candidate",
        0.1,
    )
    assert "999" in status["error"], status
    assert _candidate_share(http, images, 50) == 0
    assert http.get("/health/ready").status_code == 200
    # A document naming a loadable candidate again is applied: the failure was the document's.
    tag.set("canary", 50)
    tag.applied("canary", 50)
    assert 0 < _candidate_share(http, images, 50) < 1


# --- the data plane in process: prediction listeners ---------------------------------------------------


def _in_process(
    two_versions: TwoVersions, cache: Path, monkeypatch: pytest.MonkeyPatch, **env: str
) -> tuple[DataPlane, LoadedModel]:
    """A data plane in this process with stable loaded, and the candidate loaded beside it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", two_versions.tracking_uri)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(model_uri=f"models:/{two_versions.name}/{STABLE}", model_cache_dir=cache)
    dataplane = DataPlane(settings)
    dataplane.load()
    gc.unfreeze()  # load() freezes the heap for a server's sake; this is pytest's process
    return dataplane, dataplane.open_version(ModelRef(two_versions.name, None, CANDIDATE))


def _counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_shadow_copies_beyond_the_bound_are_skipped_and_counted(
    two_versions: TwoVersions, tmp_path: Path, serving_mnist_test: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty concurrent requests finish together (one batch); with one shadow run allowed in flight, the
    first schedules its copy and the others find it pending: skipped, every image counted either way."""
    dataplane, candidate = _in_process(two_versions, tmp_path, monkeypatch, SERVING_SHADOW_MAX_IN_FLIGHT="1")
    images = _model_input(serving_mnist_test[0][:20])
    pair = {"stable": STABLE, "candidate": CANDIDATE}

    def compared() -> float:
        return sum(
            _counter("mnist_shadow_comparisons_total", **pair, result=result)
            for result in ("agree", "disagree", "error")
        )

    async def serve() -> list[Inference]:
        dataplane.traffic = routing.Route(
            routing.TrafficDocument("shadow", STABLE, CANDIDATE, 0), candidate, STABLE
        )
        answers = await asyncio.gather(
            *(
                dataplane.infer_async(Batch(images[i : i + 1], [False]), "predict", time.perf_counter())
                for i in range(len(images))
            )
        )
        await dataplane.drain_shadows()
        return list(answers)

    compared_before, skipped_before = compared(), _counter("mnist_shadow_skipped_total")
    answers = asyncio.run(serve())
    assert {answer.version for answer in answers} == {STABLE}
    ran, skipped = compared() - compared_before, _counter("mnist_shadow_skipped_total") - skipped_before
    assert ran + skipped == len(images) and ran >= 1 and skipped >= len(images) // 2, (ran, skipped)


def test_prediction_listeners_get_every_served_prediction_and_cannot_fail_it(
    two_versions: TwoVersions, tmp_path: Path, serving_mnist_test: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contract C, on the real models: one event per served request (stable's or the canary's, never a
    shadow run's), and a listener that raises is counted, not raised into the request."""
    dataplane, candidate = _in_process(two_versions, tmp_path, monkeypatch)
    events: list[PredictionEvent] = []

    def broken(event: PredictionEvent) -> None:
        raise RuntimeError("a listener bug")

    dataplane.add_prediction_listener(events.append)
    dataplane.add_prediction_listener(broken)
    images = serving_mnist_test[0][:3]
    one = Batch(_model_input(images[:1]), [False])
    three = Batch(_model_input(images), [False] * 3)

    async def serve() -> list[Inference]:
        results = [
            await dataplane.infer_async(one, "predict", time.perf_counter(), request_id="req-1"),
            await dataplane.infer_async(three, "predict_batch", time.perf_counter(), request_id="req-2"),
        ]
        dataplane.traffic = routing.Route(
            routing.TrafficDocument("shadow", STABLE, CANDIDATE, 0), candidate, STABLE
        )
        results.append(
            await dataplane.infer_async(three, "v2_infer", time.perf_counter(), request_id="req-3")
        )
        await dataplane.drain_shadows()
        dataplane.traffic = routing.Route(
            routing.TrafficDocument("canary", STABLE, CANDIDATE, 100), candidate, STABLE
        )
        results.append(
            await dataplane.infer_async(one, "grpc_infer", time.perf_counter(), request_id="req-4")
        )
        dataplane.traffic = None
        return results

    errors_before = _counter("mnist_prediction_listener_errors_total")
    shadows_before = _counter(
        "mnist_shadow_comparisons_total", stable=STABLE, candidate=CANDIDATE, result="agree"
    ) + _counter("mnist_shadow_comparisons_total", stable=STABLE, candidate=CANDIDATE, result="disagree")
    results = asyncio.run(serve())

    assert [(e.request_id, e.endpoint, e.version, e.images.shape, e.probabilities.shape) for e in events] == [
        ("req-1", "predict", STABLE, (1, 28, 28), (1, 10)),
        ("req-2", "predict_batch", STABLE, (3, 28, 28), (3, 10)),
        ("req-3", "v2_infer", STABLE, (3, 28, 28), (3, 10)),
        ("req-4", "grpc_infer", CANDIDATE, (1, 28, 28), (1, 10)),
    ]
    assert [result.version for result in results] == [STABLE, STABLE, STABLE, CANDIDATE]
    for event, result in zip(events, results, strict=True):
        assert np.array_equal(event.images, (one if len(event.images) == 1 else three).images)
        assert np.allclose(event.probabilities, result.probabilities)
    assert _counter("mnist_prediction_listener_errors_total") - errors_before == 4
    shadows_after = _counter(
        "mnist_shadow_comparisons_total", stable=STABLE, candidate=CANDIDATE, result="agree"
    ) + _counter("mnist_shadow_comparisons_total", stable=STABLE, candidate=CANDIDATE, result="disagree")
    assert shadows_after - shadows_before == 3
