"""The operator's settings: one pydantic-settings class, read once from MNIST_OPERATOR_* variables.

A bad value stops the operator at start-up with the variable's name in the message (`ConfigError`,
exit 2), rather than surfacing later as a handler error on some TrainingRun. Constructed directly
(`OperatorConfig(mlflow_tracking_uri=...)`), the class reads no environment at all: only
`OperatorConfig.from_env()` does.
"""

from __future__ import annotations

import contextvars
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from annotated_types import Ge, Le
from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

PREFIX = "MNIST_OPERATOR_"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_TRAINING_IMAGE = "mnist-mlops/training:latest"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

Names = Annotated[tuple[str, ...], NoDecode]

# The environment `from_env` reads; unset (the default), the class reads none.
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "mnist_operator_environ", default=None
)


class ConfigError(ValueError):
    """An MNIST_OPERATOR_* (or MLFLOW_TRACKING_URI) value is missing or malformed."""


class _ItemError(ValueError):
    """One item of a comma-separated list is malformed: the message names the item, not the list."""


def _default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    mlflow_tracking_uri: str = Field(
        validation_alias=AliasChoices("mlflow_tracking_uri", TRACKING_URI_ENV),
        description="MLflow, for the operator and its Jobs",
    )
    training_image: str = DEFAULT_TRAINING_IMAGE
    training_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # Empty: every namespace (cluster-wide RBAC); otherwise only these (a Role in each).
    namespaces: Names = ()
    rollout_timeout_seconds: Annotated[float, Ge(1)] = 600.0
    progress_interval_seconds: Annotated[float, Ge(0.1)] = 15.0
    reconcile_interval_seconds: Annotated[float, Ge(0.1)] = 5.0
    # Liveness fails when an active TrainingRun has not been reconciled for this many intervals
    # (at least twice the longest MLflow backoff, during which a run is rightly not reconciled).
    liveness_ticks: Annotated[int, Ge(2)] = 24
    health_host: str = "0.0.0.0"
    health_port: Annotated[int, Ge(1), Le(65535)] = 8080
    leader_election: bool = True
    lease_name: str = "mnist-operator"
    lease_namespace: str = "default"
    # Whole seconds: a Lease's leaseDurationSeconds is an integer.
    lease_duration_seconds: Annotated[int, Ge(3)] = 15
    identity: str = Field(default_factory=_default_identity)
    training_service_account: str | None = None
    # Pull secrets of the training pods: Secrets of that name in each TrainingRun's namespace.
    training_image_pull_secrets: Names = ()
    # MLflow basic auth: the training pods read MLFLOW_TRACKING_USERNAME/PASSWORD from this Secret,
    # looked up in the TrainingRun's namespace (a pod can only reference Secrets of its own).
    mlflow_auth_secret: str | None = None
    mlflow_auth_username_key: str = "username"
    mlflow_auth_password_key: str = "password"  # noqa: S105 (the Secret key's name, not a password)
    default_cpu: str = "1"
    default_memory: str = "3Gi"
    mlflow_timeout_seconds: Annotated[int, Ge(1)] = 10
    mlflow_backoff_seconds: Annotated[float, Ge(0.1)] = 5.0
    mlflow_max_backoff_seconds: Annotated[float, Ge(0.1)] = 60.0
    # Progressive delivery (mnist_operator/progressive.py): the strategy of a TrainingRun without
    # spec.rollout.strategy, and the Prometheus whose live serving metrics gate canary and shadow steps.
    default_rollout_strategy: Literal["direct", "canary", "shadow"] = "direct"
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    prometheus_timeout_seconds: Annotated[float, Ge(0.5)] = 10.0
    # Serving follows the registry (mnist_operator/registry_sync.py): every serving Deployment is pinned
    # to the version its followed alias names, checked this often (0: only when MLflow's webhook says
    # an alias moved); and the served version is confirmed from each pod's /health (through the API
    # server's pod proxy) before it is recorded.
    registry_sync_seconds: Annotated[float, Ge(0)] = 10.0
    confirm_from_pods: bool = True
    # MLflow registry webhooks (mnist_operator/webhooks.py): the HMAC secret MLflow signs deliveries
    # with (unset: POST /webhooks/mlflow answers 503), and how far a delivery's timestamp may be from now.
    mlflow_webhook_secret: str | None = Field(default=None, repr=False)
    # The operator's own POST /webhooks/mlflow URL as MLflow reaches it: set (with the secret), the
    # leader creates or updates its webhook in MLflow at start-up (mnist_operator/webhooks.py).
    mlflow_webhook_url: str | None = None
    mlflow_webhook_name: str = "mnist-operator"
    mlflow_webhook_tolerance_seconds: Annotated[float, Ge(1)] = 300.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["plain", "json"] = "plain"
    # Tracing of promotions (mnist_operator/tracing.py): OTLP/gRPC export there; unset, tracing is off.
    otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "otlp_endpoint",
            f"{PREFIX}OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
    )

    # RetrainingPolicies (mnist_operator/retraining.py): how often each policy's triggers are checked;
    # the prediction log whose labelled feedback the feedback trigger counts and training adds (also
    # the Jobs' MNIST_FEEDBACK_DB_URL unless a Secret holds it); the bearer token Alertmanager's webhook
    # must present (unset: the webhook answers 503).
    retraining_interval_seconds: Annotated[float, Ge(0.1)] = 10.0
    prediction_log_url: str | None = None
    feedback_db_secret: str | None = None
    feedback_db_secret_key: str = "url"  # noqa: S105 (the Secret key's name, not a secret)
    alertmanager_token: str | None = Field(default=None, repr=False)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def log_json(self) -> bool:
        return self.log_format == "json"

    @property
    def liveness_endpoint(self) -> str:
        return f"http://{self.health_host}:{self.health_port}/healthz"

    @property
    def stall_after_seconds(self) -> float:
        """How long an active TrainingRun may go unreconciled before liveness fails."""
        return max(self.liveness_ticks * self.reconcile_interval_seconds, 2 * self.mlflow_max_backoff_seconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = dict(os.environ if environ is None else environ)
        # Blank counts as unset; the derived defaults come from the pod's downward API.
        env = {key: value.strip() for key, value in env.items() if value.strip()}
        if f"{PREFIX}LEASE_NAMESPACE" not in env:
            env[f"{PREFIX}LEASE_NAMESPACE"] = _own_namespace(env)
        if f"{PREFIX}IDENTITY" not in env and env.get("POD_NAME"):
            env[f"{PREFIX}IDENTITY"] = env["POD_NAME"]
        token = _ENVIRON.set(env)
        try:
            return cls(**{})  # every value from the environment source
        except ValidationError as error:
            raise ConfigError(_explain(error)) from None
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get()
        if environ is None:
            return (init_settings,)
        return (init_settings, _MappingEnvSource(settings_cls, environ))

    # ------------------------------------------------------------------ parsing of the raw strings

    @field_validator(
        "training_image_pull_policy", "log_level", "log_format", "default_rollout_strategy", mode="before"
    )
    @classmethod
    def _choice(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str) or info.field_name is None:
            return value
        choices: tuple[str, ...] = get_args(cls.model_fields[info.field_name].annotation)
        matches = [choice for choice in choices if choice.lower() == value.lower()]
        if not matches:
            raise ValueError(f"is not one of {', '.join(choices)}")
        return matches[0]

    @field_validator(
        "rollout_timeout_seconds",
        "progress_interval_seconds",
        "reconcile_interval_seconds",
        "liveness_ticks",
        "health_port",
        "lease_duration_seconds",
        "mlflow_timeout_seconds",
        "mlflow_backoff_seconds",
        "mlflow_max_backoff_seconds",
        "retraining_interval_seconds",
        "registry_sync_seconds",
        "mlflow_webhook_tolerance_seconds",
        mode="before",
    )
    @classmethod
    def _number(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str) or info.field_name is None:
            return value
        try:
            number = float(value)
        except ValueError:
            raise ValueError("is not a number") from None
        bounds = _bounds(info.field_name)
        if not _within(number, *bounds):
            raise ValueError(_bounds_text(*bounds))
        return int(number) if cls.model_fields[info.field_name].annotation is int else number

    @field_validator("leader_election", "confirm_from_pods", mode="before")
    @classmethod
    def _flag(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        raise ValueError("is not a boolean (true/false)")

    @field_validator("mlflow_webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("is not an http(s) URL")
        return value

    @field_validator("namespaces", mode="before")
    @classmethod
    def _namespaces(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        names = _split(value)
        for item in names:
            if not _DNS_LABEL.match(item):
                raise _ItemError(f"{item!r} is not a valid namespace name")
        return names

    @field_validator("training_image_pull_secrets", mode="before")
    @classmethod
    def _object_names(cls, value: object) -> object:
        """Comma-separated object names (DNS subdomains: Secret names may contain dots)."""
        if not isinstance(value, str):
            return value
        names = _split(value)
        for item in names:
            if len(item) > 253 or not all(_DNS_LABEL.match(label) for label in item.split(".")):
                raise _ItemError(f"{item!r} is not a valid object name")
        return names


class _MappingEnvSource(EnvSettingsSource):
    """The environment source over a given mapping (the process environment, or a test's dict)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty)


def _split(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))


def _bounds(field: str) -> tuple[float | None, float | None]:
    minimum = maximum = None
    for item in OperatorConfig.model_fields[field].metadata:
        if isinstance(item, Ge):
            minimum = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, Le):
            maximum = float(item.le)  # type: ignore[arg-type]
    return minimum, maximum


def _within(value: float, minimum: float | None, maximum: float | None) -> bool:
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def _bounds_text(minimum: float | None, maximum: float | None) -> str:
    if maximum is None:
        return f"must be >= {minimum:g}"
    return f"must be between {minimum:g} and {maximum:g}"


def _env_name(field: str) -> str:
    return TRACKING_URI_ENV if field == "mlflow_tracking_uri" else f"{PREFIX}{field.upper()}"


def _explain(error: ValidationError) -> str:
    """One line per bad variable, each naming it: `MNIST_OPERATOR_X='raw' <what is wrong>`."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        field = "mlflow_tracking_uri" if field.lower() == TRACKING_URI_ENV.lower() else field
        if item["type"] == "missing" and field == "mlflow_tracking_uri":
            lines.append(f"{TRACKING_URI_ENV} is required: the MLflow server the operator and its Jobs use")
            continue
        message = str(item["msg"]).removeprefix("Value error, ")
        context: dict[str, Any] = item.get("ctx") or {}
        if isinstance(context.get("error"), _ItemError):
            lines.append(f"{_env_name(field)}: {message}")
        else:
            lines.append(f"{_env_name(field)}={item['input']!r} {message}")
    return "; ".join(lines)


def _own_namespace(env: Mapping[str, str]) -> str:
    """Where the leader Lease lives: the operator's own namespace (downward API or in-cluster file)."""
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"
