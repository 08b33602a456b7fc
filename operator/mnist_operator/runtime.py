"""What the handlers share, built once by the startup hook and kept in kopf's memo."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kopf

from mnist_operator.config import OperatorConfig
from mnist_operator.kube import Kube
from mnist_operator.liveness import HealthServer, Heartbeat
from mnist_operator.testing_hooks import NO_FAILPOINTS, Failpoints

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


@dataclass
class Runtime:
    config: OperatorConfig
    kube: Kube
    mlflow: MlflowClient
    heartbeat: Heartbeat
    health: HealthServer | None = None
    # Test-only fault injection (mnist_operator.testing_hooks); inert in production.
    failpoints: Failpoints = NO_FAILPOINTS
    model_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    progress_read_at: dict[str, float] = field(default_factory=dict)
    # The uids of the TrainingRuns whose deletion handler released their traffic tag: a
    # reconcile tick still under way must not write it back (mnist_operator/progressive.py).
    deleted_runs: set[str] = field(default_factory=set)

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


def runtime(memo: Any) -> Runtime:
    found = memo.get("runtime")
    if not isinstance(found, Runtime):
        raise kopf.TemporaryError("the operator is still starting up", delay=1)
    return found
