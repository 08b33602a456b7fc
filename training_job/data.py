"""MNIST loading, validation and splits. numpy only: no TensorFlow here.

The test set is returned apart and is meant to be touched once, for the final evaluation; model
selection uses the validation split carved (with a seeded permutation) from the training set.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

PACKAGE_ROOT = Path(__file__).resolve().parent
# Where the bundled copy lives in a checkout and in the training image (which sets MNIST_NPZ).
BUNDLED_PATHS = (PACKAGE_ROOT.parent / "data" / "mnist.npz", Path("/opt/mnist/mnist.npz"))
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


class DataError(ValueError):
    """The data set is missing or not MNIST in the Keras layout."""


@dataclass(frozen=True)
class Split:
    images: npt.NDArray[np.float32]  # (N, 28, 28, 1), scaled to [0, 1]
    labels: npt.NDArray[np.int64]  # (N,), digits 0-9, as sparse categorical cross-entropy wants

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    train: Split
    validation: Split
    test: Split
    digest: str
    source: str


def default_data_path() -> Path | None:
    if os.environ.get("MNIST_NPZ"):
        return Path(os.environ["MNIST_NPZ"])
    return next((path for path in BUNDLED_PATHS if path.exists()), None)


def _check_array(name: str, array: npt.NDArray[np.generic], images: bool) -> None:
    if images and (array.ndim != 3 or array.shape[1:] != IMAGE_SHAPE):
        raise DataError(f"{name} has shape {array.shape}; expected (N, 28, 28)")
    if not images and array.ndim != 1:
        raise DataError(f"{name} has shape {array.shape}; expected (N,)")
    if array.shape[0] == 0:
        raise DataError(f"{name} is empty")


def load_raw(path: Path | None = None) -> tuple[dict[str, npt.NDArray[np.generic]], str]:
    """Reads the four Keras-layout arrays from a local .npz, or from the Keras download when none is given."""
    if path is None:
        path = default_data_path()
    if path is None:
        # Online machines only: this is the path the bundled copy stands in for when offline.
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        source = "keras.datasets.mnist"
    else:
        if not path.is_file():
            raise DataError(f"MNIST file not found: {path} (set MNIST_NPZ or pass --data)")
        try:
            with np.load(path, allow_pickle=False) as archive:
                missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
                if missing:
                    raise DataError(
                        f"{path} lacks arrays {sorted(missing)}; expected the Keras mnist.npz layout"
                    )
                arrays = {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(f"{path} is not a readable .npz file: {error}") from error
        source = str(path)
    for key in ("x_train", "x_test"):
        _check_array(key, arrays[key], images=True)
    for key in ("y_train", "y_test"):
        _check_array(key, arrays[key], images=False)
    for split in ("train", "test"):
        if arrays[f"x_{split}"].shape[0] != arrays[f"y_{split}"].shape[0]:
            raise DataError(f"x_{split} and y_{split} have different lengths")
        labels = arrays[f"y_{split}"]
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise DataError(f"y_{split} has labels outside 0-9")
    return arrays, source


def digest(arrays: dict[str, npt.NDArray[np.generic]]) -> str:
    """A content hash of the arrays (not the file bytes, which differ between compressed copies)."""
    sha = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        sha.update(f"{key}:{array.dtype}:{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def scale_images(images: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """uint8 0-255 (or floats already in [0, 1]) → float32 in [0, 1], shaped (N, 28, 28, 1)."""
    array = np.asarray(images)
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    return scaled.reshape((-1, *IMAGE_SHAPE, 1))


def load_dataset(
    path: Path | None = None,
    validation_split: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
) -> Dataset:
    if not 0.0 < validation_split < 0.5:
        raise DataError(f"validation_split must be in (0, 0.5), got {validation_split}")
    arrays, source = load_raw(path)
    data_digest = digest(arrays)
    permutation = np.random.default_rng(seed).permutation(arrays["x_train"].shape[0])
    n_validation = round(len(permutation) * validation_split)
    validation_index, train_index = permutation[:n_validation], permutation[n_validation:]
    if max_train_samples is not None:
        if max_train_samples < 1:
            raise DataError("max_train_samples must be positive")
        train_index = train_index[:max_train_samples]
        validation_index = validation_index[: max(1, max_train_samples // 5)]
    x_train, y_train = arrays["x_train"], arrays["y_train"].astype(np.int64)

    def split(index: npt.NDArray[np.intp]) -> Split:
        return Split(scale_images(x_train[index]), y_train[index])

    test = Split(scale_images(arrays["x_test"]), arrays["y_test"].astype(np.int64))
    return Dataset(split(train_index), split(validation_index), test, data_digest, source)
