"""One pure-ASGI middleware for everything that wraps a request: request ids, the body-size limit,
the concurrency and rate limits, HTTP metrics, the access log and the last-resort 500.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: it adds a few microseconds to a request
instead of a task and a memory stream, which matters at sub-millisecond latencies.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import context, metrics, tracing
from serving.dataplane import DataPlane
from serving.errors import INTERNAL_ERROR, error_body
from serving.settings import Settings

log = logging.getLogger("serving.access")
error_log = logging.getLogger("serving.errors")

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Probes and scrapes arrive every few seconds; at INFO they would drown the request log.
_QUIET_ROUTES = frozenset(
    {"/health", "/health/live", "/health/ready", "/metrics", "/v2/health/live", "/v2/health/ready"}
)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# How much of a refused body is read and dropped so that its client sees the 413 (see _discard).
_DRAIN_FACTOR = 64
_DRAIN_SECONDS = 10.0
_CLOSE = {"Connection": "close"}
_MAX_CLIENTS = 10_000
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_MODEL_VERSION = b"x-model-version"


def is_inference(method: str, path: str) -> bool:
    return method == "POST" and (
        path in ("/predict", "/predict/batch", "/explain")
        or (path.startswith("/v2/models/") and path.endswith("/infer"))
    )


def is_limited(method: str, path: str) -> bool:
    """Requests under the per-client rate limit and the in-flight bound: inference, and POST /feedback
    in the same bucket (a label costs a database write, and a client labelling in a loop is as much
    load as one predicting in a loop)."""
    return is_inference(method, path) or (method == "POST" and path == "/feedback")


class RateLimiter:
    """Token bucket per client key; bounded memory (least recently seen clients are forgotten)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float) -> tuple[bool, float]:
        """(allowed, seconds until the next token)."""
        tokens, last = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self.buckets[key] = (tokens, now)
        if len(self.buckets) > _MAX_CLIENTS:
            self.buckets.popitem(last=False)
        return allowed, 0.0 if allowed else (1.0 - tokens) / self.rate


@dataclass
class Rejection:
    status: int
    message: str
    reason: str
    headers: dict[str, str] = field(default_factory=dict)


class _Exchange:
    """Per-request state: the response status seen on the way out, and a `send` that stamps the
    request id, the model version and nosniff on every response."""

    __slots__ = ("answered_by", "extra_headers", "send", "started", "status")

    def __init__(self, send: Send, request_id: str, model_headers: list[tuple[bytes, bytes]]) -> None:
        self.send = send
        self.status = 500
        self.started = False
        self.answered_by: str | None = None
        self.extra_headers = [(b"x-request-id", request_id.encode("ascii")), _NOSNIFF, *model_headers]

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.started = True
            headers = message.get("headers", ())
            extra = self.extra_headers
            for name, value in headers:
                if name == _MODEL_VERSION:
                    # A canary's candidate answered: its version, not the stable one, names this response.
                    self.answered_by = value.decode("ascii")
                    extra = [header for header in extra if header[0] != _MODEL_VERSION]
                    break
            message = {**message, "headers": [*headers, *extra]}
        await self.send(message)

    async def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        await self({"type": "http.response.start", "status": status, "headers": raw})
        await self({"type": "http.response.body", "body": body})


class ServingMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, dataplane: DataPlane) -> None:
        self.app = app
        self.dataplane = dataplane
        self.max_body = settings.max_body_bytes
        self.max_concurrency = settings.max_concurrency
        self.access_log = settings.access_log
        self.in_flight_inference = 0
        self.limiter = (
            RateLimiter(settings.rate_limit_per_second, settings.rate_limit_bucket)
            if settings.rate_limit_per_second > 0
            else None
        )
        header = settings.rate_limit_client_header
        self.client_header = header.lower().encode("latin-1") if header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id, content_length = _read_headers(scope)
        token = context.bind(context.RequestContext(request_id, start))
        span = tracing.start_request(scope, request_id, self.dataplane.name)
        method: str = scope["method"]
        exchange = _Exchange(send, request_id, self.dataplane.response_headers)
        inference = is_limited(method, scope["path"])
        counted = False
        metrics.http_in_flight.inc()
        try:
            rejection = self._admit(scope) if inference else None
            if rejection is None and inference:
                self.in_flight_inference += 1
                counted = True
            if rejection is None and method in _BODY_METHODS:
                body, rejection = await self._read_body(scope, receive, content_length)
                if body is None and rejection is None:
                    return  # the client went away
                if body is not None:
                    receive = _replay(body, receive)
            if rejection is not None:
                metrics.http_rejected.labels(reason=rejection.reason).inc()
                await exchange.respond(rejection.status, error_body(rejection.message), rejection.headers)
                return
            await self.app(scope, receive, exchange)
        except Exception:
            error_log.exception("unhandled error on %s %s", method, scope["path"])
            if not exchange.started:
                await exchange.respond(500, error_body(INTERNAL_ERROR))
        finally:
            if counted:
                self.in_flight_inference -= 1
            metrics.http_in_flight.dec()
            self._record(scope, exchange.status, time.perf_counter() - start)
            if span is not None:
                span.end(scope, exchange.status, exchange.answered_by or self.dataplane.version)
            context.unbind(token)

    def _admit(self, scope: Scope) -> Rejection | None:
        if self.limiter is not None:
            allowed, retry = self.limiter.allow(self._client_key(scope), time.monotonic())
            if not allowed:
                return Rejection(
                    429,
                    "rate limit exceeded for this client",
                    "rate_limited",
                    {"Retry-After": str(max(1, round(retry)))},
                )
        if self.in_flight_inference >= self.max_concurrency:
            return Rejection(
                503,
                f"server busy: {self.max_concurrency} inference requests in flight",
                "overloaded",
                {"Retry-After": "1"},
            )
        return None

    async def _read_body(
        self, scope: Scope, receive: Receive, content_length: int | None
    ) -> tuple[bytes | None, Rejection | None]:
        """The whole body, counted as it arrives (a chunked body declares no length up front)."""
        too_large = f"request body larger than {self.max_body} bytes (SERVING_MAX_BODY_BYTES)"
        if content_length is not None and content_length > self.max_body:
            if _expects_continue(scope):
                # The client holds the body back until `100 Continue`, which our first receive()
                # would send: answer now, and close, since the body never comes.
                return None, Rejection(413, too_large, "body_too_large", _CLOSE)
            headers = await self._discard(receive, content_length, 0)
            return None, Rejection(413, too_large, "body_too_large", headers)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                more = message.get("more_body", False)
                headers = await self._discard(receive, None, size) if more else {}
                return None, Rejection(413, too_large, "body_too_large", headers)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks), None

    async def _discard(self, receive: Receive, declared: int | None, received: int) -> dict[str, str]:
        """Reads and drops the rest of a refused body; the headers to answer with (close if it could
        not be read to its end).

        Most clients (urllib, requests, many SDKs) send the whole body before reading anything, and
        closing a connection with unread bytes makes the kernel reset it: they would see a broken pipe,
        never the 413. Reading is bounded (bytes and time); past the bound closing costs less than the
        upload, and a body declared beyond it is not read at all."""
        budget = _DRAIN_FACTOR * self.max_body
        if declared is not None and declared > budget:
            return _CLOSE
        with anyio.move_on_after(_DRAIN_SECONDS):
            while received <= budget:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return _CLOSE
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return {}
        return _CLOSE

    def _client_key(self, scope: Scope) -> str:
        if self.client_header is not None:
            for name, value in scope["headers"]:
                if name == self.client_header:
                    # X-Forwarded-For: the left-most entry is the original client.
                    return str(value.split(b",")[0].strip().decode("latin-1"))
        client = scope.get("client")
        return str(client[0]) if client else "unknown"

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None)
        if route is None:
            # Mounted static files set no route; anything else unmatched is a 404/405, one label for all.
            route = "/static/{path}" if scope["path"].startswith("/static/") else "unmatched"
        method: str = scope["method"]
        metrics.observe_http(method, route, status, seconds)
        if not self.access_log:
            return
        level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
        if not log.isEnabledFor(level):
            return
        client = scope.get("client")
        fields = {
            "method": method,
            "path": scope["path"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        # makeRecord + handle skips Logger._log's stack walk for the caller's file and line, which
        # cost as much as the rest of the access log.
        log.handle(log.makeRecord(log.name, level, __file__, 0, "request", (), None, extra=fields))


def _read_headers(scope: Scope) -> tuple[str, int | None]:
    """The client's X-Request-ID if it is sane (else a fresh one), and the declared Content-Length."""
    request_id: str | None = None
    content_length: int | None = None
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _REQUEST_ID.match(value):
                request_id = value.decode("ascii")
        elif name == b"content-length":
            try:
                content_length = int(value)
            except ValueError:
                content_length = None
    return request_id or uuid.uuid4().hex, content_length


def _expects_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope["headers"])


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
