"""The TrainingRun operator: TrainingRun → Job → MLflow registry → promotion → serving rollout.

Run it with `python -m mnist_operator` (settings: MNIST_OPERATOR_* environment variables, see
`mnist_operator.config`). `handlers` is the thin kopf layer; `reconciler` the state machine; the
pure parts (`builders`, `status`, `jobs`, `rollouts`) are what the unit tests check without an API
server.
"""
