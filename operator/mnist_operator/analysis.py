"""The live analysis of a canary or shadow rollout: the PromQL it asks and how it judges the answers.

Pure: the queries are strings built from the rollout's scope and window, the answers are Prometheus
HTTP API vectors (plain data), and the verdict is a list of checks with measured values and
thresholds. `progressive.py` does the I/O. Unit-tested as data
(tests/mnist_operator/test_progressive_units.py).

Every query is limited to the serving targets of the rollout's registered model: the series are
joined on (job, instance) with `mnist_model_info{model_name=...}`, which each serving pod exports, so
two models (or two test runs) whose version numbers coincide never mix in one Prometheus. Windows are
`increase()` over the step's own window, from the moment every pod applied its weight to now.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from contract.spec import AnalysisSpec
from contract.traffic import TrafficMode

MODEL_INFO = "mnist_model_info"
TRAFFIC_WEIGHT = "mnist_traffic_weight"
INFERENCE_REQUESTS = "mnist_inference_requests_total"
PREDICTIONS = "mnist_predictions_total"
CONFIDENCE = "mnist_prediction_confidence"
LATENCY = "mnist_prediction_latency_seconds"
SHADOW_COMPARISONS = "mnist_shadow_comparisons_total"
SHADOW_ENDPOINT = "shadow"
TARGET_LABELS = ("job", "instance")
DIGITS = tuple(str(digit) for digit in range(10))

# Check names, as they appear in status.traffic.analyses and the Analysis condition.
CHECK_APPLY = "apply"
CHECK_TRAFFIC = "traffic"
CHECK_ERROR_RATE = "errorRate"
CHECK_LATENCY = "p99LatencyRatio"
CHECK_CONFIDENCE = "confidenceDrop"
CHECK_DIVERGENCE = "digitDivergence"
CHECK_AGREEMENT = "agreement"
CHECK_MANUAL = "manual"
CHECK_CHAMPION = "champion"
# A step with too few requests is extended up to this many times its hold, then aborted.
EXTENSION_FACTOR = 3

Vector = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Scope:
    """Which versions of which registered model a rollout compares."""

    model: str
    stable: str
    candidate: str


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    threshold: float
    passed: bool

    def describe(self) -> str:
        value = "no data" if self.value is None else f"{self.value:.4g}"
        relation = "within" if self.passed else "outside"
        return f"{self.name}={value} ({relation} {self.threshold:g})"


@dataclass(frozen=True)
class Verdict:
    """An analysis: `enough` is False while a version has answered too few requests to judge."""

    enough: bool
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return self.enough and all(check.passed for check in self.checks)

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if not check.passed)

    def summary(self) -> str:
        """One line: the failing checks (or all of them when everything passed)."""
        shown = self.failed or self.checks
        return "; ".join(check.describe() for check in shown)


# ------------------------------------------------------------------------ PromQL


def quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def selector(metric: str, **labels: str) -> str:
    """`metric{a="x",b!="y"}`: a label name ending in `_not` matches with `!=`."""
    matchers = []
    for name, value in labels.items():
        if name.endswith("_not"):
            matchers.append(f"{name.removesuffix('_not')}!={quote(value)}")
        else:
            matchers.append(f"{name}={quote(value)}")
    return f"{metric}{{{','.join(matchers)}}}"


def _targets_of(model: str) -> str:
    labels = ", ".join(TARGET_LABELS)
    return f"group by ({labels}) ({selector(MODEL_INFO, model_name=model)})"


def scoped(expr: str, model: str) -> str:
    """`expr`, keeping only the series of the model's serving targets."""
    return f"({expr}) and on ({', '.join(TARGET_LABELS)}) {_targets_of(model)}"


def increase(metric: str, window_seconds: int, **labels: str) -> str:
    return f"increase({selector(metric, **labels)}[{max(int(window_seconds), 1)}s])"


def targets_query(model: str) -> str:
    """One series per serving target of the model."""
    return _targets_of(model)


def applied_query(model: str, mode: TrafficMode, stable: str, candidate: str, weight: float) -> str:
    """One series per serving target of the model that has applied the document (shadow: any weight)."""
    gauge = selector(TRAFFIC_WEIGHT, mode=mode.value, stable=stable, candidate=candidate)
    if mode is TrafficMode.CANARY:
        gauge = f"{gauge} == {_number(weight)}"
    return f"group by ({', '.join(TARGET_LABELS)}) ({scoped(gauge, model)})"


def candidate_weight_query(model: str, candidate: str) -> str:
    """The candidate weights the model's serving targets apply (no series: 0% everywhere)."""
    return scoped(selector(TRAFFIC_WEIGHT, candidate=candidate), model)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _sum(expr: str, model: str, by: str | None = None) -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({scoped(expr, model)})"


def _p99(model: str, version: str, window: int, *, shadow: bool) -> str:
    endpoint = {"endpoint": SHADOW_ENDPOINT} if shadow else {"endpoint_not": SHADOW_ENDPOINT}
    buckets = increase(f"{LATENCY}_bucket", window, version=version, **endpoint)
    return f"histogram_quantile(0.99, {_sum(buckets, model, by='le')})"


def canary_queries(scope: Scope, window_seconds: int) -> dict[str, str]:
    """Every query of a canary analysis, by name; each answers a vector `judge_canary` reads."""
    queries: dict[str, str] = {}
    for side, version in (("stable", scope.stable), ("candidate", scope.candidate)):
        queries[f"{side}_requests"] = _sum(
            increase(INFERENCE_REQUESTS, window_seconds, version=version), scope.model
        )
        queries[f"{side}_errors"] = _sum(
            increase(INFERENCE_REQUESTS, window_seconds, version=version, outcome="error"), scope.model
        )
        queries[f"{side}_p99"] = _p99(scope.model, version, window_seconds, shadow=False)
        queries[f"{side}_confidence_sum"] = _sum(
            increase(f"{CONFIDENCE}_sum", window_seconds, version=version), scope.model
        )
        queries[f"{side}_confidence_count"] = _sum(
            increase(f"{CONFIDENCE}_count", window_seconds, version=version), scope.model
        )
        queries[f"{side}_digits"] = _sum(
            increase(PREDICTIONS, window_seconds, version=version), scope.model, by="digit"
        )
    return queries


def shadow_queries(scope: Scope, window_seconds: int) -> dict[str, str]:
    """Every query of a shadow analysis: agreement and the candidate's (shadow) latency."""
    comparisons = increase(SHADOW_COMPARISONS, window_seconds, stable=scope.stable, candidate=scope.candidate)
    return {
        "comparisons": _sum(comparisons, scope.model, by="result"),
        "stable_p99": _p99(scope.model, scope.stable, window_seconds, shadow=False),
        "candidate_p99": _p99(scope.model, scope.candidate, window_seconds, shadow=True),
        # The requests each p99 rests on: comparisons count images, and a batch is one latency sample.
        "stable_latency_requests": _latency_count(scope.model, scope.stable, window_seconds, shadow=False),
        "candidate_latency_requests": _latency_count(
            scope.model, scope.candidate, window_seconds, shadow=True
        ),
    }


def _latency_count(model: str, version: str, window: int, *, shadow: bool) -> str:
    endpoint = {"endpoint": SHADOW_ENDPOINT} if shadow else {"endpoint_not": SHADOW_ENDPOINT}
    return _sum(increase(f"{LATENCY}_count", window, version=version, **endpoint), model)


# ------------------------------------------------------------------------ reading the answers


def scalar(vector: Vector | None) -> float | None:
    """The value of a one-series answer (a sum); None for no series or NaN (nothing observed)."""
    if not vector:
        return None
    total = 0.0
    for series in vector:
        value = float(series["value"][1])
        if math.isnan(value):
            return None
        total += value
    return total


def by_label(vector: Vector | None, label: str) -> dict[str, float]:
    """A `sum by (label)` answer as {label value: value}."""
    result: dict[str, float] = {}
    for series in vector or ():
        key = str(series.get("metric", {}).get(label, ""))
        value = float(series["value"][1])
        if math.isfinite(value):
            result[key] = result.get(key, 0.0) + value
    return result


def target_keys(vector: Vector | None) -> set[tuple[str, ...]]:
    """The (job, instance) of every series."""
    return {
        tuple(str(series.get("metric", {}).get(label, "")) for label in TARGET_LABELS)
        for series in vector or ()
    }


@dataclass(frozen=True)
class Applied:
    """Whether every serving target shows the document applied."""

    targets: int
    applied: int

    @property
    def done(self) -> bool:
        return self.targets > 0 and self.applied >= self.targets

    def describe(self) -> str:
        return f"{self.applied} of {self.targets} serving targets applied it"


def applied_state(targets: Vector | None, applied: Vector | None) -> Applied:
    wanted = target_keys(targets)
    return Applied(len(wanted), len(wanted & target_keys(applied)))


# ------------------------------------------------------------------------ judging


def js_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float | None:
    """Jensen-Shannon divergence, base 2 (0 = same distribution, 1 = disjoint), of two count maps."""
    keys = sorted(set(p) | set(q))
    p_total = sum(max(p.get(key, 0.0), 0.0) for key in keys)
    q_total = sum(max(q.get(key, 0.0), 0.0) for key in keys)
    if p_total <= 0 or q_total <= 0:
        return None
    divergence = 0.0
    for key in keys:
        a = max(p.get(key, 0.0), 0.0) / p_total
        b = max(q.get(key, 0.0), 0.0) / q_total
        m = (a + b) / 2
        if a > 0:
            divergence += 0.5 * a * math.log2(a / m)
        if b > 0:
            divergence += 0.5 * b * math.log2(b / m)
    return min(max(divergence, 0.0), 1.0)


def latency_ratio(candidate: float | None, stable: float | None, floor_ms: float) -> float | None:
    """candidate p99 / stable p99, each raised to the floor first; None without a candidate p99."""
    if candidate is None:
        return None
    floor = floor_ms / 1000.0
    denominator = max(stable if stable is not None else 0.0, floor)
    if denominator <= 0:
        return None
    return max(candidate, floor) / denominator


def _upper(name: str, value: float | None, threshold: float) -> Check:
    return Check(name, value, threshold, value is not None and value <= threshold + 1e-12)


def _lower(name: str, value: float | None, threshold: float) -> Check:
    return Check(name, value, threshold, value is not None and value >= threshold - 1e-12)


def judge_canary(answers: Mapping[str, Vector], spec: AnalysisSpec) -> Verdict:
    """The canary checks from the answers of `canary_queries`. Nothing is judged, the latency ratio
    included, until both versions answered minRequests in the window: fewer is inconclusive (the step is
    extended), never a failure."""
    stable_requests = scalar(answers.get("stable_requests")) or 0.0
    candidate_requests = scalar(answers.get("candidate_requests")) or 0.0
    traffic = _lower(CHECK_TRAFFIC, min(stable_requests, candidate_requests), float(spec.min_requests))
    if not traffic.passed:
        return Verdict(False, (traffic,))
    errors = scalar(answers.get("candidate_errors")) or 0.0
    error_rate = errors / candidate_requests
    ratio = latency_ratio(
        scalar(answers.get("candidate_p99")), scalar(answers.get("stable_p99")), spec.p99_latency_floor_ms
    )
    drop: float | None = None
    means = [
        _mean(answers.get(f"{side}_confidence_sum"), answers.get(f"{side}_confidence_count"))
        for side in ("stable", "candidate")
    ]
    if means[0] is not None and means[1] is not None:
        drop = means[0] - means[1]
    divergence = js_divergence(
        by_label(answers.get("stable_digits"), "digit"), by_label(answers.get("candidate_digits"), "digit")
    )
    return Verdict(
        True,
        (
            traffic,
            _upper(CHECK_ERROR_RATE, error_rate, spec.max_error_rate),
            _upper(CHECK_LATENCY, ratio, spec.max_p99_latency_ratio),
            _upper(CHECK_CONFIDENCE, drop, spec.max_confidence_drop),
            _upper(CHECK_DIVERGENCE, divergence, spec.max_digit_divergence),
        ),
    )


def judge_shadow(answers: Mapping[str, Vector], spec: AnalysisSpec) -> Verdict:
    """The shadow checks from the answers of `shadow_queries`: agreement and candidate latency."""
    results = by_label(answers.get("comparisons"), "result")
    agree, disagree = results.get("agree", 0.0), results.get("disagree", 0.0)
    compared = agree + disagree
    # A p99 over a handful of requests is noise: the latency check, like agreement, waits (the step is
    # extended) until both versions answered minRequests, rather than failing on too few samples.
    samples = min(
        compared,
        scalar(answers.get("stable_latency_requests")) or 0.0,
        scalar(answers.get("candidate_latency_requests")) or 0.0,
    )
    traffic = _lower(CHECK_TRAFFIC, samples, float(spec.min_requests))
    if not traffic.passed:
        return Verdict(False, (traffic,))
    ratio = latency_ratio(
        scalar(answers.get("candidate_p99")), scalar(answers.get("stable_p99")), spec.p99_latency_floor_ms
    )
    return Verdict(
        True,
        (
            traffic,
            _lower(CHECK_AGREEMENT, agree / compared, spec.min_agreement),
            _upper(CHECK_LATENCY, ratio, spec.max_p99_latency_ratio),
        ),
    )


def _mean(total: Vector | None, count: Vector | None) -> float | None:
    n = scalar(count)
    s = scalar(total)
    if n is None or s is None or n <= 0:
        return None
    return s / n


def extension_left(held_seconds: float, hold_seconds: float) -> bool:
    """Whether a step short of requests may still wait (up to EXTENSION_FACTOR times its hold)."""
    return held_seconds < EXTENSION_FACTOR * hold_seconds


def checks_message(checks: Iterable[Check]) -> str:
    return "; ".join(check.describe() for check in checks)
