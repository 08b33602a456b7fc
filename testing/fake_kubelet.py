"""FakeKubelet: the tests' stand-in for a node, because there is no kubelet or container runtime here.

The control plane is real (etcd, kube-apiserver, kube-controller-manager): the Job controller
creates the training pods, the ReplicaSet controller creates the serving pods. What no process can
do here is run a container, so this helper takes the node's part, openly and only that part:

* it registers a Node (`fake-node`, Ready) and binds every pending pod of the watched namespaces
  to it, as the scheduler would;
* a training pod (owned by a Job) has its container's command and arguments run as a local
  process, with the container's environment: `python` is this virtualenv's interpreter, the
  MLflow URI points at the test's MLflow server, the emptyDir at /tmp becomes a private directory,
  the bundled data path becomes the repository's data file, and training examples are capped so
  a run takes seconds. The pod status is then written as the kubelet writes it: Running and Ready
  while the process runs; Succeeded or Failed with the container's exit code and its termination
  message (the file at terminationMessagePath; with FallbackToLogsOnError, the log tail when a
  failed process wrote none). The Job controller then completes or fails the Job on its own;
* a serving pod (owned by a ReplicaSet) is marked Running and Ready, or Running and never Ready
  for Deployments the test names, so rollouts can be made to stall;
* a pod being deleted has its process stopped and is removed, as the kubelet confirms deletion.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_NAME = "fake-node"
POLL_SECONDS = 0.2
MERGE_PATCH = "application/merge-patch+json"
# The kubelet's own limits for termination messages (pkg/kubelet/kuberuntime).
MESSAGE_LIMIT_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
DEFAULT_MAX_TRAIN_SAMPLES = 3000
BUNDLED_DATA_PREFIX = "/opt/mnist/"
TERMINATION_ENV = "TERMINATION_MESSAGE_PATH"

log = logging.getLogger("fake_kubelet")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKubeletError(AssertionError):
    """The fake kubelet failed at its own job (not a pod's process failing, which is data)."""


@dataclass
class PodRun:
    """One container process the fake kubelet ran for a training pod."""

    namespace: str
    pod: str
    trainingrun: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    message: str = ""
    finished: threading.Event = field(default_factory=threading.Event)
    reported: threading.Event = field(default_factory=threading.Event)

    @property
    def log_path(self) -> Path:
        return self.workdir / "container.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class FakeKubelet:
    def __init__(
        self,
        kubeconfig: Path,
        *,
        mlflow_url: str,
        data_path: Path = REPO_ROOT / "data" / "mnist.npz",
        max_train_samples: int = DEFAULT_MAX_TRAIN_SAMPLES,
        python: str = sys.executable,
    ) -> None:
        self.api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(self.api)
        self.mlflow_url = mlflow_url
        self.data_path = data_path
        self.max_train_samples = max_train_samples
        self.python = python
        self.namespaces: set[str] = set()
        self.runs: dict[str, PodRun] = {}
        self.never_ready: set[tuple[str, str]] = set()
        self.env_overrides: dict[str, dict[str, str]] = {}
        self.holds: dict[str, threading.Event] = {}
        self._handled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root = Path(tempfile.mkdtemp(prefix="fake-kubelet-"))
        self.errors: list[str] = []

    # ------------------------------------------------------------------ test controls

    def watch(self, namespace: str) -> None:
        with self._lock:
            self.namespaces.add(namespace)

    def hold(self, trainingrun: str) -> threading.Event:
        """The training pod of `trainingrun` runs, but its end is reported only once the event is set."""
        event = threading.Event()
        self.holds[trainingrun] = event
        return event

    def override_env(self, trainingrun: str, **env: str) -> None:
        """Extra environment for the training container of `trainingrun` (e.g. to make it fail)."""
        self.env_overrides[trainingrun] = dict(env)

    def never_become_ready(self, namespace: str, deployment: str) -> None:
        self.never_ready.add((namespace, deployment))

    def runs_of(self, trainingrun: str) -> list[PodRun]:
        with self._lock:
            return [run for run in self.runs.values() if run.trainingrun == trainingrun]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeKubelet:
        self._ensure_node()
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            self._kill(run)
        self.api.close()
        shutil.rmtree(self._root, ignore_errors=True)
        # The loop keeps going after an error so one bad pod does not stall the others' tests, but an
        # error still means the stand-in node misbehaved: the session fails on it here.
        if self.errors:
            raise FakeKubeletError("the fake kubelet recorded errors:\n" + "\n".join(self.errors))

    def _ensure_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(client.V1Node.model_validate(node), _preload_content=False)
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "500", "nvidia.com/gpu": "8"}
        status = {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "fake kubelet: processes run on the test host",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
            }
        }
        self.core.patch_node_status(NODE_NAME, status, _content_type=MERGE_PATCH, _preload_content=False)

    # ------------------------------------------------------------------ the sync loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                namespaces = sorted(self.namespaces)
            for namespace in namespaces:
                try:
                    self._sync_namespace(namespace)
                except ApiException as error:
                    # A namespace a test is deleting refuses new bindings with 403 "because it is being
                    # terminated": its pods are going away, as on a real node; anything else is an error.
                    terminating = error.status == 403 and "being terminated" in str(error.body or "")
                    if error.status != 404 and not terminating:
                        self._error(f"{namespace}: {error.status} {error.reason}")
                except Exception as error:  # a test helper must keep running, and report
                    self._error(f"{namespace}: {type(error).__name__}: {error}")
            self._stop.wait(POLL_SECONDS)

    def _error(self, message: str) -> None:
        log.error("fake kubelet: %s", message)
        self.errors.append(message)

    def _pods(self, namespace: str) -> list[dict[str, Any]]:
        pods = self.api.sanitize_for_serialization(self.core.list_namespaced_pod(namespace))
        return list(pods["items"])

    def _sync_namespace(self, namespace: str) -> None:
        for pod in self._pods(namespace):
            meta, spec = pod["metadata"], pod["spec"]
            name = meta["name"]
            if meta.get("deletionTimestamp"):
                self._finish_deletion(namespace, name, meta["uid"])
                continue
            if pod.get("status", {}).get("phase") in {"Succeeded", "Failed"} or meta["uid"] in self._handled:
                continue
            if not spec.get("nodeName"):
                self._bind(namespace, name)
            owner = next((ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")), None)
            self._handled.add(meta["uid"])
            if owner is not None and owner["kind"] == "Job":
                self._start_training(pod)
            else:
                self._run_serving(pod, owner)

    def _bind(self, namespace: str, name: str) -> None:
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
        }
        self.core.create_namespaced_pod_binding(
            name, namespace, client.V1Binding.model_validate(binding), _preload_content=False
        )

    def _patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(
            name, namespace, {"status": dict(status)}, _content_type=MERGE_PATCH, _preload_content=False
        )

    def _finish_deletion(self, namespace: str, name: str, uid: str) -> None:
        with self._lock:
            run = self.runs.get(uid)
        if run is not None:
            self._kill(run)
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0, _preload_content=False)

    # ------------------------------------------------------------------ serving pods

    def _run_serving(self, pod: Mapping[str, Any], owner: Mapping[str, Any] | None) -> None:
        meta = pod["metadata"]
        deployment = None
        if owner is not None and owner["kind"] == "ReplicaSet":
            template_hash = meta.get("labels", {}).get("pod-template-hash", "")
            deployment = str(owner["name"]).removesuffix(f"-{template_hash}")
        ready = (meta["namespace"], deployment) not in self.never_ready
        self._patch_status(meta["namespace"], meta["name"], self._running_status(pod, ready=ready))

    # ------------------------------------------------------------------ training pods

    def _running_status(self, pod: Mapping[str, Any], *, ready: bool) -> dict[str, Any]:
        now = _now()
        flag = "True" if ready else "False"
        return {
            "phase": "Running",
            "startTime": now,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "Ready", "status": flag, "lastTransitionTime": now},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": ready,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
                for container in pod["spec"]["containers"]
            ],
        }

    def _container_env(self, container: Mapping[str, Any], scratch: Path, trainingrun: str) -> dict[str, str]:
        mounts = [mount["mountPath"] for mount in container.get("volumeMounts") or []]
        env: dict[str, str] = {
            key: value
            for key, value in os.environ.items()
            if key in {"PATH", "LANG", "LC_ALL"} or key.startswith("OPENBLAS_")
        }
        for item in container.get("env") or []:
            if "value" not in item:
                raise ValueError(f"env {item['name']}: only literal values are supported by the fake kubelet")
            value = str(item["value"])
            # An emptyDir mounted at /tmp becomes this pod's private directory on the host.
            for mount in mounts:
                if value == mount or value.startswith(mount.rstrip("/") + "/"):
                    value = str(scratch / value[len(mount) :].lstrip("/"))
            if value.startswith(BUNDLED_DATA_PREFIX):
                value = str(self.data_path)
            env[item["name"]] = value
        env["MLFLOW_TRACKING_URI"] = self.mlflow_url
        env["MNIST_NPZ"] = str(self.data_path)
        env["TRAIN_MAX_SAMPLES"] = str(self.max_train_samples)
        env["PYTHONPATH"] = str(REPO_ROOT)
        # The kubelet mounts a fresh file at terminationMessagePath for each container.
        env[TERMINATION_ENV] = str(scratch.parent / "termination-log")
        env.update(self.env_overrides.get(trainingrun, {}))
        return env

    def _start_training(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        trainingrun = str(meta.get("labels", {}).get("mnist-mlops.io/trainingrun", ""))
        workdir = self._root / f"{meta['namespace']}-{meta['name']}"
        scratch = workdir / "tmp"
        scratch.mkdir(parents=True)
        command = [*container.get("command", []), *container.get("args", [])]
        if command and command[0] in {"python", "python3"}:
            command[0] = self.python
        run = PodRun(
            namespace=meta["namespace"],
            pod=meta["name"],
            trainingrun=trainingrun,
            argv=command,
            env=self._container_env(container, scratch, trainingrun),
            workdir=workdir,
        )
        with self._lock:
            self.runs[meta["uid"]] = run
        thread = threading.Thread(
            target=self._train, args=(pod, run), name=f"pod-{meta['name']}", daemon=True
        )
        thread.start()

    def _train(self, pod: Mapping[str, Any], run: PodRun) -> None:
        started = _now()
        try:
            with run.log_path.open("wb") as log_file:
                run.process = subprocess.Popen(
                    run.argv,
                    env=run.env,
                    cwd=run.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self._patch_status(run.namespace, run.pod, self._running_status(pod, ready=True))
                run.exit_code = run.process.wait()
        except (OSError, ApiException) as error:
            self._error(f"pod {run.pod}: {error}")
            run.exit_code = run.exit_code if run.exit_code is not None else 128
        run.message = self._termination_message(run, pod["spec"]["containers"][0])
        run.finished.set()
        hold = self.holds.get(run.trainingrun)
        while hold is not None and not hold.wait(0.5):
            if self._stop.is_set():
                return
        succeeded = run.exit_code == 0
        terminated = {
            "exitCode": run.exit_code,
            "reason": "Completed" if succeeded else "Error",
            "message": run.message,
            "startedAt": started,
            "finishedAt": _now(),
        }
        container = pod["spec"]["containers"][0]
        status = {
            "phase": "Succeeded" if succeeded else "Failed",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                {"type": "Initialized", "status": "True", "lastTransitionTime": started},
                {
                    "type": "ContainersReady",
                    "status": "False",
                    "reason": "PodCompleted",
                    "lastTransitionTime": _now(),
                },
                {"type": "Ready", "status": "False", "reason": "PodCompleted", "lastTransitionTime": _now()},
            ],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
        try:
            self._patch_status(run.namespace, run.pod, status)
        except ApiException as error:
            if error.status != 404:
                self._error(f"pod {run.pod}: reporting its end failed: {error.status} {error.reason}")
        run.reported.set()

    def _termination_message(self, run: PodRun, container: Mapping[str, Any]) -> str:
        path = Path(run.env[TERMINATION_ENV])
        try:
            message = path.read_bytes()[:MESSAGE_LIMIT_BYTES].decode(errors="replace")
        except OSError:
            message = ""
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and fallback and run.exit_code != 0:
            lines = run.log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
            message = b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")
        return message

    def _kill(self, run: PodRun) -> None:
        process = run.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def all_finished(runs: Iterable[PodRun]) -> bool:
    return all(run.finished.is_set() for run in runs)
