"""Serving follows the registry: an alias moved outside the operator (the MLflow UI, the client, the
CLI) reaches the serving pods too, and the version they serve is confirmed from the pods themselves.

Each serving Deployment (label `mnist-mlops.io/registered-model=<model>`) follows one alias of its
model: the annotation `mnist-mlops.io/follow-alias`, `champion` by default. A pass of `RegistrySync`
resolves that alias in MLflow and, when the pod template does not pin exactly that version, patches
it to `models:/<model>/<version>` (the same patch a promotion makes, `build_rollout_patch`), with a
`RegistrySync` event on the Deployment saying from what, to what and why (webhook or periodic). Once
the rollout is complete, every ready pod's `/health` is read through the API server's pod proxy, and
when all of them report that version it is recorded in the Deployment's annotation
`mnist-mlops.io/confirmed-version` (and a `VersionConfirmed` event): the pods' own word, not the
template's. Confirmation covers every labelled Deployment, however it was rolled (a promotion too).

Passes run every `registry_sync_seconds` (the fallback: webhooks off, or a delivery lost) and at once
for the model an MLflow webhook names (mnist_operator/webhooks.py). A single task runs them, so two
passes never patch at once; it is one list request per namespace per pass rather than a kopf timer
per Deployment, which would need a watch of every Deployment in scope and kopf's bookkeeping on them.

What a pass never does:
* roll to nothing: an alias that does not exist (deleted, or never set) leaves the Deployment as it
  is, with an `AliasMissing` event and a log line;
* race a promotion: while a TrainingRun of the same model is Evaluating, Canary, Shadowing or
  RollingOut in the Deployment's namespace, that run owns serving and the pass waits (event
  `RegistrySyncWaiting`); the alias is read under the model's lock (`Runtime.model_lock`), the one
  promotions move it under, so a pass never acts on a version a promotion is replacing;
* fail the operator: MLflow down is logged once per outage and the next pass tries again; any other
  error is logged and the task carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from kubernetes.aio.client.exceptions import ApiException

from contract.registry import alias_version
from contract.spec import API_GROUP, CHAMPION_ALIAS, REGISTERED_MODEL_LABEL
from mnist_operator import tracking
from mnist_operator.builders import build_rollout_patch, pinned_model_uri, serving_containers
from mnist_operator.kube import Kube
from mnist_operator.rollouts import rollout_state
from mnist_operator.runtime import Runtime
from mnist_operator.status import Phase
from mnist_operator.webhooks import MLFLOW_WEBHOOK_PATH, AliasEvent, MlflowWebhook

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

FOLLOW_ALIAS_ANNOTATION = f"{API_GROUP}/follow-alias"
CONFIRMED_VERSION_ANNOTATION = f"{API_GROUP}/confirmed-version"
# A TrainingRun in one of these phases is promoting its model: serving is its to change.
PROMOTING_PHASES = frozenset({Phase.EVALUATING, Phase.CANARY, Phase.SHADOWING, Phase.ROLLING_OUT})
SERVING_PORT_NAME = "http"
HEALTH_PATH = "health"
# After a patch, how often the rollout is checked until its pods confirm the version.
CONFIRM_POLL_SECONDS = 1.0
# A pass skipped for a busy model lock is retried this soon, not a whole interval later.
RETRY_SOON_SECONDS = 1.0
Trigger = Literal["webhook", "periodic"]

logger = logging.getLogger("mnist_operator.registry_sync")


# ------------------------------------------------------------------------ pure decisions


def resolve_alias(client: MlflowClient, model: str, alias: str) -> str | None:
    """The version `model@alias` names, None when the alias does not exist (blocking)."""
    return tracking.guarded(lambda: alias_version(client, model, alias))


def pinned_version(deployment: Mapping[str, Any], model: str) -> str | None:
    """The version every serving container pins (models:/<model>/<n>), or None if any does not."""
    pattern = re.compile(rf"models:/{re.escape(model)}/(?P<version>[0-9]+)")
    versions = set()
    for uri in serving_containers(deployment).values():
        match = pattern.fullmatch(uri)
        if match is None:
            return None
        versions.add(match["version"])
    return versions.pop() if len(versions) == 1 else None


def followed_alias(deployment: Mapping[str, Any]) -> str:
    annotations = deployment.get("metadata", {}).get("annotations") or {}
    return str(annotations.get(FOLLOW_ALIAS_ANNOTATION) or CHAMPION_ALIAS).strip() or CHAMPION_ALIAS


def model_of(deployment: Mapping[str, Any]) -> str:
    return str((deployment.get("metadata", {}).get("labels") or {}).get(REGISTERED_MODEL_LABEL, ""))


def key_of(deployment: Mapping[str, Any]) -> str:
    meta = deployment["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


@dataclass(frozen=True)
class Decision:
    action: Literal["roll", "in-sync", "wait", "alias-missing", "not-pinnable"]
    message: str
    version: str | None = None


def decide(
    deployment: Mapping[str, Any], model: str, alias: str, version: str | None, promoting: Sequence[str]
) -> Decision:
    """What a pass does to one Deployment, given the alias's version and the runs promoting the model."""
    current = pinned_version(deployment, model)
    shown = current or ", ".join(sorted(set(serving_containers(deployment).values()))) or "nothing"
    if not serving_containers(deployment):
        return Decision("not-pinnable", "no container sets SERVING_MODEL_URI to a literal value; left alone")
    if version is None:
        return Decision(
            "alias-missing",
            f"alias {model}@{alias} does not exist (deleted, or never set); still serving {shown}, "
            "not rolled to nothing",
        )
    if current == version:
        return Decision("in-sync", f"serving {model} version {version} (@{alias})", version)
    if promoting:
        return Decision(
            "wait",
            f"{model}@{alias} is version {version} but TrainingRun {', '.join(promoting)} is promoting "
            f"{model}; serving ({shown}) is left to it",
            version,
        )
    return Decision("roll", f"{shown} -> version {version}", version)


def promoting_runs(trainingruns: Iterable[Mapping[str, Any]], model: str) -> list[str]:
    """The TrainingRuns of `model` that are mid-promotion (their names, sorted)."""
    return sorted(
        str(run["metadata"]["name"])
        for run in trainingruns
        if (run.get("spec") or {}).get("registeredModel") == model
        and (run.get("status") or {}).get("phase") in PROMOTING_PHASES
    )


@dataclass(frozen=True)
class PodReport:
    pod: str
    version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Confirmation:
    confirmed: bool
    message: str


def judge(version: str, reports: Sequence[PodReport]) -> Confirmation:
    """Confirmed only when there are ready pods and every one of them reports `version`."""
    if not reports:
        return Confirmation(False, "no ready pod to ask")
    wrong = [report for report in reports if report.error is None and report.version != version]
    failed = [report for report in reports if report.error is not None]
    if not wrong and not failed:
        pods = ", ".join(report.pod for report in reports)
        return Confirmation(True, f"all {len(reports)} ready pod(s) report version {version} ({pods})")
    problems = [f"{report.pod} reports version {report.version}" for report in wrong]
    problems += [f"{report.pod}: {report.error}" for report in failed]
    return Confirmation(False, "; ".join(problems))


def health_version(body: bytes) -> str:
    """model.version of a serving pod's /health document; ValueError when it has none."""
    document = json.loads(body)
    model = document.get("model") if isinstance(document, dict) else None
    version = model.get("version") if isinstance(model, dict) else None
    if version is None:
        raise ValueError("its /health names no model.version")
    return str(version)


def ready_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Running, Ready, and not on their way out."""
    found = []
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        conditions = {item.get("type"): item.get("status") for item in status.get("conditions") or []}
        if status.get("phase") == "Running" and conditions.get("Ready") == "True":
            found.append(pod)
    return found


def serving_port(pod: Mapping[str, Any]) -> int | None:
    """The container port named `http` (the pod proxy takes a number: it resolves no port names)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == SERVING_PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    return None


def selector_of(deployment: Mapping[str, Any]) -> str:
    labels = (deployment.get("spec", {}).get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


# ------------------------------------------------------------------------ the sync task


@dataclass
class RegistrySync:
    rt: Runtime
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    # model -> why a pass was asked for it (a webhook), until the pass runs.
    _requested: dict[str, Trigger] = field(default_factory=dict)
    # Deployment key -> until when its rollout is polled for confirmation every CONFIRM_POLL_SECONDS.
    _confirming: dict[str, float] = field(default_factory=dict)
    # (Deployment key, "sync" or "confirm") -> the last (reason, message) posted, so that a standing
    # condition is posted once.
    _said: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    _mlflow_down: bool = False
    _first_pass_done: bool = False
    _retry_at: float | None = None
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="registry sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def on_alias(self, event: AliasEvent) -> None:
        """The webhook's action: a pass over that model's Deployments as soon as the task is free."""
        self._requested[event.model] = "webhook"
        self._wake.set()

    async def run(self) -> None:
        interval = self.rt.config.registry_sync_seconds
        next_periodic = time.monotonic()
        while True:
            now = time.monotonic()
            periodic = interval > 0 and now >= next_periodic
            if periodic:
                next_periodic = now + interval
            requested, self._requested = self._requested, {}
            retry = self._retry_at is not None and now >= self._retry_at
            if retry:
                self._retry_at = None
            try:
                if periodic or retry or requested:
                    await self.sync_pass(requested, everything=periodic or retry)
                await self.confirm_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("registry sync pass failed; the next one tries again")
            deadlines = [next_periodic] if interval > 0 else []
            deadlines += [self._retry_at] if self._retry_at is not None else []
            if self._confirming:
                deadlines.append(time.monotonic() + CONFIRM_POLL_SECONDS)
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            self._wake.clear()
            if self._requested:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    # -------------------------------------------------------------------- one pass

    async def deployments(self) -> list[dict[str, Any]]:
        kube = self.rt.kube
        if self.rt.config.clusterwide:
            return await kube.list_deployments_everywhere(REGISTERED_MODEL_LABEL)
        found = []
        for namespace in self.rt.config.namespaces:
            found += await kube.list_deployments(namespace, REGISTERED_MODEL_LABEL)
        return found

    async def sync_pass(self, requested: Mapping[str, Trigger], *, everything: bool) -> None:
        """The labelled Deployments in scope (all, or those of the `requested` models): each pinned to
        its alias, and confirmed. A model a webhook named is synced as the webhook's doing."""
        by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for deployment in await self.deployments():
            model = model_of(deployment)
            if (
                model
                and (everything or model in requested)
                and not deployment["metadata"].get("deletionTimestamp")
            ):
                by_model[model].append(deployment)
        for model, deployments in sorted(by_model.items()):
            trigger = requested.get(model, "periodic")
            lock = self.rt.model_lock(model)
            if lock.locked() and trigger == "periodic":
                # A promotion of this model is moving the alias or rolling: look again shortly.
                self._retry_at = time.monotonic() + RETRY_SOON_SECONDS
                continue
            try:
                async with lock:
                    await self.sync_model(model, deployments, trigger)
            except tracking.MlflowDataError as error:
                logger.warning("registry sync: MLflow cannot resolve the aliases of %s: %s", model, error)
                continue
            except ApiException as error:
                logger.warning(
                    "registry sync of %s: the API server answered %s: %s",
                    model,
                    error.status,
                    _api_message(error),
                )
                continue
            except tracking.MlflowUnavailableError as error:
                if not self._mlflow_down:
                    logger.warning(
                        "registry sync: MLflow at %s is unreachable (%s); retrying every pass",
                        self.rt.config.mlflow_tracking_uri,
                        error,
                    )
                self._mlflow_down = True
                return
        if self._mlflow_down:
            logger.info("registry sync: MLflow answers again")
            self._mlflow_down = False
        if not self._first_pass_done:
            self._first_pass_done = True
            every = self.rt.config.registry_sync_seconds
            logger.info(
                "registry sync: first pass done (%d serving Deployment(s)); %s",
                sum(len(items) for items in by_model.values()),
                f"then every {every:g}s and on MLflow webhooks"
                if every > 0
                else "then on MLflow webhooks only",
            )
        await self.confirm_all(deployment for items in by_model.values() for deployment in items)

    async def sync_model(self, model: str, deployments: Sequence[dict[str, Any]], trigger: Trigger) -> None:
        versions: dict[str, str | None] = {}
        runs: dict[str, list[str]] = {}
        for deployment in sorted(deployments, key=key_of):
            namespace = deployment["metadata"]["namespace"]
            alias = followed_alias(deployment)
            if alias not in versions:
                versions[alias] = await asyncio.to_thread(resolve_alias, self.rt.mlflow, model, alias)
            if namespace not in runs:
                runs[namespace] = promoting_runs(await self.rt.kube.list_trainingruns(namespace), model)
            decision = decide(deployment, model, alias, versions[alias], runs[namespace])
            await self.act(deployment, model, alias, decision, trigger)

    async def act(
        self, deployment: dict[str, Any], model: str, alias: str, decision: Decision, trigger: Trigger
    ) -> None:
        key = key_of(deployment)
        if decision.action == "in-sync":
            self._said.pop((key, "sync"), None)
            return
        if decision.action == "wait":
            await self.say(deployment, "Normal", "RegistrySyncWaiting", decision.message)
            return
        if decision.action in {"alias-missing", "not-pinnable"}:
            reason = "AliasMissing" if decision.action == "alias-missing" else "NotPinnable"
            await self.say(deployment, "Warning", reason, decision.message)
            return
        assert decision.version is not None
        containers = list(serving_containers(deployment))
        patch = build_rollout_patch(decision.version, pinned_model_uri(model, decision.version), containers)
        why = "an MLflow webhook" if trigger == "webhook" else "the periodic registry sync"
        message = f"{model}@{alias} moved: {decision.message}, found by {why}"
        await self.rt.kube.patch_deployment(
            deployment["metadata"]["namespace"], deployment["metadata"]["name"], patch
        )
        logger.info("registry sync: rolled Deployment %s: %s", key, message)
        self._said.pop((key, "sync"), None)
        await self.event(deployment, "Normal", "RegistrySync", message)
        self._confirming[key] = time.monotonic() + self.rt.config.rollout_timeout_seconds

    # -------------------------------------------------------------------- confirmation

    async def confirm_all(self, deployments: Iterable[dict[str, Any]]) -> None:
        if not self.rt.config.confirm_from_pods:
            return
        for deployment in deployments:
            # One just rolled is polled by confirm_due; this copy still shows the old template.
            if key_of(deployment) not in self._confirming:
                await self.confirm(deployment)

    async def confirm_due(self) -> None:
        if not self._confirming:
            return
        now = time.monotonic()
        for key, until in list(self._confirming.items()):
            if now > until or not self.rt.config.confirm_from_pods:
                self._confirming.pop(key, None)
                continue
            namespace, name = key.split("/", 1)
            deployment = await self.rt.kube.read_deployment(namespace, name)
            if deployment is None or await self.confirm(deployment):
                self._confirming.pop(key, None)

    async def confirm(self, deployment: dict[str, Any]) -> bool:
        """True once the version the template pins is the one its pods report (or nothing to confirm)."""
        model = model_of(deployment)
        version = pinned_version(deployment, model)
        annotations = deployment["metadata"].get("annotations") or {}
        if version is None or annotations.get(CONFIRMED_VERSION_ANNOTATION) == version:
            return True
        if (
            not self.rt.config.confirm_from_pods
            or int(deployment.get("spec", {}).get("replicas", 1) or 0) == 0
        ):
            return True
        if not rollout_state(deployment).done:
            return False
        namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
        reports = await ask_deployment(self.rt.kube, deployment)
        verdict = judge(version, reports)
        if not verdict.confirmed:
            await self.say(
                deployment,
                "Warning",
                "VersionUnconfirmed",
                f"version {version} not confirmed: {verdict.message}",
                topic="confirm",
            )
            return False
        await self.rt.kube.patch_deployment(
            namespace, name, {"metadata": {"annotations": {CONFIRMED_VERSION_ANNOTATION: version}}}
        )
        logger.info(
            "registry sync: Deployment %s/%s serves %s version %s: %s",
            namespace,
            name,
            model,
            version,
            verdict.message,
        )
        self._said.pop((key_of(deployment), "confirm"), None)
        await self.event(deployment, "Normal", "VersionConfirmed", verdict.message)
        return True

    async def ask(self, namespace: str, pod: Mapping[str, Any]) -> PodReport:
        return await ask_pod(self.rt.kube, namespace, pod)

    # -------------------------------------------------------------------- telling

    async def say(
        self, deployment: Mapping[str, Any], type_: str, reason: str, message: str, topic: str = "sync"
    ) -> None:
        """A standing condition: logged and posted once, until it changes or clears."""
        key = key_of(deployment)
        if self._said.get((key, topic)) == (reason, message):
            return
        self._said[(key, topic)] = (reason, message)
        log = logger.warning if type_ == "Warning" else logger.info
        log("registry sync: Deployment %s: %s: %s", key, reason, message)
        await self.event(deployment, type_, reason, message)

    async def event(self, deployment: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        try:
            await self.rt.kube.post_event(deployment, "Deployment", type_, reason, message)
        except (ApiException, TimeoutError, aiohttp.ClientError) as error:
            # An event is a courtesy: the patch or the annotation is the record.
            logger.warning("cannot post event %s on Deployment %s: %r", reason, key_of(deployment), error)


async def ask_pod(kube: Kube, namespace: str, pod: Mapping[str, Any]) -> PodReport:
    """The version one serving pod reports on its /health, through the API server's pod proxy."""
    name = str(pod["metadata"]["name"])
    port = serving_port(pod)
    if port is None:
        return PodReport(name, error=f"no container port named {SERVING_PORT_NAME!r}")
    try:
        status, body = await kube.pod_proxy_get(namespace, name, port, HEALTH_PATH)
    except ApiException as error:
        return PodReport(name, error=f"pod proxy answered {error.status}: {_api_message(error)}")
    except (TimeoutError, aiohttp.ClientError) as error:
        return PodReport(name, error=f"pod proxy failed: {error!r}")
    if status != 200:
        # The API server's own refusal (a Status) or the pod's answer (a 503 while loading).
        return PodReport(name, error=f"pod proxy answered {status}: {_body_message(body)}")
    try:
        return PodReport(name, version=health_version(body))
    except ValueError as error:
        return PodReport(name, error=str(error))


async def ask_deployment(kube: Kube, deployment: Mapping[str, Any]) -> list[PodReport]:
    """What every ready pod of the Deployment reports (asked together: each may take the proxy's
    timeout)."""
    namespace = str(deployment["metadata"]["namespace"])
    pods = ready_pods(await kube.list_pods(namespace, selector_of(deployment)))
    return list(await asyncio.gather(*(ask_pod(kube, namespace, pod) for pod in pods)))


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.body or error.reason)[:200]


def attach(rt: Runtime) -> RegistrySync:
    """The sync task (not started) and MLflow's webhook route on the health server (before it starts)."""
    sync = RegistrySync(rt)
    if rt.health is not None:
        webhook = MlflowWebhook(
            rt.config.mlflow_webhook_secret, rt.config.mlflow_webhook_tolerance_seconds, sync.on_alias
        )
        rt.health.add_route("POST", MLFLOW_WEBHOOK_PATH, webhook.handle)
    return sync


def _body_message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:200]
    if isinstance(document, dict) and document.get("message"):
        return str(document["message"])[:200]
    return json.dumps(document)[:200]
