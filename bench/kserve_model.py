"""The KServe peer of `make bench-serve`: KServe's Python ModelServer with a minimal custom
`kserve.Model` running the registered version's ONNX file on ONNX Runtime (the same bytes the
prediction service serves, with the same session options: one intra-op and one inter-op thread).

Runs in the KServe peer virtualenv (`testing.peers.peer_python("kserve")`), not the development one:

    BENCH_ONNX_PATH=.../model.onnx BENCH_MODEL_NAME=mnist-cnn python bench/kserve_model.py \
        --http_port 8080 --grpc_port 8081 --workers 1

Everything after the script name is KServe's own ModelServer flags. Open Inference Protocol v2 over
REST (`/v2/models/{name}/infer`) and gRPC (`inference.GRPCInferenceService`); the input is one FP32
tensor shaped [N,28,28,1] (or [N,784]), already scaled to 0..1; the output is the probabilities.
"""

from __future__ import annotations

import os
from typing import Any

import kserve  # type: ignore[import-not-found]
import numpy as np
import onnxruntime
from kserve.protocol.infer_type import (  # type: ignore[import-not-found]
    InferOutput,
    InferRequest,
    InferResponse,
)
from kserve.utils.utils import generate_uuid  # type: ignore[import-not-found]


class OnnxDigits(kserve.Model):  # type: ignore[misc]
    def __init__(self, name: str, onnx_path: str) -> None:
        super().__init__(name)
        self.onnx_path = onnx_path
        self.session: onnxruntime.InferenceSession | None = None
        self.input_name = ""
        self.load()

    def load(self) -> bool:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            self.onnx_path, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.ready = True
        return True

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> InferResponse:
        # Synchronous on purpose: a 28x28 image is a fraction of a millisecond of ONNX Runtime, less
        # than a hop to a thread pool would cost; KServe calls a plain `def predict` inline.
        assert self.session is not None
        images = np.asarray(payload.inputs[0].as_numpy(), dtype=np.float32).reshape(-1, 28, 28, 1)
        probabilities = self.session.run(None, {self.input_name: images})[0]
        output = InferOutput(name="probabilities", shape=list(probabilities.shape), datatype="FP32")
        output.set_data_from_numpy(probabilities, binary_data=False)
        return InferResponse(
            response_id=payload.id or generate_uuid(),
            model_name=self.name,
            infer_outputs=[output],
        )


def main() -> None:
    model = OnnxDigits(os.environ["BENCH_MODEL_NAME"], os.environ["BENCH_ONNX_PATH"])
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
