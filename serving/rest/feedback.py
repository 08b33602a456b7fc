"""REST: `POST /feedback {"request_id": "...", "label": 7}`: what the digit of a served prediction
really was, recorded beside its logged input in the prediction log (serving/prediction_log.py).

201 `created` the first time, 200 `unchanged` for the same label again (clients may retry), 409 for a
different label (labels are never overwritten: the first answer stays, and a disagreement is the
client's to sort out), 404 for an id the log does not hold (never served, not sampled, or past the
retention), 422 for a label that is not a digit 0-9 or a malformed id, 503 when the log is off or its
database is unreachable. The requests count against the client's inference rate limit
(serving/middleware.py). The route is in the OpenAPI document only when the log is on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving import metrics
from serving.errors import error_response, from_validation_error
from serving.rest.http import ERROR_RESPONSES, RawRoute, json_response, require_json
from serving.schemas import ErrorResponse

if TYPE_CHECKING:
    from serving.prediction_log import PredictionLog

PATH = "/feedback"
# prediction_log.REQUEST_ID_MAX, spelled out: importing the package would import SQLAlchemy, which
# serving loads only when the log is on (a test keeps the two equal).
REQUEST_ID_MAX = 136


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=REQUEST_ID_MAX,
            pattern=r"^[A-Za-z0-9._:@/+=-]+$",
            description="The prediction's request id: the X-Request-ID response header, or the /predict "
            "body's request_id; `<id>-<i>` for the i-th image of a batch.",
        ),
    ]
    # Strict: "7", 7.0 and true are not digits a person clicked.
    label: Annotated[int, Field(strict=True, ge=0, le=9, description="The true digit, 0-9.")]


class FeedbackResponse(BaseModel):
    request_id: str
    label: int
    outcome: Literal["created", "unchanged"]


def _count(outcome: str) -> None:
    metrics.feedback_requests.labels(outcome=outcome).inc()


def register(router: APIRouter, prediction_log: PredictionLog | None, sample: float = 1.0) -> None:
    async def feedback(request: Request) -> Response:
        body = await request.body()
        require_json(request)
        try:
            parsed = FeedbackRequest.model_validate_json(body)
        except ValidationError as exc:
            _count("invalid")
            return from_validation_error(exc.errors())
        if prediction_log is None:
            _count("unavailable")
            return error_response(
                503, "the prediction log is off on this server (SERVING_PREDICTION_LOG_URL is not set)"
            )
        from serving.prediction_log import PredictionLogUnavailableError

        request_id, label = parsed.request_id, parsed.label
        existing = None
        try:
            result = await prediction_log.add_feedback(request_id, label)
            if result == "conflict":
                existing = await anyio.to_thread.run_sync(prediction_log.store.get, request_id)
        except PredictionLogUnavailableError as exc:
            _count("unavailable")
            return error_response(
                503, f"the prediction log database is unavailable: {exc}", headers={"Retry-After": "5"}
            )
        _count(str(result))
        if result == "unknown":
            sampled = f"; only {sample:.0%} of predictions are logged" if sample < 1.0 else ""
            return error_response(
                404,
                f"request id {request_id!r} is not in the prediction log: no prediction was served under "
                f"it, or it is past the log's retention{sampled}",
            )
        if result == "conflict":
            current = existing.label if existing is not None else None
            return error_response(
                409,
                f"request id {request_id!r} is already labelled {current}; a label is never changed",
            )
        created = result == "created"
        answer = FeedbackResponse(
            request_id=request_id, label=label, outcome="created" if created else "unchanged"
        )
        return json_response(answer.model_dump(), 201 if created else 200)

    schema = FeedbackRequest.model_json_schema()
    router.add_api_route(
        PATH,
        feedback,
        methods=["POST"],
        route_class_override=RawRoute,
        tags=["feedback"],
        status_code=201,
        response_model=FeedbackResponse,
        responses={
            200: {"model": FeedbackResponse, "description": "The same label was already recorded."},
            404: {"model": ErrorResponse, "description": "No logged prediction has this request id."},
            409: {"model": ErrorResponse, "description": "The prediction already has another label."},
            **ERROR_RESPONSES,
            503: {"model": ErrorResponse, "description": "The prediction log is off or unreachable."},
        },
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        },
        include_in_schema=prediction_log is not None,
        summary="Say what a predicted digit really was",
        description="Labels a logged prediction by its request id; the label joins its logged input "
        "for retraining. Idempotent for the same label; a different label is refused (409).",
    )
