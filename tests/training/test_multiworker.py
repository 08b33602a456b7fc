"""Multi-worker training (spec.workers > 1): the worker's environment contract, and two real
`python -m training_job train --workers=2` processes on loopback against a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from contract.constants import (
    EXIT_BAD_COMMAND,
    TF_CONFIG_ENV,
    WORKER_HOSTS_ENV,
    WORKER_INDEX_ENV,
)
from contract.result import TERMINATION_LOG_ENV, TrainingResult
from local_mode.mlflow_server import MlflowServer
from local_mode.processes import LOOPBACK, free_ports
from testing.training import REPO_ROOT, run_training
from training_job.distributed import (
    WorkerConfigError,
    per_worker_batch_size,
    tf_config,
    worker_context,
    worker_hosts_value,
)

HOSTS = ["job-train-0.job-workers:2222", "job-train-1.job-workers:2222"]


class TestWorkerContext:
    def test_index_and_hosts_become_the_tf_config(self) -> None:
        env = {WORKER_INDEX_ENV: "1", WORKER_HOSTS_ENV: worker_hosts_value(HOSTS)}
        worker = worker_context(2, env)
        assert worker.tf_config == {"cluster": {"worker": HOSTS}, "task": {"type": "worker", "index": 1}}
        assert (worker.index, worker.workers, worker.is_chief, worker.distributed) == (1, 2, False, True)
        assert worker_context(2, {**env, WORKER_INDEX_ENV: "0"}).is_chief

    def test_one_worker_ignores_the_environment(self) -> None:
        env = {WORKER_INDEX_ENV: "3", TF_CONFIG_ENV: "not json"}
        worker = worker_context(1, env)
        assert (worker.index, worker.tf_config, worker.is_chief, worker.distributed) == (0, None, True, False)

    def test_an_explicit_tf_config_wins(self) -> None:
        config = tf_config(["10.0.0.1:5000", "10.0.0.2:5000"], 1)
        env = {TF_CONFIG_ENV: json.dumps(config), WORKER_INDEX_ENV: "0", WORKER_HOSTS_ENV: "x:1,y:1"}
        worker = worker_context(2, env)
        assert worker.tf_config == config
        assert worker.index == 1

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({WORKER_HOSTS_ENV: ",".join(HOSTS)}, f"{WORKER_INDEX_ENV} is not set"),
            ({WORKER_INDEX_ENV: "2", WORKER_HOSTS_ENV: ",".join(HOSTS)}, "out of range"),
            ({WORKER_INDEX_ENV: "-1", WORKER_HOSTS_ENV: ",".join(HOSTS)}, "out of range"),
            ({WORKER_INDEX_ENV: "one", WORKER_HOSTS_ENV: ",".join(HOSTS)}, "not an integer"),
            ({WORKER_INDEX_ENV: "0"}, f"{WORKER_HOSTS_ENV} is not set"),
            ({WORKER_INDEX_ENV: "0", WORKER_HOSTS_ENV: HOSTS[0]}, "lists 1 hosts for 2 workers"),
            ({WORKER_INDEX_ENV: "0", WORKER_HOSTS_ENV: "a:1,b"}, "is not host:port"),
            ({WORKER_INDEX_ENV: "0", WORKER_HOSTS_ENV: "a:1,a:1"}, "repeats"),
            ({TF_CONFIG_ENV: "{"}, "not JSON"),
            ({TF_CONFIG_ENV: json.dumps(tf_config(["a:1"], 0))}, "names 1 workers"),
            ({TF_CONFIG_ENV: json.dumps(tf_config(["a:1", "b:1"], 2))}, "out of range"),
            (
                {TF_CONFIG_ENV: json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {}})},
                "only describe 'worker' tasks",
            ),
        ],
    )
    def test_inconsistent_environments_are_refused(self, env: dict[str, str], message: str) -> None:
        with pytest.raises(WorkerConfigError, match=message):
            worker_context(2, env)

    def test_the_global_batch_is_split_evenly(self) -> None:
        assert per_worker_batch_size(128, 1) == 128
        assert per_worker_batch_size(128, 2) == 64
        with pytest.raises(WorkerConfigError, match="multiple of 3"):
            per_worker_batch_size(128, 3)


def test_a_worker_without_its_environment_exits_with_the_bad_command_code(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in (WORKER_INDEX_ENV, TF_CONFIG_ENV)}
    env[WORKER_HOSTS_ENV] = ",".join(HOSTS)
    completed = subprocess.run(
        [sys.executable, "-m", "training_job", "train", "--workers=2", "--tracking-uri=http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == EXIT_BAD_COMMAND, completed.stderr[-2000:]
    assert WORKER_INDEX_ENV in completed.stderr
    assert completed.stdout == ""


# --- Two real worker processes ------------------------------------------------------------------
# One config for the 2-worker run and its 1-worker twin: the baseline CNN, 2 epochs on 6000 examples.
# Enough steps (2 x 47) for the accuracy to mean something (~96%), small enough for ~1 minute a run.
CONFIG = (
    "--architecture=baseline",
    "--epochs=2",
    "--max-train-samples=6000",
    "--batch-size=128",
    "--seed=7",
    "--registered-model=mnist-multiworker",
    "--experiment=multiworker",
)


@dataclass(frozen=True)
class WorkerRun:
    returncode: int
    stdout: str
    stderr: str
    termination_message: Path


def run_workers(
    mlflow_url: str, workers: int, args: Sequence[str], tmp_path: Path, timeout: float = 600
) -> list[WorkerRun]:
    """`workers` training processes, as the pods of an Indexed Job would run them, on loopback ports."""
    hosts = worker_hosts_value([f"{LOOPBACK}:{port}" for port in free_ports(workers)])
    processes = []
    for index in range(workers):
        env = {key: value for key, value in os.environ.items() if key != TF_CONFIG_ENV}
        env |= {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            WORKER_INDEX_ENV: str(index),
            WORKER_HOSTS_ENV: hosts,
            TERMINATION_LOG_ENV: str(tmp_path / f"termination-{index}"),
        }
        command = [sys.executable, "-m", "training_job", "train", f"--tracking-uri={mlflow_url}"]
        processes.append(
            subprocess.Popen(
                [*command, f"--workers={workers}", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO_ROOT,
            )
        )
    runs = []
    try:
        for index, process in enumerate(processes):
            stdout, stderr = process.communicate(timeout=timeout)
            runs.append(WorkerRun(process.returncode, stdout, stderr, tmp_path / f"termination-{index}"))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return runs


@pytest.fixture(scope="module")
def two_workers(
    mlflow_server: MlflowServer, mnist_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[WorkerRun], set[str], set[str]]]:
    """The 2-worker run, with the registered versions and MLflow runs that existed before it."""
    client = MlflowClient(mlflow_server.url)
    versions_before = {
        version.version for version in client.search_model_versions("name='mnist-multiworker'")
    }
    experiment = client.get_experiment_by_name("multiworker")
    runs_before = (
        {run.info.run_id for run in client.search_runs([experiment.experiment_id])} if experiment else set()
    )
    runs = run_workers(
        mlflow_server.url, 2, [*CONFIG, f"--data={mnist_path}"], tmp_path_factory.mktemp("workers")
    )
    yield runs, versions_before, runs_before


@pytest.mark.slow
def test_two_workers_train_once_and_only_the_chief_reports(
    two_workers: tuple[list[WorkerRun], set[str], set[str]], mlflow_server: MlflowServer
) -> None:
    runs, versions_before, runs_before = two_workers
    chief, other = runs
    assert chief.returncode == 0, chief.stderr[-4000:]
    assert other.returncode == 0, other.stderr[-4000:]
    assert "worker 1 finished training" in other.stderr

    # The chief hands back the one result, on stdout and in its termination message; the other nothing.
    result = TrainingResult.from_json(chief.stdout.strip().splitlines()[-1])
    assert TrainingResult.from_json(chief.termination_message.read_text()) == result
    assert other.stdout == ""
    assert not other.termination_message.exists()

    client = MlflowClient(mlflow_server.url)
    versions = {version.version for version in client.search_model_versions("name='mnist-multiworker'")}
    assert versions - versions_before == {result.model_version}
    experiment = client.get_experiment_by_name("multiworker")
    assert experiment is not None
    new_runs = {run.info.run_id for run in client.search_runs([experiment.experiment_id])} - runs_before
    assert new_runs == {result.run_id}
    run = client.get_run(result.run_id)
    assert run.data.params["workers"] == "2"
    assert run.data.params["batch_size"] == "128"
    assert run.data.params["per_worker_batch_size"] == "64"
    assert run.data.params["train_samples"] == "6000"
    assert [point.step for point in client.get_metric_history(result.run_id, "val_accuracy")] == [0, 1]
    assert 0.9 < result.metrics["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_two_workers_reach_the_accuracy_of_one(
    two_workers: tuple[list[WorkerRun], set[str], set[str]], mlflow_server: MlflowServer, mnist_path: Path
) -> None:
    """Same seed and config, global batch 128 = 2 x 64 at the same learning rate: the same optimisation,
    so the test accuracy agrees within 0.3 points (what is left is floating-point summation order)."""
    chief = two_workers[0][0]
    assert chief.returncode == 0, chief.stderr[-4000:]
    two = TrainingResult.from_json(chief.stdout.strip().splitlines()[-1])
    completed = run_training(mlflow_server.url, *CONFIG, f"--data={mnist_path}")
    assert completed.returncode == 0, completed.stderr[-4000:]
    one = TrainingResult.from_json(completed.stdout.strip().splitlines()[-1])
    difference = abs(two.metrics["test_accuracy"] - one.metrics["test_accuracy"])
    assert difference <= 0.003, (one.metrics, two.metrics)
    # The 1-worker run is the unchanged single-process path: no distribution params at all.
    params = MlflowClient(mlflow_server.url).get_run(one.run_id).data.params
    assert "workers" not in params and "per_worker_batch_size" not in params
