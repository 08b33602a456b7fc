"""The FastAPI application: routes, middleware, error map, start-up and shutdown.

`create_app()` reads Settings from the environment; uvicorn imports it as a factory
(`serving.app:create_app`), once per worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from serving import __version__, metrics, routing, tracing
from serving.dataplane import DataPlane
from serving.errors import install_exception_handlers
from serving.grpc.server import with_grpc
from serving.middleware import ServingMiddleware
from serving.rest import explain, feedback, predict, v2, ws
from serving.schemas import (
    BatchRequest,
    HealthResponse,
    LiveResponse,
    ModelStatus,
    PredictRequest,
    ReadyResponse,
    TrafficStatus,
    V2InferenceRequest,
)
from serving.settings import Settings

if TYPE_CHECKING:
    from serving.prediction_log import PredictionLog

log = logging.getLogger("serving.app")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page loads nothing from elsewhere: clusters may be offline, and a CSP makes that a guarantee.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_BODY_SCHEMAS = (PredictRequest, BatchRequest, V2InferenceRequest)


def _prediction_log(settings: Settings, dataplane: DataPlane) -> PredictionLog | None:
    """The prediction log's writer, listening to the data plane, when SERVING_PREDICTION_LOG_URL is set."""
    if not settings.prediction_log_url:
        return None
    # Imported only when on: SQLAlchemy would otherwise add to every server's start-up.
    from serving.prediction_log import PredictionLog

    prediction_log = PredictionLog(
        settings.prediction_log_url,
        dataplane.name,
        sample=settings.prediction_log_sample,
        queue_size=settings.prediction_log_queue_size,
        retention_days=settings.prediction_log_retention_days,
        shutdown_seconds=settings.graceful_shutdown_seconds,
        flush_seconds=settings.prediction_log_flush_seconds,
        batch_records=settings.prediction_log_batch_records,
    )
    dataplane.add_prediction_listener(prediction_log.record)
    return prediction_log


def _health(dataplane: DataPlane, traffic: routing.TrafficController) -> Response:
    cached = dataplane.cached
    status = ModelStatus(
        name=dataplane.name,
        version=dataplane.version,
        alias=dataplane.ref.alias,
        uri=str(dataplane.ref),
        precision=dataplane.store.precision,
        state="ready" if dataplane.ready else "loading",
        loaded_from_cache=cached.from_cache if cached else None,
        load_seconds=round(dataplane.load_seconds, 3) if dataplane.load_seconds is not None else None,
        last_error=dataplane.last_error,
        tags=dict(cached.info.tags) if cached else {},
    )
    body = HealthResponse(
        status="ok" if dataplane.ready else "loading",
        model=status,
        traffic=TrafficStatus.model_validate(traffic.status(), from_attributes=True),
        uptime_seconds=round(dataplane.uptime, 3),
        pid=os.getpid(),
    )
    return Response(
        body.model_dump_json(), status_code=200 if dataplane.ready else 503, media_type="application/json"
    )


def _with_prediction_log(
    lifespan: Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]],
    prediction_log: PredictionLog | None,
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """`lifespan` with the prediction log's writer around it: started first, and flushed last, once
    uvicorn has answered every request and gRPC has stopped (what is queued then is all there is)."""
    if prediction_log is None:
        return lifespan

    @contextlib.asynccontextmanager
    async def lifespan_with_log(app: FastAPI) -> AsyncIterator[None]:
        prediction_log.start()
        try:
            async with lifespan(app):
                yield
        finally:
            await prediction_log.stop()

    return lifespan_with_log


def create_app(settings: Settings | None = None, dataplane: DataPlane | None = None) -> FastAPI:
    settings = settings or Settings()
    dataplane = dataplane or DataPlane(settings)
    tracing.configure(settings.otlp_endpoint)
    traffic = routing.TrafficController(dataplane)
    prediction_log = _prediction_log(settings, dataplane)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(dataplane.load_until_ready(), name="model-loader")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            metrics.mark_process_dead()
            tracing.shutdown()
            log.info("shut down", extra={"uptime_seconds": round(dataplane.uptime, 1)})

    app = FastAPI(
        title="MNIST prediction service",
        version=__version__,
        description=(
            "Classifies handwritten digits with the registry's served model version (ONNX Runtime). "
            "`/predict` takes images or 28x28 arrays; `/v2` is the Open Inference Protocol."
        ),
        # gRPC in the same process and event loop: both protocols share the data plane and its metrics.
        # Canary and shadow documents apply once the stable model is ready (serving/routing.py).
        lifespan=_with_prediction_log(
            with_grpc(routing.with_traffic(lifespan, traffic), dataplane), prediction_log
        ),
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.state.settings = settings
    app.state.dataplane = dataplane
    install_exception_handlers(app)

    @app.get(
        "/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["health"]
    )
    async def health() -> Response:
        """Model status, version and uptime (503 while the model is loading), and the canary or shadow
        rollout this server applies (`traffic`)."""
        return _health(dataplane, traffic)

    @app.get("/health/live", response_model=LiveResponse, tags=["health"])
    async def live() -> LiveResponse:
        """The process answers; checks no dependency (a registry outage must not restart pods)."""
        return LiveResponse(status="alive")

    @app.get(
        "/health/ready",
        response_model=ReadyResponse,
        responses={503: {"model": ReadyResponse}},
        tags=["health"],
    )
    async def ready() -> Response:
        """200 once the model is loaded and warmed up."""
        if dataplane.ready:
            body = ReadyResponse(status="ready", model_version=dataplane.version)
            return Response(body.model_dump_json(), media_type="application/json")
        reason = dataplane.last_error or "model loading"
        body = ReadyResponse(status="not ready", reason=reason)
        return Response(body.model_dump_json(), status_code=503, media_type="application/json")

    @app.get(
        "/metrics", tags=["health"], response_class=Response, responses={200: {"content": {"text/plain": {}}}}
    )
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition."""
        payload, content_type = metrics.exposition()
        return Response(payload, media_type=content_type)

    # On the app's own router rather than included routers: FastAPI would wrap an included router in
    # another matching layer on every request.
    for adapter in (predict, v2, explain, ws):
        adapter.register(app.router, dataplane)
    feedback.register(app.router, prediction_log, settings.prediction_log_sample)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # Raw-body handlers validate with these models themselves; publish them for clients and tools.
        for model in _BODY_SCHEMAS:
            body_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in body_schema.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = body_schema
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Model-Name", "X-Model-Version"],
            max_age=600,
        )
    # Added last, so it is the outermost of ours: request ids and limits apply to everything.
    app.add_middleware(ServingMiddleware, settings=settings, dataplane=dataplane)
    return app
