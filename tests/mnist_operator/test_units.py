"""The operator's pure parts, as plain dicts: the Job it builds, what it reads from Jobs, pods and
Deployments, the status it writes, and its configuration. No API server needed."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from contract.constants import (
    EXIT_BAD_COMMAND,
    EXIT_TRACKING_UNAVAILABLE,
    NON_RETRYABLE_EXIT_CODES,
    WORKER_HOSTS_ENV,
    WORKER_INDEX_ENV,
    WORKER_PORT,
    WORKER_PORT_NAME,
)
from contract.result import TrainingResult
from contract.spec import MODEL_VERSION_ANNOTATION, TrainingRunSpec
from contract.train_command import parse_train_command, spec_to_args
from mnist_operator.builders import (
    KUEUE_QUEUE_LABEL,
    build_job_spec,
    build_rollout_patch,
    build_workers_service,
    job_name,
    model_uri_of,
    model_version_annotation,
    pinned_model_uri,
    resource_requirements,
    served_version,
    serving_containers,
    serving_label_selector,
)
from mnist_operator.config import ConfigError, OperatorConfig
from mnist_operator.jobs import (
    COMPLETION_INDEX_ANNOTATION,
    JobOutcome,
    ResultError,
    failure_message,
    job_is_suspended,
    job_outcome,
    training_result,
)
from mnist_operator.liveness import Heartbeat
from mnist_operator.rollouts import rollout_state
from mnist_operator.status import (
    Condition,
    Phase,
    Progress,
    RolloutEntry,
    RolloutRecord,
    StatusUpdate,
    TrainingRunStatus,
    progress_status,
    set_condition,
)
from mnist_operator.testing_hooks import FAILPOINT_ENV, NO_FAILPOINTS, Failpoints
from training_job.distributed import worker_context

UID = "0b7c1f9e-5d1a-4a57-9a43-3f1d2c3b4a5e"
CONFIG = OperatorConfig(mlflow_tracking_uri="http://mlflow.mnist-mlops.svc:5000", training_image="train:1.0")
NOW = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def job_for(spec: dict[str, Any] | None = None, config: OperatorConfig = CONFIG) -> dict[str, Any]:
    return build_job_spec(
        name="baseline",
        namespace="ml",
        uid=UID,
        spec=TrainingRunSpec.model_validate(spec or {}),
        config=config,
    )


def test_job_name_owner_and_labels() -> None:
    job = job_for()
    assert job["metadata"]["name"] == job_name("baseline") == "baseline-train"
    assert job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "mnist-mlops.io/v1alpha1",
            "kind": "TrainingRun",
            "name": "baseline",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["mnist-mlops.io/trainingrun"] == "baseline"
        assert labels["app.kubernetes.io/managed-by"] == "mnist-operator"
        # The chart's NetworkPolicy lets exactly these pods reach MLflow.
        assert labels["app.kubernetes.io/part-of"] == "mnist-mlops"
        assert labels["app.kubernetes.io/component"] == "training"


def test_job_is_deterministic() -> None:
    assert job_for({"architecture": "enhanced"}) == job_for({"architecture": "enhanced"})


def test_job_container_runs_the_spec() -> None:
    spec = {"architecture": "residual-bn", "hyperparameters": {"epochs": 3, "augment": True}}
    container = job_for(spec)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "train:1.0"
    assert container["command"] == ["python", "-m", "training_job"]
    parsed_spec = TrainingRunSpec.model_validate(spec)
    assert container["args"] == [
        *spec_to_args(parsed_spec, "baseline"),
        "--trainingrun-name=baseline",
        "--trainingrun-namespace=ml",
        f"--trainingrun-uid={UID}",
    ]
    # The training entrypoint reads the arguments back into the same spec.
    command = parse_train_command(container["args"])
    assert command.spec.architecture == parsed_spec.architecture
    assert command.spec.hyperparameters == parsed_spec.hyperparameters
    assert command.trainingrun.uid == UID
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mnist-mlops.svc:5000"
    assert env["TERMINATION_MESSAGE_PATH"] == container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_job_pod_is_restricted() -> None:
    pod = job_for()["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    env = {item["name"]: item["value"] for item in container["env"]}
    # Everything the process writes lands in the emptyDir.
    assert all(env[key].startswith("/tmp") for key in ("HOME", "TMPDIR", "KERAS_HOME", "MPLCONFIGDIR"))


def test_job_limits_and_retries_come_from_the_spec() -> None:
    job = job_for({"backoffLimit": 3, "activeDeadlineSeconds": 900, "ttlSecondsAfterFinished": 60})
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["activeDeadlineSeconds"] == 900
    assert job["spec"]["ttlSecondsAfterFinished"] == 60
    assert "ttlSecondsAfterFinished" not in job_for()["spec"]
    rule = job["spec"]["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["values"] == list(NON_RETRYABLE_EXIT_CODES)


def test_a_bad_command_line_exits_with_the_code_the_job_fails_on() -> None:
    # argparse's own exit code must be the one the podFailurePolicy treats as final.
    with pytest.raises(SystemExit) as exited:
        parse_train_command(["train", "--epochs=0"])
    assert exited.value.code == EXIT_BAD_COMMAND
    assert EXIT_BAD_COMMAND in NON_RETRYABLE_EXIT_CODES
    assert EXIT_TRACKING_UNAVAILABLE not in NON_RETRYABLE_EXIT_CODES


def test_image_override_and_service_account() -> None:
    config = OperatorConfig(mlflow_tracking_uri="http://m", training_service_account="trainer")
    pod = job_for({"image": "registry.local/train@sha256:abc"}, config)["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.local/train@sha256:abc"
    assert pod["serviceAccountName"] == "trainer"
    assert "serviceAccountName" not in job_for()["spec"]["template"]["spec"]


def test_training_pods_log_in_to_mlflow_and_pull_with_the_charts_secrets() -> None:
    config = OperatorConfig(
        mlflow_tracking_uri="http://m",
        mlflow_auth_secret="mlflow-admin",
        mlflow_auth_password_key="pass",
        training_image_pull_secrets=("registry-a", "registry.b"),
    )
    pod = job_for(config=config)["spec"]["template"]["spec"]
    env = {item["name"]: item for item in pod["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlflow-admin", "key": "username"}
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "mlflow-admin", "key": "pass"}
    }
    assert pod["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry.b"}]
    plain = job_for()["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in plain
    assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & {
        item["name"] for item in plain["containers"][0]["env"]
    }


def test_resources_defaults_and_gpu() -> None:
    assert resource_requirements(None, "1", "2Gi") == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"memory": "2Gi"},
    }
    assert resource_requirements({"cpu": 4, "memory": "8Gi", "gpu": 1}, "1", "2Gi") == {
        "requests": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"},
    }
    pod = job_for({"resources": {"gpu": 2}})["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "tolerations" not in job_for()["spec"]["template"]["spec"]


def test_serving_selector() -> None:
    assert serving_label_selector("mnist-cnn", None) == "mnist-mlops.io/registered-model=mnist-cnn"
    selector = {
        "matchLabels": {"tier": "canary"},
        "matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a", "b"]},
            {"key": "legacy", "operator": "DoesNotExist"},
            {"key": "team", "operator": "Exists"},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
        ],
    }
    assert serving_label_selector("m", selector) == (
        "mnist-mlops.io/registered-model=m,tier=canary,zone in (a,b),!legacy,team,env notin (dev)"
    )


def serving_deployment(uri: str | None, annotation: str | None = None) -> dict[str, Any]:
    env = [{"name": "SERVING_HOST", "value": "0.0.0.0"}]
    if uri is not None:
        env.append({"name": "SERVING_MODEL_URI", "value": uri})
    metadata = {"annotations": {MODEL_VERSION_ANNOTATION: annotation}} if annotation else {}
    return {
        "spec": {
            "template": {
                "metadata": metadata,
                "spec": {"containers": [{"name": "serving", "env": env}, {"name": "sidecar", "env": []}]},
            }
        }
    }


def test_rollout_patch_pins_the_version_in_the_serving_container() -> None:
    deployment = serving_deployment("models:/mnist-cnn@champion")
    assert serving_containers(deployment) == {"serving": "models:/mnist-cnn@champion"}
    assert pinned_model_uri("mnist-cnn", "7") == "models:/mnist-cnn/7"
    patch = build_rollout_patch("7", pinned_model_uri("mnist-cnn", "7"), list(serving_containers(deployment)))
    # A strategic merge patch: containers and env merge by name, the sidecar is left alone.
    assert patch == {
        "spec": {
            "template": {
                "metadata": {"annotations": {MODEL_VERSION_ANNOTATION: "7"}},
                "spec": {
                    "containers": [
                        {
                            "name": "serving",
                            "env": [{"name": "SERVING_MODEL_URI", "value": "models:/mnist-cnn/7"}],
                        }
                    ]
                },
            }
        }
    }
    assert model_version_annotation(patch) == "7"
    assert model_uri_of(patch) == "models:/mnist-cnn/7"
    assert served_version(patch, "mnist-cnn") == "7"


def test_rollout_patch_without_a_serving_container_sets_only_the_annotation() -> None:
    patch = build_rollout_patch("7", "models:/m/7", [])
    assert patch == {"spec": {"template": {"metadata": {"annotations": {MODEL_VERSION_ANNOTATION: "7"}}}}}
    assert model_version_annotation(build_rollout_patch(None)) is None


def test_served_version_reads_the_pin_then_the_annotation() -> None:
    assert served_version(serving_deployment("models:/mnist-cnn/12", annotation="12"), "mnist-cnn") == "12"
    # An alias-served template (a fresh install, or an older operator's rollout): the annotation.
    assert (
        served_version(serving_deployment("models:/mnist-cnn@champion", annotation="3"), "mnist-cnn") == "3"
    )
    assert served_version(serving_deployment("models:/mnist-cnn@champion"), "mnist-cnn") is None
    # A pin of another model is not this model's version.
    assert served_version(serving_deployment("models:/other/5"), "mnist-cnn") is None
    assert served_version(serving_deployment("models:/mnist-cnn-v2/5"), "mnist-cnn") is None
    assert model_uri_of(serving_deployment(None)) is None


# ------------------------------------------------------------------------ status


def test_condition_transition_time_moves_only_on_flips() -> None:
    first = set_condition([], "Trained", status=False, reason="A", message="m", generation=1, now=NOW)
    later = NOW + datetime.timedelta(minutes=5)
    same = set_condition(first, "Trained", status=False, reason="B", message="n", generation=1, now=later)
    assert same[0].last_transition_time == first[0].last_transition_time == "2025-01-02T03:04:05Z"
    assert same[0].reason == "B"
    flipped = set_condition(same, "Trained", status=True, reason="C", message="o", generation=2, now=later)
    assert flipped[0].last_transition_time == "2025-01-02T03:09:05Z"
    assert flipped[0].observed_generation == 2
    other = set_condition(flipped, "Promoted", status=True, reason="D", message="p", generation=2, now=later)
    assert [condition.type for condition in other] == ["Trained", "Promoted"]


def test_status_update_patches_only_what_changed() -> None:
    current = {
        "phase": "Training",
        "observedGeneration": 1,
        "conditions": [
            condition.model_dump(by_alias=True)
            for condition in set_condition(
                [], "JobCreated", status=True, reason="Created", message="m", generation=1, now=NOW
            )
        ],
    }
    idle = StatusUpdate.read(current, 1, NOW)
    idle.condition(Condition.JOB_CREATED, True, "Created", "m")
    assert idle.patch() == {}
    moved = StatusUpdate.read(current, 1, NOW).phase(Phase.EVALUATING, "trained")
    assert moved.patch() == {"phase": "Evaluating", "message": "trained"}
    fresh = StatusUpdate.read({}, 3, NOW)
    fresh.status.job_name = "x"
    assert fresh.patch() == {"jobName": "x", "observedGeneration": 3}


def test_status_round_trips_through_the_wire_format() -> None:
    """What the API server stores reads back into the model and out again unchanged, so an
    uneventful tick never patches, and the camelCase names are the CRD's."""
    wire = {
        "phase": "RollingOut",
        "message": "rolling serving to version 4",
        "observedGeneration": 1,
        "jobName": "run-train",
        "modelVersion": "4",
        "metrics": {"test_accuracy": 0.98},
        "progress": {"epoch": 2, "epochs": 2, "valAccuracy": 0.97, "updatedAt": "2025-01-02T03:04:05Z"},
        "promoted": False,
        "previousChampionVersion": "3",
        "rollout": {
            "startedAt": "2025-01-02T03:04:05Z",
            "deadline": "2025-01-02T03:14:05Z",
            "deployments": [{"name": "serving", "previousVersion": "3", "previousModelUri": "models:/m/3"}],
        },
        "conditions": [
            {
                "type": "Promoted",
                "status": "True",
                "reason": "PolicyAccepted",
                "message": "m",
                "lastTransitionTime": "2025-01-02T03:04:05Z",
                "observedGeneration": 1,
            }
        ],
    }
    status = TrainingRunStatus.model_validate(wire)
    assert status.wire() == wire
    assert status.rollout == RolloutRecord(
        started_at="2025-01-02T03:04:05Z",
        deadline="2025-01-02T03:14:05Z",
        deployments=[RolloutEntry(name="serving", previous_version="3", previous_model_uri="models:/m/3")],
    )
    assert status.condition_status(Condition.PROMOTED) == "True"
    assert status.condition_status(Condition.ROLLED_OUT) is None
    assert StatusUpdate.read(wire, 1, NOW).patch() == {}
    # A plan entry without what was served before stays without it (no nulls in the status).
    assert RolloutEntry(name="serving").model_dump(by_alias=True, exclude_none=True) == {"name": "serving"}


def test_job_outcome_waits_for_terminal_conditions() -> None:
    assert job_outcome({}) == JobOutcome(False, False)
    interim = {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}
    assert not job_outcome(interim).finished
    complete = {"conditions": [*interim["conditions"], {"type": "Complete", "status": "True"}]}
    assert job_outcome(complete).succeeded
    failed = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "x"}]
    }
    outcome = job_outcome(failed)
    assert outcome.failed and outcome.reason == "BackoffLimitExceeded"


def _pod(
    name: str, phase: str, exit_code: int, message: str, finished: str = "2025-01-01T00:00:00Z"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "train",
                    "state": {
                        "terminated": {
                            "exitCode": exit_code,
                            "reason": "Completed" if exit_code == 0 else "Error",
                            "message": message,
                            "finishedAt": finished,
                        }
                    },
                }
            ],
        },
    }


RESULT = TrainingResult(
    run_id="r1",
    experiment_id="1",
    registered_model="mnist-cnn",
    model_version="3",
    architecture="baseline",
    metrics={"test_accuracy": 0.98},
    onnx_model_uri="models:/m/3",
    keras_model_uri="runs:/r1/keras-model",
)


def test_training_result_from_the_termination_message() -> None:
    pods = [_pod("a", "Failed", 3, "boom"), _pod("b", "Succeeded", 0, RESULT.to_json())]
    assert training_result(pods) == RESULT
    with pytest.raises(ResultError, match="no succeeded training pod"):
        training_result([_pod("a", "Failed", 1, "")])
    with pytest.raises(ResultError, match="empty termination message"):
        training_result([_pod("b", "Succeeded", 0, "")])
    with pytest.raises(ResultError, match="not a training result"):
        training_result([_pod("b", "Succeeded", 0, '{"run_id": 1}')])


def test_failure_message_names_the_job_reason_and_the_pod() -> None:
    outcome = JobOutcome(
        True, False, "PodFailurePolicy", "Container train for pod ml/x failed with exit code 4"
    )
    log_tail = "Traceback ...\nerror: bad training data: /nonexistent.npz does not exist"
    message = failure_message(outcome, [_pod("baseline-train-abc", "Failed", 4, log_tail)])
    assert message.startswith("PodFailurePolicy: Container train")
    assert "pod baseline-train-abc exited with code 4 (Error)" in message
    assert "bad training data" in message


def test_rollout_state_follows_kubectl_rollout_status() -> None:
    def deployment(generation: int = 2, observed: int = 2, **status: Any) -> dict[str, Any]:
        return {
            "metadata": {"name": "serving", "generation": generation},
            "spec": {"replicas": 2},
            "status": {"observedGeneration": observed, **status},
        }

    assert not rollout_state(deployment(observed=1)).done
    assert not rollout_state(deployment(updatedReplicas=1, replicas=2, availableReplicas=2)).done
    assert not rollout_state(deployment(updatedReplicas=2, replicas=3, availableReplicas=2)).done
    assert not rollout_state(deployment(updatedReplicas=2, replicas=2, availableReplicas=1)).done
    assert rollout_state(deployment(updatedReplicas=2, replicas=2, availableReplicas=2)).done
    stuck = deployment(
        conditions=[{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    )
    assert rollout_state(stuck).failed


def test_progress_from_the_metric_history() -> None:
    empty = progress_status([], 5, NOW)
    assert empty == Progress(epoch=0, epochs=5, updated_at="2025-01-02T03:04:05Z")
    assert empty.model_dump(by_alias=True, exclude_none=True) == {
        "epoch": 0,
        "epochs": 5,
        "updatedAt": "2025-01-02T03:04:05Z",
    }
    progress = progress_status([(0, 0.91), (1, 0.95)], 5, NOW)
    assert progress.epoch == 2
    assert progress.val_accuracy == 0.95


# ------------------------------------------------------------------------ configuration


def test_config_from_env() -> None:
    config = OperatorConfig.from_env(
        {
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "MNIST_OPERATOR_NAMESPACES": "team-a, team-b,team-a",
            "MNIST_OPERATOR_ROLLOUT_TIMEOUT_SECONDS": "120",
            "MNIST_OPERATOR_HEALTH_PORT": "9090",
            "MNIST_OPERATOR_LEADER_ELECTION": "false",
            "POD_NAMESPACE": "mnist-mlops",
            "POD_NAME": "operator-abc",
            "MNIST_OPERATOR_TRAINING_IMAGE_PULL_SECRETS": "regcred, other.registry,regcred",
            "MNIST_OPERATOR_MLFLOW_AUTH_SECRET": "mlflow-admin",
            "MNIST_OPERATOR_MLFLOW_AUTH_USERNAME_KEY": "user",
        }
    )
    assert config.training_image_pull_secrets == ("regcred", "other.registry")
    assert (config.mlflow_auth_secret, config.mlflow_auth_username_key) == ("mlflow-admin", "user")
    assert config.mlflow_auth_password_key == "password"
    assert config.namespaces == ("team-a", "team-b")
    assert not config.clusterwide
    assert config.rollout_timeout_seconds == 120
    assert config.liveness_endpoint == "http://0.0.0.0:9090/healthz"
    assert config.leader_election is False
    assert (config.lease_namespace, config.identity) == ("mnist-mlops", "operator-abc")
    assert OperatorConfig.from_env({"MLFLOW_TRACKING_URI": "http://m"}).clusterwide


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "MLFLOW_TRACKING_URI is required"),
        ({"MNIST_OPERATOR_HEALTH_PORT": "http"}, "MNIST_OPERATOR_HEALTH_PORT='http' is not a number"),
        ({"MNIST_OPERATOR_HEALTH_PORT": "70000"}, "must be between 1 and 65535"),
        ({"MNIST_OPERATOR_NAMESPACES": "Team_A"}, "'Team_A' is not a valid namespace name"),
        ({"MNIST_OPERATOR_LEADER_ELECTION": "maybe"}, "is not a boolean"),
        ({"MNIST_OPERATOR_LIVENESS_TICKS": "1"}, "MNIST_OPERATOR_LIVENESS_TICKS='1' must be >= 2"),
        ({"MNIST_OPERATOR_LOG_LEVEL": "loud"}, "is not one of DEBUG"),
        ({"MNIST_OPERATOR_TRAINING_IMAGE_PULL_SECRETS": "ok,Bad_Name"}, "'Bad_Name' is not a valid object"),
    ],
)
def test_config_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    base = {"MLFLOW_TRACKING_URI": "http://m"} if "MLFLOW_TRACKING_URI" not in message else {}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        OperatorConfig.from_env({**base, **env})


def test_config_defaults_and_direct_construction_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_OPERATOR_TRAINING_IMAGE", "from-the-environment")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-the-environment")
    assert OperatorConfig(mlflow_tracking_uri="http://m").training_image == "mnist-mlops/training:latest"
    assert OperatorConfig.from_env().training_image == "from-the-environment"
    config = OperatorConfig.from_env(
        {
            "MLFLOW_TRACKING_URI": " http://m ",
            "MNIST_OPERATOR_TRAINING_IMAGE": "  ",
            "MNIST_OPERATOR_LOG_LEVEL": "debug",
            "MNIST_OPERATOR_LOG_FORMAT": "JSON",
            "MNIST_OPERATOR_TRAINING_IMAGE_PULL_POLICY": "always",
            "MNIST_OPERATOR_LEASE_DURATION_SECONDS": "20",
        }
    )
    assert config.mlflow_tracking_uri == "http://m"
    # Blank is unset; choices are matched without regard to case.
    assert config.training_image == "mnist-mlops/training:latest"
    assert (config.log_level, config.log_json, config.training_image_pull_policy) == ("DEBUG", True, "Always")
    assert config.lease_duration_seconds == 20 and isinstance(config.lease_duration_seconds, int)
    assert (config.reconcile_interval_seconds, config.mlflow_max_backoff_seconds) == (5.0, 60.0)
    # Liveness: 24 reconcile intervals, but never less than twice the longest MLflow backoff.
    assert config.stall_after_seconds == 120.0
    assert OperatorConfig(mlflow_tracking_uri="m", reconcile_interval_seconds=10).stall_after_seconds == 240


# ------------------------------------------------------------------------ test-only failpoints


def test_failpoints_are_inert_unless_the_test_variable_names_one() -> None:
    assert FAILPOINT_ENV == "MNIST_OPERATOR_TEST_FAILPOINT"
    assert Failpoints.from_env({}) is NO_FAILPOINTS
    assert Failpoints.from_env({FAILPOINT_ENV: " "}) is NO_FAILPOINTS
    assert Failpoints.from_env({FAILPOINT_ENV: "after-alias-move"}).armed == "after-alias-move"
    with pytest.raises(ConfigError, match="MNIST_OPERATOR_TEST_FAILPOINT='nowhere' is not one of"):
        Failpoints.from_env({FAILPOINT_ENV: "nowhere"})


# ------------------------------------------------------------------------ liveness


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_is_alive_while_every_active_run_is_reconciled() -> None:
    clock = Clock()
    heartbeat = Heartbeat(stall_after=10.0, clock=clock)
    assert heartbeat.verdict().alive  # idle: nothing to reconcile
    heartbeat.seen("ml/a", active=True)
    for _ in range(5):
        clock.now += 8
        with heartbeat.ticking("ml/a"):
            clock.now += 1
    verdict = heartbeat.verdict()
    assert verdict.alive and verdict.active_runs == 1
    assert verdict.document() == {"alive": True, "activeRuns": 1, "secondsSinceLastTick": 0.0}
    # A final (or deleted) run is no longer expected to tick.
    heartbeat.seen("ml/a", active=False)
    clock.now += 3600
    assert heartbeat.verdict().alive


def test_a_stale_heartbeat_fails_liveness() -> None:
    clock = Clock()
    heartbeat = Heartbeat(stall_after=10.0, clock=clock)
    heartbeat.seen("ml/a", active=True)
    heartbeat.seen("ml/b", active=True)
    with heartbeat.ticking("ml/b"):
        pass
    clock.now += 9
    assert heartbeat.verdict().alive
    clock.now += 2  # neither has been reconciled for 11s: the timers stopped
    verdict = heartbeat.verdict()
    assert not verdict.alive
    assert "has not run for 11s (limit 10s); 2 active run(s) late" in verdict.problem
    assert verdict.document()["problem"] == verdict.problem


def test_a_hung_reconcile_tick_fails_liveness() -> None:
    clock = Clock()
    heartbeat = Heartbeat(stall_after=10.0, clock=clock)
    with heartbeat.ticking("ml/a"):
        clock.now += 5
        assert heartbeat.verdict().alive
        clock.now += 6
        verdict = heartbeat.verdict()
        assert not verdict.alive
        assert "TrainingRun ml/a has been running for 11s" in verdict.problem
    assert heartbeat.verdict().alive


# --- multi-worker runs and queues (issue 13) ------------------------------------------------------


def test_a_single_worker_job_is_unchanged_by_the_multi_worker_support() -> None:
    job = job_for()
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    pod = job["spec"]["template"]["spec"]
    assert "subdomain" not in pod
    assert WORKER_HOSTS_ENV not in {e["name"] for e in pod["containers"][0]["env"]}


def test_a_multi_worker_run_is_an_indexed_job_whose_pods_know_every_worker() -> None:
    job = job_for({"workers": 3, "hyperparameters": {"batchSize": 96}})
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 3
    # One failed worker ends the run: the others cannot all-reduce without it.
    assert spec["backoffLimitPerIndex"] == 0 and spec["maxFailedIndexes"] == 0
    pod = spec["template"]["spec"]
    service = build_workers_service(name="baseline", namespace="ml", uid=UID)
    assert pod["subdomain"] == service["metadata"]["name"]
    container = pod["containers"][0]
    hosts = {e["name"]: e.get("value") for e in container["env"]}[WORKER_HOSTS_ENV].split(",")
    assert hosts == [f"baseline-train-{i}.baseline-workers:{WORKER_PORT}" for i in range(3)]
    assert container["ports"] == [{"name": WORKER_PORT_NAME, "containerPort": WORKER_PORT}]
    assert "--workers=3" in container["args"]
    # What the training process makes of it, for the pod of index 1.
    context = worker_context(3, {WORKER_INDEX_ENV: "1", WORKER_HOSTS_ENV: ",".join(hosts)})
    assert context.index == 1 and not context.is_chief
    # The headless Service selects exactly these pods and publishes them before they are ready.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert service["spec"]["ports"][0]["port"] == WORKER_PORT
    assert service["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]


def test_only_worker_0_hands_back_the_result() -> None:
    result = TrainingResult(
        run_id="r", experiment_id="1", registered_model="m", model_version="3", architecture="baseline",
        onnx_model_uri="models:/m/3", keras_model_uri="runs:/r/keras",
    )  # fmt: skip

    def pod(index: str, message: str, finished: str) -> dict[str, Any]:
        return {
            "metadata": {"name": f"w{index}", "annotations": {COMPLETION_INDEX_ANNOTATION: index}},
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "train",
                        "state": {"terminated": {"exitCode": 0, "message": message, "finishedAt": finished}},
                    }
                ],
            },
        }

    # Worker 1 finished last with nothing to say; the chief's result is the run's.
    pods = [pod("0", result.to_json(), "2026-01-01T00:00:01Z"), pod("1", "", "2026-01-01T00:00:09Z")]
    assert training_result(pods) == result


def test_a_queued_run_is_created_suspended_for_kueue_with_its_priority() -> None:
    job = job_for({"queueName": "team-a", "priorityClassName": "training-low"})
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "training-low"
    unqueued = job_for()
    assert "suspend" not in unqueued["spec"] and KUEUE_QUEUE_LABEL not in unqueued["metadata"]["labels"]
    assert job_is_suspended(job)
    assert not job_is_suspended(unqueued)
    assert not job_is_suspended({"spec": {"suspend": False}})
