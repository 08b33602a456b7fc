"""`promotion.maxQuantizationLoss`: the gate refuses a version whose int8 model loses more test accuracy
against its float model than the spec tolerates. The decision is pure; one test runs it through the
one promotion path against a real MLflow server, where the reason lands on the version."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from contract.constants import PROMOTION_REASON_TAG
from contract.policy import INT8_ACCURACY_METRIC, QUANTIZATION_DELTA_METRIC, decide
from contract.promotion import evaluate_and_promote
from contract.registry import alias_version
from contract.spec import PromotionPolicySpec, TrainingRunSpec
from contract.train_command import parse_train_command
from local_mode.mlflow_server import MlflowServer

POLICY = PromotionPolicySpec(minimum=0.9, must_beat_champion=False, max_quantization_loss=0.002)


def candidate(float_accuracy: float, int8_accuracy: float) -> dict[str, float]:
    # As training computes it: the difference of two accuracies over the same 10,000 images.
    return {
        "test_accuracy": float_accuracy,
        INT8_ACCURACY_METRIC: int8_accuracy,
        QUANTIZATION_DELTA_METRIC: int8_accuracy - float_accuracy,
    }


def test_a_loss_beyond_the_tolerance_is_refused_with_the_numbers() -> None:
    decision = decide(candidate(0.9911, 0.9880), None, POLICY)
    assert not decision.promote
    assert "int8" in decision.reason and "0.0031" in decision.reason and "0.002" in decision.reason


@pytest.mark.parametrize(
    ("float_accuracy", "int8_accuracy"),
    [
        # Exactly the tolerance, 20 images in 10,000: 0.9891 - 0.9911 is -0.0020000000000000018 in floats.
        (0.9911, 0.9891),
        (0.9911, 0.9905),
        (0.9911, 0.9913),  # quantisation may well gain an image or two
    ],
)
def test_a_loss_within_the_tolerance_is_accepted(float_accuracy: float, int8_accuracy: float) -> None:
    assert decide(candidate(float_accuracy, int8_accuracy), None, POLICY).promote


def test_without_an_int8_model_the_tolerance_cannot_be_shown() -> None:
    decision = decide({"test_accuracy": 0.99}, None, POLICY)
    assert not decision.promote
    assert QUANTIZATION_DELTA_METRIC in decision.reason


def test_unset_the_int8_model_does_not_gate() -> None:
    policy = POLICY.model_copy(update={"max_quantization_loss": None})
    assert decide({"test_accuracy": 0.99}, None, policy).promote
    assert decide(candidate(0.99, 0.5), None, policy).promote


def test_the_minimum_is_reported_before_the_quantisation_loss() -> None:
    decision = decide(candidate(0.85, 0.80), None, POLICY)
    assert not decision.promote
    assert "below the minimum" in decision.reason


def test_a_version_that_beats_the_champion_is_still_refused_for_its_int8_loss() -> None:
    policy = POLICY.model_copy(update={"must_beat_champion": True})
    decision = decide(candidate(0.995, 0.98), {"test_accuracy": 0.99}, policy)
    assert not decision.promote
    assert "maxQuantizationLoss" in decision.reason


def test_the_spec_field_is_camel_case_and_bounded() -> None:
    spec = TrainingRunSpec.model_validate({"promotion": {"maxQuantizationLoss": 0.005}})
    assert spec.promotion.max_quantization_loss == 0.005
    assert TrainingRunSpec().promotion.max_quantization_loss is None
    for bad in (-0.001, 1.5):
        with pytest.raises(ValidationError):
            TrainingRunSpec.model_validate({"promotion": {"maxQuantizationLoss": bad}})


def test_the_job_command_line_carries_the_tolerance_to_its_own_gate() -> None:
    command = parse_train_command(["train", "--promote", "--max-quantization-loss=0.003"])
    assert command.spec.promotion.max_quantization_loss == 0.003
    assert parse_train_command(["train"]).spec.promotion.max_quantization_loss is None


def test_the_refusal_reason_is_recorded_on_the_version(mlflow_server: MlflowServer) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    model = f"quantization-gate-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(model)
    experiment = client.get_experiment_by_name("quantization-gate") or None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("quantization-gate")

    def register(metrics: dict[str, float]) -> str:
        run = client.create_run(experiment_id)
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        return str(
            client.create_model_version(model, f"runs:/{run.info.run_id}/m", run_id=run.info.run_id).version
        )

    lossy = register(candidate(0.9911, 0.9850))
    outcome = evaluate_and_promote(client, model, lossy, POLICY)
    assert not outcome.promoted
    reason = client.get_model_version(model, lossy).tags[PROMOTION_REASON_TAG]
    assert reason == outcome.reason and "maxQuantizationLoss" in reason
    assert alias_version(client, model) is None

    faithful = register(candidate(0.9911, 0.9905))
    assert evaluate_and_promote(client, model, faithful, POLICY).promoted
    assert alias_version(client, model) == faithful
