"""Registry operations on MLflow aliases, shared by the local runner and the operator.

Aliases, not the deprecated stages: `champion` names the served version and `previous` the one it
replaced, so a rollback is one alias move. TensorFlow-free: only the MLflow client is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from contract.constants import PROMOTED_ROLLED_BACK, PROMOTED_TAG, PROMOTED_TRUE
from contract.spec import CHAMPION_ALIAS, PREVIOUS_ALIAS

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


@dataclass(frozen=True)
class AliasMove:
    model: str
    new_version: str
    replaced_version: str | None


def alias_version(client: MlflowClient, model: str, alias: str = CHAMPION_ALIAS) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as error:
        if error.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            return None
        raise


def version_metrics(client: MlflowClient, model: str, version: str) -> dict[str, float]:
    """The metrics of the run that produced a version: the evidence the promotion gate compares."""
    model_version = client.get_model_version(model, version)
    if not model_version.run_id:
        return {}
    return {key: float(value) for key, value in client.get_run(model_version.run_id).data.metrics.items()}


def promote(
    client: MlflowClient,
    model: str,
    version: str,
    alias: str = CHAMPION_ALIAS,
    previous_alias: str = PREVIOUS_ALIAS,
) -> AliasMove:
    """Points `alias` at `version`, keeping the replaced version reachable as `previous_alias`.

    Idempotent: promoting the version the alias already names changes nothing, so an operator that
    restarts half-way through a promotion can simply do it again.
    """
    current = alias_version(client, model, alias)
    if current == version:
        return AliasMove(model, version, alias_version(client, model, previous_alias))
    if current is not None:
        client.set_registered_model_alias(model, previous_alias, current)
    client.set_registered_model_alias(model, alias, version)
    client.set_model_version_tag(model, version, PROMOTED_TAG, PROMOTED_TRUE)
    return AliasMove(model, version, current)


def rollback(client: MlflowClient, move: AliasMove, alias: str = CHAMPION_ALIAS) -> None:
    """Undoes a promotion: the alias returns to the version it named before (or is removed)."""
    client.set_model_version_tag(move.model, move.new_version, PROMOTED_TAG, PROMOTED_ROLLED_BACK)
    if move.replaced_version is None:
        client.delete_registered_model_alias(move.model, alias)
    else:
        client.set_registered_model_alias(move.model, alias, move.replaced_version)
