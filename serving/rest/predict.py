"""REST adapter: `POST /predict` and `POST /predict/batch`.

JSON bodies are validated straight from the raw bytes (`RawRoute`); the schemas are still published
in the OpenAPI document (see `serving.app.custom_openapi`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import codec, context
from serving.dataplane import DataPlane, Inference
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


def register(router: APIRouter, dataplane: DataPlane) -> None:
    limits = codec.Limits.from_settings(dataplane.settings)
    inline_max_bytes = dataplane.settings.inline_max_bytes

    async def predict(request: Request) -> Response:
        body = await request.body()
        media = media_type(request)
        ctx = context.current()
        if is_json(media):

            def work() -> Inference:
                parsed = PredictRequest.model_validate_json(body)
                # Not ready is reported before anything about the input: the client should retry.
                dataplane.require_model()
                if parsed.pixels is not None:
                    batch = codec.decode_pixels(parsed.pixels)
                else:
                    batch = codec.decode_instances([parsed], limits)
                return dataplane.infer(batch, "predict", ctx.started)

        elif media in IMAGE_TYPES:

            def work() -> Inference:
                dataplane.require_model()
                return dataplane.infer(codec.decode_image(body, limits), "predict", ctx.started)

        else:
            raise unsupported_media(media, "application/json or an image type")
        result = await run(body, inline_max_bytes, work)
        response = codec.encode_prediction(result, 0)
        response["model_name"] = dataplane.name
        response["model_version"] = dataplane.version
        response["request_id"] = ctx.request_id
        response["latency_ms"] = ctx.elapsed_ms()
        return json_response(response)

    async def predict_batch(request: Request) -> Response:
        body = await request.body()
        require_json(request)
        ctx = context.current()

        def work() -> Inference:
            parsed = BatchRequest.model_validate_json(body)
            dataplane.require_model()
            batch = codec.decode_instances(parsed.instances, limits)
            return dataplane.infer(batch, "predict_batch", ctx.started)

        result = await run(body, inline_max_bytes, work)
        return json_response(
            {
                "predictions": [codec.encode_prediction(result, i) for i in range(len(result.digits))],
                "model_name": dataplane.name,
                "model_version": dataplane.version,
                "request_id": ctx.request_id,
                "latency_ms": ctx.elapsed_ms(),
            }
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
