"""The RetrainingPolicy spec: what a CronJob is to a Job, a RetrainingPolicy is to a TrainingRun.

A policy holds a TrainingRun template and the triggers that create TrainingRuns from it: a cron
schedule, firing Alertmanager alerts (the drift alert), and "at least N new labelled feedback
examples" in the prediction log. The CRD (charts/mnist-mlops/crds/retrainingpolicies…yaml) mirrors
these models (tests/contract/test_retraining_crd.py fails on drift); what a structural schema cannot
check, a valid cron expression, is checked here, and the operator reports it as an `InvalidSpec`
condition. croniter is imported only to check a schedule: the training and serving images, which
install this package without it, never validate one.
"""

from __future__ import annotations

import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from contract.spec import API_GROUP, API_VERSION, DNS_LABEL, TrainingRunSpec, _CamelModel

__all__ = ["API_GROUP", "API_VERSION"]

KIND = "RetrainingPolicy"
PLURAL = "retrainingpolicies"
SHORT_NAME = "rp"

# On every TrainingRun a policy creates: which policy, and what made it (`schedule`, `alert:<name>`,
# `feedback:<count>`).
POLICY_LABEL = f"{API_GROUP}/retraining-policy"
TRIGGER_ANNOTATION = f"{API_GROUP}/trigger"
# The training container's prediction log (SQLAlchemy URL) when its spec says includeFeedback.
FEEDBACK_DB_URL_ENV = "MNIST_FEEDBACK_DB_URL"

# A policy's TrainingRuns are named `<policy>-<10 hex digits>`; TrainingRun names are limited to 57.
MAX_NAME_LENGTH = 46
DEFAULT_HISTORY_LIMIT = 5
MAX_HISTORY_LIMIT = 100
MAX_ALERT_NAMES = 32
# Standard five-field cron (minute hour day-of-month month day-of-week) or a @-macro: croniter also
# takes a sixth (seconds) field, which would let a policy start a training every few seconds.
CRON_FIELDS = 5
CRON_MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
ALERT_NAME_PATTERN = "^[a-zA-Z_][a-zA-Z0-9_]*$"


class ConcurrencyPolicy(StrEnum):
    # A trigger that comes while one of the policy's runs is active is skipped (and recorded).
    FORBID = "Forbid"
    # The active run is deleted and the new one created.
    REPLACE = "Replace"


class TriggerKind(StrEnum):
    SCHEDULE = "schedule"
    ALERT = "alert"
    FEEDBACK = "feedback"


AlertName = Annotated[str, Field(min_length=1, max_length=128, pattern=ALERT_NAME_PATTERN)]


class AlertTrigger(_CamelModel):
    # Alertmanager `alertname` labels; a firing alert with one of them triggers the policy.
    names: list[AlertName] = Field(min_length=1, max_length=MAX_ALERT_NAMES)

    @field_validator("names")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("alert names must be unique")
        return names


class FeedbackTrigger(_CamelModel):
    # Labelled feedback examples logged since the policy's last triggered run.
    min_labelled: int = Field(ge=1, le=1_000_000)


class Triggers(_CamelModel):
    schedule: str | None = Field(default=None, min_length=1, max_length=128)
    alert: AlertTrigger | None = None
    feedback: FeedbackTrigger | None = None

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str | None) -> str | None:
        if schedule is not None:
            check_schedule(schedule)
        return schedule

    @model_validator(mode="after")
    def _at_least_one(self) -> Triggers:
        if self.schedule is None and self.alert is None and self.feedback is None:
            raise ValueError("triggers needs at least one of schedule, alert or feedback")
        return self


class RetrainingPolicySpec(_CamelModel):
    training_run_template: TrainingRunSpec
    triggers: Triggers
    concurrency_policy: ConcurrencyPolicy = ConcurrencyPolicy.FORBID
    # Finished TrainingRuns of the policy that are kept; older ones are deleted.
    history_limit: int = Field(default=DEFAULT_HISTORY_LIMIT, ge=1, le=MAX_HISTORY_LIMIT)


class CronError(ValueError):
    """Not a five-field cron expression (or @-macro) croniter can evaluate."""


def check_schedule(schedule: str) -> None:
    text = schedule.strip()
    if text.startswith("@"):
        if text.lower() not in CRON_MACROS:
            raise CronError(
                f"schedule {schedule!r}: unknown macro; use one of {', '.join(sorted(CRON_MACROS))}"
            )
        return
    fields = text.split()
    if len(fields) != CRON_FIELDS:
        raise CronError(
            f"schedule {schedule!r} has {len(fields)} fields; a cron schedule has 5 "
            "(minute hour day-of-month month day-of-week), e.g. '0 3 * * *'"
        )
    from croniter import croniter

    if not croniter.is_valid(text):
        raise CronError(
            f"schedule {schedule!r} is not a valid cron expression, e.g. '0 3 * * *' (03:00 daily)"
        )


def next_fire_time(schedule: str, after: datetime.datetime) -> datetime.datetime:
    """The first time the schedule fires strictly after `after` (UTC in, UTC out)."""
    from croniter import croniter

    moment = croniter(schedule.strip(), after.astimezone(datetime.UTC)).get_next(datetime.datetime)
    assert isinstance(moment, datetime.datetime)
    return moment.astimezone(datetime.UTC)


def policy_name_is_valid(name: str) -> bool:
    import re

    return len(name) <= MAX_NAME_LENGTH and re.fullmatch(DNS_LABEL, name) is not None
