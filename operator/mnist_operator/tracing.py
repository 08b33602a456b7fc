"""One trace per promotion: the evaluation that promotes a version, the patch that rolls serving to it,
and the rollout's end (done or rolled back) are spans of one OpenTelemetry trace.

A promotion outlives any one reconcile tick, and the operator itself (a restart, a new leader), so no
span stays open across ticks: each step is a short span whose parent is the promotion's, carried from
tick to tick as a W3C `traceparent` in the TrainingRun's status (`status.traceparent`, and
`status.traceId` for pasting into a trace viewer). The same context goes where the rollout is seen:
the serving Deployment's pod template (the `mnist-mlops.io/traceparent` annotation, so the ReplicaSet
and pods of the rollout name it) and the messages of the events the promotion posts.

Configured by the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`MNIST_OPERATOR_OTLP_ENDPOINT`); spans are exported over OTLP/gRPC. Unset, this module imports
nothing of OpenTelemetry, makes no provider and no thread, and no status field, annotation or event
text appears: every step gets `NO_TRACE`. Where the OTLP exporter is not installed (the operator
image has the SDK, through mlflow-skinny, but not the exporter), trace ids are still made and
recorded, so the Deployment, the events and the status stay linked, and the operator warns once
that no span is exported.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("mnist_operator.tracing")

TRACEPARENT_ANNOTATION = "mnist-mlops.io/traceparent"
SERVICE_NAME = "mnist-operator"
INSTRUMENTATION_SCOPE = "mnist_operator"

Attributes = Mapping[str, str | bool | int | float]


class Trace:
    """What one step of a promotion tells of its trace; `NO_TRACE` (all no-ops) with tracing off."""

    traceparent: str | None = None

    def message(self, text: str) -> str:
        return text

    def set(self, attributes: Attributes) -> None:
        pass

    def fail(self, reason: str) -> None:
        pass


NO_TRACE = Trace()


class _SpanTrace(Trace):
    def __init__(self, span: Span) -> None:
        self.span = span
        context = span.get_span_context()
        self.traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    def message(self, text: str) -> str:
        return f"{text} (traceparent {self.traceparent})"

    def set(self, attributes: Attributes) -> None:
        self.span.set_attributes(dict(attributes))

    def fail(self, reason: str) -> None:
        from opentelemetry.trace import StatusCode

        self.span.set_status(StatusCode.ERROR, reason)


@dataclass
class _Exporting:
    endpoint: str
    provider: TracerProvider
    tracer: Tracer


_current: list[_Exporting] = []


def _tracer(endpoint: str | None) -> Tracer | None:
    if endpoint is None:
        return None
    if _current and _current[0].endpoint == endpoint:
        return _current[0].tracer
    # Imported only now: an operator without an endpoint never loads them.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning(
            "the OTLP exporter (opentelemetry-exporter-otlp-proto-grpc) is not installed: promotions "
            "are given trace ids, but no span is exported to %s",
            endpoint,
        )
    else:
        # Batched, from the SDK's thread: an export never blocks the operator's event loop. The
        # provider's exit hook sends what is left when kopf stops on SIGTERM (a normal exit).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _current[:] = [_Exporting(endpoint, provider, provider.get_tracer(INSTRUMENTATION_SCOPE))]
    return _current[0].tracer


@contextlib.contextmanager
def step(
    endpoint: str | None,
    name: str,
    parent: str | None,
    attributes: Attributes,
    *,
    start: datetime.datetime | None = None,
) -> Iterator[Trace]:
    """A span for one step: a new trace without `parent` (a traceparent), else a child of it.
    `start` backdates it, for a span that covers what several ticks watched."""
    tracer = _tracer(endpoint)
    if tracer is None:
        yield NO_TRACE
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": parent}) if parent else None
    start_ns = int(start.timestamp() * 1e9) if start is not None else None
    with tracer.start_as_current_span(
        name, context=context, attributes=dict(attributes), start_time=start_ns
    ) as span:
        yield _SpanTrace(span)


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (`00-<trace id>-<span id>-<flags>`)."""
    if traceparent is None:
        return None
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else None


__all__ = ["NO_TRACE", "TRACEPARENT_ANNOTATION", "Trace", "step", "trace_id"]
