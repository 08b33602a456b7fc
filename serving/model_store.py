"""Resolves the configured model URI to a concrete registry version and fetches its ONNX artifact into
a local cache: the registered (float32) model, or with precision int8 the int8 model that training
quantised from it and logged beside it (named by the version's `onnx_int8_artifact` tag).

Start-up time matters (a pod is not ready until this finishes), and importing `mlflow` takes seconds,
so the registry is read through its small REST API with the standard library, and `mlflow` is imported
only on a cache miss, to download from whatever artifact store the version lives in. A pinned version
already in the cache needs no network at all: registry versions are immutable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from serving.settings import ModelRef

log = logging.getLogger("serving.model_store")

ONNX_FILENAME = "model.onnx"
MANIFEST_FILENAME = "serving-manifest.json"
# The model-version tag the training writes (training_job/train.py): the runs:/ URI of the directory
# holding the int8 model. A literal here: the serving image does not ship the contract package.
INT8_ARTIFACT_TAG = "onnx_int8_artifact"

Precision = Literal["float32", "int8"]


class RegistryError(Exception):
    """The registry could not give us the model.

    `retryable` errors may heal by themselves: the registry unreachable or answering 5xx/429, an alias
    (or the registered model behind it) not created yet. The others need a new configuration: no or a
    non-http tracking URI, a pinned version that does not exist, a version without an ONNX model, a
    refused request (401, 403), int8 asked of a version without an int8 model; the data plane stops
    retrying those. `status` is the registry's HTTP status, when it answered."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    alias: str | None = None
    run_id: str | None = None
    source: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class CachedModel:
    info: ModelVersionInfo
    directory: Path
    sha256: str
    from_cache: bool

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILENAME


@dataclass(frozen=True)
class RegisteredModelInfo:
    """A registered model's tags and aliases (the traffic document is one of its tags)."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class RegistryClient:
    """The registry calls we need, over MLflow's REST API (same auth env vars as MLflow)."""

    def __init__(self, tracking_uri: str, timeout: float) -> None:
        self.base = tracking_uri.rstrip("/")
        self.timeout = timeout
        self._headers = {"Accept": "application/json", "User-Agent": "mnist-serving"}
        token = os.environ.get("MLFLOW_TRACKING_TOKEN")
        user, password = (
            os.environ.get("MLFLOW_TRACKING_USERNAME"),
            os.environ.get("MLFLOW_TRACKING_PASSWORD"),
        )
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif user and password:
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"
        self._context: ssl.SSLContext | None = None
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            self._context = ssl._create_unverified_context()  # noqa: S323  (explicitly requested by the operator)

    def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = f"{self.base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as response:
                payload: dict[str, Any] = json.loads(response.read())
                return payload
        except urllib.error.HTTPError as exc:
            body = exc.read(2000).decode(errors="replace")
            try:
                message = json.loads(body).get("message", body)
            except ValueError:
                message = body
            # Not found may heal: a promotion creates the model or sets the alias (pins: see `version`).
            retryable = exc.code >= 500 or exc.code in (404, 429) or "RESOURCE_DOES_NOT_EXIST" in body
            raise RegistryError(
                f"registry answered {exc.code} for {path}: {message}", retryable=retryable, status=exc.code
            ) from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise RegistryError(f"registry at {self.base} unreachable: {exc}", retryable=True) from exc

    def version_by_alias(self, name: str, alias: str) -> ModelVersionInfo:
        try:
            payload = self._get("registered-models/alias", {"name": name, "alias": alias})
        except RegistryError as exc:
            if exc.status == 400:
                # MLflow answers an alias not set yet with 400 INVALID_PARAMETER_VALUE: a promotion heals it.
                raise RegistryError(str(exc), retryable=True, status=exc.status) from exc
            raise
        return _version_info(payload["model_version"], alias)

    def version(self, name: str, version: str) -> ModelVersionInfo:
        try:
            payload = self._get("model-versions/get", {"name": name, "version": version})
        except RegistryError as exc:
            if exc.status is not None and exc.status < 500 and exc.status != 429:
                # A pin names one immutable version: if the registry does not have it now, waiting will
                # not create it (a later registration gets a new number, which a rollout then pins).
                raise RegistryError(str(exc), retryable=False, status=exc.status) from exc
            raise
        return _version_info(payload["model_version"], None)

    def registered_model(self, name: str) -> RegisteredModelInfo:
        payload = self._get("registered-models/get", {"name": name})
        raw = payload["registered_model"]
        tags = {str(t["key"]): str(t.get("value", "")) for t in raw.get("tags", [])}
        aliases = {str(a["alias"]): str(a["version"]) for a in raw.get("aliases", [])}
        return RegisteredModelInfo(name=str(raw["name"]), tags=tags, aliases=aliases)

    def download_uri(self, name: str, version: str) -> str:
        payload = self._get("model-versions/get-download-uri", {"name": name, "version": version})
        return str(payload["artifact_uri"])


def _version_info(raw: dict[str, Any], alias: str | None) -> ModelVersionInfo:
    tags = {str(t["key"]): str(t.get("value", "")) for t in raw.get("tags", [])}
    return ModelVersionInfo(
        name=str(raw["name"]),
        version=str(raw["version"]),
        alias=alias,
        run_id=raw.get("run_id") or None,
        source=raw.get("source") or None,
        tags=tags,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore:
    def __init__(
        self,
        tracking_uri: str | None,
        cache_dir: Path,
        timeout: float = 10.0,
        precision: Precision = "float32",
    ) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        self.cache_dir = cache_dir
        self.timeout = timeout
        self.precision = precision

    def _client(self) -> RegistryClient:
        if not self.tracking_uri:
            raise RegistryError("MLFLOW_TRACKING_URI is not set", retryable=False)
        if not self.tracking_uri.startswith(("http://", "https://")):
            raise RegistryError(
                f"MLFLOW_TRACKING_URI {self.tracking_uri!r} is not an http(s) tracking server",
                retryable=False,
            )
        return RegistryClient(self.tracking_uri, self.timeout)

    def registered_model(self, name: str) -> RegisteredModelInfo:
        """Blocking: the registered model's tags and aliases, straight from the registry."""
        return self._client().registered_model(name)

    def version_dir(self, name: str, version: str) -> Path:
        safe = urllib.parse.quote(name, safe="")
        # The int8 model is another file of the same immutable version: cached beside the float one.
        return self.cache_dir / safe / (version if self.precision == "float32" else f"{version}-int8")

    def resolve(self, ref: ModelRef) -> ModelVersionInfo:
        if ref.alias is not None:
            return self._client().version_by_alias(ref.name, ref.alias)
        assert ref.version is not None
        cached = self._read_manifest(self.version_dir(ref.name, ref.version))
        if cached is not None:
            return cached[0]
        return self._client().version(ref.name, ref.version)

    def fetch(self, ref: ModelRef) -> CachedModel:
        """Resolve `ref` and return a complete local copy of that version's ONNX model directory, of
        the store's precision."""
        info = self.resolve(ref)
        if self.precision == "int8" and not info.tags.get(INT8_ARTIFACT_TAG):
            raise RegistryError(
                f"{info.uri} has no int8 model (no {INT8_ARTIFACT_TAG!r} tag, as on versions trained"
                " before quantisation): serve it with SERVING_MODEL_PRECISION=float32",
                retryable=False,
            )
        directory = self.version_dir(info.name, info.version)
        cached = self._read_manifest(directory)
        if cached is not None:
            if _sha256(directory / ONNX_FILENAME) == cached[1]:
                return CachedModel(_with_alias(cached[0], info.alias), directory, cached[1], from_cache=True)
            log.warning("cached model is corrupt, fetching it again", extra={"cache_dir": str(directory)})
            shutil.rmtree(directory, ignore_errors=True)
        self._download(info, directory)
        cached = self._read_manifest(directory)
        if cached is None:
            raise RegistryError(f"the cache entry {directory} is incomplete after download", retryable=True)
        return CachedModel(_with_alias(cached[0], info.alias), directory, cached[1], from_cache=False)

    def _read_manifest(self, directory: Path) -> tuple[ModelVersionInfo, str] | None:
        manifest = directory / MANIFEST_FILENAME
        try:
            data = json.loads(manifest.read_text())
            info = ModelVersionInfo(**data["info"])
            sha = str(data["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not (directory / ONNX_FILENAME).is_file():
            return None
        return info, sha

    def _download(self, info: ModelVersionInfo, directory: Path) -> None:
        # mlflow draws a tqdm progress bar on stderr whenever tqdm is installed: not a JSON log line.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            import mlflow.artifacts
        except ImportError as exc:  # pragma: no cover - the image always has mlflow-skinny
            raise RegistryError(
                "mlflow is not installed, cannot download artifacts", retryable=False
            ) from exc
        # The registry names the version's artifact location (the int8 model's, a run's, in a tag);
        # mlflow then reads whichever store holds it (the tracking server's artifact proxy here, or
        # S3/GCS/... elsewhere).
        if self.precision == "int8":
            artifact_uri = info.tags[INT8_ARTIFACT_TAG]
        else:
            artifact_uri = self._client().download_uri(info.name, info.version)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{info.version}-", dir=directory.parent))
        try:
            log.info(
                "downloading model artifacts",
                extra={"model_uri": info.uri, "artifact_uri": artifact_uri, "precision": self.precision},
            )
            try:
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=artifact_uri,
                        dst_path=str(staging / "download"),
                        tracking_uri=self.tracking_uri,
                    )
                )
            except Exception as exc:
                raise RegistryError(f"downloading {info.uri} failed: {exc}", retryable=True) from exc
            found = sorted(local.rglob(ONNX_FILENAME))
            if not found:
                raise RegistryError(
                    f"{info.uri} has no {ONNX_FILENAME} at {artifact_uri}:"
                    " the version is not an ONNX-flavor model",
                    retryable=False,
                )
            # Keep the whole directory: large ONNX models keep their weights in external-data files beside it.
            model_dir = found[0].parent
            payload = staging / "model"
            shutil.move(str(model_dir), payload)
            manifest = {"info": info.__dict__, "sha256": _sha256(payload / ONNX_FILENAME)}
            (payload / MANIFEST_FILENAME).write_text(json.dumps(manifest))
            try:
                # Atomic: a reader sees either no directory or a complete one, even with several workers.
                payload.rename(directory)
            except OSError:
                if self._read_manifest(directory) is None:
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _with_alias(info: ModelVersionInfo, alias: str | None) -> ModelVersionInfo:
    if info.alias == alias:
        return info
    return ModelVersionInfo(info.name, info.version, alias, info.run_id, info.source, dict(info.tags))
