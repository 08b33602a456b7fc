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
class Feedback:
    """Labelled examples from the prediction log: uint8 (N, 28, 28) as MNIST stores them."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    source: str = "prediction-log"

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    train: Split
    validation: Split
    test: Split
    digest: str
    source: str
    # How many of `train`'s examples came from MNIST and how many from the prediction log's feedback,
    # and a digest of exactly the training split's arrays: what this version learned from.
    mnist_train: int = 0
    feedback: int = 0
    train_digest: str = ""
    feedback_source: str = ""

    def composition(self) -> dict[str, int]:
        """mnist_train, feedback, and the training split's examples per label (label_0 … label_9)."""
        counts = np.bincount(self.train.labels, minlength=NUM_CLASSES)
        return {
            "mnist_train": self.mnist_train,
            "feedback": self.feedback,
            **{f"label_{digit}": int(counts[digit]) for digit in range(NUM_CLASSES)},
        }


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


def check_feedback(feedback: Feedback) -> None:
    if feedback.images.dtype != np.uint8:
        raise DataError(f"feedback images are {feedback.images.dtype}; expected uint8 like MNIST")
    if len(feedback) == 0:
        return
    _check_array("feedback images", feedback.images, images=True)
    _check_array("feedback labels", feedback.labels, images=False)
    if feedback.images.shape[0] != feedback.labels.shape[0]:
        raise DataError("feedback images and labels have different lengths")
    if feedback.labels.min() < 0 or feedback.labels.max() >= NUM_CLASSES:
        raise DataError("feedback has labels outside 0-9")


def load_dataset(
    path: Path | None = None,
    validation_split: float = 0.1,
    seed: int = 42,
    max_train_samples: int | None = None,
    feedback: Feedback | None = None,
) -> Dataset:
    """MNIST's splits, with `feedback` appended to the training split only.

    The validation split is carved from MNIST's training set before the feedback is added, so
    validation (and the test set, MNIST's own) measure every version on the same data whatever
    feedback it learned from; `max_train_samples` caps the MNIST part only.
    """
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
    train = split(train_index)
    mnist_train = len(train)
    if feedback is not None and len(feedback):
        check_feedback(feedback)
        # The same scaling as MNIST's uint8 pixels: x / 255.
        train = Split(
            np.concatenate([train.images, scale_images(feedback.images)]),
            np.concatenate([train.labels, feedback.labels.astype(np.int64)]),
        )
    return Dataset(
        train,
        split(validation_index),
        test,
        data_digest,
        source,
        mnist_train=mnist_train,
        feedback=0 if feedback is None else len(feedback),
        train_digest=digest({"x_train": train.images, "y_train": train.labels}),
        feedback_source="" if feedback is None else feedback.source,
    )
