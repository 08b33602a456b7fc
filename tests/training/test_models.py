"""The architectures: the design's runs layer for layer, and ours."""

from __future__ import annotations

import numpy as np
import pytest

from contract.spec import Architecture, Hyperparameters, Optimizer
from training_job.models import build_model, build_optimizer


def test_baseline_is_the_designs_run_1() -> None:
    model = build_model(Architecture.BASELINE)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "MaxPooling2D", "Flatten", "Dense"]
    conv = model.layers[0]
    assert conv.filters == 32 and conv.kernel_size == (3, 3)
    # 3x3x32 conv (320) + 13*13*32 → 10 dense (54,090)
    assert model.count_params() == 320 + 54090


def test_enhanced_is_the_designs_run_2() -> None:
    model = build_model(Architecture.ENHANCED)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Conv2D", "MaxPooling2D", "Dropout", "Flatten", "Dense", "Dropout", "Dense"]
    assert [layer.rate for layer in model.layers if type(layer).__name__ == "Dropout"] == [0.25, 0.5]
    assert model.count_params() == 640 + (13 * 13 * 64 * 128 + 128) + 1290


@pytest.mark.parametrize("architecture", list(Architecture))
def test_every_architecture_maps_images_to_probabilities(architecture: Architecture) -> None:
    model = build_model(architecture)
    probabilities = np.asarray(model(np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)))
    assert probabilities.shape == (3, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_residual_bn_normalises_and_stays_small() -> None:
    model = build_model(Architecture.RESIDUAL_BN)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"BatchNormalization", "Add"} <= kinds
    assert model.count_params() < 100_000


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_optimizers_and_schedules(optimizer: Optimizer) -> None:
    import keras

    hyper = Hyperparameters(optimizer=optimizer, learning_rate=0.01, lr_schedule="cosine", epochs=2)
    cosine = build_optimizer(hyper, steps_per_epoch=10)
    assert type(cosine).__name__.lower() == optimizer.value
    schedule = cosine._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    # Decays over all 20 steps down to alpha (1%) of the initial rate.
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(20)) == pytest.approx(0.0001, rel=1e-3)
    constant = build_optimizer(hyper.model_copy(update={"lr_schedule": "constant"}), steps_per_epoch=10)
    assert float(np.asarray(constant.learning_rate)) == pytest.approx(0.01)
