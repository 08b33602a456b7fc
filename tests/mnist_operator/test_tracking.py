"""The operator's MLflow side against a real MLflow server: the promotion decision, alias moves that
survive a crash at any point, the rollback, progress reading, and MLflow being down.

Model versions here are registered from runs that only log metrics (no training): the operator
never opens a model, it compares the metrics of the runs behind the versions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from contract.registry import alias_version, promote
from contract.spec import CHAMPION_ALIAS, PREVIOUS_ALIAS, PromotionPolicySpec
from local_mode.mlflow_server import MlflowServer
from local_mode.processes import free_port
from mnist_operator import tracking

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

POLICY = PromotionPolicySpec(minimum=0.9, must_beat_champion=True, margin=0.001)


@pytest.fixture
def client(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return tracking.make_client(mlflow_server.url)


@pytest.fixture
def model(client: MlflowClient) -> Iterator[str]:
    name = f"operator-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    yield name


def register(client: MlflowClient, model: str, accuracy: float, uid: str = "") -> str:
    experiment = client.get_experiment_by_name("operator-tests") or None
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment("operator-tests")
    )
    run = client.create_run(experiment_id, tags={"trainingrun.uid": uid} if uid else None)
    client.log_metric(run.info.run_id, "test_accuracy", accuracy)
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return str(version.version)


def aliases(client: MlflowClient, model: str) -> tuple[str | None, str | None]:
    return alias_version(client, model, CHAMPION_ALIAS), alias_version(client, model, PREVIOUS_ALIAS)


def test_first_version_becomes_champion(client: MlflowClient, model: str) -> None:
    version = register(client, model, 0.95)
    outcome = tracking.evaluate_and_promote(client, model, version, POLICY)
    assert outcome.promoted and outcome.champion_version is None
    assert "no champion yet" in outcome.reason
    assert aliases(client, model) == (version, None)


def test_better_version_replaces_champion_and_keeps_previous(client: MlflowClient, model: str) -> None:
    first = register(client, model, 0.95)
    tracking.evaluate_and_promote(client, model, first, POLICY)
    second = register(client, model, 0.97)
    outcome = tracking.evaluate_and_promote(client, model, second, POLICY)
    assert outcome.promoted and outcome.champion_version == first
    assert outcome.move is not None and outcome.move.replaced_version == first
    assert aliases(client, model) == (second, first)


@pytest.mark.parametrize(("accuracy", "why"), [(0.9505, "does not beat"), (0.85, "below the minimum")])
def test_rejected_version_moves_nothing(client: MlflowClient, model: str, accuracy: float, why: str) -> None:
    first = register(client, model, 0.95)
    tracking.evaluate_and_promote(client, model, first, POLICY)
    candidate = register(client, model, accuracy)
    outcome = tracking.evaluate_and_promote(client, model, candidate, POLICY)
    assert not outcome.promoted and why in outcome.reason
    assert outcome.champion_version == first
    assert aliases(client, model) == (first, None)


def test_repeating_after_a_crash_does_not_promote_twice(client: MlflowClient, model: str) -> None:
    first = register(client, model, 0.95)
    tracking.evaluate_and_promote(client, model, first, POLICY)
    second = register(client, model, 0.97)
    # The operator moved the alias and died before recording the decision on the TrainingRun.
    promote(client, model, second)
    outcome = tracking.evaluate_and_promote(client, model, second, POLICY)
    assert outcome.resumed and outcome.promoted
    # Judged against the champion it replaced, not against itself.
    assert outcome.champion_version == first
    assert "beats the champion's 0.9500" in outcome.reason
    assert outcome.move is not None and outcome.move.replaced_version == first
    # `previous` still names the replaced champion, not the candidate itself.
    assert aliases(client, model) == (second, first)


def test_restore_champion_undoes_only_its_own_promotion(client: MlflowClient, model: str) -> None:
    first = register(client, model, 0.95)
    tracking.evaluate_and_promote(client, model, first, POLICY)
    second = register(client, model, 0.97)
    move = tracking.evaluate_and_promote(client, model, second, POLICY).move
    assert move is not None
    assert tracking.restore_champion(client, move)
    assert aliases(client, model) == (first, None)
    assert client.get_model_version(model, second).tags["promoted"] == "rolled-back"
    # A second rollback of the same move finds the alias elsewhere and leaves it alone.
    assert not tracking.restore_champion(client, move)
    assert aliases(client, model) == (first, None)


def test_restore_without_earlier_champion_removes_the_alias(client: MlflowClient, model: str) -> None:
    version = register(client, model, 0.95)
    move = tracking.evaluate_and_promote(client, model, version, POLICY).move
    assert move is not None and move.replaced_version is None
    assert tracking.restore_champion(client, move)
    assert aliases(client, model) == (None, None)


def test_progress_is_found_by_the_trainingrun_uid(client: MlflowClient) -> None:
    uid = str(uuid.uuid4())
    experiment = f"progress-{uid[:8]}"
    assert tracking.read_progress(client, experiment, uid) is None
    experiment_id = client.create_experiment(experiment)
    assert tracking.read_progress(client, experiment, uid) is None
    run = client.create_run(experiment_id, tags={"trainingrun.uid": uid})
    client.log_metric(run.info.run_id, "val_accuracy", 0.91, step=0)
    client.log_metric(run.info.run_id, "val_accuracy", 0.95, step=1)
    progress = tracking.read_progress(client, experiment, uid)
    assert progress is not None and progress.run_id == run.info.run_id
    assert sorted(progress.history) == [(0, 0.91), (1, 0.95)]


def test_unknown_version_is_a_data_error(client: MlflowClient, model: str) -> None:
    with pytest.raises(tracking.MlflowDataError):
        tracking.evaluate_and_promote(client, model, "99", POLICY)


def test_unreachable_mlflow_fails_fast_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = tracking.make_client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(tracking.MlflowUnavailableError):
        tracking.evaluate_and_promote(dead, "mnist-cnn", "1", POLICY)
    with pytest.raises(tracking.MlflowUnavailableError):
        tracking.read_progress(dead, "mnist", "uid")
