"""Serving follows the registry, its pure parts as plain data: MLflow's webhook signature (checked
against MLflow's own signing function), the webhook endpoint over real HTTP (aiohttp, no operator),
and the sync's decisions. No API server, no MLflow server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mnist_operator import webhooks
from mnist_operator.config import ConfigError, OperatorConfig
from mnist_operator.registry_sync import (
    PodReport,
    decide,
    followed_alias,
    health_version,
    judge,
    pinned_version,
    promoting_runs,
    ready_pods,
    serving_port,
)
from mnist_operator.webhooks import (
    AliasEvent,
    MlflowWebhook,
    parse_alias_event,
    signature,
    verify,
)

SECRET = "s3cr3t-for-the-unit-tests"
NOW = 1_760_000_000.0


def delivery(
    document: dict[str, Any], *, secret: str = SECRET, timestamp: float = NOW
) -> tuple[dict[str, str], bytes]:
    """Headers and body exactly as MLflow's delivery code builds them (json.dumps, then UTF-8)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = json.dumps(document)
    delivery_id, stamp = str(uuid.uuid4()), str(int(timestamp))
    headers = {
        webhooks.DELIVERY_ID_HEADER: delivery_id,
        webhooks.TIMESTAMP_HEADER: stamp,
        webhooks.SIGNATURE_HEADER: _generate_hmac_signature(secret, delivery_id, stamp, payload),
        "Content-Type": "application/json",
    }
    return headers, payload.encode()


def alias_document(model: str = "m", alias: str = "champion", version: str | None = "7") -> dict[str, Any]:
    data: dict[str, Any] = {"name": model, "alias": alias}
    action = "deleted"
    if version is not None:
        data["version"], action = version, "created"
    return {
        "entity": "model_version_alias",
        "action": action,
        "timestamp": "2026-01-01T00:00:00",
        "data": data,
    }


# ------------------------------------------------------------------------ the signature


def test_the_header_names_and_version_are_mlflows() -> None:
    from mlflow.webhooks import constants

    assert webhooks.SIGNATURE_HEADER == constants.WEBHOOK_SIGNATURE_HEADER
    assert webhooks.TIMESTAMP_HEADER == constants.WEBHOOK_TIMESTAMP_HEADER
    assert webhooks.DELIVERY_ID_HEADER == constants.WEBHOOK_DELIVERY_ID_HEADER
    assert webhooks.SIGNATURE_VERSION == constants.WEBHOOK_SIGNATURE_VERSION


def test_our_signature_is_the_one_mlflow_computes() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = json.dumps(alias_document(model="ünïcode-model"))
    theirs = _generate_hmac_signature(SECRET, "d-1", "1760000000", payload)
    assert signature(SECRET, "d-1", "1760000000", payload.encode()) == theirs
    assert theirs.startswith("v1,")


def test_a_delivery_signed_by_mlflow_verifies() -> None:
    headers, body = delivery(alias_document())
    assert verify(SECRET, headers, body, now=NOW + 10, tolerance_seconds=300) == webhooks.Verification(True)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda h, b: (h, b.replace(b'"7"', b'"8"')), "signature does not match"),
        (lambda h, b: ({**h, webhooks.DELIVERY_ID_HEADER: "another"}, b), "signature does not match"),
        (lambda h, b: ({**h, webhooks.SIGNATURE_HEADER: "v1,AAAA"}, b), "signature does not match"),
        (lambda h, b: ({**h, webhooks.SIGNATURE_HEADER: ""}, b), "missing X-MLflow-Signature header"),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != webhooks.TIMESTAMP_HEADER}, b),
            "missing X-MLflow-Timestamp header",
        ),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != webhooks.DELIVERY_ID_HEADER}, b),
            "missing X-MLflow-Delivery-Id header",
        ),
        (lambda h, b: ({**h, webhooks.TIMESTAMP_HEADER: "yesterday"}, b), "malformed X-MLflow-Timestamp"),
    ],
)
def test_a_tampered_delivery_is_refused_with_the_reason(
    tamper: Callable[[dict[str, str], bytes], tuple[dict[str, str], bytes]], reason: str
) -> None:
    headers, body = tamper(*delivery(alias_document()))
    verdict = verify(SECRET, headers, body, now=NOW, tolerance_seconds=300)
    assert not verdict.ok
    assert reason in verdict.reason


def test_the_wrong_secret_and_an_old_or_future_timestamp_are_refused() -> None:
    headers, body = delivery(alias_document(), secret="another secret")
    assert "signature does not match" in verify(SECRET, headers, body, now=NOW, tolerance_seconds=300).reason
    headers, body = delivery(alias_document(), timestamp=NOW - 301)
    assert verify(SECRET, headers, body, now=NOW, tolerance_seconds=300).reason == (
        "timestamp is 301s old (tolerance 300s)"
    )
    headers, body = delivery(alias_document(), timestamp=NOW + 400)
    assert "in the future" in verify(SECRET, headers, body, now=NOW, tolerance_seconds=300).reason
    # Within the tolerance, either way.
    headers, body = delivery(alias_document(), timestamp=NOW - 299)
    assert verify(SECRET, headers, body, now=NOW, tolerance_seconds=300).ok


def test_one_valid_signature_among_several_is_enough() -> None:
    headers, body = delivery(alias_document())
    headers[webhooks.SIGNATURE_HEADER] = f"v1,bm9wZQ== {headers[webhooks.SIGNATURE_HEADER]}"
    assert verify(SECRET, headers, body, now=NOW, tolerance_seconds=300).ok


def test_alias_events_are_parsed_and_others_named() -> None:
    assert parse_alias_event(alias_document("m", "champion", "3")) == (
        "model_version_alias.created",
        AliasEvent("model_version_alias.created", "m", "champion", "3"),
    )
    assert parse_alias_event(alias_document("m", "champion", None)) == (
        "model_version_alias.deleted",
        AliasEvent("model_version_alias.deleted", "m", "champion", None),
    )
    assert parse_alias_event({"entity": "model_version", "action": "created", "data": {}}) == (
        "model_version.created",
        None,
    )
    with pytest.raises(ValueError, match=r"without data\.name"):
        parse_alias_event({"entity": "model_version_alias", "action": "created", "data": {"alias": "x"}})
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_alias_event([1, 2])


# ------------------------------------------------------------------------ the endpoint, over HTTP


def serve_webhook(
    secret: str | None, test: Callable[[str, list[AliasEvent]], Coroutine[Any, Any, None]]
) -> MlflowWebhook:
    seen: list[AliasEvent] = []
    endpoint = MlflowWebhook(secret, 300, seen.append)

    async def main() -> None:
        app = web.Application()
        app.router.add_post(webhooks.MLFLOW_WEBHOOK_PATH, endpoint.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            await test(f"http://127.0.0.1:{port}{webhooks.MLFLOW_WEBHOOK_PATH}", seen)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return endpoint


async def post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


def test_the_endpoint_accepts_ignores_and_refuses() -> None:
    async def test(url: str, seen: list[AliasEvent]) -> None:
        now = time.time()
        headers, body = delivery(alias_document("m", "champion", "4"), timestamp=now)
        assert await post(url, headers, body) == (
            202,
            {"status": "accepted", "event": "model_version_alias.created", "model": "m"},
        )
        assert seen == [AliasEvent("model_version_alias.created", "m", "champion", "4")]
        # The same delivery again (a replay within the tolerance) does nothing.
        assert await post(url, headers, body) == (200, {"status": "duplicate"})
        headers, body = delivery(
            {"entity": "registered_model", "action": "created", "data": {}}, timestamp=now
        )
        assert await post(url, headers, body) == (
            200,
            {"status": "ignored", "event": "registered_model.created"},
        )
        headers, body = delivery(alias_document(), secret="wrong", timestamp=now)
        assert await post(url, headers, body) == (401, {"error": "bad-signature"})
        headers, body = delivery(
            {"entity": "x", "action": "y", "pad": "a" * webhooks.MAX_BODY_BYTES}, timestamp=now
        )
        assert (await post(url, headers, body))[0] == 413
        assert len(seen) == 1

    endpoint = serve_webhook(SECRET, test)
    assert endpoint.tally.document() == {
        "accepted": 1,
        "bad-signature": 1,
        "duplicate": 1,
        "ignored": 1,
        "too-large": 1,
    }


def test_without_a_secret_the_endpoint_answers_503() -> None:
    async def test(url: str, seen: list[AliasEvent]) -> None:
        headers, body = delivery(alias_document(), timestamp=time.time())
        assert await post(url, headers, body) == (503, {"error": "not-configured"})
        assert seen == []

    serve_webhook(None, test)


# ------------------------------------------------------------------------ the sync's decisions


def deployment(uri: str | None = "models:/m/3", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    env = [] if uri is None else [{"name": "SERVING_MODEL_URI", "value": uri}]
    return {
        "metadata": {"name": "serving", "namespace": "ns", "annotations": annotations or {}},
        "spec": {"template": {"spec": {"containers": [{"name": "serving", "env": env}]}}},
    }


def test_the_pinned_version_is_only_an_exact_pin_of_this_model() -> None:
    assert pinned_version(deployment("models:/m/3"), "m") == "3"
    assert pinned_version(deployment("models:/m@champion"), "m") is None
    assert pinned_version(deployment("models:/other/3"), "m") is None
    assert pinned_version(deployment(None), "m") is None


def test_the_followed_alias_defaults_to_champion() -> None:
    assert followed_alias(deployment()) == "champion"
    assert followed_alias(deployment(annotations={"mnist-mlops.io/follow-alias": "staging"})) == "staging"


def test_decisions() -> None:
    assert decide(deployment("models:/m/3"), "m", "champion", "3", []).action == "in-sync"
    roll = decide(deployment("models:/m/3"), "m", "champion", "4", [])
    assert (roll.action, roll.version, roll.message) == ("roll", "4", "3 -> version 4")
    # An alias-served template is pinned even to the version it already loads.
    assert decide(deployment("models:/m@champion"), "m", "champion", "3", []).action == "roll"
    missing = decide(deployment("models:/m/3"), "m", "champion", None, [])
    assert missing.action == "alias-missing"
    assert "not rolled to nothing" in missing.message
    waiting = decide(deployment("models:/m/3"), "m", "champion", "4", ["tr-1"])
    assert waiting.action == "wait"
    assert "TrainingRun tr-1 is promoting m" in waiting.message
    assert decide(deployment(None), "m", "champion", "4", []).action == "not-pinnable"


def test_only_runs_of_the_model_mid_promotion_hold_the_sync() -> None:
    def run(name: str, model: str, phase: str) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"registeredModel": model}, "status": {"phase": phase}}

    runs = [
        run("a", "m", "RollingOut"),
        run("b", "m", "Canary"),
        run("c", "m", "Training"),
        run("d", "m", "Promoted"),
        run("e", "other", "Evaluating"),
        run("f", "m", "Shadowing"),
        run("g", "m", "Evaluating"),
    ]
    assert promoting_runs(runs, "m") == ["a", "b", "f", "g"]


def test_confirmation_needs_every_ready_pod_on_the_version() -> None:
    assert judge("4", [PodReport("p1", "4"), PodReport("p2", "4")]).confirmed
    assert not judge("4", []).confirmed
    mixed = judge("4", [PodReport("p1", "4"), PodReport("p2", "3")])
    assert (mixed.confirmed, mixed.message) == (False, "p2 reports version 3")
    failed = judge("4", [PodReport("p1", error="pod proxy answered 400: address not allowed")])
    assert not failed.confirmed
    assert "address not allowed" in failed.message


def test_health_documents_and_pods() -> None:
    assert health_version(b'{"status": "ok", "model": {"name": "m", "version": "4"}}') == "4"
    with pytest.raises(ValueError, match=r"no model\.version"):
        health_version(b'{"status": "loading", "model": {"name": "m", "version": null}}')
    ready = {"type": "Ready", "status": "True"}
    pods: list[dict[str, Any]] = [
        {"metadata": {"name": "a"}, "status": {"phase": "Running", "conditions": [ready]}},
        {
            "metadata": {"name": "b", "deletionTimestamp": "x"},
            "status": {"phase": "Running", "conditions": [ready]},
        },
        {
            "metadata": {"name": "c"},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]},
        },
        {"metadata": {"name": "d"}, "status": {"phase": "Pending"}},
    ]
    assert [pod["metadata"]["name"] for pod in ready_pods(pods)] == ["a"]
    pod = {
        "spec": {
            "containers": [
                {"ports": [{"name": "grpc", "containerPort": 50051}, {"name": "http", "containerPort": 8000}]}
            ]
        }
    }
    assert serving_port(pod) == 8000
    assert serving_port({"spec": {"containers": [{}]}}) is None


def test_the_settings_of_the_registry_sync() -> None:
    config = OperatorConfig.from_env(
        {
            "MLFLOW_TRACKING_URI": "http://mlflow",
            "MNIST_OPERATOR_REGISTRY_SYNC_SECONDS": "0",
            "MNIST_OPERATOR_CONFIRM_FROM_PODS": "off",
            "MNIST_OPERATOR_MLFLOW_WEBHOOK_SECRET": "hunter2-secret",
        }
    )
    assert (config.registry_sync_seconds, config.confirm_from_pods, config.mlflow_webhook_secret) == (
        0,
        False,
        "hunter2-secret",
    )
    assert "hunter2-secret" not in repr(config)
    defaults = OperatorConfig(mlflow_tracking_uri="http://mlflow")
    assert (defaults.registry_sync_seconds, defaults.confirm_from_pods, defaults.mlflow_webhook_secret) == (
        10.0,
        True,
        None,
    )


# ------------------------------------------------------------------------ registration at start-up


class FakeMlflowWebhooks:
    """MLflow's webhook REST endpoints over real HTTP, as the real MlflowClient calls them: down (503)
    for the first `down` requests, then a registry that keeps what it is given."""

    def __init__(self, down: int, refuse: str | None = None) -> None:
        self.down, self.refuse = down, refuse
        self.requests: list[str] = []
        self.webhooks: dict[str, dict[str, Any]] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/2.0/mlflow/webhooks", self.list)
        app.router.add_post("/api/2.0/mlflow/webhooks", self.create)
        return app

    def _unavailable(self, request: web.Request) -> web.Response | None:
        self.requests.append(f"{request.method} {request.path}")
        if len(self.requests) <= self.down:
            return web.json_response(
                {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "starting up"}, status=503
            )
        return None

    async def list(self, request: web.Request) -> web.Response:
        return self._unavailable(request) or web.json_response({"webhooks": list(self.webhooks.values())})

    async def create(self, request: web.Request) -> web.Response:
        refused = self._unavailable(request)
        if refused is not None:
            return refused
        if self.refuse:
            return web.json_response(
                {"error_code": "INVALID_PARAMETER_VALUE", "message": self.refuse}, status=400
            )
        body = await request.json()
        webhook = {
            "webhook_id": f"wh-{len(self.webhooks) + 1}",
            "name": body["name"],
            "url": body["url"],
            "events": body["events"],
            "status": "ACTIVE",
            "creation_timestamp": 1,
            "last_updated_timestamp": 1,
        }
        self.webhooks[webhook["webhook_id"]] = webhook
        return web.json_response({"webhook": webhook})


async def _register_against(server: FakeMlflowWebhooks, sleeps: list[float]) -> bool:
    from mnist_operator.tracking import make_client

    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    try:
        client = await asyncio.to_thread(make_client, f"http://127.0.0.1:{port}")
        return await webhooks.keep_registered(
            client,
            name="mnist-operator",
            url="http://operator:8080/webhooks/mlflow",
            secret=SECRET,
            backoff_seconds=1.0,
            max_backoff_seconds=3.0,
            sleep=sleep,
        )
    finally:
        await runner.cleanup()


def test_startup_registration_retries_while_mlflow_is_down(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The operator's own client settings: no retries inside the client, the loop retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = FakeMlflowWebhooks(down=4)
    sleeps: list[float] = []
    with caplog.at_level("INFO", logger="mnist_operator.webhooks"):
        assert asyncio.run(_register_against(server, sleeps)) is True
    # A doubling delay, capped.
    assert sleeps == [1.0, 2.0, 3.0, 3.0]
    [created] = server.webhooks.values()
    assert (created["name"], created["url"]) == ("mnist-operator", "http://operator:8080/webhooks/mlflow")
    assert server.requests[-1] == "POST /api/2.0/mlflow/webhooks"
    assert "registered MLflow webhook mnist-operator (wh-1)" in caplog.text


def test_startup_registration_gives_up_on_a_refusal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = FakeMlflowWebhooks(down=0, refuse="Invalid webhook URL scheme 'http'")
    sleeps: list[float] = []
    assert asyncio.run(_register_against(server, sleeps)) is False
    assert sleeps == []
    assert "MLflow refused the webhook" in caplog.text and "scheme" in caplog.text


def test_the_webhook_url_setting() -> None:
    config = OperatorConfig.from_env(
        {
            "MLFLOW_TRACKING_URI": "http://mlflow",
            webhooks.URL_ENV: "http://mnist-operator.mlops.svc:8080/webhooks/mlflow",
        }
    )
    assert config.mlflow_webhook_url == "http://mnist-operator.mlops.svc:8080/webhooks/mlflow"
    assert OperatorConfig(mlflow_tracking_uri="http://mlflow").mlflow_webhook_url is None
    with pytest.raises(ConfigError, match="MNIST_OPERATOR_MLFLOW_WEBHOOK_URL='operator:8080'"):
        OperatorConfig.from_env({"MLFLOW_TRACKING_URI": "http://mlflow", webhooks.URL_ENV: "operator:8080"})
