"""Command line of the training image: flags that mirror the TrainingRun spec.

`spec_to_args` is the inverse of `parse_args`, so the operator builds a Job's arguments from a spec
with the same code that the training process uses to read them back. TensorFlow-free.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from contract.constants import TF_CONFIG_ENV, WORKER_HOSTS_ENV, WORKER_INDEX_ENV
from contract.retraining import FEEDBACK_DB_URL_ENV
from contract.spec import (
    DEFAULT_EXPERIMENT,
    DEFAULT_REGISTERED_MODEL,
    Architecture,
    Hyperparameters,
    Optimizer,
    PromotionPolicySpec,
    TrainingRunSpec,
)

DATA_ENV = "MNIST_NPZ"
# Caps the training examples used: for smoke tests and the local fake kubelet, never for real runs.
MAX_TRAIN_SAMPLES_ENV = "TRAIN_MAX_SAMPLES"


@dataclass(frozen=True)
class TrainingRunRef:
    """Links an MLflow run back to the TrainingRun object that asked for it."""

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None


@dataclass(frozen=True)
class TrainOptions:
    """What one training run needs besides the tracking server: the Job's flags, the local runner's call."""

    spec: TrainingRunSpec
    run_name: str | None = None
    tags: Mapping[str, str] | None = None
    trainingrun: TrainingRunRef = field(default_factory=TrainingRunRef)
    data_path: Path | None = None
    max_train_samples: int | None = None
    # The prediction log whose labelled feedback is added to the training split (the Job's
    # MNIST_FEEDBACK_DB_URL); None trains on MNIST alone.
    feedback_db_url: str | None = None


@dataclass(frozen=True)
class TrainCommand(TrainOptions):
    """A parsed `train` command line: the run's options plus what the entrypoint does around it."""

    result_file: Path | None = None
    promote: bool = False
    tracking_uri: str | None = None


def spec_to_args(spec: TrainingRunSpec, run_name: str | None = None) -> list[str]:
    hyper = spec.hyperparameters
    args = [
        "train",
        f"--architecture={spec.architecture.value}",
        f"--learning-rate={hyper.learning_rate!r}",
        f"--batch-size={hyper.batch_size}",
        f"--epochs={hyper.epochs}",
        f"--optimizer={hyper.optimizer.value}",
        f"--seed={hyper.seed}",
        f"--validation-split={hyper.validation_split!r}",
        f"--lr-schedule={hyper.lr_schedule}",
        f"--experiment={spec.experiment}",
        f"--registered-model={spec.registered_model}",
    ]
    if hyper.augment:
        args.append("--augment")
    if spec.max_train_samples is not None:
        args.append(f"--max-train-samples={spec.max_train_samples}")
    if spec.workers != 1:
        args.append(f"--workers={spec.workers}")
    if run_name:
        args.append(f"--run-name={run_name}")
    return args


def _tag(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"tag {text!r} is not KEY=VALUE")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training_job", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model, log it to MLflow and register a version")
    defaults = Hyperparameters()
    train.add_argument("--architecture", choices=[a.value for a in Architecture], default="baseline")
    train.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--optimizer", choices=[o.value for o in Optimizer], default=defaults.optimizer.value)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--validation-split", type=float, default=defaults.validation_split)
    train.add_argument("--lr-schedule", choices=["constant", "cosine"], default=defaults.lr_schedule)
    train.add_argument("--augment", action="store_true", help="random shifts of up to two pixels")
    train.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    train.add_argument("--registered-model", default=DEFAULT_REGISTERED_MODEL)
    train.add_argument("--run-name")
    train.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--trainingrun-name")
    train.add_argument("--trainingrun-namespace")
    train.add_argument("--trainingrun-uid")
    train.add_argument("--data", type=Path, help=f"MNIST .npz in the Keras layout (env {DATA_ENV})")
    train.add_argument("--result-file", type=Path, help="also write the JSON result here")
    train.add_argument(
        "--max-train-samples", type=int, help=f"smoke tests only (env {MAX_TRAIN_SAMPLES_ENV})"
    )
    train.add_argument(
        "--workers",
        type=int,
        default=1,
        help=f"train data-parallel across N processes; each reads its index and peers from the env "
        f"({WORKER_INDEX_ENV}, {WORKER_HOSTS_ENV}) or {TF_CONFIG_ENV}; --batch-size is the global batch",
    )
    train.add_argument("--promote", action="store_true", help="apply the promotion gate here (no operator)")
    train.add_argument("--min-accuracy", type=float, default=0.0, help="with --promote: the gate's minimum")
    train.add_argument(
        "--max-quantization-loss",
        type=float,
        help="with --promote: the most test accuracy the int8 model may lose against the float model",
    )
    train.add_argument("--tracking-uri", help="MLflow tracking URI (env MLFLOW_TRACKING_URI)")
    return parser


def parse_train_command(argv: Sequence[str]) -> TrainCommand:
    """Parses and validates a `train` command line; errors exit with argparse's usage message."""
    parser = build_parser()
    namespace = parser.parse_args(list(argv))
    max_samples = namespace.max_train_samples
    if max_samples is None and os.environ.get(MAX_TRAIN_SAMPLES_ENV):
        max_samples = int(os.environ[MAX_TRAIN_SAMPLES_ENV])
    try:
        spec = TrainingRunSpec(
            architecture=Architecture(namespace.architecture),
            hyperparameters=Hyperparameters(
                learning_rate=namespace.learning_rate,
                batch_size=namespace.batch_size,
                epochs=namespace.epochs,
                optimizer=Optimizer(namespace.optimizer),
                seed=namespace.seed,
                validation_split=namespace.validation_split,
                lr_schedule=namespace.lr_schedule,
                augment=namespace.augment,
            ),
            experiment=namespace.experiment,
            registered_model=namespace.registered_model,
            promotion=PromotionPolicySpec(
                minimum=namespace.min_accuracy, max_quantization_loss=namespace.max_quantization_loss
            ),
            max_train_samples=namespace.max_train_samples,
            workers=namespace.workers,
        )
    except ValueError as error:
        parser.error(str(error))
    data_path = namespace.data or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    return TrainCommand(
        spec=spec,
        run_name=namespace.run_name,
        tags=dict(namespace.tag),
        trainingrun=TrainingRunRef(
            namespace.trainingrun_name, namespace.trainingrun_namespace, namespace.trainingrun_uid
        ),
        data_path=data_path,
        result_file=namespace.result_file,
        max_train_samples=max_samples,
        feedback_db_url=os.environ.get(FEEDBACK_DB_URL_ENV, "").strip() or None,
        promote=namespace.promote,
        tracking_uri=namespace.tracking_uri,
    )
