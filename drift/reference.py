"""The training reference a window is compared with, and the model that computes both.

The reference is a fixed sample of 2,000 MNIST training images from the validation split that the
training carves off (training_job/data.py: 10%, seeded permutation, seed 42): training images, so the
reference is "the training distribution", but ones the model never fitted, so its confidence on them
is the confidence it has on any new image of that distribution (see drift/detect.py). Its features
depend on the model, so they are computed once per model version and cached on disk, keyed by the
ONNX file's digest and the data's.

The model: a local .onnx path, or a registry URI (`models:/name@alias`, `models:/name/version`) whose
ONNX flavor is downloaded with mlflow's artifact client (the drift job runs from the training image,
which has the full mlflow), cached per version (registry versions are immutable).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from drift.features import EmbeddingModel, Features
from training_job import data as mnist_data

log = logging.getLogger("drift.reference")

REFERENCE_SAMPLES = 2000
# training_job.data.load_dataset's defaults: the reference is drawn from the same validation split.
VALIDATION_SPLIT = 0.1
SPLIT_SEED = 42
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[0-9]+))$")


class ModelResolutionError(RuntimeError):
    """The model URI does not name a model the drift job can load."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str  # the registry version; "local" for a file
    path: Path  # the ONNX file

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


def validation_index(
    count: int, validation_split: float = VALIDATION_SPLIT, seed: int = SPLIT_SEED
) -> npt.NDArray[np.intp]:
    """The indices of the training images load_dataset puts in the validation split (tests/drift checks
    the two stay the same)."""
    permutation = np.random.default_rng(seed).permutation(count)
    return permutation[: round(count * validation_split)]


def reference_images(
    data_path: Path | None = None, samples: int = REFERENCE_SAMPLES
) -> tuple[npt.NDArray[np.uint8], str]:
    """`samples` uint8 images of the validation split, and the data set's digest."""
    arrays, _source = mnist_data.load_raw(data_path)
    images = np.asarray(arrays["x_train"], dtype=np.uint8)
    index = validation_index(images.shape[0])
    if samples > len(index):
        raise ValueError(f"the validation split holds {len(index)} images, fewer than {samples}")
    return images[index[:samples]], mnist_data.digest(arrays)


def reference_features(
    model: EmbeddingModel,
    *,
    cache_dir: Path | None,
    data_path: Path | None = None,
    samples: int = REFERENCE_SAMPLES,
) -> Features:
    """The reference's features under `model`, from the cache when this model and data were seen."""
    images, data_digest = reference_images(data_path, samples)
    cached = None
    if cache_dir is not None:
        cached = cache_dir / f"reference-{model.sha256[:16]}-{data_digest[:12]}-{samples}.npz"
        if cached.exists():
            try:
                with np.load(cached, allow_pickle=False) as archive:
                    return Features(archive["embeddings"], archive["probabilities"])
            except (OSError, ValueError) as error:
                log.warning("ignoring unreadable reference cache %s: %s", cached, error)
    features = model.features(images)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Written beside and renamed: a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".npz", delete=False) as handle:
            np.savez(handle, embeddings=features.embeddings, probabilities=features.probabilities)
        Path(handle.name).replace(cached)
    return features


def resolve_model(uri: str, *, tracking_uri: str | None, cache_dir: Path) -> ResolvedModel:
    """A local ONNX file, or the registry version `uri` names now (an alias is resolved each call)."""
    match = _MODEL_URI.match(uri)
    if match is None:
        path = Path(uri)
        if not path.is_file():
            raise ModelResolutionError(
                f"{uri!r} is neither an ONNX file nor a registry URI (models:/<name>@<alias> or "
                "models:/<name>/<version>)"
            )
        return ResolvedModel(path.stem, "local", path)
    if not tracking_uri:
        raise ModelResolutionError(
            f"{uri} needs a tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, version)
    except MlflowException as error:
        raise ModelResolutionError(f"{uri}: {error.message}") from error
    target = cache_dir / "models" / name / str(version)
    existing = sorted(target.rglob("*.onnx")) if target.exists() else []
    if not existing:
        target.mkdir(parents=True, exist_ok=True)
        try:
            # The version's own artifact location: a models:/ URI would be resolved against the
            # process-wide registry URI, not this tracking server.
            source = client.get_model_version_download_uri(name, version)
            download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=tracking_uri)
        except MlflowException as error:
            raise ModelResolutionError(f"downloading models:/{name}/{version}: {error.message}") from error
        existing = sorted(target.rglob("*.onnx"))
    if not existing:
        raise ModelResolutionError(f"models:/{name}/{version} has no ONNX file (is it the ONNX flavor?)")
    preferred = [p for p in existing if p.name == "model.onnx"] or existing
    return ResolvedModel(name, str(version), preferred[0])
