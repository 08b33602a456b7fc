"""The drift decision, on the session's real model: the embedding it exposes, undrifted MNIST test
windows staying quiet, shifted ones flagged, and too-small windows left undecided.

The false-alarm rate itself is measured on hundreds of windows by bench/drift.py (`make bench-drift`);
a handful of seeded windows here guard the wiring, which a broken feature or test would flag at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from drift.detect import (
    COMBINED,
    CONFIDENCE,
    EMBEDDING,
    PREDICTED_LABEL,
    DriftConfig,
    DriftConfigError,
    Reference,
    evaluate,
)
from drift.features import EMBEDDING_OUTPUT, EmbeddingModel, FeatureError, Features, embedding_tensor
from drift.reference import ResolvedModel, validation_index
from tests.drift.conftest import inverted, rotated, thickened
from training_job.data import load_dataset

WINDOW = 500
UInt8Array = npt.NDArray[np.uint8]


def _synthetic(rng: np.random.Generator, count: int, shift: float = 0.0) -> Features:
    embeddings = rng.normal(size=(count, 24)).astype(np.float32)
    embeddings[:, :3] += shift
    logits = embeddings[:, :10] * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return Features(embeddings, probabilities.astype(np.float32))


def test_decision_on_synthetic_features() -> None:
    """No model: the statistics alone. Same distribution stays quiet, a shifted mean is flagged, and
    the result is deterministic."""
    rng = np.random.default_rng(3)
    reference = Reference.fit(_synthetic(rng, 2000), components=4)
    config = DriftConfig(alpha=0.001)
    quiet = [evaluate(reference, _synthetic(rng, WINDOW), config) for _ in range(5)]
    assert not any(r.detected for r in quiet), [r.reason for r in quiet]
    shifted = _synthetic(rng, WINDOW, shift=0.5)
    result = evaluate(reference, shifted, config)
    assert result.detected and result.decided, result.reason
    assert result.p_value is not None and result.p_value < config.alpha
    assert len(result.tests) == 4 + 2 and result.per_test_alpha == pytest.approx(0.001 / 6)
    assert evaluate(reference, shifted, config) == result
    assert set(result.family_p_values()) == {EMBEDDING, PREDICTED_LABEL, CONFIDENCE, COMBINED}


def test_too_small_a_window_is_no_decision() -> None:
    rng = np.random.default_rng(4)
    reference = Reference.fit(_synthetic(rng, 500), components=4)
    result = evaluate(reference, _synthetic(rng, 20, shift=5.0), DriftConfig(min_samples=100))
    assert not result.decided and not result.detected
    assert result.p_value is None and result.tests == ()
    assert "20 samples" in result.reason and "100" in result.reason


@pytest.mark.parametrize(
    ("config", "message"),
    [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"min_samples": 1}, "min_samples")],
)
def test_bad_settings_are_refused(config: dict[str, float], message: str) -> None:
    with pytest.raises(DriftConfigError, match=message):
        DriftConfig(**config)  # type: ignore[arg-type]


def test_the_reference_is_the_validation_split_the_training_never_fits(mnist_path: Path) -> None:
    """drift/reference.py reproduces training_job.data's split: the reference must be unseen images."""
    dataset = load_dataset(mnist_path)
    with np.load(mnist_path) as data:
        raw = data["x_train"]
    index = validation_index(raw.shape[0])
    assert len(index) == len(dataset.validation)
    np.testing.assert_array_equal(np.rint(dataset.validation.images[:50, ..., 0] * 255), raw[index[:50]])


def test_the_embedding_is_exposed_without_changing_the_model(
    resolved_model: ResolvedModel, embedder: EmbeddingModel, mnist_test: UInt8Array
) -> None:
    proto = onnx.load(str(resolved_model.path))
    # The baseline CNN: the flattened convolution features feed the one dense layer.
    assert "flatten" in embedding_tensor(proto).lower()
    assert embedder.embedding_dim == 13 * 13 * 32
    assert [o.name for o in proto.graph.output] == ["probabilities"], "the file itself is untouched"
    plain = ort.InferenceSession(str(resolved_model.path), providers=["CPUExecutionProvider"])
    images = mnist_test[:64]
    expected = plain.run(None, {"image": (images.astype(np.float32) / 255).reshape(-1, 28, 28, 1)})[0]
    features = embedder.features(images)
    np.testing.assert_allclose(features.probabilities, expected, atol=1e-6)
    assert features.embeddings.shape == (64, embedder.embedding_dim)
    assert EMBEDDING_OUTPUT in embedder.output_names
    # uint8 and the same images as floats in 0..1 are the same input.
    np.testing.assert_allclose(embedder.features(images / 255.0).embeddings, features.embeddings, atol=1e-5)
    assert len(embedder.features(np.zeros((0, 28, 28), np.uint8))) == 0
    with pytest.raises(FeatureError, match="28"):
        embedder.features(np.zeros((2, 32, 32), np.uint8))


def test_undrifted_mnist_test_windows_stay_quiet(reference: Reference, test_features: Features) -> None:
    rng = np.random.default_rng(11)
    results = [
        evaluate(reference, test_features.subset(rng.choice(len(test_features), WINDOW, replace=False)))
        for _ in range(6)
    ]
    assert all(r.decided for r in results)
    assert not any(r.detected for r in results), [r.reason for r in results]


@pytest.mark.parametrize("shift", [inverted, thickened, rotated], ids=["inverted", "thickened", "rotated"])
def test_shifted_windows_raise_the_score_and_are_detected(
    shift: Callable[[UInt8Array], UInt8Array],
    embedder: EmbeddingModel,
    reference: Reference,
    test_features: Features,
    mnist_test: UInt8Array,
) -> None:
    rng = np.random.default_rng(12)
    index = rng.choice(len(mnist_test), WINDOW, replace=False)
    undrifted = evaluate(reference, test_features.subset(index))
    drifted = evaluate(reference, embedder.features(shift(mnist_test[index])))
    assert drifted.detected, drifted.reason
    assert drifted.p_value is not None and drifted.p_value < drifted.alpha
    assert drifted.family_scores()[EMBEDDING] > undrifted.family_scores()[EMBEDDING]
    assert max(drifted.family_scores().values()) > max(undrifted.family_scores().values())


def test_a_window_from_another_model_is_refused(reference: Reference) -> None:
    other = Features(np.zeros((200, 7), np.float32), np.full((200, 10), 0.1, np.float32))
    with pytest.raises(DriftConfigError, match="another model"):
        evaluate(reference, other)
