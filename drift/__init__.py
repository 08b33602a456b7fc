"""Input drift detection: a window of the inputs serving logged (prediction_log/) against a reference
sample of the training data, through the served model's eyes (its penultimate-layer embedding, its
predicted digits and its confidence), decided by statistical tests with a stated false-alarm rate.

- drift/features.py: the embedding, exposed from the version's ONNX model without changing it.
- drift/detect.py: the tests and the decision, `evaluate(reference, window) -> DriftResult`, pure.
- drift/reference.py: the reference sample, per model version, cached; resolving the model URI.
- drift/report.py: Evidently's HTML report of a window, logged to MLflow with the scores.
- drift/service.py, drift/__main__.py: `python -m drift` (the loop, with Prometheus metrics) and
  `python -m drift once` (one evaluation).

Runs from the training image (TensorFlow is not needed, but mlflow, scipy and Evidently are, and
serving stays lean without them). bench/drift.py measures the false-alarm rate and the power.
"""
