"""WebSocket adapter: `/ws/predict`, predictions while a person draws.

Each text (or binary) message is a `/predict` JSON body plus an optional `id` (echoed) and `explain`
flag (adds the saliency map of `POST /explain`); each is answered with one JSON message:
`{"type": "prediction", "id", "request_id", "digit", "confidence", "probabilities", "inverted",
"model_name", "model_version", "latency_ms", "dropped"[, "saliency", "input", "patch", "stride"]}` or
`{"type": "error", "id", "status", "error"[, "detail"]}` (`status` as the HTTP status of the same
problem on `/predict`). `model_version` is the version that answered (during a canary, the
connection's routing-key header keeps it on one side); `request_id` is the frame's own id, under
which the prediction log keeps it.

A drawing page sends frames faster than a busy server answers them, and only the newest frame still
matters: a reader task takes messages off the socket as they come and keeps just the latest one; the
answering task works on whichever is latest when it is free. Frames superseded unanswered are counted
in the next answer's `dropped`. An invalid message is answered with an error and the socket stays
open; a message over SERVING_MAX_BODY_BYTES closes it with 1009; messages beyond the rate limit
(SERVING_RATE_LIMIT_*, per connection here) are answered 429 and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from pydantic_core import to_json
from starlette import status
from starlette.websockets import WebSocketDisconnect, WebSocketState

from serving import codec, context, tracing
from serving.dataplane import Batch, DataPlane
from serving.errors import INTERNAL_ERROR, ServingError, summarize, validation_details
from serving.middleware import RateLimiter
from serving.rest.explain import explain_one
from serving.schemas import LiveRequest

log = logging.getLogger("serving.ws")

PATH = "/ws/predict"
ENDPOINT = "ws_predict"

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Frame:
    request: LiveRequest
    size: int
    received: float  # time.perf_counter(), where the answer's latency starts


class Latest:
    """The newest frame not answered yet: a newer one replaces it."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._dropped = 0
        self._ready = asyncio.Event()

    def put(self, frame: Frame) -> None:
        if self._frame is not None:
            self._dropped += 1
        self._frame = frame
        self._ready.set()

    async def take(self) -> tuple[Frame, int]:
        """The latest frame, and how many were superseded unanswered since the last take."""
        await self._ready.wait()
        self._ready.clear()
        frame, dropped = self._frame, self._dropped
        assert frame is not None
        self._frame, self._dropped = None, 0
        return frame, dropped


def error_message(message: str, code: int, frame_id: int | str | None, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "id": frame_id, "status": code, "error": message, **extra}


class LivePredictions:
    """The `/ws/predict` endpoint over one data plane; `__call__` serves one connection."""

    def __init__(self, dataplane: DataPlane) -> None:
        settings = dataplane.settings
        self.dataplane = dataplane
        self.settings = settings
        self.limits = codec.Limits.from_settings(settings)
        self.origins = frozenset(settings.cors_origins)

    def origin_allowed(self, ws: WebSocket) -> bool:
        """Browsers let any page open a WebSocket anywhere: hold pages to the CORS allow-list, as fetch
        is. Clients other than browsers send no Origin."""
        origin = ws.headers.get("origin")
        if origin is None or origin in self.origins or "*" in self.origins:
            return True
        return urlsplit(origin).netloc == ws.headers.get("host")

    def decode(self, frame: Frame) -> Batch:
        request = frame.request
        # Not ready is reported before anything about the input, as on /predict.
        self.dataplane.require_model()
        with tracing.decode():
            if request.pixels is not None:
                return codec.decode_pixels(request.pixels)
            return codec.decode_instances([request], self.limits)

    def explain(self, frame: Frame, request_id: str) -> dict[str, Any]:
        return explain_one(self.dataplane, self.decode(frame), ENDPOINT, frame.received, request_id)

    async def answer(self, frame: Frame, dropped: int, key: str | None = None) -> dict[str, Any]:
        request_id = uuid.uuid4().hex
        version = self.dataplane.version
        try:
            if frame.request.explain:
                # ~170 images in one model call: never on the event loop, nor through the batcher.
                reply = await anyio.to_thread.run_sync(self.explain, frame, request_id)
            else:
                # A small frame decodes faster inline than a thread hop; the model call then joins
                # the batcher with the other requests.
                if frame.size > self.settings.inline_max_bytes:
                    batch = await anyio.to_thread.run_sync(self.decode, frame)
                else:
                    batch = self.decode(frame)
                result = await self.dataplane.infer_async(
                    batch,
                    ENDPOINT,
                    frame.received,
                    key=key if self.dataplane.traffic is not None else None,
                    request_id=request_id,
                )
                reply = codec.encode_prediction(result, 0)
                version = result.version
        except ServingError as exc:
            return error_message(exc.message, exc.status_code, frame.request.id)
        except Exception:
            log.exception("unhandled error answering a WebSocket frame")
            return error_message(INTERNAL_ERROR, 500, frame.request.id)
        return {
            "type": "prediction",
            "id": frame.request.id,
            "request_id": request_id,
            **reply,
            "model_name": self.dataplane.name,
            "model_version": version,
            "latency_ms": round((time.perf_counter() - frame.received) * 1000, 3),
            "dropped": dropped,
        }

    async def __call__(self, ws: WebSocket) -> None:
        if not self.origin_allowed(ws):
            await ws.close(code=status.WS_1008_POLICY_VIOLATION)  # before accept: a 403 handshake
            return
        await ws.accept()
        # One id per connection, so the log lines of a connection can be told apart.
        token = context.bind(context.RequestContext(uuid.uuid4().hex, time.perf_counter()))
        sending = asyncio.Lock()
        latest = Latest()
        # One key per connection: a canary keeps the whole drawing session on one version.
        key = ws.headers.get(self.settings.routing_key_header)

        async def send(message: dict[str, Any]) -> None:
            # Both tasks answer: the reader its rejections, the other its predictions.
            async with sending:
                await ws.send_text(to_json(message).decode())

        async def answer_frames() -> None:
            while True:
                frame, dropped = await latest.take()
                await send(await self.answer(frame, dropped, key))

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(answer_frames)
                await self.read_frames(ws, latest, send)
                tasks.cancel_scope.cancel()
        except* WebSocketDisconnect:
            pass  # the client left while an answer was being sent
        finally:
            context.unbind(token)
            open_both_ways = ws.client_state is WebSocketState.CONNECTED
            if open_both_ways and ws.application_state is WebSocketState.CONNECTED:
                # Ended by an error or a shutdown rather than by a close from either side.
                with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                    await ws.close()

    async def read_frames(self, ws: WebSocket, latest: Latest, send: Send) -> None:
        """Takes every message off the socket as it arrives, until the client or a limit closes it."""
        max_bytes = self.settings.max_body_bytes
        limiter = (
            RateLimiter(self.settings.rate_limit_per_second, self.settings.rate_limit_bucket)
            if self.settings.rate_limit_per_second > 0
            else None
        )
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data: bytes | None = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            if len(data) > max_bytes:
                await ws.close(status.WS_1009_MESSAGE_TOO_BIG, f"message larger than {max_bytes} bytes")
                return
            if limiter is not None:
                allowed, retry = limiter.allow("connection", time.monotonic())
                if not allowed:
                    limited = "rate limit exceeded for this client"
                    await send(error_message(limited, 429, None, retry_after=round(retry, 3)))
                    continue
            try:
                request = LiveRequest.model_validate_json(data)
            except ValidationError as exc:
                details = validation_details(exc.errors())
                if any(item["type"] == "json_invalid" for item in details):
                    await send(
                        error_message(f"the message is not valid JSON: {details[0]['msg']}", 400, None)
                    )
                else:
                    await send(error_message(summarize(details), 422, None, detail=details))
                continue
            latest.put(Frame(request, len(data), time.perf_counter()))


def register(router: APIRouter, dataplane: DataPlane) -> None:
    router.add_api_websocket_route(PATH, LivePredictions(dataplane), name="ws_predict")
