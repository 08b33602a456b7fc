"""The contract the training Job, the operator, serving and the local mode share.

TensorFlow-free and Kubernetes-free, so all three images install it: the TrainingRun spec, the Job's
command line and result, the promotion policy and the one promotion path, and the literals (tags,
aliases, exit codes) that would otherwise drift apart between processes that never import each other.
"""
