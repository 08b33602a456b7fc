"""REST adapter: `POST /predict` and `POST /predict/batch`.

The handlers take the raw body and validate it with `model_validate_json` (pydantic-core parses and
validates in one pass, in Rust) instead of FastAPI's json.loads-then-validate; the schemas are still
published in the OpenAPI document (see `serving.app.custom_openapi`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic_core import to_json

from serving.dataplane import DataPlane, Inference
from serving.errors import UnsupportedMediaTypeError
from serving.schemas import BatchRequest, BatchResponse, ErrorResponse, PredictRequest, PredictResponse

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    413: {"model": ErrorResponse, "description": "Body, image or batch too large."},
    415: {"model": ErrorResponse, "description": "Unsupported Content-Type."},
    422: {"model": ErrorResponse, "description": "The input is invalid (the message says why)."},
    429: {"model": ErrorResponse, "description": "Per-client rate limit exceeded."},
    503: {"model": ErrorResponse, "description": "Model not loaded yet, or too many requests in flight."},
}


def fast_path(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Marks a handler that takes only the Request: `serving.app` also mounts it as a plain Starlette
    Route ahead of FastAPI's, skipping dependency solving (tens of microseconds per request). The
    FastAPI route stays for the OpenAPI document, so the raw handlers declare their body and path
    parameters through `openapi_extra`."""
    endpoint.fast_path = True  # type: ignore[attr-defined]
    return endpoint


def path_parameters(*names: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names]


def json_body_spec(schema: str, *, images: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    if images:
        for media in IMAGE_TYPES:
            content[media] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def media_type(request: Request) -> str:
    raw = request.headers.get("content-type", "")
    return raw.split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def elapsed_ms(request: Request) -> float:
    start: float = request.scope.get("mnist.start", time.perf_counter())
    return round((time.perf_counter() - start) * 1000, 3)


def json_response(content: dict[str, Any]) -> Response:
    return Response(to_json(content), media_type="application/json")


def _prediction(result: Inference, index: int) -> dict[str, Any]:
    digit = result.digits[index]
    probs = result.probabilities[index]
    return {
        "digit": digit,
        "confidence": probs[digit],
        "probabilities": probs,
        "inverted": result.inverted[index],
    }


async def run(dataplane: DataPlane, body: bytes, work: Callable[[], Inference]) -> Inference:
    """Small bodies run inline: a thread hop costs more than the work. Large ones (images to decode,
    big batches) go to a worker thread so the event loop keeps answering other requests."""
    if len(body) <= dataplane.settings.inline_max_bytes:
        return work()
    return await anyio.to_thread.run_sync(work)


def build_router(dataplane: DataPlane) -> APIRouter:
    router = APIRouter(tags=["predict"])

    @router.post(
        "/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_body_spec("PredictRequest", images=True),
        summary="Classify one digit",
        description=(
            'JSON `{"image": base64}` or `{"pixels": 28x28}`; or the raw bytes of a PNG/JPEG/WebP '
            "with its image Content-Type."
        ),
    )
    @fast_path
    async def predict(request: Request) -> Response:
        body = await request.body()
        media = media_type(request)
        start: float = request.scope["mnist.start"]
        if is_json(media):

            def work() -> Inference:
                parsed = PredictRequest.model_validate_json(body)
                if parsed.pixels is not None:
                    return dataplane.predict_pixels(parsed.pixels, start)
                return dataplane.predict_instances([parsed], "predict", start)

        elif media in IMAGE_TYPES:

            def work() -> Inference:
                return dataplane.predict_image_bytes(body, start)

        else:
            raise UnsupportedMediaTypeError(
                f"Content-Type {media or '(none)'!r} is not supported; send application/json or an image type"
            )
        result = await run(dataplane, body, work)
        response = _prediction(result, 0)
        response["model_name"] = dataplane.name
        response["model_version"] = dataplane.version
        response["request_id"] = request.scope["mnist.request_id"]
        response["latency_ms"] = elapsed_ms(request)
        return json_response(response)

    @router.post(
        "/predict/batch",
        response_model=BatchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_body_spec("BatchRequest", images=False),
        summary="Classify many digits",
        description='`{"instances": [...]}`, each like a /predict body; at most SERVING_MAX_BATCH_SIZE (256) '
        "per request.",
    )
    @fast_path
    async def predict_batch(request: Request) -> Response:
        body = await request.body()
        media = media_type(request)
        if not is_json(media):
            raise UnsupportedMediaTypeError(
                f"Content-Type {media or '(none)'!r} is not supported; send application/json"
            )
        start: float = request.scope["mnist.start"]

        def work() -> Inference:
            parsed = BatchRequest.model_validate_json(body)
            return dataplane.predict_instances(parsed.instances, "predict_batch", start)

        result = await run(dataplane, body, work)
        return json_response(
            {
                "predictions": [_prediction(result, i) for i in range(len(result.digits))],
                "model_name": dataplane.name,
                "model_version": dataplane.version,
                "request_id": request.scope["mnist.request_id"],
                "latency_ms": elapsed_ms(request),
            }
        )

    return router
