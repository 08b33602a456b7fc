"""TEST-ONLY fault injection. Nothing here runs in production: the operator gets `NO_FAILPOINTS`
(whose hooks do nothing) unless `MNIST_OPERATOR_TEST_FAILPOINT` is set, which only the tests do
(`testing/operator_harness.py`); the chart never sets it.

The named points are how tests/test_operator.py proves that a restart at the worst moment neither
duplicates nor loses work, and that the liveness probe notices a reconciler that stopped ticking:

* `after-job-create`, `after-alias-move`, `after-rollout-patch`: the process exits abruptly (code
  `FAILPOINT_EXIT_CODE`, no cleanup, no Lease release) right after that step, as a crash would;
* `stall-reconcile`: every reconcile tick hangs forever, as a deadlocked handler would.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from mnist_operator.config import PREFIX, ConfigError

FAILPOINT_ENV = f"{PREFIX}TEST_FAILPOINT"
FAILPOINT_EXIT_CODE = 86
CrashPoint = Literal["after-job-create", "after-alias-move", "after-rollout-patch"]
CRASH_POINTS: frozenset[str] = frozenset({"after-job-create", "after-alias-move", "after-rollout-patch"})
STALL_RECONCILE = "stall-reconcile"
FAILPOINTS = CRASH_POINTS | {STALL_RECONCILE}


@dataclass(frozen=True)
class Failpoints:
    """The seam the reconciler calls at its named points; `armed` is the one point that fires."""

    armed: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Failpoints:
        env = os.environ if environ is None else environ
        name = env.get(FAILPOINT_ENV, "").strip()
        if not name:
            return NO_FAILPOINTS
        if name not in FAILPOINTS:
            raise ConfigError(f"{FAILPOINT_ENV}={name!r} is not one of {sorted(FAILPOINTS)}")
        return cls(name)

    def crash_after(self, point: CrashPoint, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        if self.armed != point:
            return
        logger.critical("test failpoint %s reached: exiting abruptly, as a crash would", point)
        logging.shutdown()
        os._exit(FAILPOINT_EXIT_CODE)

    async def stall_reconcile(self) -> None:
        if self.armed == STALL_RECONCILE:
            await asyncio.Event().wait()


NO_FAILPOINTS = Failpoints()
