"""kopf handlers: thin glue between kopf's watch of TrainingRuns and the pure builders and status logic.

One handler creates the Job (`create_job`); one timer per active TrainingRun (`reconcile`) looks at
the world on each tick and moves the run on: Training → Evaluating → RollingOut → Promoted, or to
Rejected, RolledBack or Failed. All state lives in the TrainingRun's status and in the MLflow
registry, never only in memory, so a restarted operator carries on where the last one stopped.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf
from kubernetes.aio.client.exceptions import ApiException
from pydantic import ValidationError

from mnist_operator import tracking
from mnist_operator.builders import (
    MANAGED_BY_LABEL,
    OPERATOR_NAME,
    build_job_spec,
    build_rollout_patch,
    job_name,
    model_uri_of,
    pinned_model_uri,
    served_version,
    serving_containers,
    serving_label_selector,
)
from mnist_operator.config import OperatorConfig
from mnist_operator.kube import ConflictError, Kube, api_client
from mnist_operator.status import (
    ACTIVE_PHASES,
    Condition,
    Phase,
    ResultError,
    RolloutState,
    StatusUpdate,
    condition_status,
    failure_message,
    job_is_running,
    job_outcome,
    parse_timestamp,
    progress_status,
    rollout_state,
    timestamp,
    training_result,
)
from training_job.registry import AliasMove
from training_job.spec import API_GROUP, API_VERSION, CHAMPION_ALIAS, PLURAL, TrainingRunSpec

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TRAININGRUNS = (API_GROUP, API_VERSION, PLURAL)
Logger = logging.Logger | logging.LoggerAdapter[Any]
JOBS_INDEX = "training_jobs"
FAILPOINT_EXIT_CODE = 86
# Steps one reconcile tick may take in a row (Training → Evaluating → RollingOut).
MAX_STEPS_PER_TICK = 3
RETRY_BACKOFF_SECONDS = 5.0


@dataclass
class Runtime:
    """What the handlers share, built once at start-up and kept in kopf's memo."""

    config: OperatorConfig
    kube: Kube
    mlflow: MlflowClient
    model_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    progress_read_at: dict[str, float] = field(default_factory=dict)
    last_tick: float = field(default_factory=time.monotonic)

    def model_lock(self, model: str) -> asyncio.Lock:
        """Promotions and rollouts of one registered model happen one at a time, so two runs that
        finish together cannot both be judged against the same champion."""
        return self.model_locks.setdefault(model, asyncio.Lock())

    def progress_due(self, uid: str) -> bool:
        now = time.monotonic()
        if now - self.progress_read_at.get(uid, float("-inf")) < self.config.progress_interval_seconds:
            return False
        self.progress_read_at[uid] = now
        return True

    def failpoint(self, name: str, logger: Logger) -> None:
        if self.config.failpoint == name:
            logger.critical("failpoint %s reached: exiting abruptly, as a crash would", name)
            logging.shutdown()
            os._exit(FAILPOINT_EXIT_CODE)


def runtime(memo: Any) -> Runtime:
    found = memo.get("runtime")
    if not isinstance(found, Runtime):
        raise kopf.TemporaryError("the operator is still starting up", delay=1)
    return found


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Registers every handler on `registry`; the timer's interval comes from the configuration."""
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.probe(id="reconciler", registry=registry)(probe)
    kopf.index(
        "batch", "v1", "jobs", id=JOBS_INDEX, labels={MANAGED_BY_LABEL: OPERATOR_NAME}, registry=registry
    )(index_job)
    # Unexpected errors (an API hiccup) are retried after RETRY_BACKOFF_SECONDS, not kopf's minute.
    kopf.on.create(*TRAININGRUNS, backoff=RETRY_BACKOFF_SECONDS, registry=registry)(create_job)
    kopf.timer(
        *TRAININGRUNS,
        id="reconcile",
        interval=config.reconcile_interval_seconds,
        when=is_active,
        backoff=RETRY_BACKOFF_SECONDS,
        registry=registry,
    )(reconcile)


async def configure(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    config = memo["config"]
    assert isinstance(config, OperatorConfig)
    # kopf's bookkeeping goes into annotations under our own prefix, not into the structural status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{API_GROUP}/operator"
    # The handlers post their own events; only kopf's warnings and errors become events too.
    settings.posting.level = logging.WARNING
    # No CRD watching: the resources are known, and it would need cluster-wide read of CRDs.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    tracking.configure_client_environment(config.mlflow_timeout_seconds)
    mlflow = await asyncio.to_thread(tracking.make_client, config.mlflow_tracking_uri)
    memo["runtime"] = Runtime(config=config, kube=Kube(await api_client()), mlflow=mlflow)


async def cleanup(*, memo: Any, **_: Any) -> None:
    found = memo.get("runtime")
    if isinstance(found, Runtime):
        await found.kube.close()


async def probe(*, memo: Any, **_: Any) -> dict[str, Any]:
    rt = runtime(memo)
    return {"identity": rt.config.identity, "secondsSinceLastTick": round(time.monotonic() - rt.last_tick, 1)}


async def index_job(
    *, name: str, namespace: str | None, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """The status of every Job this operator made, kept current by kopf's watch: no polling."""
    return {(namespace or "", name): dict(status)}


def is_active(*, status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") in ACTIVE_PHASES


def parse_spec(spec: kopf.Spec) -> TrainingRunSpec:
    return TrainingRunSpec.model_validate(dict(spec))


def _api_error_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)


async def create_job(
    *,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: Any,
    logger: Logger,
    **_: Any,
) -> None:
    assert namespace is not None, "TrainingRuns are namespaced"
    rt = runtime(memo)
    update = StatusUpdate(status, int(meta.get("generation") or 1))
    try:
        run_spec = parse_spec(spec)
    except ValidationError as error:
        fail(update, patch, body, "InvalidSpec", f"the spec is invalid: {error}")
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    job = build_job_spec(name=name, namespace=namespace, uid=uid, spec=run_spec, config=rt.config)
    job_ref = f"{namespace}/{job['metadata']['name']}"
    try:
        await rt.kube.create_job(job)
        reason, message = "Created", f"created Job {job_ref}"
    except ConflictError:
        reason, message = await adopt_job(
            rt,
            namespace=namespace,
            name=job["metadata"]["name"],
            uid=uid,
            update=update,
            patch=patch,
            body=body,
        )
    except ApiException as error:
        detail = _api_error_message(error)
        if error.status in {400, 422}:
            fail(update, patch, body, "JobRejected", f"the API server rejected the Job {job_ref}: {detail}")
            raise kopf.PermanentError(detail) from error
        update.phase(Phase.PENDING, f"cannot create the Job yet: {detail}")
        update.condition(
            Condition.JOB_CREATED, False, "CreateFailed", f"creating Job {job_ref} failed: {detail}"
        )
        patch.status.update(update.patch())
        raise kopf.TemporaryError(f"creating Job {job_ref} failed: {detail}", delay=15) from error
    rt.failpoint("after-job-create", logger)
    update.set(jobName=job["metadata"]["name"], startTime=timestamp(update.now))
    update.phase(Phase.TRAINING, f"training in Job {job_ref}")
    update.condition(Condition.JOB_CREATED, True, reason, message)
    patch.status.update(update.patch())
    kopf.event(body, type="Normal", reason=f"Job{reason}", message=message)


async def adopt_job(
    rt: Runtime,
    *,
    namespace: str,
    name: str,
    uid: str,
    update: StatusUpdate,
    patch: kopf.Patch,
    body: kopf.Body,
) -> tuple[str, str]:
    """409 on create: the Job exists. Ours (an earlier attempt made it) → adopt; else explain."""
    existing = await rt.kube.read_job(namespace, name)
    if existing is None:
        raise kopf.TemporaryError(
            f"Job {namespace}/{name} existed a moment ago but is gone; retrying", delay=1
        )
    owners = existing.get("metadata", {}).get("ownerReferences") or []
    if any(owner.get("uid") == uid for owner in owners):
        return "Adopted", f"adopted Job {namespace}/{name}, created by an earlier attempt"
    if any(owner.get("kind") == "TrainingRun" for owner in owners):
        # A deleted TrainingRun of the same name: the garbage collector is about to remove its Job.
        raise kopf.TemporaryError(
            f"waiting for the old Job {namespace}/{name} to be garbage-collected", delay=5
        )
    message = f"Job {namespace}/{name} already exists and does not belong to this TrainingRun"
    fail(update, patch, body, "JobNameTaken", message)
    raise kopf.PermanentError(message)


def fail(update: StatusUpdate, patch: kopf.Patch, body: kopf.Body, reason: str, message: str) -> None:
    update.phase(Phase.FAILED, message)
    update.condition(Condition.JOB_CREATED, False, reason, message)
    patch.status.update(update.patch())
    kopf.event(body, type="Warning", reason=reason, message=message)


async def reconcile(
    *,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: Any,
    logger: Logger,
    retry: int = 0,
    training_jobs: kopf.Index[tuple[str, str], dict[str, Any]] | None = None,
    **_: Any,
) -> None:
    assert namespace is not None, "TrainingRuns are namespaced"
    assert training_jobs is not None, f"kopf passes the {JOBS_INDEX} index"
    rt = runtime(memo)
    rt.last_tick = time.monotonic()
    run = Run(
        rt=rt,
        name=name,
        namespace=namespace,
        uid=uid,
        spec=parse_spec(spec),
        body=body,
        logger=logger,
        update=StatusUpdate(status, int(meta.get("generation") or 1)),
        jobs=training_jobs,
    )
    try:
        for _step in range(MAX_STEPS_PER_TICK):
            phase = run.update.get("phase")
            if phase == Phase.TRAINING:
                await run.observe_training()
            elif phase == Phase.EVALUATING:
                await run.evaluate()
            elif phase == Phase.ROLLING_OUT:
                await run.roll_out()
            if run.update.get("phase") == phase:
                break
    except tracking.MlflowUnavailableError as error:
        message = f"MLflow at {rt.config.mlflow_tracking_uri} is unreachable: {error}"
        if condition_status(status, Condition.MLFLOW_REACHABLE) != "False":
            kopf.event(body, type="Warning", reason="MlflowUnreachable", message=message)
        run.update.condition(Condition.MLFLOW_REACHABLE, False, "Unreachable", message)
        patch.status.update(run.update.patch())
        delay = min(rt.config.mlflow_backoff_seconds * 2**retry, rt.config.mlflow_max_backoff_seconds)
        raise kopf.TemporaryError(message, delay=delay) from error
    except tracking.MlflowDataError as error:
        message = f"MLflow cannot provide what this run needs: {error}"
        run.update.phase(Phase.FAILED, message)
        patch.status.update(run.update.patch())
        kopf.event(body, type="Warning", reason="MlflowDataError", message=message)
        raise kopf.PermanentError(message) from error
    patch.status.update(run.update.patch())


@dataclass
class Run:
    """One reconcile tick of one TrainingRun: each step reads the world and records what it saw."""

    rt: Runtime
    name: str
    namespace: str
    uid: str
    spec: TrainingRunSpec
    body: kopf.Body
    logger: Logger
    update: StatusUpdate
    jobs: kopf.Index[tuple[str, str], dict[str, Any]]

    @property
    def model(self) -> str:
        return self.spec.registered_model

    @property
    def version(self) -> str:
        return str(self.update.get("modelVersion"))

    def event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message)

    async def mlflow(self, call: Any, *args: Any) -> Any:
        result = await asyncio.to_thread(call, self.rt.mlflow, *args)
        if condition_status(self.update.current, Condition.MLFLOW_REACHABLE) == "False":
            self.event("Normal", "MlflowReachable", "MLflow answers again")
        self.update.condition(
            Condition.MLFLOW_REACHABLE,
            True,
            "Reachable",
            f"MLflow at {self.rt.config.mlflow_tracking_uri} answers",
        )
        return result

    async def job_status(self, job: str) -> dict[str, Any] | None:
        for status in self.jobs.get((self.namespace, job), ()):
            return status
        # Not indexed (yet): ask the API server, whose answer is authoritative.
        found = await self.rt.kube.read_job(self.namespace, job)
        return None if found is None else dict(found.get("status") or {})

    async def observe_training(self) -> None:
        job = str(self.update.get("jobName") or job_name(self.name))
        job_status = await self.job_status(job)
        if job_status is None:
            message = f"the Job {self.namespace}/{job} was deleted before it finished"
            self.update.phase(Phase.FAILED, message)
            self.update.condition(Condition.TRAINED, False, "JobDeleted", message)
            self.event("Warning", "JobDeleted", message)
            return
        outcome = job_outcome(job_status)
        if not outcome.finished:
            if job_is_running(job_status) and self.rt.progress_due(self.uid):
                await self.record_progress()
            return
        pods = await self.rt.kube.list_pods(self.namespace, f"batch.kubernetes.io/job-name={job}")
        self.update.set(completionTime=timestamp(self.update.now))
        if outcome.failed:
            message = failure_message(outcome, pods)
            self.update.phase(Phase.FAILED, f"training failed: {message}")
            self.update.condition(Condition.TRAINED, False, outcome.reason or "JobFailed", message)
            self.event("Warning", "TrainingFailed", message)
            return
        try:
            result = training_result(pods)
        except ResultError as error:
            self.update.phase(Phase.FAILED, f"training succeeded but its result is unreadable: {error}")
            self.update.condition(Condition.TRAINED, False, "NoResult", str(error))
            self.event("Warning", "NoResult", str(error))
            return
        summary = ", ".join(
            f"{key}={value:.4f}" for key, value in sorted(result.metrics.items()) if "accuracy" in key
        )
        message = f"registered {result.registered_model} version {result.model_version} ({summary})"
        self.update.set(
            mlflowRunId=result.run_id,
            modelVersion=result.model_version,
            # JSON has no NaN: a metric that could not be computed is left out of the status.
            metrics={key: float(value) for key, value in result.metrics.items() if math.isfinite(value)},
        )
        progress = self.update.get("progress") or {}
        self.update.set(
            progress={
                **progress,
                "epoch": self.spec.hyperparameters.epochs,
                "epochs": self.spec.hyperparameters.epochs,
            }
        )
        self.update.phase(Phase.EVALUATING, f"{message}; applying the promotion policy")
        self.update.condition(Condition.TRAINED, True, "JobSucceeded", message)
        self.event("Normal", "Trained", message)

    async def record_progress(self) -> None:
        try:
            progress = await self.mlflow(tracking.read_progress, self.spec.experiment, self.uid)
        except tracking.MlflowDataError as error:
            # Progress is informative only: an odd answer must not fail the run.
            self.logger.warning("cannot read the training progress from MLflow: %s", error)
            return
        if progress is None:
            return
        self.update.set(
            mlflowRunId=progress.run_id,
            progress=progress_status(progress.history, self.spec.hyperparameters.epochs, self.update.now),
        )

    async def evaluate(self) -> None:
        async with self.rt.model_lock(self.model):
            outcome = await self.mlflow(
                tracking.evaluate_and_promote, self.model, self.version, self.spec.promotion
            )
            if outcome.move is not None:
                self.rt.failpoint("after-alias-move", self.logger)
        self.update.set(promoted=outcome.promoted, promotionReason=outcome.reason)
        if outcome.champion_version is not None:
            self.update.set(championVersion=outcome.champion_version)
        if not outcome.promoted:
            self.update.phase(Phase.REJECTED, f"not promoted: {outcome.reason}")
            self.update.condition(Condition.PROMOTED, False, "PolicyRejected", outcome.reason)
            self.event("Normal", "Rejected", f"version {self.version} not promoted: {outcome.reason}")
            return
        if outcome.move is not None and outcome.move.replaced_version is not None:
            self.update.set(previousChampionVersion=outcome.move.replaced_version)
        message = f"version {self.version} is the champion of {self.model}: {outcome.reason}"
        self.update.phase(Phase.ROLLING_OUT, message)
        self.update.condition(Condition.PROMOTED, True, "PolicyAccepted", outcome.reason)
        self.event("Normal", "Promoted", message)

    async def roll_out(self) -> None:
        rollout = self.update.get("rollout")
        if not rollout:
            await self.start_rollout()
        else:
            await self.watch_rollout(rollout)

    async def start_rollout(self) -> None:
        async with self.rt.model_lock(self.model):
            champion = await self.mlflow(tracking.champion_version, self.model)
            if champion != self.version:
                message = (
                    f"version {self.version} was promoted, but the champion is now "
                    f"{champion or 'unset'}; serving is left to that promotion"
                )
                self.update.phase(Phase.PROMOTED, message)
                self.update.condition(Condition.ROLLED_OUT, False, "Superseded", message)
                return
            selector = serving_label_selector(self.model, self.spec.serving_selector)
            deployments = await self.rt.kube.list_deployments(self.namespace, selector)
            if not deployments:
                message = f"version {self.version} is the champion; no serving Deployment matches {selector}"
                self.update.phase(Phase.PROMOTED, message)
                self.update.condition(Condition.ROLLED_OUT, True, "NoServingDeployments", message)
                return
            replaced = self.update.get("previousChampionVersion")
            pinned = pinned_model_uri(self.model, self.version)
            plan: list[dict[str, str]] = []
            for deployment in sorted(deployments, key=lambda d: str(d["metadata"]["name"])):
                deployment_name = str(deployment["metadata"]["name"])
                current = served_version(deployment, self.model)
                entry = {"name": deployment_name}
                if current == self.version:
                    # Already ours: an earlier attempt patched it and died before recording the plan.
                    if replaced:
                        entry["previousVersion"] = replaced
                        entry["previousModelUri"] = pinned_model_uri(self.model, replaced)
                else:
                    if current:
                        entry["previousVersion"] = current
                    uri = model_uri_of(deployment)
                    if uri:
                        entry["previousModelUri"] = uri
                    await self.rt.kube.patch_deployment(
                        self.namespace,
                        deployment_name,
                        build_rollout_patch(self.version, pinned, list(serving_containers(deployment))),
                    )
                plan.append(entry)
            self.rt.failpoint("after-rollout-patch", self.logger)
        deadline = self.update.now + datetime.timedelta(seconds=self.rt.config.rollout_timeout_seconds)
        names = ", ".join(entry["name"] for entry in plan)
        message = f"rolling {names} to version {self.version}"
        self.update.set(
            rollout={
                "startedAt": timestamp(self.update.now),
                "deadline": timestamp(deadline),
                "deployments": plan,
            }
        )
        self.update.phase(Phase.ROLLING_OUT, message)
        self.update.condition(Condition.ROLLED_OUT, False, "InProgress", message)
        self.event("Normal", "RolloutStarted", message)

    async def watch_rollout(self, rollout: dict[str, Any]) -> None:
        states: list[RolloutState] = []
        for entry in rollout.get("deployments") or []:
            deployment = await self.rt.kube.read_deployment(self.namespace, entry["name"])
            if deployment is None:
                states.append(RolloutState(True, False, f"{entry['name']}: deleted"))
            elif served_version(deployment, self.model) != self.version:
                states.append(RolloutState(True, False, f"{entry['name']}: since rolled to another version"))
            else:
                states.append(rollout_state(deployment))
        if all(state.done for state in states):
            message = "; ".join(state.message for state in states)
            self.update.phase(Phase.PROMOTED, f"version {self.version} is serving: {message}")
            self.update.condition(Condition.ROLLED_OUT, True, "Available", message)
            self.event("Normal", "RolledOut", message)
            return
        failed = [state for state in states if state.failed]
        deadline = parse_timestamp(str(rollout["deadline"]))
        if not failed and self.update.now < deadline:
            return
        pending = "; ".join(state.message for state in states if not state.done)
        reason = "ProgressDeadlineExceeded" if failed else "RolloutTimeout"
        await self.roll_back(
            rollout, reason, f"serving did not become available by {rollout['deadline']}: {pending}"
        )

    async def roll_back(self, rollout: dict[str, Any], reason: str, why: str) -> None:
        replaced = self.update.get("previousChampionVersion")
        async with self.rt.model_lock(self.model):
            restored = await self.mlflow(
                tracking.restore_champion, AliasMove(self.model, self.version, replaced)
            )
            for entry in rollout.get("deployments") or []:
                deployment = await self.rt.kube.read_deployment(self.namespace, entry["name"])
                if deployment is None or served_version(deployment, self.model) != self.version:
                    continue
                previous = entry.get("previousVersion")
                # The URI the pods had before; a plan recorded without one (an older operator) gets the
                # replaced version pinned, or the alias when there was none.
                uri = entry.get("previousModelUri") or (
                    pinned_model_uri(self.model, previous)
                    if previous
                    else f"models:/{self.model}@{CHAMPION_ALIAS}"
                )
                await self.rt.kube.patch_deployment(
                    self.namespace,
                    entry["name"],
                    build_rollout_patch(previous, uri, list(serving_containers(deployment))),
                )
        if not restored:
            alias = "the champion alias had already moved on and was left alone"
        elif replaced:
            alias = f"the champion alias is back on version {replaced}"
        else:
            alias = "there was no earlier champion, so the champion alias was removed"
        message = f"{why}; {alias} and the serving pods' model was restored"
        self.update.phase(Phase.ROLLED_BACK, message)
        self.update.condition(Condition.ROLLED_OUT, False, reason, why)
        self.update.condition(Condition.ROLLED_BACK, True, reason, message)
        self.event("Warning", "RolledBack", message)
