"""The bundled MNIST file and the splits built from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training_job.data import DataError, load_dataset, load_raw

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_bundled_file_is_the_genuine_set(mnist_path: Path) -> None:
    arrays, _ = load_raw(mnist_path)
    assert np.bincount(arrays["y_train"]).tolist() == TRAIN_COUNTS
    assert np.bincount(arrays["y_test"]).tolist() == TEST_COUNTS
    assert arrays["y_train"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert arrays["y_test"][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_splits_are_scaled_disjoint_and_seeded(mnist_path: Path) -> None:
    first = load_dataset(mnist_path, validation_split=0.1, seed=7)
    assert first.train.images.shape == (54000, 28, 28, 1)
    assert first.validation.images.shape == (6000, 28, 28, 1)
    assert first.test.images.shape == (10000, 28, 28, 1)
    assert first.train.images.dtype == np.float32
    assert first.train.images.min() == 0.0 and first.train.images.max() == 1.0
    # Disjoint: no validation image appears among the training images.
    train_rows = {row.tobytes() for row in first.train.images[:, :, :, 0][:5000]}
    assert not any(row.tobytes() in train_rows for row in first.validation.images[:, :, :, 0])
    again = load_dataset(mnist_path, validation_split=0.1, seed=7)
    other = load_dataset(mnist_path, validation_split=0.1, seed=8)
    assert np.array_equal(first.validation.labels, again.validation.labels)
    assert not np.array_equal(first.validation.labels, other.validation.labels)
    assert first.digest == other.digest and len(first.digest) == 64


def test_sample_cap_limits_training_but_never_the_test_set(mnist_path: Path) -> None:
    small = load_dataset(mnist_path, max_train_samples=500)
    assert len(small.train) == 500 and len(small.validation) == 100 and len(small.test) == 10000


def test_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_raw(tmp_path / "nope.npz")


def test_wrong_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((3, 28, 28)), y_train=np.zeros(3))
    with pytest.raises(DataError, match="lacks arrays"):
        load_raw(path)
    np.savez(
        path, x_train=np.zeros((3, 32, 32)), y_train=np.zeros(3), x_test=np.zeros((1, 28, 28)), y_test=[1]
    )
    with pytest.raises(DataError, match="shape"):
        load_raw(path)
    np.savez(
        path, x_train=np.zeros((3, 28, 28)), y_train=[1, 2, 11], x_test=np.zeros((1, 28, 28)), y_test=[1]
    )
    with pytest.raises(DataError, match="outside 0-9"):
        load_raw(path)
    path.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable"):
        load_raw(path)
