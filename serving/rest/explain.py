"""REST adapter: `POST /explain`, one prediction with its occlusion saliency map (`serving.explain`).

The body is a `/predict` body (JSON or raw image bytes). The explanation runs the model once on a batch
of some 170 images, so it always goes to a worker thread, and the middleware counts it as inference
(rate and concurrency limits).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request
from fastapi.responses import Response

from serving import codec, context, explain, metrics
from serving.dataplane import Batch, DataPlane
from serving.model import Float32Array
from serving.rest.http import (
    ERROR_RESPONSES,
    RawRoute,
    json_body_spec,
    json_response,
)
from serving.rest.predict import IMAGE_TYPES, single_image_decoder
from serving.schemas import ExplainResponse

ENDPOINT = "explain"


def _significant(values: Float32Array, digits: int = 3) -> npt.NDArray[np.float64]:
    """Rounded to `digits` significant digits: a third of the JSON, and unlike a fixed number of
    decimals it keeps the tiny drops of a very confident model, whose heat-map would otherwise be 0."""
    wide = values.astype(np.float64)
    magnitude = np.floor(np.log10(np.abs(wide), where=wide != 0, out=np.zeros_like(wide)))
    scale = 10.0 ** (digits - 1 - magnitude)
    rounded: npt.NDArray[np.float64] = np.round(wide * scale) / scale
    return rounded


def explain_one(
    dataplane: DataPlane, batch: Batch, endpoint: str, start: float, request_id: str | None = None
) -> dict[str, Any]:
    """Blocking: the prediction and saliency of a one-image batch, recorded under `endpoint` like any
    prediction (the occluded copies are not predictions, so they are not counted). Always the stable
    version's: a canary's candidate is judged on the predictions it serves, and an explanation must
    describe the model that answers by default."""
    image = batch.images[0]
    stable = dataplane.require_stable()
    result = explain.explain(image, dataplane.run_model)
    confidence = result.probabilities[result.digit]
    stable.metrics.ok.inc()
    metrics.observe_predictions(
        stable.metrics,
        endpoint,
        digits=[result.digit],
        confidences=[confidence],
        means=[float(image.mean())],
        inverted=int(batch.inverted[0]),
        seconds=time.perf_counter() - start,
    )
    probabilities = np.asarray([result.probabilities], dtype=np.float32)
    dataplane.record_explained(batch, probabilities, endpoint, request_id)
    return {
        "digit": result.digit,
        "confidence": confidence,
        "probabilities": result.probabilities,
        "inverted": batch.inverted[0],
        "saliency": _significant(result.saliency).tolist(),
        "input": np.round(image, 3).tolist(),
        "patch": explain.PATCH,
        "stride": explain.STRIDE,
    }


def register(router: APIRouter, dataplane: DataPlane) -> None:
    limits = codec.Limits.from_settings(dataplane.settings)

    async def explain_route(request: Request) -> Response:
        body = await request.body()
        ctx = context.current()
        decode = single_image_decoder(request, body, dataplane, limits)

        def work() -> dict[str, Any]:
            return explain_one(dataplane, decode(), ENDPOINT, ctx.started)

        response = await anyio.to_thread.run_sync(work)
        response["model_name"] = dataplane.name
        response["model_version"] = dataplane.version
        response["request_id"] = ctx.request_id
        response["latency_ms"] = ctx.elapsed_ms()
        return json_response(response)

    router.add_api_route(
        "/explain",
        explain_route,
        methods=["POST"],
        route_class_override=RawRoute,
        tags=["predict"],
        response_model=ExplainResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=json_body_spec("PredictRequest", IMAGE_TYPES),
        summary="Classify one digit and show where the model looked",
        description=(
            "A `/predict` body. Adds `saliency`, a 28x28 occlusion-sensitivity map over `input` (the 28x28 "
            f"image the model saw): a {explain.PATCH}x{explain.PATCH} black patch slides with stride "
            f"{explain.STRIDE}, and each pixel scores the mean drop of the predicted digit's probability "
            "when it is covered. One batched model call."
        ),
    )
