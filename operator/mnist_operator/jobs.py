"""Reading the training Job and its pods: has it finished, why did it fail, what did it hand back.

Pure functions of the Job's status and the pods as plain dicts (as the API returns them), so they
are unit-tested without an API server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from contract.result import TrainingResult
from mnist_operator.builders import CONTAINER_NAME
from mnist_operator.status import truncate


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


def job_is_suspended(job: Mapping[str, Any]) -> bool:
    """A queued Job that Kueue has not admitted (yet): Kueue admits by setting `spec.suspend` false."""
    return bool((job.get("spec") or {}).get("suspend"))


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


# The Job controller's annotation of each pod of an Indexed Job (a multi-worker run): only worker 0,
# the chief, writes the result; the other workers succeed with an empty termination message.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CHIEF_INDEX = "0"


def _is_chief(pod: Mapping[str, Any]) -> bool:
    index = (pod.get("metadata", {}).get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    return index is None or str(index) == CHIEF_INDEX


def training_result(pods: Iterable[Mapping[str, Any]]) -> TrainingResult:
    """The result JSON the succeeded training pod (of a multi-worker run, worker 0's) left as its
    termination message."""
    terminations = [
        termination
        for pod in pods
        if pod.get("status", {}).get("phase") == "Succeeded"
        and _is_chief(pod)
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
