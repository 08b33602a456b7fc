"""`python -m mnist_operator`: leader election, then kopf with the handlers of `mnist_operator.handlers`."""

from __future__ import annotations

import asyncio
import logging
import sys

import kopf

from mnist_operator.config import ConfigError, OperatorConfig
from mnist_operator.handlers import register
from mnist_operator.kube import api_client
from mnist_operator.leader import Elector, StandbyHealth, run_as_leader
from mnist_operator.testing_hooks import FAILPOINT_ENV, Failpoints

EXIT_CONFIG = 2
EXIT_LOST_LEASE = 3

logger = logging.getLogger("mnist_operator")


async def run(config: OperatorConfig, failpoints: Failpoints) -> int:
    registry = kopf.OperatorRegistry()
    register(registry, config)

    async def operate() -> None:
        # No kopf liveness endpoint: the startup hook serves /healthz (mnist_operator.liveness).
        await kopf.operator(
            registry=registry,
            memo=kopf.Memo(config=config, failpoints=failpoints),
            standalone=True,
            clusterwide=config.clusterwide,
            namespaces=list(config.namespaces),
        )

    if not config.leader_election:
        await operate()
        return 0
    api = await api_client()
    try:
        elector = Elector(
            api,
            name=config.lease_name,
            namespace=config.lease_namespace,
            identity=config.identity,
            lease_duration=config.lease_duration_seconds,
        )
        health = StandbyHealth(
            config.health_host,
            config.health_port,
            lambda: {"identity": config.identity, "leader": elector.holder},
        )
        if not await run_as_leader(elector, health, operate):
            logger.error("stopping: another replica may lead now")
            return EXIT_LOST_LEASE
        return 0
    finally:
        await api.close()  # type: ignore[no-untyped-call]


ROUTINE_MESSAGES = (
    "Timer 'reconcile' succeeded",
    "Handler 'liveness' succeeded",
    "Timer 'retraining' succeeded",
)


def _quiet_routine(record: logging.LogRecord) -> bool:
    return not (record.levelno <= logging.INFO and record.getMessage().startswith(ROUTINE_MESSAGES))


def main() -> int:
    try:
        config = OperatorConfig.from_env()
        failpoints = Failpoints.from_env()
    except ConfigError as error:
        print(f"mnist-operator: {error}", file=sys.stderr)
        return EXIT_CONFIG
    kopf.configure(
        verbose=config.log_level == "DEBUG",
        log_format=kopf.LogFormat.JSON if config.log_json else kopf.LogFormat.PLAIN,
    )
    logging.getLogger().setLevel(config.log_level)
    # Every reconcile tick and watch event would otherwise log a line; failures are still logged.
    logging.getLogger("kopf.objects").addFilter(_quiet_routine)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    scope = "every namespace" if config.clusterwide else ", ".join(config.namespaces)
    logger.info(
        "mnist-operator %s: watching %s; MLflow at %s", config.identity, scope, config.mlflow_tracking_uri
    )
    if failpoints.armed:
        logger.warning("TEST-ONLY failpoint %s is armed (%s)", failpoints.armed, FAILPOINT_ENV)
    return asyncio.run(run(config, failpoints))


if __name__ == "__main__":
    sys.exit(main())
