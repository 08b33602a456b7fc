"""One training run: data → model → MLflow run → registered ONNX version → TrainingResult.

This is the code path of the Kubernetes Job and of the local runner alike.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt

from contract.constants import TRAININGRUN_SOURCE_TAG, TRAININGRUN_TAGS
from contract.policy import INT8_ACCURACY_METRIC, QUANTIZATION_DELTA_METRIC
from contract.result import TrainingResult
from contract.spec import TrainingRunSpec
from contract.train_command import TrainOptions
from training_job.data import Dataset, Feedback, Split, load_dataset
from training_job.distributed import CHIEF_INDEX, WorkerContext, per_worker_batch_size

if TYPE_CHECKING:
    from training_job.export import ExportCheck, QuantizationReport

log = logging.getLogger("training_job")

KERAS_ARTIFACT_PATH = "keras-model"
# The int8 model is a run artifact beside the registered float model, `<this>/model.onnx`; the version's
# INT8_ARTIFACT_TAG names it (a runs:/ URI), so serving (serving/model_store.py) finds it from the
# version alone, and the version stays one: its float and int8 models are promoted together.
INT8_ARTIFACT_PATH = "onnx-int8"
INT8_ARTIFACT_TAG = "onnx_int8_artifact"
# What a version learned from (run and version tags): the training split's digest (MNIST's part and the
# prediction log's feedback together) and how many feedback examples it held.
TRAIN_DIGEST_TAG = "train_digest"
FEEDBACK_SAMPLES_TAG = "feedback_samples"
DATASET_COMPOSITION_ARTIFACT = "dataset_composition.json"


class TrackingUnavailableError(RuntimeError):
    """MLflow cannot be reached; the run cannot be recorded, so it must not start."""


def check_tracking_server(tracking_uri: str, timeout: float = 10.0) -> None:
    """Fails fast, with the address in the message, instead of MLflow's long retry loop."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
            raise TrackingUnavailableError(
                f"MLflow at {tracking_uri} answered /health with {response.status}"
            )
    except (urllib.error.URLError, OSError) as error:
        raise TrackingUnavailableError(
            f"MLflow tracking server at {tracking_uri} is unreachable: {error}"
        ) from error


def make_train_dataset(split: Split, batch_size: int, seed: int, augment: bool) -> Any:
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
    dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    if augment:
        # Shifts of up to two pixels: the digit stays whole, and the model learns position invariance.
        def shift(images: Any, labels: Any) -> tuple[Any, Any]:
            padded = tf.pad(images, [[0, 0], [2, 2], [2, 2], [0, 0]])
            return tf.image.random_crop(padded, tf.shape(images), seed=seed), labels

        dataset = dataset.map(shift, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _epoch_logger(epochs: int) -> Any:
    import keras
    import mlflow

    class EpochLogger(keras.callbacks.Callback):  # type: ignore[misc]
        """Per-epoch metrics to MLflow as they happen, so the operator can show progress mid-run."""

        def __init__(self) -> None:
            super().__init__()
            self.history: dict[str, list[float]] = {}
            self.started = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            metrics = {key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"}
            for key, value in metrics.items():
                self.history.setdefault(key, []).append(value)
            mlflow.log_metrics(metrics, step=epoch)
            mlflow.log_metric("epochs_completed", epoch + 1, step=epoch)
            log.info(
                "epoch %d/%d loss=%.4f accuracy=%.4f val_loss=%.4f val_accuracy=%.4f elapsed=%.1fs",
                epoch + 1,
                epochs,
                metrics.get("loss", float("nan")),
                metrics.get("accuracy", float("nan")),
                metrics.get("val_loss", float("nan")),
                metrics.get("val_accuracy", float("nan")),
                time.monotonic() - self.started,
            )

    return EpochLogger()


def sparse_cross_entropy_and_accuracy(
    probabilities: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> tuple[float, float]:
    """What `model.evaluate` reports, from predictions already made (Keras clips at 1e-7 too)."""
    picked = np.clip(probabilities[np.arange(labels.shape[0]), labels], 1e-7, 1.0)
    return float(-np.mean(np.log(picked))), float(np.mean(probabilities.argmax(axis=1) == labels))


def _confusion_matrix(
    labels: npt.NDArray[np.int64], predictions: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def _figures(history: Mapping[str, list[float]], matrix: npt.NDArray[np.int64]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # headless: pods and CI have no display
    import matplotlib.pyplot as plt

    curves, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "val_loss"):
        loss_axis.plot(range(1, len(history.get(key, [])) + 1), history.get(key, []), marker="o", label=key)
    for key in ("accuracy", "val_accuracy"):
        accuracy_axis.plot(
            range(1, len(history.get(key, [])) + 1), history.get(key, []), marker="o", label=key
        )
    for axis, title in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend()
    curves.tight_layout()

    confusion, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(matrix, cmap="Blues")
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_xticks(range(10))
    axis.set_yticks(range(10))
    for true in range(10):
        for predicted in range(10):
            value = int(matrix[true, predicted])
            color = "white" if value > matrix.max() / 2 else "black"
            axis.text(predicted, true, str(value), ha="center", va="center", fontsize=7, color=color)
    confusion.colorbar(image)
    axis.set_title("test confusion matrix")
    confusion.tight_layout()
    return curves, confusion


def _run_params(spec: TrainingRunSpec, dataset: Dataset, parameter_count: int) -> dict[str, Any]:
    hyper = spec.hyperparameters
    return {
        "architecture": spec.architecture.value,
        "learning_rate": hyper.learning_rate,
        "batch_size": hyper.batch_size,
        "epochs": hyper.epochs,
        "optimizer": hyper.optimizer.value,
        "seed": hyper.seed,
        "validation_split": hyper.validation_split,
        "lr_schedule": hyper.lr_schedule,
        "augment": hyper.augment,
        "registered_model": spec.registered_model,
        "train_samples": len(dataset.train),
        "validation_samples": len(dataset.validation),
        "test_samples": len(dataset.test),
        "data_digest": dataset.digest,
        "data_source": dataset.source,
        "parameter_count": parameter_count,
    }


def _log_evaluation(
    history: Mapping[str, list[float]], probabilities: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> dict[str, float]:
    """Logs the confusion matrix and curves as images and JSON; returns the per-digit accuracies."""
    import mlflow

    matrix = _confusion_matrix(labels, probabilities.argmax(axis=1).astype(np.int64))
    per_class = {
        f"test_accuracy_digit_{digit}": float(matrix[digit, digit] / max(1, matrix[digit].sum()))
        for digit in range(10)
    }
    curves, confusion = _figures(history, matrix)
    mlflow.log_figure(curves, "training_curves.png")
    mlflow.log_figure(confusion, "confusion_matrix.png")
    mlflow.log_dict({"labels": list(range(10)), "matrix": matrix.tolist()}, "confusion_matrix.json")
    mlflow.log_dict(per_class, "per_class_accuracy.json")
    return per_class


def _feedback(options: TrainOptions) -> Feedback | None:
    """The prediction log's labelled examples when the run was given one (MNIST_FEEDBACK_DB_URL)."""
    if not options.feedback_db_url:
        return None
    from training_job.feedback import load_feedback

    return load_feedback(options.feedback_db_url)


def _log_params_and_data(params: Mapping[str, Any], dataset: Dataset) -> None:
    """The run's params and what this version learned from: the training split's composition and
    digest as params and tags, a JSON artifact, and the three splits as MLflow dataset inputs (the
    Inputs of the run page)."""
    import mlflow
    from mlflow.data.numpy_dataset import from_numpy

    composition = dataset.composition()
    mlflow.log_params(
        {
            **params,
            "mnist_train_samples": dataset.mnist_train,
            "feedback_samples": dataset.feedback,
            "train_digest": dataset.train_digest,
            "train_label_counts": json.dumps([composition[f"label_{digit}"] for digit in range(10)]),
            **({"feedback_source": dataset.feedback_source} if dataset.feedback_source else {}),
        }
    )
    mlflow.set_tags({TRAIN_DIGEST_TAG: dataset.train_digest, FEEDBACK_SAMPLES_TAG: str(dataset.feedback)})
    mlflow.log_dict({**composition, "train_digest": dataset.train_digest}, DATASET_COMPOSITION_ARTIFACT)
    train_name = "mnist-train+feedback" if dataset.feedback else "mnist-train"
    for split, name, context in (
        (dataset.train, train_name, "training"),
        (dataset.validation, "mnist-validation", "validation"),
        (dataset.test, "mnist-test", "test"),
    ):
        # No source: MLflow resolves a string source as a URI it can load from, which a database URL is not.
        _log_input(mlflow, from_numpy(split.images, targets=split.labels, name=name), context)


def _log_input(mlflow: Any, dataset: Any, context: str) -> None:
    """`mlflow.log_input`, once more if the tracking server lost a race: its get-or-create of the dataset
    row is not atomic, so two runs of one experiment logging the same dataset at once can have the
    second insert refused (a UNIQUE constraint on experiment, name and digest, seen with concurrent
    TrainingRuns). The row exists by then, and the retry links this run to it; a second refusal is real."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        if "UNIQUE constraint" not in str(error) and "duplicate key" not in str(error):
            raise
        log.warning("logging dataset %s raced another run; retrying once: %s", dataset.name, error)
        time.sleep(0.5)
        mlflow.log_input(dataset, context=context)


def _model_summary(model: Any) -> str:
    buffer = io.StringIO()
    model.summary(print_fn=lambda line, **_: buffer.write(line + "\n"))
    return buffer.getvalue()


def _seed_everything(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def _compiled_model(spec: TrainingRunSpec, train_samples: int, strategy: Any) -> Any:
    """The spec's model, compiled; built under the strategy's scope when there is one."""
    import contextlib

    from training_job.models import build_model, build_optimizer

    hyper = spec.hyperparameters
    # The global batch sets the steps per epoch, whatever the number of workers.
    steps_per_epoch = -(-train_samples // hyper.batch_size)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        # Under a strategy, batch normalisation uses the global batch's statistics (see models.py).
        model = build_model(spec.architecture, synchronized_batch_norm=strategy is not None)
        model.compile(
            optimizer=build_optimizer(hyper, steps_per_epoch),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    if strategy is not None:
        from training_job.multiworker import prepare_model

        prepare_model(model, strategy)
    return model


def _fit(model: Any, spec: TrainingRunSpec, dataset: Dataset, callbacks: list[Any], strategy: Any) -> Any:
    """Trains; returns the model to evaluate and export. Under a strategy that is a plain copy of the
    trained weights, so the chief's predictions, export and logging run locally, with no collective
    op the other workers would have to join."""
    hyper = spec.hyperparameters
    train_data = make_train_dataset(dataset.train, hyper.batch_size, hyper.seed, hyper.augment)
    if strategy is not None:
        from training_job.multiworker import distribute_input_options

        train_data = distribute_input_options(train_data)
    model.fit(
        train_data,
        validation_data=(dataset.validation.images, dataset.validation.labels),
        epochs=hyper.epochs,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=0,
    )
    if strategy is None:
        return model
    from training_job.models import build_model

    # Every worker reads its weights (local reads of mirrored variables); the chief uses the copy. It is
    # compiled like the trained model so the logged Keras model carries the same compile config.
    weights = model.get_weights()
    local = build_model(spec.architecture)
    local.set_weights(weights)
    optimizer = type(model.optimizer).from_config(model.optimizer.get_config())
    local.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return local


def _strategy(worker: WorkerContext, global_batch: int, per_worker_batch: int) -> Any:
    """MultiWorkerMirroredStrategy for workers > 1, created before any other TensorFlow op; else None."""
    if not worker.distributed:
        return None
    from training_job.multiworker import create_strategy

    log.info(
        "worker %d of %d: global batch %d, %d per worker; cluster %s",
        worker.index, worker.workers, global_batch, per_worker_batch, worker.tf_config,
    )  # fmt: skip
    return create_strategy(worker)


def _train_replica(spec: TrainingRunSpec, dataset: Dataset, strategy: Any, worker: WorkerContext) -> None:
    """A non-chief worker: the chief's training step for step, and nothing written anywhere."""
    import keras

    model = _compiled_model(spec, len(dataset.train), strategy)
    _fit(model, spec, dataset, callbacks=[], strategy=strategy)
    log.info("worker %d finished training; worker 0 logs and registers the model", worker.index)
    keras.backend.clear_session()


def _run_tags(options: TrainOptions) -> dict[str, str]:
    return {
        "architecture": options.spec.architecture.value,
        **{
            key: value
            for key, value in zip(
                TRAININGRUN_TAGS,
                (options.trainingrun.name, options.trainingrun.namespace, options.trainingrun.uid),
                strict=True,
            )
            if value
        },
        **(options.tags or {}),
    }


@overload
def train(options: TrainOptions, tracking_uri: str) -> TrainingResult: ...
@overload
def train(options: TrainOptions, tracking_uri: str, worker: WorkerContext) -> TrainingResult | None: ...
def train(
    options: TrainOptions, tracking_uri: str, worker: WorkerContext | None = None
) -> TrainingResult | None:
    """Trains, evaluates, logs and registers. Raises on unreachable MLflow or bad data.

    `worker` places this process in a multi-worker training (`training_job.distributed`); None is a
    single process, as before multi-worker support, whatever `spec.workers` says (the batch rule makes
    N workers the same optimisation as one process taking the global batch). With N > 1 workers:

    - the model is built and compiled under `tf.distribute.MultiWorkerMirroredStrategy`;
    - `batchSize` is the GLOBAL batch: every step takes `batchSize` examples in all,
      `batchSize / N` on each worker (it must divide), and applies the mean gradient over all of them
      with the spec's learning rate, unchanged: the update one worker makes with the whole batch, so
      the accuracy matches. Steps per epoch, and so a cosine schedule, are those of one worker;
    - the training set is sharded by tf.data's DATA policy: every worker runs the same seeded shuffle
      and takes its share of each global batch (validation is sharded the same way);
    - only worker 0, the chief, talks to MLflow (run, params, metrics, artifacts, ONNX export,
      registration) and returns a result; the others train, write nothing anywhere and return None.
    """
    spec, hyper = options.spec, options.spec.hyperparameters
    worker = worker or WorkerContext(workers=1, index=CHIEF_INDEX, tf_config=None)
    # All three checks come before TensorFlow is imported, so a misconfigured Job fails in a second. Every
    # worker asks MLflow's /health (a read, not a log), so none waits for a chief that just failed.
    per_worker_batch = per_worker_batch_size(hyper.batch_size, worker.workers)
    check_tracking_server(tracking_uri)
    dataset: Dataset = load_dataset(
        options.data_path, hyper.validation_split, hyper.seed, options.max_train_samples, _feedback(options)
    )
    strategy = _strategy(worker, hyper.batch_size, per_worker_batch)

    import keras
    import mlflow
    from mlflow.models import infer_signature

    from training_job.export import check_against_keras, to_onnx

    log.info(
        "data %s: train=%d (mnist %d + feedback %d) validation=%d test=%d digest=%s train digest=%s",
        dataset.source, len(dataset.train), dataset.mnist_train, dataset.feedback, len(dataset.validation),
        len(dataset.test), dataset.digest[:12], dataset.train_digest[:12],
    )  # fmt: skip
    _seed_everything(hyper.seed)

    if not worker.is_chief:
        _train_replica(spec, dataset, strategy, worker)
        return None

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(spec.experiment)
    tags = _run_tags(options)
    # The experiment by id, not the fluent "active" one: when two runs create a new experiment at once,
    # set_experiment's loser returns it without making it active (MLflow 3.x), and its run would land
    # in the Default experiment (seen with the seed runs applied together).
    with mlflow.start_run(
        run_name=options.run_name, tags=tags, experiment_id=experiment.experiment_id
    ) as run:
        model = _compiled_model(spec, len(dataset.train), strategy)
        params = _run_params(spec, dataset, model.count_params())
        if worker.distributed:
            params |= {"workers": worker.workers, "per_worker_batch_size": per_worker_batch}
        _log_params_and_data(params, dataset)
        mlflow.log_text(_model_summary(model), "model_summary.txt")
        epoch_logger = _epoch_logger(hyper.epochs)
        started = time.monotonic()
        model = _fit(model, spec, dataset, callbacks=[epoch_logger], strategy=strategy)
        train_seconds = time.monotonic() - started

        log.info("trained %d epochs in %.1fs; evaluating on the test set", hyper.epochs, train_seconds)
        # One pass over the test set serves the metrics, the confusion matrix and the ONNX check.
        probabilities = model.predict(dataset.test.images, batch_size=1000, verbose=0)
        test_loss, test_accuracy = sparse_cross_entropy_and_accuracy(probabilities, dataset.test.labels)
        final_metrics = {
            "test_accuracy": test_accuracy,
            "test_loss": test_loss,
            "train_seconds": train_seconds,
            **_log_evaluation(epoch_logger.history, probabilities, dataset.test.labels),
        }
        mlflow.log_metrics(final_metrics)
        # Already in the per-epoch history; the result carries the last value for the operator.
        final_metrics["val_accuracy"] = epoch_logger.history.get("val_accuracy", [float("nan")])[-1]

        log.info("test_accuracy=%.4f; logging the Keras model", test_accuracy)
        example = dataset.test.images[:2]
        signature = infer_signature(example, probabilities[:2])
        keras_model_uri = _log_keras_model(model, signature, example)

        log.info("exporting to ONNX and checking it against Keras on the test set")
        proto = to_onnx(model)
        check = check_against_keras(proto, probabilities, dataset.test.images, dataset.test.labels)
        mlflow.log_metrics(
            {
                "onnx_max_abs_diff": check.max_abs_diff,
                "onnx_argmax_agreement": check.argmax_agreement,
                "onnx_test_accuracy": check.onnx_accuracy,
            }
        )
        quantization, int8_model_uri = _quantize_and_log(proto, check, dataset)
        onnx_info = mlflow.onnx.log_model(
            proto,
            name="onnx-model",
            signature=signature,
            input_example=example,
            registered_model_name=spec.registered_model,
            pip_requirements=_pinned("onnx", "onnxruntime"),
            onnx_execution_providers=["CPUExecutionProvider"],
        )
        version = str(onnx_info.registered_model_version)
        client = mlflow.MlflowClient()
        version_tags = {
            "architecture": spec.architecture.value,
            "test_accuracy": f"{test_accuracy:.6f}",
            "source_run_id": run.info.run_id,
            "keras_model_uri": keras_model_uri,
            "data_digest": dataset.digest,
            TRAIN_DIGEST_TAG: dataset.train_digest,
            FEEDBACK_SAMPLES_TAG: str(dataset.feedback),
            INT8_ARTIFACT_TAG: int8_model_uri,
            "int8_accuracy": f"{quantization.int8_accuracy:.6f}",
            QUANTIZATION_DELTA_METRIC: f"{quantization.accuracy_delta:.6f}",
            **{
                key: value
                for key, value in tags.items()
                if key in TRAININGRUN_TAGS or key == TRAININGRUN_SOURCE_TAG
            },
        }
        for key, value in version_tags.items():
            client.set_model_version_tag(spec.registered_model, version, key, value)
        keras.backend.clear_session()

    return TrainingResult(
        run_id=run.info.run_id,
        experiment_id=experiment.experiment_id,
        registered_model=spec.registered_model,
        model_version=version,
        architecture=spec.architecture.value,
        metrics={
            key: round(value, 6)
            for key, value in (final_metrics | quantization.metrics()).items()
            if key
            in {
                "test_accuracy",
                "test_loss",
                "train_seconds",
                "val_accuracy",
                INT8_ACCURACY_METRIC,
                QUANTIZATION_DELTA_METRIC,
            }
        },
        onnx_model_uri=onnx_info.model_uri,
        keras_model_uri=keras_model_uri,
    )


def _pinned(*distributions: str) -> list[str]:
    """Explicit requirements: MLflow's inference of them re-imports TensorFlow in a child process,
    which costs about a minute per logged model on two cores."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", *distributions)]


def _tensorflow_distribution() -> str:
    """tensorflow-cpu on x86-64, tensorflow elsewhere (requirements/training.txt picks per
    architecture; aarch64 has no tensorflow-cpu wheel): whichever this process has."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("tensorflow-cpu")
    except PackageNotFoundError:
        return "tensorflow"
    return "tensorflow-cpu"


def _quantize_and_log(proto: Any, check: ExportCheck, dataset: Dataset) -> tuple[QuantizationReport, str]:
    """Quantises the checked float ONNX model to int8, evaluates it on the test set and logs its
    metrics and the model as `INT8_ARTIFACT_PATH/model.onnx`; returns the report and that directory's
    URI."""
    import mlflow

    from training_job.export import CALIBRATION_SAMPLES, evaluate_int8, quantize_int8

    log.info("ONNX agrees (max |diff| %.1e); quantising it to int8", check.max_abs_diff)
    int8_model = quantize_int8(proto, dataset.train.images[:CALIBRATION_SAMPLES])
    report = evaluate_int8(proto, int8_model, check.onnx_accuracy, dataset.test.images, dataset.test.labels)
    mlflow.log_metrics(report.metrics())
    log.info(
        "int8: accuracy %.4f (%+.4f), %d bytes (float %d), %.3f ms per image (float %.3f)",
        report.int8_accuracy, report.accuracy_delta, report.int8_bytes, report.float_bytes,
        report.int8_latency_ms, report.float_latency_ms,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "model.onnx")
        with open(path, "wb") as handle:
            handle.write(int8_model)
        mlflow.log_artifact(path, artifact_path=INT8_ARTIFACT_PATH)
    run = mlflow.active_run()
    assert run is not None, "called inside mlflow.start_run()"
    return report, f"runs:/{run.info.run_id}/{INT8_ARTIFACT_PATH}"


def _log_keras_model(model: Any, signature: Any, example: npt.NDArray[np.float32]) -> str:
    """Logs the Keras-flavor model with its signature and input example; returns its URI.

    `mlflow.keras.log_model(input_example=...)` fails in `_save_example` with MLflow 3.17 (it writes
    the example before creating the model directory), so the model is saved into a directory made
    first and uploaded as run artifacts: the same MLmodel, loadable and servable from `runs:/`.
    """
    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, KERAS_ARTIFACT_PATH)
        os.makedirs(path)
        mlflow.keras.save_model(
            model,
            path,
            signature=signature,
            input_example=example,
            pip_requirements=_pinned("keras", _tensorflow_distribution()),
        )
        mlflow.log_artifacts(path, artifact_path=KERAS_ARTIFACT_PATH)
    run = mlflow.active_run()
    assert run is not None, "called inside mlflow.start_run()"
    return f"runs:/{run.info.run_id}/{KERAS_ARTIFACT_PATH}"
