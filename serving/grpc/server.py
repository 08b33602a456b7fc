"""The gRPC server: `inference.GRPCInferenceService` (Open Inference Protocol) and `grpc.health.v1`.

It runs on grpc.aio in the event loop uvicorn runs the HTTP app in, started and stopped by the app's
lifespan, and calls the same `DataPlane` the REST adapters call: one model, one set of prediction
metrics (gRPC inference is labelled `endpoint="grpc_infer"`).

Errors become status codes with the codec's message as details: invalid input INVALID_ARGUMENT, a
batch over the limit RESOURCE_EXHAUSTED (as gRPC answers an oversized message), an unknown model or
version NOT_FOUND, a model not loaded yet UNAVAILABLE (clients retry that one). Health is SERVING once
the model is loaded, NOT_SERVING before and while shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Protocol, TypeVar

import anyio
import grpc

from serving import __version__, codec, context
from serving.dataplane import Batch, DataPlane
from serving.errors import (
    INTERNAL_ERROR,
    InvalidInputError,
    ModelNotReadyError,
    NotFoundError,
    PayloadTooLargeError,
    ServingError,
)
from serving.grpc import health_pb2, health_pb2_grpc, inference_pb2_grpc, tensors
from serving.grpc import inference_pb2 as pb
from serving.model import NUM_CLASSES
from serving.rest.v2 import SERVER_NAME

log = logging.getLogger("serving.grpc")
access_log = logging.getLogger("serving.access")

INFERENCE_SERVICE = "inference.GRPCInferenceService"
ENDPOINT = "grpc_infer"
PLATFORM = "onnxruntime_onnx"
# How often a health Watch stream looks for a change of readiness.
WATCH_INTERVAL_SECONDS = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
# Probes call these every few seconds; at INFO they would drown the request log (as over HTTP).
_QUIET_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady", "Check"})

_STATUS: tuple[tuple[type[ServingError], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
)


class _Servicer(Protocol):
    service: ClassVar[str]
    access_log: bool


App = TypeVar("App")
Servicer = TypeVar("Servicer", bound=_Servicer)
Request = TypeVar("Request")
Reply = TypeVar("Reply")


def status_code(exc: ServingError) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT if exc.status_code < 500 else grpc.StatusCode.INTERNAL


def _request_id(rpc_context: Any) -> str:
    for key, value in rpc_context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


def _routing_key(rpc_context: Any, header: str) -> str | None:
    for key, value in rpc_context.invocation_metadata() or ():
        if key == header and isinstance(value, str):
            return value
    return None


def rpc(
    method: Callable[[Servicer, Request, Any], Awaitable[Reply]],
) -> Callable[[Servicer, Request, Any], Awaitable[Reply]]:
    """Binds a request context (the log formatter's request id), turns errors into statuses and
    writes the access log line; an unexpected exception is logged whole and reaches the client as a
    bare INTERNAL, as over HTTP."""
    name = method.__name__
    level = logging.DEBUG if name in _QUIET_RPCS else logging.INFO

    @functools.wraps(method)
    async def handler(self: Servicer, request: Request, rpc_context: Any) -> Reply:
        started = time.perf_counter()
        token = context.bind(context.RequestContext(_request_id(rpc_context), started))
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, rpc_context)
        except ServingError as exc:
            code = status_code(exc)
            await rpc_context.abort(code, exc.message)
            raise  # abort raises; this keeps the type checker's view of the flow honest
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unhandled error in grpc %s", name)
            await rpc_context.abort(code, INTERNAL_ERROR)
            raise
        finally:
            if self.access_log and access_log.isEnabledFor(level):
                fields = {
                    "method": "grpc",
                    "route": f"/{self.service}/{name}",
                    "status": code.name,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "client": rpc_context.peer(),
                }
                access_log.log(level, "request", extra=fields)
            context.unbind(token)

    return handler


class InferenceServicer:
    """`inference.GRPCInferenceService`; method names are the RPCs'. Not a subclass of the generated
    servicer: `add_GRPCInferenceServiceServicer_to_server` only looks the methods up by name."""

    service: ClassVar[str] = INFERENCE_SERVICE

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.access_log = dataplane.settings.access_log
        self.limits = codec.Limits.from_settings(dataplane.settings)
        self.inline_max_bytes = dataplane.settings.inline_max_bytes

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, rpc_context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, rpc_context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, rpc_context: Any) -> pb.ModelReadyResponse:
        self.dataplane.check_name(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=self.dataplane.ready)

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, rpc_context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, rpc_context: Any
    ) -> pb.ModelMetadataResponse:
        dataplane = self.dataplane
        dataplane.check_name(request.name, request.version or None)
        model = dataplane.require_model()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=dataplane.name,
            versions=dataplane.versions,
            platform=PLATFORM,
            inputs=[tensor(name=model.input_name, datatype="FP32", shape=[-1, *model.input_shape])],
            outputs=[
                tensor(name=model.output_name, datatype="FP32", shape=[-1, NUM_CLASSES]),
                tensor(name=codec.DIGIT_OUTPUT, datatype="INT64", shape=[-1]),
            ],
        )

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, rpc_context: Any) -> pb.ModelInferResponse:
        dataplane = self.dataplane
        dataplane.check_name(request.model_name, request.model_version or None)
        ctx = context.current()

        def decode() -> Batch:
            model = dataplane.require_model()
            return tensors.decode_input(request, model.input_name, self.limits)

        # As over HTTP: small requests decode inline (a thread hop costs more), big ones in a worker
        # thread; the model call joins the batcher, so concurrent gRPC and REST calls share model runs.
        if request.ByteSize() <= self.inline_max_bytes:
            batch = decode()
        else:
            batch = await anyio.to_thread.run_sync(decode)
        routed = dataplane.traffic is not None
        key = _routing_key(rpc_context, dataplane.settings.routing_key_header) if routed else None
        result = await dataplane.infer_async(
            batch, ENDPOINT, ctx.started, key=key, version=request.model_version or None
        )
        response = pb.ModelInferResponse(
            model_name=dataplane.name,
            model_version=result.version,  # the version that answered: a canary serves two
            id=request.id or ctx.request_id,
        )
        tensors.encode_outputs(result, request, dataplane.require_model().output_name, response)
        return response


class HealthServicer:
    """`grpc.health.v1.Health` for the server ("") and the inference service, both following the
    model's readiness: kubelet's gRPC readiness probe and load balancers route only to loaded pods."""

    service: ClassVar[str] = "grpc.health.v1.Health"

    def __init__(self, dataplane: DataPlane, stopping: asyncio.Event) -> None:
        self.dataplane = dataplane
        self.stopping = stopping
        self.access_log = dataplane.settings.access_log

    def status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        if service not in ("", INFERENCE_SERVICE):
            return _SERVICE_UNKNOWN
        return _SERVING if self.dataplane.ready and not self.stopping.is_set() else _NOT_SERVING

    @rpc
    async def Check(
        self, request: health_pb2.HealthCheckRequest, rpc_context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status == _SERVICE_UNKNOWN:
            raise NotFoundError(f"unknown service {request.service!r}; known: '' and {INFERENCE_SERVICE!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, rpc_context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.stopping.is_set():
                # Ends the stream, so a graceful stop need not wait for watchers until its deadline.
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), WATCH_INTERVAL_SECONDS)


class GrpcServer:
    """The gRPC server of one worker process; `start` binds (a taken port fails the start-up)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.settings = dataplane.settings
        self.port: int | None = None
        self._server: Any = None
        self._stopping = asyncio.Event()

    @property
    def address(self) -> str:
        host = self.settings.host
        return f"[{host}]:{self.settings.grpc_port}" if ":" in host else f"{host}:{self.settings.grpc_port}"

    async def start(self) -> None:
        settings = self.settings
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                # Several uvicorn workers each bind the port and the kernel spreads connections over
                # them; a single one must not quietly share a port another process already serves.
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ],
            # Beyond this, gRPC itself answers RESOURCE_EXHAUSTED, as HTTP answers 503.
            maximum_concurrent_rpcs=settings.max_concurrency,
        )
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self.dataplane, self._stopping), server)
        port: int = server.add_insecure_port(self.address)
        await server.start()
        self._server, self.port = server, port
        log.info("grpc server listening", extra={"address": self.address, "port": port})

    async def stop(self, grace: float) -> None:
        """Health turns NOT_SERVING, new RPCs are refused, running ones get `grace` seconds."""
        self._stopping.set()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


@contextlib.asynccontextmanager
async def grpc_serving(dataplane: DataPlane) -> AsyncIterator[GrpcServer | None]:
    """The gRPC server for the duration of the block (None when SERVING_GRPC_PORT is 0); stopping
    gives running RPCs the HTTP server's graceful-shutdown time."""
    if not dataplane.settings.grpc_port:
        yield None
        return
    server = GrpcServer(dataplane)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(dataplane.settings.graceful_shutdown_seconds)


def with_grpc(
    lifespan: Callable[[App], AbstractAsyncContextManager[None]], dataplane: DataPlane
) -> Callable[[App], AbstractAsyncContextManager[None]]:
    """The app's lifespan with the gRPC server inside it: started after the app's start-up (the model
    loader runs by then), stopped before its shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan_with_grpc(app: App) -> AsyncIterator[None]:
        async with lifespan(app), grpc_serving(dataplane):
            yield

    return lifespan_with_grpc
