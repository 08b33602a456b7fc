"""The operator's MLflow side: progress, the promotion decision and the alias moves.

Blocking (the MLflow client is synchronous): the handlers call these through `asyncio.to_thread`.
Every function is safe to repeat after a crash at any point, which is what makes an operator
restart harmless: the registry itself records what was already done.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from contract import promotion
from contract.constants import TRAININGRUN_UID_TAG
from contract.promotion import PromotionOutcome
from contract.registry import AliasMove, alias_version
from contract.spec import CHAMPION_ALIAS, PromotionPolicySpec

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

T = TypeVar("T")

# MLflow error codes that mean "not now" rather than "never": the server or its database is down.
TRANSIENT_ERROR_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
)


class MlflowUnavailableError(RuntimeError):
    """MLflow cannot be reached or failed transiently: retry later."""


class MlflowDataError(RuntimeError):
    """MLflow answered, but what the run needs is not there (e.g. the model version): retrying won't help."""


def configure_client_environment(timeout_seconds: int) -> None:
    """The MLflow client retries a dead server for minutes by default; the operator retries itself,
    with a status condition and backoff, so each call fails fast instead."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_seconds))


def make_client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def guarded(call: Callable[[], T]) -> T:
    """Runs an MLflow call, mapping its failures onto MlflowUnavailableError / MlflowDataError."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as error:
        if error.error_code in TRANSIENT_ERROR_CODES:
            raise MlflowUnavailableError(_first_line(error.message)) from error
        raise MlflowDataError(_first_line(error.message)) from error
    except (requests.RequestException, OSError) as error:
        raise MlflowUnavailableError(_first_line(str(error))) from error


def _first_line(text: str, limit: int = 400) -> str:
    line = next((part for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class RunProgress:
    run_id: str
    history: list[tuple[int, float]]


def read_progress(client: MlflowClient, experiment: str, trainingrun_uid: str) -> RunProgress | None:
    """The MLflow run of a TrainingRun (found by its uid tag) and its val_accuracy per epoch so far."""

    def read() -> RunProgress | None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.`{TRAININGRUN_UID_TAG}` = '{trainingrun_uid}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if not runs:
            return None
        run_id = str(runs[0].info.run_id)
        history = [(int(m.step), float(m.value)) for m in client.get_metric_history(run_id, "val_accuracy")]
        return RunProgress(run_id, history)

    return guarded(read)


def evaluate_and_promote(
    client: MlflowClient, model: str, version: str, policy: PromotionPolicySpec
) -> PromotionOutcome:
    return guarded(lambda: promotion.evaluate_and_promote(client, model, version, policy))


def champion_version(client: MlflowClient, model: str) -> str | None:
    return guarded(lambda: alias_version(client, model, CHAMPION_ALIAS))


def restore_champion(client: MlflowClient, move: AliasMove) -> bool:
    """Undoes a promotion if the alias still names its version; a later promotion is left alone."""
    return guarded(lambda: promotion.restore_champion(client, move))
