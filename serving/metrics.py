"""Prometheus metrics of the prediction service.

`EXPORTED_METRICS` lists every `mnist_*` family as it appears on `# TYPE` lines of `GET /metrics`
(histograms add `_bucket`, `_sum` and `_count` samples). The chart's dashboards and alert rules are
tested against it, so a renamed metric fails a test rather than a dashboard.

Drift: `mnist_input_mean_intensity` is the distribution of the mean pixel value of what the model
saw (after preprocessing, 0..1); on the MNIST training set its mean is `TRAINING_MEAN_INTENSITY`.

Progressive delivery (serving/routing.py): while a canary or shadow runs, one process serves two
model versions, so the prediction families carry a `version` label (the version that answered, or
that ran a shadow copy: `endpoint="shadow"`), and `mnist_inference_requests_total{version, outcome}`
counts requests per version for error rates and the measured traffic share. Each version's series
are created once, when it is loaded (`VersionMetrics`): the per-request path only looks them up.
`ROLLOUT_METRICS` are the families that have series only while a traffic document is applied.

With several worker processes (SERVING_WORKERS > 1) the launcher sets PROMETHEUS_MULTIPROC_DIR and
`/metrics` aggregates all workers' values; each gauge declares how.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `_created` series double the series count and no dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "mnist_"
# Mean pixel intensity of the MNIST training images in [0,1] (the usual normalisation constant).
TRAINING_MEAN_INTENSITY = 0.1307
EWMA_ALPHA = 0.02

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

predictions = Counter(
    "mnist_predictions",
    "Predictions served, by predicted digit and the model version that answered.",
    ["digit", "version"],
)
prediction_latency = Histogram(
    "mnist_prediction_latency_seconds",
    "Server-side time to decode, preprocess and run the model for one request, by endpoint and model "
    "version (endpoint=\"shadow\": a shadow candidate's run on a served request's images, model time only).",
    ["endpoint", "version"],
    buckets=_LATENCY_BUCKETS,
)
prediction_confidence = Histogram(
    "mnist_prediction_confidence",
    "Probability of the predicted digit, by model version.",
    ["version"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
)
inference_requests = Counter(
    "mnist_inference_requests",
    "Inference requests by the model version they were routed to; outcome error: the model call failed.",
    ["version", "outcome"],
)
recent_confidence = Gauge(
    "mnist_prediction_confidence_recent",
    f"Exponentially weighted mean of the predicted digit's probability (alpha {EWMA_ALPHA}).",
    multiprocess_mode="livemostrecent",
)
batch_size = Histogram(
    "mnist_prediction_batch_size",
    "Images per inference request.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
inference_batch_size = Histogram(
    "mnist_inference_batch_size",
    "Images per model call; with SERVING_BATCHING_ENABLED several requests' images share one call.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
inference_queue = Histogram(
    "mnist_inference_queue_seconds",
    "Time a request waited in the batching queue before its model call started.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
input_mean_intensity = Histogram(
    "mnist_input_mean_intensity",
    f"Mean pixel intensity (0..1) of each preprocessed input; training data mean {TRAINING_MEAN_INTENSITY}.",
    buckets=(0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0),
)
inputs_inverted = Counter("mnist_input_inverted", "Inputs detected as dark-on-light and inverted.")

http_requests = Counter(
    "mnist_http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
)
http_duration = Histogram(
    "mnist_http_request_duration_seconds",
    "HTTP request duration from first byte read to response sent, by route template.",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
)
http_in_flight = Gauge(
    "mnist_http_requests_in_flight", "HTTP requests being served.", multiprocess_mode="livesum"
)
http_rejected = Counter(
    "mnist_http_rejected_requests",
    "Requests refused by a protective limit, by reason (body_too_large, overloaded, rate_limited).",
    ["reason"],
)

model_info = Gauge(
    "mnist_model_info",
    "The served model: always 1, labelled with its registry name, version and alias.",
    ["model_name", "model_version", "model_alias", "model_uri"],
    multiprocess_mode="livemax",
)
model_ready = Gauge(
    "mnist_model_ready", "1 when the model is loaded and serving.", multiprocess_mode="livemin"
)
model_load_duration = Gauge(
    "mnist_model_load_duration_seconds",
    "Seconds spent resolving, fetching, loading and warming the model at start-up.",
    multiprocess_mode="livemax",
)

traffic_weight = Gauge(
    "mnist_traffic_weight",
    "The applied traffic document: percent of requests the candidate answers (canary) or gets a copy "
    "of (shadow: 100). Present only once the candidate is loaded; gone when the document is.",
    ["stable", "candidate", "mode"],
    multiprocess_mode="livemax",
)
shadow_comparisons = Counter(
    "mnist_shadow_comparisons",
    "Images a shadow candidate ran on, by whether its predicted digit agreed with the stable "
    "version's answer (result agree, disagree; error: the candidate's model call failed).",
    ["stable", "candidate", "result"],
)
shadow_skipped = Counter(
    "mnist_shadow_skipped",
    "Images not run on the shadow candidate because SERVING_SHADOW_MAX_IN_FLIGHT shadow runs were pending.",
)
listener_errors = Counter(
    "mnist_prediction_listener_errors",
    "Exceptions raised by prediction listeners (the prediction log's hook); the requests were served.",
)

# The prediction log (serving/prediction_log.py) and POST /feedback (serving/rest/feedback.py).
prediction_log_records = Counter(
    "mnist_prediction_log_records",
    "Prediction log records by outcome: written to the database; dropped because the queue was full; "
    "failed: refused by the database, or still unwritten when the process shut down.",
    ["outcome"],
)
prediction_log_queue_depth = Gauge(
    "mnist_prediction_log_queue_depth",
    "Prediction log records queued in memory or being written (up to SERVING_PREDICTION_LOG_QUEUE_SIZE).",
    multiprocess_mode="livesum",
)
feedback_requests = Counter(
    "mnist_feedback",
    "POST /feedback requests by outcome (created, unchanged, conflict, unknown, invalid, unavailable).",
    ["outcome"],
)
# Every outcome from the start: a rate reads 0, not "no data", and the log's panels show when it is off.
FEEDBACK_OUTCOMES = ("created", "unchanged", "conflict", "unknown", "invalid", "unavailable")
for _outcome in ("written", "dropped", "failed"):
    prediction_log_records.labels(outcome=_outcome)
for _outcome in FEEDBACK_OUTCOMES:
    feedback_requests.labels(outcome=_outcome)

EXPORTED_METRICS: tuple[str, ...] = (
    "mnist_predictions_total",
    "mnist_prediction_log_records_total",
    "mnist_prediction_log_queue_depth",
    "mnist_feedback_total",
    "mnist_prediction_latency_seconds",
    "mnist_prediction_confidence",
    "mnist_prediction_confidence_recent",
    "mnist_prediction_batch_size",
    "mnist_inference_batch_size",
    "mnist_inference_queue_seconds",
    "mnist_input_mean_intensity",
    "mnist_input_inverted_total",
    "mnist_http_requests_total",
    "mnist_http_request_duration_seconds",
    "mnist_http_requests_in_flight",
    "mnist_http_rejected_requests_total",
    "mnist_model_info",
    "mnist_model_ready",
    "mnist_model_load_duration_seconds",
    "mnist_inference_requests_total",
    "mnist_traffic_weight",
    "mnist_shadow_comparisons_total",
    "mnist_shadow_skipped_total",
    "mnist_prediction_listener_errors_total",
)
# Families whose series exist only while a canary or shadow document is applied: a server without
# one (most of the time, and the monitoring tests' server) exports their `# TYPE` line alone.
ROLLOUT_METRICS: tuple[str, ...] = ("mnist_traffic_weight", "mnist_shadow_comparisons_total")

_http_counters: dict[tuple[str, str, int], Counter] = {}
_http_durations: dict[tuple[str, str], Histogram] = {}
_ewma: list[float | None] = [None]


class VersionMetrics:
    """One model version's prediction series, created when the version is loaded."""

    __slots__ = ("_latency", "confidence", "digits", "error", "ok", "version")

    def __init__(self, version: str) -> None:
        self.version = version
        self.digits = [predictions.labels(digit=str(d), version=version) for d in range(10)]
        self.confidence = prediction_confidence.labels(version=version)
        # Both outcomes from the start: an error rate reads 0, not "no data", before the first error.
        self.ok = inference_requests.labels(version=version, outcome="ok")
        self.error = inference_requests.labels(version=version, outcome="error")
        self._latency: dict[str, Histogram] = {}

    def latency(self, endpoint: str) -> Histogram:
        child = self._latency.get(endpoint)
        if child is None:
            child = self._latency[endpoint] = prediction_latency.labels(
                endpoint=endpoint, version=self.version
            )
        return child

    def count_digits(self, digits: list[int]) -> None:
        if len(digits) == 1:
            self.digits[digits[0]].inc()
            return
        for digit, n in enumerate(np.bincount(digits, minlength=10).tolist()):
            if n:
                self.digits[digit].inc(n)


def observe_predictions(
    served: VersionMetrics,
    endpoint: str,
    *,
    digits: list[int],
    confidences: list[float],
    means: list[float],
    inverted: int,
    seconds: float,
) -> None:
    """Records one request's predictions by `served`: per image its digit, confidence and mean input
    intensity."""
    served.latency(endpoint).observe(seconds)
    batch_size.observe(len(digits))
    if inverted:
        inputs_inverted.inc(inverted)
    served.count_digits(digits)
    confidence_child = served.confidence
    ewma = _ewma[0]
    for confidence, mean in zip(confidences, means, strict=True):
        confidence_child.observe(confidence)
        input_mean_intensity.observe(mean)
        ewma = confidence if ewma is None else ewma + EWMA_ALPHA * (confidence - ewma)
    _ewma[0] = ewma
    if ewma is not None:
        recent_confidence.set(ewma)


class ShadowMetrics:
    """The series of one (stable, candidate) shadow pairing."""

    __slots__ = ("agree", "candidate", "disagree", "error")

    def __init__(self, stable: str, candidate: VersionMetrics) -> None:
        self.candidate = candidate
        labels = {"stable": stable, "candidate": candidate.version}
        self.agree = shadow_comparisons.labels(**labels, result="agree")
        self.disagree = shadow_comparisons.labels(**labels, result="disagree")
        self.error = shadow_comparisons.labels(**labels, result="error")


def observe_shadow(shadow: ShadowMetrics, *, agreed: int, disagreed: int, seconds: float) -> None:
    """A candidate's shadow run: its model time (endpoint "shadow") and how many of its predictions
    agreed with the answers stable gave. Nothing else: its predictions were not served, so the served
    predictions' families (and the alerts on them) do not see them."""
    shadow.candidate.latency("shadow").observe(seconds)
    if agreed:
        shadow.agree.inc(agreed)
    if disagreed:
        shadow.disagree.inc(disagreed)


def set_traffic(stable: str, candidate: str, mode: str, weight: float) -> None:
    traffic_weight.labels(stable=stable, candidate=candidate, mode=mode).set(weight)


def clear_traffic(stable: str, candidate: str, mode: str) -> None:
    if MULTIPROCESS:
        # Multiprocess files keep a removed series: 0 is the truth for it (no traffic to that candidate).
        traffic_weight.labels(stable=stable, candidate=candidate, mode=mode).set(0)
    with contextlib.suppress(KeyError):
        traffic_weight.remove(stable, candidate, mode)


def observe_model_call(images: int) -> None:
    inference_batch_size.observe(images)


def observe_batch(images: int, waits: list[float]) -> None:
    """One batched model call: its image count, and how long each of its requests queued for it."""
    inference_batch_size.observe(images)
    for wait in waits:
        inference_queue.observe(wait)


def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    key = (method, route, status)
    counter = _http_counters.get(key)
    if counter is None:
        counter = _http_counters[key] = http_requests.labels(method=method, route=route, status=str(status))
    counter.inc()
    duration = _http_durations.get((method, route))
    if duration is None:
        duration = _http_durations[(method, route)] = http_duration.labels(method=method, route=route)
    duration.observe(seconds)


def set_model(name: str, version: str, alias: str | None, uri: str, load_seconds: float) -> None:
    model_info.labels(model_name=name, model_version=version, model_alias=alias or "", model_uri=uri).set(1)
    model_load_duration.set(load_seconds)
    model_ready.set(1)


def exposition() -> tuple[bytes, str]:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead() -> None:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
