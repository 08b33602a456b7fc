"""The one map from exceptions to HTTP responses.

Every error body is `{"error": "<message>", "request_id": "..."}`, plus `detail` for field-level
validation problems. `error` is also the Open Inference Protocol's error field, so KServe and Triton
clients show our message. Unexpected exceptions become a bare 500 whose body names only the request
id (`INTERNAL_ERROR`, sent by the middleware, which sees every exception first): the traceback goes to
the log, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.context import current_request_id

log = logging.getLogger("serving.errors")

INTERNAL_ERROR = "internal server error; the request id identifies the log entry"


class ServingError(Exception):
    """Base of the errors the service raises on purpose; each subclass fixes its HTTP status."""

    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequestError(ServingError):
    """The body's framing is broken (e.g. binary tensor lengths that do not add up), not its values."""

    status_code = 400


class InvalidInputError(ServingError):
    status_code = 422


class NotFoundError(ServingError):
    status_code = 404


class PayloadTooLargeError(ServingError):
    status_code = 413


class UnsupportedMediaTypeError(ServingError):
    status_code = 415


class ModelNotReadyError(ServingError):
    status_code = 503

    def __init__(self, message: str = "the model is not loaded yet") -> None:
        super().__init__(message, headers={"Retry-After": "5"})


def error_body(message: str, detail: Sequence[dict[str, Any]] | None = None) -> bytes:
    body: dict[str, Any] = {"error": message, "request_id": current_request_id()}
    if detail:
        body["detail"] = list(detail)
    return to_json(body)


def error_response(
    status_code: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    detail: Sequence[dict[str, Any]] | None = None,
) -> Response:
    return Response(
        error_body(message, detail), status_code=status_code, media_type="application/json", headers=headers
    )


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic errors without their `input`/`ctx`/`url`: echoing a 6 MB body back helps nobody."""
    details = []
    for err in errors[:20]:
        loc = [part for part in err.get("loc", ()) if part != "body"]
        details.append({"loc": loc, "msg": err.get("msg", ""), "type": err.get("type", "")})
    return details


def summarize(details: Sequence[dict[str, Any]]) -> str:
    if not details:
        return "invalid request"
    first = details[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(details) - 1} more problems)" if len(details) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def from_validation_error(errors: Sequence[Any]) -> Response:
    details = validation_details(errors)
    if any(item["type"] == "json_invalid" for item in details):
        return error_response(400, f"the body is not valid JSON: {details[0]['msg']}")
    return error_response(422, summarize(details), detail=details)


def install_exception_handlers(app: FastAPI) -> None:
    async def serving_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return error_response(exc.status_code, exc.message, headers=exc.headers)

    async def request_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return from_validation_error(exc.errors())

    async def http_exception(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(ValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_exception)
