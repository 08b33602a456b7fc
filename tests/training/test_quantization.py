"""The int8 model training quantises from the float ONNX model: logged beside it, named by the version,
and measured on the whole test set. The session's `registered_model` (the real entrypoint, a small
CNN) is the model under test, so this costs no training of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from mlflow import MlflowClient

from contract.policy import INT8_ACCURACY_METRIC, QUANTIZATION_DELTA_METRIC
from contract.result import TrainingResult
from local_mode.mlflow_server import MlflowServer
from training_job.data import load_dataset
from training_job.train import INT8_ARTIFACT_PATH, INT8_ARTIFACT_TAG

pytestmark = pytest.mark.slow


def download(uri: str, tracking_uri: str, destination: Path) -> Path:
    import mlflow.artifacts

    local = Path(
        mlflow.artifacts.download_artifacts(uri, dst_path=str(destination), tracking_uri=tracking_uri)
    )
    return next(local.rglob("model.onnx"))


def test_the_int8_model_is_logged_registered_and_measured(
    registered_model: TrainingResult, mlflow_server: MlflowServer, mnist_path: Path, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    name, number = registered_model.registered_model, registered_model.model_version
    version = client.get_model_version(name, number)
    metrics = client.get_run(registered_model.run_id).data.metrics

    # Named by the version, as a run artifact of the run that trained it.
    int8_uri = version.tags[INT8_ARTIFACT_TAG]
    assert int8_uri == f"runs:/{registered_model.run_id}/{INT8_ARTIFACT_PATH}"
    int8_path = download(int8_uri, mlflow_server.url, tmp_path / "int8")
    float_path = download(
        client.get_model_version_download_uri(name, number), mlflow_server.url, tmp_path / "float"
    )

    # Statically quantised: int8 weights with QDQ pairs, and the float model's interface.
    proto = onnx.load(str(int8_path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in proto.graph.node}
    assert any(tensor.data_type == onnx.TensorProto.INT8 for tensor in proto.graph.initializer)
    session = onnxruntime.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("image", ["batch", 28, 28, 1], "tensor(float)")
    ]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]

    # Its logged accuracy is that of the artifact on the full test set, and the delta is against the
    # float ONNX model's.
    test = load_dataset(mnist_path).test
    probabilities = np.concatenate(
        [
            session.run(["probabilities"], {"image": test.images[i : i + 1000]})[0]
            for i in range(0, 10_000, 1000)
        ]
    )
    accuracy = float(np.mean(probabilities.argmax(axis=1) == test.labels))
    assert metrics[INT8_ACCURACY_METRIC] == pytest.approx(accuracy, abs=1e-9)
    assert metrics[QUANTIZATION_DELTA_METRIC] == pytest.approx(
        accuracy - metrics["onnx_test_accuracy"], abs=1e-9
    )
    # Calibrated ranges keep this model within a point; a broken calibration (ranges of zeros, or of
    # the wrong tensors) drops it to chance.
    assert abs(metrics[QUANTIZATION_DELTA_METRIC]) < 0.01, metrics
    assert float(version.tags["int8_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert float(version.tags[QUANTIZATION_DELTA_METRIC]) == pytest.approx(
        metrics[QUANTIZATION_DELTA_METRIC], abs=1e-6
    )
    assert registered_model.metrics[QUANTIZATION_DELTA_METRIC] == pytest.approx(
        metrics[QUANTIZATION_DELTA_METRIC], abs=1e-6
    )

    # Sizes are those of the two models (MLflow keeps the float one's weights in a file of their own,
    # and loading them back leaves a few bytes of bookkeeping); int8 weights are a quarter of float32's,
    # plus scales.
    assert metrics["int8_model_bytes"] == int8_path.stat().st_size
    float_bytes = len(onnx.load(str(float_path)).SerializeToString())
    assert metrics["onnx_model_bytes"] == pytest.approx(float_bytes, rel=1e-3)
    assert metrics["int8_model_bytes"] < 0.35 * metrics["onnx_model_bytes"]
    for key in ("onnx_latency_ms", "int8_latency_ms"):
        assert 0.0 < metrics[key] < 50.0, metrics
