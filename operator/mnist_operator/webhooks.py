"""MLflow's registry webhooks into the operator: `POST /webhooks/mlflow` on the /healthz server.

MLflow (3.x, `mlflow/webhooks/delivery.py`) delivers each registry event as a JSON body
`{"entity", "action", "timestamp", "data"}` with three headers, following Standard Webhooks:
`X-MLflow-Delivery-Id` (a UUID), `X-MLflow-Timestamp` (Unix seconds) and, when the webhook has a
secret, `X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">`. This
module checks that signature in constant time and refuses a timestamp further than the tolerance
from now (a captured delivery cannot be replayed later), and a delivery id it has already accepted.

Only `model_version_alias.created` and `.deleted` matter here: they ask `RegistrySync` for an
immediate pass over that model's serving Deployments (mnist_operator/registry_sync.py), which
reads the alias from MLflow itself. The payload is a hint, never the truth: a forged or stale
delivery could at worst cause a sync to what the registry already says. The answer is 202 at once
(MLflow retries 5xx and 429, and waits for the answer in a thread of its own); the periodic sync
covers a delivery that never arrives. Anything else signed correctly is answered 200 and ignored.

MLflow must be told it may deliver to the operator: its defaults allow https only
(MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https for the in-cluster Service) and public addresses only
(MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true for a ClusterIP); webhooks need a database backend (the file
store has none), and MLflow encrypts the stored secret with MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY (a
random key per process when unset, so a restarted server could no longer sign). `register()` (and
`python -m mnist_operator.webhooks register`) creates or updates the webhook; the leader does it
itself at start-up when MNIST_OPERATOR_MLFLOW_WEBHOOK_URL and the secret are set (`keep_registered`,
a background task that retries with backoff while MLflow is down and never holds up the start), so
an upgrade that changes the URL or rotates the secret needs no separate step.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# mlflow/webhooks/constants.py (a unit test checks these against MLflow's own).
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
MLFLOW_WEBHOOK_PATH = "/webhooks/mlflow"
ALIAS_CREATED = "model_version_alias.created"
ALIAS_DELETED = "model_version_alias.deleted"
ALIAS_EVENTS = (ALIAS_CREATED, ALIAS_DELETED)
# An alias event is under 300 bytes; nothing MLflow sends comes near this.
MAX_BODY_BYTES = 64 * 1024
# Delivery ids remembered against replays within the tolerance window.
REMEMBERED_DELIVERIES = 4096
SECRET_ENV = "MNIST_OPERATOR_MLFLOW_WEBHOOK_SECRET"  # noqa: S105 (the variable's name, not a secret)
URL_ENV = "MNIST_OPERATOR_MLFLOW_WEBHOOK_URL"
DEFAULT_WEBHOOK_NAME = "mnist-operator"

logger = logging.getLogger("mnist_operator.webhooks")


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature header MLflow sends: the body is signed as sent (its exact bytes)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class Verification:
    ok: bool
    reason: str = ""


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance_seconds: float
) -> Verification:
    """Whether a delivery is MLflow's, and if not, why (for the log; the sender only gets a 401)."""
    delivery_id = headers.get(DELIVERY_ID_HEADER, "").strip()
    timestamp = headers.get(TIMESTAMP_HEADER, "").strip()
    sent = headers.get(SIGNATURE_HEADER, "").strip()
    for header, value in (
        (SIGNATURE_HEADER, sent),
        (TIMESTAMP_HEADER, timestamp),
        (DELIVERY_ID_HEADER, delivery_id),
    ):
        if not value:
            return Verification(False, f"missing {header} header")
    try:
        moment = int(timestamp)
    except ValueError:
        return Verification(False, f"malformed {TIMESTAMP_HEADER} {timestamp[:40]!r}")
    skew = now - moment
    if abs(skew) > tolerance_seconds:
        when = f"{skew:.0f}s old" if skew > 0 else f"{-skew:.0f}s in the future"
        return Verification(False, f"timestamp is {when} (tolerance {tolerance_seconds:g}s)")
    expected = signature(secret, delivery_id, timestamp, body).encode()
    # Standard Webhooks allows several space-separated signatures (key rotation); MLflow sends one.
    if any(hmac.compare_digest(candidate.encode(), expected) for candidate in sent.split()):
        return Verification(True)
    return Verification(False, "signature does not match (wrong secret, or the body was altered)")


@dataclass(frozen=True)
class AliasEvent:
    event: str
    model: str
    alias: str
    version: str | None


def parse_alias_event(document: Any) -> tuple[str, AliasEvent | None]:
    """(event name, the alias event or None when the event is another one); ValueError if malformed."""
    if not isinstance(document, dict):
        raise ValueError("the body is not a JSON object")
    event = f"{document.get('entity')}.{document.get('action')}"
    if event not in ALIAS_EVENTS:
        return event, None
    data = document.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError(f"{event} without data.name")
    version = data.get("version")
    return event, AliasEvent(
        event, data["name"], str(data.get("alias") or ""), None if version is None else str(version)
    )


@dataclass
class Tally:
    """What the endpoint did, by outcome: /healthz shows it (the operator exports no metrics)."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def document(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


class MlflowWebhook:
    """The aiohttp handler; `on_alias` is called (synchronously: it must only enqueue) per alias event."""

    def __init__(
        self,
        secret: str | None,
        tolerance_seconds: float,
        on_alias: Callable[[AliasEvent], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret, self.tolerance_seconds, self.on_alias, self.clock = (
            secret,
            tolerance_seconds,
            on_alias,
            clock,
        )
        self.tally = Tally()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def _reject(self, request: web.Request, status: int, kind: str, reason: str) -> web.Response:
        self.tally.counts[kind] += 1
        logger.warning(
            "rejected MLflow webhook delivery from %s (%d %s): %s", request.remote, status, kind, reason
        )
        return web.json_response({"error": kind}, status=status)

    async def handle(self, request: web.Request) -> web.Response:
        if not self.secret:
            return self._reject(request, 503, "not-configured", f"no webhook secret ({SECRET_ENV} is unset)")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return self._reject(
                request, 413, "too-large", f"Content-Length {request.content_length} > {MAX_BODY_BYTES} bytes"
            )
        body = await _read_capped(request, MAX_BODY_BYTES)
        if body is None:
            return self._reject(request, 413, "too-large", f"body over {MAX_BODY_BYTES} bytes")
        verdict = verify(
            self.secret, request.headers, body, now=self.clock(), tolerance_seconds=self.tolerance_seconds
        )
        if not verdict.ok:
            return self._reject(request, 401, "bad-signature", verdict.reason)
        delivery = request.headers[DELIVERY_ID_HEADER].strip()
        if delivery in self._seen:
            self.tally.counts["duplicate"] += 1
            logger.info("MLflow webhook delivery %s was already accepted: ignored", delivery)
            return web.json_response({"status": "duplicate"})
        try:
            event, alias_event = parse_alias_event(json.loads(body))
        except ValueError as error:  # JSONDecodeError included
            return self._reject(request, 400, "malformed", str(error))
        self._remember(delivery)
        if alias_event is None:
            self.tally.counts["ignored"] += 1
            logger.info("MLflow webhook %s (delivery %s) is not an alias event: ignored", event, delivery)
            return web.json_response({"status": "ignored", "event": event})
        self.tally.counts["accepted"] += 1
        logger.info(
            "MLflow webhook %s: %s@%s%s (delivery %s): syncing its serving Deployments",
            event,
            alias_event.model,
            alias_event.alias,
            f" -> {alias_event.version}" if alias_event.version else "",
            delivery,
        )
        self.on_alias(alias_event)
        return web.json_response(
            {"status": "accepted", "event": event, "model": alias_event.model}, status=202
        )

    def _remember(self, delivery: str) -> None:
        self._seen[delivery] = None
        while len(self._seen) > REMEMBERED_DELIVERIES:
            self._seen.popitem(last=False)


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds `limit` (a chunked body has no Content-Length to check)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


# ------------------------------------------------------------------------ registration in MLflow


def register(client: MlflowClient, *, name: str, url: str, secret: str) -> str:
    """Creates the webhook, or updates the one of that name (URL, events, secret, ACTIVE): the same
    command works on install and on every upgrade. Returns its id."""
    events: list[Any] = list(ALIAS_EVENTS)
    token: str | None = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        for webhook in page:
            if webhook.name == name:
                client.update_webhook(
                    webhook.webhook_id, url=url, events=events, secret=secret, status="ACTIVE"
                )
                return str(webhook.webhook_id)
        token = page.token
        if not token:
            break
    created = client.create_webhook(
        name=name,
        url=url,
        events=events,
        secret=secret,
        description="mnist-operator: serving follows the registry's aliases",
    )
    return str(created.webhook_id)


async def keep_registered(
    client: MlflowClient,
    *,
    name: str,
    url: str,
    secret: str,
    backoff_seconds: float,
    max_backoff_seconds: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """`register()` in a worker thread until MLflow takes it: while MLflow is unreachable (or answers
    a transient error) again after a doubling delay, up to `max_backoff_seconds`. False when MLflow
    refuses the webhook itself (a URL its MLFLOW_WEBHOOK_ALLOWED_SCHEMES or private-IP rule rejects, a
    backend without webhooks): retrying would not help, the log says why, and the periodic registry
    sync still keeps serving on the aliases."""
    from mnist_operator.tracking import MlflowDataError, MlflowUnavailableError, guarded

    attempt = 0
    while True:
        try:
            webhook_id = await asyncio.to_thread(
                guarded, lambda: register(client, name=name, url=url, secret=secret)
            )
        except MlflowUnavailableError as error:
            delay = min(backoff_seconds * 2**attempt, max_backoff_seconds)
            attempt += 1
            logger.warning(
                "cannot register the MLflow webhook %s -> %s yet (attempt %d: %s); retrying in %gs",
                name,
                url,
                attempt,
                error,
                delay,
            )
            await sleep(delay)
            continue
        except MlflowDataError as error:
            logger.error(
                "MLflow refused the webhook %s -> %s: %s; not retried: until this is fixed, serving "
                "follows alias moves only at the periodic registry sync",
                name,
                url,
                error,
            )
            return False
        logger.info("registered MLflow webhook %s (%s) -> %s", name, webhook_id, url)
        return True


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mnist_operator.webhooks register --url http://<operator>:8080/webhooks/mlflow`: the
    secret from $MNIST_OPERATOR_MLFLOW_WEBHOOK_SECRET, MLflow from $MLFLOW_TRACKING_URI."""
    parser = argparse.ArgumentParser(prog="python -m mnist_operator.webhooks")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("register", help="create or update the operator's webhook in MLflow")
    command.add_argument("--url", required=True, help="the operator's POST /webhooks/mlflow URL")
    command.add_argument("--name", default=DEFAULT_WEBHOOK_NAME)
    arguments = parser.parse_args(argv)
    secret = os.environ.get(SECRET_ENV, "").strip()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not secret or not tracking_uri:
        print(f"{SECRET_ENV} and MLFLOW_TRACKING_URI must be set", file=sys.stderr)
        return 2
    from mnist_operator.tracking import make_client

    webhook_id = register(make_client(tracking_uri), name=arguments.name, url=arguments.url, secret=secret)
    print(f"webhook {arguments.name} ({webhook_id}) -> {arguments.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
