"""Occlusion saliency (`serving.explain`): on models whose answer depends on known pixels, then on a
real ONNX Runtime session. No server: `POST /explain` is tested in test_websocket.py with the live
predictions that share its code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving import explain
from serving.model import Float32Array, OnnxClassifier

SIDE = 28


def bar() -> Float32Array:
    """A vertical stroke: a "1" in the middle of the image."""
    image = np.zeros((SIDE, SIDE), np.float32)
    image[5:23, 13:15] = 1.0
    return image


def ring() -> Float32Array:
    image = np.zeros((SIDE, SIDE), np.float32)
    image[6:22, 8:10] = image[6:22, 18:20] = image[6:8, 8:20] = image[20:22, 8:20] = 1.0
    return image


# A linear "model" that reads the bar as 1 and the ring as 0 and ignores every other pixel (the
# corners in particular): which pixels matter is known exactly.
# Small weights keep it unsure (p ~ 0.8): a saturated softmax would hardly move under occlusion.
WEIGHTS = np.zeros((SIDE * SIDE, 10), np.float32)
WEIGHTS[:, 1] = bar().ravel() * 0.1
WEIGHTS[:, 0] = ring().ravel() * 0.04


def linear(images: Float32Array) -> Float32Array:
    logits = images.reshape(images.shape[0], -1) @ WEIGHTS
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    probs: Float32Array = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probs


class Counting:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: Float32Array) -> Float32Array:
        assert images.dtype == np.float32 and images.shape[1:] == (SIDE, SIDE)
        self.batches.append(images.shape[0])
        return linear(images)


def test_one_batched_model_call_and_a_28x28_map() -> None:
    model = Counting()
    result = explain.explain(bar(), model)
    # 4x4 patch, stride 2: 13 x 13 placements, plus the image itself.
    assert model.batches == [1 + 13 * 13] == [1 + explain.placements()]
    assert result.saliency.shape == (SIDE, SIDE) and result.saliency.dtype == np.float32
    assert result.digit == 1
    assert result.probabilities == pytest.approx(linear(bar()[np.newaxis])[0].tolist())


def test_irrelevant_pixels_score_zero_and_the_stroke_scores_high() -> None:
    image = bar()
    image[0:4, 0:4] = 1.0  # ink the model ignores: a blot in a corner
    result = explain.explain(image, linear)
    saliency = result.saliency
    assert result.digit == 1
    assert np.abs(saliency[0:3, 0:3]).max() < 1e-6  # the blot: occluding it changes nothing
    assert np.abs(saliency[:, :8]).max() < 1e-6 and np.abs(saliency[:, 20:]).max() < 1e-6
    on_stroke = saliency[5:23, 13:15]
    assert on_stroke.min() > 0.01
    # The hottest pixel is on the stroke or right beside it (a patch covering one covers both), not
    # on the blot or the background beyond.
    row, col = np.unravel_index(int(saliency.argmax()), saliency.shape)
    assert 5 <= row < 23 and 12 <= col <= 15


def test_occluding_the_stroke_lowers_the_class_probability() -> None:
    batch = explain.occlusion_batch(bar())
    probs = linear(batch)
    original = probs[0, 1]
    # Placement (row 4, col 6) covers rows 8..11, columns 12..15: a piece of the stroke.
    index = 1 + 4 * 13 + 6
    assert batch[index, 8:12, 12:16].max() == 0.0 and batch[0, 8:12, 13:15].min() == 1.0
    assert probs[index, 1] < original - 0.01
    # The first placement covers only background: nothing changes.
    assert probs[1, 1] == pytest.approx(original)
    # The map is built from exactly these drops.
    drops = original - probs[1:, 1]
    assert explain.explain(bar(), linear).saliency.max() == pytest.approx(drops.max(), rel=0.5)


def test_every_pixel_is_covered_whatever_the_stride() -> None:
    # 28 is not a multiple of 4 past a 7-pixel patch: the last placement is pinned to the edge.
    image = np.ones((SIDE, SIDE), np.float32)
    batch = explain.occlusion_batch(image, patch=7, stride=4)
    occluded = (batch[1:] == 0).any(axis=0)
    assert occluded.all()
    assert batch.shape == (1 + 7 * 7, SIDE, SIDE)
    with pytest.raises(ValueError, match="28x28"):
        explain.explain(np.zeros((SIDE, SIDE, 1), np.float32), linear)


def tiny_onnx(path: Path) -> Path:
    """`linear` as an ONNX graph with the training contract's NHWC input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", SIDE, SIDE, 1])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, SIDE * SIDE], np.int64), "shape"),
        numpy_helper.from_array(WEIGHTS, "w"),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_on_an_onnx_runtime_session_in_one_run(tmp_path: Path) -> None:
    classifier = OnnxClassifier(tiny_onnx(tmp_path / "tiny.onnx"))
    session = classifier.session
    runs: list[tuple[int, ...]] = []
    real_run = session.run

    def counted(outputs: Any, feeds: dict[str, Any]) -> Any:
        runs.append(feeds["x"].shape)
        return real_run(outputs, feeds)

    session.run = counted
    result = explain.explain(ring(), classifier.predict)
    assert runs == [(1 + 13 * 13, SIDE, SIDE, 1)]
    expected = explain.explain(ring(), linear)
    assert result.digit == expected.digit == 0
    np.testing.assert_allclose(result.saliency, expected.saliency, atol=1e-6)
