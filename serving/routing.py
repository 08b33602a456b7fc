"""Progressive delivery in the serving pod: the registry's traffic document, applied per request.

The operator runs a canary or shadow rollout by writing one tag on the MLflow registered model,
`mnist-mlops.io/traffic`, whose value is a JSON document (the operator's side of the contract is
`contract/traffic.py`; the serving image does not ship `contract/`, so it is parsed again here):

    {"mode": "canary"|"shadow", "stable": "6", "candidate": "7", "weight": 10,
     "rollout": "<namespace>/<trainingrun>", "step": 0}

No tag, or `{}`, means every request on the pod's own (pinned) version. Why a registry tag rather than
Kubernetes objects: every pod already reads the registry, the document is one atomic value with its
own history in MLflow, it works the same without a cluster (local mode), and a pod needs no API
server access to follow it.

`TrafficController` polls the registered model (stdlib HTTP, `serving.model_store.RegistryClient`)
every SERVING_TRAFFIC_POLL_SECONDS. A new candidate version is fetched and loaded in a worker thread
through the same model store as the stable version; until it is loaded (or when it fails to load:
state "failed", retried with backoff) every request stays on stable. Removing the tag takes effect
at the next poll: the route is dropped before anything else, which is the serving half of an
abort's latency.

`Route` is the applied document as the request path sees it. Canary: a request carrying the routing
key header (SERVING_ROUTING_KEY_HEADER) goes to the candidate when a stable hash of the key, salted
with the candidate version, falls below weight/100: one client stays on one side at a given weight,
and a key on the candidate at 10% is still on it at 50% (the same point, a higher threshold).
Requests without a key take the next point of the golden-ratio sequence frac(n * 0.618...), which
fills [0, 1) so evenly that the candidate's share after n requests is within a request or two of
weight% (a random draw would be off by ~sqrt(n)). Shadow: stable answers every request and the
candidate runs a copy after the response (`serving.dataplane`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio

from serving import metrics
from serving.dataplane import DataPlane, LoadedModel
from serving.settings import ModelRef

log = logging.getLogger("serving.routing")

TRAFFIC_TAG = "mnist-mlops.io/traffic"
MODES = ("canary", "shadow")
# 1/phi: consecutive multiples, modulo 1, are the most evenly spread sequence there is (three-gap theorem).
GOLDEN_FRACTION = (math.sqrt(5) - 1) / 2
_HASH_SCALE = float(1 << 64)
# At shutdown, pending shadow runs get this long to finish (the last requests' copies).
SHADOW_DRAIN_SECONDS = 2.0
# Distinct malformed values remembered (each is logged once); a bound, since values come from outside.
_MALFORMED_MEMORY = 256

App = TypeVar("App")
Mode = Literal["canary", "shadow"]
State = Literal["none", "loading", "applied", "failed"]


class MalformedTrafficError(ValueError):
    """The tag's value is not a traffic document; it is then ignored (treated as no tag)."""


@dataclass(frozen=True)
class TrafficDocument:
    mode: Mode
    stable: str
    candidate: str
    weight: float  # percent of requests the candidate answers (canary); ignored in shadow mode
    rollout: str | None = None
    step: int | None = None


def _version(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or int(value) < 1:
        raise MalformedTrafficError(f"{key!r} must be a registry version number, got {value!r}")
    return str(int(value))


def parse(value: str | None) -> TrafficDocument | None:
    """The document in a tag value; None for no tag or `{}`. Raises MalformedTrafficError."""
    if value is None or not value.strip():
        return None
    try:
        raw = json.loads(value)
    except ValueError as exc:
        raise MalformedTrafficError(f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedTrafficError(f"not a JSON object but {type(raw).__name__}")
    if not raw:
        return None
    mode = raw.get("mode")
    if mode not in MODES:
        raise MalformedTrafficError(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    stable, candidate = _version(raw, "stable"), _version(raw, "candidate")
    weight = raw.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 100:
        raise MalformedTrafficError(f"'weight' must be a number from 0 to 100, got {weight!r}")
    rollout = raw.get("rollout")
    if rollout is not None and not isinstance(rollout, str):
        raise MalformedTrafficError(f"'rollout' must be a string, got {rollout!r}")
    step = raw.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise MalformedTrafficError(f"'step' must be an integer, got {step!r}")
    return TrafficDocument(mode, stable, candidate, float(weight), rollout, step)


def key_point(key: str, salt: bytes) -> float:
    """A routing key's fixed point in [0, 1) (for one salt: the candidate version)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, salt=salt).digest()
    return int.from_bytes(digest, "big") / _HASH_SCALE


class Route:
    """An applied traffic document: the loaded candidate and the per-request decision."""

    __slots__ = ("_count", "_salt", "_threshold", "candidate", "document", "shadow")

    def __init__(self, document: TrafficDocument, candidate: LoadedModel, stable_version: str) -> None:
        self.document = document
        self.candidate = candidate
        # Non-None exactly in shadow mode: the dataplane then runs a copy of each request's images.
        self.shadow = (
            metrics.ShadowMetrics(stable_version, candidate.metrics) if document.mode == "shadow" else None
        )
        self._threshold = document.weight / 100
        # blake2b's salt is at most 16 bytes; versions are short numbers.
        self._salt = candidate.version.encode("ascii")[:16]
        self._count = 0

    def to_candidate(self, key: str | None) -> bool:
        """Whether a canary request goes to the candidate."""
        if key is None:
            self._count = count = self._count + 1
            return (count * GOLDEN_FRACTION) % 1.0 < self._threshold
        return key_point(key, self._salt) < self._threshold


@dataclass(frozen=True)
class TrafficStatus:
    """What `/health` reports as `traffic`: the document this pod follows and how far it got."""

    state: State
    stable: str | None
    mode: Mode | None = None
    candidate: str | None = None
    weight: float | None = None
    rollout: str | None = None
    step: int | None = None
    error: str | None = None


class TrafficController:
    """Follows the traffic tag of the served registered model and applies it to the data plane."""

    def __init__(self, dataplane: DataPlane) -> None:
        settings = dataplane.settings
        self.dataplane = dataplane
        self.poll_seconds = settings.traffic_poll_seconds
        self.retry_max_seconds = settings.load_retry_max_seconds
        self.document: TrafficDocument | None = None
        self.state: State = "none"
        self.error: str | None = None
        self.candidate: LoadedModel | None = None
        self._value: str | None = None
        self._polled = False
        self._poll_error: str | None = None
        self._loader: asyncio.Task[None] | None = None
        self._loading: str | None = None
        self._malformed: set[str] = set()
        self._gauge: tuple[str, str, str] | None = None

    def status(self) -> TrafficStatus:
        document = self.document
        error = self.error or self._poll_error
        if document is None:
            return TrafficStatus(self.state, self.dataplane.version, error=error)
        return TrafficStatus(
            self.state,
            self.dataplane.version,
            document.mode,
            document.candidate,
            document.weight,
            document.rollout,
            document.step,
            error,
        )

    async def run(self) -> None:
        """Polls until cancelled; starts once the stable model is ready (see serving.app)."""
        if self.poll_seconds <= 0:
            return
        try:
            while True:
                await self.poll()
                await anyio.sleep(self.poll_seconds)
        finally:
            self._stop_loading()

    async def poll(self) -> None:
        dataplane = self.dataplane
        try:
            info = await anyio.to_thread.run_sync(
                dataplane.store.registered_model, dataplane.ref.name, abandon_on_cancel=True
            )
        except Exception as exc:
            # The applied document stays applied: a registry outage must not flip traffic around.
            message = f"reading the traffic document failed: {exc}"
            if message != self._poll_error:
                log.warning("%s; keeping the current routing", message)
            self._poll_error = message
            return
        if self._poll_error is not None:
            log.info("reading the traffic document works again")
            self._poll_error = None
        self.apply(info.tags.get(TRAFFIC_TAG))

    def apply(self, value: str | None) -> None:
        """Acts on the tag's value when it changed since the last poll."""
        if self._polled and value == self._value:
            return
        self._polled, self._value = True, value
        try:
            document = parse(value)
        except MalformedTrafficError as exc:
            assert value is not None
            if value not in self._malformed:
                if len(self._malformed) >= _MALFORMED_MEMORY:
                    self._malformed.clear()
                self._malformed.add(value)
                log.warning(
                    "ignoring a malformed traffic document; serving everything on stable: %s",
                    exc,
                    extra={"tag": TRAFFIC_TAG, "value": value[:500]},
                )
            self._clear("failed", f"ignored the malformed {TRAFFIC_TAG} tag ({exc}): all traffic on stable")
            return
        if document is None:
            if self.document is not None:
                log.info("traffic document removed: all traffic on stable")
            self._clear("none")
            return
        own = self.dataplane.version
        if document.candidate == own:
            # This pod already serves the candidate as its stable version (a promotion rolled it).
            self._clear("none", document=document)
            return
        if document.stable != own:
            log.warning(
                "the traffic document's stable version is not this server's; routing between %s and %s",
                own,
                document.candidate,
                extra={"document_stable": document.stable},
            )
        loaded = self.candidate
        if loaded is not None and loaded.version == document.candidate:
            self.document = document
            self._route(document, loaded)
            return
        if self._loader is not None and self._loading == document.candidate:
            self.document = document  # a new weight or step while the candidate still loads
            return
        # A new candidate: stable takes everything until it is loaded.
        self._clear("loading", document=document)
        self._loading = document.candidate
        self._loader = asyncio.get_running_loop().create_task(
            self._load(document.candidate), name=f"candidate-loader-{document.candidate}"
        )

    def _route(self, document: TrafficDocument, loaded: LoadedModel) -> None:
        stable = self.dataplane.version or ""
        self.dataplane.traffic = Route(document, loaded, stable)
        self.state, self.error = "applied", None
        weight = 100.0 if document.mode == "shadow" else document.weight
        labels = (stable, loaded.version, document.mode)
        if self._gauge is not None and self._gauge != labels:
            metrics.clear_traffic(*self._gauge)
        metrics.set_traffic(*labels, weight)
        self._gauge = labels
        log.info(
            "traffic document applied",
            extra={
                "mode": document.mode,
                "stable": stable,
                "candidate": loaded.version,
                "weight": document.weight,
                "rollout": document.rollout,
                "step": document.step,
            },
        )

    def _clear(self, state: State, error: str | None = None, document: TrafficDocument | None = None) -> None:
        # The route goes first: from here on every new request is stable's (an abort's latency).
        self.dataplane.traffic = None
        self._stop_loading()
        self.candidate = None
        if self._gauge is not None:
            metrics.clear_traffic(*self._gauge)
            self._gauge = None
        self.document, self.state, self.error = document, state, error

    def _stop_loading(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            self._loader = None

    async def _load(self, version: str) -> None:
        ref = ModelRef(self.dataplane.ref.name, None, version)
        delay = 0.5
        while True:
            try:
                loaded = await anyio.to_thread.run_sync(
                    self.dataplane.open_version, ref, abandon_on_cancel=True
                )
                break
            except Exception as exc:
                self.state, self.error = "failed", f"loading candidate {ref} failed: {exc}"
                log.error(
                    "loading the candidate failed; retrying in %.1fs: %s",
                    delay,
                    exc,
                    extra={"model_uri": str(ref)},
                )
            await anyio.sleep(delay)
            delay = min(delay * 2, self.retry_max_seconds)
        self._loader = None
        self.candidate = loaded
        document = self.document
        if document is not None and document.candidate == version:
            log.info(
                "candidate loaded",
                extra={"model_uri": str(ref), "from_cache": loaded.cached.from_cache},
            )
            self._route(document, loaded)


async def follow(controller: TrafficController) -> None:
    """The controller's life in the app: once the stable model is ready, poll until cancelled.
    Shadow runs still pending then get SHADOW_DRAIN_SECONDS to finish."""
    try:
        await controller.dataplane.loaded.wait()
        await controller.run()
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(controller.dataplane.drain_shadows(), SHADOW_DRAIN_SECONDS)


def with_traffic(
    lifespan: Callable[[App], AbstractAsyncContextManager[None]], controller: TrafficController
) -> Callable[[App], AbstractAsyncContextManager[None]]:
    """The app's lifespan with the controller following the registry inside it."""

    @contextlib.asynccontextmanager
    async def lifespan_with_traffic(app: App) -> AsyncIterator[None]:
        async with lifespan(app):
            follower = asyncio.create_task(follow(controller), name="traffic-follower")
            try:
                yield
            finally:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower

    return lifespan_with_traffic


__all__ = [
    "TRAFFIC_TAG",
    "MalformedTrafficError",
    "Route",
    "TrafficController",
    "TrafficDocument",
    "TrafficStatus",
    "follow",
    "key_point",
    "parse",
    "with_traffic",
]
