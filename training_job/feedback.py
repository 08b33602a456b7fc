"""The labelled feedback of the prediction log, as extra training examples.

The operator sets MNIST_FEEDBACK_DB_URL on a Job whose TrainingRun says includeFeedback (every run a
RetrainingPolicy creates). The examples are read with prediction_log's store: uint8 (N, 28, 28)
images, as the model saw them, and the labels people gave, in request-id order so the same feedback
always makes the same training split and digest. sqlalchemy and prediction_log load only when a URL
is set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from contract.retraining import FEEDBACK_DB_URL_ENV
from training_job.data import DataError, Feedback

log = logging.getLogger("training_job.feedback")


def feedback_url(environ: Mapping[str, str]) -> str | None:
    return environ.get(FEEDBACK_DB_URL_ENV, "").strip() or None


def display_url(url: str) -> str:
    """The URL without its password, for the run's params and the log."""
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


class FeedbackUnavailableError(RuntimeError):
    """The prediction log cannot be reached now; a later attempt (the Job's next pod) may succeed."""


def load_feedback(url: str) -> Feedback:
    """Every labelled example of the prediction log at `url`. A run that was asked to learn from
    feedback must not silently train without it: FeedbackUnavailableError when the database is
    unreachable (retried), DataError when it answers but is not a prediction log (not retried)."""
    from prediction_log import PredictionStore, is_unavailable

    store = PredictionStore(url)
    try:
        labelled = store.labelled()
    except Exception as error:  # any driver error, sorted into "later" and "never"
        where = display_url(url)
        if is_unavailable(error):
            message = f"the prediction log at {where} is unreachable: {error}"
            raise FeedbackUnavailableError(message) from error
        raise DataError(f"cannot read the feedback from {where}: {error}") from error
    finally:
        store.close()
    log.info("feedback: %d labelled examples from %s", len(labelled.request_ids), display_url(url))
    return Feedback(labelled.images, labelled.labels, source=display_url(url))
