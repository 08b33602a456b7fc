"""The serving process's configuration: one typed class, read from `SERVING_*` environment variables.

`MLFLOW_TRACKING_URI` keeps its standard MLflow name so the same Secret/ConfigMap feeds the training
Jobs, the operator and this service.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_URI = "models:/mnist-cnn@champion"

# models:/<name>@<alias> or models:/<name>/<version>; registered-model names may contain slashes only
# in Unity Catalog, which this platform does not use.
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))$")


class ModelRef:
    """A parsed registry reference: exactly one of alias/version is set."""

    __slots__ = ("alias", "name", "version")

    def __init__(self, name: str, alias: str | None, version: str | None) -> None:
        self.name = name
        self.alias = alias
        self.version = version

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        match = _MODEL_URI.match(uri.strip())
        if match is None:
            raise ValueError(
                f"model URI {uri!r} is not 'models:/<name>@<alias>' or 'models:/<name>/<version>'"
            )
        return cls(match["name"], match["alias"], match["version"])

    def pinned(self, version: str) -> str:
        return f"models:/{self.name}/{version}"

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVING_", extra="ignore", frozen=True)

    model_uri: str = Field(
        default=DEFAULT_MODEL_URI, description="models:/<name>@<alias> or models:/<name>/<version>"
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("SERVING_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")
    )
    model_cache_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "mnist-serving" / "models",
        description="Where fetched ONNX artifacts are kept, keyed by model name and version.",
    )
    # Name used by the Open Inference Protocol routes; defaults to the registered model's name.
    served_model_name: str | None = None
    # Which of the version's two ONNX models to serve: the registered float one, or the int8 one the
    # training quantised from it (the version's `onnx_int8_artifact` tag; a version without one is a
    # permanent load error). Same version, same promotion: only the arithmetic differs.
    model_precision: Literal["float32", "int8"] = Field(
        default="float32", description="float32 or int8 (the version's statically quantised model)."
    )

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    # The Open Inference Protocol's gRPC service and gRPC health, on `host`, in every worker.
    grpc_port: int = Field(default=8081, ge=0, le=65535, description="gRPC port; 0 disables gRPC.")
    workers: int = Field(default=1, ge=1, le=64)

    # One intra-op thread per worker: with several workers or replicas per node, more threads only
    # contend; a single 28x28 image gains nothing from parallel kernels.
    onnx_intra_op_threads: int = Field(default=1, ge=0, le=64)
    onnx_inter_op_threads: int = Field(default=1, ge=0, le=64)
    warmup_runs: int = Field(default=3, ge=0, le=100)

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_batch_size: int = Field(default=256, ge=1, le=4096)
    max_image_pixels: int = Field(default=16_000_000, ge=1)
    max_request_pixels: int = Field(default=64_000_000, ge=1)
    max_concurrency: int = Field(default=128, ge=1, description="In-flight inference requests before 503.")
    # Bodies larger than this are decoded and run in a worker thread so the event loop keeps serving.
    inline_max_bytes: int = Field(default=16 * 1024, ge=0)

    # Adaptive batching (serving/batching.py): requests that arrive while the model is busy share its
    # next call. A lone request never waits; the budget caps how long a batch keeps taking joiners.
    # On by default: under concurrent load it serves requests in arrival order, which keeps the tail
    # latency down, for ~25 us of CPU per lone request.
    batching_enabled: bool = True
    batching_max_batch_size: int = Field(default=32, ge=1, le=4096, description="Images per model call.")
    batching_max_latency_ms: float = Field(
        default=2.0, ge=0, le=1000, description="Longest a queued request waits for its batch to fill."
    )

    # Progressive delivery (serving/routing.py): how often the registered model's traffic tag is read
    # (0: never, every request on the pinned version), the header whose value keeps a client on one
    # version during a canary, and how many shadow runs may be pending before copies are skipped.
    traffic_poll_seconds: float = Field(
        default=1.0, ge=0, le=3600, description="Seconds between reads of the traffic document; 0 disables."
    )
    routing_key_header: str = Field(
        default="x-client-id",
        min_length=1,
        description="Header routing a client to the same version on every request of a canary.",
    )
    shadow_max_in_flight: int = Field(
        default=64, ge=0, description="Pending shadow runs beyond which shadow copies are skipped."
    )

    rate_limit_per_second: float = Field(
        default=0.0, ge=0.0, description="Per-client requests/s; 0 disables."
    )
    rate_limit_burst: int = Field(default=0, ge=0, description="Bucket size; 0 means max(1, 2 x rate).")
    rate_limit_client_header: str | None = Field(
        default=None, description="Header naming the client (e.g. X-Forwarded-For behind a trusted proxy)."
    )

    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: bool = True
    docs_enabled: bool = True

    graceful_shutdown_seconds: int = Field(default=25, ge=0)
    keep_alive_seconds: int = Field(default=5, ge=1)
    # Start-up keeps retrying an unreachable registry or a missing alias: the pod stays live but not
    # ready, and becomes ready by itself once a model is promoted.
    load_retry_max_seconds: float = Field(default=30.0, gt=0)
    registry_timeout_seconds: float = Field(default=10.0, gt=0)

    # Tracing (serving/tracing.py): OTLP/gRPC export to this endpoint, http://collector:4317 in plain
    # text or https:// with TLS; unset (or blank), tracing is off and the SDK is never imported.
    # OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER and OTEL_EXPORTER_OTLP_HEADERS keep their standard meaning.
    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "SERVING_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    )

    # The prediction log (serving/prediction_log.py; the `prediction_log` package): a SQLAlchemy URL,
    # sqlite:///path.db locally, postgresql+psycopg2://... in the cluster. Unset (or blank), the log and
    # POST /feedback are off and SQLAlchemy is never imported.
    prediction_log_url: str | None = None
    prediction_log_sample: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of predictions logged (a batch as a whole)."
    )
    prediction_log_queue_size: int = Field(
        default=10_000, ge=1, description="Records held in memory for the writer; beyond it they are dropped."
    )
    prediction_log_retention_days: float = Field(
        default=30.0, ge=0.0, description="Rows older than this are purged hourly; 0 keeps them all."
    )
    prediction_log_flush_seconds: float = Field(
        default=0.5,
        gt=0.0,
        le=60.0,
        description="How often queued records are written (sooner once a batch is full).",
    )
    prediction_log_batch_records: int = Field(
        default=500, ge=1, description="Records per INSERT; a full batch is written without waiting."
    )

    @field_validator("otlp_endpoint", "prediction_log_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("routing_key_header", mode="before")
    @classmethod
    def _header_name(cls, value: object) -> object:
        # HTTP/2, gRPC metadata and ASGI all carry header names lower-cased.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_uri(self) -> Settings:
        ModelRef.parse(self.model_uri)
        return self

    @property
    def model_ref(self) -> ModelRef:
        return ModelRef.parse(self.model_uri)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_ref.name

    @property
    def rate_limit_bucket(self) -> float:
        return (
            float(self.rate_limit_burst)
            if self.rate_limit_burst
            else max(1.0, 2 * self.rate_limit_per_second)
        )
