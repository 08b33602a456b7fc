"""Runs TrainingRun manifests in-process, in order, then applies the promotion gate.

The same path as a cluster, minus Kubernetes: `train` is what the Job runs, and `decide` plus
`promote` is what the operator does once the Job has succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from training_job.policy import decide
from training_job.registry import champion_metrics, promote
from training_job.result import TrainingResult
from training_job.spec import TrainingRunManifest, TrainingRunSpec, load_manifests

log = logging.getLogger("training_job.runner")


@dataclass(frozen=True)
class RunOutcome:
    name: str
    spec: TrainingRunSpec
    result: TrainingResult


def apply_promotion(result: TrainingResult, spec: TrainingRunSpec, tracking_uri: str) -> TrainingResult:
    """Judges a freshly registered version against the champion and moves the alias if it wins."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    champion = champion_metrics(client, result.registered_model)
    decision = decide(result.metrics, champion, spec.promotion)
    if decision.promote:
        promote(client, result.registered_model, result.model_version)
    client.set_model_version_tag(
        result.registered_model, result.model_version, "promotion_reason", decision.reason
    )
    log.info(
        "version %s: %s (%s)",
        result.model_version,
        "promoted" if decision.promote else "rejected",
        decision.reason,
    )
    return result.model_copy(update={"promoted": decision.promote, "promotion_reason": decision.reason})


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
) -> list[RunOutcome]:
    from training_job.train import TrainOptions, train

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
            tags={"trainingrun.name": manifest.name, "trainingrun.source": "local-runner"},
            data_path=data_path,
            max_train_samples=max_train_samples,
        )
        result = apply_promotion(train(options, tracking_uri), spec, tracking_uri)
        outcomes.append(RunOutcome(manifest.name, spec, result))
    return outcomes
