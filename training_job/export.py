"""Exact ONNX export of a trained Keras model, checked against Keras before anyone serves it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    # Imported lazily at run time: the entrypoint imports this module for its exception type, and a
    # failing Job should not pay for loading Keras first.
    import keras
    import onnx

ONNX_INPUT_NAME = "image"
ONNX_OUTPUT_NAME = "probabilities"
# Softmax outputs are compared in float32; anything beyond this is a conversion bug, not rounding.
MAX_ABS_DIFF = 1e-4
# The whole test set in one ONNX Runtime call holds every layer's activations for 10,000 images at
# once: 4.8 GB resident for `enhanced`, which the real node OOM-killed. Batches keep the check at
# the training's own footprint.
CHECK_BATCH_SIZE = 500


class ExportMismatchError(RuntimeError):
    """The ONNX model does not compute what the Keras model computes."""


@dataclass(frozen=True)
class ExportCheck:
    max_abs_diff: float
    argmax_agreement: float
    onnx_accuracy: float


def to_onnx(model: keras.Model) -> onnx.ModelProto:
    import onnx

    # Keras refuses to export a model that has never been called, which a freshly loaded one may not be.
    model(np.zeros((1, *model.input_shape[1:]), dtype=np.float32))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        model.export(str(path), format="onnx", verbose=False)
        proto = onnx.load(str(path))
    _rename_io(proto)
    onnx.checker.check_model(proto)
    return proto


def _rename_io(proto: onnx.ModelProto) -> None:
    """Stable tensor names and a named batch dimension, so clients need not guess 'Identity:0'."""
    graph = proto.graph
    renames = {graph.input[0].name: ONNX_INPUT_NAME, graph.output[0].name: ONNX_OUTPUT_NAME}
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    for value_info in (graph.input[0], graph.output[0]):
        value_info.name = renames[value_info.name]
        value_info.type.tensor_type.shape.dim[0].dim_param = "batch"


def check_against_keras(
    proto: onnx.ModelProto,
    keras_probabilities: npt.NDArray[np.float32],
    images: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
) -> ExportCheck:
    import onnxruntime

    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_probabilities = np.concatenate(
        [
            session.run([ONNX_OUTPUT_NAME], {ONNX_INPUT_NAME: images[start : start + CHECK_BATCH_SIZE]})[0]
            for start in range(0, len(images), CHECK_BATCH_SIZE)
        ]
    )
    max_abs_diff = float(np.max(np.abs(onnx_probabilities - keras_probabilities)))
    agreement = float(np.mean(onnx_probabilities.argmax(axis=1) == keras_probabilities.argmax(axis=1)))
    check = ExportCheck(max_abs_diff, agreement, float(np.mean(onnx_probabilities.argmax(axis=1) == labels)))
    if max_abs_diff > MAX_ABS_DIFF:
        raise ExportMismatchError(f"ONNX and Keras probabilities differ by up to {max_abs_diff:.2e}")
    return check
