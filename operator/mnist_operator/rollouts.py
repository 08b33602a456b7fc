"""Reading the serving Deployments during a rollout (the logic of `kubectl rollout status`), and the
trace context a rollout leaves in their pod template."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mnist_operator.tracing import TRACEPARENT_ANNOTATION


@dataclass(frozen=True)
class RolloutState:
    done: bool
    failed: bool
    message: str


def rollout_state(deployment: Mapping[str, Any]) -> RolloutState:
    """The logic of `kubectl rollout status` for one Deployment."""
    name = deployment.get("metadata", {}).get("name", "?")
    generation = int(deployment.get("metadata", {}).get("generation") or 0)
    status = deployment.get("status") or {}
    wanted = int(deployment.get("spec", {}).get("replicas", 1) or 0)
    if int(status.get("observedGeneration") or 0) < generation:
        return RolloutState(False, False, f"{name}: waiting for the Deployment controller to see the update")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return RolloutState(False, True, f"{name}: progress deadline exceeded")
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < wanted:
        return RolloutState(False, False, f"{name}: {updated} of {wanted} replicas updated")
    if total > updated:
        return RolloutState(False, False, f"{name}: {total - updated} old replicas pending termination")
    if available < updated:
        return RolloutState(False, False, f"{name}: {available} of {updated} updated replicas available")
    return RolloutState(True, False, f"{name}: {available} of {wanted} replicas available")


def traceparent_of(deployment: Mapping[str, Any]) -> str | None:
    """The pod template's traceparent annotation: the trace of the rollout that made the template."""
    template_meta = deployment.get("spec", {}).get("template", {}).get("metadata", {})
    value = (template_meta.get("annotations") or {}).get(TRACEPARENT_ANNOTATION)
    return None if value is None else str(value)


def with_traceparent(patch: dict[str, Any], traceparent: str | None) -> dict[str, Any]:
    """A rollout patch that also sets the pod template's traceparent annotation (None removes it)."""
    template = patch.setdefault("spec", {}).setdefault("template", {})
    template.setdefault("metadata", {}).setdefault("annotations", {})[TRACEPARENT_ANNOTATION] = traceparent
    return patch
