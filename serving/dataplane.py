"""The data plane: one model, shared by every REST adapter (the `/predict` routes and the Open
Inference Protocol routes), as in KServe's and MLServer's model servers.

It owns the model's life cycle (resolve, fetch, load, warm up, report ready), runs the model on
decoded batches (concurrent requests' batches together, through `serving.batching`, when the adapters
use `infer_async`) and records the prediction metrics. It knows no protocol: `serving.codec` turns
request bodies into batches and results into response bodies, the adapters translate HTTP.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import anyio
import numpy as np

from serving import metrics, tracing
from serving.batching import Batcher
from serving.errors import ModelNotReadyError, NotFoundError
from serving.model import IMAGE_SIDE, NUM_CLASSES, Float32Array, ModelLoadError, OnnxClassifier
from serving.model_store import CachedModel, ModelStore, RegistryError
from serving.settings import Settings

log = logging.getLogger("serving.dataplane")

_IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE
# Model calls of up to this many images (~0.3 ms) run on the event loop: handing one to a thread costs
# ~0.1 ms more, and the model is a small part of a request's time (HTTP and JSON dominate), so running
# it beside the loop gains less than that. Larger calls go to a thread to keep the loop responsive.
INLINE_MAX_IMAGES = 8


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
        self.model: OnnxClassifier | None = None
        self.cached: CachedModel | None = None
        self.version: str | None = None
        self.last_error: str | None = None
        self.load_seconds: float | None = None
        self.started = time.monotonic()
        self.batcher: Batcher | None = None
        if settings.batching_enabled:
            self.batcher = Batcher(
                self._predict,
                max_batch_size=settings.batching_max_batch_size,
                max_latency=settings.batching_max_latency_ms / 1000,
                inline_max_images=INLINE_MAX_IMAGES,
            )
        # Added to every HTTP response, so any response tells which model version produced it.
        self.response_headers: list[tuple[bytes, bytes]] = [
            (b"x-model-name", self.name.encode("latin-1", "replace"))
        ]

    # --- life cycle --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Blocking: resolve the URI, fetch (or reuse) the artifact, open and warm the session."""
        start = time.perf_counter()
        cached = self.store.fetch(self.ref)
        model = OnnxClassifier(
            cached.onnx_path,
            intra_op_threads=self.settings.onnx_intra_op_threads,
            inter_op_threads=self.settings.onnx_inter_op_threads,
        )
        model.warm_up(self.settings.warmup_runs, self.settings.max_batch_size)
        self.load_seconds = time.perf_counter() - start
        self.cached, self.version, self.model, self.last_error = cached, cached.info.version, model, None
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

    def check_name(self, name: str, version: str | None = None) -> None:
        if name != self.name:
            raise NotFoundError(f"model {name!r} is not served here; this server serves {self.name!r}")
        if version is not None and self.version is not None and version != self.version:
            raise NotFoundError(
                f"version {version!r} of {name!r} is not served here; the served version is {self.version}"
            )

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    # --- inference -----------------------------------------------------------------------------------

    def infer(self, batch: Batch, endpoint: str, start: float) -> Inference:
        """Runs the model on a decoded batch now, in the calling thread, and records it under `endpoint`
        (the latency since `start`)."""
        return self._finish(batch, self.run_model(batch.images), endpoint, start)

    def run_model(self, images: Float32Array) -> Float32Array:
        """Blocking: one traced, counted model call on `images`, outside the batcher; predictions are
        recorded by the caller (`infer`, or `/explain`, whose occluded copies are not predictions)."""
        with tracing.inference(len(images)):
            probs = self.require_model().predict(images)
        metrics.observe_model_call(probs.shape[0])
        return probs

    async def infer_async(self, batch: Batch, endpoint: str, start: float) -> Inference:
        """`infer` for callers on the event loop: through the batcher when batching is on, so concurrent
        requests share model calls; otherwise inline, or in a worker thread for a large batch."""
        self.require_model()
        if self.batcher is None:
            if len(batch.images) <= INLINE_MAX_IMAGES:
                return self.infer(batch, endpoint, start)
            return await anyio.to_thread.run_sync(self.infer, batch, endpoint, start)
        # The span covers the wait in the queue too: both are this request's time in the model's hands.
        with tracing.inference(len(batch.images)):
            probs = await self.batcher.submit(batch.images)
        return self._finish(batch, probs, endpoint, start)

    def _predict(self, images: Float32Array) -> Float32Array:
        return self.require_model().predict(images)

    def _finish(self, batch: Batch, probs: Float32Array, endpoint: str, start: float) -> Inference:
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
        metrics.observe_predictions(
            endpoint,
            digits=digits,
            confidences=confidences,
            means=means,
            inverted=sum(batch.inverted),
            seconds=time.perf_counter() - start,
        )
        return Inference(rows, digits, batch.inverted)


__all__ = ["Batch", "DataPlane", "Inference", "is_permanent"]
