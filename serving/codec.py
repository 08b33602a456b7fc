"""Codecs: client payloads to model input (a `Batch`: [N,28,28] float32 in [0,1]) and model output
(`Inference`) to response bodies, one section per protocol, as in KServe's and MLServer's servers.
The data plane runs batches and knows no protocol; the adapters call these around it.

- `/predict`: base64 images, raw image bytes or 28x28 pixel arrays, through the MNIST preprocessing
  (`serving.preprocess`); one prediction object per image.
- Open Inference Protocol (KServe v2): one model-ready tensor, only scaled, shaped [N,28,28],
  [N,28,28,1] or [N,784], FP32 in [0,1] or UINT8 in [0,255]; named output tensors back. Tensors
  travel as JSON `data` or, with the binary tensor data extension, as little-endian bytes after the
  JSON (`Inference-Header-Content-Length` gives its length; `binary_data_size` each tensor's share).

Validation errors raise `InvalidInputError` (422), `PayloadTooLargeError` (413) or, for binary
framing whose lengths do not add up, `BadRequestError` (400), with a message that names the problem.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic_core import to_json

from serving import preprocess
from serving.dataplane import Batch, Inference
from serving.errors import BadRequestError, InvalidInputError, PayloadTooLargeError
from serving.model import IMAGE_SIDE, NUM_CLASSES, Float32Array
from serving.schemas import Instance, V2InferenceRequest, V2Tensor
from serving.settings import Settings

DIGIT_OUTPUT = "predicted_digit"
_IMAGE_SIZE = IMAGE_SIDE * IMAGE_SIDE
_V2_SHAPES = ((IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE, 1), (_IMAGE_SIZE,))
# Binary tensor data is little-endian and row-major, as Triton and KServe write it.
_V2_INPUT_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
_V2_OUTPUT_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}
# The binary tensor data extension's header: the JSON part's length when tensor bytes follow it.
BINARY_HEADER = "Inference-Header-Content-Length"
_BYTE_COUNT = re.compile(r"[0-9]{1,15}")


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


def decode_v2_input(tensor: V2Tensor, input_name: str, limits: Limits, raw: bytes | None = None) -> Batch:
    """One request input: its JSON `data`, or `raw`, the bytes its `binary_data_size` covers (see
    `binary_inputs`); exactly one of them."""
    if raw is not None and tensor.data is not None:
        raise BadRequestError(f"input {tensor.name!r} has both 'data' and parameters.binary_data_size")
    contents = raw if raw is not None else tensor.data
    if contents is None:
        raise InvalidInputError(f"input {tensor.name!r} has no 'data' (nor parameters.binary_data_size)")
    return decode_v2_tensor(
        tensor.name, tensor.datatype, tensor.shape, contents, input_name=input_name, limits=limits
    )


def decode_v2_tensor(
    name: str,
    datatype: str,
    shape: Sequence[int],
    contents: Sequence[object] | bytes,
    *,
    input_name: str,
    limits: Limits,
) -> Batch:
    """A v2 tensor from plain values, whatever carried it: `contents` is the row-major values (a flat
    or nested list, or an array) or their little-endian bytes (the binary extension's and gRPC's raw
    form)."""
    if name != input_name:
        raise InvalidInputError(f"unknown input {name!r}; this model's input is {input_name!r}")
    dims = tuple(shape)
    if len(dims) < 2 or dims[1:] not in _V2_SHAPES:
        raise InvalidInputError(f"input shape {list(dims)} is not [N,28,28], [N,28,28,1] or [N,784]")
    count = dims[0]
    if count < 1:
        raise InvalidInputError("the batch dimension must be at least 1")
    if count > limits.max_batch:
        raise PayloadTooLargeError(f"batch of {count} images; the limit is {limits.max_batch}")
    if datatype not in _V2_INPUT_DTYPES:
        raise InvalidInputError(f"datatype {datatype} is not supported; send FP32 (0..1) or UINT8 (0..255)")
    if isinstance(contents, bytes | bytearray | memoryview):
        images = _raw_images(name, datatype, bytes(contents), dims)
    else:
        images = _tensor_images(datatype, contents, dims)
    # v2 clients send model-ready tensors: nothing to invert.
    return Batch(images, [False] * count)


def split_binary_body(body: bytes, header_lengths: Sequence[str]) -> tuple[bytes, bytes]:
    """A binary-extension body: (the JSON header, the tensor bytes after it). `header_lengths` are the
    request's Inference-Header-Content-Length values; none means the whole body is JSON."""
    if not header_lengths:
        return body, b""
    if len(header_lengths) > 1:
        raise BadRequestError(f"{BINARY_HEADER} is given {len(header_lengths)} times")
    text = header_lengths[0].strip()
    # int() alone would also take '+5', '1_000' and 40-digit numbers.
    if not _BYTE_COUNT.fullmatch(text):
        raise BadRequestError(f"{BINARY_HEADER} {text[:40]!r} is not a byte count")
    length = int(text)
    if length > len(body):
        raise BadRequestError(f"{BINARY_HEADER} is {length} but the body has only {len(body)} bytes")
    return body[:length], body[length:]


def binary_inputs(tensors: Sequence[V2Tensor], tail: bytes) -> list[bytes | None]:
    """Each input's share of the bytes after the JSON header, in input order (None: it sent JSON
    `data`). Every byte must belong to exactly one input."""
    parts: list[bytes | None] = []
    offset = 0
    for tensor in tensors:
        size = _binary_size(tensor)
        if size is None:
            parts.append(None)
            continue
        left = len(tail) - offset
        if size > left:
            raise BadRequestError(
                f"input {tensor.name!r}: binary_data_size is {size} but only {left} bytes of tensor data "
                f"follow the JSON header (its length goes in {BINARY_HEADER})"
            )
        parts.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise BadRequestError(
            f"{len(tail) - offset} bytes after the JSON header belong to no input's binary_data_size"
        )
    return parts


def requested_v2_outputs(request: V2InferenceRequest, output_name: str) -> list[tuple[str, bool]]:
    """(name, as binary) of each output to return: the requested ones, or all. An output's
    `binary_data` parameter overrides the request's `binary_data_output`, as in Triton and KServe."""
    default = _flag(request.parameters, "binary_data_output", False, "parameters")
    if not request.outputs:
        return [(output_name, default), (DIGIT_OUTPUT, default)]
    requested = []
    for output in request.outputs:
        if output.name not in (output_name, DIGIT_OUTPUT):
            raise InvalidInputError(
                f"unknown output {output.name!r}; outputs are {output_name!r} and {DIGIT_OUTPUT!r}"
            )
        where = f"outputs[{output.name!r}].parameters"
        if output.parameters and output.parameters.get("class_count"):
            raise InvalidInputError(f"{where}.class_count: the classification extension is not supported")
        requested.append((output.name, _flag(output.parameters, "binary_data", default, where)))
    return requested


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


def encode_v2_response(
    head: dict[str, Any], result: Inference, requested: list[tuple[str, bool]], output_name: str
) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when binary outputs follow it (the
    Inference-Header-Content-Length; None for a plain JSON body)."""
    outputs = encode_v2_outputs(result, [name for name, _ in requested], output_name)
    tails: list[bytes] = []
    for output, (_, binary) in zip(outputs, requested, strict=True):
        if binary:
            raw = np.asarray(output.pop("data"), dtype=_V2_OUTPUT_DTYPES[output["datatype"]]).tobytes()
            output["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
    header = to_json({**head, "outputs": outputs})
    if not tails:
        return header, None
    return b"".join([header, *tails]), len(header)


def _binary_size(tensor: V2Tensor) -> int | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return None
    # bool is an int subclass: `true` is no byte count.
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequestError(
            f"input {tensor.name!r}: parameters.binary_data_size must be a byte count, not {size!r}"
        )
    return size


def _flag(parameters: dict[str, Any] | None, key: str, default: bool, where: str) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise InvalidInputError(f"{where}.{key} must be true or false, not {value!r}")
    return value


def _raw_images(name: str, datatype: str, raw: bytes, shape: tuple[int, ...]) -> Float32Array:
    dtype = _V2_INPUT_DTYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise BadRequestError(
            f"input {name!r} has {len(raw)} bytes of binary data but {datatype} shape {list(shape)} "
            f"needs {expected}"
        )
    square = np.frombuffer(raw, dtype=dtype).reshape(shape[0], IMAGE_SIDE, IMAGE_SIDE)
    images: Float32Array = square.astype(np.float32)
    if datatype == "UINT8":
        return images * np.float32(1 / 255)
    return _unit_range(images)


def _tensor_images(datatype: str, data: Sequence[object], shape: tuple[int, ...]) -> Float32Array:
    """v2 tensor contents -> [N,28,28] float32 in [0,1]. One np.asarray over the (possibly nested)
    list; its dtype tells strings, booleans and nulls (not numbers) from numbers."""
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
    return _unit_range(square.astype(np.float32))


def _unit_range(images: Float32Array) -> Float32Array:
    if not bool(np.isfinite(images).all()):
        raise InvalidInputError("FP32 data contains NaN or infinity")
    if float(images.min()) < 0.0 or float(images.max()) > 1.0:
        raise InvalidInputError("FP32 data must be scaled to 0..1; send UINT8 for 0..255 pixels")
    return images
