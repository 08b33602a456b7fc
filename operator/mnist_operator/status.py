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
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

STATUS_MESSAGE_LIMIT = 1024


class Phase(StrEnum):
    PENDING = "Pending"
    # The Job exists but is suspended until Kueue admits it (spec.queueName).
    QUEUED = "Queued"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    # Progressive delivery (spec.rollout, mnist_operator/progressive.py): the candidate answers a share
    # of live traffic (Canary) or a copy of it (Shadowing) while it is analysed against stable.
    CANARY = "Canary"
    SHADOWING = "Shadowing"
    ROLLING_OUT = "RollingOut"
    PROMOTED = "Promoted"
    REJECTED = "Rejected"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"
    # A canary or shadow analysis failed (or was aborted by hand): all traffic back on stable, the
    # alias never moved.
    ABORTED = "Aborted"


# The phases the reconcile timer drives; the others are final (or not started by the timer).
ACTIVE_PHASES = frozenset(
    {Phase.QUEUED, Phase.TRAINING, Phase.EVALUATING, Phase.CANARY, Phase.SHADOWING, Phase.ROLLING_OUT}
)
FINAL_PHASES = frozenset({Phase.PROMOTED, Phase.REJECTED, Phase.ROLLED_BACK, Phase.FAILED, Phase.ABORTED})


class Condition(StrEnum):
    """The condition types of a TrainingRun."""

    JOB_CREATED = "JobCreated"
    ADMITTED = "Admitted"
    TRAINED = "Trained"
    MLFLOW_REACHABLE = "MlflowReachable"
    PROMOTED = "Promoted"
    ROLLED_OUT = "RolledOut"
    ROLLED_BACK = "RolledBack"
    # The live analysis of a canary or shadow rollout: True once it passed, False with the failing checks.
    ANALYSIS = "Analysis"


class Change(NamedTuple):
    """One condition as a transition (reconciler.transition) sets it."""

    type: Condition
    status: bool
    reason: str
    message: str


class Event(NamedTuple):
    """The Kubernetes event a transition posts on the TrainingRun."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


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


class CheckResult(_Wire):
    """One check of an analysis: the measured value against its threshold."""

    name: str
    # None when there was nothing to measure (e.g. no latency samples).
    value: float | None = None
    threshold: float
    passed: bool


class AnalysisRecord(_Wire):
    step: int
    weight: float
    passed: bool
    at: str | None = None
    # Seconds of the window the checks were computed over.
    window_seconds: int | None = None
    checks: list[CheckResult] = []


class OverrideRecord(_Wire):
    """A manual override (annotation mnist-mlops.io/rollout-action) the operator applied."""

    action: str
    at: str


class TrafficStatus(_Wire):
    """Where a progressive rollout is. Every decision is derived from this, the registry and Prometheus,
    so a restarted operator resumes the step where it was."""

    strategy: str
    stable: str | None = None
    candidate: str | None = None
    # The current step (0-based); len(steps) once promoted (the candidate at 100%).
    step: int | None = None
    weight: float | None = None
    # When this step's weight was written to the registry, and when every serving pod showed it applied.
    step_started_at: str | None = None
    applied_at: str | None = None
    paused: bool | None = None
    paused_at: str | None = None
    # Seconds this step was paused before `paused_at`; the hold counts only unpaused time.
    paused_seconds: float | None = None
    # A short line for `kubectl get tr` (the Analysis column).
    last_analysis: str | None = None
    analyses: list[AnalysisRecord] = []
    overrides: list[OverrideRecord] = []


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
    traffic: TrafficStatus | None = None
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
    # Annotations of the TrainingRun to remove with this patch (a manual override, once applied).
    removed_annotations: set[str] = field(default_factory=set)

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
        """The top-level fields whose values differ from the current status (a merge patch). Inside a
        changed object, a field that was unset is sent as null: a merge patch keeps what it omits."""
        before, after = self.current.wire(), self.status.wire()
        patch = {
            key: _merge_patch(before[key], value)
            if isinstance(value, dict) and isinstance(before.get(key), dict)
            else value
            for key, value in after.items()
            if before.get(key) != value
        }
        if patch and self.current.observed_generation != self.generation:
            patch["observedGeneration"] = self.generation
        return patch


def _merge_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch from `before` to `after` (lists are replaced whole, as merge patches do)."""
    patch: dict[str, Any] = {key: None for key in before if key not in after}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            nested = _merge_patch(old, value)
            if nested:
                patch[key] = nested
        elif old != value or key not in before:
            patch[key] = value
    return patch


def progress_status(history: Sequence[tuple[int, float]], epochs: int, now: datetime.datetime) -> Progress:
    """status.progress from the (step, value) history of val_accuracy; steps count epochs from 0."""
    if not history:
        return Progress(epoch=0, epochs=epochs, updated_at=timestamp(now))
    step, value = max(history, key=lambda point: point[0])
    return Progress(
        epoch=min(step + 1, epochs), epochs=epochs, val_accuracy=round(value, 6), updated_at=timestamp(now)
    )
