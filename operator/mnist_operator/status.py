"""Pure reading of the world (Job, pods, Deployments) and writing of the TrainingRun status.

Everything here takes and returns plain dicts, so the decisions the operator takes on what it sees
are unit-tested without an API server.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from mnist_operator.builders import CONTAINER_NAME
from training_job.result import TrainingResult

STATUS_MESSAGE_LIMIT = 1024


class Phase(StrEnum):
    PENDING = "Pending"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    ROLLING_OUT = "RollingOut"
    PROMOTED = "Promoted"
    REJECTED = "Rejected"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


# The phases the reconcile timer drives; the others are final (or not started by the timer).
ACTIVE_PHASES = frozenset({Phase.TRAINING, Phase.EVALUATING, Phase.ROLLING_OUT})
FINAL_PHASES = frozenset({Phase.PROMOTED, Phase.REJECTED, Phase.ROLLED_BACK, Phase.FAILED})


class Condition(StrEnum):
    JOB_CREATED = "JobCreated"
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


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    *,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """Kubernetes condition semantics: lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    found = False
    for condition in conditions:
        if condition.get("type") != type_:
            result.append(dict(condition))
            continue
        found = True
        changed = condition.get("status") != value
        result.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": truncate(message),
                "lastTransitionTime": timestamp(now)
                if changed
                else condition.get("lastTransitionTime", timestamp(now)),
                "observedGeneration": generation,
            }
        )
    if not found:
        result.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": truncate(message),
                "lastTransitionTime": timestamp(now),
                "observedGeneration": generation,
            }
        )
    return result


def condition_status(status: Mapping[str, Any], type_: str) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == type_:
            return str(condition.get("status"))
    return None


@dataclass
class StatusUpdate:
    """Collects the changes of one handler run, and emits only what differs from the current status,
    so an uneventful reconcile tick patches nothing."""

    current: Mapping[str, Any]
    generation: int
    now: datetime.datetime = field(default_factory=now_utc)
    changes: dict[str, Any] = field(default_factory=dict)

    def _conditions(self) -> list[dict[str, Any]]:
        return list(self.changes.get("conditions", self.current.get("conditions") or []))

    def get(self, key: str) -> Any:
        return self.changes[key] if key in self.changes else self.current.get(key)

    def set(self, **fields: Any) -> StatusUpdate:
        self.changes.update(fields)
        return self

    def phase(self, phase: Phase, message: str) -> StatusUpdate:
        self.changes["phase"] = phase.value
        self.changes["message"] = truncate(message)
        return self

    def condition(self, type_: Condition, status: bool, reason: str, message: str) -> StatusUpdate:
        self.changes["conditions"] = set_condition(
            self._conditions(),
            type_.value,
            status=status,
            reason=reason,
            message=message,
            generation=self.generation,
            now=self.now,
        )
        return self

    def patch(self) -> dict[str, Any]:
        """The fields whose values differ from the current status (a merge patch of `status`)."""
        patch = {key: value for key, value in self.changes.items() if self.current.get(key) != value}
        if patch and self.current.get("observedGeneration") != self.generation:
            patch["observedGeneration"] = self.generation
        return patch


@dataclass(frozen=True)
class JobOutcome:
    finished: bool
    succeeded: bool
    reason: str = ""
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.finished and not self.succeeded


def job_outcome(job_status: Mapping[str, Any]) -> JobOutcome:
    """Only the terminal conditions count: the Job controller adds Complete/Failed once every pod
    has terminated, after the interim SuccessCriteriaMet/FailureTarget."""
    for condition in job_status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return JobOutcome(
                True, True, str(condition.get("reason") or "Completed"), str(condition.get("message") or "")
            )
        if condition.get("type") == "Failed":
            return JobOutcome(
                True, False, str(condition.get("reason") or "Failed"), str(condition.get("message") or "")
            )
    return JobOutcome(False, False)


def job_is_running(job_status: Mapping[str, Any]) -> bool:
    """A training pod is up (Ready): only then can MLflow have progress to report."""
    return int(job_status.get("ready") or 0) > 0


@dataclass(frozen=True)
class Termination:
    pod: str
    exit_code: int | None
    reason: str
    message: str
    finished_at: str


def container_termination(pod: Mapping[str, Any], container: str = CONTAINER_NAME) -> Termination | None:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        terminated = (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get(
            "terminated"
        )
        if not terminated:
            return None
        return Termination(
            pod=str(pod.get("metadata", {}).get("name", "")),
            exit_code=terminated.get("exitCode"),
            reason=str(terminated.get("reason") or ""),
            message=str(terminated.get("message") or ""),
            finished_at=str(terminated.get("finishedAt") or ""),
        )
    return None


class ResultError(ValueError):
    """The Job succeeded but handed back no readable TrainingResult."""


def training_result(pods: Iterable[Mapping[str, Any]]) -> TrainingResult:
    """The result JSON the succeeded training pod left as its termination message."""
    terminations = [
        termination
        for pod in pods
        if pod.get("status", {}).get("phase") == "Succeeded"
        and (termination := container_termination(pod)) is not None
        and termination.exit_code == 0
    ]
    if not terminations:
        raise ResultError("no succeeded training pod with a termination message was found")
    latest = max(terminations, key=lambda termination: termination.finished_at)
    if not latest.message.strip():
        raise ResultError(f"pod {latest.pod} succeeded but left an empty termination message")
    try:
        return TrainingResult.from_json(latest.message)
    except ValidationError as error:
        raise ResultError(
            f"pod {latest.pod}'s termination message is not a training result: {truncate(str(error), 300)}"
        ) from error


def failure_message(outcome: JobOutcome, pods: Iterable[Mapping[str, Any]]) -> str:
    """Why the training failed, from the Job's condition and the last failed pod's container."""
    message = f"{outcome.reason}: {outcome.message}".strip(": ")
    failed = [
        termination
        for pod in pods
        if (termination := container_termination(pod)) is not None and termination.exit_code not in (None, 0)
    ]
    if failed:
        last = max(failed, key=lambda termination: termination.finished_at)
        detail = f"pod {last.pod} exited with code {last.exit_code}"
        if last.reason:
            detail += f" ({last.reason})"
        if last.message.strip():
            detail += f": {_last_lines(last.message)}"
        message = f"{message}; {detail}" if message else detail
    return truncate(message or "the training Job failed")


def _last_lines(text: str, lines: int = 5) -> str:
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


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


def progress_status(
    history: Sequence[tuple[int, float]], epochs: int, now: datetime.datetime
) -> dict[str, Any]:
    """status.progress from the (step, value) history of val_accuracy; steps count epochs from 0."""
    if not history:
        return {"epoch": 0, "epochs": epochs, "updatedAt": timestamp(now)}
    step, value = max(history, key=lambda point: point[0])
    return {
        "epoch": min(step + 1, epochs),
        "epochs": epochs,
        "valAccuracy": round(value, 6),
        "updatedAt": timestamp(now),
    }
