"""The Kubernetes-facing contract of one worker of a multi-worker training: pure, TensorFlow-free.

A TrainingRun with `workers: N > 1` runs as an Indexed Job of N pods behind a headless Service (the
pattern JobSet and Kubeflow Trainer v2 build on). Each pod learns who it is from two variables:

- `JOB_COMPLETION_INDEX` (`contract.constants.WORKER_INDEX_ENV`), which Kubernetes sets on every pod of
  an Indexed Job: 0 … N-1;
- `TRAINING_WORKER_HOSTS` (`contract.constants.WORKER_HOSTS_ENV`), the same comma-separated
  `host:port` list in every pod, which the operator fills with
  `<job>-<i>.<headless-service>:<WORKER_PORT>` for i in 0 … N-1 (the pods' stable DNS names).

From those this module derives the `TF_CONFIG` that `tf.distribute.MultiWorkerMirroredStrategy` reads:
`{"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}`. A `TF_CONFIG` already in the
environment wins (someone wired the cluster by hand, or another launcher did), but it must still name
N workers. Worker 0 is the chief: the only one that talks to MLflow and hands back a result.

Every inconsistency is a `WorkerConfigError`, which the entrypoint turns into the "bad command" exit
code: retrying a pod cannot fix a cluster description that does not add up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract.constants import TF_CONFIG_ENV, WORKER_HOSTS_ENV, WORKER_INDEX_ENV

CHIEF_INDEX = 0


class WorkerConfigError(ValueError):
    """The environment does not describe a consistent multi-worker cluster for this pod."""


@dataclass(frozen=True)
class WorkerContext:
    """Who this process is in the training: its index among `workers`, and the TF_CONFIG to export."""

    workers: int
    index: int
    tf_config: Mapping[str, Any] | None  # None for a single worker: no strategy at all

    @property
    def is_chief(self) -> bool:
        return self.index == CHIEF_INDEX

    @property
    def distributed(self) -> bool:
        return self.workers > 1


def worker_hosts_value(hosts: list[str]) -> str:
    """The value of the hosts variable for a list of `host:port` addresses (the operator's side)."""
    return ",".join(hosts)


def tf_config(hosts: list[str], index: int) -> dict[str, Any]:
    return {"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": index}}


def _parse_index(text: str | None, workers: int) -> int:
    if text is None or text.strip() == "":
        raise WorkerConfigError(
            f"{workers} workers but {WORKER_INDEX_ENV} is not set: run the workers as an Indexed Job "
            f"(completionMode: Indexed) or set {WORKER_INDEX_ENV} to this worker's index"
        )
    try:
        index = int(text.strip())
    except ValueError:
        raise WorkerConfigError(f"{WORKER_INDEX_ENV}={text!r} is not an integer") from None
    if not 0 <= index < workers:
        raise WorkerConfigError(
            f"{WORKER_INDEX_ENV}={index} is out of range for {workers} workers (0-{workers - 1})"
        )
    return index


def _parse_hosts(text: str | None, workers: int) -> list[str]:
    if text is None or text.strip() == "":
        raise WorkerConfigError(
            f"{workers} workers but {WORKER_HOSTS_ENV} is not set: it must list the {workers} workers' "
            "host:port addresses, comma-separated, worker 0 first"
        )
    hosts = [host.strip() for host in text.split(",")]
    if len(hosts) != workers:
        raise WorkerConfigError(
            f"{WORKER_HOSTS_ENV} lists {len(hosts)} hosts for {workers} workers: {text!r}"
        )
    for host in hosts:
        name, separator, port = host.rpartition(":")
        if not separator or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise WorkerConfigError(f"{WORKER_HOSTS_ENV} entry {host!r} is not host:port")
    if len(set(hosts)) != len(hosts):
        raise WorkerConfigError(f"{WORKER_HOSTS_ENV} repeats an address: {text!r}")
    return hosts


def _parse_tf_config(text: str, workers: int) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise WorkerConfigError(f"{TF_CONFIG_ENV} is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise WorkerConfigError(f"{TF_CONFIG_ENV} is not a JSON object")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise WorkerConfigError(f"{TF_CONFIG_ENV} needs a 'cluster' and a 'task' object")
    if set(cluster) - {"worker"} or task.get("type") != "worker":
        raise WorkerConfigError(
            f"{TF_CONFIG_ENV} may only describe 'worker' tasks (MultiWorkerMirroredStrategy, no chief or ps)"
        )
    members = cluster.get("worker")
    if not isinstance(members, list) or len(members) != workers:
        count = len(members) if isinstance(members, list) else 0
        raise WorkerConfigError(f"{TF_CONFIG_ENV} names {count} workers, the command {workers}")
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < workers:
        raise WorkerConfigError(f"{TF_CONFIG_ENV} task index {index!r} is out of range for {workers} workers")
    return config


def worker_context(workers: int, environ: Mapping[str, str]) -> WorkerContext:
    """This process's place in a `workers`-worker training, from its environment.

    One worker needs nothing from the environment and gets no TF_CONFIG (so no strategy): a stray
    TF_CONFIG or JOB_COMPLETION_INDEX is ignored, and the run is what it was before multi-worker support.
    """
    if workers < 1:
        raise WorkerConfigError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return WorkerContext(workers=1, index=CHIEF_INDEX, tf_config=None)
    explicit = environ.get(TF_CONFIG_ENV, "").strip()
    if explicit:
        config = _parse_tf_config(explicit, workers)
        return WorkerContext(workers=workers, index=int(config["task"]["index"]), tf_config=config)
    index = _parse_index(environ.get(WORKER_INDEX_ENV), workers)
    hosts = _parse_hosts(environ.get(WORKER_HOSTS_ENV), workers)
    return WorkerContext(workers=workers, index=index, tf_config=tf_config(hosts, index))


def per_worker_batch_size(global_batch_size: int, workers: int) -> int:
    """The batch rule: the spec's batchSize is the global batch of one optimisation step, split evenly.

    Each step consumes `global_batch_size` examples in all, `global_batch_size / workers` on each worker,
    and applies the mean gradient over all of them with the unchanged learning rate: the same update as
    one worker taking the whole batch. An uneven split is refused rather than rounded.
    """
    if global_batch_size % workers:
        raise WorkerConfigError(
            f"batchSize {global_batch_size} is the global batch and must divide evenly among "
            f"{workers} workers (choose a multiple of {workers})"
        )
    return global_batch_size // workers
