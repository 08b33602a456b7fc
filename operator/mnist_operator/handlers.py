"""kopf glue, and only that: the decorators, the startup hook, and one thin call per handler into
`mnist_operator.reconciler`, where the state machine lives.

One handler creates the Job (`on_create`); one timer per active TrainingRun (`on_tick`) reconciles
it; a deletion handler (`on_delete`) releases the traffic tag of a run deleted mid-rollout; a
watch-event handler (`on_event`) tells the liveness heartbeat which runs must keep ticking; an index
keeps the status of every Job the operator made, so the ticks cost no API calls while a Job runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from contract.spec import API_GROUP, API_VERSION, DEFAULT_REGISTERED_MODEL, PLURAL
from contract.traffic import TRAFFIC_TAG
from mnist_operator import progressive, reconciler, registry_sync, retraining, tracking, webhooks
from mnist_operator.builders import MANAGED_BY_LABEL, OPERATOR_NAME
from mnist_operator.config import OperatorConfig
from mnist_operator.kube import Kube, api_client
from mnist_operator.liveness import HealthServer, Heartbeat
from mnist_operator.reconciler import Logger, Subject
from mnist_operator.runtime import Runtime, runtime
from mnist_operator.status import ACTIVE_PHASES, StatusUpdate
from mnist_operator.testing_hooks import NO_FAILPOINTS, Failpoints

TRAININGRUNS = (API_GROUP, API_VERSION, PLURAL)
JOBS_INDEX = "training_jobs"
RETRY_BACKOFF_SECONDS = 5.0
# A deleted run's traffic tag: this many attempts while MLflow is down, then the deletion goes on (the
# next rollout of the model takes over the stale tag, mnist_operator/progressive.py).
RELEASE_ATTEMPTS = 3
RELEASE_BACKOFF_SECONDS = 5.0


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Registers every handler on `registry`; the timer's interval comes from the configuration."""
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.index(
        "batch", "v1", "jobs", id=JOBS_INDEX, labels={MANAGED_BY_LABEL: OPERATOR_NAME}, registry=registry
    )(index_job)
    kopf.on.event(*TRAININGRUNS, id="liveness", registry=registry)(on_event)
    # Unexpected errors (an API hiccup) are retried after RETRY_BACKOFF_SECONDS, not kopf's minute.
    kopf.on.create(*TRAININGRUNS, backoff=RETRY_BACKOFF_SECONDS, registry=registry)(on_create)
    kopf.timer(
        *TRAININGRUNS,
        id="reconcile",
        interval=config.reconcile_interval_seconds,
        when=is_active,
        backoff=RETRY_BACKOFF_SECONDS,
        registry=registry,
    )(on_tick)
    # Not optional: the finalizer that keeps a tag-holding run until its tag is released is the one the
    # timer (kopf requires one for timers) already put there, and an optional handler would lose its
    # retries to the timer's exit. `when` keeps it off every other run, so no finalizer is added for it;
    # `retries`/`timeout` bound it even against an unexpected error, so a deletion never hangs.
    kopf.on.delete(
        *TRAININGRUNS,
        id="release-traffic",
        when=holds_traffic,
        retries=RELEASE_ATTEMPTS,
        timeout=RELEASE_ATTEMPTS * (RELEASE_BACKOFF_SECONDS + 4 * config.mlflow_timeout_seconds),
        backoff=RELEASE_BACKOFF_SECONDS,
        registry=registry,
    )(on_delete)
    retraining.register(registry, config)


async def configure(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """The one startup hook: kopf's settings, the MLflow and Kubernetes clients, the /healthz server."""
    config = memo["config"]
    assert isinstance(config, OperatorConfig)
    failpoints = memo.get("failpoints", NO_FAILPOINTS)
    assert isinstance(failpoints, Failpoints)
    # kopf's bookkeeping lives in the status (status.kopf, left unstructured by the CRD) rather than in
    # annotations: then it travels in the same /status patch as the run's own status, one API write
    # instead of two per handled TrainingRun (bench/operator.py counts them from the audit log).
    settings.persistence.progress_storage = kopf.StatusProgressStorage(name="kopf")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(name="kopf")
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
    heartbeat = Heartbeat(stall_after=config.stall_after_seconds)
    health = HealthServer(
        config.health_host,
        config.health_port,
        heartbeat,
        lambda: {"role": "leader", "identity": config.identity},
    )
    rt = Runtime(
        config=config,
        kube=Kube(await api_client()),
        mlflow=mlflow,
        heartbeat=heartbeat,
        health=health,
        failpoints=failpoints,
    )
    # The Alertmanager webhook's route must exist before the server starts.
    retraining.attach(rt, memo)
    # Serving follows the registry: MLflow's webhook route, then the sync task (leader only: this hook).
    sync = registry_sync.attach(rt)
    await health.start()
    memo["runtime"] = rt
    memo["registry_sync"] = sync
    sync.start()
    if config.mlflow_webhook_url and config.mlflow_webhook_secret:
        # In the background: MLflow being down must not hold up the start (the periodic sync covers it).
        memo["webhook_registration"] = asyncio.create_task(
            webhooks.keep_registered(
                mlflow,
                name=config.mlflow_webhook_name,
                url=config.mlflow_webhook_url,
                secret=config.mlflow_webhook_secret,
                backoff_seconds=config.mlflow_backoff_seconds,
                max_backoff_seconds=config.mlflow_max_backoff_seconds,
            ),
            name="mlflow webhook registration",
        )
    elif config.mlflow_webhook_url:
        logging.getLogger("mnist_operator").warning(
            "%s is set but %s is not: the MLflow webhook is not registered",
            webhooks.URL_ENV,
            webhooks.SECRET_ENV,
        )


async def cleanup(*, memo: Any, **_: Any) -> None:
    registration = memo.get("webhook_registration")
    if isinstance(registration, asyncio.Task):
        registration.cancel()
        await asyncio.gather(registration, return_exceptions=True)
    sync = memo.get("registry_sync")
    if isinstance(sync, registry_sync.RegistrySync):
        await sync.stop()
    found = memo.get("runtime")
    if isinstance(found, Runtime):
        if found.health is not None:
            await found.health.stop()
        await found.kube.close()


async def index_job(
    *, name: str, namespace: str | None, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """The status of every Job this operator made, kept current by kopf's watch: no polling."""
    return {(namespace or "", name): dict(status)}


def is_active(*, status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") in ACTIVE_PHASES


def holds_traffic(*, status: kopf.Status, **_: Any) -> bool:
    return progressive.holds_traffic(status)


async def on_event(
    *, event: kopf.RawEvent, name: str, namespace: str | None, status: kopf.Status, memo: Any, **_: Any
) -> None:
    found = memo.get("runtime")
    if isinstance(found, Runtime):
        active = event.get("type") != "DELETED" and status.get("phase") in ACTIVE_PHASES
        found.heartbeat.seen(f"{namespace}/{name}", active=active)


def _begin(
    *,
    memo: Any,
    meta: kopf.Meta,
    status: kopf.Status,
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    logger: Logger,
    **_: Any,
) -> tuple[Runtime, Subject, StatusUpdate]:
    """What every TrainingRun handler starts from: the runtime, the run, and its status to update."""
    assert namespace is not None, "TrainingRuns are namespaced"
    subject = Subject(name=name, namespace=namespace, uid=uid, body=body, logger=logger)
    return runtime(memo), subject, StatusUpdate.read(status, int(meta.get("generation") or 1))


async def on_create(*, spec: kopf.Spec, patch: kopf.Patch, **context: Any) -> None:
    rt, subject, update = _begin(**context)
    try:
        await reconciler.create_job(rt, subject, spec, update)
    finally:
        patch.status.update(update.patch())


async def on_delete(
    *,
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    uid: str,
    body: kopf.Body,
    memo: Any,
    logger: Logger,
    retry: int = 0,
    **_: Any,
) -> None:
    """Deleted while holding its model's traffic tag: the tag goes (if it still names this run)."""
    rt = runtime(memo)
    key, model = f"{namespace}/{name}", str(spec.get("registeredModel") or DEFAULT_REGISTERED_MODEL)
    try:
        removed = await progressive.release_deleted(rt, uid, key, model)
    except tracking.MlflowUnavailableError as error:
        if retry + 1 < RELEASE_ATTEMPTS:
            raise kopf.TemporaryError(
                f"cannot release the traffic tag of {model}: MLflow is unreachable ({error})",
                delay=RELEASE_BACKOFF_SECONDS,
            ) from error
        logger.warning(
            "gave up releasing the traffic tag %s of %s after %d attempts (MLflow is unreachable: %s); "
            "the deletion goes on, and the next rollout of %s takes the stale tag over",
            TRAFFIC_TAG,
            model,
            RELEASE_ATTEMPTS,
            error,
            model,
        )
        return
    except tracking.MlflowDataError as error:
        logger.warning("no traffic tag of %s to release: %s", model, error)
        return
    if removed:
        message = (
            f"deleted mid-rollout: removed the traffic tag of {model}; all traffic is on its stable version"
        )
        logger.info(message)
        kopf.event(body, type="Normal", reason="TrafficReleased", message=message)


async def on_tick(
    *,
    spec: kopf.Spec,
    patch: kopf.Patch,
    retry: int = 0,
    training_jobs: kopf.Index[tuple[str, str], dict[str, Any]] | None = None,
    **context: Any,
) -> None:
    assert training_jobs is not None, f"kopf passes the {JOBS_INDEX} index"
    rt, subject, update = _begin(**context)
    with rt.heartbeat.ticking(subject.key):
        await rt.failpoints.stall_reconcile()
        try:
            await reconciler.reconcile(rt, subject, spec=spec, update=update, jobs=training_jobs, retry=retry)
        finally:
            patch.status.update(update.patch())
            # An applied manual override (mnist_operator/progressive.py) is removed with the same patch.
            for key in update.removed_annotations:
                patch.metadata.annotations[key] = None
