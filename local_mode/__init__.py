"""The local mode: the whole pipeline on one machine with no cluster (`make demo`).

It starts a real MLflow server and the real prediction service as child processes and trains through the
same code the Kubernetes Job runs, so it ships with the repository, not inside any image.
"""
