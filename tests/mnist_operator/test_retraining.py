"""RetrainingPolicies on the real API server, with the operator as a child process and a real
prediction log (SQLite), a real Alertmanager and, for the feedback run, real training by the fake
kubelet into a real MLflow server.

Most policies live in an "idle" namespace no fake kubelet watches: their TrainingRuns get a Job whose
pod never runs, so a run stays active for as long as a test needs (what concurrency is about).
Finishing a run there is done by writing its status phase, as the operator would.
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contract.retraining import (
    API_GROUP,
    API_VERSION,
    FEEDBACK_DB_URL_ENV,
    KIND,
    MAX_NAME_LENGTH,
    POLICY_LABEL,
    TRIGGER_ANNOTATION,
    RetrainingPolicySpec,
    TriggerKind,
)
from contract.spec import TrainingRunSpec
from local_mode.processes import wait_until
from mnist_operator.builders import feedback_env
from mnist_operator.config import OperatorConfig
from mnist_operator.retraining import (
    CREATED_AT_ANNOTATION,
    PolicyView,
    Trigger,
    alert_key,
    build_trainingrun,
    history_of,
    is_unfinished,
    run_name,
)
from prediction_log.store import PredictionStore, encode_batch
from testing.alertmanager import Alertmanager, webhook_receiver
from testing.controlplane import ControlPlane
from testing.kubectl import kubectl, kubectl_ok, unique_name
from testing.operator_harness import (
    OperatorAccount,
    OperatorFactory,
    OperatorProcess,
    create_namespace,
    phase_in,
    wait_for_trainingrun,
)

TOKEN = "s3cret-alertmanager-token"
DRIFT_ALERT = "MnistInputDrift"
# One epoch on the fake kubelet's 3000 examples: seconds of training.
QUICK_TEMPLATE = {"hyperparameters": {"epochs": 1, "batchSize": 64}}
TICK = "0.5"


@pytest.fixture
def idle_namespace(control_plane: ControlPlane, operator_account: OperatorAccount) -> Iterator[str]:
    namespace = create_namespace(control_plane, unique_name("rp"))
    operator_account.bind_namespace(namespace)
    yield namespace
    kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")


@pytest.fixture
def prediction_log(tmp_path: Path) -> Iterator[tuple[str, PredictionStore]]:
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    store = PredictionStore(url)
    store.create_schema()
    yield url, store
    store.close()


def start_operator(
    operators: OperatorFactory, namespaces: list[str], url: str | None = None
) -> OperatorProcess:
    settings = {"retraining_interval_seconds": TICK, "alertmanager_token": TOKEN}
    if url is not None:
        settings["prediction_log_url"] = url
    operator = operators.start(namespaces, leader_election="false", **settings)
    operator.wait_healthy()
    return operator


def webhook_url(operator: OperatorProcess) -> str:
    return f"http://127.0.0.1:{operator.env['MNIST_OPERATOR_HEALTH_PORT']}/webhooks/alertmanager"


def apply_policy(plane: ControlPlane, namespace: str, name: str, spec: dict[str, Any]) -> None:
    manifest = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"trainingRunTemplate": QUICK_TEMPLATE, **spec},
    }
    kubectl_ok(plane, "apply", "-f", "-", manifest=manifest)


def policy(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(kubectl_ok(plane, "get", "rp", name, "-n", namespace, "-o", "json"))
    return found


def runs_of(plane: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    listed = json.loads(
        kubectl_ok(plane, "get", "tr", "-n", namespace, "-l", f"{POLICY_LABEL}={name}", "-o", "json")
    )
    items: list[dict[str, Any]] = listed["items"]
    return sorted(items, key=lambda run: run["metadata"]["creationTimestamp"])


def live_runs(plane: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    return [run for run in runs_of(plane, namespace, name) if not run["metadata"].get("deletionTimestamp")]


def wait_runs(
    plane: ControlPlane, namespace: str, name: str, count: int, timeout: float = 60
) -> list[dict[str, Any]]:
    return wait_until(
        lambda: found if len(found := live_runs(plane, namespace, name)) == count else None,
        timeout,
        f"{count} TrainingRun(s) of policy {name}",
    )


def wait_status(
    plane: ControlPlane, namespace: str, name: str, predicate: Any, what: str, *, timeout: float = 60
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        status: dict[str, Any] = policy(plane, namespace, name).get("status") or {}
        return status if predicate(status) else None

    try:
        return wait_until(check, timeout, what, interval=0.3)
    except TimeoutError as error:
        raise AssertionError(f"{error}; status: {policy(plane, namespace, name).get('status')}") from error


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((item for item in status.get("conditions") or [] if item["type"] == type_), None)


def finish(plane: ControlPlane, namespace: str, run: str, phase: str = "Failed") -> None:
    """What the operator writes when a run ends (the idle namespace's runs never train); once the
    operator has started the run, so its own first status write cannot undo this one."""
    wait_for_trainingrun(plane, namespace, run, predicate=phase_in("Training"), timeout=60, what="training")
    kubectl_ok(
        plane, "patch", "tr", run, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"phase": phase}}),
    )  # fmt: skip


def post(url: str, payload: Any, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read() or b"{}")


def alert_payload(
    alertname: str, starts_at: str, status: str = "firing", fingerprint: str = "f00d"
) -> dict[str, Any]:
    """Alertmanager's webhook JSON (version 4)."""
    alert = {
        "status": status,
        "labels": {"alertname": alertname, "severity": "warning"},
        "annotations": {"summary": "drift"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus/graph",
        "fingerprint": fingerprint,
    }
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{alertname}"}}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "operator",
        "groupLabels": {"alertname": alertname},
        "commonLabels": alert["labels"],
        "commonAnnotations": alert["annotations"],
        "externalURL": "http://alertmanager",
        "alerts": [alert],
    }


def add_labelled(store: PredictionStore, count: int, offset: int, mnist_path: Path) -> None:
    """`count` logged predictions with their labels: MNIST training digits, never test digits."""
    with np.load(mnist_path) as archive:
        images = archive["x_train"][-(offset + count) :][:count].astype(np.float32) / 255.0
        labels = archive["y_train"][-(offset + count) :][:count]
    ids = [f"req-{offset + i}" for i in range(count)]
    probabilities = np.full((count, 10), 0.1, np.float32)
    store.insert_many(
        encode_batch(
            ids,
            created_at=datetime.datetime.now(datetime.UTC),
            model_name="mnist-cnn",
            model_version="1",
            source="predict",
            images=images,
            probabilities=probabilities,
        )
    )
    for request_id, label in zip(ids, labels, strict=True):
        assert store.add_feedback(request_id, int(label)).value == "created"


# ------------------------------------------------------------------------ pure parts


def _policy_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": "p" * MAX_NAME_LENGTH, "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"trainingRunTemplate": {}, "triggers": {"schedule": "@daily"}, **spec},
    }


def test_run_names_are_deterministic_and_fit_a_trainingrun() -> None:
    at = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    first = Trigger(TriggerKind.ALERT, "alert:A", alert_key("fp", {}, "2026-01-01T00:00:00Z"), at)
    again = Trigger(TriggerKind.ALERT, "alert:A", alert_key("fp", {}, "2026-01-01T00:00:00Z"), at)
    later = Trigger(TriggerKind.ALERT, "alert:A", alert_key("fp", {}, "2026-01-01T01:00:00Z"), at)
    name = run_name("p" * MAX_NAME_LENGTH, first)
    assert name == run_name("p" * MAX_NAME_LENGTH, again) != run_name("p" * MAX_NAME_LENGTH, later)
    assert len(name) <= 57


def test_a_policy_run_trains_on_feedback_and_is_owned_by_the_policy() -> None:
    body = _policy_body(trainingRunTemplate={"hyperparameters": {"epochs": 2}, "includeFeedback": False})
    spec = RetrainingPolicySpec.model_validate(body["spec"])
    now = datetime.datetime(2026, 1, 1, 3, tzinfo=datetime.UTC)
    run = build_trainingrun(body, spec, Trigger(TriggerKind.SCHEDULE, "schedule", "k", now), now)
    assert run["spec"]["includeFeedback"] is True
    assert run["spec"]["hyperparameters"]["epochs"] == 2
    assert run["metadata"]["labels"] == {POLICY_LABEL: body["metadata"]["name"]}
    assert run["metadata"]["annotations"][TRIGGER_ANNOTATION] == "schedule"
    (owner,) = run["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (KIND, "u-1", True)
    config = OperatorConfig(mlflow_tracking_uri="http://mlflow", prediction_log_url="sqlite:///p.db")
    parsed = TrainingRunSpec.model_validate(run["spec"])
    assert feedback_env(parsed, config) == [{"name": FEEDBACK_DB_URL_ENV, "value": "sqlite:///p.db"}]
    secret = OperatorConfig(mlflow_tracking_uri="http://mlflow", feedback_db_secret="prediction-log")
    assert feedback_env(parsed, secret)[0]["valueFrom"]["secretKeyRef"] == {
        "name": "prediction-log",
        "key": "url",
    }
    assert feedback_env(TrainingRunSpec(), config) == []


def test_history_is_newest_first_and_the_status_patch_is_minimal() -> None:
    def run(name: str, created: str, phase: str | None, detail: str) -> dict[str, Any]:
        annotations = {TRIGGER_ANNOTATION: detail, CREATED_AT_ANNOTATION: created}
        status = {"phase": phase} if phase else {}
        return {
            "metadata": {"name": name, "creationTimestamp": created[:19] + "Z", "annotations": annotations},
            "status": status,
        }

    runs = [
        run("a", "2026-01-01T00:00:00.100000Z", "Failed", "schedule"),
        run("c", "2026-01-01T00:00:00.300000Z", None, "feedback:40"),
        run("b", "2026-01-01T00:00:00.200000Z", "Promoted", "alert:A"),
    ]
    history = history_of(runs)
    assert [(entry.training_run, entry.kind, entry.phase) for entry in history] == [
        ("c", "feedback", None),
        ("b", "alert", "Promoted"),
        ("a", "schedule", "Failed"),
    ]
    assert [is_unfinished(item) for item in runs] == [False, True, False]
    body = _policy_body()
    body["status"] = {"active": "c", "observedGeneration": 1}
    view = PolicyView.read(body, datetime.datetime.now(datetime.UTC))
    assert view.patch() == {}
    view.status.active = None
    assert view.patch() == {"active": None}


# ------------------------------------------------------------------------ spec and schedule


def test_invalid_cron_schedule_and_catch_up(
    control_plane: ControlPlane, operators: OperatorFactory, idle_namespace: str
) -> None:
    """A bad cron is an InvalidSpec condition; a missed schedule makes up exactly one run; a trigger
    while that run is active is skipped (Forbid) and recorded."""
    start_operator(operators, [idle_namespace])
    apply_policy(control_plane, idle_namespace, "bad-cron", {"triggers": {"schedule": "61 3 * * *"}})
    status = wait_status(
        control_plane, idle_namespace, "bad-cron",
        lambda s: (condition(s, "Valid") or {}).get("status") == "False", "the InvalidSpec condition",
    )  # fmt: skip
    valid = condition(status, "Valid")
    assert valid is not None and valid["reason"] == "InvalidSpec"
    assert "is not a valid cron expression" in valid["message"], valid

    name = "nightly"
    apply_policy(control_plane, idle_namespace, name, {"triggers": {"schedule": "0 3 * * *"}})
    status = wait_status(
        control_plane, idle_namespace, name, lambda s: s.get("nextScheduleTime"), "nextScheduleTime"
    )
    nxt = datetime.datetime.fromisoformat(status["nextScheduleTime"].replace("Z", "+00:00"))
    now = datetime.datetime.now(datetime.UTC)
    assert (nxt.hour, nxt.minute) == (3, 0) and now < nxt <= now + datetime.timedelta(days=1)
    assert (condition(status, "Valid") or {}).get("reason") == "SpecValid"
    time.sleep(2)
    assert live_runs(control_plane, idle_namespace, name) == [], "a new schedule fired without its time"

    # The operator "was down" over three nights: one run is made up, not three.
    missed = (now - datetime.timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kubectl_ok(
        control_plane, "patch", "rp", name, "-n", idle_namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"nextScheduleTime": missed}}),
    )  # fmt: skip
    (run,) = wait_runs(control_plane, idle_namespace, name, 1)
    time.sleep(3)  # six ticks
    assert len(live_runs(control_plane, idle_namespace, name)) == 1
    status = policy(control_plane, idle_namespace, name)["status"]
    assert datetime.datetime.fromisoformat(status["nextScheduleTime"].replace("Z", "+00:00")) > now
    run_name = run["metadata"]["name"]
    assert status["lastTrigger"] == {
        "kind": "schedule",
        "detail": "schedule",
        "at": missed,
        "trainingRun": run_name,
    }
    assert run["metadata"]["annotations"][TRIGGER_ANNOTATION] == "schedule"
    assert run["metadata"]["ownerReferences"][0]["kind"] == KIND
    assert run["spec"]["includeFeedback"] is True
    wait_status(control_plane, idle_namespace, name, lambda s: s.get("active") == run_name, "the active run")

    # Forbid: another missed night comes while the first run is still training.
    again = (now - datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kubectl_ok(
        control_plane, "patch", "rp", name, "-n", idle_namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"nextScheduleTime": again}}),
    )  # fmt: skip
    status = wait_status(
        control_plane, idle_namespace, name, lambda s: s.get("lastSkipped"), "the skipped trigger"
    )
    assert status["lastSkipped"]["kind"] == "schedule"
    assert run_name in status["lastSkipped"]["reason"] and "Forbid" in status["lastSkipped"]["reason"]
    assert (condition(status, "Triggered") or {}).get("reason") == "ConcurrencyForbid"
    assert [item["metadata"]["name"] for item in live_runs(control_plane, idle_namespace, name)] == [run_name]


# ------------------------------------------------------------------------ the Alertmanager webhook


def test_alertmanager_webhook_is_authenticated_and_idempotent(
    control_plane: ControlPlane, operators: OperatorFactory, idle_namespace: str
) -> None:
    operator = start_operator(operators, [idle_namespace])
    url = webhook_url(operator)
    name = "on-drift"
    apply_policy(control_plane, idle_namespace, name, {"triggers": {"alert": {"names": [DRIFT_ALERT]}}})
    apply_policy(
        control_plane, idle_namespace, "other", {"triggers": {"alert": {"names": ["SomethingElse"]}}}
    )
    payload = alert_payload(DRIFT_ALERT, "2026-01-01T10:00:00Z")

    assert post(url, payload, None)[0] == 401
    assert post(url, payload, "wrong-token")[0] == 401
    assert post(url, {"alerts": "nope"}, TOKEN)[0] == 400
    assert live_runs(control_plane, idle_namespace, name) == []

    started = time.monotonic()
    status, body = post(url, payload, TOKEN)
    latency = time.monotonic() - started
    assert status == 200, body
    assert [(item["policy"], item["outcome"]) for item in body["triggered"]] == [
        (f"{idle_namespace}/{name}", "created")
    ]
    (run,) = wait_runs(control_plane, idle_namespace, name, 1, timeout=5)
    print(f"webhook → TrainingRun created, in the response: {latency * 1000:.0f} ms")
    assert run["metadata"]["annotations"][TRIGGER_ANNOTATION] == f"alert:{DRIFT_ALERT}"
    assert live_runs(control_plane, idle_namespace, "other") == []

    # Alertmanager re-sends a group (repeat_interval, a retry): the same firing starts nothing.
    for _ in range(3):
        status, body = post(url, payload, TOKEN)
        assert status == 200 and body["triggered"][0]["outcome"] == "duplicate", body
    resolved = alert_payload(DRIFT_ALERT, "2026-01-01T10:00:00Z", status="resolved")
    assert post(url, resolved, TOKEN) == (200, {"triggered": []})
    assert len(live_runs(control_plane, idle_namespace, name)) == 1

    # A new firing while the run trains: Forbid skips it and says so.
    status, body = post(url, alert_payload(DRIFT_ALERT, "2026-01-01T11:00:00Z"), TOKEN)
    assert status == 200 and body["triggered"][0]["outcome"] == "skipped", body
    recorded = policy(control_plane, idle_namespace, name)["status"]
    assert recorded["lastSkipped"]["detail"] == f"alert:{DRIFT_ALERT}"
    assert recorded["lastTrigger"]["trainingRun"] == run["metadata"]["name"]
    assert len(live_runs(control_plane, idle_namespace, name)) == 1


def test_replace_and_history_limit(
    control_plane: ControlPlane, operators: OperatorFactory, idle_namespace: str
) -> None:
    operator = start_operator(operators, [idle_namespace])
    url = webhook_url(operator)
    name = "replacing"
    apply_policy(
        control_plane, idle_namespace, name,
        {"triggers": {"alert": {"names": [DRIFT_ALERT]}}, "concurrencyPolicy": "Replace", "historyLimit": 1},
    )  # fmt: skip

    def fire(hour: int) -> str:
        status, body = post(url, alert_payload(DRIFT_ALERT, f"2026-01-01T{hour:02d}:00:00Z"), TOKEN)
        assert status == 200 and body["triggered"][0]["outcome"] == "created", body
        return str(body["triggered"][0]["trainingRun"])

    first = fire(1)
    second = fire(2)  # Replace: the first, still active, is deleted
    assert [run["metadata"]["name"] for run in wait_runs(control_plane, idle_namespace, name, 1)] == [second]
    finish(control_plane, idle_namespace, second)
    third = fire(3)
    finish(control_plane, idle_namespace, third)
    fourth = fire(4)
    # historyLimit 1: of the finished runs (third, second) only the newest stays.
    kept = wait_runs(control_plane, idle_namespace, name, 2)
    assert {run["metadata"]["name"] for run in kept} == {third, fourth}
    status = wait_status(
        control_plane, idle_namespace, name, lambda s: len(s.get("history") or []) == 2, "two history entries"
    )
    assert [entry["trainingRun"] for entry in status["history"]] == [fourth, third]
    assert status["history"][1]["phase"] == "Failed"
    assert status["active"] == fourth
    assert first not in {run["metadata"]["name"] for run in runs_of(control_plane, idle_namespace, name)}


def test_a_real_alertmanager_reaches_the_operator(
    control_plane: ControlPlane, operators: OperatorFactory, idle_namespace: str, tmp_path: Path
) -> None:
    operator = start_operator(operators, [idle_namespace])
    name = "am-drift"
    apply_policy(control_plane, idle_namespace, name, {"triggers": {"alert": {"names": [DRIFT_ALERT]}}})
    alertmanager = Alertmanager([webhook_receiver("operator", webhook_url(operator), TOKEN)], tmp_path / "am")
    try:
        posted = time.monotonic()
        alertmanager.post_alert({"alertname": DRIFT_ALERT, "severity": "warning"}, {"summary": "input drift"})
        (run,) = wait_runs(control_plane, idle_namespace, name, 1, timeout=60)
        print(f"Alertmanager API v2 alert → TrainingRun: {time.monotonic() - posted:.2f} s")
        assert run["metadata"]["annotations"][TRIGGER_ANNOTATION] == f"alert:{DRIFT_ALERT}"
        # group_interval is 1 s: Alertmanager notifies again on every change, and re-posting the alert
        # (as Prometheus does every evaluation) is the same firing; still one run.
        alertmanager.post_alert({"alertname": DRIFT_ALERT, "severity": "warning"}, {"summary": "input drift"})
        time.sleep(4)
        assert len(live_runs(control_plane, idle_namespace, name)) == 1
        assert "401" not in alertmanager.log_tail(), alertmanager.log_tail()
    finally:
        alertmanager.stop()


# ------------------------------------------------------------------------ feedback → training


def test_feedback_trigger_trains_with_the_feedback(
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    prediction_log: tuple[str, PredictionStore],
    mnist_path: Path,
) -> None:
    url, store = prediction_log
    start_operator(operators, [watched_namespace], url)
    name = "on-feedback"
    registered = unique_name("fb-model")
    apply_policy(
        control_plane, watched_namespace, name,
        {
            "triggers": {"feedback": {"minLabelled": 40}},
            # The fewest MNIST examples the spec allows: the run is here to show the 40 labels reach
            # the training split, so its time is the entrypoint's fixed cost, not learning.
            "trainingRunTemplate": {**QUICK_TEMPLATE, "registeredModel": registered, "maxTrainSamples": 100},
        },
    )  # fmt: skip
    wait_status(
        control_plane, watched_namespace, name, lambda s: s.get("feedbackSince"), "the feedback baseline"
    )
    add_labelled(store, 39, 0, mnist_path)
    wait_status(control_plane, watched_namespace, name, lambda s: s.get("feedbackCount") == 39, "39 counted")
    time.sleep(1.5)
    assert live_runs(control_plane, watched_namespace, name) == []

    add_labelled(store, 1, 39, mnist_path)
    labelled = time.monotonic()
    (run,) = wait_runs(control_plane, watched_namespace, name, 1, timeout=30)
    print(f"40th label → TrainingRun: {time.monotonic() - labelled:.2f} s")
    run_name = run["metadata"]["name"]
    assert run["metadata"]["annotations"][TRIGGER_ANNOTATION] == "feedback:40"
    status = wait_status(
        control_plane, watched_namespace, name, lambda s: s.get("feedbackCount") == 0, "a new baseline"
    )
    assert status["lastTrigger"]["kind"] == "feedback"

    done = wait_for_trainingrun(
        control_plane, watched_namespace, run_name,
        predicate=phase_in("Promoted", "Rejected", "RolledBack", "Failed"), timeout=600, what="finished",
    )  # fmt: skip
    assert done["status"]["phase"] != "Failed", done["status"]
    from mlflow import MlflowClient

    mlflow_run = MlflowClient(operators.mlflow.url).get_run(done["status"]["mlflowRunId"])
    params = mlflow_run.data.params
    assert params["feedback_samples"] == "40", params
    assert params["mnist_train_samples"] == "100", params
    assert int(params["train_samples"]) == int(params["mnist_train_samples"]) + 40
    assert mlflow_run.data.tags["feedback_samples"] == "40"
    assert mlflow_run.inputs is not None
    contexts = {item.tags[0].value for item in mlflow_run.inputs.dataset_inputs if item.tags}
    assert {"training", "validation", "test"} <= contexts
