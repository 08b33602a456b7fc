"""The drift job: every interval, the newest window of logged inputs against the training reference.

One evaluation (`Detector.evaluate_window`): resolve the model URI (an alias may have moved since the
last one: a new version gets its own reference, from the cache when seen before), read the window from
the prediction log (the newest `window_samples` inputs of the last `window_seconds`: the cap is the
window size the false-alarm rate was measured at), compute the features with the model, decide, and
log the report to MLflow. Every input is embedded by the model the reference was made with, whichever
version answered it (canary traffic mixes versions): the question is whether the inputs moved, and one
model's view of both sides answers it.

`DriftService` runs that on a timer, publishes the result as Prometheus metrics on its own small HTTP
server (`/metrics`, `/healthz`, `/readyz`: ready once the first reference is built), and stops on
SIGTERM between evaluations. A failing evaluation (database or registry unreachable) is logged and
counted, and the next interval tries again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from drift.detect import (
    DEFAULT_ALPHA,
    DEFAULT_COMPONENTS,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_WINDOW_SAMPLES,
    DriftConfig,
    DriftResult,
    Reference,
    evaluate,
)
from drift.features import EmbeddingModel, Features
from drift.metrics import DriftMetrics
from drift.reference import REFERENCE_SAMPLES, ResolvedModel, reference_features, resolve_model
from drift.report import ReportLogger

if TYPE_CHECKING:  # imported when a window is read: `once --images` never needs SQLAlchemy
    from prediction_log import LoggedWindow, PredictionStore

log = logging.getLogger("drift")

# The pod's /tmp is its scratch emptyDir; the model and the reference features are cached there.
DEFAULT_CACHE_DIR = Path("/tmp/mnist-drift")  # noqa: S108
DEFAULT_EXCLUDED_SOURCES = ("ws_predict",)


class ReportError(RuntimeError):
    """A report that had to be logged (`python -m drift once`) could not be."""


@dataclass(frozen=True)
class Settings:
    model: str
    prediction_log_url: str | None = None
    tracking_uri: str | None = None
    window_seconds: float = 600.0
    interval_seconds: float = 60.0
    window_samples: int = DEFAULT_WINDOW_SAMPLES
    min_samples: int = DEFAULT_MIN_SAMPLES
    alpha: float = DEFAULT_ALPHA
    components: int = DEFAULT_COMPONENTS
    reference_samples: int = REFERENCE_SAMPLES
    data_path: Path | None = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    experiment: str = "mnist-drift"
    log_reports: bool = True
    report_interval_seconds: float | None = None  # None: the window length (see drift/report.py)
    # The page's live previews (`ws_predict`) are half-drawn digits, sent stroke by stroke: in a window
    # they would look like drift to any test. What a person submits arrives through /predict.
    exclude_sources: tuple[str, ...] = DEFAULT_EXCLUDED_SOURCES
    host: str = "0.0.0.0"
    port: int = 9105

    def __post_init__(self) -> None:
        if self.window_samples < self.min_samples:
            raise ValueError(f"window samples ({self.window_samples}) below min samples ({self.min_samples})")
        if self.window_seconds <= 0 or self.interval_seconds <= 0:
            raise ValueError("window and interval must be positive numbers of seconds")

    @property
    def report_interval(self) -> float:
        return self.window_seconds if self.report_interval_seconds is None else self.report_interval_seconds

    @property
    def config(self) -> DriftConfig:
        return DriftConfig(alpha=self.alpha, min_samples=self.min_samples)


@dataclass(frozen=True)
class Evaluation:
    result: DriftResult
    model: ResolvedModel
    window: Features
    run_id: str | None
    window_start: datetime | None = None
    window_end: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.result.to_dict(),
            "model": self.model.label,
            "run_id": self.run_id,
            "window_start": self.window_start.isoformat() if self.window_start else None,
            "window_end": self.window_end.isoformat() if self.window_end else None,
        }


@dataclass
class _Loaded:
    model: ResolvedModel
    embedder: EmbeddingModel
    reference: Reference


class Detector:
    """The model and its reference, reloaded when the URI resolves to another version."""

    def __init__(self, settings: Settings, reports: ReportLogger | None = None) -> None:
        self.settings = settings
        self.reports = reports
        self._loaded: _Loaded | None = None
        self._store: PredictionStore | None = None

    def load(self) -> _Loaded:
        settings = self.settings
        resolved = resolve_model(
            settings.model, tracking_uri=settings.tracking_uri, cache_dir=settings.cache_dir
        )
        if self._loaded is not None and (self._loaded.model.label, self._loaded.model.path) == (
            resolved.label,
            resolved.path,
        ):
            return self._loaded
        started = time.monotonic()
        embedder = EmbeddingModel.from_path(resolved.path)
        features = reference_features(
            embedder,
            cache_dir=settings.cache_dir / "references",
            data_path=settings.data_path,
            samples=settings.reference_samples,
        )
        reference = Reference.fit(features, settings.components)
        log.info(
            "reference for %s: %d images, embedding %s (%d dims), %d components explain %.0f%% of its "
            "variance (%.1fs)",
            resolved.label,
            reference.samples,
            embedder.embedding_source,
            embedder.embedding_dim,
            reference.components,
            100 * float(reference.explained_variance.sum()),
            time.monotonic() - started,
        )
        self._loaded = _Loaded(resolved, embedder, reference)
        return self._loaded

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def _prediction_store(self) -> PredictionStore:
        if self._store is None:
            if not self.settings.prediction_log_url:
                raise ValueError(
                    "no prediction log: pass --prediction-log-url (or --images for one evaluation)"
                )
            from prediction_log import PredictionStore

            self._store = PredictionStore(self.settings.prediction_log_url)
        return self._store

    def evaluate_images(
        self,
        images: npt.NDArray[Any],
        *,
        window_start: datetime | None = None,
        window_end: datetime | None = None,
        force_report: bool = False,
    ) -> Evaluation:
        return self._evaluate(
            self.load(), images, window_start=window_start, window_end=window_end, force_report=force_report
        )

    def _evaluate(
        self,
        loaded: _Loaded,
        images: npt.NDArray[Any],
        *,
        window_start: datetime | None,
        window_end: datetime | None,
        force_report: bool,
    ) -> Evaluation:
        images = np.asarray(images)[-self.settings.window_samples :]
        window = loaded.embedder.features(images)
        result = evaluate(loaded.reference, window, self.settings.config)
        run_id = None
        if self.reports is not None and result.decided:
            try:
                run_id = self.reports.log(
                    result,
                    loaded.reference,
                    window,
                    model=loaded.model,
                    window_start=window_start,
                    window_end=window_end,
                    window_seconds=self.settings.window_seconds,
                    force=force_report,
                )
            except Exception as error:
                if force_report:
                    raise ReportError(f"logging the window's report to MLflow failed: {error}") from error
                # MLflow down must not hide a decision: the metrics (and the alert) still follow it.
                log.exception("logging the window's report to MLflow failed")
        return Evaluation(result, loaded.model, window, run_id, window_start, window_end)

    def logged_window(self, end: datetime) -> LoggedWindow:
        """The prediction log's rows the window ending at `end` judges."""
        start = end - timedelta(seconds=self.settings.window_seconds)
        return self._prediction_store().window(
            start, end, limit=self.settings.window_samples, exclude_sources=self.settings.exclude_sources
        )

    def evaluate_window(self, now: datetime | None = None, *, force_report: bool = False) -> Evaluation:
        # The reference first: readiness means "the reference is built", whether or not the prediction
        # log answers yet.
        loaded = self.load()
        end = now or datetime.now(UTC)
        start = end - timedelta(seconds=self.settings.window_seconds)
        logged = self.logged_window(end)
        return self._evaluate(
            loaded, logged.images, window_start=start, window_end=end, force_report=force_report
        )

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class _Handler(BaseHTTPRequestHandler):
    service: DriftService

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, status, kind = generate_latest(self.service.metrics.registry), 200, CONTENT_TYPE_LATEST
        elif path == "/healthz":
            body, status, kind = b"ok\n", 200, "text/plain"
        elif path == "/readyz":
            ready = self.service.ready.is_set()
            body = b"ready\n" if ready else b"building the reference\n"
            status, kind = (200 if ready else 503), "text/plain"
        else:
            body, status, kind = b"not found\n", 404, "text/plain"
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # A probe that gave up (a timeout while the reference was being built): nothing to answer.
            return

    def log_message(self, format: str, *args: Any) -> None:
        # Prometheus scrapes every few seconds; the access log would drown the evaluations.
        return


class DriftService:
    def __init__(self, settings: Settings, detector: Detector | None = None) -> None:
        self.settings = settings
        self.metrics = DriftMetrics()
        self.metrics.configure(settings.alpha, settings.min_samples)
        self.detector = detector or Detector(settings, ReportLogger.create(settings))
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        handler = type("Handler", (_Handler,), {"service": self})
        self.server = ThreadingHTTPServer((settings.host, settings.port), handler)
        self.server.daemon_threads = True
        self._server_thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def evaluate_once(self) -> Evaluation | None:
        try:
            evaluation = self.detector.evaluate_window()
        except Exception:
            log.exception("evaluation failed; retrying in %.0fs", self.settings.interval_seconds)
            self.metrics.record_error()
            if self.detector.loaded:
                self.ready.set()
            return None
        self.ready.set()
        self.metrics.record(evaluation.result)
        result = evaluation.result
        log.info(
            "window of %d samples against %s: %s (%s)%s",
            result.samples,
            evaluation.model.label,
            "DRIFT" if result.detected else ("no drift" if result.decided else "no decision"),
            result.reason,
            f"; report in MLflow run {evaluation.run_id}" if evaluation.run_id else "",
        )
        return evaluation

    def run(self) -> None:
        self._server_thread.start()
        log.info("metrics on http://%s:%d/metrics", self.settings.host, self.port)
        try:
            while not self.stop_event.is_set():
                started = time.monotonic()
                self.evaluate_once()
                elapsed = time.monotonic() - started
                self.stop_event.wait(max(0.0, self.settings.interval_seconds - elapsed))
        finally:
            self.server.shutdown()
            self.server.server_close()
            self.detector.close()
            log.info("stopped")

    def stop(self) -> None:
        self.stop_event.set()
