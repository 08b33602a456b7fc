"""The end-to-end tier: the platform's own walk-through on a real node (tests/fixtures_node.py).

`helm install` the real chart into a restricted namespace, `kubectl apply` the seed's TrainingRuns
(scaled down through spec fields), and watch real pods train, register, promote and serve; then a
real Prometheus finds the serving pods, metrics-server feeds the HPA, `helm test`, faults on real
pods, `helm upgrade` to a newer MLflow image and `helm uninstall`. The tests run in file order and
share one installation: each step builds on the state the previous one left.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from contract.retraining import POLICY_LABEL, TRIGGER_ANNOTATION
from local_mode.processes import wait_until
from testing.alertmanager import Alertmanager, webhook_receiver
from testing.kubectl import kubectl, kubectl_watch
from testing.node import NodeCluster
from testing.peers import peer_python
from testing.postgres import PostgresServer
from testing.prometheus import Prometheus, scrape_job
from testing.upstream import prometheus_operator_crds

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "mnist-mlops"
TRAININGRUNS = REPO_ROOT / "manifests" / "trainingruns"
SAMPLE_DIGIT = json.loads((REPO_ROOT / "manifests" / "sample-digit.json").read_text())

NAMESPACE = "mnist-e2e"
RELEASE = "mnist-mlops"
STORAGE_CLASS = "local-e2e"
MODEL = "mnist-cnn"
# Scaled down through spec fields so that four real training pods finish in minutes on 2 cores.
EPOCHS = 1
MAX_TRAIN_SAMPLES = 2000
# A floor every briefly trained model clears: the gate then decides by beating the champion.
PROMOTION_MINIMUM = 0.5
FINAL_PHASES = {"Promoted", "Rejected", "RolledBack", "Failed"}
TRAINING_TIMEOUT_SECONDS = 900.0


def _repository_and_tag(ref: str) -> tuple[str, str]:
    repository, _, tag = ref.rpartition(":")
    return repository, tag


@dataclass
class Platform:
    cluster: NodeCluster

    def kubectl(self, *args: str, timeout: float = 120.0, input_text: str | None = None) -> str:
        return self.cluster.kubectl("-n", NAMESPACE, *args, timeout=timeout, input_text=input_text)

    def try_kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """kubectl whose failure is the expected outcome: the caller reads its exit code and stderr."""
        return kubectl(self.cluster.plane, "-n", NAMESPACE, *args)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def helm(
        self, *args: str, timeout: float = 600.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.cluster.plane.helm_path), *args, "--namespace", NAMESPACE],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.cluster.env(),
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def service_url(self, component: str) -> str:
        service = self.get("service", f"{RELEASE}-{component}")
        return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"

    def trainingrun(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.get("trainingrun", name)
        return found

    def mlflow_get(self, path: str, params: dict[str, str]) -> httpx.Response:
        """GET from MLflow through its Service, naming it as pods do: MLflow refuses Host headers
        other than its Service names (DNS-rebinding protection)."""
        service = self.get("service", f"{RELEASE}-mlflow")
        port = service["spec"]["ports"][0]["port"]
        return httpx.get(
            f"http://{service['spec']['clusterIP']}:{port}{path}",
            params=params,
            headers={"Host": f"{RELEASE}-mlflow.{NAMESPACE}.svc:{port}"},
            timeout=10,
        )

    def mlflow_rolled_out(self, timeout: int = 300) -> None:
        """The MLflow Deployment rolled out and answering through its Service. A ready pod is not yet a
        reachable one: until kube-proxy has synced the new endpoint, the Service has none and refuses
        connections (a clean run failed on exactly that, right after `helm upgrade`)."""
        self.rollout_status(f"{RELEASE}-mlflow", timeout=timeout)

        def answers() -> bool:
            try:
                return self.mlflow_get("/health", {}).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, 60, "MLflow to answer through its Service", 0.5)

    def champion_version(self) -> str:
        response = self.mlflow_get(
            "/api/2.0/mlflow/registered-models/alias", {"name": MODEL, "alias": "champion"}
        )
        assert response.status_code == 200, response.text
        return str(response.json()["model_version"]["version"])

    def serving_model_uri(self) -> str:
        """The model URI the serving Deployment's pod template names."""
        template = self.get("deployment", f"{RELEASE}-serving")["spec"]["template"]
        env = {item["name"]: item.get("value") for item in template["spec"]["containers"][0].get("env", [])}
        return str(env["SERVING_MODEL_URI"])

    def champion_if_from_run(self, run_id: str) -> str | None:
        """The champion's version if the MLflow run `run_id` registered it, else None."""
        response = self.mlflow_get(
            "/api/2.0/mlflow/registered-models/alias", {"name": MODEL, "alias": "champion"}
        )
        if response.status_code != 200:
            return None
        version = response.json()["model_version"]
        return str(version["version"]) if version.get("run_id") == run_id else None

    def rollout_status(self, deployment: str, timeout: int = 300) -> None:
        self.kubectl(
            "rollout", "status", f"deployment/{deployment}", f"--timeout={timeout}s", timeout=timeout + 30
        )

    def diagnostics(self) -> str:
        """What a person would look at first when a step fails."""
        parts = []
        for args in (
            ("get", "pods,jobs,trainingruns,deployments", "-o", "wide"),
            ("get", "events", "--sort-by=.lastTimestamp"),
        ):
            try:
                parts.append(self.kubectl(*args))
            except Exception as exc:  # diagnostics must never mask the failure being reported
                parts.append(f"<{' '.join(args)}: {exc}>")
        return "\n".join(parts)[-8000:]


def helm_values(images: dict[str, str], mlflow_ref: str) -> dict[str, Any]:
    operator_repo, operator_tag = _repository_and_tag(images["operator"])
    training_repo, training_tag = _repository_and_tag(images["training"])
    serving_repo, serving_tag = _repository_and_tag(images["serving"])
    mlflow_repo, mlflow_tag = _repository_and_tag(mlflow_ref)
    return {
        "operator": {
            "image": {"repository": operator_repo, "tag": operator_tag},
            "training": {
                "image": {"repository": training_repo, "tag": training_tag},
                # Two cores in all: four training pods queue rather than all start at once.
                "defaultResources": {"cpu": "500m", "memory": "3Gi"},
            },
            "progressIntervalSeconds": 5,
            "rolloutTimeoutSeconds": 300,
            # MLflow's registry webhooks into the operator, as a user turns them on: an alias moved by
            # hand reaches the pods at once (the periodic check stays the fallback).
            "mlflowWebhook": {"enabled": True},
        },
        "serving": {
            "image": {"repository": serving_repo, "tag": serving_tag},
            # Short windows so the scale-up and scale-down test takes minutes, not the defaults' five.
            "autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 3,
                "behavior": {
                    "scaleUp": {"stabilizationWindowSeconds": 0},
                    "scaleDown": {"stabilizationWindowSeconds": 20},
                },
            },
            "resources": {"requests": {"cpu": "50m", "memory": "192Mi"}},
        },
        "mlflow": {
            "image": {"repository": mlflow_repo, "tag": mlflow_tag, "extrasSuffix": ""},
            "workers": 1,
            "persistence": {"storageClass": STORAGE_CLASS, "size": "2Gi"},
            "resources": {"requests": {"cpu": "50m", "memory": "384Mi"}},
        },
    }


@pytest.fixture(scope="module")
def platform(node_cluster: NodeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    cluster = node_cluster
    home = tmp_path_factory.mktemp("helm")
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl(
        "label", "namespace", NAMESPACE,
        "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted",
    )  # fmt: skip
    # The real prometheus-operator CRDs, so the chart's ServiceMonitor and PrometheusRule install.
    for crd in prometheus_operator_crds():
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    cluster.local_volume("mlflow-e2e", "2Gi", STORAGE_CLASS)
    values = home / "values.yaml"
    values.write_text(yaml.safe_dump(helm_values(cluster.images, cluster.images["mlflow_previous"])))
    found = Platform(cluster=cluster)
    found.helm("install", RELEASE, str(CHART), "-f", str(values))
    try:
        yield found
    finally:
        found.helm("uninstall", RELEASE, "--wait", "--timeout", "3m", check=False)
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", "--ignore-not-found")


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_platform_pods_run_restricted_on_the_real_kubelet(platform: Platform) -> None:
    try:
        platform.mlflow_rolled_out()
        platform.rollout_status(f"{RELEASE}-operator", timeout=180)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{platform.diagnostics()}") from exc
    namespace = platform.cluster.get_json("namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for component in ("mlflow", "operator"):
        pods = platform.get("pods", "-l", f"app.kubernetes.io/component={component}")["items"]
        assert pods and all(_ready(pod) for pod in pods), f"{component}: {pods}"
        deployment = f"deployment/{RELEASE}-{component}"
        # The kubelet ran the container as the images' user, on a read-only root filesystem.
        assert platform.kubectl("exec", deployment, "--", "id", "-u").strip() == "10001"
        denied = platform.try_kubectl("exec", deployment, "--", "touch", "/opt/written")
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, denied.stderr
    # MLflow's claim is bound to the local PersistentVolume on the node.
    claim = platform.get("pvc", "-l", "app.kubernetes.io/component=mlflow")["items"][0]
    assert claim["status"]["phase"] == "Bound" and claim["spec"]["volumeName"] == "mlflow-e2e"


def test_cluster_dns_resolves_the_charts_service_names(platform: Platform) -> None:
    script = (
        "import socket; "
        f"print(socket.gethostbyname('{RELEASE}-mlflow'), "
        f"socket.gethostbyname('{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local'))"
    )
    out = platform.kubectl("exec", f"deployment/{RELEASE}-operator", "--", "python", "-c", script).split()
    mlflow_ip = platform.get("service", f"{RELEASE}-mlflow")["spec"]["clusterIP"]
    assert out == [mlflow_ip, mlflow_ip]


def _scaled_trainingruns() -> list[dict[str, Any]]:
    runs = []
    for path in sorted(TRAININGRUNS.glob("*.yaml")):
        run = yaml.safe_load(path.read_text())
        run["spec"]["hyperparameters"]["epochs"] = EPOCHS
        run["spec"]["maxTrainSamples"] = MAX_TRAIN_SAMPLES
        run["spec"]["promotion"]["minimum"] = PROMOTION_MINIMUM
        runs.append(run)
    return runs


@pytest.fixture(scope="module")
def trained(platform: Platform) -> dict[str, dict[str, Any]]:
    """Applies the four seed TrainingRuns and waits for each to reach a final phase."""
    runs = _scaled_trainingruns()
    platform.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(runs))
    names = [run["metadata"]["name"] for run in runs]

    def all_final() -> dict[str, dict[str, Any]] | None:
        found = {name: platform.trainingrun(name) for name in names}
        if all(run.get("status", {}).get("phase") in FINAL_PHASES for run in found.values()):
            return found
        return None

    try:
        final: dict[str, dict[str, Any]] = wait_until(
            all_final, TRAINING_TIMEOUT_SECONDS, "every TrainingRun to finish", interval=5
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{platform.diagnostics()}") from exc
    return final


def test_trainingruns_train_in_real_pods_and_the_gate_decides(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    phases = {name: run["status"]["phase"] for name, run in trained.items()}
    assert "Failed" not in phases.values(), f"{phases}\n{platform.diagnostics()}"
    assert "Promoted" in phases.values(), phases
    for name, run in trained.items():
        status = run["status"]
        assert status.get("modelVersion"), f"{name} registered no version: {status}"
        # The Job's pod really ran the training image on the node.
        pods = platform.get("pods", "-l", f"job-name={status['jobName']}")["items"]
        assert any(pod["status"]["phase"] == "Succeeded" for pod in pods), f"{name}: {pods}"
        assert pods[0]["spec"]["containers"][0]["image"].endswith(
            _repository_and_tag(platform.cluster.images["training"])[1]
        )


def test_serving_pods_serve_the_pinned_champion(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    champion = platform.champion_version()
    deployment_name = f"{RELEASE}-serving"
    try:
        platform.rollout_status(deployment_name, timeout=300)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{platform.diagnostics()}") from exc
    # The pod template names the exact version, so the rollout history is the model's history.
    assert platform.serving_model_uri() == f"models:/{MODEL}/{champion}"
    url = platform.service_url("serving")
    answers = set()
    for _ in range(10):
        response = httpx.post(f"{url}/predict", json=SAMPLE_DIGIT, timeout=10)
        assert response.status_code == 200, response.text
        answers.add((response.headers["X-Model-Version"], response.json()["digit"]))
    assert {version for version, _ in answers} == {champion}


# Triton's own gRPC client, unmodified, in its virtualenv (testing/peers.py): the chart's `grpc` port
# must reach the pods' OIP service through the Service, as a mesh or an in-cluster client would use it.
TRITON_GRPC_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
address, model, pixels = sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())
client = triton.InferenceServerClient(address)
tensor = triton.InferInput("image", [1, 784], "UINT8")
tensor.set_data_from_numpy(np.asarray(pixels, dtype=np.uint8).reshape(1, 784))
result = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput("predicted_digit")])
print(json.dumps({
    "ready": client.is_server_ready(),
    "version": result.get_response().model_version,
    "digit": int(result.as_numpy("predicted_digit")[0]),
}))
"""


def test_serving_answers_tritons_grpc_client_through_the_service(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    champion = platform.champion_version()
    platform.rollout_status(f"{RELEASE}-serving", timeout=300)
    service = platform.get("service", f"{RELEASE}-serving")
    grpc_port = next(port["port"] for port in service["spec"]["ports"] if port["name"] == "grpc")
    rest = httpx.post(f"{platform.service_url('serving')}/predict", json=SAMPLE_DIGIT, timeout=10)
    assert rest.status_code == 200, rest.text
    completed = subprocess.run(
        [
            str(peer_python("tritonclient")),
            "-c",
            TRITON_GRPC_SCRIPT,
            f"{service['spec']['clusterIP']}:{grpc_port}",
            MODEL,
        ],
        input=json.dumps(SAMPLE_DIGIT["pixels"]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    answer = json.loads(completed.stdout)
    assert answer == {"ready": True, "version": champion, "digit": rest.json()["digit"]}


def test_prometheus_discovers_serving_pods_through_the_api(
    platform: Platform, trained: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    monitor = platform.get("servicemonitor", f"{RELEASE}-serving")
    prometheus = Prometheus(
        [scrape_job(monitor, platform.cluster.kubeconfig_path, interval="2s")],
        tmp_path,
        binary=platform.cluster.plane.bin_dir / "prometheus",
    )
    try:
        serving_pods = {pod["metadata"]["name"] for pod in platform.get(
            "pods", "-l", "app.kubernetes.io/component=serving")["items"] if _ready(pod)}  # fmt: skip

        def every_pod_up() -> bool:
            up = prometheus.query(f'up{{namespace="{NAMESPACE}", job="{RELEASE}-serving"}}')
            return {s["metric"]["pod"] for s in up if s["value"][1] == "1"} >= serving_pods

        wait_until(every_pod_up, 60, f"Prometheus to scrape {serving_pods}", interval=1)
        total = f'sum(mnist_predictions_total{{namespace="{NAMESPACE}"}})'
        before = float(prometheus.query(total)[0]["value"][1])
        url = platform.service_url("serving")
        for _ in range(20):
            assert httpx.post(f"{url}/predict", json=SAMPLE_DIGIT, timeout=10).status_code == 200

        def risen_by_all_twenty() -> bool:
            samples = prometheus.query(total)
            return bool(samples) and float(samples[0]["value"][1]) - before >= 20

        wait_until(risen_by_all_twenty, 30, "mnist_predictions_total to rise by the 20 predictions", 1)
        labelled = prometheus.query(f'mnist_model_ready{{namespace="{NAMESPACE}"}}')
        champion = platform.champion_version()
        assert labelled and all(s["metric"].get("model_version") == champion for s in labelled), labelled
        assert all(s["metric"].get("registered_model") == MODEL for s in labelled), labelled
    finally:
        prometheus.stop()


def test_metrics_server_feeds_the_hpa(platform: Platform, trained: dict[str, dict[str, Any]]) -> None:
    def cpu_seen() -> dict[str, Any] | None:
        hpa = platform.get("hpa", f"{RELEASE}-serving")
        for metric in hpa.get("status", {}).get("currentMetrics") or []:
            if metric.get("resource", {}).get("name") == "cpu":
                found: dict[str, Any] = metric
                return found
        return None

    metric = wait_until(cpu_seen, 150, "the HPA to read the serving pods' CPU", interval=5)
    assert "averageUtilization" in metric["resource"]["current"], metric
    top = platform.kubectl("top", "pods", "-l", "app.kubernetes.io/component=serving", "--no-headers")
    assert len(top.strip().splitlines()) >= 2, top


def test_the_cpu_hpa_scales_serving_up_under_load_and_back_down(
    platform: Platform, trained: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    deployment = f"{RELEASE}-serving"

    def replicas() -> int:
        return int(platform.get("deployment", deployment)["spec"]["replicas"])

    def hpa_status() -> str:
        return json.dumps(platform.get("hpa", deployment).get("status", {}))

    baseline = replicas()
    assert baseline == 2, f"the HPA's minimum, before any load: {baseline}"
    body = tmp_path / "digit.json"
    body.write_text(json.dumps(SAMPLE_DIGIT))
    url = platform.service_url("serving")
    started = time.monotonic()
    result: dict[str, dict[str, float]] = {}
    # The load lasts until the HPA has added a pod (at most 120 s): what follows only waits for the
    # scale-down, and load past the scale-up would only delay it.
    stop_load = threading.Event()
    load = threading.Thread(
        target=lambda: result.update(load=_wrk(url, 120, body, connections=8, stop=stop_load))
    )
    load.start()

    def scaled_up() -> int:
        count = replicas()
        return count if count > baseline else 0

    try:
        peak = wait_until(scaled_up, 110, "the HPA to add a serving pod under load", interval=3)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nHPA status: {hpa_status()}") from exc
    finally:
        stop_load.set()
    up_seconds = time.monotonic() - started
    load.join(timeout=200)
    assert result["load"]["requests"] > 1000, result
    stopped = time.monotonic()
    try:
        wait_until(
            lambda: replicas() == baseline, 240, "the HPA to scale back down after the load", interval=5
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nHPA status: {hpa_status()}") from exc
    print(
        f"\nHPA: {baseline} -> {peak} pods {up_seconds:.0f} s into the load,"
        f" back to {baseline} {time.monotonic() - stopped:.0f} s after it"
    )
    platform.rollout_status(deployment, timeout=180)

    def only_the_baseline_pods_left() -> bool:
        pods = platform.get("pods", "-l", "app.kubernetes.io/component=serving")["items"]
        return len(pods) == baseline

    # The removed pod is gone, not just terminating, before the next test counts pods.
    wait_until(only_the_baseline_pods_left, 120, "the scaled-down pod to go", interval=2)


def test_helm_test_passes(platform: Platform, trained: dict[str, dict[str, Any]]) -> None:
    result = platform.helm("test", RELEASE, "--timeout", "3m", check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{platform.diagnostics()}"
    assert "Phase:          Succeeded" in result.stdout, result.stdout


def _wrk(
    url: str, seconds: int, body: Path, connections: int = 4, stop: threading.Event | None = None
) -> dict[str, float]:
    """wrk with one thread and `connections` connections POSTing the sample digit for `seconds`, or
    until `stop` is set; counts what failed."""
    script = body.parent / "post.lua"
    # Read from the file: the digit's nested JSON arrays end in "]]", which would close a Lua
    # long string literal early.
    script.write_text(
        'wrk.method = "POST"\n'
        f'local body = io.open("{body}"):read("*a")\n'
        "wrk.body = body\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    wrk = shutil.which("wrk")
    assert wrk, "wrk is missing (scripts/install-system-deps.sh)"
    process = subprocess.Popen(
        [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
         f"{url}/predict"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if stop is not None and stop.wait(seconds) and process.poll() is None:
        # SIGINT ends wrk early, and it prints the same summary as at the end of -d.
        process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    assert process.returncode == 0, f"wrk exited with {process.returncode}: {err}"
    requests = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(n) for n in errors.groups()) if errors else 0
    return {"requests": requests, "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
            "socket_errors": float(socket_errors)}  # fmt: skip


def test_fault_serving_pod_deleted_under_load(
    platform: Platform, trained: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    body = tmp_path / "digit.json"
    body.write_text(json.dumps(SAMPLE_DIGIT))
    url = platform.service_url("serving")
    # Running pods only: a pod an earlier scale-down is still terminating is not one to delete.
    pods = [
        p["metadata"]["name"]
        for p in platform.get("pods", "-l", "app.kubernetes.io/component=serving")["items"]
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]
    assert len(pods) >= 2, pods
    result: dict[str, dict[str, float]] = {}
    load = threading.Thread(target=lambda: result.update(load=_wrk(url, 20, body)))
    load.start()
    time.sleep(5)
    platform.kubectl("delete", "pod", pods[0], "--wait=false")
    load.join(timeout=90)
    outcome = result["load"]
    failed = outcome["non_2xx"] + outcome["socket_errors"]
    print(f"\nserving pod deleted under load: {outcome}")
    assert outcome["requests"] > 100, outcome
    # The PDB keeps one pod serving and readiness takes the deleted one out of the Service; a
    # request in flight on a closing keep-alive connection is what may still fail.
    assert failed <= 0.01 * outcome["requests"], outcome
    platform.rollout_status(f"{RELEASE}-serving", timeout=180)


def _final(platform: Platform, name: str, timeout: float = TRAINING_TIMEOUT_SECONDS) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        run = platform.trainingrun(name)
        return run if run.get("status", {}).get("phase") in FINAL_PHASES else None

    try:
        found: dict[str, Any] = wait_until(final, timeout, f"TrainingRun {name} to finish", interval=3)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{platform.diagnostics()}") from exc
    return found


def _fault_run(name: str, epochs: int) -> dict[str, Any]:
    """A baseline run that is promoted whatever the champion scores (the gate is not under test)."""
    return {
        "apiVersion": "mnist-mlops.io/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "architecture": "baseline",
            "hyperparameters": {"epochs": epochs},
            "maxTrainSamples": MAX_TRAIN_SAMPLES,
            "registeredModel": MODEL,
            "promotion": {"metric": "test_accuracy", "minimum": PROMOTION_MINIMUM, "mustBeatChampion": False},
        },
    }


def _model_version_exists(platform: Platform, version: str) -> bool:
    response = platform.mlflow_get("/api/2.0/mlflow/model-versions/get", {"name": MODEL, "version": version})
    return response.status_code == 200


def _versions(platform: Platform) -> set[str]:
    response = platform.mlflow_get("/api/2.0/mlflow/model-versions/search", {"filter": f"name='{MODEL}'"})
    assert response.status_code == 200, response.text
    return {str(version["version"]) for version in response.json().get("model_versions", [])}


def test_two_workers_train_in_two_real_pods_and_register_one_version(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    name = "two-workers"
    run = _fault_run(name, epochs=1)
    run["spec"]["workers"] = 2
    run["spec"]["hyperparameters"]["batchSize"] = 64
    # Judged but never promoted, so the serving pods later tests look at stay as they are.
    run["spec"]["promotion"] = {"minimum": 0.999}
    before = _versions(platform)
    platform.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(run))
    final = _final(platform, name)
    status = final["status"]
    assert status["phase"] == "Rejected", f"{status}\n{platform.diagnostics()}"
    pods = platform.get("pods", "-l", f"job-name={status['jobName']}")["items"]
    indexes = sorted(
        pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for pod in pods
    )
    assert indexes == ["0", "1"], pods
    assert all(pod["status"]["phase"] == "Succeeded" for pod in pods), [p["status"] for p in pods]
    # The workers found each other through the headless Service's DNS names.
    assert platform.get("service", f"{name}-workers")["spec"]["clusterIP"] == "None"
    added = _versions(platform) - before
    assert added == {status["modelVersion"]}, f"exactly one version, from worker 0: {added}"


def test_fault_mlflow_pod_killed_while_a_job_trains(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    name = "fault-mlflow"
    platform.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(_fault_run(name, epochs=3)))
    # Killed once the run logs to MLflow: its MLflow run exists and epochs are being reported.
    wait_until(
        lambda: platform.trainingrun(name).get("status", {}).get("mlflowRunId"),
        TRAINING_TIMEOUT_SECONDS,
        "the training pod to start its MLflow run",
        interval=1,
    )
    killed = platform.get("pods", "-l", "app.kubernetes.io/component=mlflow")["items"][0]["metadata"]["name"]
    platform.kubectl("delete", "pod", killed, "--grace-period=0", "--force")
    run = _final(platform, name)
    status = run["status"]
    job = platform.get("job", status["jobName"])
    failures = job["status"].get("failed", 0)
    print(f"\nMLflow killed during training: phase {status['phase']}, failed Job pods {failures}")
    if status["phase"] == "Failed":
        # Reported, with the reason: not silently lost.
        assert status.get("message"), status
    else:
        assert status["phase"] in {"Promoted", "RolledBack"}, status
        assert _model_version_exists(platform, status["modelVersion"]), status
    platform.mlflow_rolled_out()


FREEZE_POLICY = "e2e-hold-serving-template"


def _hold_serving_template() -> list[dict[str, Any]]:
    """A ValidatingAdmissionPolicy that refuses changes to the serving pod template: the window
    between the alias move and the rollout, held open so the operator can be killed inside it."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": FREEZE_POLICY},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["apps"],
                            "apiVersions": ["v1"],
                            "operations": ["UPDATE"],
                            "resources": ["deployments"],
                        }
                    ]
                },
                "matchConditions": [
                    {"name": "serving", "expression": f"object.metadata.name == '{RELEASE}-serving'"}
                ],
                "validations": [
                    {
                        "expression": "object.spec.template == oldObject.spec.template",
                        "message": "the end-to-end test holds the serving pod template",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": FREEZE_POLICY},
            "spec": {
                "policyName": FREEZE_POLICY,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
                },
            },
        },
    ]


def test_fault_operator_killed_between_promotion_and_rollout(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    deployment = f"{RELEASE}-serving"
    platform.cluster.apply(_hold_serving_template())
    probe = json.dumps({"spec": {"template": {"metadata": {"annotations": {"e2e/probe": str(time.time())}}}}})

    def policy_active() -> bool:
        result = platform.try_kubectl("patch", "deployment", deployment, "--dry-run=server", "-p", probe)
        return result.returncode != 0 and "holds the serving pod template" in result.stderr

    wait_until(policy_active, 30, "the admission policy to take effect", interval=1)
    name = "fault-operator"
    released = False
    try:
        platform.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(_fault_run(name, epochs=1)))
        run_id = wait_until(
            lambda: platform.trainingrun(name).get("status", {}).get("mlflowRunId"),
            TRAINING_TIMEOUT_SECONDS,
            "the run to start logging to MLflow",
            interval=2,
        )
        # The operator records the promotion on the TrainingRun only once a whole step succeeds,
        # and the held template makes the rollout step fail: the registry is where the promotion
        # shows first.
        version = wait_until(
            lambda: platform.champion_if_from_run(run_id),
            600,
            f"run {run_id}'s version to become champion",
            1,
        )
        # Promoted in the registry, yet serving still runs the previous version: the window.
        assert platform.serving_model_uri() != f"models:/{MODEL}/{version}"
        operator_pod = platform.get("pods", "-l", "app.kubernetes.io/component=operator")["items"][0]
        platform.kubectl("delete", "pod", operator_pod["metadata"]["name"], "--grace-period=0", "--force")
        platform.cluster.kubectl(
            "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", FREEZE_POLICY
        )
        released = True
        run = _final(platform, name, timeout=300)
        assert run["status"]["phase"] == "Promoted", run["status"]
        platform.rollout_status(deployment, timeout=300)
        assert platform.serving_model_uri() == f"models:/{MODEL}/{version}"
        response = httpx.post(f"{platform.service_url('serving')}/predict", json=SAMPLE_DIGIT, timeout=10)
        assert response.headers["X-Model-Version"] == version
    finally:
        if not released:
            platform.cluster.kubectl(
                "delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", FREEZE_POLICY,
                "--ignore-not-found",
            )  # fmt: skip


def _mnist_test_payloads(count: int) -> list[dict[str, Any]]:
    """`count` MNIST test digits as /predict bodies: varied digits, so the canary's digit-mix check has
    something to compare."""
    import numpy as np

    with np.load(REPO_ROOT / "data" / "mnist.npz") as data:
        images = data["x_test"][:count]
    return [{"pixels": image.astype(int).tolist()} for image in images]


def test_a_canary_rollout_steps_up_on_live_metrics_and_promotes(
    platform: Platform, trained: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """One canary end to end on the real node: the operator pod reads a real Prometheus that scrapes
    the serving pods (listening on the node's bridge address, where pods reach it), the serving pods
    split live traffic by the registry's traffic tag, and the run ends Promoted with the pods pinned."""
    from testing.node import NODE_IP

    monitor = platform.get("servicemonitor", f"{RELEASE}-serving")
    prometheus = Prometheus(
        [scrape_job(monitor, platform.cluster.kubeconfig_path, interval="1s")],
        tmp_path / "prometheus",
        binary=platform.cluster.plane.bin_dir / "prometheus",
        scrape_interval="1s",
        listen_host=NODE_IP,
    )
    name = "canary-e2e"
    stop = threading.Event()
    answered: dict[str, int] = {}
    watch = None
    url = platform.service_url("serving")
    payloads = _mnist_test_payloads(200)

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            index = 0
            while not stop.is_set():
                response = client.post(f"{url}/predict", json=payloads[index % len(payloads)])
                index += 1
                if response.status_code == 200:
                    version = response.headers["X-Model-Version"]
                    answered[version] = answered.get(version, 0) + 1
                time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    try:
        analysed_by = f"operator.prometheusUrl={prometheus.url}"
        platform.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", analysed_by)
        platform.rollout_status(f"{RELEASE}-operator", timeout=300)
        stable = platform.champion_version()
        run = _fault_run(name, epochs=1)
        run["spec"]["rollout"] = {
            "strategy": "canary",
            "steps": [{"weight": 50, "holdSeconds": 20}],
            # The check thresholds are loose: this test is about the mechanism on real pods (weights,
            # Prometheus, the analysis, the promotion); the fast tier tests each check's verdict.
            "analysis": {
                "maxP99LatencyRatio": 20,
                "p99LatencyFloorMs": 200,
                "maxConfidenceDrop": 0.5,
                "maxDigitDivergence": 0.5,
                "minRequests": 20,
            },
        }
        sender.start()
        platform.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(run))
        watch = kubectl_watch(platform.cluster.plane, "-n", NAMESPACE, "get", "trainingrun", name, "-w")
        final = _final(platform, name)
        status = final["status"]
        assert status["phase"] == "Promoted", f"{status}\n{platform.diagnostics()}"
        version = str(status["modelVersion"])
        analyses = status["traffic"]["analyses"]
        assert analyses and all(record["passed"] for record in analyses), analyses
        # During the step both versions answered live requests: the pods split the traffic.
        assert answered.get(version, 0) > 0 and answered.get(stable, 0) > 0, answered
        platform.rollout_status(f"{RELEASE}-serving", timeout=300)
        assert platform.serving_model_uri() == f"models:/{MODEL}/{version}"
        response = httpx.post(f"{url}/predict", json=SAMPLE_DIGIT, timeout=10)
        assert response.headers["X-Model-Version"] == version
    finally:
        stop.set()
        if sender.is_alive():
            sender.join(timeout=15)
        if watch is not None:
            watch.terminate()
            recorded = watch.communicate(timeout=10)[0]
            print(f"\nkubectl get trainingrun {name} -w:\n{recorded}")
        print(f"answers by version: {answered}")
        prometheus.stop()


def test_an_alias_moved_outside_the_operator_reaches_the_pods(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    """The champion alias moved by hand through MLflow's own REST API, as the MLflow UI or client would:
    MLflow's webhook (HMAC-signed, registered by the operator at start-up) or the periodic check rolls
    serving to that exact version, and the operator confirms it from the pods' own /health."""
    deployment = f"{RELEASE}-serving"
    champion = platform.champion_version()
    earlier = max((version for version in _versions(platform) if version != champion), key=int)
    service = platform.get("service", f"{RELEASE}-mlflow")
    port = service["spec"]["ports"][0]["port"]
    moved = time.monotonic()
    response = httpx.post(
        f"http://{service['spec']['clusterIP']}:{port}/api/2.0/mlflow/registered-models/alias",
        json={"name": MODEL, "alias": "champion", "version": earlier},
        headers={"Host": f"{RELEASE}-mlflow.{NAMESPACE}.svc:{port}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    url = platform.service_url("serving")

    def every_answer_from_the_moved_version() -> bool:
        versions = {
            httpx.post(f"{url}/predict", json=SAMPLE_DIGIT, timeout=10).headers.get("X-Model-Version")
            for _ in range(6)
        }
        return versions == {earlier}

    try:
        wait_until(every_answer_from_the_moved_version, 120, f"serving to answer with version {earlier}", 0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{platform.diagnostics()}") from exc
    seconds = time.monotonic() - moved
    events = platform.kubectl("get", "events", "--field-selector", f"involvedObject.name={deployment}")
    print(f"\nalias moved to {earlier} by hand; every answer from it after {seconds:.1f} s\n{events[-1500:]}")
    assert seconds <= 60, f"the pods served the moved alias only after {seconds:.1f} s"
    assert platform.serving_model_uri() == f"models:/{MODEL}/{earlier}"

    def confirmed() -> str | None:
        annotations = platform.get("deployment", deployment)["metadata"].get("annotations") or {}
        return annotations.get("mnist-mlops.io/confirmed-version")

    assert wait_until(lambda: confirmed() == earlier, 60, "the pods' version confirmed", 1)


LOOP_POLICY = "drift-retrain"
DRIFT_ALERT = "MnistInputDrift"
PREDICTION_LOG_SECRET = "prediction-log"
LOOP_QUIET, LOOP_DRIFTED, LOOP_LABELLED = 400, 400, 100
# The drift job's window, cut to what a test sends in seconds: 300 inputs (the chart's default is
# 500) of the last 5 minutes, evaluated every 3 s; the alert's `for` cut from 5 minutes to 10 s.
LOOP_VALUES = {
    "drift.intervalSeconds": "3",
    "drift.windowSeconds": "300",
    "drift.windowSamples": "300",
    "monitoring.prometheusRule.thresholds.driftFor": "10s",
}


@dataclass
class PredictionLogDatabase:
    server: PostgresServer
    url: str

    def count(self, *, labelled: bool = False) -> int:
        # Serving creates the table with its first write: until then, nothing is logged.
        if self.server.psql("SELECT to_regclass('predictions') IS NULL", "predictions").strip() == "t":
            return 0
        query = "SELECT count(label) FROM predictions" if labelled else "SELECT count(*) FROM predictions"
        return int(self.server.psql(query, "predictions"))


@pytest.fixture(scope="module")
def prediction_log_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PredictionLogDatabase]:
    """A real PostgreSQL on the node's bridge address, where pods reach it (as they reach a database
    outside the cluster): the prediction log of serving, the drift job and the training Jobs. It
    outlives the test that turns the log on, as a database outlives the pods writing to it."""
    from testing.node import NODE_IP, POD_SUBNET

    server = PostgresServer.start(
        tmp_path_factory.mktemp("postgres"), listen_host=NODE_IP, client_networks=[POD_SUBNET]
    )
    try:
        yield PredictionLogDatabase(server, server.create_database("predictions"))
    finally:
        server.stop()


def _prometheus_value(prometheus: Prometheus, expr: str) -> float | None:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else None


def test_the_loop_closes_on_the_real_node(
    platform: Platform,
    trained: dict[str, dict[str, Any]],
    prediction_log_database: PredictionLogDatabase,
    tmp_path: Path,
) -> None:
    """serve → log → detect → label → retrain → gate, on real pods: the serving pods log every
    prediction to PostgreSQL, the chart's drift Deployment tests windows of the log, a real Prometheus
    evaluates the chart's own MnistInputDrift rule (as installed) and a real Alertmanager delivers it
    to the operator's webhook with the chart's bearer token; the RetrainingPolicy's TrainingRun trains
    in a Job pod on the labels sent to POST /feedback, and the usual gate decides."""
    import numpy as np

    from local_mode.loop import drift_images, send_feedback, send_traffic

    log_url = prediction_log_database.url
    platform.kubectl("create", "secret", "generic", PREDICTION_LOG_SECRET, f"--from-literal=url={log_url}")
    settings = {
        "serving.predictionLog.enabled": "true",
        "serving.predictionLog.existingSecret": PREDICTION_LOG_SECRET,
        "operator.alertmanagerWebhook.enabled": "true",
        **LOOP_VALUES,
    }
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    platform.helm("upgrade", RELEASE, str(CHART), "--reuse-values", *overrides)
    try:
        for component in ("operator", "serving", "drift"):
            platform.rollout_status(f"{RELEASE}-{component}", timeout=420)
    except Exception as exc:
        raise AssertionError(f"{exc}\n{platform.diagnostics()}") from exc

    secret = platform.get("secret", f"{RELEASE}-alertmanager-webhook")
    token = base64.b64decode(secret["data"]["token"]).decode()
    alertmanager = Alertmanager(
        [webhook_receiver("operator", f"{platform.service_url('operator')}/webhooks/alertmanager", token)],
        tmp_path / "alertmanager",
    )
    (rule,) = platform.get("prometheusrules")["items"]
    groups = [group for group in rule["spec"]["groups"] if group["name"] == "mnist-drift"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    kubeconfig = platform.cluster.kubeconfig_path
    jobs = [
        scrape_job(platform.get("servicemonitor", f"{RELEASE}-{component}"), kubeconfig, interval="1s")
        for component in ("serving", "drift")
    ]
    prometheus = Prometheus(
        jobs, tmp_path / "prometheus", binary=platform.cluster.plane.bin_dir / "prometheus",
        scrape_interval="1s", rule_files=[rules], alertmanagers=[alertmanager.address],
    )  # fmt: skip
    drift_job = f'job="{RELEASE}-drift", namespace="{NAMESPACE}"'
    policy = {
        "apiVersion": "mnist-mlops.io/v1alpha1",
        "kind": "RetrainingPolicy",
        "metadata": {"name": LOOP_POLICY},
        "spec": {
            "triggers": {"alert": {"names": [DRIFT_ALERT]}},
            "trainingRunTemplate": {
                "architecture": "baseline",
                "hyperparameters": {"epochs": EPOCHS},
                "maxTrainSamples": MAX_TRAIN_SAMPLES,
                "registeredModel": MODEL,
                "includeFeedback": True,
                "promotion": {"metric": "test_accuracy", "minimum": PROMOTION_MINIMUM},
            },
        },
    }
    url = platform.service_url("serving")

    def every_pod_answers() -> bool:
        # Rolled out is not yet reachable: kube-proxy may still route to a pod that has stopped.
        try:
            return all(httpx.get(f"{url}/health/ready", timeout=5).status_code == 200 for _ in range(10))
        except httpx.TransportError:
            return False

    wait_until(every_pod_answers, 60, "the rolled serving pods to answer through the Service", 0.5)
    with np.load(REPO_ROOT / "data" / "mnist.npz") as data:
        x_test, y_test = data["x_test"], data["y_test"].astype(np.int64)
    # Drawn from the whole test set: its two halves come from different writers, and a window from
    # one half alone is a real shift (README, drift detection).
    rng = np.random.default_rng(11)
    order = rng.permutation(len(x_test))
    quiet, drifted = order[:LOOP_QUIET], order[LOOP_QUIET : LOOP_QUIET + LOOP_DRIFTED]
    try:
        platform.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(policy))

        send_traffic(url, x_test[quiet], "e2e-quiet")
        wait_until(
            lambda: prediction_log_database.count() == LOOP_QUIET, 30, "the quiet traffic in the log", 0.5
        )
        wait_until(
            lambda: (_prometheus_value(prometheus, f"mnist_drift_window_samples{{{drift_job}}}") or 0) >= 300,
            180, "the drift job to evaluate a full window of the quiet traffic", 1,
        )  # fmt: skip
        quiet_p = _prometheus_value(prometheus, f'mnist_drift_p_value{{{drift_job}, test="combined"}}')
        assert _prometheus_value(prometheus, f"mnist_drift_detected{{{drift_job}}}") == 0, quiet_p
        assert not platform.get("trainingruns", "-l", f"{POLICY_LABEL}={LOOP_POLICY}")["items"]

        images = drift_images(x_test[drifted], 30.0, rng)
        drift_started = time.monotonic()
        answers = send_traffic(url, images, "e2e-drift")
        wait_until(
            lambda: prediction_log_database.count() == LOOP_QUIET + LOOP_DRIFTED, 30,
            "the drifted traffic in the log", 0.2,
        )  # fmt: skip
        outcomes = send_feedback(url, answers.request_ids[:LOOP_LABELLED], y_test[drifted][:LOOP_LABELLED])
        labelled_after = time.monotonic() - drift_started
        assert outcomes == {"created": LOOP_LABELLED}, outcomes
        assert prediction_log_database.count(labelled=True) == LOOP_LABELLED

        def policy_run() -> dict[str, Any] | None:
            runs = platform.get("trainingruns", "-l", f"{POLICY_LABEL}={LOOP_POLICY}")["items"]
            return runs[0] if runs else None

        try:
            run = wait_until(policy_run, 300, "the drift alert to create a TrainingRun", 1)
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}\nPrometheus alerts: {prometheus.alerts()}\nAlertmanager:\n{alertmanager.log_tail()}"
                f"\n{platform.diagnostics()}"
            ) from exc
        triggered_after = time.monotonic() - drift_started
        drift_p = _prometheus_value(prometheus, f'mnist_drift_p_value{{{drift_job}, test="combined"}}')
        assert _prometheus_value(prometheus, f"mnist_drift_detected{{{drift_job}}}") == 1
        assert run["metadata"]["annotations"][TRIGGER_ANNOTATION] == f"alert:{DRIFT_ALERT}"
        assert run["spec"]["includeFeedback"] is True
        # The labels were in the log before the alert could fire (its `for` alone is 10 s), so the
        # run must train on every one of them.
        assert labelled_after < triggered_after, (labelled_after, triggered_after)

        name = run["metadata"]["name"]
        final = _final(platform, name)
        status = final["status"]
        decided = {"Promoted", "Rejected", "RolledBack"}
        assert status["phase"] in decided, f"{status}\n{platform.diagnostics()}"
        response = platform.mlflow_get("/api/2.0/mlflow/runs/get", {"run_id": status["mlflowRunId"]})
        assert response.status_code == 200, response.text
        mlflow_run = response.json()["run"]
        params = {item["key"]: item["value"] for item in mlflow_run["data"]["params"]}
        assert params["feedback_samples"] == str(LOOP_LABELLED), params
        assert int(params["train_samples"]) == int(params["mnist_train_samples"]) + LOOP_LABELLED, params
        response = platform.mlflow_get(
            "/api/2.0/mlflow/model-versions/get", {"name": MODEL, "version": str(status["modelVersion"])}
        )
        assert response.status_code == 200, response.text
        model_version = response.json()["model_version"]
        tags = {item["key"]: item["value"] for item in model_version.get("tags", [])}
        # The version says what it learned from, and the gate's decision, whichever way it went.
        assert tags.get("feedback_samples") == str(LOOP_LABELLED), tags
        assert tags.get("promotion_reason"), tags
        if status["phase"] == "Promoted":
            platform.rollout_status(f"{RELEASE}-serving", timeout=300)
            assert platform.serving_model_uri() == f"models:/{MODEL}/{status['modelVersion']}"
        assert "401" not in alertmanager.log_tail(), alertmanager.log_tail()
        print(
            f"\nloop on the real node: quiet window p={quiet_p}; drifted window p={drift_p}; "
            f"{LOOP_LABELLED} labels in {labelled_after:.1f} s; TrainingRun {name} created "
            f"{triggered_after:.1f} s after the first drifted request; {status['phase']}: "
            f"{tags.get('promotion_reason')}"
        )
    finally:
        platform.kubectl("delete", "retrainingpolicy", LOOP_POLICY, "--ignore-not-found")
        prometheus.stop()
        alertmanager.stop()


def test_helm_upgrade_to_a_newer_mlflow_migrates_its_database(
    platform: Platform, trained: dict[str, dict[str, Any]]
) -> None:
    champion = platform.champion_version()
    repository, tag = _repository_and_tag(platform.cluster.images["mlflow"])
    platform.helm(
        "upgrade", RELEASE, str(CHART), "--reuse-values",
        "--set", f"mlflow.image.repository={repository}", "--set", f"mlflow.image.tag={tag}",
    )  # fmt: skip
    platform.mlflow_rolled_out()
    pod = platform.get("pods", "-l", "app.kubernetes.io/component=mlflow")["items"][0]
    assert pod["spec"]["containers"][0]["image"].endswith(tag)
    init = pod["spec"].get("initContainers") or []
    assert init, "the MLflow pod runs its database migration first"
    migration_log = platform.kubectl("logs", pod["metadata"]["name"], "-c", init[0]["name"])
    print(f"\nmigration log tail:\n{migration_log[-1500:]}")
    # The registry survived the migration, and serving is untouched by it.
    assert platform.champion_version() == champion
    assert _model_version_exists(platform, champion)
    response = httpx.post(f"{platform.service_url('serving')}/predict", json=SAMPLE_DIGIT, timeout=10)
    assert response.status_code == 200 and response.headers["X-Model-Version"] == champion


def test_helm_uninstall_leaves_no_workload(platform: Platform, trained: dict[str, dict[str, Any]]) -> None:
    # TrainingRuns are the user's, not the release's: deleting them takes their Jobs with them.
    platform.kubectl("delete", "trainingruns", "--all", "--wait=true", timeout=180)
    platform.helm("uninstall", RELEASE, "--wait", "--timeout", "3m")

    def nothing_left() -> bool:
        left = platform.get("deployments,replicasets,statefulsets,jobs,pods,services,hpa,pdb")["items"]
        return not left

    try:
        wait_until(nothing_left, 120, "every workload to go", interval=2)
    except TimeoutError as exc:
        left = platform.get("deployments,replicasets,statefulsets,jobs,pods,services,hpa,pdb")["items"]
        raise AssertionError(f"{exc}: {[(o['kind'], o['metadata']['name']) for o in left]}") from exc
    # The MLflow claim stays on purpose (helm.sh/resource-policy: keep): the registry outlives
    # the release.
    claims = platform.get("pvc")["items"]
    assert [claim["metadata"]["name"] for claim in claims] == [f"{RELEASE}-mlflow"]
