"""The data plane: the served model, shared by every adapter (the `/predict` routes, the Open Inference
Protocol over REST and gRPC, the WebSocket), as in KServe's and MLServer's model servers.

It owns the model's life cycle (resolve, fetch, load, warm up, report ready), runs the model on
decoded batches (concurrent requests' batches together, through `serving.batching`, when the adapters
use `infer_async`) and records the prediction metrics. It knows no protocol: `serving.codec` turns
request bodies into batches and results into response bodies, the adapters translate HTTP.

Progressive delivery: besides the pod's stable version it may hold a candidate version, which
`serving.routing` loads and applies from the registry's traffic document (`traffic`). Each request
is then routed to one of them (canary) or answered by stable while the candidate runs a copy after
the response (shadow); every `Inference` says which version answered. Without a traffic document the
per-request cost of all this is one None check. Each loaded version has its own batcher, so requests
are batched with others for the same version only.

Prediction listeners (`add_prediction_listener`, the prediction log's hook) get one
`PredictionEvent` per served prediction, synchronously; they must only enqueue.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
import numpy as np

from serving import context, metrics, tracing
from serving.batching import Batcher
from serving.errors import ModelNotReadyError, NotFoundError
from serving.model import IMAGE_SIDE, NUM_CLASSES, Float32Array, ModelLoadError, OnnxClassifier
from serving.model_store import CachedModel, ModelStore, RegistryError
from serving.settings import ModelRef, Settings

if TYPE_CHECKING:
    from serving.routing import Route

log = logging.getLogger("serving.dataplane")

_IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE
# Model calls of up to this many images (~0.3 ms) run on the event loop: handing one to a thread costs
# ~0.1 ms more, and the model is a small part of a request's time (HTTP and JSON dominate), so running
# it beside the loop gains less than that. Larger calls go to a thread to keep the loop responsive.
INLINE_MAX_IMAGES = 8
# A failing listener logs at most this often (it fails on every request); the counter counts them all.
_LISTENER_LOG_INTERVAL_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Batch:
    """Model input: [N,28,28] float32 in [0,1], and per image whether it was inverted to get there."""

    images: Float32Array
    inverted: list[bool]


@dataclass(frozen=True)
class Inference:
    probabilities: list[list[float]]  # N rows of 10
    digits: list[int]
    inverted: list[bool]
    version: str = ""  # the model version that answered


@dataclass(frozen=True, slots=True)
class PredictionEvent:
    """One served prediction request, as prediction listeners get it."""

    request_id: str  # serving.context request id; batch items get f"{request_id}-{i}" (i from 0)
    endpoint: str  # the metrics endpoint label of the request ("predict", "v2_infer", "ws_predict", ...)
    version: str  # the version that answered
    images: Float32Array  # [N,28,28] float32 in 0..1, what the model saw
    probabilities: Float32Array  # [N,10]


PredictionListener = Callable[[PredictionEvent], None]


class HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


class LoadedModel:
    """One model version ready to serve: its session, its batcher, its metric series and header."""

    __slots__ = ("batcher", "cached", "header", "metrics", "model", "version")

    def __init__(self, cached: CachedModel, model: OnnxClassifier, settings: Settings) -> None:
        self.cached = cached
        self.model = model
        self.version = cached.info.version
        self.metrics = metrics.VersionMetrics(self.version)
        self.header = {"x-model-version": self.version}
        self.batcher: Batcher | None = None
        if settings.batching_enabled:
            self.batcher = Batcher(
                model.predict,
                max_batch_size=settings.batching_max_batch_size,
                max_latency=settings.batching_max_latency_ms / 1000,
                inline_max_images=INLINE_MAX_IMAGES,
            )

    def run(self, images: Float32Array) -> Float32Array:
        """Blocking: one traced, counted model call, outside the batcher."""
        with tracing.inference(len(images)):
            probs = self.model.predict(images)
        metrics.observe_model_call(probs.shape[0])
        return probs

    async def run_async(self, images: Float32Array) -> Float32Array:
        """Through the batcher when batching is on; otherwise inline, or in a worker thread for a
        large batch."""
        if self.batcher is None:
            if len(images) <= INLINE_MAX_IMAGES:
                return self.run(images)
            return await anyio.to_thread.run_sync(self.run, images)
        # The span covers the wait in the queue too: both are this request's time in the model's hands.
        with tracing.inference(len(images)):
            return await self.batcher.submit(images)


def is_permanent(exc: Exception) -> bool:
    """A load failure that retrying cannot heal; see RegistryError and ModelLoadError."""
    return isinstance(exc, ModelLoadError) or (isinstance(exc, RegistryError) and not exc.retryable)


class DataPlane:
    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.ref = settings.model_ref
        self.name = settings.model_name
        self.store = store or ModelStore(
            settings.mlflow_tracking_uri,
            settings.model_cache_dir,
            settings.registry_timeout_seconds,
            precision=settings.model_precision,
        )
        self.stable: LoadedModel | None = None
        self.model: OnnxClassifier | None = None
        self.cached: CachedModel | None = None
        self.version: str | None = None
        self.last_error: str | None = None
        self.load_seconds: float | None = None
        self.started = time.monotonic()
        # The applied traffic document (serving.routing sets it); None: every request on stable.
        self.traffic: Route | None = None
        # Added to every HTTP response, so any response tells which model version produced it; a
        # prediction answered by a candidate names the candidate instead (its `LoadedModel.header`).
        self.response_headers: list[tuple[bytes, bytes]] = [
            (b"x-model-name", self.name.encode("latin-1", "replace"))
        ]
        # Set on the event loop once the stable model serves (what waits for it: serving.routing).
        self.loaded = asyncio.Event()
        self._listeners: list[PredictionListener] = []
        self._listener_logged = -_LISTENER_LOG_INTERVAL_SECONDS
        self._shadow_pending = 0
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    # --- life cycle --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.model is not None

    def open_version(self, ref: ModelRef) -> LoadedModel:
        """Blocking: resolve `ref`, fetch (or reuse) the artifact, open and warm the session."""
        cached = self.store.fetch(ref)
        model = OnnxClassifier(
            cached.onnx_path,
            intra_op_threads=self.settings.onnx_intra_op_threads,
            inter_op_threads=self.settings.onnx_inter_op_threads,
        )
        model.warm_up(self.settings.warmup_runs, self.settings.max_batch_size)
        return LoadedModel(cached, model, self.settings)

    def load(self) -> None:
        """Blocking: the stable model, from the configured URI."""
        start = time.perf_counter()
        loaded = self.open_version(self.ref)
        cached, model = loaded.cached, loaded.model
        self.load_seconds = time.perf_counter() - start
        self.stable = loaded
        self.cached, self.version, self.model, self.last_error = cached, loaded.version, model, None
        self.response_headers = [
            *self.response_headers,
            (b"x-model-version", cached.info.version.encode("ascii")),
        ]
        metrics.set_model(self.name, cached.info.version, cached.info.alias, str(self.ref), self.load_seconds)
        # Everything alive now (FastAPI, pydantic, mlflow, ONNX Runtime's bindings: ~1M objects) lives
        # as long as the process. Frozen, the cyclic collector stops rescanning it: a full collection
        # under load had measured 160 ms, every request in flight waiting on it (the p99 tail).
        gc.collect()
        gc.freeze()
        log.info(
            "model ready",
            extra={
                "model_name": cached.info.name,
                "model_version": cached.info.version,
                "model_alias": cached.info.alias,
                "from_cache": cached.from_cache,
                "load_seconds": round(self.load_seconds, 3),
                "onnx_input": model.input_name,
                "onnx_input_shape": list(model.input_shape),
            },
        )

    async def load_until_ready(self) -> None:
        """Transient failures (a registry down or answering 5xx, an alias not set yet) are retried with
        capped backoff: the pod stays live but not ready instead of crash-looping, and becomes ready by
        itself once they heal. A permanent one (no tracking URI, a pinned version that does not exist,
        a version that is not an ONNX model) would fail the same way forever: it is logged once and
        left as the readiness reason, and a fixed configuration comes with a new rollout anyway."""
        delay = 0.5
        while True:
            try:
                await anyio.to_thread.run_sync(self.load, abandon_on_cancel=True)
                self.loaded.set()
                return
            except (RegistryError, ModelLoadError, OSError) as exc:
                if is_permanent(exc):
                    self.last_error = f"{exc} (permanent: not retrying)"
                    log.error(
                        "model load failed permanently; not retrying: %s",
                        exc,
                        extra={"model_uri": str(self.ref)},
                    )
                    return
                self.last_error = str(exc)
                log.error(
                    "model load failed; retrying in %.1fs: %s", delay, exc, extra={"model_uri": str(self.ref)}
                )
            except Exception as exc:
                # Unforeseen (a registry answering something unexpected): log it whole, keep trying.
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception(
                    "model load failed; retrying in %.1fs", delay, extra={"model_uri": str(self.ref)}
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, self.settings.load_retry_max_seconds)

    def require_model(self) -> OnnxClassifier:
        model = self.model
        if model is None:
            # The reason (registry address, ...) is for operators, on /health; clients get the state.
            raise ModelNotReadyError(f"the model {self.ref} is not loaded yet; retry later")
        return model

    def require_stable(self) -> LoadedModel:
        stable = self.stable
        if stable is None:
            raise ModelNotReadyError(f"the model {self.ref} is not loaded yet; retry later")
        return stable

    @property
    def candidate(self) -> LoadedModel | None:
        traffic = self.traffic
        return traffic.candidate if traffic is not None else None

    @property
    def versions(self) -> list[str]:
        """The versions this server answers with now: stable, then the applied candidate."""
        versions = [self.version] if self.version is not None else []
        candidate = self.candidate
        if candidate is not None:
            versions.append(candidate.version)
        return versions

    def check_name(self, name: str, version: str | None = None) -> None:
        if name != self.name:
            raise NotFoundError(f"model {name!r} is not served here; this server serves {self.name!r}")
        if version is not None and self.version is not None and version != self.version:
            candidate = self.candidate
            if candidate is not None and version == candidate.version:
                return
            served = " and ".join(self.versions)
            raise NotFoundError(
                f"version {version!r} of {name!r} is not served here; the served version is {served}"
            )

    def answered_by(self, result: Inference) -> dict[str, str] | None:
        """Response headers naming a candidate that answered; None for stable, whose version the
        middleware adds to every response anyway."""
        if result.version == self.version:
            return None
        return {"x-model-version": result.version}

    def routing_key(self, connection: HasHeaders) -> str | None:
        """The request's routing key (an HTTP request's or a WebSocket's), looked up only while a
        traffic document is applied: otherwise not even the headers are parsed."""
        if self.traffic is None:
            return None
        return connection.headers.get(self.settings.routing_key_header)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    # --- prediction listeners ------------------------------------------------------------------------

    def add_prediction_listener(self, callback: PredictionListener) -> None:
        """`callback` gets every served prediction (not shadow runs), synchronously, after the model
        answered and before the response is sent: it must only enqueue. Its exceptions are logged and
        counted (mnist_prediction_listener_errors_total), never raised into the request."""
        self._listeners.append(callback)

    def _emit(self, event: PredictionEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                metrics.listener_errors.inc()
                now = time.monotonic()
                if now - self._listener_logged >= _LISTENER_LOG_INTERVAL_SECONDS:
                    self._listener_logged = now
                    log.exception(
                        "a prediction listener failed (logged at most once a minute; all are counted)",
                        extra={"listener": getattr(listener, "__qualname__", repr(listener))},
                    )

    def record_explained(
        self, batch: Batch, probabilities: Float32Array, endpoint: str, request_id: str | None = None
    ) -> None:
        """An explanation's prediction (always stable's, see `serving.rest.explain`), for listeners."""
        if self._listeners and self.version is not None:
            request_id = request_id or context.current_request_id() or uuid.uuid4().hex
            self._emit(PredictionEvent(request_id, endpoint, self.version, batch.images, probabilities))

    # --- inference -----------------------------------------------------------------------------------

    def run_model(self, images: Float32Array) -> Float32Array:
        """Blocking: one traced, counted call of the stable model on `images`, outside the batcher;
        predictions are recorded by the caller (`/explain`, whose occluded copies are not predictions)."""
        return self.require_stable().run(images)

    def choose(self, key: str | None = None, version: str | None = None) -> tuple[LoadedModel, Route | None]:
        """The model that answers a request, and the applied route when a candidate must also run a
        shadow copy of it. `key`: the request's routing key (stable hash); `version`: a version the
        client asked for by name (the Open Inference Protocol's versioned paths)."""
        served = self.require_stable()
        route = self.traffic
        if route is None:
            return served, None
        if version is not None and version == route.candidate.version:
            return route.candidate, None
        if route.shadow is not None:
            return served, route
        if version is None and route.to_candidate(key):
            return route.candidate, None
        return served, None

    async def infer_async(
        self,
        batch: Batch,
        endpoint: str,
        start: float,
        *,
        key: str | None = None,
        version: str | None = None,
        request_id: str | None = None,
    ) -> Inference:
        """Runs the model chosen for this request (see `choose`) on a decoded batch, through the
        batcher when batching is on, so concurrent requests share model calls; records it under
        `endpoint` (the latency since `start`) and tells the listeners."""
        served, shadow = (
            self.choose(key, version) if self.traffic is not None else (self.require_stable(), None)
        )
        try:
            probs = await served.run_async(batch.images)
        except Exception:
            served.metrics.error.inc()
            raise
        result = self._finish(served, batch, probs, endpoint, start)
        if shadow is not None:
            self._shadow(shadow, batch.images, result.digits)
        if self._listeners:
            request_id = request_id or context.current_request_id() or uuid.uuid4().hex
            self._emit(PredictionEvent(request_id, endpoint, served.version, batch.images, probs))
        return result

    def _finish(
        self, served: LoadedModel, batch: Batch, probs: Float32Array, endpoint: str, start: float
    ) -> Inference:
        images = batch.images
        count = probs.shape[0]
        if count == 1:
            # Plain Python on 10 floats beats numpy's per-call overhead for the single-image case.
            row = probs[0].tolist()
            digit = max(range(NUM_CLASSES), key=row.__getitem__)
            rows, digits, confidences = [row], [digit], [row[digit]]
            means = [float(images.sum()) / _IMAGE_SIZE]
        else:
            digit_array = probs.argmax(axis=1)
            rows = probs.tolist()
            digits = digit_array.tolist()
            confidences = probs[np.arange(count), digit_array].tolist()
            means = images.reshape(count, -1).mean(axis=1).tolist()
        served.metrics.ok.inc()
        metrics.observe_predictions(
            served.metrics,
            endpoint,
            digits=digits,
            confidences=confidences,
            means=means,
            inverted=sum(batch.inverted),
            seconds=time.perf_counter() - start,
        )
        return Inference(rows, digits, batch.inverted, served.version)

    # --- shadow runs ---------------------------------------------------------------------------------

    def _shadow(self, route: Route, images: Float32Array, answered: list[int]) -> None:
        """Schedules the candidate's run on the images stable just answered. Not awaited by the
        request: the task starts once the handler yields, which is after its response is written.
        Bounded: past SERVING_SHADOW_MAX_IN_FLIGHT pending runs the copy is skipped (and counted),
        so a slow candidate cannot pile up work or memory behind live traffic."""
        if self._shadow_pending >= self.settings.shadow_max_in_flight:
            metrics.shadow_skipped.inc(len(answered))
            return
        self._shadow_pending += 1
        task = asyncio.get_running_loop().create_task(self._run_shadow(route, images, answered))
        # The loop keeps only weak references to tasks: this set keeps a pending run alive.
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _run_shadow(self, route: Route, images: Float32Array, answered: list[int]) -> None:
        shadow = route.shadow
        assert shadow is not None
        try:
            await asyncio.sleep(0)
            started = time.perf_counter()
            probs = await route.candidate.run_async(images)
            seconds = time.perf_counter() - started
            digits = probs.argmax(axis=1).tolist()
            agreed = sum(1 for mine, theirs in zip(digits, answered, strict=True) if mine == theirs)
            metrics.observe_shadow(shadow, agreed=agreed, disagreed=len(digits) - agreed, seconds=seconds)
        except Exception:
            shadow.error.inc(len(answered))
            log.exception("shadow run failed", extra={"model_version": route.candidate.version})
        finally:
            self._shadow_pending -= 1

    async def drain_shadows(self) -> None:
        """Waits for the pending shadow runs (at shutdown)."""
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)


__all__ = [
    "Batch",
    "DataPlane",
    "Inference",
    "LoadedModel",
    "PredictionEvent",
    "PredictionListener",
    "is_permanent",
]
