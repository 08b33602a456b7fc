"""Literals that cross a process boundary: a registry tag one process writes and another reads, an
exit code the Job returns and the operator's Job spec interprets."""

from __future__ import annotations

from typing import Final

# Model-version tags: `promoted` records what the gate did ("true", or "rolled-back" when a rollout
# failed afterwards), `promotion_reason` the gate's sentence, so the MLflow UI explains the alias.
PROMOTED_TAG: Final = "promoted"
PROMOTED_TRUE: Final = "true"
PROMOTED_ROLLED_BACK: Final = "rolled-back"
PROMOTION_REASON_TAG: Final = "promotion_reason"

# Run tags tying an MLflow run to the TrainingRun that asked for it; the operator finds a run's
# progress by the uid tag, which survives a TrainingRun deleted and re-created under the same name.
TRAININGRUN_NAME_TAG: Final = "trainingrun.name"
TRAININGRUN_NAMESPACE_TAG: Final = "trainingrun.namespace"
TRAININGRUN_UID_TAG: Final = "trainingrun.uid"
TRAININGRUN_SOURCE_TAG: Final = "trainingrun.source"
TRAININGRUN_TAGS: Final = (TRAININGRUN_NAME_TAG, TRAININGRUN_NAMESPACE_TAG, TRAININGRUN_UID_TAG)

# The training entrypoint's exit codes. argparse's own 2 is a bad command line.
EXIT_BAD_COMMAND: Final = 2
EXIT_TRACKING_UNAVAILABLE: Final = 3
EXIT_BAD_DATA: Final = 4
EXIT_EXPORT_MISMATCH: Final = 5
EXIT_FEEDBACK_UNAVAILABLE: Final = 6  # the prediction log (includeFeedback) cannot be reached
# The Job's podFailurePolicy fails the Job at once on these instead of burning its backoffLimit:
# retrying cannot fix a bad command, bad data or an export mismatch. MLflow (3) or the prediction
# log (6) being down is retried.
NON_RETRYABLE_EXIT_CODES: Final = (EXIT_BAD_COMMAND, EXIT_BAD_DATA, EXIT_EXPORT_MISMATCH)

# Multi-worker training (spec.workers > 1): an Indexed Job of N pods behind a headless Service.
# Kubernetes sets the completion index on every pod of an Indexed Job; the operator sets the hosts
# list, the same in every pod: `<job>-<i>.<headless-service>:<WORKER_PORT>` for i in 0 … N-1, worker 0
# first. The training process derives TF_CONFIG from the two (training_job/distributed.py); a TF_CONFIG
# already set wins. Worker 0 is the chief: the only one that logs to MLflow and writes the result.
WORKER_INDEX_ENV: Final = "JOB_COMPLETION_INDEX"
WORKER_HOSTS_ENV: Final = "TRAINING_WORKER_HOSTS"
TF_CONFIG_ENV: Final = "TF_CONFIG"
# The port each worker's gRPC server listens on for the collective all-reduce (headless Service port).
WORKER_PORT: Final = 2222
WORKER_PORT_NAME: Final = "tf-worker"
# The most workers a TrainingRun may ask for (spec.workers, the CRD's maximum).
MAX_WORKERS: Final = 16
