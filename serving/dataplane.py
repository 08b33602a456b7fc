"""The data plane: one model, shared by every REST adapter (the `/predict` routes and the Open
Inference Protocol routes), as in KServe's and MLServer's model servers.

It owns the model's life cycle (resolve, fetch, load, warm up, report ready), turns validated
request objects into model input, runs the model and records the prediction metrics. Adapters only
translate HTTP to these calls and back.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import time
from dataclasses import dataclass

import anyio
import numpy as np
import numpy.typing as npt

from serving import metrics, preprocess
from serving.errors import InvalidInputError, ModelNotReadyError, NotFoundError, PayloadTooLargeError
from serving.model import IMAGE_SIDE, NUM_CLASSES, ModelLoadError, OnnxClassifier
from serving.model_store import CachedModel, ModelStore, RegistryError
from serving.schemas import Instance, V2Tensor
from serving.settings import Settings

log = logging.getLogger("serving.dataplane")

Float32Array = npt.NDArray[np.float32]
DIGIT_OUTPUT = "predicted_digit"
_IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE
_V2_SHAPES = ((IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE, 1), (_IMAGE_SIZE,))


@dataclass(frozen=True)
class Inference:
    probabilities: list[list[float]]  # N rows of 10
    digits: list[int]
    inverted: list[bool]


def _b64decode(text: str) -> bytes:
    if text.startswith("data:"):
        _, sep, text = text.partition(",")
        if not sep:
            raise InvalidInputError("the image data URL has no ',' before its base64 payload")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    # MIME encoders wrap lines; tolerate whitespace but nothing else outside the alphabet.
    compact = "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("'image' is not valid base64") from None


class DataPlane:
    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.ref = settings.model_ref
        self.name = settings.model_name
        self.store = store or ModelStore(
            settings.mlflow_tracking_uri, settings.model_cache_dir, settings.registry_timeout_seconds
        )
        self.model: OnnxClassifier | None = None
        self.cached: CachedModel | None = None
        self.version: str | None = None
        self.last_error: str | None = None
        self.load_seconds: float | None = None
        self.started = time.monotonic()
        self._max_batch = settings.max_batch_size
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
        model.warm_up(self.settings.warmup_runs, self._max_batch)
        self.load_seconds = time.perf_counter() - start
        self.cached, self.version, self.model, self.last_error = cached, cached.info.version, model, None
        self.response_headers = [
            *self.response_headers,
            (b"x-model-version", cached.info.version.encode("ascii")),
        ]
        metrics.set_model(self.name, cached.info.version, cached.info.alias, str(self.ref), self.load_seconds)
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
        """Retries forever with capped backoff: a missing alias or a down registry may heal, and until
        then the pod stays live but not ready instead of crash-looping."""
        delay = 0.5
        while True:
            try:
                await anyio.to_thread.run_sync(self.load, abandon_on_cancel=True)
                return
            except (RegistryError, ModelLoadError, OSError) as exc:
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

    def _run(self, endpoint: str, images: Float32Array, inverted: list[bool], start: float) -> Inference:
        probs = self.require_model().predict(images)
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
            inverted=sum(inverted),
            seconds=time.perf_counter() - start,
        )
        return Inference(rows, digits, inverted)

    def predict_pixels(self, pixels: list[list[float]], start: float) -> Inference:
        """The hot path: one validated 28x28 array, numpy only."""
        self.require_model()
        image, inverted = preprocess.from_pixels(np.asarray(pixels, dtype=np.float32))
        return self._run("predict", image[np.newaxis], [inverted], start)

    def predict_instances(self, instances: list[Instance], endpoint: str, start: float) -> Inference:
        self.require_model()
        if len(instances) > self._max_batch:
            raise PayloadTooLargeError(
                f"{len(instances)} instances in one request; the limit is {self._max_batch}"
            )
        images = np.empty((len(instances), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
        inverted: list[bool] = []
        budget = self.settings.max_request_pixels
        for i, instance in enumerate(instances):
            try:
                if instance.pixels is not None:
                    images[i], flag = preprocess.from_pixels(np.asarray(instance.pixels, dtype=np.float32))
                else:
                    assert instance.image is not None
                    images[i], flag, used = preprocess.from_image_bytes(
                        _b64decode(instance.image), max_pixels=self.settings.max_image_pixels, budget=budget
                    )
                    budget -= used
            except (InvalidInputError, PayloadTooLargeError) as exc:
                if len(instances) > 1:
                    exc.message = f"instances[{i}]: {exc.message}"
                raise
            inverted.append(flag)
        return self._run(endpoint, images, inverted, start)

    def predict_image_bytes(self, data: bytes, start: float) -> Inference:
        self.require_model()
        image, inverted, _ = preprocess.from_image_bytes(
            data, max_pixels=self.settings.max_image_pixels, budget=self.settings.max_request_pixels
        )
        return self._run("predict", image[np.newaxis], [inverted], start)

    def infer_tensor(self, tensor: V2Tensor, start: float) -> Inference:
        model = self.require_model()
        if tensor.name != model.input_name:
            raise InvalidInputError(
                f"unknown input {tensor.name!r}; this model's input is {model.input_name!r}"
            )
        shape = tuple(tensor.shape)
        if len(shape) < 2 or shape[1:] not in _V2_SHAPES:
            raise InvalidInputError(f"input shape {list(shape)} is not [N,28,28], [N,28,28,1] or [N,784]")
        count = shape[0]
        if count < 1:
            raise InvalidInputError("the batch dimension must be at least 1")
        if count > self._max_batch:
            raise PayloadTooLargeError(f"batch of {count} images; the limit is {self._max_batch}")
        images = _tensor_images(tensor.datatype, tensor.data, shape)
        return self._run("v2_infer", images, [False] * count, start)


def _tensor_images(datatype: str, data: list[object], shape: tuple[int, ...]) -> Float32Array:
    """v2 tensor contents -> [N,28,28] float32 in [0,1]. One np.asarray over the (possibly nested)
    list; its dtype tells strings, booleans and nulls (not numbers) from numbers."""
    if datatype not in ("FP32", "UINT8"):
        raise InvalidInputError(f"datatype {datatype} is not supported; send FP32 (0..1) or UINT8 (0..255)")
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):
        raise InvalidInputError("'data' is ragged: nested lists of different lengths") from None
    if array.dtype.kind not in "iuf":
        raise InvalidInputError("'data' must contain only numbers")
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidInputError(f"'data' has {array.size} values but shape {list(shape)} needs {expected}")
    square = array.reshape(shape[0], IMAGE_SIDE, IMAGE_SIDE)
    if datatype == "UINT8":
        if array.dtype.kind == "f":
            raise InvalidInputError("UINT8 data must be integers 0..255")
        if int(array.min()) < 0 or int(array.max()) > 255:
            raise InvalidInputError("UINT8 data must be within 0..255")
        return square.astype(np.float32) * np.float32(1 / 255)
    images = square.astype(np.float32)
    if not bool(np.isfinite(images).all()):
        raise InvalidInputError("FP32 data contains NaN or infinity")
    if float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise InvalidInputError("FP32 data must be scaled to 0..1; send UINT8 for 0..255 pixels")
    return images


__all__ = ["DIGIT_OUTPUT", "NUM_CLASSES", "DataPlane", "Inference"]
