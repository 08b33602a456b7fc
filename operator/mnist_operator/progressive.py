"""Canary and shadow rollouts: the candidate meets live traffic before the alias moves.

After the offline gate (`contract.promotion.judge`, which moves nothing), a canary run walks its
steps: each tick makes sure the registered model's traffic tag (contract/traffic.py) names the step's
weight, waits until Prometheus shows every serving target of the model applying it
(`mnist_traffic_weight`), holds the step, then analyses candidate against stable over the step's
window (`analysis.py`). Pass: the next step, and after the last one the promotion (the alias moves,
the tag goes to weight 100 so users never flip back) and the ordinary rollout of the serving
Deployments to the pinned version (RollingOut), after which the tag is removed. Fail: the tag is
removed at once (0% candidate), the run is Aborted, the alias never moved. Shadow is the same machine
with one step: stable answers, the candidate runs a copy of every request, and the analysis judges
their agreement and the candidate's latency.

Restart-safe: every decision derives from status.traffic (step, stepStartedAt, appliedAt, pauses), the
registry (the tag, the alias) and Prometheus, never from memory. A restarted operator finds the tag as
it left it and the step's timestamps in the status, so it resumes the step where it was; a promotion
interrupted after the alias moved is recognised from the registry (the champion is already the
candidate) and finished without a second move.

A manual override is the annotation `mnist-mlops.io/rollout-action` (pause | resume | promote |
abort), applied at the next tick, recorded in status.traffic.overrides and as an event, then removed.
At the next tick, not from a kopf `on.field` handler on the annotation: kopf runs a resource's timer in
a task of its own, concurrently with its change handlers, and applies each one's status patch only
after the function returns, from the body that call started with. A handler reacting to the annotation
while a tick is under way, or just after one before its patch reaches the watch, would write
status.traffic (patched as a whole, `StatusUpdate.patch`) from a body without the tick's step change,
and the tick would write back a traffic without the override: a rewound step, a lost pause. Neither
side can tell whether the other's patch is in its body (kopf does not return the patched object, and
resourceVersions are opaque), so the timer stays the one writer of the status; the wait is at most
`reconcile_interval_seconds` (5 s).

The tag must never outlive its owner, or the model's next canary waits for it forever. A TrainingRun
deleted while it holds the tag (Canary, Shadowing, or RollingOut behind a 100% tag) removes it from
its deletion handler (`release_deleted`, best effort: MLflow down for a few attempts leaves it and the
deletion goes on); and a run that finds another run's tag checks that owner (`stale_reason`): one
deleted, finished, or no longer in a phase that holds a tag left it behind, and the tag is taken over.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from kubernetes.aio.client.exceptions import ApiException

from contract import promotion
from contract.promotion import PromotionOutcome
from contract.registry import AliasMove, alias_version, promote
from contract.spec import (
    API_GROUP,
    CHAMPION_ALIAS,
    PromotionPolicySpec,
    RolloutSpec,
    RolloutStrategy,
    TrainingRunSpec,
)
from contract.traffic import TRAFFIC_TAG, TrafficDocument, TrafficDocumentError, TrafficMode, dumps, parse
from mnist_operator import analysis, tracking
from mnist_operator.analysis import Check, Scope, Verdict
from mnist_operator.config import OperatorConfig
from mnist_operator.runtime import Runtime
from mnist_operator.status import (
    AnalysisRecord,
    Change,
    CheckResult,
    Condition,
    Event,
    OverrideRecord,
    Phase,
    TrafficStatus,
    parse_timestamp,
    timestamp,
    truncate,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from mnist_operator.reconciler import Run

ROLLOUT_ACTION_ANNOTATION = f"{API_GROUP}/rollout-action"
ACTIONS = ("pause", "resume", "promote", "abort")
# Analyses kept in status.traffic (a long rollout must not grow the object without bound).
MAX_ANALYSES = 20
MAX_OVERRIDES = 20
PROGRESSIVE_PHASES = frozenset({Phase.CANARY, Phase.SHADOWING})
# The phases in which a canary or shadow run may hold the model's traffic tag (RollingOut: at 100%,
# until its Deployments serve the candidate).
TAG_HOLDING_PHASES = frozenset({Phase.CANARY, Phase.SHADOWING, Phase.ROLLING_OUT})


class PrometheusError(RuntimeError):
    """Prometheus did not answer a query (down, or the query was refused)."""


def strategy_of(spec: TrainingRunSpec, config: OperatorConfig) -> RolloutStrategy:
    if spec.rollout is not None and spec.rollout.strategy is not None:
        return spec.rollout.strategy
    return RolloutStrategy(config.default_rollout_strategy)


def rollout_of(spec: TrainingRunSpec) -> RolloutSpec:
    return spec.rollout if spec.rollout is not None else RolloutSpec()


# ------------------------------------------------------------------------ registry (blocking)


def judge(client: MlflowClient, model: str, version: str, policy: PromotionPolicySpec) -> PromotionOutcome:
    """The offline gate, no alias moved (contract.promotion.judge)."""
    return tracking.guarded(lambda: promotion.judge(client, model, version, policy))


def read_traffic(client: MlflowClient, model: str) -> TrafficDocument | None:
    def read() -> TrafficDocument | None:
        tags = client.get_registered_model(model).tags or {}
        try:
            return parse(tags.get(TRAFFIC_TAG))
        except TrafficDocumentError:
            # A hand-edited, broken tag: ours to overwrite (serving ignores it as well).
            return None

    return tracking.guarded(read)


def write_traffic(client: MlflowClient, model: str, document: TrafficDocument) -> None:
    tracking.guarded(lambda: client.set_registered_model_tag(model, TRAFFIC_TAG, dumps(document)))


def clear_traffic(client: MlflowClient, model: str, rollout: str) -> bool:
    """Removes the traffic tag if `rollout` owns it (or it is unreadable); another rollout's is kept."""

    def clear() -> bool:
        tags = client.get_registered_model(model).tags or {}
        raw = tags.get(TRAFFIC_TAG)
        if raw is None:
            return False
        try:
            document = parse(raw)
        except TrafficDocumentError:
            document = None
        if document is not None and document.rollout != rollout:
            return False
        client.delete_registered_model_tag(model, TRAFFIC_TAG)
        return True

    return tracking.guarded(clear)


def promote_candidate(client: MlflowClient, model: str, version: str, stable: str) -> AliasMove | str:
    """Moves the champion alias from `stable` to `version`; a string says why not. Idempotent: when
    the alias already names the version (a promotion before a restart), nothing moves again."""

    def move() -> AliasMove | str:
        champion = alias_version(client, model, CHAMPION_ALIAS)
        if champion not in {stable, version}:
            return (
                f"the champion moved from version {stable} to {champion or 'none'} during the rollout,"
                " so the analysis no longer compares against what users get"
            )
        return promote(client, model, version)

    return tracking.guarded(move)


# ------------------------------------------------------------------------ the tag's owner


def holds_traffic(status: Mapping[str, Any]) -> bool:
    """Whether a TrainingRun with this status may own its model's traffic tag."""
    traffic = status.get("traffic") or {}
    return status.get("phase") in TAG_HOLDING_PHASES and traffic.get("strategy") in {
        RolloutStrategy.CANARY.value,
        RolloutStrategy.SHADOW.value,
    }


def owner_of(document: TrafficDocument) -> tuple[str, str] | None:
    """(namespace, name) of the TrainingRun the document names, None when it names none."""
    namespace, _, name = document.rollout.partition("/")
    return (namespace, name) if namespace and name and "/" not in name else None


def stale_reason(document: TrafficDocument, owner: Mapping[str, Any] | None, model: str) -> str | None:
    """Why the tag is left over (its owner `owner`, None when not found, can no longer remove it), or
    None while the owner still holds it."""
    if owner_of(document) is None:
        return f"it names no TrainingRun (rollout {document.rollout!r})"
    if owner is None:
        return f"TrainingRun {document.rollout} no longer exists"
    if (owner.get("spec") or {}).get("registeredModel", model) != model:
        return f"TrainingRun {document.rollout} now rolls out another model"
    status = owner.get("status") or {}
    if not holds_traffic(status):
        return f"TrainingRun {document.rollout} is {status.get('phase') or 'not started'}, past its rollout"
    return None


async def release_deleted(rt: Runtime, uid: str, key: str, model: str) -> bool:
    """A deleted run's traffic tag removed, if it still names the run (the deletion handler); True if
    removed. MLflow errors propagate: the handler decides how often to try."""
    rt.deleted_runs.add(uid)
    async with rt.model_lock(model):
        return await asyncio.to_thread(clear_traffic, rt.mlflow, model, key)


# ------------------------------------------------------------------------ Prometheus (async)


async def query_all(
    url: str, queries: Mapping[str, str], timeout_seconds: float
) -> dict[str, list[dict[str, Any]]]:
    """Every query at once, over Prometheus' HTTP API; {name: result vector}."""
    client_timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        answers = await asyncio.gather(*(_query(session, url, expr) for expr in queries.values()))
    return dict(zip(queries, answers, strict=True))


async def _query(session: aiohttp.ClientSession, url: str, expr: str) -> list[dict[str, Any]]:
    try:
        async with session.get(f"{url.rstrip('/')}/api/v1/query", params={"query": expr}) as response:
            body = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        raise PrometheusError(
            f"Prometheus at {url} did not answer: {error or type(error).__name__}"
        ) from error
    if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
        detail = body.get("error") if isinstance(body, dict) else body
        raise PrometheusError(f"Prometheus refused {expr!r}: HTTP {status} {detail}")
    result = body.get("data", {}).get("result")
    if not isinstance(result, list):
        raise PrometheusError(f"Prometheus answered {expr!r} with a {body.get('data', {}).get('resultType')}")
    return result


# ------------------------------------------------------------------------ the state machine


def held_seconds(traffic: TrafficStatus, now: datetime.datetime) -> float:
    """Seconds the current step has held its weight: since every pod applied it, minus the pauses."""
    if traffic.applied_at is None:
        return 0.0
    applied = parse_timestamp(traffic.applied_at)
    paused = traffic.paused_seconds or 0.0
    if traffic.paused and traffic.paused_at is not None:
        paused += max((now - max(parse_timestamp(traffic.paused_at), applied)).total_seconds(), 0.0)
    return max((now - applied).total_seconds() - paused, 0.0)


def check_results(checks: Sequence[Check]) -> list[CheckResult]:
    return [
        CheckResult(name=check.name, value=check.value, threshold=check.threshold, passed=check.passed)
        for check in checks
    ]


def short_result(verdict: Verdict) -> str:
    """The Analysis column: `passed` or the failing checks' names and values."""
    if verdict.passed:
        return "passed"
    return truncate("failed: " + ", ".join(f"{c.name}={_value(c.value)}" for c in verdict.failed), 120)


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


@dataclass
class Progressive:
    """One tick of a canary or shadow rollout of `run`."""

    run: Run
    # Seconds of the window of the analysis being recorded.
    window: int | None = None

    # ---------------------------------------------------------------- accessors

    @property
    def traffic(self) -> TrafficStatus:
        traffic = self.run.update.status.traffic
        assert traffic is not None, "a progressive phase without status.traffic"
        return traffic

    @property
    def rollout(self) -> RolloutSpec:
        return rollout_of(self.run.spec)

    @property
    def key(self) -> str:
        return self.run.subject.key

    @property
    def shadow(self) -> bool:
        return self.traffic.strategy == RolloutStrategy.SHADOW.value

    @property
    def steps(self) -> int:
        return 1 if self.shadow else len(self.rollout.steps)

    @property
    def now(self) -> datetime.datetime:
        return self.run.update.now

    def scope(self) -> Scope:
        return Scope(self.run.model, str(self.traffic.stable), str(self.traffic.candidate))

    def step_weight(self, step: int) -> float:
        if step >= self.steps:
            return 100.0
        return 0.0 if self.shadow else float(self.rollout.steps[step].weight)

    def hold_seconds(self) -> float:
        step = self.traffic.step or 0
        return float(self.rollout.shadow_seconds if self.shadow else self.rollout.steps[step].hold_seconds)

    def document(self, step: int) -> TrafficDocument:
        return TrafficDocument(
            mode=TrafficMode.SHADOW if self.shadow and step < self.steps else TrafficMode.CANARY,
            stable=str(self.traffic.stable),
            candidate=str(self.traffic.candidate),
            weight=self.step_weight(step),
            rollout=self.key,
            step=step,
        )

    def describe_step(self) -> str:
        if self.shadow:
            return "shadow"
        step = self.traffic.step or 0
        return f"step {step + 1}/{self.steps} ({self.step_weight(step):g}%)"

    def say(self, message: str) -> None:
        """The phase's message, phase unchanged."""
        phase = self.run.update.status.phase
        assert phase is not None
        self.run.update.phase(phase, message)

    # ---------------------------------------------------------------- start (from Evaluating)

    async def start(self, strategy: RolloutStrategy, champion: str, reason: str) -> None:
        """Evaluating → Canary | Shadowing, once the offline gate passed against `champion`."""
        run = self.run
        current = await run.mlflow(read_traffic, run.model)
        if current is not None and current.rollout != self.key:
            stale = await self.stale_reason(current)
            if stale is None:
                # One traffic split per registered model: the other rollout finishes (and removes its
                # tag) first.
                run.update.phase(
                    Phase.EVALUATING,
                    f"passed the offline gate; waiting for the rollout of {current.rollout} (version "
                    f"{current.candidate} of {run.model}) to finish before starting a {strategy.value}",
                )
                return
            # The caller holds the model lock; the tag is removed only if it still names that owner.
            await run.mlflow(clear_traffic, run.model, current.rollout)
            run.transition(
                None,
                "",
                event=Event(
                    "Warning",
                    "StaleTrafficTakenOver",
                    f"removed the leftover traffic tag of {current.rollout} (version {current.candidate} at "
                    f"{current.weight:g}%): {stale}; starting this {strategy.value}",
                ),
            )
        shadow = strategy is RolloutStrategy.SHADOW
        run.update.status.traffic = TrafficStatus(
            strategy=strategy.value,
            stable=champion,
            candidate=run.version,
            step=0,
            weight=0.0 if shadow else float(self.rollout.steps[0].weight),
            paused=False,
            last_analysis="pending",
        )
        plan = (
            f"shadow for {self.rollout.shadow_seconds}s"
            if shadow
            else " → ".join(f"{step.weight}% for {step.hold_seconds}s" for step in self.rollout.steps)
            + " → 100%"
        )
        message = (
            f"version {run.version} passed the offline gate ({reason}); {strategy.value} against version "
            f"{champion}: {plan}"
        )
        run.transition(
            Phase.SHADOWING if shadow else Phase.CANARY,
            message,
            Change(Condition.ANALYSIS, False, "InProgress", "the live analysis has not finished"),
            event=Event("Normal", "ShadowStarted" if shadow else "CanaryStarted", message),
        )

    async def stale_reason(self, document: TrafficDocument) -> str | None:
        """Why another run's tag is left over, None while its owner holds it (or cannot be read)."""
        owner = owner_of(document)
        if owner is None:
            return stale_reason(document, None, self.run.model)
        try:
            found = await self.run.rt.kube.read_trainingrun(*owner)
        except ApiException as error:
            # Not found is an answer; a refusal (RBAC outside the watched namespaces) or an outage is
            # not: the tag is left to its owner.
            self.run.subject.logger.warning(
                "cannot read TrainingRun %s, owner of the traffic tag of %s: %s %s",
                document.rollout,
                self.run.model,
                error.status,
                error.reason,
            )
            return None
        return stale_reason(document, found, self.run.model)

    async def write(self, document: TrafficDocument) -> None:
        """Writes this run's tag, unless the run was deleted meanwhile (its deletion handler removed the
        tag under the same lock, and must not see it written again)."""
        async with self.run.rt.model_lock(self.run.model):
            if self.run.subject.uid in self.run.rt.deleted_runs:
                return
            await self.run.mlflow(write_traffic, self.run.model, document)

    # ---------------------------------------------------------------- one tick

    async def tick(self) -> None:
        run, traffic = self.run, self.traffic
        champion = await run.mlflow(tracking.champion_version, run.model)
        if champion == traffic.candidate:
            # The alias already names the candidate: a promotion interrupted before its status was
            # recorded (or the version was made champion by hand). Finish it; nothing moves twice.
            await self.promote("the candidate is already the champion", "Promoted")
            return
        if await self.apply_override():
            return
        step = traffic.step or 0
        document = self.document(step)
        if await run.mlflow(read_traffic, run.model) != document:
            await self.write(document)
        if traffic.step_started_at is None:
            traffic.step_started_at = timestamp(self.now)
            traffic.applied_at = None
            traffic.weight = document.weight
        if traffic.applied_at is None and not await self.wait_applied(document):
            return
        hold = self.hold_seconds()
        held = held_seconds(traffic, self.now)
        if traffic.paused:
            self.say(f"{self.describe_step()}: paused after {held:.0f}s of {hold:.0f}s")
            return
        if held < hold:
            due = self.now + datetime.timedelta(seconds=hold - held)
            self.say(
                f"{self.describe_step()}: version {traffic.candidate} applied by every serving pod; "
                f"analysis at {timestamp(due)}"
            )
            return
        verdict = await self.analyse()
        if verdict is not None:
            await self.conclude(verdict, step, held, hold)

    async def conclude(self, verdict: Verdict, step: int, held: float, hold: float) -> None:
        """The analysis is in: extend the step, abort, go to the next step or promote."""
        traffic = self.traffic
        if not verdict.enough:
            if analysis.extension_left(held, hold):
                self.say(
                    f"{self.describe_step()}: too little traffic to judge yet ({verdict.summary()}); "
                    f"the step is extended up to {analysis.EXTENSION_FACTOR * hold:.0f}s"
                )
                traffic.last_analysis = "waiting for traffic"
                return
            self.record(verdict)
            await self.abort(
                "InsufficientTraffic",
                f"{self.describe_step()}: too little traffic after {held:.0f}s: {verdict.summary()}",
            )
            return
        self.record(verdict)
        if not verdict.passed:
            await self.abort("AnalysisFailed", f"{self.describe_step()}: {verdict.summary()}")
            return
        if step + 1 >= self.steps:
            await self.promote(f"every step passed; last: {verdict.summary()}", "AnalysisPassed")
            return
        self.next_step(step + 1)
        # The next weight at once rather than at the next tick: its step starts now.
        await self.write(self.document(step + 1))
        traffic.step_started_at = timestamp(self.now)
        self.say(f"{self.describe_step()}: the previous step passed ({verdict.summary()})")
        self.run.transition(
            None, "", event=Event("Normal", "StepPassed", f"step {step + 1} passed: {verdict.summary()}")
        )

    def next_step(self, step: int) -> None:
        traffic = self.traffic
        traffic.step = step
        traffic.weight = self.step_weight(step)
        traffic.step_started_at = None
        traffic.applied_at = None
        traffic.paused_seconds = 0.0
        if traffic.paused:
            traffic.paused_at = timestamp(self.now)

    async def wait_applied(self, document: TrafficDocument) -> bool:
        """Whether every serving target applies `document` now (and records when); aborts on timeout."""
        traffic = self.traffic
        model = self.run.model
        queries = {
            "targets": analysis.targets_query(model),
            "applied": analysis.applied_query(
                model, document.mode, document.stable, document.candidate, document.weight
            ),
        }
        try:
            answers = await query_all(
                self.run.rt.config.prometheus_url, queries, self.run.rt.config.prometheus_timeout_seconds
            )
            state = analysis.applied_state(answers["targets"], answers["applied"])
            seen = state.describe()
        except PrometheusError as error:
            state, seen = None, str(error)
        if state is not None and state.done:
            traffic.applied_at = timestamp(self.now)
            return True
        started = parse_timestamp(str(traffic.step_started_at))
        timeout = self.rollout.analysis.apply_timeout_seconds
        waited = (self.now - started).total_seconds()
        if waited > timeout:
            check = Check(
                analysis.CHECK_APPLY,
                None if state is None else float(state.applied),
                float(state.targets) if state is not None else 0.0,
                False,
            )
            self.record(Verdict(True, (check,)))
            await self.abort(
                "ApplyTimeout",
                f"{self.describe_step()}: the serving pods did not apply the new weight within "
                f"{timeout}s: {seen}",
            )
            return False
        self.say(f"{self.describe_step()}: waiting for every serving pod to apply it ({seen})")
        return False

    async def analyse(self) -> Verdict | None:
        traffic = self.traffic
        window = round((self.now - parse_timestamp(str(traffic.applied_at))).total_seconds())
        build = analysis.shadow_queries if self.shadow else analysis.canary_queries
        judge = analysis.judge_shadow if self.shadow else analysis.judge_canary
        try:
            answers = await query_all(
                self.run.rt.config.prometheus_url,
                build(self.scope(), window),
                self.run.rt.config.prometheus_timeout_seconds,
            )
        except PrometheusError as error:
            # Not the candidate's fault: the step waits (its weight stays) until Prometheus answers.
            self.say(f"{self.describe_step()}: the analysis is due but {error}")
            return None
        self.window = window
        return judge(answers, self.rollout.analysis)

    def record(self, verdict: Verdict) -> None:
        traffic = self.traffic
        step = traffic.step or 0
        traffic.analyses = [
            *traffic.analyses,
            AnalysisRecord(
                step=step,
                weight=self.step_weight(step),
                passed=verdict.passed,
                at=timestamp(self.now),
                window_seconds=self.window,
                checks=check_results(verdict.checks),
            ),
        ][-MAX_ANALYSES:]
        prefix = "shadow" if self.shadow else f"step {step + 1}"
        traffic.last_analysis = f"{prefix} {short_result(verdict)}"

    # ---------------------------------------------------------------- outcomes

    async def abort(self, reason: str, why: str) -> None:
        """All traffic back on stable at once; the alias was never moved."""
        run, traffic = self.run, self.traffic
        async with run.rt.model_lock(run.model):
            await run.mlflow(clear_traffic, run.model, self.key)
        traffic.weight = 0.0
        traffic.paused = False
        traffic.paused_at = None
        run.update.status.promoted = False
        message = (
            f"{traffic.strategy} of version {traffic.candidate} aborted: {why}; all traffic is back on "
            f"version {traffic.stable} and the {CHAMPION_ALIAS} alias was not moved"
        )
        run.transition(
            Phase.ABORTED,
            message,
            Change(Condition.ANALYSIS, False, reason, why),
            Change(Condition.PROMOTED, False, reason, why),
            event=Event("Warning", "RolloutAborted", message),
        )

    async def promote(self, why: str, reason: str) -> None:
        """The alias moves to the candidate (once), the tag goes to 100%, and the Deployments roll."""
        run, traffic = self.run, self.traffic
        async with run.rt.model_lock(run.model):
            move = await run.mlflow(promote_candidate, run.model, run.version, str(traffic.stable))
            if isinstance(move, str):
                await self._abort_locked_out(move)
                return
            run.rt.failpoints.crash_after("after-alias-move", run.subject.logger)
            await run.mlflow(write_traffic, run.model, self.document(self.steps))
        status = run.update.status
        status.promoted = True
        if move.replaced_version is not None:
            status.previous_champion_version = move.replaced_version
        traffic.step = self.steps
        traffic.weight = 100.0
        traffic.paused = False
        traffic.paused_at = None
        if reason == "ManualPromote":
            traffic.last_analysis = "promoted by hand"
        elif reason == "Promoted":
            # Finished after a restart: the last analysis may not have been recorded before it.
            traffic.last_analysis = "promoted"
        message = f"version {run.version} is the champion of {run.model}: {why}"
        run.transition(
            Phase.ROLLING_OUT,
            message,
            Change(Condition.ANALYSIS, True, reason, why),
            Change(Condition.PROMOTED, True, reason, why),
            event=Event("Normal", "Promoted", message),
        )

    async def _abort_locked_out(self, why: str) -> None:
        self.record(Verdict(True, (Check(analysis.CHECK_CHAMPION, None, 0.0, False),)))
        await self.abort("ChampionChanged", why)

    # ---------------------------------------------------------------- the manual override

    async def apply_override(self) -> bool:
        """Applies the rollout-action annotation, if any; True when it ended the tick (abort, promote)."""
        run, traffic = self.run, self.traffic
        annotations = run.subject.body.get("metadata", {}).get("annotations") or {}
        raw = annotations.get(ROLLOUT_ACTION_ANNOTATION)
        if raw is None:
            return False
        run.update.removed_annotations.add(ROLLOUT_ACTION_ANNOTATION)
        action = str(raw).strip().lower()
        if action not in ACTIONS:
            run.transition(
                None,
                "",
                event=Event(
                    "Warning",
                    "UnknownRolloutAction",
                    f"{ROLLOUT_ACTION_ANNOTATION}={raw!r} ignored: use one of {', '.join(ACTIONS)}",
                ),
            )
            return False
        traffic.overrides = [
            *traffic.overrides,
            OverrideRecord(action=action, at=timestamp(self.now)),
        ][-MAX_OVERRIDES:]
        note = f"{ROLLOUT_ACTION_ANNOTATION}={action} at {self.describe_step()}"
        if action == "abort":
            self.record(Verdict(True, (Check(analysis.CHECK_MANUAL, None, 0.0, False),)))
            await self.abort("ManualAbort", f"aborted by hand ({note})")
            return True
        if action == "promote":
            await self.promote(f"promoted by hand ({note}), skipping the remaining steps", "ManualPromote")
            return True
        if action == "pause" and not traffic.paused:
            traffic.paused = True
            traffic.paused_at = timestamp(self.now)
        elif action == "resume" and traffic.paused:
            if traffic.applied_at is not None and traffic.paused_at is not None:
                since = max(parse_timestamp(traffic.paused_at), parse_timestamp(traffic.applied_at))
                traffic.paused_seconds = (traffic.paused_seconds or 0.0) + max(
                    (self.now - since).total_seconds(), 0.0
                )
            traffic.paused = False
            traffic.paused_at = None
        reason = {"pause": "RolloutPaused", "resume": "RolloutResumed"}[action]
        run.transition(None, "", event=Event("Normal", reason, note))
        return False
