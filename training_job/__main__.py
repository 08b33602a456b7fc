"""`python -m training_job train ...`: the training Job's entrypoint."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from contract.constants import (
    EXIT_BAD_COMMAND,
    EXIT_BAD_DATA,
    EXIT_EXPORT_MISMATCH,
    EXIT_FEEDBACK_UNAVAILABLE,
    EXIT_TRACKING_UNAVAILABLE,
)
from contract.result import write_termination_message
from contract.train_command import parse_train_command
from training_job.distributed import WorkerConfigError, per_worker_batch_size, worker_context


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_train_command(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # TensorFlow's C++ start-up chatter would bury the per-epoch progress lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        # With --workers=N > 1: this pod's index and peers, from the Indexed Job's environment.
        worker = worker_context(command.spec.workers, os.environ)
        per_worker_batch_size(command.spec.hyperparameters.batch_size, worker.workers)
    except WorkerConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_COMMAND
    from training_job.data import DataError
    from training_job.export import ExportMismatchError
    from training_job.feedback import FeedbackUnavailableError
    from training_job.train import TrackingUnavailableError, train

    tracking_uri = command.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        print(
            "error: no MLflow tracking URI: set MLFLOW_TRACKING_URI or pass --tracking-uri", file=sys.stderr
        )
        return EXIT_TRACKING_UNAVAILABLE
    try:
        trained = train(command, tracking_uri, worker)
        if trained is None:
            # Not the chief: worker 0 logs, registers and hands back the one result.
            return 0
        result = trained
        if command.promote:
            from contract.promotion import apply_promotion

            result = apply_promotion(result, command.spec, tracking_uri)
    except TrackingUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_TRACKING_UNAVAILABLE
    except FeedbackUnavailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FEEDBACK_UNAVAILABLE
    except DataError as error:
        print(f"error: bad training data: {error}", file=sys.stderr)
        return EXIT_BAD_DATA
    except ExportMismatchError as error:
        print(f"error: ONNX export does not match Keras: {error}", file=sys.stderr)
        return EXIT_EXPORT_MISMATCH
    text = result.to_json()
    write_termination_message(result)
    if command.result_file is not None:
        command.result_file.write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
