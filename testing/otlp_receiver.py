"""A real OTLP/gRPC trace receiver on loopback, for the tests of the serving process's and the
operator's tracing: the `opentelemetry.proto.collector.trace.v1.TraceService` that the OpenTelemetry
Collector's OTLP receiver implements, served by grpcio, keeping every span it is sent.

Not the Collector itself: built from the Go module proxy, `otelcol`, its OTLP receiver and the debug
exporter (v0.165.0) took 40 s to download and 3 minutes to compile (737 packages) on this project's
2-core machine, before any main wiring them together; every fresh CI machine would pay that again,
for a binary whose only use here is to accept `Export` calls. The exporters under test speak the same
protocol to this service as to a Collector: the messages and the gRPC service are the
`opentelemetry-proto` package's, and nothing here reads a span differently from the OTLP data model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

# The OTLP enum's names, as the tests compare them.
SPAN_KINDS = {value: name.removeprefix("SPAN_KIND_") for name, value in trace_pb2.Span.SpanKind.items()}
STATUS_CODES = {
    value: name.removeprefix("STATUS_CODE_") for name, value in trace_pb2.Status.StatusCode.items()
}


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind)


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, ids in lowercase hex as in a W3C traceparent."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # SERVER, INTERNAL, ...
    status: str  # UNSET, OK, ERROR
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    start_ns: int
    end_ns: int
    events: list[str] = field(default_factory=list)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(  # noqa: N802 (the generated service's method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                            status=STATUS_CODES.get(span.status.code, str(span.status.code)),
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            scope=scope_spans.scope.name,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            events=[event.name for event in span.events],
                        )
                    )
        self.receiver.record(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """`with OtlpReceiver() as receiver:` listens on a free loopback port; point an exporter at
    `receiver.endpoint` and read `receiver.spans`."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self.exports = 0  # Export calls: any exporter that connected and sent something
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp"))
        # The generated gRPC module has no annotations (protoc's stubs cover only the messages).
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        """http://: plaintext gRPC, as to a Collector in the cluster."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def record(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.exports += 1
            self._spans.extend(spans)
            self._lock.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float, what: str
    ) -> list[ReceivedSpan]:
        """All spans received so far, once `predicate` holds for them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(span.name, span.trace_id[:8]) for span in self._spans]
                    raise TimeoutError(f"no {what} within {timeout:.0f}s; received {names}")
                self._lock.wait(left)
            return list(self._spans)

    def trace(self, trace_id: str, count: int, timeout: float = 30.0) -> list[ReceivedSpan]:
        """The spans of one trace, once at least `count` of them arrived."""
        spans = self.wait_for(
            lambda spans: sum(span.trace_id == trace_id for span in spans) >= count,
            timeout,
            f"{count} spans of trace {trace_id}",
        )
        return [span for span in spans if span.trace_id == trace_id]


__all__ = ["OtlpReceiver", "ReceivedSpan"]
