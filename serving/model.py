"""The ONNX Runtime session behind every prediction."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

log = logging.getLogger("serving.model")

NUM_CLASSES = 10
IMAGE_SIDE = 28
# Images in and probabilities out; every module that handles model arrays uses this one alias.
Float32Array = npt.NDArray[np.float32]


class ModelLoadError(Exception):
    """The artifact is not a model this service can serve. Permanent: registry versions are immutable
    and the cache is checksummed, so loading the same bytes again fails the same way."""


class OnnxClassifier:
    """Wraps one InferenceSession; input/output names and layout come from the model itself.

    The model's per-image input shape may be NHWC [28,28,1] (the training contract), NCHW [1,28,28] or
    flat [784]: callers always hand over [N,28,28] float32 in [0,1] and this class reshapes (a view).
    """

    def __init__(self, path: Path, *, intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn the CPU that other workers and the event loop need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"expected a model with one input, found {[i.name for i in inputs]}")
        model_input = inputs[0]
        if model_input.type != "tensor(float)":
            raise ModelLoadError(f"expected a float32 input, found {model_input.type}")
        image_dims = [d for d in model_input.shape[1:]]
        if (
            not all(isinstance(d, int) for d in image_dims)
            or math.prod(image_dims) != IMAGE_SIDE * IMAGE_SIDE
        ):
            raise ModelLoadError(f"input shape {model_input.shape} does not hold one 28x28 image per row")
        self.input_name: str = model_input.name
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in image_dims)
        self.output_name: str = outputs[0].name
        self._output_names = [self.output_name]
        self.outputs_are_logits = False
        probe = self._run(np.zeros((2, IMAGE_SIDE, IMAGE_SIDE), np.float32))
        if probe.shape != (2, NUM_CLASSES):
            raise ModelLoadError(f"expected output [N,{NUM_CLASSES}], got {list(probe.shape)}")
        # The contract says softmax probabilities; a logits model still serves correct probabilities.
        sums = probe.sum(axis=1)
        self.outputs_are_logits = bool((probe < 0).any() or not np.allclose(sums, 1.0, atol=1e-3))
        if self.outputs_are_logits:
            log.warning("model outputs are not probabilities; applying softmax")

    def _run(self, images: Float32Array) -> Float32Array:
        batch = images.reshape((images.shape[0], *self.input_shape))
        result: Float32Array = self.session.run(self._output_names, {self.input_name: batch})[0]
        return result

    def predict(self, images: Float32Array) -> Float32Array:
        """[N,28,28] float32 in [0,1] -> [N,10] probabilities."""
        probs = self._run(images)
        if self.outputs_are_logits:
            shifted = probs - probs.max(axis=1, keepdims=True)
            np.exp(shifted, out=shifted)
            shifted /= shifted.sum(axis=1, keepdims=True)
            probs = shifted
        return probs

    def warm_up(self, runs: int, max_batch: int) -> None:
        single = np.zeros((1, IMAGE_SIDE, IMAGE_SIDE), np.float32)
        for _ in range(runs):
            self.predict(single)
        if runs:
            self.predict(np.zeros((max_batch, IMAGE_SIDE, IMAGE_SIDE), np.float32))
