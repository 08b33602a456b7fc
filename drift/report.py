"""The report of an evaluated window, for a person: Evidently's data drift report as HTML, logged to
MLflow (experiment `mnist-drift`, one run per reported window) with the scores and p-values as metrics.

Evidently 0.7.23 and our pins: it does not import with pandas 3 as shipped. Its
`evidently.legacy.tests.data_integrity_tests` imports `pandas.core.dtypes.common.infer_dtype_from_object`,
a private pandas helper that pandas 3.0 removed (ImportError at `import evidently`; Evidently declares
`pandas>=1.3.5` without an upper bound, and mlflow 3.17 accepts pandas 3, so the resolver picks 3.1).
That helper is used only by a column-type test of the legacy suite, which this report never runs, so
`_evidently()` defines it (for numpy dtypes only, what the helper did for them) before importing
Evidently, only when pandas lacks it. Everything else the data drift preset does works with pandas 3.1
and numpy 2.4 (tests/drift checks its per-column p-values against our scipy tests). If Evidently still
fails to import or to run, the report falls back to a compact HTML page of our own tests, and says so.

The decision is always ours (drift/detect.py); Evidently gets the same columns (the window projected on
the reference's principal components, the confidence, the predicted digit) with the same tests (KS,
chi-square) at the same per-test threshold, alpha / m, so its per-column verdicts are the ones the
decision combined, drawn.

An Evidently page carries its JavaScript (about 4 MB): the drift job reports a window when its decision
differs from the previous one, and otherwise at most once per `report_interval_seconds` (by default the
window length, so reports cover disjoint windows), while the metrics follow every evaluation.
"""

from __future__ import annotations

import html
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from drift.detect import DriftResult, Reference
from drift.features import Features
from drift.reference import ResolvedModel

if TYPE_CHECKING:
    from drift.service import Settings

log = logging.getLogger("drift.report")

REPORT_FILE = "drift-report.html"


def _evidently() -> Any:
    """The evidently module, made importable under pandas 3 (see the module docstring)."""
    import pandas.core.dtypes.common as pandas_common

    if not hasattr(pandas_common, "infer_dtype_from_object"):

        def infer_dtype_from_object(dtype: Any) -> Any:
            return np.dtype(dtype).type

        pandas_common.infer_dtype_from_object = infer_dtype_from_object
    import evidently

    return evidently


def frames(reference: Reference, window: Features) -> tuple[Any, Any]:
    """The reference and the window as the DataFrames Evidently compares: one column per tested
    principal component, the confidence, and the predicted digit (categorical)."""
    import pandas as pd

    def frame(projections: np.ndarray[Any, Any], confidence: np.ndarray[Any, Any], predicted: Any) -> Any:
        columns: dict[str, Any] = {f"pc{i + 1}": projections[:, i] for i in range(projections.shape[1])}
        columns["confidence"] = confidence
        columns["predicted_digit"] = [str(int(d)) for d in predicted]
        return pd.DataFrame(columns)

    reference_predicted = np.repeat(np.arange(len(reference.predicted_counts)), reference.predicted_counts)
    return (
        frame(reference.projections, reference.confidence, reference_predicted),
        frame(reference.project(window.embeddings), window.confidence.astype(np.float64), window.predicted),
    )


def evidently_report(
    result: DriftResult, reference: Reference, window: Features
) -> tuple[str, dict[str, float]]:
    """Evidently's HTML report of the window, and its per-column p-values."""
    _evidently()
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    reference_frame, window_frame = frames(reference, window)
    numerical = [c for c in reference_frame.columns if c != "predicted_digit"]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=["predicted_digit"])
    preset = DataDriftPreset(num_method="ks", cat_method="chisquare", threshold=result.per_test_alpha)
    snapshot = Report([preset]).run(
        Dataset.from_pandas(window_frame, data_definition=definition),
        Dataset.from_pandas(reference_frame, data_definition=definition),
    )
    p_values: dict[str, float] = {}
    for metric in snapshot.dict()["metrics"]:
        column = metric.get("config", {}).get("column")
        if metric.get("config", {}).get("type", "").endswith("ValueDrift") and column:
            p_values[str(column)] = float(metric["value"])
    return str(snapshot.get_html_str(as_iframe=False)), p_values


def simple_report(result: DriftResult, model: ResolvedModel, note: str = "") -> str:
    """A compact page of our own tests, when Evidently cannot render one."""
    rows = "".join(
        f"<tr><td>{html.escape(t.name)}</td><td>{t.statistic:.4g}</td><td>{t.p_value:.3g}</td>"
        f"<td>{t.score:.3f}</td><td>{'drift' if t.p_value < result.per_test_alpha else ''}</td></tr>"
        for t in result.tests
    )
    verdict = "DRIFT" if result.detected else "no drift"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>mnist drift report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .8em;text-align:right}"
        "td:first-child{text-align:left}</style></head><body>"
        f"<h1>Input drift: {verdict}</h1>"
        f"<p>{result.samples} logged inputs against {result.reference_samples} reference images, model "
        f"{html.escape(model.label)}. Family-wise alpha {result.alpha}, {len(result.tests)} tests, each at "
        f"alpha/m = {result.per_test_alpha:.3g}; combined p-value {result.p_value or 1.0:.3g}.</p>"
        f"<p>{html.escape(result.reason)}</p>"
        + (f"<p><em>{html.escape(note)}</em></p>" if note else "")
        + "<table><tr><th>test</th><th>statistic</th><th>p-value</th><th>score</th><th></th></tr>"
        f"{rows}</table></body></html>"
    )


def mlflow_metrics(result: DriftResult) -> dict[str, float]:
    metrics: dict[str, float] = {
        "window_samples": float(result.samples),
        "reference_samples": float(result.reference_samples),
        "detected": 1.0 if result.detected else 0.0,
    }
    for family, value in result.family_p_values().items():
        metrics[f"p_value_{family}"] = value
    for family, value in result.family_scores().items():
        metrics[f"score_{family}"] = value
    for test in result.tests:
        metrics[f"p_value_{test.name}"] = test.p_value
        metrics[f"statistic_{test.name}"] = test.statistic
    # MLflow refuses NaN and infinities; a test that returned one has no meaningful value to log.
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


@dataclass
class ReportLogger:
    tracking_uri: str
    experiment: str
    report_interval_seconds: float = 0.0  # 0: every decided window
    _last_logged: float | None = None
    _last_detected: bool | None = None

    @classmethod
    def create(cls, settings: Settings) -> ReportLogger | None:
        if not settings.log_reports or not settings.tracking_uri:
            return None
        return cls(settings.tracking_uri, settings.experiment, settings.report_interval)

    def due(self, result: DriftResult, now: float) -> bool:
        if self._last_logged is None or result.detected != self._last_detected:
            return True
        return now - self._last_logged >= self.report_interval_seconds

    def log(
        self,
        result: DriftResult,
        reference: Reference,
        window: Features,
        *,
        model: ResolvedModel,
        window_start: datetime | None,
        window_end: datetime | None,
        window_seconds: float,
        force: bool = False,
    ) -> str | None:
        """Logs the window's run if one is due (or `force`); its id, or None."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        now = time.time()
        if not force and not self.due(result, now):
            return None
        try:
            page, evidently_p_values = evidently_report(result, reference, window)
            renderer = "evidently"
        except Exception as error:  # any failure inside Evidently: the report must not stop the job
            log.warning("Evidently could not render the report (%s); logging our own", error)
            page, evidently_p_values, renderer = (
                simple_report(result, model, f"Evidently failed: {error}"),
                {},
                "simple",
            )
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment)
        )
        end = window_end or datetime.now(UTC)
        run = client.create_run(
            experiment_id,
            run_name=f"window-{end:%Y%m%dT%H%M%SZ}",
            tags={
                "mnist-mlops.io/model": model.label,
                "mnist-mlops.io/drift-detected": str(result.detected).lower(),
                "mnist-mlops.io/report-renderer": renderer,
                "mnist-mlops.io/window-start": window_start.isoformat() if window_start else "",
                "mnist-mlops.io/window-end": end.isoformat(),
            },
        )
        run_id = str(run.info.run_id)
        stamp = int(end.timestamp() * 1000)
        metrics = mlflow_metrics(result)
        metrics.update({f"evidently_p_value_{column}": value for column, value in evidently_p_values.items()
                        if math.isfinite(value)})  # fmt: skip
        params = {
            "alpha": result.alpha,
            "tests": len(result.tests),
            "per_test_alpha": result.per_test_alpha,
            "components": sum(1 for t in result.tests if t.name.startswith("embedding_pc")),
            "window_seconds": window_seconds,
            "model_version": model.version,
        }
        try:
            client.log_batch(
                run_id,
                metrics=[Metric(key, value, stamp, 0) for key, value in metrics.items()],
                params=[Param(key, str(value)) for key, value in params.items()],
            )
            client.log_text(run_id, page, REPORT_FILE)
            client.set_terminated(run_id, "FINISHED")
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
        self._last_logged, self._last_detected = now, result.detected
        return run_id
