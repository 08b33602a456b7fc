"""Protobuf tensors of `ModelInferRequest`/`ModelInferResponse` to the codec's batches and back.

The checks and the messages are `serving.codec`'s Open Inference Protocol ones, so REST and gRPC
clients get the same answer to the same mistake: this module only turns protobuf contents (typed
`contents` fields or little-endian `raw_*_contents` bytes) into arrays and back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving import codec
from serving.dataplane import Batch, Inference
from serving.errors import InvalidInputError
from serving.grpc import inference_pb2 as pb

# The `InferTensorContents` field that carries each datatype the codec accepts as typed values (raw
# bytes go to the codec as they are: it owns their dtypes and size checks).
_INPUT_FIELDS: dict[str, str] = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
_OUTPUT_DTYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
}


def decode_input(request: pb.ModelInferRequest, input_name: str, limits: codec.Limits) -> Batch:
    if len(request.inputs) != 1:
        raise InvalidInputError(f"{len(request.inputs)} input tensors; this model takes one, {input_name!r}")
    tensor = request.inputs[0]
    return codec.decode_v2_tensor(
        tensor.name,
        tensor.datatype,
        list(tensor.shape),
        _input_data(tensor, request.raw_input_contents),
        input_name=input_name,
        limits=limits,
    )


def encode_outputs(
    result: Inference, request: pb.ModelInferRequest, output_name: str, response: pb.ModelInferResponse
) -> None:
    """Fills `response` with the requested outputs (all by default), as raw bytes when the request
    came as raw bytes (what Triton's clients send and expect back), else as typed contents."""
    requested = [output.name for output in request.outputs]
    raw = bool(request.raw_input_contents)
    for output in codec.encode_v2_outputs(result, requested, output_name):
        datatype: str = output["datatype"]
        tensor = response.outputs.add(name=output["name"], datatype=datatype, shape=output["shape"])
        dtype, field = _OUTPUT_DTYPES[datatype]
        if raw:
            response.raw_output_contents.append(np.asarray(output["data"], dtype=dtype).tobytes())
        else:
            getattr(tensor.contents, field).extend(output["data"])


def _input_data(tensor: pb.ModelInferRequest.InferInputTensor, raw: Any) -> Any:
    """The tensor's values: the raw little-endian bytes as they came (the codec checks their size, as
    for REST's binary extension), or the typed contents as a flat array; empty for a datatype the codec
    refuses (it names it)."""
    if tensor.datatype not in _INPUT_FIELDS:
        return np.empty(0, dtype=np.float32)
    field = _INPUT_FIELDS[tensor.datatype]
    # Values, not field presence: an empty `contents` message carries nothing that could conflict.
    populated = [descriptor.name for descriptor, _ in tensor.contents.ListFields()]
    if raw:
        if len(raw) != 1:
            raise InvalidInputError(f"{len(raw)} raw_input_contents entries for one input tensor")
        if populated:
            raise InvalidInputError("the input has both contents and raw_input_contents; send one")
        data: bytes = raw[0]
        return data
    if populated and populated != [field]:
        raise InvalidInputError(
            f"{tensor.datatype} values go in contents.{field}, not {', '.join(populated)}"
        )
    # uint32 rather than uint8: values beyond 255 must reach the codec's range check, not wrap.
    dtype = np.uint32 if field == "uint_contents" else np.float32
    return np.asarray(getattr(tensor.contents, field), dtype=dtype)
