"""The TrainingRun operator: TrainingRun → Job → MLflow registry → promotion → serving rollout.

Run it with `python -m mnist_operator` (settings: MNIST_OPERATOR_* environment variables, see
`mnist_operator.config`). The pure parts, `builders` and `status`, are what the tests check as
plain dicts; `handlers` is the thin kopf layer over them.
"""
