"""The operator's settings, read once from MNIST_OPERATOR_* environment variables.

A bad value stops the operator at start-up with the variable's name in the message, rather than
surfacing later as a handler error on some TrainingRun.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "MNIST_OPERATOR_"
SERVICE_ACCOUNT_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_TRAINING_IMAGE = "mnist-mlops/training:latest"

# Named fault-injection points (tests only): the operator exits abruptly right after the named step,
# which is how the tests prove that a restart at the worst moment neither duplicates nor loses work.
FAILPOINTS = frozenset({"after-job-create", "after-alias-move", "after-rollout-patch"})


class ConfigError(ValueError):
    """An MNIST_OPERATOR_* (or MLFLOW_TRACKING_URI) value is missing or malformed."""


@dataclass(frozen=True)
class OperatorConfig:
    mlflow_tracking_uri: str
    training_image: str = DEFAULT_TRAINING_IMAGE
    training_image_pull_policy: str = "IfNotPresent"
    # Empty: every namespace (cluster-wide RBAC); otherwise only these (a Role in each).
    namespaces: tuple[str, ...] = ()
    rollout_timeout_seconds: float = 600.0
    progress_interval_seconds: float = 15.0
    reconcile_interval_seconds: float = 5.0
    health_host: str = "0.0.0.0"
    health_port: int = 8080
    leader_election: bool = True
    lease_name: str = "mnist-operator"
    lease_namespace: str = "default"
    # Whole seconds: a Lease's leaseDurationSeconds is an integer.
    lease_duration_seconds: int = 15
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    training_service_account: str | None = None
    # Pull secrets of the training pods: Secrets of that name in each TrainingRun's namespace.
    training_image_pull_secrets: tuple[str, ...] = ()
    # MLflow basic auth: the training pods read MLFLOW_TRACKING_USERNAME/PASSWORD from this Secret,
    # looked up in the TrainingRun's namespace (a pod can only reference Secrets of its own).
    mlflow_auth_secret: str | None = None
    mlflow_auth_username_key: str = "username"
    mlflow_auth_password_key: str = "password"  # noqa: S105 (the Secret key's name, not a password)
    default_cpu: str = "1"
    default_memory: str = "3Gi"
    mlflow_timeout_seconds: int = 10
    mlflow_backoff_seconds: float = 5.0
    mlflow_max_backoff_seconds: float = 60.0
    log_level: str = "INFO"
    log_json: bool = False
    failpoint: str | None = None

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str:
        return f"http://{self.health_host}:{self.health_port}/healthz"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        tracking_uri = env.get("MLFLOW_TRACKING_URI", "").strip()
        if not tracking_uri:
            raise ConfigError(
                "MLFLOW_TRACKING_URI is required: the MLflow server the operator and its Jobs use"
            )
        defaults = cls(mlflow_tracking_uri=tracking_uri)
        failpoint = reader.text("FAILPOINT", "") or None
        if failpoint is not None and failpoint not in FAILPOINTS:
            raise ConfigError(f"{PREFIX}FAILPOINT={failpoint!r} is not one of {sorted(FAILPOINTS)}")
        config = cls(
            mlflow_tracking_uri=tracking_uri,
            training_image=reader.text("TRAINING_IMAGE", defaults.training_image),
            training_image_pull_policy=reader.choice(
                "TRAINING_IMAGE_PULL_POLICY",
                defaults.training_image_pull_policy,
                ("Always", "IfNotPresent", "Never"),
            ),
            namespaces=reader.names("NAMESPACES"),
            rollout_timeout_seconds=reader.number(
                "ROLLOUT_TIMEOUT_SECONDS", defaults.rollout_timeout_seconds, 1
            ),
            progress_interval_seconds=reader.number(
                "PROGRESS_INTERVAL_SECONDS", defaults.progress_interval_seconds, 0.1
            ),
            reconcile_interval_seconds=reader.number(
                "RECONCILE_INTERVAL_SECONDS", defaults.reconcile_interval_seconds, 0.1
            ),
            health_host=reader.text("HEALTH_HOST", defaults.health_host),
            health_port=int(reader.number("HEALTH_PORT", defaults.health_port, 1, 65535)),
            leader_election=reader.flag("LEADER_ELECTION", defaults.leader_election),
            lease_name=reader.text("LEASE_NAME", defaults.lease_name),
            lease_namespace=reader.text("LEASE_NAMESPACE", "") or _own_namespace(env),
            lease_duration_seconds=int(
                reader.number("LEASE_DURATION_SECONDS", defaults.lease_duration_seconds, 3)
            ),
            identity=reader.text("IDENTITY", "") or env.get("POD_NAME", "") or defaults.identity,
            training_service_account=reader.text("TRAINING_SERVICE_ACCOUNT", "") or None,
            training_image_pull_secrets=reader.object_names("TRAINING_IMAGE_PULL_SECRETS"),
            mlflow_auth_secret=reader.text("MLFLOW_AUTH_SECRET", "") or None,
            mlflow_auth_username_key=reader.text(
                "MLFLOW_AUTH_USERNAME_KEY", defaults.mlflow_auth_username_key
            ),
            mlflow_auth_password_key=reader.text(
                "MLFLOW_AUTH_PASSWORD_KEY", defaults.mlflow_auth_password_key
            ),
            default_cpu=reader.text("DEFAULT_CPU", defaults.default_cpu),
            default_memory=reader.text("DEFAULT_MEMORY", defaults.default_memory),
            mlflow_timeout_seconds=int(
                reader.number("MLFLOW_TIMEOUT_SECONDS", defaults.mlflow_timeout_seconds, 1)
            ),
            mlflow_backoff_seconds=reader.number(
                "MLFLOW_BACKOFF_SECONDS", defaults.mlflow_backoff_seconds, 0.1
            ),
            mlflow_max_backoff_seconds=reader.number(
                "MLFLOW_MAX_BACKOFF_SECONDS", defaults.mlflow_max_backoff_seconds, 0.1
            ),
            log_level=reader.choice("LOG_LEVEL", defaults.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_json=reader.choice("LOG_FORMAT", "plain", ("plain", "json")) == "json",
            failpoint=failpoint,
        )
        return config


def _own_namespace(env: Mapping[str, str]) -> str:
    """Where the leader Lease lives: the operator's own namespace (downward API or in-cluster file)."""
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True)
class _Reader:
    env: Mapping[str, str]

    def _raw(self, name: str) -> str | None:
        value = self.env.get(PREFIX + name)
        return None if value is None or not value.strip() else value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._raw(name) or default
        matches = [choice for choice in choices if choice.lower() == value.lower()]
        if not matches:
            raise ConfigError(f"{PREFIX}{name}={value!r} is not one of {', '.join(choices)}")
        return matches[0]

    def number(self, name: str, default: float, minimum: float, maximum: float | None = None) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{PREFIX}{name}={raw!r} is not a number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum:g}" if maximum is None else f"between {minimum:g} and {maximum:g}"
            raise ConfigError(f"{PREFIX}{name}={raw!r} must be {bounds}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not a boolean (true/false)")

    def names(self, name: str) -> tuple[str, ...]:
        raw = self._raw(name) or ""
        names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
        for item in names:
            if not _is_dns_label(item):
                raise ConfigError(f"{PREFIX}{name}: {item!r} is not a valid namespace name")
        return names

    def object_names(self, name: str) -> tuple[str, ...]:
        """Comma-separated object names (DNS subdomains: Secret names may contain dots)."""
        raw = self._raw(name) or ""
        names = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
        for item in names:
            if len(item) > 253 or not all(_is_dns_label(label) for label in item.split(".")):
                raise ConfigError(f"{PREFIX}{name}: {item!r} is not a valid object name")
        return names


def _is_dns_label(text: str) -> bool:
    return (
        0 < len(text) <= 63
        and text[0].isalnum()
        and text[-1].isalnum()
        and all(c.isdigit() or ("a" <= c <= "z") or c == "-" for c in text)
    )
