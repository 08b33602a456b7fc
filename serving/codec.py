"""Codecs: client payloads to model input (a `Batch`: [N,28,28] float32 in [0,1]) and model output
(`Inference`) to response bodies, one section per protocol, as in KServe's and MLServer's servers.
The data plane runs batches and knows no protocol; the adapters call these around it.

- `/predict`: base64 images, raw image bytes or 28x28 pixel arrays, through the MNIST preprocessing
  (`serving.preprocess`); one prediction object per image.
- Open Inference Protocol (KServe v2): one model-ready tensor, only scaled, shaped [N,28,28],
  [N,28,28,1] or [N,784], FP32 in [0,1] or UINT8 in [0,255]; named output tensors back.

Validation errors raise `InvalidInputError` (422) or `PayloadTooLargeError` (413) with a message
that names the problem.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving import preprocess
from serving.dataplane import Batch, Inference
from serving.errors import InvalidInputError, PayloadTooLargeError
from serving.model import IMAGE_SIDE, NUM_CLASSES, Float32Array
from serving.schemas import Instance, V2Tensor
from serving.settings import Settings

DIGIT_OUTPUT = "predicted_digit"
_IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE
_V2_SHAPES = ((IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE, 1), (_IMAGE_SIZE,))


@dataclass(frozen=True, slots=True)
class Limits:
    max_batch: int
    max_image_pixels: int  # per decoded image
    max_request_pixels: int  # all images of one request

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_batch_size, settings.max_image_pixels, settings.max_request_pixels)


# --- /predict ------------------------------------------------------------------------------------------


def decode_pixels(pixels: list[list[float]]) -> Batch:
    """The hot path: one validated 28x28 array, numpy only."""
    image, inverted = preprocess.from_pixels(np.asarray(pixels, dtype=np.float32))
    return Batch(image[np.newaxis], [inverted])


def decode_image(data: bytes, limits: Limits) -> Batch:
    image, inverted, _ = preprocess.from_image_bytes(
        data, max_pixels=limits.max_image_pixels, budget=limits.max_request_pixels
    )
    return Batch(image[np.newaxis], [inverted])


def decode_instances(instances: list[Instance], limits: Limits) -> Batch:
    if len(instances) > limits.max_batch:
        raise PayloadTooLargeError(
            f"{len(instances)} instances in one request; the limit is {limits.max_batch}"
        )
    images = np.empty((len(instances), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    inverted: list[bool] = []
    budget = limits.max_request_pixels
    for i, instance in enumerate(instances):
        try:
            if instance.pixels is not None:
                images[i], flag = preprocess.from_pixels(np.asarray(instance.pixels, dtype=np.float32))
            else:
                assert instance.image is not None
                images[i], flag, used = preprocess.from_image_bytes(
                    _b64decode(instance.image), max_pixels=limits.max_image_pixels, budget=budget
                )
                budget -= used
        except (InvalidInputError, PayloadTooLargeError) as exc:
            if len(instances) > 1:
                exc.message = f"instances[{i}]: {exc.message}"
            raise
        inverted.append(flag)
    return Batch(images, inverted)


def encode_prediction(result: Inference, index: int) -> dict[str, Any]:
    digit = result.digits[index]
    probs = result.probabilities[index]
    return {
        "digit": digit,
        "confidence": probs[digit],
        "probabilities": probs,
        "inverted": result.inverted[index],
    }


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


# --- Open Inference Protocol (v2) ----------------------------------------------------------------------


def decode_v2_input(tensor: V2Tensor, input_name: str, limits: Limits) -> Batch:
    if tensor.name != input_name:
        raise InvalidInputError(f"unknown input {tensor.name!r}; this model's input is {input_name!r}")
    shape = tuple(tensor.shape)
    if len(shape) < 2 or shape[1:] not in _V2_SHAPES:
        raise InvalidInputError(f"input shape {list(shape)} is not [N,28,28], [N,28,28,1] or [N,784]")
    count = shape[0]
    if count < 1:
        raise InvalidInputError("the batch dimension must be at least 1")
    if count > limits.max_batch:
        raise PayloadTooLargeError(f"batch of {count} images; the limit is {limits.max_batch}")
    # v2 clients send model-ready tensors: nothing to invert.
    return Batch(_tensor_images(tensor.datatype, tensor.data, shape), [False] * count)


def encode_v2_outputs(
    result: Inference, requested: list[str] | None, output_name: str
) -> list[dict[str, Any]]:
    """The requested outputs (all of them by default): the model's probabilities and the digits."""
    count = len(result.digits)
    outputs: list[dict[str, Any]] = []
    for output in requested or [output_name, DIGIT_OUTPUT]:
        if output == output_name:
            outputs.append(
                {
                    "name": output,
                    "shape": [count, NUM_CLASSES],
                    "datatype": "FP32",
                    "data": [p for row in result.probabilities for p in row],
                }
            )
        elif output == DIGIT_OUTPUT:
            outputs.append({"name": output, "shape": [count], "datatype": "INT64", "data": result.digits})
        else:
            raise InvalidInputError(
                f"unknown output {output!r}; outputs are {output_name!r} and {DIGIT_OUTPUT!r}"
            )
    return outputs


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
