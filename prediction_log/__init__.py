"""The prediction log: every prediction serving answered (or a sample of them), the model input it
answered for, and the labels people sent back (`POST /feedback`).

Written by serving (serving/prediction_log.py, in batches off the request path), read by the drift
job (a window of recent inputs against the training reference) and by the training Job and the
operator's RetrainingPolicy (the labelled examples). One table, through SQLAlchemy Core: SQLite for the
local demo, PostgreSQL in the cluster. Importing this package costs numpy and SQLAlchemy, nothing of
serving or training, so all three images install it.
"""

from prediction_log.store import (
    IMAGE_SIDE,
    NUM_CLASSES,
    REQUEST_ID_MAX,
    FeedbackResult,
    LabelledSet,
    LoggedPrediction,
    LoggedWindow,
    PredictionRow,
    PredictionStore,
    decode_images,
    decode_probabilities,
    encode_batch,
    encode_images,
    encode_rows,
    is_unavailable,
    predictions,
)

__all__ = [
    "IMAGE_SIDE",
    "NUM_CLASSES",
    "REQUEST_ID_MAX",
    "FeedbackResult",
    "LabelledSet",
    "LoggedPrediction",
    "LoggedWindow",
    "PredictionRow",
    "PredictionStore",
    "decode_images",
    "decode_probabilities",
    "encode_batch",
    "encode_images",
    "encode_rows",
    "is_unavailable",
    "predictions",
]
