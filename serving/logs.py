"""Structured logging: one JSON object per line on stderr, carrying the request id of the request
being served (`serving.context`, set by the middleware, so it follows the request into threads)."""

from __future__ import annotations

import json
import logging
import time
import traceback
from typing import Any

from serving.context import current_request_id

# Attributes every LogRecord has; anything else was passed with `extra=` and belongs in the output.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "color_message"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record; runs once per request (the access log), so it stays cheap."""

    _second = -1
    _second_text = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        extra = record.__dict__.keys() - _STANDARD_ATTRS
        for key in extra:
            if not key.startswith("_"):
                entry[key] = record.__dict__[key]
        if record.exc_info:
            entry["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = {
            k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        request_id = current_request_id()
        if request_id is not None:
            extras = {"request_id": request_id, **extras}
        if extras:
            text += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return text


def log_config(level: str, fmt: str) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict; uvicorn applies it in every worker process."""
    formatter = "serving.logs.JsonFormatter" if fmt == "json" else "serving.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # uvicorn's own access log duplicates ours and lacks the request id.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
        },
    }
