"""The operator end to end: `python -m mnist_operator` against a real kube-apiserver and
kube-controller-manager, a real MLflow server, and the real training entrypoint run by the fake
kubelet (testing/fake_kubelet.py) in place of a node.

The operator runs with a token of its own ServiceAccount, so every test here also shows that
operator/rbac.yaml is enough. Trainings are capped (1 epoch, 3000 examples) to take seconds; the
tests marked slow train for real, the others have the fake kubelet run a stand-in trainer that logs
and registers a version without TensorFlow (`stand_in_trainer`).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from contract.policy import decide
from contract.registry import alias_version, promote, version_metrics
from contract.spec import (
    API_GROUP,
    API_VERSION,
    CHAMPION_ALIAS,
    KIND,
    MODEL_VERSION_ANNOTATION,
    PREVIOUS_ALIAS,
    TrainingRunSpec,
)
from local_mode.processes import wait_until
from mnist_operator import tracking
from mnist_operator.builders import build_job_spec, build_workers_service, job_name, model_uri_of
from mnist_operator.config import OperatorConfig
from testing.controlplane import ControlPlane
from testing.fake_kubelet import FakeKubelet
from testing.kubectl import get_json, kubectl, kubectl_ok, unique_name
from testing.operator_harness import (
    OPERATOR_NAMESPACE,
    REPO_ROOT,
    SEED_MANIFESTS,
    OperatorAccount,
    OperatorFactory,
    RestartableMlflow,
    create_namespace,
    phase_in,
    serving_deployment,
    wait_deployment_available,
    wait_for_trainingrun,
)
from testing.upstream import kueue_crds

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TRAINING_TIMEOUT = 900.0
FINAL = ("Promoted", "Rejected", "RolledBack", "Failed")
# The design's three runs (baseline, enhanced, optimized); further manifests are extra experiments.
DESIGN_RUNS = SEED_MANIFESTS[:3]


@pytest.fixture
def mlflow_client(operator_mlflow: RestartableMlflow, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    return tracking.make_client(operator_mlflow.url)


@pytest.fixture
def registered_model() -> str:
    return unique_name("model")


def trainingrun(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def quick_spec(model: str, **overrides: Any) -> dict[str, Any]:
    """A TrainingRun spec that trains for seconds and is promoted over a weak champion."""
    spec: dict[str, Any] = {
        "architecture": "baseline",
        "hyperparameters": {"epochs": 1, "batchSize": 64},
        "experiment": f"exp-{model}",
        "registeredModel": model,
        "promotion": {"minimum": 0.5},
    }
    spec.update(overrides)
    return spec


def seed_champion(client: MlflowClient, model: str, accuracy: float) -> str:
    """A weak version made champion without training: the operator only compares run metrics."""
    experiment_id = client.create_experiment(f"seed-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "test_accuracy", accuracy)
    client.set_terminated(run.info.run_id)
    client.create_registered_model(model)
    version = str(
        client.create_model_version(model, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    )
    promote(client, model, version)
    return version


def jobs_of(plane: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get_json(
        plane, "jobs", "-n", namespace, "-l", f"mnist-mlops.io/trainingrun={name}"
    )["items"]
    return found


def condition(document: dict[str, Any], type_: str) -> dict[str, Any]:
    for item in document.get("status", {}).get("conditions") or []:
        if item["type"] == type_:
            return dict(item)
    raise AssertionError(f"no {type_} condition in {json.dumps(document.get('status'), indent=1)}")


def events_of(plane: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get_json(
        plane,
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind={KIND}",
    )["items"]
    return found


def replicasets_of(plane: ControlPlane, namespace: str, deployment: str) -> list[dict[str, Any]]:
    return [
        item
        for item in get_json(plane, "replicasets", "-n", namespace)["items"]
        if any(ref["name"] == deployment for ref in item["metadata"].get("ownerReferences") or [])
    ]


def model_uri_in(plane: ControlPlane, namespace: str, deployment: str) -> str | None:
    """SERVING_MODEL_URI of the Deployment's pod template: what its pods load when they start."""
    return model_uri_of(get_json(plane, "deployment", deployment, "-n", namespace))


def annotation_of(plane: ControlPlane, namespace: str, deployment: str) -> str | None:
    document = get_json(plane, "deployment", deployment, "-n", namespace)
    value = (document["spec"]["template"]["metadata"].get("annotations") or {}).get(MODEL_VERSION_ANNOTATION)
    return None if value is None else str(value)


def runs_tagged(client: MlflowClient, experiment: str, uid: str) -> int:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return 0
    return len(client.search_runs([found.experiment_id], filter_string=f"tags.`trainingrun.uid` = '{uid}'"))


def deploy_serving(plane: ControlPlane, namespace: str, model: str, version: str | None = None) -> str:
    name = "serving"
    deployment = serving_deployment(name, namespace, model)
    if version is not None:
        # As a rollout by the operator leaves it: annotated and pinned.
        deployment["spec"]["template"]["metadata"]["annotations"] = {MODEL_VERSION_ANNOTATION: version}
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container["env"] = [{"name": "SERVING_MODEL_URI", "value": f"models:/{model}/{version}"}]
    kubectl_ok(plane, "apply", "-f", "-", manifest=deployment)
    wait_deployment_available(plane, namespace, name)
    return name


# ------------------------------------------------------------------------ the seed runs


@pytest.fixture
def seed_namespace(control_plane: ControlPlane, fake_kubelet: FakeKubelet) -> Iterator[str]:
    namespace = create_namespace(control_plane, unique_name("seeds"))
    fake_kubelet.watch(namespace)
    yield namespace
    kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


def seed_runs(namespace: str, model: str) -> list[dict[str, Any]]:
    """The design's three runs from manifests/trainingruns, made quick: 1 epoch, and the policy
    minimum of all but the last lowered to 0.5 (3000 examples for one epoch cannot reach the
    design's 97%). The last keeps its bar, so one run is sure to be rejected below the minimum and
    the others are judged against each other."""
    runs = []
    for index, path in enumerate(DESIGN_RUNS):
        document = copy.deepcopy(yaml.safe_load(path.read_text()))
        document["metadata"]["namespace"] = namespace
        spec = document["spec"]
        spec["hyperparameters"]["epochs"] = 1
        spec["registeredModel"] = model
        spec["experiment"] = f"seeds-{model}"
        if index < len(DESIGN_RUNS) - 1:
            spec["promotion"]["minimum"] = 0.5
        runs.append(document)
    return runs


@pytest.mark.slow
def test_seed_runs_end_promoted_or_rejected_exactly_as_the_policy_says(
    *,
    control_plane: ControlPlane,
    operator_account: OperatorAccount,
    operators: OperatorFactory,
    seed_namespace: str,
    registered_model: str,
    mlflow_client: MlflowClient,
    operator_mlflow: RestartableMlflow,
) -> None:
    namespace, model = seed_namespace, registered_model
    serving = deploy_serving(control_plane, namespace, model)
    runs = seed_runs(namespace, model)
    with operator_account.clusterwide():
        operator = operators.start([])
        operator.wait_leading()
        kubectl_ok(control_plane, "apply", "-f", "-", manifest=runs)
        finished = {
            run["metadata"]["name"]: wait_for_trainingrun(
                control_plane,
                namespace,
                run["metadata"]["name"],
                predicate=phase_in(*FINAL),
                timeout=TRAINING_TIMEOUT,
                what="to finish",
            )
            for run in runs
        }
        # Stopped while its ClusterRoleBinding still exists, so it never runs without its permissions.
        assert operator.stop() == 0

    promoted_versions: dict[str | None, str] = {}
    for name, document in finished.items():
        status, spec = document["status"], TrainingRunSpec.model_validate(document["spec"])
        assert status["phase"] in {"Promoted", "Rejected"}, f"{name}: {status}"
        # The Job: one per run, deterministic name, owned by the run, with the run's arguments.
        (job,) = jobs_of(control_plane, namespace, name)
        assert job["metadata"]["name"] == job_name(name) == status["jobName"]
        assert job["metadata"]["ownerReferences"][0]["uid"] == document["metadata"]["uid"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert f"--architecture={spec.architecture.value}" in container["args"]
        assert f"--trainingrun-uid={document['metadata']['uid']}" in container["args"]
        assert {"name": "MLFLOW_TRACKING_URI", "value": operator_mlflow.url} in container["env"]
        assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        # The decision is the policy's, applied to the champion of that moment.
        candidate = version_metrics(mlflow_client, model, status["modelVersion"])
        champion = status.get("championVersion")
        expected = decide(
            candidate, version_metrics(mlflow_client, model, champion) if champion else None, spec.promotion
        )
        assert (status["promoted"], status["promotionReason"]) == (expected.promote, expected.reason), name
        assert status["metrics"]["test_accuracy"] == pytest.approx(candidate["test_accuracy"])
        assert condition(document, "Promoted")["status"] == ("True" if expected.promote else "False")
        assert condition(document, "Trained")["status"] == "True"
        assert runs_tagged(mlflow_client, spec.experiment, document["metadata"]["uid"]) == 1
        reasons = {event["reason"] for event in events_of(control_plane, namespace, name)}
        assert {"Trained", "Promoted" if expected.promote else "Rejected"} <= reasons
        assert condition(document, "JobCreated")["reason"] == "Created"
        if expected.promote:
            promoted_versions[champion] = status["modelVersion"]

    last = list(finished.values())[-1]["status"]
    assert last["promoted"] is False and "below the minimum" in last["promotionReason"]
    # The promotions form one chain from "no champion"; the alias ends on its last link.
    chain, current = [], None
    while current in promoted_versions:
        current = promoted_versions[current]
        chain.append(current)
    assert len(chain) == len(promoted_versions) >= 1
    assert alias_version(mlflow_client, model, CHAMPION_ALIAS) == chain[-1]
    assert alias_version(mlflow_client, model, PREVIOUS_ALIAS) == (chain[-2] if len(chain) > 1 else None)
    # Serving follows the champion, and its template changed once per promotion, never otherwise.
    assert annotation_of(control_plane, namespace, serving) == chain[-1]
    rolled = [doc for doc in finished.values() if condition_or_none(doc, "RolledOut", "Available")]
    assert len(replicasets_of(control_plane, namespace, serving)) == 1 + len(rolled)
    table = kubectl_ok(control_plane, "get", "tr", "-n", namespace, "-o", "wide")
    print(table)
    assert "ACCURACY" in table.splitlines()[0] and "Promoted" in table


def condition_or_none(document: dict[str, Any], type_: str, reason: str) -> bool:
    return any(
        item["type"] == type_ and item.get("reason") == reason
        for item in document.get("status", {}).get("conditions") or []
    )


# ------------------------------------------------------------------------ pinned rollouts, fast

# `python -m training_job` as the fake kubelet runs it, without TensorFlow: a run with the accuracy
# the test asks for, a registered version of it, and the result as the termination message. The
# package's other modules (cli, result) are the real ones: __path__ goes on into the real package.
STAND_IN_INIT = """
__path__.append({real!r})
"""
STAND_IN_MAIN = """
import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from contract.train_command import parse_train_command
from contract.result import TrainingResult, write_termination_message

command = parse_train_command(sys.argv[1:])
spec, accuracy = command.spec, float(os.environ["STAND_IN_TEST_ACCURACY"])
client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
experiment = client.get_experiment_by_name(spec.experiment)
experiment_id = experiment.experiment_id if experiment else client.create_experiment(spec.experiment)
run = client.create_run(experiment_id, tags={"trainingrun.uid": command.trainingrun.uid or ""})
run_id = run.info.run_id
client.log_metric(run_id, "test_accuracy", accuracy)
client.set_terminated(run_id)
try:
    client.create_registered_model(spec.registered_model)
except MlflowException:
    pass  # registered by an earlier run
version = client.create_model_version(spec.registered_model, f"runs:/{run_id}/onnx", run_id)
result = TrainingResult(
    run_id=run_id,
    experiment_id=experiment_id,
    registered_model=spec.registered_model,
    model_version=str(version.version),
    architecture=spec.architecture.value,
    metrics={"test_accuracy": accuracy},
    onnx_model_uri=f"runs:/{run_id}/onnx",
    keras_model_uri=f"runs:/{run_id}/keras",
)
write_termination_message(result)
print(result.to_json())
"""


@pytest.fixture(scope="module")
def stand_in_trainer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory to put first on the training pod's PYTHONPATH (see STAND_IN_MAIN)."""
    root = tmp_path_factory.mktemp("stand-in-trainer")
    package = root / "training_job"
    package.mkdir()
    (package / "__init__.py").write_text(STAND_IN_INIT.format(real=str(REPO_ROOT / "training_job")))
    (package / "__main__.py").write_text(STAND_IN_MAIN)
    return root


def train_stand_in(fake_kubelet: FakeKubelet, trainer: Path, run: str, accuracy: float) -> None:
    fake_kubelet.override_env(run, PYTHONPATH=f"{trainer}:{REPO_ROOT}", STAND_IN_TEST_ACCURACY=str(accuracy))


def template_hash(plane: ControlPlane, namespace: str, deployment: str, uri: str) -> str:
    """The pod-template-hash of the Deployment's ReplicaSet whose pods load `uri`."""
    (found,) = [
        rs["metadata"]["labels"]["pod-template-hash"]
        for rs in replicasets_of(plane, namespace, deployment)
        if model_uri_of(rs) == uri
    ]
    return str(found)


def test_a_promotion_pins_the_version_in_the_pod_template_and_a_rollback_restores_the_previous_pin(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    registered_model: str,
    mlflow_client: MlflowClient,
    stand_in_trainer: Path,
) -> None:
    namespace, model = watched_namespace, registered_model
    seeded = seed_champion(mlflow_client, model, 0.1)
    serving = deploy_serving(control_plane, namespace, model, version=seeded)
    operators.start([namespace], rollout_timeout_seconds="15").wait_leading()

    first = unique_name("pin")
    train_stand_in(fake_kubelet, stand_in_trainer, first, 0.9)
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(first, namespace, quick_spec(model)))
    promoted = wait_for_trainingrun(
        control_plane, namespace, first, predicate=phase_in(*FINAL), timeout=180, what="to be promoted"
    )
    assert promoted["status"]["phase"] == "Promoted", promoted["status"]
    version = promoted["status"]["modelVersion"]
    assert version != seeded
    # The pods of the new ReplicaSet load exactly that version, whenever they start.
    assert model_uri_in(control_plane, namespace, serving) == f"models:/{model}/{version}"
    assert annotation_of(control_plane, namespace, serving) == version
    (entry,) = promoted["status"]["rollout"]["deployments"]
    assert entry == {
        "name": serving,
        "previousVersion": seeded,
        "previousModelUri": f"models:/{model}/{seeded}",
    }
    assert len(replicasets_of(control_plane, namespace, serving)) == 2
    promoted_hash = template_hash(control_plane, namespace, serving, f"models:/{model}/{version}")

    # The next promoted version's pods never become ready: the rollback puts the previous pin back.
    fake_kubelet.never_become_ready(namespace, serving)
    second = unique_name("pin")
    train_stand_in(fake_kubelet, stand_in_trainer, second, 0.95)
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(second, namespace, quick_spec(model)))
    rolled_back = wait_for_trainingrun(
        control_plane, namespace, second, predicate=phase_in(*FINAL), timeout=180, what="to roll back"
    )
    status = rolled_back["status"]
    assert status["phase"] == "RolledBack", status
    assert status["championVersion"] == version
    assert model_uri_in(control_plane, namespace, serving) == f"models:/{model}/{version}"
    assert annotation_of(control_plane, namespace, serving) == version
    assert alias_version(mlflow_client, model, CHAMPION_ALIAS) == version
    # The restored template is the promoted one again: the Deployment went back to that revision's
    # ReplicaSet rather than making a new one, as `kubectl rollout undo` would.
    failed_uri = f"models:/{model}/{status['modelVersion']}"
    assert len(replicasets_of(control_plane, namespace, serving)) == 3
    assert template_hash(control_plane, namespace, serving, f"models:/{model}/{version}") == promoted_hash
    assert template_hash(control_plane, namespace, serving, failed_uri) != promoted_hash


# ------------------------------------------------------------------------ failure paths

STANDBY_OF_A = {"role": "standby", "identity": "operator-b", "leader": "operator-a"}


@pytest.mark.slow
def test_a_failed_training_fails_the_run_with_the_reason(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    registered_model: str,
    mlflow_client: MlflowClient,
) -> None:
    name = unique_name("broken")
    fake_kubelet.override_env(name, MNIST_NPZ="/nonexistent/mnist.npz")
    operators.start([watched_namespace]).wait_leading()
    kubectl_ok(
        control_plane,
        "apply",
        "-f",
        "-",
        manifest=trainingrun(name, watched_namespace, quick_spec(registered_model)),
    )
    document = wait_for_trainingrun(
        control_plane,
        watched_namespace,
        name,
        predicate=phase_in(*FINAL),
        timeout=TRAINING_TIMEOUT,
        what="to fail",
    )
    status = document["status"]
    assert status["phase"] == "Failed"
    trained = condition(document, "Trained")
    assert trained["status"] == "False"
    # The Job's reason (the pod failure policy stops retrying exit code 4) and the pod's own words.
    assert trained["reason"] == "PodFailurePolicy"
    assert "exited with code 4" in status["message"]
    assert "bad training data" in status["message"]
    assert len(fake_kubelet.runs_of(name)) == 1, "exit code 4 is not retried"
    assert "modelVersion" not in status
    assert mlflow_client.search_registered_models(filter_string=f"name = '{registered_model}'") == []
    assert "TrainingFailed" in {
        event["reason"] for event in events_of(control_plane, watched_namespace, name)
    }


@pytest.mark.slow
def test_mlflow_outage_then_a_stalled_rollout_ends_rolled_back(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    operator_mlflow: RestartableMlflow,
    registered_model: str,
    mlflow_client: MlflowClient,
) -> None:
    """Two failure paths on one (CPU-costly) training: MLflow is down when the result arrives, then
    the promoted version's serving pods never become ready."""
    namespace, model, name = watched_namespace, registered_model, unique_name("outage")
    seeded = seed_champion(mlflow_client, model, 0.1)
    serving = deploy_serving(control_plane, namespace, model, version=seeded)
    fake_kubelet.never_become_ready(namespace, serving)
    release = fake_kubelet.hold(name)
    operators.start([namespace], rollout_timeout_seconds="8").wait_leading()
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(name, namespace, quick_spec(model)))
    wait_until(lambda: fake_kubelet.runs_of(name), 120, "the training pod to start")
    (run,) = fake_kubelet.runs_of(name)
    wait_until(run.finished.is_set, TRAINING_TIMEOUT, "the training process to finish")
    assert run.exit_code == 0, run.log_tail()
    # While the pod still runs, the progress comes from MLflow's per-epoch metrics.
    progressed = wait_for_trainingrun(
        control_plane,
        namespace,
        name,
        predicate=lambda doc: "valAccuracy" in doc.get("status", {}).get("progress", {}),
        timeout=60,
        what="to show the training progress",
    )
    assert progressed["status"]["phase"] == "Training"
    assert (progressed["status"]["progress"]["epoch"], progressed["status"]["progress"]["epochs"]) == (1, 1)
    assert 0.0 < progressed["status"]["progress"]["valAccuracy"] <= 1.0
    assert progressed["status"]["mlflowRunId"]

    try:
        operator_mlflow.stop()
        release.set()
        down = wait_for_trainingrun(
            control_plane,
            namespace,
            name,
            predicate=lambda doc: (
                condition_or_none(doc, "MlflowReachable", "Unreachable")
                and doc["status"]["phase"] == "Evaluating"
            ),
            timeout=120,
            what="to report MLflow unreachable while evaluating",
        )
        assert operator_mlflow.url in condition(down, "MlflowReachable")["message"]
        assert "MlflowUnreachable" in {event["reason"] for event in events_of(control_plane, namespace, name)}
        # Nothing was decided while MLflow was away.
        assert "promoted" not in down["status"]
    finally:
        if not operator_mlflow.is_up():
            operator_mlflow.start()

    document = wait_for_trainingrun(
        control_plane, namespace, name, predicate=phase_in(*FINAL), timeout=300, what="to finish"
    )
    status = document["status"]
    assert condition(document, "MlflowReachable")["status"] == "True"
    assert status["promoted"] is True and status["championVersion"] == seeded
    # The new version's pods never became ready: alias and annotation are back on the seeded version.
    assert status["phase"] == "RolledBack", status
    rolled_back = condition(document, "RolledBack")
    assert (rolled_back["status"], rolled_back["reason"]) == ("True", "RolloutTimeout")
    assert f"back on version {seeded}" in rolled_back["message"]
    assert condition(document, "RolledOut")["status"] == "False"
    assert alias_version(mlflow_client, model, CHAMPION_ALIAS) == seeded
    assert mlflow_client.get_model_version(model, status["modelVersion"]).tags["promoted"] == "rolled-back"
    assert annotation_of(control_plane, namespace, serving) == seeded
    assert model_uri_in(control_plane, namespace, serving) == f"models:/{model}/{seeded}"
    assert "RolledBack" in {event["reason"] for event in events_of(control_plane, namespace, name)}


@pytest.mark.slow
def test_operator_crashes_at_the_worst_moments_and_the_standby_finishes_without_duplicates(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    registered_model: str,
    mlflow_client: MlflowClient,
) -> None:
    namespace, model, name = watched_namespace, registered_model, unique_name("restart")
    seeded = seed_champion(mlflow_client, model, 0.1)
    serving = deploy_serving(control_plane, namespace, model, version=seeded)
    # A dies right after creating the Job, B right after moving the alias; C finishes.
    first = operators.start([namespace], identity="operator-a", test_failpoint="after-job-create")
    first.wait_leading()
    second = operators.start([namespace], identity="operator-b", test_failpoint="after-alias-move")
    second.wait_healthy()
    wait_until(lambda: second.health() == STANDBY_OF_A, 30, "operator-b to stand by for operator-a")
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(name, namespace, quick_spec(model)))

    assert first.process is not None and first.process.wait(120) == 86
    wait_until(second.is_leading, 60, "operator-b to take the Lease over")
    # Started only now: had C raced B for A's expired Lease, C could win it and B never crash.
    third = operators.start([namespace], identity="operator-c")
    assert second.process is not None and second.process.wait(TRAINING_TIMEOUT) == 86, second.log_tail()
    document = wait_for_trainingrun(
        control_plane,
        namespace,
        name,
        predicate=phase_in(*FINAL),
        timeout=240,
        what="to finish under operator-c",
    )
    assert third.is_leading()

    status = document["status"]
    assert status["phase"] == "Promoted", status
    # One Job, one pod, one MLflow run, one new version.
    (job,) = jobs_of(control_plane, namespace, name)
    assert job["metadata"]["name"] == job_name(name)
    assert len(fake_kubelet.runs_of(name)) == 1
    assert runs_tagged(mlflow_client, f"exp-{model}", document["metadata"]["uid"]) == 1
    versions = mlflow_client.search_model_versions(f"name = '{model}'")
    assert sorted(str(version.version) for version in versions) == sorted([seeded, status["modelVersion"]])
    # Promoted once: judged against the seeded champion, which `previous` still names.
    assert status["championVersion"] == seeded
    assert "beats the champion's 0.1000" in status["promotionReason"]
    assert alias_version(mlflow_client, model, CHAMPION_ALIAS) == status["modelVersion"]
    assert alias_version(mlflow_client, model, PREVIOUS_ALIAS) == seeded
    # Rolled once.
    assert annotation_of(control_plane, namespace, serving) == status["modelVersion"]
    assert len(replicasets_of(control_plane, namespace, serving)) == 2
    assert condition(document, "JobCreated")["reason"] == "Adopted"
    # A graceful stop gives the Lease up at once.
    assert third.stop() == 0
    lease = get_json(control_plane, "lease", "mnist-operator", "-n", OPERATOR_NAMESPACE)
    assert not lease["spec"].get("holderIdentity")


# ------------------------------------------------------------------------ RBAC


@pytest.mark.slow
def test_a_namespaced_operator_works_within_its_rbac_and_is_forbidden_outside_it(
    *,
    control_plane: ControlPlane,
    operator_account: OperatorAccount,
    operators: OperatorFactory,
    registered_model: str,
) -> None:
    # No fake kubelet here: only Job creation and status matter.
    inside = create_namespace(control_plane, unique_name("inside"))
    outside = create_namespace(control_plane, unique_name("outside"))
    operator_account.bind_namespace(inside)
    operators.start([inside]).wait_leading()
    spec = quick_spec(registered_model)
    kubectl_ok(
        control_plane,
        "apply",
        "-f",
        "-",
        manifest=[trainingrun("run", inside, spec), trainingrun("run", outside, spec)],
    )
    wait_for_trainingrun(
        control_plane, inside, "run", predicate=phase_in("Training"), timeout=60, what="to train"
    )
    assert len(jobs_of(control_plane, inside, "run")) == 1

    # The operator's identity, asked of the API server itself.
    user = operator_account.user
    allowed = [
        ("create", "jobs", inside),
        ("patch", "trainingruns.mnist-mlops.io/status", inside),
        ("patch", "deployments", inside),
    ]
    forbidden = [
        ("create", "jobs", outside),
        ("list", "trainingruns.mnist-mlops.io", outside),
        ("delete", "jobs", inside),
        ("create", "pods", inside),
        ("get", "secrets", inside),
        ("delete", "deployments", inside),
        ("update", "trainingruns.mnist-mlops.io", inside),
        ("list", "nodes", None),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("get", "leases/someone-else", OPERATOR_NAMESPACE),
    ]
    for verb, resource, where in allowed:
        assert operator_account.can(verb, resource, where), f"{user} should {verb} {resource} in {where}"
    for verb, resource, scope in forbidden:
        assert not operator_account.can(verb, resource, scope), (
            f"{user} must not {verb} {resource} in {scope}"
        )
    # And a real request with the operator's own token, outside its namespace, is refused.
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "intruder", "namespace": outside},
        "spec": {},
    }
    refused = kubectl(
        control_plane, "create", "-f", "-", manifest=job, kubeconfig=operator_account.kubeconfig
    )
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), refused.stderr

    # The run outside was never touched: no status, no Job, no finalizer.
    untouched = get_json(control_plane, "tr", "run", "-n", outside)
    assert "status" not in untouched and not untouched["metadata"].get("finalizers")
    assert jobs_of(control_plane, outside, "run") == []
    for namespace in (inside, outside):
        kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


# ------------------------------------------------------------------------ liveness


def test_liveness_answers_200_while_reconciling_and_503_once_the_reconciler_stalls(
    *,
    control_plane: ControlPlane,
    operator_account: OperatorAccount,
    operators: OperatorFactory,
    registered_model: str,
) -> None:
    # No fake kubelet: the Job never runs, and the TrainingRun stays in Training, ticked each 0.5s.
    namespace = create_namespace(control_plane, unique_name("live"))
    operator_account.bind_namespace(namespace)
    try:
        healthy = operators.start([namespace], liveness_ticks="4")
        healthy.wait_leading()
        kubectl_ok(
            control_plane,
            "apply",
            "-f",
            "-",
            manifest=trainingrun("ticking", namespace, quick_spec(registered_model)),
        )
        wait_for_trainingrun(
            control_plane, namespace, "ticking", predicate=phase_in("Training"), timeout=60, what="to train"
        )
        # 4 ticks of 0.5s, but at least twice the harness's 4s MLflow backoff: 8s. Well past it, the
        # active run is still reconciled and the probe still answers 200.
        wait_until(
            lambda: (healthy.health() or {}).get("activeRuns") == 1, 30, "the heartbeat to see the run"
        )
        time.sleep(10)
        found = healthy.health_status()
        assert found is not None
        code, document = found
        assert code == 200, document
        assert document["role"] == "leader" and document["alive"] is True
        assert document["secondsSinceLastTick"] < 8
        assert healthy.stop() == 0

        # The same run under an operator whose reconcile ticks hang (a test-only failpoint).
        stalled = operators.start([namespace], liveness_ticks="4", test_failpoint="stall-reconcile")
        stalled.wait_leading()

        def unhealthy() -> dict[str, Any] | None:
            found = stalled.health_status()
            return found[1] if found is not None and found[0] == 503 else None

        document = wait_until(unhealthy, 60, "/healthz to answer 503")
        assert document["alive"] is False
        assert f"TrainingRun {namespace}/ticking has been running for" in document["problem"]
        assert stalled.process is not None and stalled.process.poll() is None
    finally:
        kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


# --- queues (Kueue) and multi-worker runs, against the real API server ---------------------------


@pytest.fixture(scope="module")
def kueue_installed(control_plane: ControlPlane) -> None:
    """Kueue's real CRDs (no Kueue controller: the test admits Jobs itself, as Kueue would)."""
    for crd in kueue_crds():
        kubectl_ok(control_plane, "apply", "--server-side", "--force-conflicts", "-f", str(crd))
    kubectl_ok(control_plane, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


def kueue_queue(namespace: str, queue: str) -> list[dict[str, Any]]:
    """A ResourceFlavor, a ClusterQueue with a CPU and memory quota, and the namespace's LocalQueue."""
    kueue = "kueue.x-k8s.io/v1beta2"
    cluster_queue = f"{namespace}-cq"
    return [
        {"apiVersion": kueue, "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}},
        {
            "apiVersion": kueue,
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory"],
                        "flavors": [
                            {
                                "name": "default-flavor",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "4"},
                                    {"name": "memory", "nominalQuota": "16Gi"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": kueue,
            "kind": "LocalQueue",
            "metadata": {"name": queue, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue},
        },
    ]


@pytest.mark.slow
def test_a_queued_run_waits_suspended_until_kueue_admits_it(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    registered_model: str,
    kueue_installed: None,
) -> None:
    namespace, queue, priority = watched_namespace, "training", unique_name("training-low")
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=kueue_queue(namespace, queue))
    kubectl_ok(
        control_plane, "create", "priorityclass", priority, "--value=100", "--description=queued training"
    )
    operators.start([namespace]).wait_leading()
    name = unique_name("queued")
    spec = quick_spec(registered_model, queueName=queue, priorityClassName=priority)
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(name, namespace, spec))
    try:
        queued = wait_for_trainingrun(
            control_plane, namespace, name, predicate=phase_in("Queued"), timeout=60, what="to queue"
        )
        assert condition(queued, "Admitted")["status"] == "False"
        job = get_json(control_plane, "job", job_name(name), "-n", namespace)
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == queue
        assert job["spec"]["template"]["spec"]["priorityClassName"] == priority
        # Nothing runs while the Job waits for admission, however long that is.
        time.sleep(5)
        assert not fake_kubelet.runs_of(name)
        still = get_json(control_plane, "trainingrun", name, "-n", namespace)
        assert still["status"]["phase"] == "Queued", still["status"]

        # Kueue admits a Job by unsuspending it.
        kubectl_ok(
            control_plane, "patch", "job", job_name(name), "-n", namespace, "--type=merge",
            "-p", json.dumps({"spec": {"suspend": False}}),
        )  # fmt: skip
        final = wait_for_trainingrun(
            control_plane, namespace, name, predicate=phase_in(*FINAL), timeout=TRAINING_TIMEOUT,
            what="to finish after admission",
        )  # fmt: skip
        assert final["status"]["phase"] in {"Promoted", "Rejected"}, final["status"]
        assert condition(final, "Admitted")["status"] == "True"
        assert len(fake_kubelet.runs_of(name)) == 1
    finally:
        kubectl(control_plane, "delete", "priorityclass", priority, "--wait=false")


def test_a_multi_worker_job_and_its_service_pass_the_api_servers_validation(
    control_plane: ControlPlane, crd_installed: None
) -> None:
    # The Indexed Job's fields (per-index backoff, subdomain, ports) as the API server and the
    # restricted Pod Security profile judge them, without a kubelet.
    namespace = create_namespace(control_plane, unique_name("workers"))
    try:
        spec = TrainingRunSpec.model_validate({"workers": 2, "hyperparameters": {"batchSize": 64}})
        config = OperatorConfig(mlflow_tracking_uri="http://mlflow:5000")
        service = build_workers_service(name="mw", namespace=namespace, uid=str(uuid.uuid4()))
        job = build_job_spec(name="mw", namespace=namespace, uid=str(uuid.uuid4()), spec=spec, config=config)
        for document in (service, job):
            document["metadata"].pop("ownerReferences")
            result = kubectl(control_plane, "apply", "--dry-run=server", "-f", "-", manifest=document)
            assert result.returncode == 0, result.stderr
            assert "Warning" not in result.stderr, result.stderr
    finally:
        kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")
