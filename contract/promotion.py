"""The one promotion path: judge a registered version against the champion and move the aliases.

The training Job's `--promote`, the local runner and the operator all call `evaluate_and_promote`, so a
TrainingRun is judged on the same evidence (every metric its MLflow run logged) and leaves the same
tags wherever it ran. Blocking and synchronous: the operator calls it in a thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contract.constants import PROMOTED_ROLLED_BACK, PROMOTED_TAG, PROMOTED_TRUE, PROMOTION_REASON_TAG
from contract.policy import decide
from contract.registry import AliasMove, alias_version, promote, rollback, version_metrics
from contract.result import TrainingResult
from contract.spec import CHAMPION_ALIAS, PREVIOUS_ALIAS, PromotionPolicySpec, TrainingRunSpec

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("contract.promotion")


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

    Safe to repeat: if the registry shows this version was already promoted (the caller died between
    moving the alias and recording it), the decision is re-derived against the champion it replaced,
    now aliased `previous`, instead of against itself.
    """
    outcome = _judge(client, model, version, policy)
    client.set_model_version_tag(model, version, PROMOTION_REASON_TAG, outcome.reason)
    return outcome


def judge(client: MlflowClient, model: str, version: str, policy: PromotionPolicySpec) -> PromotionOutcome:
    """The gate's decision without moving any alias: a canary or shadow rollout passes the offline gate
    first and promotes (`contract.registry.promote`) only once its live analysis passed. `move` is None
    unless the version is already the champion (a promotion that happened before a restart)."""
    outcome = _judge(client, model, version, policy, move_alias=False)
    client.set_model_version_tag(model, version, PROMOTION_REASON_TAG, outcome.reason)
    return outcome


def _judge(
    client: MlflowClient, model: str, version: str, policy: PromotionPolicySpec, *, move_alias: bool = True
) -> PromotionOutcome:
    candidate = version_metrics(client, model, version)
    tags = client.get_model_version(model, version).tags or {}
    champion = alias_version(client, model, CHAMPION_ALIAS)
    if champion == version or tags.get(PROMOTED_TAG) in {PROMOTED_TRUE, PROMOTED_ROLLED_BACK}:
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
    return PromotionOutcome(
        True, decision.reason, champion, promote(client, model, version) if move_alias else None
    )


def apply_promotion(result: TrainingResult, spec: TrainingRunSpec, tracking_uri: str) -> TrainingResult:
    """Judges a version the caller just trained (the Job's `--promote`, the local runner) and records
    the outcome on its result, which the operator would otherwise record on the TrainingRun."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    outcome = evaluate_and_promote(client, result.registered_model, result.model_version, spec.promotion)
    log.info(
        "version %s: %s (%s)",
        result.model_version,
        "promoted" if outcome.promoted else "rejected",
        outcome.reason,
    )
    return result.model_copy(update={"promoted": outcome.promoted, "promotion_reason": outcome.reason})


def restore_champion(client: MlflowClient, move: AliasMove) -> bool:
    """Undoes a promotion if the alias still names its version; a later promotion is left alone."""
    if alias_version(client, move.model, CHAMPION_ALIAS) != move.new_version:
        return False
    rollback(client, move)
    if move.replaced_version is not None:
        # `previous` named the replaced version; after the rollback it is the champion again.
        client.delete_registered_model_alias(move.model, PREVIOUS_ALIAS)
    return True
