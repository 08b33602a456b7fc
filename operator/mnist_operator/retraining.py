"""RetrainingPolicy: creates TrainingRuns from a template when a trigger fires, as a CronJob creates Jobs.

Three triggers (contract/retraining.py):

- schedule: the next fire time lives in status.nextScheduleTime. A tick at or past it fires once and
  moves it to the first fire time after *now*, so an operator that was down over several fire times
  makes up exactly one run, and a restart never fires a time twice;
- feedback: the prediction log's labelled rows since status.feedbackSince (the last triggered run's
  time, or the policy's creation), counted in a thread with prediction_log's store; at minLabelled
  the policy fires and the baseline moves to now;
- alert: Alertmanager posts its webhook (version 4) to `POST /webhooks/alertmanager` on the operator's
  HTTP server, authenticated by a bearer token (constant-time compare). Each firing alert whose
  alertname a policy lists triggers it once per firing (fingerprint + startsAt, kept in
  status.handledAlerts), so Alertmanager re-sending a group starts nothing new.

Every trigger has a key (the scheduled time, the feedback baseline, the alert's firing) and the
TrainingRun's name is `<policy>-<hash of the key>`: if the operator dies between creating the run and
recording it, the next attempt finds the run by name and records it instead of creating a second. A
policy's state is its status plus its TrainingRuns (label mnist-mlops.io/retraining-policy, annotations
trigger and triggered-at), never memory. The timer and the webhook take the same per-policy lock and
read the policy afresh inside it, so their status patches never overwrite each other.

concurrencyPolicy Forbid skips (and records in status.lastSkipped) a trigger while one of the policy's
runs is unfinished: any phase but a final one, so a run created a moment ago (no phase yet, or
Pending) counts too. Replace deletes the unfinished run and creates the new one. historyLimit keeps
the newest finished runs and deletes the rest.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf
from aiohttp import web
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from contract.retraining import (
    KIND,
    PLURAL,
    POLICY_LABEL,
    TRIGGER_ANNOTATION,
    ConcurrencyPolicy,
    RetrainingPolicySpec,
    TriggerKind,
    next_fire_time,
)
from contract.spec import API_GROUP, API_VERSION
from contract.spec import KIND as TRAININGRUN_KIND
from contract.spec import PLURAL as TRAININGRUN_PLURAL
from mnist_operator.config import OperatorConfig
from mnist_operator.kube import FIELD_MANAGER, MERGE_PATCH, REQUEST_TIMEOUT_SECONDS
from mnist_operator.status import (
    FINAL_PHASES,
    StatusCondition,
    now_utc,
    parse_timestamp,
    set_condition,
    timestamp,
    truncate,
)

if TYPE_CHECKING:
    from mnist_operator.runtime import Runtime
    from prediction_log.store import PredictionStore

log = logging.getLogger("mnist_operator.retraining")

RETRAININGPOLICIES = (API_GROUP, API_VERSION, PLURAL)
WEBHOOK_PATH = "/webhooks/alertmanager"
TRIGGERED_AT_ANNOTATION = f"{API_GROUP}/triggered-at"
CREATED_AT_ANNOTATION = f"{API_GROUP}/created-at"
# Alert firings remembered per policy: far more than one Alertmanager group re-sends.
HANDLED_ALERTS_LIMIT = 64
MEMO_KEY = "retrainer"
FINAL = frozenset(phase.value for phase in FINAL_PHASES)


# ------------------------------------------------------------------------ status


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class TriggerRecord(_Wire):
    kind: str
    detail: str
    at: str
    training_run: str | None = None


class SkipRecord(_Wire):
    kind: str
    detail: str
    at: str
    reason: str


class HistoryEntry(_Wire):
    training_run: str
    kind: str | None = None
    detail: str | None = None
    at: str | None = None
    phase: str | None = None


class PolicyStatus(_Wire):
    observed_generation: int | None = None
    schedule: str | None = None
    next_schedule_time: str | None = None
    feedback_since: str | None = None
    feedback_count: int | None = None
    active: str | None = None
    last_trigger: TriggerRecord | None = None
    last_skipped: SkipRecord | None = None
    history: list[HistoryEntry] = []
    handled_alerts: list[str] = []
    conditions: list[StatusCondition] = []

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ConditionType:
    VALID = "Valid"
    TRIGGERED = "Triggered"
    PREDICTION_LOG = "PredictionLogReachable"


@dataclass(frozen=True)
class Trigger:
    kind: TriggerKind
    detail: str  # the TrainingRun's trigger annotation: schedule | alert:<name> | feedback:<count>
    key: str  # what makes this firing unique; the run's name is derived from it
    at: datetime.datetime


def run_name(policy: str, trigger: Trigger) -> str:
    digest = hashlib.sha256(f"{trigger.kind.value}\0{trigger.key}".encode()).hexdigest()[:10]
    return f"{policy}-{digest}"


def alert_key(fingerprint: str, labels: Mapping[str, str], starts_at: str) -> str:
    """One firing of one alert: Alertmanager's fingerprint (or the labels) and when it started."""
    identity = fingerprint or json.dumps(dict(sorted(labels.items())))
    return hashlib.sha256(f"{identity}\0{starts_at}".encode()).hexdigest()[:20]


@dataclass
class PolicyView:
    """One policy as read inside its lock, and its status being written."""

    body: dict[str, Any]
    current: PolicyStatus
    status: PolicyStatus
    now: datetime.datetime

    @classmethod
    def read(cls, body: dict[str, Any], now: datetime.datetime) -> PolicyView:
        current = PolicyStatus.model_validate(body.get("status") or {})
        return cls(body, current, current.model_copy(deep=True), now)

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"]["namespace"])

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation") or 1)

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.status.conditions = set_condition(
            self.status.conditions,
            type_,
            status=status,
            reason=reason,
            message=message,
            generation=self.generation,
            now=self.now,
        )

    def patch(self) -> dict[str, Any]:
        before, after = self.current.wire(), self.status.wire()
        patch: dict[str, Any] = {key: value for key, value in after.items() if before.get(key) != value}
        for key in before.keys() - after.keys():
            patch[key] = None
        if patch and self.current.observed_generation != self.generation:
            patch["observedGeneration"] = self.generation
        return patch


def explain(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"spec.{where}: {message}" if where else message)
    return "; ".join(parts)


def _phase(run: Mapping[str, Any]) -> str | None:
    phase = (run.get("status") or {}).get("phase")
    return None if phase is None else str(phase)


def is_unfinished(run: Mapping[str, Any]) -> bool:
    return _phase(run) not in FINAL and not run["metadata"].get("deletionTimestamp")


def _created(run: Mapping[str, Any]) -> tuple[str, str]:
    """Creation order: creationTimestamp has whole seconds, so ties go by the created-at annotation."""
    meta = run["metadata"]
    return str(meta.get("creationTimestamp") or "~"), str(
        (meta.get("annotations") or {}).get(CREATED_AT_ANNOTATION, "")
    )


def precise_timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def history_of(runs: Sequence[Mapping[str, Any]]) -> list[HistoryEntry]:
    """The policy's runs, newest first, each with what triggered it (from its own annotations)."""
    entries = []
    for run in sorted(runs, key=_created, reverse=True):
        annotations = run["metadata"].get("annotations") or {}
        detail = annotations.get(TRIGGER_ANNOTATION)
        kind = None if detail is None else str(detail).split(":", 1)[0]
        entries.append(
            HistoryEntry(
                training_run=run["metadata"]["name"],
                kind=kind,
                detail=detail,
                at=annotations.get(TRIGGERED_AT_ANNOTATION),
                phase=_phase(run),
            )
        )
    return entries


def build_trainingrun(
    policy: Mapping[str, Any], spec: RetrainingPolicySpec, trigger: Trigger, now: datetime.datetime
) -> dict[str, Any]:
    meta = policy["metadata"]
    template = spec.training_run_template.model_copy(update={"include_feedback": True})
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": TRAININGRUN_KIND,
        "metadata": {
            "name": run_name(meta["name"], trigger),
            "namespace": meta["namespace"],
            "labels": {POLICY_LABEL: meta["name"]},
            "annotations": {
                TRIGGER_ANNOTATION: trigger.detail,
                TRIGGERED_AT_ANNOTATION: timestamp(trigger.at),
                CREATED_AT_ANNOTATION: precise_timestamp(now),
            },
            # Deleting the policy deletes its runs (and their Jobs) with it.
            "ownerReferences": [
                {
                    "apiVersion": f"{API_GROUP}/{API_VERSION}",
                    "kind": KIND,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def _event(body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Best effort: outside a kopf handler (the webhook) kopf may have no event queue to post to."""
    try:
        kopf.event(dict(body), type=type_, reason=reason, message=truncate(message))  # type: ignore[arg-type]
    except LookupError:
        log.info("%s %s: %s", type_, reason, message)


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)


# ------------------------------------------------------------------------ the controller


@dataclass
class Retrainer:
    config: OperatorConfig
    api: client.CustomObjectsApi
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    stores: dict[str, PredictionStore] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self.locks.setdefault(f"{namespace}/{name}", asyncio.Lock())

    # --- API calls ----------------------------------------------------------------------------------

    async def read_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: Any = await self.api.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(found)

    async def list_policies(self) -> list[dict[str, Any]]:
        if self.config.clusterwide:
            found: Any = await self.api.list_cluster_custom_object(
                API_GROUP, API_VERSION, PLURAL, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
            return list(found.get("items") or [])
        items: list[dict[str, Any]] = []
        for namespace in self.config.namespaces:
            found = await self.api.list_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, _request_timeout=REQUEST_TIMEOUT_SECONDS
            )
            items += list(found.get("items") or [])
        return items

    async def list_runs(self, namespace: str, policy: str) -> list[dict[str, Any]]:
        found: Any = await self.api.list_namespaced_custom_object(
            API_GROUP,
            API_VERSION,
            namespace,
            TRAININGRUN_PLURAL,
            label_selector=f"{POLICY_LABEL}={policy}",
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
        return [dict(item) for item in found.get("items") or []]

    async def delete_run(self, namespace: str, name: str) -> None:
        try:
            await self.api.delete_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                namespace,
                TRAININGRUN_PLURAL,
                name,
                propagation_policy="Background",
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as error:
            if error.status != 404:
                raise

    async def patch_status(self, view: PolicyView) -> None:
        patch = view.patch()
        if not patch:
            return
        try:
            await self.api.patch_namespaced_custom_object_status(
                API_GROUP,
                API_VERSION,
                view.namespace,
                PLURAL,
                view.name,
                {"status": patch},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as error:
            if error.status != 404:  # deleted meanwhile: nothing to record
                raise

    # --- the feedback count -------------------------------------------------------------------------

    def _count_labelled(self, url: str, since: datetime.datetime) -> int:
        store = self.stores.get(url)
        if store is None:
            # sqlalchemy (and the driver) only load for a policy with a feedback trigger.
            from prediction_log.store import PredictionStore

            store = self.stores[url] = PredictionStore(url)
        return store.count_labelled(since)

    # --- one policy ---------------------------------------------------------------------------------

    async def tick(self, namespace: str, name: str) -> None:
        """The timer: validate, refresh the runs, fire due schedule/feedback triggers, prune."""
        async with self.lock(namespace, name):
            body = await self.read_policy(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            view = PolicyView.read(body, now_utc())
            spec = self._validate(view)
            if spec is None:
                await self.patch_status(view)
                return
            runs = await self.list_runs(namespace, name)
            for trigger in await self._due(view, spec):
                await self._fire(view, spec, trigger, runs)
            await self._prune(view, spec, runs)
            await self.patch_status(view)

    def _validate(self, view: PolicyView) -> RetrainingPolicySpec | None:
        """What the CRD schema cannot check (a cron expression) becomes the InvalidSpec condition."""
        try:
            spec = RetrainingPolicySpec.model_validate(view.body.get("spec") or {})
        except ValidationError as error:
            message = explain(error)
            if view.current.conditions and any(
                condition.type == ConditionType.VALID and condition.message == truncate(message)
                for condition in view.current.conditions
            ):
                return None
            view.condition(ConditionType.VALID, False, "InvalidSpec", message)
            _event(view.body, "Warning", "InvalidSpec", message)
            return None
        view.condition(ConditionType.VALID, True, "SpecValid", "the policy's spec is valid")
        return spec

    async def _due(self, view: PolicyView, spec: RetrainingPolicySpec) -> list[Trigger]:
        due: list[Trigger] = []
        status, now = view.status, view.now
        schedule = spec.triggers.schedule
        if schedule is None:
            status.schedule = status.next_schedule_time = None
        elif status.schedule != schedule or status.next_schedule_time is None:
            # A new or changed schedule starts from now: nothing is made up for a schedule just set.
            status.schedule = schedule
            status.next_schedule_time = timestamp(next_fire_time(schedule, now))
        else:
            scheduled = parse_timestamp(status.next_schedule_time)
            if now >= scheduled:
                due.append(Trigger(TriggerKind.SCHEDULE, "schedule", timestamp(scheduled), scheduled))
                # The first fire time after now: at most one run made up, however long the operator
                # was away.
                status.next_schedule_time = timestamp(next_fire_time(schedule, now))
        feedback = spec.triggers.feedback
        if feedback is None:
            status.feedback_since = status.feedback_count = None
            return due
        if status.feedback_since is None:
            status.feedback_since = str(view.body["metadata"].get("creationTimestamp") or timestamp(now))
        url = self.config.prediction_log_url
        if not url:
            view.condition(
                ConditionType.PREDICTION_LOG,
                False,
                "NotConfigured",
                "triggers.feedback needs the operator's prediction log (MNIST_OPERATOR_PREDICTION_LOG_URL)",
            )
            return due
        since = parse_timestamp(status.feedback_since)
        try:
            count = await asyncio.to_thread(self._count_labelled, url, since)
        except Exception as error:
            view.condition(
                ConditionType.PREDICTION_LOG, False, "Unreachable", f"{type(error).__name__}: {error}"
            )
            return due
        view.condition(
            ConditionType.PREDICTION_LOG, True, "Counted", f"{count} labelled since {status.feedback_since}"
        )
        status.feedback_count = count
        if count >= feedback.min_labelled:
            due.append(Trigger(TriggerKind.FEEDBACK, f"feedback:{count}", status.feedback_since, now))
        return due

    async def _fire(
        self, view: PolicyView, spec: RetrainingPolicySpec, trigger: Trigger, runs: list[dict[str, Any]]
    ) -> str:
        """Creates the trigger's TrainingRun unless concurrency forbids it; returns the outcome
        (created, adopted, skipped, failed). `runs` gains the created run."""
        name = run_name(view.name, trigger)
        if any(run["metadata"]["name"] == name for run in runs):
            # Created by an earlier attempt that died before recording it (or a webhook resend).
            self._record(view, trigger, name)
            return "adopted"
        unfinished = [run for run in runs if is_unfinished(run)]
        if unfinished and spec.concurrency_policy == ConcurrencyPolicy.FORBID:
            active = unfinished[0]["metadata"]["name"]
            reason = f"TrainingRun {active} is still running (concurrencyPolicy Forbid)"
            previous = view.status.last_skipped
            if previous is None or (previous.kind, previous.detail) != (trigger.kind.value, trigger.detail):
                _event(view.body, "Normal", "TriggerSkipped", f"{trigger.detail}: {reason}")
            view.status.last_skipped = SkipRecord(
                kind=trigger.kind.value, detail=trigger.detail, at=timestamp(view.now), reason=reason
            )
            view.condition(
                ConditionType.TRIGGERED, False, "ConcurrencyForbid", f"{trigger.detail} skipped: {reason}"
            )
            return "skipped"
        for run in unfinished:
            replaced = run["metadata"]["name"]
            await self.delete_run(view.namespace, replaced)
            run["metadata"]["deletionTimestamp"] = timestamp(view.now)
            _event(view.body, "Normal", "Replaced", f"deleted TrainingRun {replaced} for {trigger.detail}")
        manifest = build_trainingrun(view.body, spec, trigger, now_utc())
        try:
            created: Any = await self.api.create_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                view.namespace,
                TRAININGRUN_PLURAL,
                manifest,
                field_manager=FIELD_MANAGER,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
            runs.append(dict(created))
        except ApiException as error:
            if error.status == 409:
                runs.append(manifest)
            elif error.status in {400, 403, 422}:
                message = f"{trigger.detail}: creating TrainingRun {name} failed: {_api_message(error)}"
                view.condition(ConditionType.TRIGGERED, False, "CreateFailed", message)
                _event(view.body, "Warning", "CreateFailed", message)
                return "failed"
            else:
                raise
        self._record(view, trigger, name)
        _event(view.body, "Normal", "Triggered", f"{trigger.detail} created TrainingRun {name}")
        return "created"

    def _record(self, view: PolicyView, trigger: Trigger, name: str) -> None:
        view.status.last_trigger = TriggerRecord(
            kind=trigger.kind.value, detail=trigger.detail, at=timestamp(trigger.at), training_run=name
        )
        # Labelled feedback counts from the last triggered run on, whatever triggered it.
        if view.status.feedback_since is not None or trigger.kind == TriggerKind.FEEDBACK:
            view.status.feedback_since = precise_timestamp(view.now)
            view.status.feedback_count = 0
        view.condition(
            ConditionType.TRIGGERED, True, "RunCreated", f"{trigger.detail} created TrainingRun {name}"
        )

    async def _prune(self, view: PolicyView, spec: RetrainingPolicySpec, runs: list[dict[str, Any]]) -> None:
        """Deletes the oldest finished runs beyond historyLimit; the status mirrors what is left."""
        live = [run for run in runs if not run["metadata"].get("deletionTimestamp")]
        finished = [run for run in history_of(live) if run.phase in FINAL]
        for entry in finished[spec.history_limit :]:
            await self.delete_run(view.namespace, entry.training_run)
        removed = {entry.training_run for entry in finished[spec.history_limit :]}
        kept = [run for run in live if run["metadata"]["name"] not in removed]
        view.status.history = history_of(kept)
        active = [run for run in kept if is_unfinished(run)]
        view.status.active = history_of(active)[0].training_run if active else None

    # --- the webhook --------------------------------------------------------------------------------

    async def on_alerts(self, payload: AlertmanagerPayload) -> list[dict[str, str]]:
        firing = [alert for alert in payload.alerts if alert.status == "firing"]
        outcomes: list[dict[str, str]] = []
        if not firing:
            return outcomes
        for policy in await self.list_policies():
            try:
                spec = RetrainingPolicySpec.model_validate(policy.get("spec") or {})
            except ValidationError:
                continue  # its tick reports InvalidSpec
            if spec.triggers.alert is None:
                continue
            names = set(spec.triggers.alert.names)
            for alert in firing:
                alertname = alert.labels.get("alertname", "")
                if alertname in names:
                    meta = policy["metadata"]
                    outcome = await self._alert(meta["namespace"], meta["name"], alert)
                    outcomes.append(
                        {"policy": f"{meta['namespace']}/{meta['name']}", "alert": alertname, **outcome}
                    )
        return outcomes

    async def _alert(self, namespace: str, name: str, alert: Alert) -> dict[str, str]:
        key = alert_key(alert.fingerprint, alert.labels, alert.starts_at)
        async with self.lock(namespace, name):
            body = await self.read_policy(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return {"outcome": "gone"}
            view = PolicyView.read(body, now_utc())
            trigger = Trigger(TriggerKind.ALERT, f"alert:{alert.labels['alertname']}", key, view.now)
            if key in view.status.handled_alerts:
                return {"outcome": "duplicate", "trainingRun": run_name(name, trigger)}
            spec = RetrainingPolicySpec.model_validate(body.get("spec") or {})
            runs = await self.list_runs(namespace, name)
            outcome = await self._fire(view, spec, trigger, runs)
            if outcome != "failed":
                view.status.handled_alerts = [*view.status.handled_alerts, key][-HANDLED_ALERTS_LIMIT:]
            await self._prune(view, spec, runs)
            await self.patch_status(view)
            return {"outcome": outcome, "trainingRun": run_name(name, trigger)}

    async def webhook(self, request: web.Request) -> web.Response:
        token = self.config.alertmanager_token
        if not token:
            return _problem(
                503, "the Alertmanager webhook is off: MNIST_OPERATOR_ALERTMANAGER_TOKEN is not set"
            )
        presented = request.headers.get("Authorization", "")
        scheme, _, credentials = presented.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            return _problem(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            payload = AlertmanagerPayload.model_validate_json(await request.read())
        except ValidationError as error:
            return _problem(400, f"not an Alertmanager webhook payload: {explain(error)}")
        try:
            outcomes = await self.on_alerts(payload)
        except ApiException as error:
            # Alertmanager retries a 5xx; every trigger is idempotent, so a retry creates nothing twice.
            log.warning("alert webhook failed: %s", _api_message(error))
            return _problem(503, f"the Kubernetes API failed: {_api_message(error)}")
        log.info("alertmanager webhook: %d alert(s), outcomes %s", len(payload.alerts), outcomes)
        return web.json_response({"triggered": outcomes})


def _problem(status: int, detail: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": detail}, status=status, headers=headers)


class Alert(BaseModel):
    """One alert of Alertmanager's webhook payload (version 4); the other fields are ignored."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    status: str
    labels: dict[str, str]
    starts_at: str = ""
    fingerprint: str = ""


class AlertmanagerPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: str
    status: str
    alerts: list[Alert]


# ------------------------------------------------------------------------ kopf glue


def attach(rt: Runtime, memo: Any) -> Retrainer:
    """From the startup hook, before the HTTP server starts: the controller and its webhook route."""
    retrainer = Retrainer(rt.config, client.CustomObjectsApi(rt.kube.api))
    memo[MEMO_KEY] = retrainer
    if rt.health is not None:
        rt.health.add_route("POST", WEBHOOK_PATH, retrainer.webhook)
    return retrainer


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    kopf.timer(
        *RETRAININGPOLICIES,
        id="retraining",
        interval=config.retraining_interval_seconds,
        backoff=config.retraining_interval_seconds,
        registry=registry,
    )(on_policy_tick)


async def on_policy_tick(*, name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    found = memo.get(MEMO_KEY)
    if not isinstance(found, Retrainer):
        raise kopf.TemporaryError("the operator is still starting up", delay=1)
    assert namespace is not None, "RetrainingPolicies are namespaced"
    await found.tick(namespace, name)
