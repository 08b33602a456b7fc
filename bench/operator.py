"""`make bench-operator`: how fast the operator turns applied TrainingRuns into Jobs, and what it costs.

A real control plane (testing/controlplane.py, its API server auditing every write) and the real
operator process (`python -m mnist_operator`, its own ServiceAccount token, production defaults).
Measured:

* one TrainingRun: time from the create request to the Job's ADDED event on a watch, repeated
  (the first one after start-up is reported apart: it pays for the warm-up);
* a burst applied by one `kubectl apply` of a List, as a user would;
* at scale: 1,000 TrainingRuns across 10 namespaces created by 16 concurrent clients (so the operator,
  not the clients, sets the pace), once with the operator watching the listed namespaces and once
  watching every namespace: time until all Jobs exist, and the operator's API writes per TrainingRun
  (from the API server's audit log, by the operator's ServiceAccount);
* the operator's peak RSS and CPU time (per operator process).

No kubelet runs here, so the Jobs' pods stay Pending and nothing trains: every write counted happens
before a Job could start. Targets (issue 13): 1,000 TrainingRuns → 1,000 Jobs in ≤ 60 s, RSS ≤ 200 MiB,
≤ 3 API writes per TrainingRun. Table on stdout, JSON in bench/results/operator.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config

from bench.report import write_results
from contract.spec import API_GROUP, API_VERSION, KIND, PLURAL
from local_mode.processes import free_port
from testing.controlplane import ControlPlane
from testing.kubectl import kubectl_ok
from testing.operator_harness import (
    OPERATOR_NAMESPACE,
    OperatorAccount,
    OperatorProcess,
    create_namespace,
    install_crd,
    install_operator_account,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "operator.json"
NAMESPACE = "bench"
SCALE_NAMESPACE_PREFIX = "bench-scale"
PARALLEL_CLIENTS = 16


class JobWatcher:
    """Records when each Job's ADDED event arrives, from `kubectl get --watch` started before anything
    is applied (a separate process, so the benchmark's own API clients cannot delay it).

    A watch can end (the API server closes long watches; kubectl gives up on a burst it falls behind
    on), so the reader starts a new one whenever it does: its initial listing reports every Job again,
    and a Job first seen then is timed at that moment, which can only make a figure worse, never better.
    """

    def __init__(self, plane: ControlPlane, log_path: Path) -> None:
        self.added: dict[str, float] = {}
        self.restarts = 0
        self._plane = plane
        self._log_path = log_path
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._process: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # The watch is established once kubectl has listed the (empty) cluster.
        time.sleep(2)

    def _start(self) -> subprocess.Popen[str]:
        with self._log_path.open("a") as log:
            return subprocess.Popen(
                [
                    str(self._plane.bin_dir / "kubectl"),
                    "get",
                    "jobs",
                    "--all-namespaces",
                    "--watch",
                    "--output-watch-events",
                    "-o",
                    "custom-columns=EVENT:.type,NAMESPACE:.object.metadata.namespace,NAME:.object.metadata.name",
                    "--no-headers",
                ],
                env=self._plane.env(),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )

    def _read(self) -> None:
        while not self._stopping.is_set():
            self._process = self._start()
            assert self._process.stdout is not None
            for line in self._process.stdout:
                fields = line.split()
                if len(fields) == 3 and fields[0] in {"ADDED", "MODIFIED"}:
                    with self._condition:
                        self.added.setdefault(f"{fields[1]}/{fields[2]}", time.monotonic())
                        self._condition.notify_all()
            self._process.wait()
            if not self._stopping.is_set():
                self.restarts += 1

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
        self._stopping.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)


def trainingrun(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"architecture": "baseline", "hyperparameters": {"epochs": 1}},
    }


def job_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}-train"


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


def start_operator(
    account: OperatorAccount, workdir: Path, namespaces: list[str], identity: str, python: str
) -> OperatorProcess:
    """The operator with production defaults; `namespaces` empty means it watches every namespace."""
    env = {key: value for key, value in os.environ.items() if key in {"PATH", "LANG", "HOME"}}
    env.update(
        {
            "KUBECONFIG": str(account.kubeconfig),
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'operator'}",
            # Nothing trains, so MLflow is never called; the address only has to parse.
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
            "MNIST_OPERATOR_NAMESPACES": ",".join(namespaces),
            "MNIST_OPERATOR_HEALTH_HOST": "127.0.0.1",
            "MNIST_OPERATOR_HEALTH_PORT": str(free_port()),
            "MNIST_OPERATOR_LEASE_NAMESPACE": OPERATOR_NAMESPACE,
            "MNIST_OPERATOR_IDENTITY": identity,
        }
    )
    operator = OperatorProcess(env, workdir / f"{identity}.log", python=python).start()
    operator.wait_leading(120)
    return operator


def burst_stats(watcher: JobWatcher, keys: list[str], started: float, applied: float) -> dict[str, Any]:
    last = watcher.wait_for(set(keys), 900)
    arrivals = sorted(watcher.added[key] - started for key in keys)
    return {
        "trainingruns": len(keys),
        "apply_seconds": applied - started,
        "all_jobs_seconds": last - started,
        "lag_after_last_apply_seconds": last - applied,
        "median_job_seconds": statistics.median(arrivals),
        "jobs_per_second": len(keys) / (last - started),
    }


def writes_by(plane: ControlPlane, user: str, namespaces: set[str]) -> Counter[str]:
    """The user's completed writes in `namespaces`, as "verb resource[/subresource]" counts."""
    counts: Counter[str] = Counter()
    for event in plane.write_events():
        ref = event.get("objectRef") or {}
        if event["user"]["username"] != user or ref.get("namespace") not in namespaces:
            continue
        resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[f"{event['verb']} {resource}"] += 1
    return counts


WRITES_SETTLED_SECONDS = 5.0
WRITES_SETTLE_TIMEOUT_SECONDS = 120.0


def settled_writes(plane: ControlPlane, user: str, namespaces: set[str]) -> Counter[str]:
    """The user's writes once no new one has arrived for WRITES_SETTLED_SECONDS (or after the timeout)."""
    deadline = time.monotonic() + WRITES_SETTLE_TIMEOUT_SECONDS
    writes = writes_by(plane, user, namespaces)
    while time.monotonic() < deadline:
        time.sleep(WRITES_SETTLED_SECONDS)
        latest = writes_by(plane, user, namespaces)
        if latest == writes:
            break
        writes = latest
    return writes


def scale_run(
    account: OperatorAccount,
    api: client.ApiClient,
    workdir: Path,
    *,
    mode: str,
    namespaces: list[str],
    per_namespace: int,
    python: str,
) -> dict[str, Any]:
    """`per_namespace` TrainingRuns in each namespace, created concurrently, with a fresh operator
    watching the listed namespaces (`mode` "listed") or every namespace ("all")."""
    custom = client.CustomObjectsApi(api)
    plane = account.plane
    operator = start_operator(
        account, workdir, namespaces if mode == "listed" else [], f"scale-{mode}", python
    )
    watcher = JobWatcher(plane, workdir / "job-watch.log")
    try:
        assert operator.process is not None
        keys_by_object = [
            (namespace, f"{mode}-{index:04d}") for namespace in namespaces for index in range(per_namespace)
        ]

        def create(item: tuple[str, str]) -> None:
            namespace, name = item
            custom.create_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, trainingrun(namespace, name)
            )

        started = time.monotonic()
        with ThreadPoolExecutor(PARALLEL_CLIENTS) as pool:
            list(pool.map(create, keys_by_object))
        stats = burst_stats(
            watcher, [job_key(ns, name) for ns, name in keys_by_object], started, time.monotonic()
        )
        # Whatever the operator writes right after the Job (a status patch, the finalizer) is part of the
        # cost: counted once the count has stood still for WRITES_SETTLED_SECONDS.
        writes = settled_writes(plane, account.user, set(namespaces))
        total = sum(writes.values())
        print(
            f"  {len(keys_by_object)} across {len(namespaces)} namespaces ({mode}): all Jobs after"
            f" {stats['all_jobs_seconds']:.1f} s, {total / len(keys_by_object):.2f} writes each"
        )
        return {
            **stats,
            "namespaces": len(namespaces),
            "watch": mode,
            "clients": PARALLEL_CLIENTS,
            "job_watch_restarts": watcher.restarts,
            "operator_writes": dict(sorted(writes.items())),
            "operator_writes_per_trainingrun": total / len(keys_by_object),
            "operator": proc_stats(operator.process.pid),
        }
    finally:
        watcher.stop()
        operator.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    plane = ControlPlane.start(audit_writes=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    try:
        install_crd(plane)
        account = install_operator_account(plane)
        api = config.new_client_from_config(config_file=str(plane.kubeconfig_path))  # type: ignore[no-untyped-call]
        custom = client.CustomObjectsApi(api)

        create_namespace(plane, NAMESPACE)
        account.bind_namespace(NAMESPACE)
        operator = start_operator(account, workdir, [NAMESPACE], "single", args.python)
        watcher = JobWatcher(plane, workdir / "job-watch.log")
        try:
            assert operator.process is not None

            def create(name: str) -> None:
                custom.create_namespaced_custom_object(
                    API_GROUP, API_VERSION, NAMESPACE, PLURAL, trainingrun(NAMESPACE, name)
                )

            # The first object after start-up also pays for kopf's and the API client's warm-up.
            started = time.monotonic()
            create("cold")
            cold = watcher.wait_for({job_key(NAMESPACE, "cold")}, 60) - started
            print(f"  first TrainingRun after start-up: {cold * 1000:.0f} ms")

            single: list[float] = []
            for index in range(args.repeats):
                name = f"single-{index}"
                started = time.monotonic()
                create(name)
                single.append(watcher.wait_for({job_key(NAMESPACE, name)}, 60) - started)
                print(f"  one TrainingRun #{index + 1}: {single[-1] * 1000:.0f} ms")

            # As a user would: one `kubectl apply` of a List (kubectl sends one request per object).
            names = [f"apply-{index:03d}" for index in range(args.burst)]
            started = time.monotonic()
            kubectl_ok(
                plane, "apply", "-f", "-", manifest=[trainingrun(NAMESPACE, n) for n in names], timeout=600
            )
            kubectl_burst = burst_stats(
                watcher, [job_key(NAMESPACE, n) for n in names], started, time.monotonic()
            )
            print(
                f"  {args.burst} by kubectl apply: all Jobs after {kubectl_burst['all_jobs_seconds']:.1f} s"
            )
            single_operator = proc_stats(operator.process.pid)
        finally:
            watcher.stop()
            operator.stop()

        scale: dict[str, dict[str, Any]] = {}
        for mode in ("listed", "all"):
            # Namespaces of its own per mode: the writes counted are this run's only.
            namespaces = [f"{SCALE_NAMESPACE_PREFIX}-{mode}-{index:02d}" for index in range(args.namespaces)]
            for namespace in namespaces:
                create_namespace(plane, namespace)
                if mode == "listed":
                    account.bind_namespace(namespace)
            with account.clusterwide() if mode == "all" else contextlib.nullcontext():
                scale[mode] = scale_run(
                    account,
                    api,
                    workdir,
                    mode=mode,
                    namespaces=namespaces,
                    per_namespace=args.per_namespace,
                    python=args.python,
                )
        return {
            "first_after_startup_ms": cold * 1000,
            "single": {
                "repeats": args.repeats,
                "median_ms": statistics.median(single) * 1000,
                "min_ms": min(single) * 1000,
                "max_ms": max(single) * 1000,
            },
            "burst_kubectl_apply": kubectl_burst,
            "operator": single_operator,
            "scale": scale,
            "targets": targets(scale),
            "environment": {
                "control_plane_startup_seconds": plane.startup_seconds,
                "operator_settings": "defaults, its own ServiceAccount",
                "operator_python": args.python,
            },
        }
    finally:
        plane.stop()


def targets(scale: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 13's targets, judged on the worse of the two watch modes."""
    worst_seconds = max(run["all_jobs_seconds"] for run in scale.values())
    worst_rss = max(run["operator"]["peak_rss_mib"] for run in scale.values())
    worst_writes = max(run["operator_writes_per_trainingrun"] for run in scale.values())
    count = next(iter(scale.values()))["trainingruns"]
    return {
        f"{count} TrainingRuns -> Jobs": {
            "goal": "<= 60 s",
            "measured": round(worst_seconds, 1),
            "met": worst_seconds <= 60,
        },
        "operator peak RSS": {"goal": "<= 200 MiB", "measured": round(worst_rss, 1), "met": worst_rss <= 200},
        "API writes per TrainingRun": {
            "goal": "<= 3",
            "measured": round(worst_writes, 2),
            "met": worst_writes <= 3,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="single-TrainingRun measurements")
    parser.add_argument("--burst", type=int, default=200, help="TrainingRuns in one kubectl apply")
    parser.add_argument("--namespaces", type=int, default=10, help="namespaces of the scale runs")
    parser.add_argument("--per-namespace", type=int, default=100, help="TrainingRuns per namespace at scale")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter to run the operator with: `make bench-operator` passes a virtualenv holding only"
        " requirements/operator.txt, so memory is measured on what the image ships",
    )
    args = parser.parse_args(argv)
    results = run(args)
    single, applied = results["single"], results["burst_kubectl_apply"]
    rows = [
        ("apply → Job, first TrainingRun after start-up", f"{results['first_after_startup_ms']:.0f} ms"),
        (f"apply → Job, one TrainingRun (median of {single['repeats']})", f"{single['median_ms']:.0f} ms"),
        ("apply → Job, one TrainingRun (min-max)", f"{single['min_ms']:.0f}-{single['max_ms']:.0f} ms"),
        (
            f"{applied['trainingruns']} by one kubectl apply: all Jobs created",
            f"{applied['all_jobs_seconds']:.1f} s",
        ),
        ("operator peak RSS (one namespace)", f"{results['operator']['peak_rss_mib']:.0f} MiB"),
    ]
    for mode, scale in results["scale"].items():
        label = f"{scale['trainingruns']} across {scale['namespaces']} namespaces, watching {mode}"
        rows += [
            (f"{label}: all Jobs created", f"{scale['all_jobs_seconds']:.1f} s"),
            (f"{label}: API writes per TrainingRun", f"{scale['operator_writes_per_trainingrun']:.2f}"),
            (f"{label}: operator peak RSS", f"{scale['operator']['peak_rss_mib']:.0f} MiB"),
            (f"{label}: operator CPU time", f"{scale['operator']['cpu_seconds']:.1f} s"),
        ]
    width = max(len(label) for label, _ in rows)
    print(f"\n{'measurement':<{width}}  value\n{'-' * width}  -----")
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    for name, target in results["targets"].items():
        verdict = "MET" if target["met"] else "NOT MET"
        print(f"target {name}: goal {target['goal']}, measured {target['measured']} -> {verdict}")
    write_results(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
