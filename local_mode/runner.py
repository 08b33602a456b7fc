"""Runs TrainingRun manifests in-process, in order, then applies the promotion gate.

The same path as a cluster, minus Kubernetes: `train` is what the Job runs, and `apply_promotion` is
the promotion path the operator takes once the Job has succeeded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from contract.constants import TRAININGRUN_NAME_TAG, TRAININGRUN_SOURCE_TAG
from contract.promotion import apply_promotion
from contract.result import TrainingResult
from contract.retraining import FEEDBACK_DB_URL_ENV
from contract.spec import TrainingRunManifest, TrainingRunSpec, load_manifests
from contract.train_command import TrainOptions

log = logging.getLogger("local_mode.runner")


@dataclass(frozen=True)
class RunOutcome:
    name: str
    spec: TrainingRunSpec
    result: TrainingResult


def load_manifest_files(paths: Sequence[Path]) -> list[TrainingRunManifest]:
    manifests: list[TrainingRunManifest] = []
    for path in paths:
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for file in files:
            manifests.extend(load_manifests(file.read_text()))
    return manifests


def run_manifests(
    manifests: Sequence[TrainingRunManifest],
    tracking_uri: str,
    data_path: Path | None = None,
    max_train_samples: int | None = None,
    epochs_override: int | None = None,
    *,
    feedback_db_url: str | None = None,
) -> list[RunOutcome]:
    """`feedback_db_url` (default: $MNIST_FEEDBACK_DB_URL) is the prediction log whose labelled
    feedback the manifests with includeFeedback add to their training split, as the operator's Job does."""
    from training_job.train import train

    feedback_db_url = feedback_db_url or os.environ.get(FEEDBACK_DB_URL_ENV) or None

    outcomes: list[RunOutcome] = []
    for manifest in manifests:
        spec = manifest.spec
        if epochs_override is not None:
            spec = spec.model_copy(
                update={
                    "hyperparameters": spec.hyperparameters.model_copy(update={"epochs": epochs_override})
                }
            )
        log.info("training %s (%s)", manifest.name, spec.architecture.value)
        options = TrainOptions(
            spec=spec,
            run_name=manifest.name,
            tags={TRAININGRUN_NAME_TAG: manifest.name, TRAININGRUN_SOURCE_TAG: "local-runner"},
            data_path=data_path,
            max_train_samples=max_train_samples,
            feedback_db_url=feedback_db_url if spec.include_feedback else None,
        )
        result = apply_promotion(train(options, tracking_uri), spec, tracking_uri)
        outcomes.append(RunOutcome(manifest.name, spec, result))
    return outcomes
