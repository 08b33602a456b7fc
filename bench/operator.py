"""`make bench-operator`: how fast the operator turns applied TrainingRuns into Jobs.

A real control plane (tests/controlplane.py) and the real operator process (`python -m
mnist_operator`, its own ServiceAccount token, production defaults). Two measurements:

* one TrainingRun: time from the create request to the Job's ADDED event on a watch, repeated
  (the first one after start-up is reported apart: it pays for the warm-up);
* 200 TrainingRuns applied at once, twice: by one `kubectl apply` of a List (as a user would), and
  by 16 concurrent clients (so the operator, not kubectl, sets the pace): time until all 200 Jobs
  exist; and the operator's peak RSS and CPU time over the whole benchmark.

No kubelet runs here, so the Jobs' pods stay Pending and nothing trains: this is the operator's
own cost. Table on stdout, JSON in bench/results/operator.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

from testing.controlplane import ControlPlane
from tests.fixtures_operator import (
    KUBECTL,
    OPERATOR_NAMESPACE,
    OperatorProcess,
    create_namespace,
    install_crd,
    install_operator_account,
    kubectl_ok,
)
from training_job.mlflow_server import free_port
from training_job.spec import API_GROUP, API_VERSION, KIND, PLURAL

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "operator.json"
NAMESPACE = "bench"
PARALLEL_CLIENTS = 16


class JobWatcher:
    """Records when each Job's ADDED event arrives, from `kubectl get --watch` started before anything
    is applied (a separate process, so the benchmark's own API clients cannot delay it)."""

    def __init__(self, plane: ControlPlane, namespace: str) -> None:
        self.added: dict[str, float] = {}
        self._condition = threading.Condition()
        self._process = subprocess.Popen(
            [
                KUBECTL,
                "get",
                "jobs",
                "-n",
                namespace,
                "--watch",
                "--output-watch-events",
                "-o",
                "custom-columns=EVENT:.type,NAME:.object.metadata.name",
                "--no-headers",
            ],
            env=plane.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # The watch is established once kubectl has listed the (empty) namespace.
        time.sleep(2)

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            fields = line.split()
            if len(fields) == 2 and fields[0] == "ADDED":
                with self._condition:
                    self.added.setdefault(fields[1], time.monotonic())
                    self._condition.notify_all()

    def wait_for(self, names: set[str], timeout: float) -> float:
        """The arrival time of the last of `names`."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while not names <= self.added.keys():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = len(names - self.added.keys())
                    raise TimeoutError(f"{missing} of {len(names)} Jobs not created within {timeout:.0f}s")
                self._condition.wait(remaining)
            return max(self.added[name] for name in names)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(10)


def trainingrun(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"architecture": "baseline", "hyperparameters": {"epochs": 1}},
    }


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "peak_rss_mib": int(fields["VmHWM"].split()[0]) / 1024,
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "cpu_seconds": (int(stat[11]) + int(stat[12])) / ticks,
    }


def setup_operator(plane: ControlPlane, workdir: Path) -> OperatorProcess:
    install_crd(plane)
    create_namespace(plane, NAMESPACE)
    account = install_operator_account(plane)
    account.bind_namespace(NAMESPACE)
    env = {key: value for key, value in os.environ.items() if key in {"PATH", "LANG", "HOME"}}
    env.update(
        {
            "KUBECONFIG": str(account.kubeconfig),
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'operator'}",
            # Nothing trains, so MLflow is never called; the address only has to parse.
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
            "MNIST_OPERATOR_NAMESPACES": NAMESPACE,
            "MNIST_OPERATOR_HEALTH_HOST": "127.0.0.1",
            "MNIST_OPERATOR_HEALTH_PORT": str(free_port()),
            "MNIST_OPERATOR_LEASE_NAMESPACE": OPERATOR_NAMESPACE,
            "MNIST_OPERATOR_IDENTITY": "bench",
        }
    )
    operator = OperatorProcess(env, workdir / "operator.log").start()
    operator.wait_healthy(120)
    return operator


def burst_stats(watcher: JobWatcher, names: list[str], started: float, applied: float) -> dict[str, Any]:
    last = watcher.wait_for({f"{name}-train" for name in names}, 900)
    arrivals = sorted(watcher.added[f"{name}-train"] - started for name in names)
    return {
        "trainingruns": len(names),
        "apply_seconds": applied - started,
        "all_jobs_seconds": last - started,
        "lag_after_last_apply_seconds": last - applied,
        "median_job_seconds": statistics.median(arrivals),
        "jobs_per_second": len(names) / (last - started),
    }


def run(single_repeats: int, burst: int) -> dict[str, Any]:
    plane = ControlPlane.start()
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    operator: OperatorProcess | None = None
    try:
        operator = setup_operator(plane, workdir)
        assert operator.process is not None
        api = config.new_client_from_config(config_file=str(plane.kubeconfig_path))  # type: ignore[no-untyped-call]
        custom = client.CustomObjectsApi(api)
        watcher = JobWatcher(plane, NAMESPACE)

        def create(name: str) -> None:
            custom.create_namespaced_custom_object(
                API_GROUP, API_VERSION, NAMESPACE, PLURAL, trainingrun(name)
            )

        # The first object after start-up also pays for kopf's and the API client's warm-up.
        started = time.monotonic()
        create("cold")
        cold = watcher.wait_for({"cold-train"}, 60) - started
        print(f"  first TrainingRun after start-up: {cold * 1000:.0f} ms")

        single: list[float] = []
        for index in range(single_repeats):
            name = f"single-{index}"
            started = time.monotonic()
            create(name)
            single.append(watcher.wait_for({f"{name}-train"}, 60) - started)
            print(f"  one TrainingRun #{index + 1}: {single[-1] * 1000:.0f} ms")

        # As a user would: one `kubectl apply` of a List (kubectl sends one request per object).
        names = [f"apply-{index:03d}" for index in range(burst)]
        started = time.monotonic()
        kubectl_ok(plane, "apply", "-f", "-", manifest=[trainingrun(name) for name in names], timeout=600)
        kubectl_burst = burst_stats(watcher, names, started, time.monotonic())
        print(f"  {burst} by kubectl apply: all Jobs after {kubectl_burst['all_jobs_seconds']:.1f} s")

        # All at once: concurrent creates, so the operator rather than kubectl sets the pace.
        names = [f"parallel-{index:03d}" for index in range(burst)]
        started = time.monotonic()
        with ThreadPoolExecutor(PARALLEL_CLIENTS) as pool:
            list(pool.map(create, names))
        parallel_burst = burst_stats(watcher, names, started, time.monotonic())
        print(f"  {burst} created concurrently: all Jobs after {parallel_burst['all_jobs_seconds']:.1f} s")

        stats = proc_stats(operator.process.pid)
        watcher.stop()
        return {
            "first_after_startup_ms": cold * 1000,
            "single": {
                "repeats": single_repeats,
                "median_ms": statistics.median(single) * 1000,
                "min_ms": min(single) * 1000,
                "max_ms": max(single) * 1000,
            },
            "burst_kubectl_apply": kubectl_burst,
            "burst_concurrent_creates": {**parallel_burst, "clients": PARALLEL_CLIENTS},
            "operator": stats,
            "environment": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "machine": platform.machine(),
                "control_plane_startup_seconds": plane.startup_seconds,
                "operator_settings": "defaults, one watched namespace, its own ServiceAccount",
            },
        }
    finally:
        if operator is not None:
            operator.stop()
        plane.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="single-TrainingRun measurements")
    parser.add_argument("--burst", type=int, default=200, help="TrainingRuns applied at once")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = run(args.repeats, args.burst)
    single, operator = results["single"], results["operator"]
    applied, parallel = results["burst_kubectl_apply"], results["burst_concurrent_creates"]
    count = applied["trainingruns"]
    rows = [
        ("apply → Job, first TrainingRun after start-up", f"{results['first_after_startup_ms']:.0f} ms"),
        (f"apply → Job, one TrainingRun (median of {single['repeats']})", f"{single['median_ms']:.0f} ms"),
        ("apply → Job, one TrainingRun (min-max)", f"{single['min_ms']:.0f}-{single['max_ms']:.0f} ms"),
        (f"{count} by one kubectl apply: apply took", f"{applied['apply_seconds']:.1f} s"),
        (f"{count} by one kubectl apply: all Jobs created", f"{applied['all_jobs_seconds']:.1f} s"),
        (
            f"{count} by one kubectl apply: last Job after apply",
            f"{applied['lag_after_last_apply_seconds']:.2f} s",
        ),
        (f"{count} created concurrently: creates took", f"{parallel['apply_seconds']:.1f} s"),
        (f"{count} created concurrently: all Jobs created", f"{parallel['all_jobs_seconds']:.1f} s"),
        (f"{count} created concurrently: Jobs per second", f"{parallel['jobs_per_second']:.1f}"),
        ("operator peak RSS", f"{operator['peak_rss_mib']:.0f} MiB"),
        ("operator CPU time (whole benchmark)", f"{operator['cpu_seconds']:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"\n{'measurement':<{width}}  value\n{'-' * width}  -----")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
