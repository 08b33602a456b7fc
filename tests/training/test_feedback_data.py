"""Labelled feedback joins the training split, and the MLflow run says what the version learned from.

The data half builds the splits with and without feedback from the bundled MNIST file; the entrypoint
half runs the real training entrypoint (as the Job does) with MNIST_FEEDBACK_DB_URL pointing at a real
prediction log, against a real MLflow server.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from contract.constants import EXIT_FEEDBACK_UNAVAILABLE, NON_RETRYABLE_EXIT_CODES
from contract.result import TrainingResult
from contract.retraining import FEEDBACK_DB_URL_ENV
from local_mode.mlflow_server import MlflowServer
from local_mode.processes import free_port
from prediction_log.store import PredictionStore, encode_batch
from testing.training import run_training
from training_job.data import DataError, Feedback, load_dataset
from training_job.feedback import FeedbackUnavailableError, load_feedback

FEEDBACK = 37
# The entrypoint test is about what the run records, not what it learns: as few MNIST examples as keep
# every split non-empty, so most of its time is the entrypoint's fixed cost (evaluation, export, logging).
MNIST_TRAIN = 200


def feedback_examples(mnist_path: Path, count: int = FEEDBACK) -> Feedback:
    """Inverted training digits: what a drifted client might send (never test digits)."""
    with np.load(mnist_path) as archive:
        images = 255 - archive["x_train"][:count]
        labels = archive["y_train"][:count].astype(np.int64)
    return Feedback(images.astype(np.uint8), labels)


def test_feedback_joins_the_training_split_only(mnist_path: Path) -> None:
    plain = load_dataset(mnist_path, max_train_samples=1000)
    feedback = feedback_examples(mnist_path)
    mixed = load_dataset(mnist_path, max_train_samples=1000, feedback=feedback)

    assert len(mixed.train) == len(plain.train) + FEEDBACK
    assert (mixed.mnist_train, mixed.feedback) == (1000, FEEDBACK)
    # Same preprocessing as MNIST: uint8 / 255, at the end of the training split.
    np.testing.assert_array_equal(mixed.train.images[-FEEDBACK:, :, :, 0], feedback.images / np.float32(255))
    np.testing.assert_array_equal(mixed.train.labels[-FEEDBACK:], feedback.labels)
    np.testing.assert_array_equal(mixed.train.images[:1000], plain.train.images)
    # Validation is carved from MNIST before the feedback is added; the test set is MNIST's own.
    np.testing.assert_array_equal(mixed.validation.images, plain.validation.images)
    np.testing.assert_array_equal(mixed.test.images, plain.test.images)
    np.testing.assert_array_equal(mixed.test.labels, plain.test.labels)
    assert mixed.digest == plain.digest  # the MNIST file's digest
    assert mixed.train_digest != plain.train_digest  # what was trained on

    composition = mixed.composition()
    expected = np.bincount(np.concatenate([plain.train.labels, feedback.labels]), minlength=10)
    assert [composition[f"label_{d}"] for d in range(10)] == expected.tolist()
    assert (
        load_dataset(mnist_path, max_train_samples=1000, feedback=feedback).train_digest == mixed.train_digest
    )


def test_bad_feedback_is_refused(mnist_path: Path) -> None:
    feedback = feedback_examples(mnist_path, 3)
    with pytest.raises(DataError, match="labels outside 0-9"):
        load_dataset(
            mnist_path, max_train_samples=100, feedback=Feedback(feedback.images, np.array([1, 2, 12]))
        )
    with pytest.raises(DataError, match="expected uint8"):
        load_dataset(
            mnist_path,
            max_train_samples=100,
            feedback=Feedback(feedback.images.astype(np.float32), feedback.labels),
        )


@pytest.mark.slow
def test_the_entrypoint_trains_on_the_feedback_and_logs_it(
    mlflow_server: MlflowServer, mnist_path: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    store = PredictionStore(url)
    store.create_schema()
    feedback = feedback_examples(mnist_path)
    ids = [f"fb-{i:03d}" for i in range(FEEDBACK)]
    store.insert_many(
        encode_batch(
            ids,
            created_at=datetime.datetime.now(datetime.UTC),
            model_name="mnist-cnn",
            model_version="1",
            source="predict",
            images=feedback.images.astype(np.float32) / 255.0,
            probabilities=np.full((FEEDBACK, 10), 0.1, np.float32),
        )
    )
    for request_id, label in zip(ids, feedback.labels, strict=True):
        store.add_feedback(request_id, int(label))
    # One logged prediction without a label: not training data.
    store.insert_many(
        encode_batch(
            ["unlabelled"],
            created_at=datetime.datetime.now(datetime.UTC),
            model_name="mnist-cnn",
            model_version="1",
            source="predict",
            images=np.zeros((1, 28, 28), np.float32),
            probabilities=np.full((1, 10), 0.1, np.float32),
        )
    )
    store.close()

    completed = run_training(
        mlflow_server.url,
        "--architecture=baseline",
        "--epochs=1",
        "--batch-size=32",
        f"--max-train-samples={MNIST_TRAIN}",
        "--registered-model=feedback-model",
        "--run-name=with-feedback",
        f"--data={mnist_path}",
        env={FEEDBACK_DB_URL_ENV: url},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = TrainingResult.from_json(completed.stdout.strip().splitlines()[-1])
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["feedback_samples"] == str(FEEDBACK)
    assert params["mnist_train_samples"] == str(MNIST_TRAIN)
    assert params["train_samples"] == str(MNIST_TRAIN + FEEDBACK)
    assert params["test_samples"] == "10000"
    assert url in params["feedback_source"]
    expected = load_dataset(mnist_path, max_train_samples=MNIST_TRAIN, feedback=feedback)
    assert params["train_digest"] == tags["train_digest"] == expected.train_digest
    assert (
        json.loads(params["train_label_counts"]) == np.bincount(expected.train.labels, minlength=10).tolist()
    )
    version = client.get_model_version("feedback-model", result.model_version)
    assert version.tags["feedback_samples"] == str(FEEDBACK)
    assert version.tags["train_digest"] == expected.train_digest

    assert run.inputs is not None
    inputs = {item.dataset.name: item for item in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-train+feedback", "mnist-validation", "mnist-test"}
    contexts = {
        name: {tag.key: tag.value for tag in item.tags}.get("mlflow.data.context")
        for name, item in inputs.items()
    }
    assert contexts == {
        "mnist-train+feedback": "training",
        "mnist-validation": "validation",
        "mnist-test": "test",
    }
    profile = json.loads(str(inputs["mnist-train+feedback"].dataset.profile))
    assert profile["features_shape"][0] == MNIST_TRAIN + FEEDBACK, profile

    local = Path(client.download_artifacts(result.run_id, "dataset_composition.json", str(tmp_path)))
    composition = json.loads(local.read_text())
    assert composition["feedback"] == FEEDBACK and composition["mnist_train"] == MNIST_TRAIN
    assert composition["train_digest"] == expected.train_digest


def test_an_unreachable_prediction_log_is_retried_and_a_foreign_database_is_bad_data(
    mlflow_server: MlflowServer, mnist_path: Path, tmp_path: Path
) -> None:
    """A database that does not answer may answer the Job's next pod (exit 6, not in the
    podFailurePolicy's list); one that answers without a prediction log never will (exit 4)."""
    unreachable = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/predictions"
    with pytest.raises(FeedbackUnavailableError, match="unreachable"):
        load_feedback(unreachable)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).close()  # a database, but not a prediction log
    with pytest.raises(DataError, match="cannot read the feedback"):
        load_feedback(f"sqlite:///{foreign}")

    assert EXIT_FEEDBACK_UNAVAILABLE not in NON_RETRYABLE_EXIT_CODES
    completed = run_training(
        mlflow_server.url,
        "--architecture=baseline",
        "--epochs=1",
        f"--max-train-samples={MNIST_TRAIN}",
        "--registered-model=feedback-model",
        "--run-name=log-down",
        f"--data={mnist_path}",
        env={FEEDBACK_DB_URL_ENV: unreachable},
        timeout=300,
    )
    assert completed.returncode == EXIT_FEEDBACK_UNAVAILABLE, completed.stderr[-4000:]
    assert "unreachable" in completed.stderr and "postgres@127.0.0.1" in completed.stderr
