"""Serving follows the registry, end to end: `python -m mnist_operator` against a real kube-apiserver
(the fake kubelet runs the serving pods) and a real MLflow server, whose alias is moved with the plain
MLflow client, as a user would from a notebook; with MLflow's own webhook delivery, and without.

The fast tier runs the operator with MNIST_OPERATOR_CONFIRM_FROM_PODS=false (testing/operator_harness):
the fake kubelet's pods have no process behind them and an address (127.0.0.1) the API server's pod
proxy refuses, so they cannot be asked which version they serve. One test turns it on to show that
such pods are never reported as confirmed.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from contract.registry import alias_version
from contract.spec import CHAMPION_ALIAS, MODEL_VERSION_ANNOTATION
from local_mode.processes import free_port, wait_until
from mnist_operator import tracking, webhooks
from mnist_operator.builders import model_uri_of
from mnist_operator.registry_sync import CONFIRMED_VERSION_ANNOTATION
from testing.controlplane import ControlPlane
from testing.fake_kubelet import FakeKubelet
from testing.kubectl import get_json, kubectl, kubectl_ok, unique_name
from testing.operator_harness import (
    REPO_ROOT,
    OperatorAccount,
    OperatorFactory,
    OperatorProcess,
    RestartableMlflow,
    phase_in,
    serving_deployment,
    wait_deployment_available,
    wait_for_trainingrun,
)
from tests.mnist_operator.test_reconcile import STAND_IN_INIT, STAND_IN_MAIN, quick_spec, trainingrun

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

WEBHOOK_SECRET = "registry-sync-test-" + uuid.uuid4().hex
# The bound on an out-of-band alias move reaching the serving Deployment.
FOLLOW_WITHIN_SECONDS = 30.0


@pytest.fixture
def mlflow_client(operator_mlflow: RestartableMlflow, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    return tracking.make_client(operator_mlflow.url)


@pytest.fixture
def model() -> str:
    return unique_name("follow")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_reconcile's stand-in trainer: registers a version with the given accuracy, no TensorFlow."""
    root = tmp_path_factory.mktemp("stand-in-trainer")
    package = root / "training_job"
    package.mkdir()
    (package / "__init__.py").write_text(STAND_IN_INIT.format(real=str(REPO_ROOT / "training_job")))
    (package / "__main__.py").write_text(STAND_IN_MAIN)
    return root


def register_versions(client: MlflowClient, model: str, count: int, accuracy: float = 0.1) -> list[str]:
    """`count` versions of a new registered model, each from a run with a test accuracy (no artifacts:
    the operator only reads the registry)."""
    experiment = client.create_experiment(f"follow-{uuid.uuid4().hex[:8]}")
    client.create_registered_model(model)
    versions = []
    for _ in range(count):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "test_accuracy", accuracy)
        client.set_terminated(run.info.run_id)
        created = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run.info.run_id)
        versions.append(str(created.version))
    return versions


def deploy_pinned(plane: ControlPlane, namespace: str, model: str, version: str) -> str:
    """A serving Deployment as a promotion leaves it: pinned to `version`, its pods available."""
    name = "serving"
    deployment = serving_deployment(name, namespace, model)
    deployment["spec"]["template"]["metadata"]["annotations"] = {MODEL_VERSION_ANNOTATION: version}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "SERVING_MODEL_URI", "value": f"models:/{model}/{version}"}]
    container["ports"] = [{"name": "http", "containerPort": 8000}]
    kubectl_ok(plane, "apply", "-f", "-", manifest=deployment)
    wait_deployment_available(plane, namespace, name)
    return name


def pinned_uri(plane: ControlPlane, namespace: str, name: str) -> str | None:
    return model_uri_of(get_json(plane, "deployment", name, "-n", namespace))


def deployment_events(plane: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = get_json(
        plane,
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=Deployment",
    )["items"]
    return found


def event_with(plane: ControlPlane, namespace: str, name: str, reason: str) -> dict[str, Any] | None:
    return next(
        (event for event in deployment_events(plane, namespace, name) if event["reason"] == reason), None
    )


def follow(plane: ControlPlane, namespace: str, name: str, uri: str) -> float:
    """Seconds until the Deployment's pod template pins `uri` (at most FOLLOW_WITHIN_SECONDS)."""
    started = time.monotonic()
    wait_until(
        lambda: pinned_uri(plane, namespace, name) == uri,
        FOLLOW_WITHIN_SECONDS,
        f"the serving Deployment to pin {uri}",
        interval=0.2,
    )
    return time.monotonic() - started


def first_pass_done(operator: OperatorProcess) -> None:
    """The operator's first sync pass (at start-up) is over: what follows is a new alias move."""
    operator.wait_leading()
    wait_until(lambda: "registry sync: first pass" in operator.log_text(), 30, "the first registry sync pass")


def post_webhook(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


def signed(document: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[dict[str, str], bytes]:
    body = json.dumps(document).encode()
    delivery, stamp = str(uuid.uuid4()), str(int(time.time()))
    return {
        "Content-Type": "application/json",
        webhooks.DELIVERY_ID_HEADER: delivery,
        webhooks.TIMESTAMP_HEADER: stamp,
        webhooks.SIGNATURE_HEADER: webhooks.signature(secret, delivery, stamp, body),
    }, body


def webhook_url(operator: OperatorProcess) -> str:
    return f"http://127.0.0.1:{operator.env['MNIST_OPERATOR_HEALTH_PORT']}{webhooks.MLFLOW_WEBHOOK_PATH}"


@pytest.fixture
def mlflow_webhook(mlflow_client: MlflowClient) -> Iterator[list[str]]:
    """Webhooks a test registers in the shared MLflow server, deleted afterwards."""
    created: list[str] = []
    yield created
    for webhook_id in created:
        mlflow_client.delete_webhook(webhook_id)


# ------------------------------------------------------------------------ MLflow's own delivery


def test_mlflow_delivers_signed_alias_events_that_verify(
    mlflow_client: MlflowClient, mlflow_webhook: list[str], model: str
) -> None:
    """The real MLflow server's delivery, into the operator's handler (in this process): the secret it
    stored and signs with, its headers and body verify, and both alias events arrive."""
    received: list[webhooks.AliasEvent] = []
    endpoint = webhooks.MlflowWebhook(WEBHOOK_SECRET, 300, received.append)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    port = free_port()

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_post(webhooks.MLFLOW_WEBHOOK_PATH, endpoint.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        url = f"http://127.0.0.1:{port}{webhooks.MLFLOW_WEBHOOK_PATH}"
        name = unique_name("unit")
        mlflow_webhook.append(webhooks.register(mlflow_client, name=name, url=url, secret=WEBHOOK_SECRET))
        # Registering again (an upgrade's hook) updates that webhook rather than adding another.
        assert (
            webhooks.register(mlflow_client, name=name, url=url, secret=WEBHOOK_SECRET) == mlflow_webhook[0]
        )
        time.sleep(1.5)  # MLflow's per-event webhook cache (1 s here)
        (version,) = register_versions(mlflow_client, model, 1)
        mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, version)
        mlflow_client.delete_registered_model_alias(model, CHAMPION_ALIAS)
        wait_until(lambda: len({event.event for event in received}) == 2, 20, "both alias events")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert webhooks.AliasEvent("model_version_alias.created", model, CHAMPION_ALIAS, version) in received
    assert webhooks.AliasEvent("model_version_alias.deleted", model, CHAMPION_ALIAS, None) in received
    assert endpoint.tally.counts["bad-signature"] == 0


# ------------------------------------------------------------------------ the alias moves, serving follows


def test_without_webhooks_the_periodic_sync_rolls_serving_to_the_moved_alias(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    model: str,
    mlflow_client: MlflowClient,
) -> None:
    namespace = watched_namespace
    first, second = register_versions(mlflow_client, model, 2)
    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, first)
    serving = deploy_pinned(control_plane, namespace, model, first)
    # The chart's default interval (10 s), no webhook secret: only the periodic pass can notice.
    first_pass_done(operators.start([namespace]))

    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, second)
    seconds = follow(control_plane, namespace, serving, f"models:/{model}/{second}")
    print(f"\nperiodic registry sync (every 10 s): alias move -> pod template pinned in {seconds:.1f} s")

    document = get_json(control_plane, "deployment", serving, "-n", namespace)
    assert document["spec"]["template"]["metadata"]["annotations"][MODEL_VERSION_ANNOTATION] == second
    event = wait_until(
        lambda: event_with(control_plane, namespace, serving, "RegistrySync"), 10, "the RegistrySync event"
    )
    assert f"{model}@champion moved: {first} -> version {second}" in event["message"], event
    assert "periodic" in event["message"], event
    # The new ReplicaSet's pods come up on the pinned version.
    wait_deployment_available(control_plane, namespace, serving)


def test_with_mlflows_webhook_serving_follows_at_once(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    model: str,
    mlflow_client: MlflowClient,
    mlflow_webhook: list[str],
) -> None:
    namespace = watched_namespace
    first, second = register_versions(mlflow_client, model, 2)
    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, first)
    serving = deploy_pinned(control_plane, namespace, model, first)
    # A periodic pass only at start-up and then after 300 s: only the webhook can explain a quick roll.
    operator = operators.start([namespace], registry_sync_seconds="300", mlflow_webhook_secret=WEBHOOK_SECRET)
    first_pass_done(operator)
    # Registered in MLflow exactly as an administrator would (mnist_operator.webhooks.register).
    mlflow_webhook.append(
        webhooks.register(
            mlflow_client, name=unique_name("operator"), url=webhook_url(operator), secret=WEBHOOK_SECRET
        )
    )
    time.sleep(1.5)  # MLflow caches its list of webhooks per event (MLFLOW_WEBHOOK_CACHE_TTL=1 here)

    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, second)
    seconds = follow(control_plane, namespace, serving, f"models:/{model}/{second}")
    print(f"\nMLflow webhook: alias move -> pod template pinned in {seconds:.1f} s")
    assert seconds < 300

    event = wait_until(
        lambda: event_with(control_plane, namespace, serving, "RegistrySync"), 10, "the RegistrySync event"
    )
    assert "found by an MLflow webhook" in event["message"], event
    log = operator.log_text()
    # MLflow's real delivery, signed with the secret it stored, passed the verification.
    assert f"MLflow webhook model_version_alias.created: {model}@champion -> {second}" in log, log[-3000:]
    assert "rejected MLflow webhook" not in log


def test_webhook_deliveries_with_a_bad_signature_or_body_are_refused_and_logged(
    *, operators: OperatorFactory, watched_namespace: str
) -> None:
    operator = operators.start(
        [watched_namespace], registry_sync_seconds="300", mlflow_webhook_secret=WEBHOOK_SECRET
    )
    operator.wait_leading()
    url = webhook_url(operator)
    event = {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": "m", "alias": "champion", "version": "2"},
    }

    headers, body = signed(event, secret="not the operator's secret")
    assert post_webhook(url, headers, body) == (401, {"error": "bad-signature"})
    headers, body = signed(event)
    headers[webhooks.TIMESTAMP_HEADER] = str(int(time.time()) - 3600)
    assert post_webhook(url, headers, body) == (401, {"error": "bad-signature"})
    headers, body = signed(event)
    del headers[webhooks.SIGNATURE_HEADER]
    assert post_webhook(url, headers, body) == (401, {"error": "bad-signature"})
    headers, body = signed({"entity": "prompt", "action": "created", "data": {"name": "p"}})
    assert post_webhook(url, headers, body) == (200, {"status": "ignored", "event": "prompt.created"})
    headers, body = signed({**event, "padding": "x" * (webhooks.MAX_BODY_BYTES + 1)})
    assert post_webhook(url, headers, body) == (413, {"error": "too-large"})
    headers, body = signed(event)
    assert post_webhook(url, headers, body)[0] == 202

    log = wait_until(
        lambda: operator.log_text() if "(413 too-large)" in operator.log_text() else None,
        10,
        "the log lines",
    )
    assert "(401 bad-signature): signature does not match (wrong secret, or the body was altered)" in log
    assert re.search(r"\(401 bad-signature\): timestamp is 36\d\ds old \(tolerance 300s\)", log), log[-3000:]
    assert "(401 bad-signature): missing X-MLflow-Signature header" in log
    assert "(413 too-large)" in log


# ------------------------------------------------------------------------ when not to follow


def test_a_deleted_alias_rolls_nothing_and_says_why(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    model: str,
    mlflow_client: MlflowClient,
    mlflow_webhook: list[str],
) -> None:
    namespace = watched_namespace
    (first,) = register_versions(mlflow_client, model, 1)
    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, first)
    serving = deploy_pinned(control_plane, namespace, model, first)
    operator = operators.start([namespace], registry_sync_seconds="1", mlflow_webhook_secret=WEBHOOK_SECRET)
    first_pass_done(operator)
    mlflow_webhook.append(
        webhooks.register(
            mlflow_client, name=unique_name("operator"), url=webhook_url(operator), secret=WEBHOOK_SECRET
        )
    )
    time.sleep(1.5)
    before = get_json(control_plane, "deployment", serving, "-n", namespace)["metadata"]["generation"]

    mlflow_client.delete_registered_model_alias(model, CHAMPION_ALIAS)
    event = wait_until(
        lambda: event_with(control_plane, namespace, serving, "AliasMissing"), 20, "the AliasMissing event"
    )
    assert f"alias {model}@champion does not exist" in event["message"], event
    assert "not rolled to nothing" in event["message"]
    time.sleep(3)  # three more periodic passes
    document = get_json(control_plane, "deployment", serving, "-n", namespace)
    assert model_uri_of(document) == f"models:/{model}/{first}"
    assert document["metadata"]["generation"] == before
    # Said once, not once per pass.
    assert [e["reason"] for e in deployment_events(control_plane, namespace, serving)].count(
        "AliasMissing"
    ) == 1
    log = operator.log_text()
    assert "MLflow webhook model_version_alias.deleted" in log
    assert f"AliasMissing: alias {model}@champion does not exist" in log


def test_the_sync_waits_while_a_trainingrun_of_the_model_is_rolling_out(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    model: str,
    mlflow_client: MlflowClient,
    trainer: Path,
) -> None:
    namespace = watched_namespace
    (seeded,) = register_versions(mlflow_client, model, 1)
    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, seeded)
    serving = deploy_pinned(control_plane, namespace, model, seeded)
    # The promoted version's pods never become ready: the TrainingRun stays RollingOut until its timeout.
    fake_kubelet.never_become_ready(namespace, serving)
    operator = operators.start([namespace], rollout_timeout_seconds="25", registry_sync_seconds="1")
    first_pass_done(operator)

    run = unique_name("hold")
    fake_kubelet.override_env(run, PYTHONPATH=f"{trainer}:{REPO_ROOT}", STAND_IN_TEST_ACCURACY="0.9")
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(run, namespace, quick_spec(model)))
    rolling = wait_for_trainingrun(
        control_plane, namespace, run, predicate=phase_in("RollingOut"), timeout=120, what="to roll out"
    )
    promoted = rolling["status"]["modelVersion"]
    wait_until(
        lambda: pinned_uri(control_plane, namespace, serving) == f"models:/{model}/{promoted}",
        30,
        "the run's patch",
    )

    # Mid-rollout, someone moves the alias to yet another version by hand.
    experiment = mlflow_client.create_experiment(f"manual-{uuid.uuid4().hex[:8]}")
    manual_run = mlflow_client.create_run(experiment)
    manual = str(
        mlflow_client.create_model_version(
            model, f"runs:/{manual_run.info.run_id}/model", manual_run.info.run_id
        ).version
    )
    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, manual)

    event = wait_until(
        lambda: event_with(control_plane, namespace, serving, "RegistrySyncWaiting"), 15, "the sync to wait"
    )
    assert f"TrainingRun {run} is promoting {model}" in event["message"], event
    time.sleep(3)
    assert get_json(control_plane, "tr", run, "-n", namespace)["status"]["phase"] == "RollingOut"
    assert pinned_uri(control_plane, namespace, serving) == f"models:/{model}/{promoted}"

    # The rollout times out and rolls back (the alias, moved by hand since, is left alone); then the
    # run no longer owns serving, and the sync rolls it to what the alias names.
    done = wait_for_trainingrun(
        control_plane, namespace, run, predicate=phase_in("RolledBack", "Promoted"), timeout=90, what="to end"
    )
    assert done["status"]["phase"] == "RolledBack", done["status"]
    assert alias_version(mlflow_client, model, CHAMPION_ALIAS) == manual
    follow(control_plane, namespace, serving, f"models:/{model}/{manual}")
    event = wait_until(
        lambda: event_with(control_plane, namespace, serving, "RegistrySync"), 10, "the RegistrySync event"
    )
    assert f"-> version {manual}" in event["message"], event


def test_fake_pods_are_never_reported_as_confirmed(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    model: str,
    mlflow_client: MlflowClient,
    operator_account: OperatorAccount,
) -> None:
    """With confirmation on, pods that cannot be asked leave the version unconfirmed, with the reason."""
    namespace = watched_namespace
    (first,) = register_versions(mlflow_client, model, 1)
    mlflow_client.set_registered_model_alias(model, CHAMPION_ALIAS, first)
    serving = deploy_pinned(control_plane, namespace, model, first)
    first_pass_done(operators.start([namespace], registry_sync_seconds="1", confirm_from_pods="true"))
    event = wait_until(
        lambda: event_with(control_plane, namespace, serving, "VersionUnconfirmed"), 20, "VersionUnconfirmed"
    )
    assert f"version {first} not confirmed" in event["message"], event
    # The API server refuses to proxy to the fake kubelet's 127.0.0.1 pods.
    assert "pod proxy" in event["message"], event
    document = get_json(control_plane, "deployment", serving, "-n", namespace)
    assert CONFIRMED_VERSION_ANNOTATION not in (document["metadata"].get("annotations") or {})

    # What asking needs, and no more: GET through the pod proxy (no POST, so no predictions).
    def can(verb: str) -> bool:
        asked = kubectl(
            control_plane,
            *("auth", "can-i", verb, "pods", "--subresource=proxy", f"--as={operator_account.user}"),
            *("-n", namespace),
        )
        return asked.stdout.strip() == "yes"

    assert can("get")
    assert not can("create")
