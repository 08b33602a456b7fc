"""HTTP helpers shared by the REST adapters: the raw-request route class, media-type checks, JSON
responses, the inline-or-thread decision, and the OpenAPI fragments the raw handlers declare."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import anyio
from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic_core import to_json

from serving.errors import UnsupportedMediaTypeError
from serving.schemas import ErrorResponse

T = TypeVar("T")
# FastAPI's `responses=` argument: extra documented responses by status code.
Responses = dict[int | str, dict[str, Any]]
RequestHandler = Callable[[Request], Coroutine[Any, Any, Response]]

ERROR_RESPONSES: Responses = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    413: {"model": ErrorResponse, "description": "Body, image or batch too large."},
    415: {"model": ErrorResponse, "description": "Unsupported Content-Type."},
    422: {"model": ErrorResponse, "description": "The input is invalid (the message says why)."},
    429: {"model": ErrorResponse, "description": "Per-client rate limit exceeded."},
    503: {"model": ErrorResponse, "description": "Model not loaded yet, or too many requests in flight."},
}


class RawRoute(APIRoute):
    """A route whose endpoint takes only the Request and builds its own Response.

    FastAPI would solve dependencies and parse the body on every request (tens of microseconds); the
    inference handlers instead validate the raw body with `model_validate_json` (pydantic-core parses
    and validates in one pass). Still an APIRoute, so the OpenAPI document describes it from its
    `response_model` and the `openapi_extra` fragments below, which stand in for the body and path
    parameters FastAPI cannot see."""

    def get_route_handler(self) -> RequestHandler:
        return cast(RequestHandler, self.endpoint)


def path_parameters(*names: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in names]


def json_body_spec(schema: str, binary_media: tuple[str, ...] = ()) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    for media in binary_media:
        content[media] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


def media_type(request: Request) -> str:
    raw = request.headers.get("content-type", "")
    return raw.split(";", 1)[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def unsupported_media(media: str, accepted: str = "application/json") -> UnsupportedMediaTypeError:
    return UnsupportedMediaTypeError(f"Content-Type {media or '(none)'!r} is not supported; send {accepted}")


def require_json(request: Request) -> None:
    media = media_type(request)
    if not is_json(media):
        raise unsupported_media(media)


def json_response(
    content: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(to_json(content), status_code=status_code, headers=headers, media_type="application/json")


async def run(body: bytes, inline_max_bytes: int, work: Callable[[], T]) -> T:
    """Small bodies run inline: a thread hop costs more than the work. Large ones (images to decode,
    big batches) go to a worker thread so the event loop keeps answering other requests."""
    if len(body) <= inline_max_bytes:
        return work()
    return await anyio.to_thread.run_sync(work)
