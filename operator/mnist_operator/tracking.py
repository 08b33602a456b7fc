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

from training_job.policy import decide
from training_job.registry import AliasMove, alias_version, promote, rollback, version_metrics
from training_job.spec import CHAMPION_ALIAS, PREVIOUS_ALIAS, PromotionPolicySpec

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

T = TypeVar("T")

PROMOTED_TAG = "promoted"
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
            filter_string=f"tags.`trainingrun.uid` = '{trainingrun_uid}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if not runs:
            return None
        run_id = str(runs[0].info.run_id)
        history = [(int(m.step), float(m.value)) for m in client.get_metric_history(run_id, "val_accuracy")]
        return RunProgress(run_id, history)

    return guarded(read)


@dataclass(frozen=True)
class PromotionOutcome:
    promoted: bool
    reason: str
    champion_version: str | None
    move: AliasMove | None
    resumed: bool = False


def evaluate_and_promote(
    client: MlflowClient, model: str, version: str, policy: PromotionPolicySpec
) -> PromotionOutcome:
    """Applies the policy to `version` against the current champion and, if it wins, moves the aliases.

    Safe to repeat: if the registry shows this version was already promoted (the operator died
    between moving the alias and recording it), the decision is re-derived against the champion it
    replaced, now aliased `previous`, instead of against itself.
    """

    def run() -> PromotionOutcome:
        candidate = version_metrics(client, model, version)
        tags = client.get_model_version(model, version).tags or {}
        champion = alias_version(client, model, CHAMPION_ALIAS)
        if champion == version or tags.get(PROMOTED_TAG) in {"true", "rolled-back"}:
            replaced = alias_version(client, model, PREVIOUS_ALIAS) if champion == version else None
            compared = version_metrics(client, model, replaced) if replaced else None
            decision = decide(candidate, compared, policy)
            move = AliasMove(model, version, replaced) if champion == version else None
            note = "" if champion == version else f"; since replaced as champion by version {champion}"
            return PromotionOutcome(True, decision.reason + note, replaced, move, resumed=True)
        champion_metrics = version_metrics(client, model, champion) if champion else None
        decision = decide(candidate, champion_metrics, policy)
        if not decision.promote:
            return PromotionOutcome(False, decision.reason, champion, None)
        return PromotionOutcome(True, decision.reason, champion, promote(client, model, version))

    return guarded(run)


def champion_version(client: MlflowClient, model: str) -> str | None:
    return guarded(lambda: alias_version(client, model, CHAMPION_ALIAS))


def restore_champion(client: MlflowClient, move: AliasMove) -> bool:
    """Undoes a promotion if the alias still names its version; a later promotion is left alone."""

    def run() -> bool:
        if alias_version(client, move.model, CHAMPION_ALIAS) != move.new_version:
            return False
        rollback(client, move)
        if move.replaced_version is not None:
            # `previous` named the replaced version; after the rollback it is the champion again.
            client.delete_registered_model_alias(move.model, PREVIOUS_ALIAS)
        return True

    return guarded(run)
