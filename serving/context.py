"""The request being served, as one typed object: its id and the moment the middleware first saw it.

A context variable rather than keys in the ASGI scope: the error bodies and the log formatter need the
request id without a Request at hand, and anyio copies the context into the worker threads that decode
large bodies, so every log line of a request carries its id.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    started: float  # time.perf_counter(): latencies count from the first byte read, body included

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)


_current: ContextVar[RequestContext | None] = ContextVar("serving_request", default=None)


def bind(context: RequestContext) -> Token[RequestContext | None]:
    return _current.set(context)


def unbind(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


def current() -> RequestContext:
    context = _current.get()
    if context is None:
        # Only a handler mounted without ServingMiddleware gets here: a wiring bug, not a client error.
        raise LookupError("no request context: the app must run behind serving.middleware.ServingMiddleware")
    return context


def current_request_id() -> str | None:
    context = _current.get()
    return context.request_id if context is not None else None
