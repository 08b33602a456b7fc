"""The traffic document: how the operator tells the serving pods to split traffic (design contract A).

The operator writes it as a tag on the MLflow registered model; every serving pod polls the registered
model and routes by it. A tag rather than a ConfigMap or a Deployment change: the pods already talk to
the registry, a tag change restarts nothing, and every pod of every Deployment serving the model sees
the same document. The serving image does not ship `contract/`: serving/routing.py parses the same
JSON itself, and a test checks that the two agree on the tag name and the fields.

No tag (or `{}`) means everything on each pod's own pinned (stable) version.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TRAFFIC_TAG: Final = "mnist-mlops.io/traffic"
# The fields, in the order they are written; serving/routing.py reads the same names.
FIELDS: Final = ("mode", "stable", "candidate", "weight", "rollout", "step")


class TrafficMode(StrEnum):
    # `weight` percent of requests are answered by the candidate.
    CANARY = "canary"
    # Stable answers everything; the candidate runs a copy of every request (weight is ignored).
    SHADOW = "shadow"


class TrafficDocument(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    mode: TrafficMode
    stable: str = Field(min_length=1)
    candidate: str = Field(min_length=1)
    # Percent of requests answered by the candidate, 0..100.
    weight: float = Field(ge=0.0, le=100.0)
    # "<namespace>/<trainingrun>" that owns the document: only its owner removes it.
    rollout: str = ""
    # The canary step (0-based); the number of steps once the candidate is promoted (weight 100).
    step: int = Field(default=0, ge=0)


class TrafficDocumentError(ValueError):
    """The tag holds something that is not a traffic document."""


def dumps(document: TrafficDocument) -> str:
    """The tag's value: compact JSON, an integral weight written as an integer (`10`, not `10.0`)."""
    wire = document.model_dump(mode="json")
    weight = float(wire["weight"])
    wire["weight"] = int(weight) if weight.is_integer() else weight
    return json.dumps({key: wire[key] for key in FIELDS}, separators=(",", ":"))


def parse(text: str | None) -> TrafficDocument | None:
    """The document in a tag value; None for no tag, an empty string or `{}`."""
    if text is None or not text.strip():
        return None
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise TrafficDocumentError(f"{TRAFFIC_TAG} is not JSON: {error}") from None
    if raw == {}:
        return None
    if not isinstance(raw, dict):
        raise TrafficDocumentError(f"{TRAFFIC_TAG} must be a JSON object, got {type(raw).__name__}")
    try:
        return TrafficDocument.model_validate(raw)
    except ValidationError as error:
        raise TrafficDocumentError(f"{TRAFFIC_TAG} is not a traffic document: {error}") from None
