"""One active operator at a time: a coordination.k8s.io Lease, with client-go's leader-election rules.

Standby replicas wait for the Lease and answer /healthz meanwhile; the leader renews it and stops
(the process exits, Kubernetes restarts it as a standby) as soon as it cannot. On a clean exit it
gives the Lease up, so a successor starts at once instead of after the lease duration.

Expiry is judged by the local clock from when this process last saw the Lease change, never by
comparing renewTime with the local time, so clock skew between nodes does not matter. Updates carry
the resourceVersion read, so two candidates racing for an expired Lease cannot both win.

kopf's own peering is not used: replicas of equal priority all pause rather than elect one. The
Kubernetes client's asyncio leader election is not used either: its Lease lock fails validation
in this client version (it passes pretty=True where a string is required).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes.aio import client
from kubernetes.aio.client.exceptions import ApiException

logger = logging.getLogger("mnist_operator.leader")


class Elector:
    def __init__(
        self, api: client.ApiClient, *, name: str, namespace: str, identity: str, lease_duration: int
    ) -> None:
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_duration = lease_duration
        # client-go's proportions: renew within 2/3 of the lease, retry every ~1/7 of it (>= 1s).
        self.renew_deadline = lease_duration * 2 / 3
        self.retry_period = max(1.0, lease_duration / 7)
        self.holder: str | None = None
        self._coordination = client.CoordinationV1Api(api)
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        # A request may not outlast the renew deadline, or a slow API server would cost the Lease.
        self._timeout = max(1.0, self.renew_deadline / 2)

    async def try_acquire_or_renew(self) -> bool:
        try:
            return await self._try_acquire_or_renew()
        except (TimeoutError, aiohttp.ClientError) as error:
            logger.warning("Lease %s/%s: API request failed: %r", self.namespace, self.name, error)
            return False

    async def _try_acquire_or_renew(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        try:
            lease = await self._coordination.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=self._timeout
            )
        except ApiException as error:
            if error.status == 404:
                return await self._create(now)
            logger.warning(
                "cannot read Lease %s/%s: %s %s", self.namespace, self.name, error.status, error.reason
            )
            return False
        spec = lease.spec or client.V1LeaseSpec()
        record = (spec.holder_identity, spec.renew_time, spec.lease_duration_seconds)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        self.holder = spec.holder_identity
        duration = spec.lease_duration_seconds or self.lease_duration
        if spec.holder_identity and spec.holder_identity != self.identity:
            if time.monotonic() - self._observed_at < duration:
                return False
            logger.info("Lease %s/%s held by %s has expired", self.namespace, self.name, spec.holder_identity)
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.lease_duration
        spec.renew_time = now
        lease.spec = spec
        try:
            await self._coordination.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self._timeout
            )
        except ApiException as error:
            if error.status != 409:
                logger.warning(
                    "cannot update Lease %s/%s: %s %s", self.namespace, self.name, error.status, error.reason
                )
            return False
        self.holder = self.identity
        self._observed, self._observed_at = (self.identity, now, self.lease_duration), time.monotonic()
        return True

    async def _create(self, now: datetime.datetime) -> bool:
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=self.lease_duration,
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            await self._coordination.create_namespaced_lease(
                self.namespace, lease, _request_timeout=self._timeout
            )
        except ApiException as error:
            if error.status != 409:
                logger.warning(
                    "cannot create Lease %s/%s: %s %s", self.namespace, self.name, error.status, error.reason
                )
            return False
        self.holder = self.identity
        self._observed, self._observed_at = (self.identity, now, self.lease_duration), time.monotonic()
        return True

    async def acquire(self) -> None:
        """Waits until this process holds the Lease."""
        logger.info("waiting to lead: Lease %s/%s as %s", self.namespace, self.name, self.identity)
        while True:
            if await self.try_acquire_or_renew():
                break
            await asyncio.sleep(self.retry_period)
        logger.info("leading: acquired Lease %s/%s", self.namespace, self.name)

    async def keep(self) -> None:
        """Renews the Lease; returns only when renewing failed for longer than the renew deadline."""
        while True:
            deadline = time.monotonic() + self.renew_deadline
            while not await self.try_acquire_or_renew():
                if time.monotonic() >= deadline:
                    logger.error("lost Lease %s/%s", self.namespace, self.name)
                    return
                await asyncio.sleep(self.retry_period)
            await asyncio.sleep(self.retry_period)

    async def release(self) -> None:
        try:
            lease = await self._coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            await self._coordination.replace_namespaced_lease(self.name, self.namespace, lease)
            logger.info("released Lease %s/%s", self.namespace, self.name)
        except ApiException as error:
            logger.warning("could not release Lease %s/%s: %s", self.namespace, self.name, error.reason)


class StandbyHealth:
    """Answers /healthz while the process waits for the Lease; kopf's own endpoint takes the port over
    once this process leads."""

    def __init__(self, host: str, port: int, describe: Callable[[], dict[str, Any]]) -> None:
        self.host, self.port, self.describe = host, port, describe
        self._runner: web.AppRunner | None = None

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"role": "standby", **self.describe()})

    async def __aenter__(self) -> StandbyHealth:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def run_as_leader(
    elector: Elector, health: StandbyHealth, lead: Callable[[], Coroutine[Any, Any, None]]
) -> bool:
    """Runs `lead()` while holding the Lease; False if the Lease was lost (then exit non-zero)."""
    async with health:
        await elector.acquire()
    leading = asyncio.create_task(lead(), name="leader work")
    renewing = asyncio.create_task(elector.keep(), name="lease renewal")
    try:
        done, _ = await asyncio.wait({leading, renewing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        renewing.cancel()
    if renewing in done and leading not in done:
        leading.cancel()
        await asyncio.gather(leading, return_exceptions=True)
        return False
    await elector.release()
    leading.result()
    return True
