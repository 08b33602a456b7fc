"""The leader's /healthz: 200 while the reconciler keeps ticking, 503 once it has stopped.

Every active TrainingRun has a kopf timer that reconciles it each interval. The `Heartbeat` records
when each active run was last reconciled (a tick starting or finishing), from the moment the watch
shows it active until it is final or deleted. If some active run has gone unreconciled for longer
than `stall_after` (N reconcile intervals, and at least twice the longest MLflow backoff, during
which a run is rightly left alone), or a tick has been running that long, the reconciler is stuck:
the probe answers 503 and Kubernetes restarts the pod. An idle operator (no active run) is live.

kopf's own liveness endpoint is not used: it can only answer 200 (or 500 when a probe raises) and
caches the answer for 10 seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Verdict:
    alive: bool
    seconds_since_last_tick: float | None
    active_runs: int
    problem: str = ""

    def document(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "alive": self.alive,
            "activeRuns": self.active_runs,
            "secondsSinceLastTick": None
            if self.seconds_since_last_tick is None
            else round(self.seconds_since_last_tick, 1),
        }
        if self.problem:
            found["problem"] = self.problem
        return found


@dataclass
class Heartbeat:
    stall_after: float
    clock: Callable[[], float] = time.monotonic
    # run → when it was last reconciled (or first seen active); only active runs are kept.
    last_beat: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, float] = field(default_factory=dict)
    last_tick: float | None = None

    def seen(self, run: str, *, active: bool) -> None:
        """From the watch: whether `run` is (still) one the reconciler must tick."""
        if active:
            self.last_beat.setdefault(run, self.clock())
        else:
            self.last_beat.pop(run, None)

    @contextlib.contextmanager
    def ticking(self, run: str) -> Iterator[None]:
        """Around one reconcile tick of `run`: a beat when it starts and when it ends."""
        started = self.clock()
        self.last_beat[run] = self.last_tick = started
        self.in_flight[run] = started
        try:
            yield
        finally:
            self.in_flight.pop(run, None)
            now = self.clock()
            self.last_tick = now
            if run in self.last_beat:
                self.last_beat[run] = now

    def verdict(self) -> Verdict:
        now = self.clock()
        since = None if self.last_tick is None else now - self.last_tick
        late = {run: now - beat for run, beat in self.last_beat.items() if now - beat > self.stall_after}
        if not late:
            return Verdict(True, since, len(self.last_beat))
        run, seconds = max(late.items(), key=lambda item: item[1])
        what = "has been running for" if run in self.in_flight else "has not run for"
        problem = (
            f"the reconcile tick of TrainingRun {run} {what} {seconds:.0f}s "
            f"(limit {self.stall_after:g}s); {len(late)} active run(s) late"
        )
        return Verdict(False, since, len(self.last_beat), problem)


class HealthServer:
    """Serves GET /healthz from `describe()` and the heartbeat's verdict (200 or 503)."""

    def __init__(
        self, host: str, port: int, heartbeat: Heartbeat, describe: Callable[[], dict[str, Any]]
    ) -> None:
        self.host, self.port, self.heartbeat, self.describe = host, port, heartbeat, describe
        self._runner: web.AppRunner | None = None
        self._routes: list[tuple[str, str, Handler]] = []

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Another endpoint on the same port (the webhooks); aiohttp freezes the router at start."""
        if self._runner is not None:
            raise RuntimeError(f"cannot add {method} {path}: the server has already started")
        self._routes.append((method, path, handler))

    async def _health(self, _request: web.Request) -> web.Response:
        verdict = self.heartbeat.verdict()
        return web.json_response(
            {**self.describe(), **verdict.document()}, status=200 if verdict.alive else 503
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        for method, path, handler in self._routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
