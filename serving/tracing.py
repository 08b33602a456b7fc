"""OpenTelemetry tracing: a server span per HTTP request, with child spans for decoding the input and
for the ONNX Runtime run, exported over OTLP/gRPC.

Off unless an endpoint is configured (`SERVING_OTLP_ENDPOINT`, or the standard
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`). Off, neither the SDK nor the
exporter is imported, no thread starts, and each hook is a call that tests one attribute: `/predict`
answers in a few hundred microseconds, and tracing that nobody asked for must not show in it.

On, a request's W3C trace context (`traceparent`, `tracestate`; whatever `OTEL_PROPAGATORS` names)
continues the caller's trace, so a span from a client or a gateway is the parent of ours. Sampling is
the SDK's: parent-based always-on, unless `OTEL_TRACES_SAMPLER` says otherwise. Spans leave in
batches from the SDK's background thread, never on the request path.

The tracer provider is our own, never the global one: FastAPI's native telemetry switches itself on
once a global provider is set, and would add a second server span, and spans per dependency and per
serialization, to every request.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from serving import __version__

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from starlette.types import Scope

SERVICE_NAME = "mnist-serving"
INSTRUMENTATION_SCOPE = "serving"
# Probes and scrapes every few seconds would bury the requests in spans that say nothing.
UNTRACED_PATHS = frozenset(
    {"/health", "/health/live", "/health/ready", "/metrics", "/v2/health/live", "/v2/health/ready"}
)

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()


class _State:
    __slots__ = ("provider", "tracer")

    def __init__(self) -> None:
        self.tracer: Tracer | None = None
        self.provider: TracerProvider | None = None


_state = _State()


def configure(endpoint: str | None) -> bool:
    """Sets up export to `endpoint` (once per process: uvicorn's workers each call it); with None,
    does nothing at all. True if tracing is on."""
    if endpoint is None or _state.provider is not None:
        return _state.provider is not None
    # Imported here, not at the top: with tracing off, the process never loads them.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME,
            "service.version": __version__,
        }
    )
    provider = TracerProvider(resource=resource)
    # http:// is plaintext gRPC (a collector in the cluster), https:// is TLS: the exporter's own rule.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _state.provider = provider
    _state.tracer = provider.get_tracer(INSTRUMENTATION_SCOPE, __version__)
    return True


def shutdown() -> None:
    """Exports what is still queued. At the end of the lifespan: uvicorn re-raises SIGTERM after a
    graceful shutdown, and a process killed by a signal runs no atexit hook to flush the batch."""
    provider = _state.provider
    _state.tracer = _state.provider = None
    if provider is not None:
        provider.shutdown()


class RequestSpan:
    """The server span of one HTTP request, current (so the parent of the spans below) until `end`."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: Token[Context]) -> None:
        self.span = span
        self.token = token

    def end(self, scope: Scope, status: int, model_version: str | None) -> None:
        from opentelemetry import context
        from opentelemetry.trace import StatusCode

        span = self.span
        # The route is known only once the router has matched; named by it, spans group by endpoint.
        route = getattr(scope.get("route"), "path", None)
        if route is not None:
            span.update_name(f"{scope['method']} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if model_version is not None:
            span.set_attribute("serving.model.version", model_version)
        if status >= 500:
            # A 4xx is the client's error, not the server span's (OpenTelemetry's HTTP conventions).
            span.set_status(StatusCode.ERROR)
        span.end()
        context.detach(self.token)


def start_request(scope: Scope, request_id: str, model_name: str) -> RequestSpan | None:
    """The request's server span, made current; None when tracing is off or the path is a probe's."""
    tracer = _state.tracer
    if tracer is None or scope["path"] in UNTRACED_PATHS:
        return None
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind

    carrier: Mapping[str, str] = {
        name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
    }
    parent = propagate.extract(carrier)
    method: str = scope["method"]
    client = scope.get("client")
    span = tracer.start_span(
        method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
            "client.address": client[0] if client else "",
            "serving.request_id": request_id,
            "serving.model.name": model_name,
        },
    )
    return RequestSpan(span, context.attach(trace.set_span_in_context(span, parent)))


def _child(
    tracer: Tracer, name: str, attributes: dict[str, int] | None = None
) -> AbstractContextManager[object]:
    from opentelemetry import trace

    # Only under a request's recorded span: work outside one (a WebSocket frame, a gRPC call: their
    # adapters open no server span) would leave a root span per call, with nothing to say whose; and
    # under a request the sampler dropped, a child would be dropped too, after costing as much to make.
    if not trace.get_current_span().is_recording():
        return _NOOP
    return tracer.start_as_current_span(name, attributes=attributes)


def decode() -> AbstractContextManager[object]:
    """A child span around reading the request body into a batch (JSON, base64, image decoding)."""
    tracer = _state.tracer
    return _NOOP if tracer is None else _child(tracer, "decode")


def inference(batch_size: int) -> AbstractContextManager[object]:
    """A child span around the ONNX Runtime session's run."""
    tracer = _state.tracer
    return _NOOP if tracer is None else _child(tracer, "onnx.run", {"serving.batch_size": batch_size})


__all__ = [
    "RequestSpan",
    "configure",
    "decode",
    "inference",
    "shutdown",
    "start_request",
]
