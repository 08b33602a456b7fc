"""What the drift tests compare: the served model's penultimate-layer embedding of each input, and its
probabilities (hence the predicted digit and its confidence).

The model contract stays as it is (one input, one output of ten probabilities): the drift job loads the
version's ONNX model and adds, in memory only, the input of the classification layer as a second graph
output. That tensor is found by walking back from the model's output through the ops that only
rescale or reshape it (Softmax, Identity, the bias Add, Reshape, ...) to the MatMul or Gemm that
multiplies by the class weights: its non-constant operand is what the classifier sees of an image. For
the `baseline` CNN it is the 5,408 flattened convolution features, for `enhanced` the 128-unit dense
layer, for `residual-bn` the 1,600 pooled features.

Why the embedding rather than pixels: it is the representation the decision is made on, so a shift
that moves it matters to the model, and one that does not (a pixel offset the convolutions absorb)
matters less; and it is an order of magnitude smaller than 784 pixels for the tests to work on after
PCA. The probabilities come from the same run, so one pass gives every feature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

IMAGE_SIDE = 28
NUM_CLASSES = 10
EMBEDDING_OUTPUT = "drift_embedding"
# Ops between the classification layer's product and the model output that do not mix images or
# features: walking back through them from the output reaches that product.
_PASS_THROUGH = {
    "Softmax", "Identity", "Add", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast",
    "Transpose", "LogSoftmax", "Sigmoid", "Relu",
}  # fmt: skip
_CLASSIFIER_OPS = {"MatMul", "Gemm"}
# Bounded batches keep the run's activations small (the training's export check does the same).
BATCH_SIZE = 500

Float32Array = npt.NDArray[np.float32]
UInt8Array = npt.NDArray[np.uint8]


class FeatureError(ValueError):
    """The model is not one whose embedding this module can find, or the images are not 28x28."""


@dataclass(frozen=True)
class Features:
    """Per-image features of a set of images, row i for image i."""

    embeddings: Float32Array  # [N, D], the classification layer's input
    probabilities: Float32Array  # [N, 10]

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.probabilities.shape != (self.embeddings.shape[0], NUM_CLASSES):
            raise FeatureError(
                f"embeddings [N,D] and probabilities [N,{NUM_CLASSES}] expected, got "
                f"{self.embeddings.shape} and {self.probabilities.shape}"
            )

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def predicted(self) -> npt.NDArray[np.int64]:
        return np.asarray(self.probabilities.argmax(axis=1), dtype=np.int64)

    @property
    def confidence(self) -> Float32Array:
        return np.asarray(self.probabilities.max(axis=1), dtype=np.float32)

    def subset(self, index: npt.NDArray[np.intp]) -> Features:
        return Features(self.embeddings[index], self.probabilities[index])

    @staticmethod
    def concatenate(parts: list[Features]) -> Features:
        return Features(
            np.concatenate([p.embeddings for p in parts]), np.concatenate([p.probabilities for p in parts])
        )


def to_model_input(images: npt.NDArray[Any]) -> Float32Array:
    """uint8 0-255 (as logged and as MNIST stores them) or floats in 0..1 -> [N,28,28] float32 in 0..1."""
    array = np.asarray(images)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise FeatureError(f"images of shape [N,28,28] expected, got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def embedding_tensor(model: Any) -> str:
    """The name of the tensor the classification layer multiplies by its weights.

    `model` is an onnx.ModelProto with one output (the probabilities)."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    producers = {out: node for node in graph.node for out in node.output}
    if len(graph.output) != 1:
        raise FeatureError(f"expected a model with one output, found {[o.name for o in graph.output]}")
    tensor = graph.output[0].name
    for _ in range(len(graph.node)):
        node = producers.get(tensor)
        if node is None:
            break
        variable = [name for name in node.input if name and name not in constants]
        if node.op_type in _CLASSIFIER_OPS:
            if len(variable) != 1:
                raise FeatureError(f"{node.op_type} {node.name!r} multiplies two computed tensors")
            return str(variable[0])
        if node.op_type not in _PASS_THROUGH or len(variable) != 1:
            break
        tensor = variable[0]
    raise FeatureError(
        "no MatMul/Gemm classification layer found behind the model output "
        f"(stopped at {tensor!r}); the drift job needs a dense final layer"
    )


def with_embedding_output(model: Any) -> tuple[Any, str]:
    """A copy of `model` that also outputs its embedding, as EMBEDDING_OUTPUT; and the tensor's
    original name. The original output stays first and unchanged."""
    import onnx

    found = embedding_tensor(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    identity = onnx.helper.make_node("Identity", [found], [EMBEDDING_OUTPUT], name="drift_embedding_out")
    copy.graph.node.append(identity)
    copy.graph.output.append(
        onnx.helper.make_tensor_value_info(EMBEDDING_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    return copy, found


class EmbeddingModel:
    """One ONNX model with its embedding exposed; `features(images)` runs it."""

    def __init__(self, proto: Any, *, threads: int = 1) -> None:
        """`proto`: an onnx.ModelProto with its weights loaded (no external data left to resolve)."""
        import onnxruntime as ort

        serialized = proto.SerializeToString()
        self.sha256 = hashlib.sha256(serialized).hexdigest()
        extended, self.embedding_source = with_embedding_output(proto)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            extended.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        model_input = self.session.get_inputs()[0]
        dims = list(model_input.shape[1:])
        if not all(isinstance(d, int) for d in dims) or int(np.prod(dims)) != IMAGE_SIDE * IMAGE_SIDE:
            raise FeatureError(f"input shape {model_input.shape} does not hold one 28x28 image per row")
        self.input_name: str = model_input.name
        self.input_shape = tuple(int(d) for d in dims)
        self.output_names = [self.session.get_outputs()[0].name, EMBEDDING_OUTPUT]
        self.embedding_dim = self._run(np.zeros((1, IMAGE_SIDE, IMAGE_SIDE), np.float32)).embeddings.shape[1]

    @classmethod
    def from_path(cls, path: Path, *, threads: int = 1) -> EmbeddingModel:
        """The model at `path`; weights that MLflow stored beside it as external data are read from
        its directory (a registered model's ONNX flavor keeps them in `<uuid>.data` files)."""
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=True)
        except Exception as error:  # onnx raises DecodeError and OSError subclasses of several kinds
            raise FeatureError(f"{path} is not a loadable ONNX model: {error}") from error
        return cls(proto, threads=threads)

    def features(self, images: npt.NDArray[Any]) -> Features:
        """Features of [N,28,28] images (uint8 0-255 or floats 0..1)."""
        inputs = to_model_input(images)
        if not len(inputs):
            return Features(
                np.zeros((0, self.embedding_dim), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
            )
        return Features.concatenate(
            [self._run(inputs[start : start + BATCH_SIZE]) for start in range(0, len(inputs), BATCH_SIZE)]
        )

    def _run(self, batch: Float32Array) -> Features:
        probabilities, embeddings = self.session.run(
            self.output_names, {self.input_name: batch.reshape((len(batch), *self.input_shape))}
        )
        return Features(
            np.asarray(embeddings, np.float32).reshape(len(batch), -1),
            _as_probabilities(np.asarray(probabilities, np.float32)),
        )


def _as_probabilities(outputs: Float32Array) -> Float32Array:
    # The contract says softmax probabilities; a model exporting logits still compares like for like.
    if (outputs >= 0).all() and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float32)
