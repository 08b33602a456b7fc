"""The training entrypoint against a real MLflow server: registry, artifacts, aliases, ONNX."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from contract.registry import alias_version, promote, rollback
from contract.result import TrainingResult
from contract.spec import CHAMPION_ALIAS, PREVIOUS_ALIAS
from local_mode.mlflow_server import MlflowServer
from local_mode.processes import free_port
from testing.training import run_training
from training_job.data import load_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


def test_version_is_registered_with_tags_and_artifacts(
    registered_model: TrainingResult, client: MlflowClient
) -> None:
    version = client.get_model_version(registered_model.registered_model, registered_model.model_version)
    assert version.run_id == registered_model.run_id
    assert version.tags["source_run_id"] == registered_model.run_id
    assert version.tags["architecture"] == "baseline"
    assert float(version.tags["test_accuracy"]) == pytest.approx(
        registered_model.metrics["test_accuracy"], abs=1e-5
    )
    assert version.tags["keras_model_uri"] == registered_model.keras_model_uri

    run = client.get_run(registered_model.run_id)
    assert run.data.params["architecture"] == "baseline"
    assert run.data.params["train_samples"] == "6000"
    assert len(run.data.params["data_digest"]) == 64
    assert 0.5 < run.data.metrics["test_accuracy"] <= 1.0
    history = client.get_metric_history(registered_model.run_id, "val_accuracy")
    assert [point.step for point in history] == [0]
    artifacts = {item.path for item in client.list_artifacts(registered_model.run_id)}
    expected = {"confusion_matrix.png", "training_curves.png", "model_summary.txt", "per_class_accuracy.json"}
    assert expected <= artifacts
    keras_files = {
        Path(item.path).name for item in client.list_artifacts(registered_model.run_id, "keras-model")
    }
    assert {"MLmodel", "input_example.json", "serving_input_example.json"} <= keras_files


def test_champion_alias_points_at_the_promoted_version(
    registered_model: TrainingResult, client: MlflowClient
) -> None:
    assert alias_version(client, registered_model.registered_model) == registered_model.model_version
    reason = client.get_model_version(registered_model.registered_model, registered_model.model_version).tags
    assert "no champion yet" in reason["promotion_reason"]


def test_onnx_model_agrees_with_keras(
    registered_model: TrainingResult, mnist_path: Path, mlflow_server: MlflowServer
) -> None:
    import mlflow
    import onnxruntime

    mlflow.set_tracking_uri(mlflow_server.url)

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{registered_model.registered_model}@champion"))
    session = onnxruntime.InferenceSession(str(local / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [item.name for item in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == ["batch", 28, 28, 1]
    images = load_dataset(mnist_path).test.images[:500]
    onnx_probabilities = session.run(["probabilities"], {"image": images})[0]
    keras_model = mlflow.keras.load_model(registered_model.keras_model_uri)
    keras_probabilities = keras_model.predict(images, verbose=0)
    assert np.max(np.abs(onnx_probabilities - keras_probabilities)) < 1e-4
    assert np.array_equal(onnx_probabilities.argmax(1), keras_probabilities.argmax(1))


def test_alias_moves_only_when_the_policy_says_so(
    registered_model: TrainingResult, mlflow_server: MlflowServer, mnist_path: Path, client: MlflowClient
) -> None:
    model = registered_model.registered_model
    # The gate's minimum is out of reach: the version is registered, the alias stays put.
    completed = run_training(
        mlflow_server.url,
        "--architecture=baseline",
        "--epochs=1",
        "--max-train-samples=1000",
        "--run-name=rejected",
        f"--data={mnist_path}",
        "--promote",
        "--min-accuracy=0.9999",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rejected = TrainingResult.from_json(completed.stdout.strip().splitlines()[-1])
    assert rejected.promoted is False
    assert "below the minimum" in (rejected.promotion_reason or "")
    assert int(rejected.model_version) > int(registered_model.model_version)
    assert alias_version(client, model) == registered_model.model_version

    # Promotion keeps the replaced version reachable; rollback restores it; both are idempotent.
    move = promote(client, model, rejected.model_version)
    assert move.replaced_version == registered_model.model_version
    assert alias_version(client, model, PREVIOUS_ALIAS) == registered_model.model_version
    assert promote(client, model, rejected.model_version).replaced_version == registered_model.model_version
    rollback(client, move)
    assert alias_version(client, model, CHAMPION_ALIAS) == registered_model.model_version
    assert client.get_model_version(model, rejected.model_version).tags["promoted"] == "rolled-back"


def test_unreachable_mlflow_fails_fast_with_a_clear_message(mnist_path: Path) -> None:
    started = time.monotonic()
    completed = run_training(f"http://127.0.0.1:{free_port()}", f"--data={mnist_path}", timeout=120)
    assert completed.returncode == 3
    assert "unreachable" in completed.stderr
    assert time.monotonic() - started < 60


def test_missing_or_malformed_data_fails_with_a_clear_message(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    completed = run_training(mlflow_server.url, f"--data={tmp_path / 'absent.npz'}", timeout=120)
    assert completed.returncode == 4
    assert "not found" in completed.stderr
    broken = tmp_path / "broken.npz"
    np.savez(broken, x_train=np.zeros((2, 5, 5)))
    completed = run_training(mlflow_server.url, f"--data={broken}", timeout=120)
    assert completed.returncode == 4
    assert "lacks arrays" in completed.stderr
