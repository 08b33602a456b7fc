"""The TrainingRun's status as typed models, and the one place it is turned into a status patch.

`TrainingRunStatus` mirrors the CRD's status schema (camelCase on the wire, snake_case here);
`StatusUpdate` holds the status as read and the status being written during one handler run, and
`patch()` emits only the top-level fields that changed, so an uneventful reconcile tick patches
nothing. Pure: unit-tested without an API server.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

STATUS_MESSAGE_LIMIT = 1024


class Phase(StrEnum):
    PENDING = "Pending"
    # The Job exists but is suspended until Kueue admits it (spec.queueName).
    QUEUED = "Queued"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    ROLLING_OUT = "RollingOut"
    PROMOTED = "Promoted"
    REJECTED = "Rejected"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


# The phases the reconcile timer drives; the others are final (or not started by the timer).
ACTIVE_PHASES = frozenset({Phase.QUEUED, Phase.TRAINING, Phase.EVALUATING, Phase.ROLLING_OUT})
FINAL_PHASES = frozenset({Phase.PROMOTED, Phase.REJECTED, Phase.ROLLED_BACK, Phase.FAILED})


class Condition(StrEnum):
    """The condition types of a TrainingRun."""

    JOB_CREATED = "JobCreated"
    ADMITTED = "Admitted"
    TRAINED = "Trained"
    MLFLOW_REACHABLE = "MlflowReachable"
    PROMOTED = "Promoted"
    ROLLED_OUT = "RolledOut"
    ROLLED_BACK = "RolledBack"


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def truncate(text: str, limit: int = STATUS_MESSAGE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Wire(BaseModel):
    """camelCase on the wire; unknown fields are ignored (never patched, so never lost)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class StatusCondition(_Wire):
    type: str
    status: str
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


class Progress(_Wire):
    epoch: int = 0
    epochs: int = 0
    val_accuracy: float | None = None
    updated_at: str | None = None


class RolloutEntry(_Wire):
    """One serving Deployment of a rollout, with what it served before (for a rollback)."""

    name: str
    previous_version: str | None = None
    previous_model_uri: str | None = None
    # The pod template's traceparent annotation before the rollout, restored with the rest.
    previous_traceparent: str | None = None


class RolloutRecord(_Wire):
    started_at: str
    deadline: str
    deployments: list[RolloutEntry] = []


class TrainingRunStatus(_Wire):
    phase: Phase | None = None
    message: str | None = None
    observed_generation: int | None = None
    job_name: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    mlflow_run_id: str | None = None
    model_version: str | None = None
    metrics: dict[str, float] | None = None
    progress: Progress | None = None
    promoted: bool | None = None
    promotion_reason: str | None = None
    champion_version: str | None = None
    previous_champion_version: str | None = None
    rollout: RolloutRecord | None = None
    # The promotion's trace (mnist_operator/tracing.py); unset while tracing is off.
    trace_id: str | None = None
    traceparent: str | None = None
    conditions: list[StatusCondition] = []

    def wire(self) -> dict[str, Any]:
        """The status as the API server stores it: camelCase, unset fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def condition_status(self, type_: Condition) -> str | None:
        for condition in self.conditions:
            if condition.type == type_.value:
                return condition.status
        return None


def set_condition(
    conditions: Sequence[StatusCondition],
    type_: str,
    *,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime.datetime,
) -> list[StatusCondition]:
    """Kubernetes condition semantics: lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    updated = StatusCondition(
        type=type_,
        status=value,
        reason=reason,
        message=truncate(message),
        last_transition_time=timestamp(now),
        observed_generation=generation,
    )
    result: list[StatusCondition] = []
    found = False
    for condition in conditions:
        if condition.type != type_:
            result.append(condition)
            continue
        found = True
        if condition.status == value and condition.last_transition_time:
            updated.last_transition_time = condition.last_transition_time
        result.append(updated)
    if not found:
        result.append(updated)
    return result


@dataclass
class StatusUpdate:
    """The status as read (`current`) and as it is being written (`status`) during one handler run;
    `patch()` is the merge patch of `status` between them."""

    current: TrainingRunStatus
    generation: int
    now: datetime.datetime = field(default_factory=now_utc)
    status: TrainingRunStatus = field(init=False)

    def __post_init__(self) -> None:
        self.status = self.current.model_copy(deep=True)

    @classmethod
    def read(
        cls, status: Mapping[str, Any], generation: int, now: datetime.datetime | None = None
    ) -> StatusUpdate:
        return cls(TrainingRunStatus.model_validate(dict(status)), generation, now or now_utc())

    def phase(self, phase: Phase, message: str) -> StatusUpdate:
        self.status.phase = phase
        self.status.message = truncate(message)
        return self

    def condition(self, type_: Condition, status: bool, reason: str, message: str) -> StatusUpdate:
        self.status.conditions = set_condition(
            self.status.conditions,
            type_.value,
            status=status,
            reason=reason,
            message=message,
            generation=self.generation,
            now=self.now,
        )
        return self

    def patch(self) -> dict[str, Any]:
        """The top-level fields whose values differ from the current status (a merge patch)."""
        before, after = self.current.wire(), self.status.wire()
        patch = {key: value for key, value in after.items() if before.get(key) != value}
        if patch and self.current.observed_generation != self.generation:
            patch["observedGeneration"] = self.generation
        return patch


def progress_status(history: Sequence[tuple[int, float]], epochs: int, now: datetime.datetime) -> Progress:
    """status.progress from the (step, value) history of val_accuracy; steps count epochs from 0."""
    if not history:
        return Progress(epoch=0, epochs=epochs, updated_at=timestamp(now))
    step, value = max(history, key=lambda point: point[0])
    return Progress(
        epoch=min(step + 1, epochs), epochs=epochs, val_accuracy=round(value, 6), updated_at=timestamp(now)
    )
