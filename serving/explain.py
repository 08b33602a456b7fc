"""Occlusion sensitivity: which parts of the 28x28 model input the prediction depends on.

A black patch (the MNIST background) is slid over the image; the saliency of a pixel is the mean drop
in the predicted digit's probability over the placements whose patch covers it. The original and every
occluded copy go to the model as ONE batch, so an explanation costs one inference call (on the
default 4x4 patch and stride 2: 170 images) rather than one per placement.

Pure numpy around a `predict` callable ([N,28,28] float32 -> [N,10] probabilities), so it runs on
the served ONNX session or, in unit tests, on any function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from serving.model import IMAGE_SIDE, Float32Array

PATCH = 4
STRIDE = 2

Predict = Callable[[Float32Array], Float32Array]


@dataclass(frozen=True, slots=True)
class Explanation:
    probabilities: list[float]
    digit: int
    saliency: Float32Array  # [28,28]: mean drop of `digit`'s probability when the pixel is occluded


@cache
def _masks(patch: int, stride: int) -> tuple[Float32Array, Float32Array]:
    """Per placement a 28x28 mask (1 inside the patch), and per pixel how many placements cover it."""
    if not 1 <= patch <= IMAGE_SIDE or stride < 1:
        raise ValueError(f"patch must be 1..{IMAGE_SIDE} and stride at least 1 (got {patch}, {stride})")
    starts = list(range(0, IMAGE_SIDE - patch + 1, stride))
    # The last placement is pinned to the edge, so every pixel is covered whatever the stride.
    if starts[-1] != IMAGE_SIDE - patch:
        starts.append(IMAGE_SIDE - patch)
    masks = np.zeros((len(starts) ** 2, IMAGE_SIDE, IMAGE_SIDE), np.float32)
    for k, (top, left) in enumerate((t, s) for t in starts for s in starts):
        masks[k, top : top + patch, left : left + patch] = 1.0
    coverage = masks.sum(axis=0)
    masks.flags.writeable = False
    coverage.flags.writeable = False
    return masks, coverage


def placements(patch: int = PATCH, stride: int = STRIDE) -> int:
    return int(_masks(patch, stride)[0].shape[0])


def occlusion_batch(image: Float32Array, patch: int = PATCH, stride: int = STRIDE) -> Float32Array:
    """[1 + placements, 28, 28]: the image, then one copy per patch placement with the patch set to 0.

    0 is the MNIST background, so occluding background changes nothing and scores exactly 0."""
    masks, _ = _masks(patch, stride)
    batch = np.empty((masks.shape[0] + 1, IMAGE_SIDE, IMAGE_SIDE), np.float32)
    batch[0] = image
    np.multiply(image, np.float32(1.0) - masks, out=batch[1:])
    return batch


def explain(image: Float32Array, predict: Predict, patch: int = PATCH, stride: int = STRIDE) -> Explanation:
    """One model input ([28,28] float32 in [0,1]) -> its prediction and occlusion saliency map."""
    if image.shape != (IMAGE_SIDE, IMAGE_SIDE):
        raise ValueError(f"expected one {IMAGE_SIDE}x{IMAGE_SIDE} image, got shape {image.shape}")
    masks, coverage = _masks(patch, stride)
    probs = predict(occlusion_batch(image, patch, stride))
    if probs.shape[0] != masks.shape[0] + 1:
        raise ValueError(f"the model answered {probs.shape[0]} rows for {masks.shape[0] + 1} images")
    row = probs[0]
    digit = int(row.argmax())
    drops = (row[digit] - probs[1:, digit]).astype(np.float32)
    saliency = np.tensordot(drops, masks, axes=1) / coverage
    return Explanation(row.tolist(), digit, saliency.astype(np.float32))


__all__ = ["PATCH", "STRIDE", "Explanation", "explain", "occlusion_batch", "placements"]
