"""REST adapter: `POST /predict` and `POST /predict/batch`.

JSON bodies are validated straight from the raw bytes (`RawRoute`); the schemas are still published
in the OpenAPI document (see `serving.app.custom_openapi`).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import codec, context, tracing
from serving.dataplane import Batch, DataPlane
from serving.rest.http import (
    ERROR_RESPONSES,
    RawRoute,
    is_json,
    json_body_spec,
    json_response,
    media_type,
    require_json,
    run,
    unsupported_media,
)
from serving.schemas import BatchRequest, BatchResponse, PredictRequest, PredictResponse

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


def single_image_decoder(
    request: Request, body: bytes, dataplane: DataPlane, limits: codec.Limits
) -> Callable[[], Batch]:
    """How a `/predict` body (JSON, or an image's raw bytes) becomes a one-image batch; `/predict`,
    `/explain` and the page's WebSocket all take this body. Returned unrun, so the caller picks
    the thread."""
    media = media_type(request)
    if is_json(media):

        def decode_json() -> Batch:
            with tracing.decode():
                parsed = PredictRequest.model_validate_json(body)
                # Not ready is reported before anything about the input: the client should retry.
                dataplane.require_model()
                if parsed.pixels is not None:
                    return codec.decode_pixels(parsed.pixels)
                return codec.decode_instances([parsed], limits)

        return decode_json
    if media in IMAGE_TYPES:

        def decode_image() -> Batch:
            dataplane.require_model()
            with tracing.decode():
                return codec.decode_image(body, limits)

        return decode_image
    raise unsupported_media(media, "application/json or an image type")


def register(router: APIRouter, dataplane: DataPlane) -> None:
    limits = codec.Limits.from_settings(dataplane.settings)
    inline_max_bytes = dataplane.settings.inline_max_bytes

    async def predict(request: Request) -> Response:
        body = await request.body()
        ctx = context.current()
        work = single_image_decoder(request, body, dataplane, limits)
        # Decoding may take a worker thread; the model call joins the batcher on the event loop.
        batch = await run(body, inline_max_bytes, work)
        key = dataplane.routing_key(request)
        result = await dataplane.infer_async(batch, "predict", ctx.started, key=key)
        response = codec.encode_prediction(result, 0)
        response["model_name"] = dataplane.name
        response["model_version"] = result.version
        # The id the prediction log keeps it under: feedback on this answer names it.
        response["request_id"] = ctx.request_id
        response["latency_ms"] = ctx.elapsed_ms()
        return json_response(response, headers=dataplane.answered_by(result))

    async def predict_batch(request: Request) -> Response:
        body = await request.body()
        require_json(request)
        ctx = context.current()

        def work() -> Batch:
            with tracing.decode():
                parsed = BatchRequest.model_validate_json(body)
                dataplane.require_model()
                batch = codec.decode_instances(parsed.instances, limits)
            return batch

        batch = await run(body, inline_max_bytes, work)
        key = dataplane.routing_key(request)
        result = await dataplane.infer_async(batch, "predict_batch", ctx.started, key=key)
        return json_response(
            {
                "predictions": [codec.encode_prediction(result, i) for i in range(len(result.digits))],
                "model_name": dataplane.name,
                "model_version": result.version,
                # Item i is logged as f"{request_id}-{i}".
                "request_id": ctx.request_id,
                "latency_ms": ctx.elapsed_ms(),
            },
            headers=dataplane.answered_by(result),
        )

    router.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        route_class_override=RawRoute,
        tags=["predict"],
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_body_spec("PredictRequest", IMAGE_TYPES),
        summary="Classify one digit",
        description=(
            'JSON `{"image": base64}` or `{"pixels": 28x28}`; or the raw bytes of a PNG/JPEG/WebP '
            "with its image Content-Type."
        ),
    )
    router.add_api_route(
        "/predict/batch",
        predict_batch,
        methods=["POST"],
        route_class_override=RawRoute,
        tags=["predict"],
        response_model=BatchResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_body_spec("BatchRequest"),
        summary="Classify many digits",
        description='`{"instances": [...]}`, each like a /predict body; at most SERVING_MAX_BATCH_SIZE (256) '
        "per request.",
    )
