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
from serving.schemas import V2Tensor

# The datatypes the codec accepts, with their wire form (raw contents are little-endian, row-major)
# and the `InferTensorContents` field that carries them otherwise.
_INPUT_DTYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "UINT8": (np.dtype("u1"), "uint_contents"),
}
_OUTPUT_DTYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
}


def decode_input(request: pb.ModelInferRequest, input_name: str, limits: codec.Limits) -> Batch:
    if len(request.inputs) != 1:
        raise InvalidInputError(f"{len(request.inputs)} input tensors; this model takes one, {input_name!r}")
    tensor = request.inputs[0]
    data = _input_data(tensor, request.raw_input_contents)
    # Already typed by protobuf: pydantic's validation of a JSON body has nothing left to check, the
    # codec checks name, shape, batch size, datatype and values.
    v2 = V2Tensor.model_construct(
        name=tensor.name, shape=list(tensor.shape), datatype=tensor.datatype, data=data
    )
    return codec.decode_v2_input(v2, input_name, limits)


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
    """The tensor's values as a flat array; empty for a datatype the codec refuses (it names it)."""
    if tensor.datatype not in _INPUT_DTYPES:
        return np.empty(0, dtype=np.float32)
    dtype, field = _INPUT_DTYPES[tensor.datatype]
    # Values, not field presence: an empty `contents` message carries nothing that could conflict.
    populated = [descriptor.name for descriptor, _ in tensor.contents.ListFields()]
    if raw:
        if len(raw) != 1:
            raise InvalidInputError(f"{len(raw)} raw_input_contents entries for one input tensor")
        if populated:
            raise InvalidInputError("the input has both contents and raw_input_contents; send one")
        data: bytes = raw[0]
        if len(data) % dtype.itemsize:
            raise InvalidInputError(
                f"raw_input_contents has {len(data)} bytes, not a whole number of {tensor.datatype} values"
            )
        return np.frombuffer(data, dtype=dtype)
    if populated and populated != [field]:
        raise InvalidInputError(
            f"{tensor.datatype} values go in contents.{field}, not {', '.join(populated)}"
        )
    # uint32 rather than uint8: values beyond 255 must reach the codec's range check, not wrap.
    return np.asarray(getattr(tensor.contents, field), dtype=np.uint32 if field == "uint_contents" else dtype)
