"""The drift job's Prometheus metrics, on their own registry (the process exports nothing else but
the standard process collector).

`mnist_drift_detected` is what the `MnistInputDrift` alert reads: 1 only while the latest evaluation
decided drift. A window too small to decide, or an evaluation that failed, sets it to 0 and removes
the scores and p-values (a stale p-value would look like a current one);
`mnist_drift_window_samples` against `mnist_drift_min_samples` says why there is no decision.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from drift.detect import FAMILIES, DriftResult

# Every family the job exports: the dashboard test checks each has a panel, like serving's.
EXPORTED_METRICS = (
    "mnist_drift_score",
    "mnist_drift_p_value",
    "mnist_drift_window_samples",
    "mnist_drift_min_samples",
    "mnist_drift_detected",
    "mnist_drift_alpha",
    "mnist_drift_evaluations_total",
    "mnist_drift_last_evaluation_timestamp_seconds",
)
OUTCOMES = ("drift", "no_drift", "insufficient", "error")


class DriftMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.score = Gauge(
            "mnist_drift_score",
            "Effect size of the latest window per test family, 0..1: the largest KS distance (embedding "
            "components, confidence) or the total variation distance of the predicted digits.",
            ["test"],
            registry=self.registry,
        )
        self.p_value = Gauge(
            "mnist_drift_p_value",
            "p-value of the latest window per test family (Bonferroni within the family); "
            'test="combined" is the whole decision, compared with mnist_drift_alpha.',
            ["test"],
            registry=self.registry,
        )
        self.window_samples = Gauge(
            "mnist_drift_window_samples",
            "Logged inputs in the latest evaluated window.",
            registry=self.registry,
        )
        self.min_samples = Gauge(
            "mnist_drift_min_samples", "Fewest inputs a window needs for a decision.", registry=self.registry
        )
        self.detected = Gauge(
            "mnist_drift_detected",
            "1 when the latest window was decided drifted, 0 otherwise (also when undecided).",
            registry=self.registry,
        )
        self.alpha = Gauge(
            "mnist_drift_alpha",
            "Family-wise false-alarm rate of one window's decision.",
            registry=self.registry,
        )
        self.evaluations = Counter(
            "mnist_drift_evaluations",
            "Window evaluations by outcome: drift, no_drift, insufficient (too few samples), error.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.evaluations.labels(outcome=outcome)
        self.last_evaluation = Gauge(
            "mnist_drift_last_evaluation_timestamp_seconds",
            "Unix time of the latest evaluation (whatever its outcome).",
            registry=self.registry,
        )
        self.detected.set(0)

    def configure(self, alpha: float, min_samples: int) -> None:
        self.alpha.set(alpha)
        self.min_samples.set(min_samples)

    def _clear(self) -> None:
        self.score.clear()
        self.p_value.clear()

    def record(self, result: DriftResult) -> None:
        self.last_evaluation.set(time.time())
        self.window_samples.set(result.samples)
        self._clear()
        if not result.decided:
            self.detected.set(0)
            self.evaluations.labels(outcome="insufficient").inc()
            return
        for family, score in result.family_scores().items():
            self.score.labels(test=family).set(score)
        for family, p_value in result.family_p_values().items():
            self.p_value.labels(test=family).set(p_value)
        self.detected.set(1 if result.detected else 0)
        self.evaluations.labels(outcome="drift" if result.detected else "no_drift").inc()

    def record_error(self) -> None:
        self.last_evaluation.set(time.time())
        self._clear()
        self.detected.set(0)
        self.evaluations.labels(outcome="error").inc()


__all__ = ["EXPORTED_METRICS", "FAMILIES", "OUTCOMES", "DriftMetrics"]
