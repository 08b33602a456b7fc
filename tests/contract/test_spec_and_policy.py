"""The promotion gate, the TrainingRun spec and the Job command line: pure code, no TensorFlow."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from contract.policy import decide
from contract.result import TERMINATION_MESSAGE_LIMIT, TrainingResult
from contract.spec import (
    Architecture,
    Hyperparameters,
    Optimizer,
    PromotionPolicySpec,
    TrainingRunSpec,
    load_manifests,
)
from contract.train_command import parse_train_command, spec_to_args
from local_mode.runner import load_manifest_files

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "manifests" / "trainingruns"


class TestPolicy:
    policy = PromotionPolicySpec(metric="test_accuracy", minimum=0.98, must_beat_champion=True, margin=0.001)

    def test_first_model_above_minimum_is_promoted(self) -> None:
        decision = decide({"test_accuracy": 0.985}, None, self.policy)
        assert decision.promote
        assert "no champion" in decision.reason

    def test_below_minimum_is_rejected_with_the_numbers(self) -> None:
        decision = decide({"test_accuracy": 0.97}, None, self.policy)
        assert not decision.promote
        assert "0.9700" in decision.reason and "0.9800" in decision.reason

    def test_must_beat_champion_by_the_margin(self) -> None:
        assert not decide({"test_accuracy": 0.9905}, {"test_accuracy": 0.99}, self.policy).promote
        assert decide({"test_accuracy": 0.9915}, {"test_accuracy": 0.99}, self.policy).promote

    def test_equal_to_champion_is_not_better(self) -> None:
        policy = self.policy.model_copy(update={"margin": 0.0})
        decision = decide({"test_accuracy": 0.99}, {"test_accuracy": 0.99}, policy)
        assert not decision.promote
        assert "does not beat" in decision.reason

    def test_champion_need_not_be_beaten_when_policy_says_so(self) -> None:
        policy = self.policy.model_copy(update={"must_beat_champion": False})
        assert decide({"test_accuracy": 0.985}, {"test_accuracy": 0.999}, policy).promote

    @pytest.mark.parametrize("value", [math.nan, math.inf])
    def test_non_finite_metric_is_rejected(self, value: float) -> None:
        assert not decide({"test_accuracy": value}, None, self.policy).promote

    def test_missing_metric_is_rejected(self) -> None:
        decision = decide({"accuracy": 0.999}, None, self.policy)
        assert not decision.promote
        assert "test_accuracy" in decision.reason

    def test_lower_is_better_metrics(self) -> None:
        policy = PromotionPolicySpec(metric="test_loss", minimum=0.1, higher_is_better=False, margin=0.0)
        assert decide({"test_loss": 0.05}, {"test_loss": 0.06}, policy).promote
        assert not decide({"test_loss": 0.07}, {"test_loss": 0.06}, policy).promote
        assert not decide({"test_loss": 0.2}, None, policy).promote


class TestSpec:
    def test_samples_are_the_designs_three_runs_plus_ours(self) -> None:
        manifests = {manifest.name: manifest.spec for manifest in load_manifest_files([SAMPLES])}
        assert list(manifests) == ["baseline", "enhanced", "optimized", "residual-bn"]
        baseline, enhanced, optimized = manifests["baseline"], manifests["enhanced"], manifests["optimized"]
        assert baseline.architecture is Architecture.BASELINE
        assert enhanced.architecture is optimized.architecture is Architecture.ENHANCED
        for spec in (baseline, enhanced):
            assert (spec.hyperparameters.learning_rate, spec.hyperparameters.batch_size) == (0.001, 128)
        assert (optimized.hyperparameters.learning_rate, optimized.hyperparameters.batch_size) == (0.0005, 64)
        assert all(spec.hyperparameters.epochs == 5 for spec in manifests.values())
        assert all(spec.hyperparameters.optimizer is Optimizer.ADAM for spec in manifests.values())
        assert manifests["residual-bn"].promotion.minimum == pytest.approx(0.993)

    def test_defaults_fill_an_empty_spec(self) -> None:
        spec = TrainingRunSpec.model_validate({})
        assert spec.registered_model == "mnist-cnn"
        assert spec.hyperparameters == Hyperparameters()
        assert spec.promotion.metric == "test_accuracy"

    @pytest.mark.parametrize(
        ("spec", "field"),
        [
            ({"architecture": "transformer"}, "architecture"),
            ({"hyperparameters": {"learningRate": 0}}, "learningRate"),
            ({"hyperparameters": {"batchSize": "big"}}, "batchSize"),
            ({"hyperparameters": {"epochs": 0}}, "epochs"),
            ({"registeredModel": "Not_A_DNS_Name"}, "registeredModel"),
            ({"learningRate": 0.1}, "learningRate"),
            ({"workers": 0}, "workers"),
            ({"workers": 17}, "workers"),
            ({"workers": 3}, "workers=3"),  # the default batchSize 128 does not split 3 ways
        ],
    )
    def test_invalid_specs_name_the_field(self, spec: dict[str, object], field: str) -> None:
        with pytest.raises(ValidationError) as error:
            TrainingRunSpec.model_validate(spec)
        assert field in str(error.value)

    def test_other_kinds_are_refused(self) -> None:
        with pytest.raises(ValidationError, match="kind"):
            load_manifests(
                "apiVersion: mnist-mlops.io/v1alpha1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n"
            )


class TestCommandLine:
    def test_spec_round_trips_through_the_job_arguments(self) -> None:
        for manifest in load_manifest_files([SAMPLES]):
            args = spec_to_args(manifest.spec, run_name=manifest.name)
            command = parse_train_command(args)
            assert command.spec.model_dump(exclude={"promotion"}) == manifest.spec.model_dump(
                exclude={"promotion"}
            )
            assert command.run_name == manifest.name

    def test_workers_round_trip_and_one_worker_adds_no_flag(self) -> None:
        spec = TrainingRunSpec.model_validate({"workers": 4, "hyperparameters": {"batchSize": 256}})
        args = spec_to_args(spec)
        assert "--workers=4" in args
        assert parse_train_command(args).spec == spec
        # A one-worker Job's command line is exactly what it was before multi-worker support.
        assert not any(arg.startswith("--workers") for arg in spec_to_args(TrainingRunSpec()))
        assert parse_train_command(spec_to_args(TrainingRunSpec())).spec.workers == 1

    def test_a_batch_that_does_not_split_among_workers_exits_with_usage(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "training_job", "train", "--workers=3", "--batch-size=128"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert "must divide evenly among workers=3" in result.stderr

    def test_bad_flag_values_exit_with_usage(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "training_job", "train", "--batch-size=0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2
        assert "batch_size" in result.stderr

    def test_training_result_fits_the_termination_message(self) -> None:
        result = TrainingResult(
            run_id="r" * 32,
            experiment_id="1",
            registered_model="mnist-cnn",
            model_version="12",
            architecture="residual-bn",
            metrics={"test_accuracy": 0.9931, "test_loss": 0.02},
            onnx_model_uri="models:/m-" + "a" * 32,
            keras_model_uri="runs:/" + "r" * 32 + "/keras-model",
        )
        assert TrainingResult.from_json(result.to_json()) == result
        huge = result.model_copy(update={"promotion_reason": "x" * TERMINATION_MESSAGE_LIMIT})
        with pytest.raises(ValueError, match="4 KiB"):
            huge.to_json()
        assert json.loads(result.to_json())["model_version"] == "12"
