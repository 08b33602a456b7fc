"""Fixtures of the drift tests: the session's registered model (tests/conftest.py) as the drift job
loads it, its reference, and MNIST test images as undrifted and as shifted traffic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from contract.result import TrainingResult
from drift.detect import Reference
from drift.features import EmbeddingModel, Features
from drift.reference import ResolvedModel, reference_features, resolve_model
from local_mode.mlflow_server import MlflowServer

UInt8Array = npt.NDArray[np.uint8]


@pytest.fixture(scope="session")
def drift_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("drift-cache")


@pytest.fixture(scope="session")
def champion_uri(registered_model: TrainingResult) -> str:
    return f"models:/{registered_model.registered_model}@champion"


@pytest.fixture(scope="session")
def resolved_model(champion_uri: str, mlflow_server: MlflowServer, drift_cache: Path) -> ResolvedModel:
    """The champion's ONNX model, downloaded from the real registry as the drift job does."""
    return resolve_model(champion_uri, tracking_uri=mlflow_server.url, cache_dir=drift_cache)


@pytest.fixture(scope="session")
def embedder(resolved_model: ResolvedModel) -> EmbeddingModel:
    return EmbeddingModel.from_path(resolved_model.path)


@pytest.fixture(scope="session")
def reference(embedder: EmbeddingModel, mnist_path: Path, drift_cache: Path) -> Reference:
    return Reference.fit(
        reference_features(embedder, cache_dir=drift_cache / "references", data_path=mnist_path)
    )


@pytest.fixture(scope="session")
def mnist_test(mnist_path: Path) -> UInt8Array:
    with np.load(mnist_path) as data:
        return np.asarray(data["x_test"], dtype=np.uint8)


@pytest.fixture(scope="session")
def test_features(embedder: EmbeddingModel, mnist_test: UInt8Array) -> Features:
    return embedder.features(mnist_test)


def rotated(images: UInt8Array, seed: int = 0) -> UInt8Array:
    """Each image rotated by 20-30 degrees, either way (bench/drift.py's shift)."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(20, 30, len(images)) * rng.choice([-1, 1], len(images))
    return np.stack(
        [
            np.clip(ndimage.rotate(image.astype(np.float32), angle, reshape=False, order=1), 0, 255).astype(
                np.uint8
            )
            for image, angle in zip(images, angles, strict=True)
        ]
    )


def thickened(images: UInt8Array) -> UInt8Array:
    return np.asarray(ndimage.grey_dilation(images, size=(1, 2, 2)), dtype=np.uint8)


def inverted(images: UInt8Array) -> UInt8Array:
    return np.asarray(255 - images, dtype=np.uint8)
