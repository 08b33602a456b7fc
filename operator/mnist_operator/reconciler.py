"""The TrainingRun state machine: Pending → Training → Evaluating → RollingOut → Promoted, or
Rejected, RolledBack, Failed.

`create_job` takes a new TrainingRun to Training; `reconcile` is one timer tick, which looks at the
world and moves the run on (`Run`, one method per phase). Every move goes through `transition()`,
which sets the phase, the conditions and posts the event together. All state lives in the
TrainingRun's status and in the MLflow registry, never only in memory, so a restarted operator
carries on where the last one stopped.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import kopf
from kubernetes.aio.client.exceptions import ApiException
from pydantic import ValidationError

from contract.promotion import PromotionOutcome
from contract.registry import AliasMove
from contract.spec import CHAMPION_ALIAS, RolloutStrategy, TrainingRunSpec
from mnist_operator import progressive, registry_sync, tracing, tracking
from mnist_operator.builders import (
    build_job_spec,
    build_rollout_patch,
    build_workers_service,
    job_name,
    model_uri_of,
    pinned_model_uri,
    served_version,
    serving_containers,
    serving_label_selector,
)
from mnist_operator.jobs import (
    ResultError,
    failure_message,
    job_is_running,
    job_is_suspended,
    job_outcome,
    training_result,
)
from mnist_operator.kube import ConflictError
from mnist_operator.rollouts import RolloutState, rollout_state, traceparent_of, with_traceparent
from mnist_operator.runtime import Runtime
from mnist_operator.status import (
    Change,
    Condition,
    Event,
    Phase,
    Progress,
    RolloutEntry,
    RolloutRecord,
    StatusUpdate,
    TrafficStatus,
    parse_timestamp,
    progress_status,
    timestamp,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

Logger = logging.Logger | logging.LoggerAdapter[Any]
JobStatuses = Mapping[tuple[str, str], Iterable[Mapping[str, Any]]]
# Steps one reconcile tick may take in a row (Training → Evaluating → RollingOut).
MAX_STEPS_PER_TICK = 3
P = ParamSpec("P")
T = TypeVar("T")


def transition(
    update: StatusUpdate,
    body: kopf.Body,
    phase: Phase | None,
    message: str,
    *changes: Change,
    event: Event | None = None,
) -> None:
    """THE way the run moves: the phase and its message, the conditions, and the event, together."""
    if phase is not None:
        update.phase(phase, message)
    for change in changes:
        update.condition(change.type, change.status, change.reason, change.message)
    if event is not None:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


@dataclass(frozen=True)
class Subject:
    """The TrainingRun a handler runs for, as kopf hands it over."""

    name: str
    namespace: str
    uid: str
    body: kopf.Body
    logger: Logger

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _api_error_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)


# ------------------------------------------------------------------------ creation


def _fail(run: Subject, update: StatusUpdate, reason: str, message: str) -> None:
    transition(
        update,
        run.body,
        Phase.FAILED,
        message,
        Change(Condition.JOB_CREATED, False, reason, message),
        event=Event("Warning", reason, message),
    )


async def create_job(rt: Runtime, run: Subject, spec: Mapping[str, Any], update: StatusUpdate) -> None:
    """Pending → Training: the Job is created (or an earlier attempt's adopted)."""
    try:
        run_spec = TrainingRunSpec.model_validate(dict(spec))
    except ValidationError as error:
        _fail(run, update, "InvalidSpec", f"the spec is invalid: {error}")
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    job = build_job_spec(name=run.name, namespace=run.namespace, uid=run.uid, spec=run_spec, config=rt.config)
    name = str(job["metadata"]["name"])
    job_ref = f"{run.namespace}/{name}"
    try:
        if run_spec.workers > 1:
            # Before the Job, so the workers' DNS names resolve as soon as their pods start.
            await rt.kube.create_service(
                build_workers_service(name=run.name, namespace=run.namespace, uid=run.uid)
            )
        await rt.kube.create_job(job)
        reason, message = "Created", f"created Job {job_ref}"
    except ConflictError:
        reason, message = await _adopt_job(rt, run, update, name)
    except ApiException as error:
        detail = _api_error_message(error)
        if error.status in {400, 422}:
            _fail(run, update, "JobRejected", f"the API server rejected the Job {job_ref}: {detail}")
            raise kopf.PermanentError(detail) from error
        transition(
            update,
            run.body,
            Phase.PENDING,
            f"cannot create the Job yet: {detail}",
            Change(Condition.JOB_CREATED, False, "CreateFailed", f"creating Job {job_ref} failed: {detail}"),
        )
        raise kopf.TemporaryError(f"creating Job {job_ref} failed: {detail}", delay=15) from error
    rt.failpoints.crash_after("after-job-create", run.logger)
    update.status.job_name = name
    update.status.start_time = timestamp(update.now)
    # No event for an ordinary create: the JobCreated condition and the Job controller's own events tell
    # it, and at 1,000 runs an event each is 1,000 API writes (bench/operator.py); adopting an earlier
    # attempt's Job is unusual enough to post.
    created_event = Event("Normal", "JobAdopted", message) if reason == "Adopted" else None
    if run_spec.queue_name:
        transition(
            update,
            run.body,
            Phase.QUEUED,
            f"Job {job_ref} waits in queue {run_spec.queue_name} for Kueue to admit it",
            Change(Condition.JOB_CREATED, True, reason, message),
            Change(Condition.ADMITTED, False, "Queued", f"suspended in LocalQueue {run_spec.queue_name}"),
            event=created_event,
        )
        return
    transition(
        update,
        run.body,
        Phase.TRAINING,
        f"training in Job {job_ref}",
        Change(Condition.JOB_CREATED, True, reason, message),
        event=created_event,
    )


async def _adopt_job(rt: Runtime, run: Subject, update: StatusUpdate, name: str) -> tuple[str, str]:
    """409 on create: the Job exists. Ours (an earlier attempt made it) → adopt; else explain."""
    existing = await rt.kube.read_job(run.namespace, name)
    if existing is None:
        raise kopf.TemporaryError(
            f"Job {run.namespace}/{name} existed a moment ago but is gone; retrying", delay=1
        )
    owners = existing.get("metadata", {}).get("ownerReferences") or []
    if any(owner.get("uid") == run.uid for owner in owners):
        return "Adopted", f"adopted Job {run.namespace}/{name}, created by an earlier attempt"
    if any(owner.get("kind") == "TrainingRun" for owner in owners):
        # A deleted TrainingRun of the same name: the garbage collector is about to remove its Job.
        raise kopf.TemporaryError(
            f"waiting for the old Job {run.namespace}/{name} to be garbage-collected", delay=5
        )
    message = f"Job {run.namespace}/{name} already exists and does not belong to this TrainingRun"
    _fail(run, update, "JobNameTaken", message)
    raise kopf.PermanentError(message)


# ------------------------------------------------------------------------ the reconcile tick


async def reconcile(
    rt: Runtime,
    subject: Subject,
    *,
    spec: Mapping[str, Any],
    update: StatusUpdate,
    jobs: JobStatuses,
    retry: int,
) -> None:
    """One timer tick: as many steps as the world allows (up to MAX_STEPS_PER_TICK)."""
    run = Run(rt, subject, TrainingRunSpec.model_validate(dict(spec)), update, jobs)
    try:
        for _step in range(MAX_STEPS_PER_TICK):
            phase = update.status.phase
            if phase == Phase.QUEUED:
                await run.observe_queue()
            elif phase == Phase.TRAINING:
                await run.observe_training()
            elif phase == Phase.EVALUATING:
                await run.evaluate()
            elif phase in progressive.PROGRESSIVE_PHASES:
                await progressive.Progressive(run).tick()
            elif phase == Phase.ROLLING_OUT:
                await run.roll_out()
            if update.status.phase == phase:
                break
    except tracking.MlflowUnavailableError as error:
        message = f"MLflow at {rt.config.mlflow_tracking_uri} is unreachable: {error}"
        first = update.current.condition_status(Condition.MLFLOW_REACHABLE) != "False"
        transition(
            update,
            subject.body,
            None,
            message,
            Change(Condition.MLFLOW_REACHABLE, False, "Unreachable", message),
            event=Event("Warning", "MlflowUnreachable", message) if first else None,
        )
        delay = min(rt.config.mlflow_backoff_seconds * 2**retry, rt.config.mlflow_max_backoff_seconds)
        raise kopf.TemporaryError(message, delay=delay) from error
    except tracking.MlflowDataError as error:
        message = f"MLflow cannot provide what this run needs: {error}"
        transition(
            update, subject.body, Phase.FAILED, message, event=Event("Warning", "MlflowDataError", message)
        )
        raise kopf.PermanentError(message) from error


@dataclass
class Run:
    """One reconcile tick of one TrainingRun: each step reads the world and records what it saw."""

    rt: Runtime
    subject: Subject
    spec: TrainingRunSpec
    update: StatusUpdate
    jobs: JobStatuses

    @property
    def model(self) -> str:
        return self.spec.registered_model

    @property
    def version(self) -> str:
        return str(self.update.status.model_version)

    @property
    def namespace(self) -> str:
        return self.subject.namespace

    def transition(
        self, phase: Phase | None, message: str, *changes: Change, event: Event | None = None
    ) -> None:
        transition(self.update, self.subject.body, phase, message, *changes, event=event)

    def trace_step(
        self, name: str, *, root: bool = False, start: datetime.datetime | None = None
    ) -> AbstractContextManager[tracing.Trace]:
        """A span of this run's promotion trace; `tracing.NO_TRACE` while tracing is off."""
        return tracing.step(
            self.rt.config.otlp_endpoint,
            name,
            None if root else self.update.status.traceparent,
            {
                "k8s.namespace.name": self.namespace,
                "mnist.trainingrun.name": self.subject.name,
                "mnist.model.name": self.model,
                "mnist.model.version": self.version,
            },
            start=start,
        )

    async def mlflow(
        self, call: Callable[Concatenate[MlflowClient, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`call(client, *args)` in a worker thread (the MLflow client blocks); an answer means MLflow
        is reachable again."""
        result = await asyncio.to_thread(call, self.rt.mlflow, *args, **kwargs)
        reachable = f"MLflow at {self.rt.config.mlflow_tracking_uri} answers"
        was_down = self.update.current.condition_status(Condition.MLFLOW_REACHABLE) == "False"
        self.transition(
            None,
            reachable,
            Change(Condition.MLFLOW_REACHABLE, True, "Reachable", reachable),
            event=Event("Normal", "MlflowReachable", "MLflow answers again") if was_down else None,
        )
        return result

    async def job_status(self, job: str) -> Mapping[str, Any] | None:
        for status in self.jobs.get((self.namespace, job), ()):
            return dict(status)
        # Not indexed (yet): ask the API server, whose answer is authoritative.
        found = await self.rt.kube.read_job(self.namespace, job)
        return None if found is None else dict(found.get("status") or {})

    # -------------------------------------------------------------------- Training

    async def observe_queue(self) -> None:
        """Queued → Training once Kueue admits the Job by unsuspending it (a deleted Job is the
        training step's to report)."""
        job = self.update.status.job_name or job_name(self.subject.name)
        # The Job's spec, not its status: the Suspended condition appears only once the Job controller
        # has seen the Job, and a queued run must not read its absence as an admission.
        found = await self.rt.kube.read_job(self.namespace, job)
        if found is not None and job_is_suspended(found):
            return
        message = f"admitted: training in Job {self.namespace}/{job}"
        self.transition(
            Phase.TRAINING,
            message,
            Change(Condition.ADMITTED, True, "Admitted", message),
            event=Event("Normal", "Admitted", message),
        )

    async def observe_training(self) -> None:
        job = self.update.status.job_name or job_name(self.subject.name)
        job_status = await self.job_status(job)
        if job_status is None:
            message = f"the Job {self.namespace}/{job} was deleted before it finished"
            self.transition(
                Phase.FAILED,
                message,
                Change(Condition.TRAINED, False, "JobDeleted", message),
                event=Event("Warning", "JobDeleted", message),
            )
            return
        outcome = job_outcome(job_status)
        if not outcome.finished:
            if job_is_running(job_status) and self.rt.progress_due(self.subject.uid):
                await self.record_progress()
            return
        pods = await self.rt.kube.list_pods(self.namespace, f"batch.kubernetes.io/job-name={job}")
        self.update.status.completion_time = timestamp(self.update.now)
        if outcome.failed:
            message = failure_message(outcome, pods)
            self.transition(
                Phase.FAILED,
                f"training failed: {message}",
                Change(Condition.TRAINED, False, outcome.reason or "JobFailed", message),
                event=Event("Warning", "TrainingFailed", message),
            )
            return
        try:
            result = training_result(pods)
        except ResultError as error:
            self.transition(
                Phase.FAILED,
                f"training succeeded but its result is unreadable: {error}",
                Change(Condition.TRAINED, False, "NoResult", str(error)),
                event=Event("Warning", "NoResult", str(error)),
            )
            return
        summary = ", ".join(
            f"{key}={value:.4f}" for key, value in sorted(result.metrics.items()) if "accuracy" in key
        )
        message = f"registered {result.registered_model} version {result.model_version} ({summary})"
        status = self.update.status
        status.mlflow_run_id = result.run_id
        status.model_version = result.model_version
        # JSON has no NaN: a metric that could not be computed is left out of the status.
        status.metrics = {key: float(value) for key, value in result.metrics.items() if math.isfinite(value)}
        epochs = self.spec.hyperparameters.epochs
        status.progress = (status.progress or Progress()).model_copy(
            update={"epoch": epochs, "epochs": epochs}
        )
        self.transition(
            Phase.EVALUATING,
            f"{message}; applying the promotion policy",
            Change(Condition.TRAINED, True, "JobSucceeded", message),
            event=Event("Normal", "Trained", message),
        )

    async def record_progress(self) -> None:
        try:
            progress = await self.mlflow(tracking.read_progress, self.spec.experiment, self.subject.uid)
        except tracking.MlflowDataError as error:
            # Progress is informative only: an odd answer must not fail the run.
            self.subject.logger.warning("cannot read the training progress from MLflow: %s", error)
            return
        if progress is None:
            return
        self.update.status.mlflow_run_id = progress.run_id
        self.update.status.progress = progress_status(
            progress.history, self.spec.hyperparameters.epochs, self.update.now
        )

    # -------------------------------------------------------------------- Evaluating

    async def evaluate(self) -> None:
        with self.trace_step("trainingrun.evaluate", root=True) as trace:
            await self._evaluate(trace)

    async def _evaluate(self, trace: tracing.Trace) -> None:
        strategy = progressive.strategy_of(self.spec, self.rt.config)
        async with self.rt.model_lock(self.model):
            if strategy is not RolloutStrategy.DIRECT:
                # Canary and shadow: the gate is judged without moving the alias, which moves only once
                # the live analysis passed (mnist_operator/progressive.py).
                outcome = await self.mlflow(progressive.judge, self.model, self.version, self.spec.promotion)
                if (
                    outcome.promoted
                    and outcome.move is None
                    and outcome.champion_version
                    and not outcome.resumed
                ):
                    self._record_judgement(outcome, trace)
                    await progressive.Progressive(self).start(
                        strategy, outcome.champion_version, outcome.reason
                    )
                    return
                if outcome.promoted and outcome.move is None and not outcome.resumed:
                    # No champion yet: nothing to compare live traffic with, so the version is promoted
                    # directly.
                    strategy = RolloutStrategy.DIRECT
                    outcome = await self.mlflow(
                        tracking.evaluate_and_promote, self.model, self.version, self.spec.promotion
                    )
            else:
                outcome = await self.mlflow(
                    tracking.evaluate_and_promote, self.model, self.version, self.spec.promotion
                )
            if outcome.move is not None:
                self.rt.failpoints.crash_after("after-alias-move", self.subject.logger)
        self.update.status.traffic = TrafficStatus(strategy=strategy.value)
        self._record_judgement(outcome, trace)
        self._after_judgement(outcome, trace)

    def _record_judgement(self, outcome: PromotionOutcome, trace: tracing.Trace) -> None:
        status = self.update.status
        status.promotion_reason = outcome.reason
        if outcome.champion_version is not None:
            status.champion_version = outcome.champion_version
        trace.set({"mnist.promoted": outcome.promoted, "mnist.promotion.reason": outcome.reason})
        if trace.traceparent is not None:
            status.traceparent, status.trace_id = trace.traceparent, tracing.trace_id(trace.traceparent)

    def _after_judgement(self, outcome: PromotionOutcome, trace: tracing.Trace) -> None:
        status = self.update.status
        status.promoted = outcome.promoted
        if not outcome.promoted:
            self.transition(
                Phase.REJECTED,
                f"not promoted: {outcome.reason}",
                Change(Condition.PROMOTED, False, "PolicyRejected", outcome.reason),
                event=Event(
                    "Normal",
                    "Rejected",
                    trace.message(f"version {self.version} not promoted: {outcome.reason}"),
                ),
            )
            return
        if outcome.move is not None and outcome.move.replaced_version is not None:
            status.previous_champion_version = outcome.move.replaced_version
        message = f"version {self.version} is the champion of {self.model}: {outcome.reason}"
        self.transition(
            Phase.ROLLING_OUT,
            message,
            Change(Condition.PROMOTED, True, "PolicyAccepted", outcome.reason),
            event=Event("Normal", "Promoted", trace.message(message)),
        )

    # -------------------------------------------------------------------- RollingOut

    async def roll_out(self) -> None:
        rollout = self.update.status.rollout
        if rollout is None:
            await self.start_rollout()
        else:
            await self.watch_rollout(rollout)

    async def start_rollout(self) -> None:
        with self.trace_step("trainingrun.rollout") as trace:
            await self._start_rollout(trace)

    async def _start_rollout(self, trace: tracing.Trace) -> None:
        async with self.rt.model_lock(self.model):
            champion = await self.mlflow(tracking.champion_version, self.model)
            if champion != self.version:
                message = (
                    f"version {self.version} was promoted, but the champion is now "
                    f"{champion or 'unset'}; serving is left to that promotion"
                )
                await self.release_traffic()
                self.transition(
                    Phase.PROMOTED, message, Change(Condition.ROLLED_OUT, False, "Superseded", message)
                )
                return
            selector = serving_label_selector(self.model, self.spec.serving_selector)
            deployments = await self.rt.kube.list_deployments(self.namespace, selector)
            if not deployments:
                message = f"version {self.version} is the champion; no serving Deployment matches {selector}"
                await self.release_traffic()
                self.transition(
                    Phase.PROMOTED,
                    message,
                    Change(Condition.ROLLED_OUT, True, "NoServingDeployments", message),
                )
                return
            plan = [await self._roll(deployment, trace) for deployment in sorted(deployments, key=_name_of)]
            self.rt.failpoints.crash_after("after-rollout-patch", self.subject.logger)
        deadline = self.update.now + datetime.timedelta(seconds=self.rt.config.rollout_timeout_seconds)
        self.update.status.rollout = RolloutRecord(
            started_at=timestamp(self.update.now), deadline=timestamp(deadline), deployments=plan
        )
        message = f"rolling {', '.join(entry.name for entry in plan)} to version {self.version}"
        self.transition(
            Phase.ROLLING_OUT,
            message,
            Change(Condition.ROLLED_OUT, False, "InProgress", message),
            event=Event("Normal", "RolloutStarted", trace.message(message)),
        )

    async def _roll(self, deployment: Mapping[str, Any], trace: tracing.Trace) -> RolloutEntry:
        """Pins one serving Deployment to the version; returns what it served before."""
        entry = RolloutEntry(name=_name_of(deployment))
        current = served_version(deployment, self.model)
        if current == self.version:
            # Already ours: an earlier attempt patched it and died before recording the plan.
            replaced = self.update.status.previous_champion_version
            if replaced:
                entry.previous_version = replaced
                entry.previous_model_uri = pinned_model_uri(self.model, replaced)
            return entry
        entry.previous_version = current or None
        entry.previous_model_uri = model_uri_of(deployment) or None
        entry.previous_traceparent = traceparent_of(deployment)
        pinned = pinned_model_uri(self.model, self.version)
        patch = build_rollout_patch(self.version, pinned, list(serving_containers(deployment)))
        if trace.traceparent is not None or entry.previous_traceparent is not None:
            # The pods of this rollout name its span; untraced, they name no earlier one either.
            patch = with_traceparent(patch, trace.traceparent)
        await self.rt.kube.patch_deployment(self.namespace, entry.name, patch)
        return entry

    async def release_traffic(self) -> None:
        """Removes this run's traffic tag once serving no longer needs it (a canary or shadow kept the
        candidate at 100% through the Deployments' rollout, so no user flipped back to stable). The
        caller holds the model lock."""
        traffic = self.update.status.traffic
        if traffic is None or traffic.strategy == RolloutStrategy.DIRECT.value:
            return
        await self.mlflow(progressive.clear_traffic, self.model, self.subject.key)

    async def watch_rollout(self, rollout: RolloutRecord) -> None:
        states: list[RolloutState] = []
        rolled: list[dict[str, Any]] = []
        for entry in rollout.deployments:
            deployment = await self.rt.kube.read_deployment(self.namespace, entry.name)
            if deployment is None:
                states.append(RolloutState(True, False, f"{entry.name}: deleted"))
            elif served_version(deployment, self.model) != self.version:
                states.append(RolloutState(True, False, f"{entry.name}: since rolled to another version"))
            else:
                states.append(rollout_state(deployment))
                rolled.append(deployment)
        failed = [state for state in states if state.failed]
        done = all(state.done for state in states)
        unconfirmed = ""
        if done and self.rt.config.confirm_from_pods:
            # Available replicas say the pods started, not what they serve: their own /health does.
            unconfirmed = await self.unconfirmed(rolled)
            done = not unconfirmed
        if not done and not failed and self.update.now < parse_timestamp(rollout.deadline):
            if unconfirmed:
                self.update.phase(
                    Phase.ROLLING_OUT,
                    f"rolled out to version {self.version}; waiting for its pods to confirm it: "
                    + unconfirmed,
                )
            return
        # One span for the whole wait, backdated to the patch: what the ticks in between watched.
        with self.trace_step("trainingrun.rollout.wait", start=parse_timestamp(rollout.started_at)) as trace:
            trace.set({"mnist.rollout.deployments": ", ".join(entry.name for entry in rollout.deployments)})
            if done:
                message = "; ".join(state.message for state in states)
                if self.rt.config.confirm_from_pods and rolled:
                    message += f"; every ready pod reports version {self.version} on /health"
                async with self.rt.model_lock(self.model):
                    await self.release_traffic()
                self.transition(
                    Phase.PROMOTED,
                    f"version {self.version} is serving: {message}",
                    Change(Condition.ROLLED_OUT, True, "Available", message),
                    event=Event("Normal", "RolledOut", trace.message(message)),
                )
                return
            pending = "; ".join(state.message for state in states if not state.done) or unconfirmed
            reason = (
                "ProgressDeadlineExceeded"
                if failed
                else "VersionUnconfirmed"
                if unconfirmed
                else "RolloutTimeout"
            )
            trace.fail(reason)
            await self.roll_back(
                rollout, reason, f"serving did not become available by {rollout.deadline}: {pending}", trace
            )

    async def unconfirmed(self, deployments: Iterable[Mapping[str, Any]]) -> str:
        """What keeps the rolled Deployments' pods from confirming the version ("" once every ready pod
        of each reports it on /health, through the API server's pod proxy as the registry sync asks)."""
        waiting = []
        for deployment in deployments:
            if int(deployment.get("spec", {}).get("replicas", 1) or 0) == 0:
                continue
            reports = await registry_sync.ask_deployment(self.rt.kube, deployment)
            verdict = registry_sync.judge(self.version, reports)
            if not verdict.confirmed:
                confirmed = sum(report.error is None and report.version == self.version for report in reports)
                waiting.append(
                    f"{_name_of(deployment)}: {confirmed} of {len(reports)} ready pod(s) confirmed version "
                    f"{self.version} ({verdict.message})"
                )
        return "; ".join(waiting)

    async def roll_back(self, rollout: RolloutRecord, reason: str, why: str, trace: tracing.Trace) -> None:
        replaced = self.update.status.previous_champion_version
        async with self.rt.model_lock(self.model):
            restored = await self.mlflow(
                tracking.restore_champion, AliasMove(self.model, self.version, replaced)
            )
            for entry in rollout.deployments:
                deployment = await self.rt.kube.read_deployment(self.namespace, entry.name)
                if deployment is None or served_version(deployment, self.model) != self.version:
                    continue
                previous = entry.previous_version
                # The URI the pods had before; a plan recorded without one (an older operator) gets the
                # replaced version pinned, or the alias when there was none.
                uri = entry.previous_model_uri or (
                    pinned_model_uri(self.model, previous)
                    if previous
                    else f"models:/{self.model}@{CHAMPION_ALIAS}"
                )
                patch = build_rollout_patch(previous, uri, list(serving_containers(deployment)))
                if traceparent_of(deployment) is not None or entry.previous_traceparent is not None:
                    # The template as it was, annotation included: the Deployment goes back to that
                    # revision's ReplicaSet, as `kubectl rollout undo` would.
                    patch = with_traceparent(patch, entry.previous_traceparent)
                await self.rt.kube.patch_deployment(self.namespace, entry.name, patch)
            await self.release_traffic()
        if not restored:
            alias = "the champion alias had already moved on and was left alone"
        elif replaced:
            alias = f"the champion alias is back on version {replaced}"
        else:
            alias = "there was no earlier champion, so the champion alias was removed"
        message = f"{why}; {alias} and the serving pods' model was restored"
        self.transition(
            Phase.ROLLED_BACK,
            message,
            Change(Condition.ROLLED_OUT, False, reason, why),
            Change(Condition.ROLLED_BACK, True, reason, message),
            event=Event("Warning", "RolledBack", trace.message(message)),
        )


def _name_of(deployment: Mapping[str, Any]) -> str:
    return str(deployment["metadata"]["name"])
