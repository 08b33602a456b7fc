"""The TrainingRun spec: the one place that names its fields.

The CRD schema (charts/, operator/), the sample manifests, the local runner and the training entrypoint
all read the spec through these models, so a renamed field breaks a test instead of a cluster.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from contract.constants import MAX_WORKERS

API_GROUP = "mnist-mlops.io"
API_VERSION = "v1alpha1"
KIND = "TrainingRun"
PLURAL = "trainingruns"
SHORT_NAME = "tr"

DEFAULT_EXPERIMENT = "mnist"
DEFAULT_REGISTERED_MODEL = "mnist-cnn"
CHAMPION_ALIAS = "champion"
PREVIOUS_ALIAS = "previous"

# The pod-template annotation the operator writes to roll serving Deployments to a new version.
MODEL_VERSION_ANNOTATION = f"{API_GROUP}/model-version"
# The label that ties a serving Deployment to the registered model it serves.
REGISTERED_MODEL_LABEL = f"{API_GROUP}/registered-model"


class Architecture(StrEnum):
    BASELINE = "baseline"
    ENHANCED = "enhanced"
    RESIDUAL_BN = "residual-bn"


class Optimizer(StrEnum):
    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"
    RMSPROP = "rmsprop"


class _CamelModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, use_enum_values=False
    )


class Hyperparameters(_CamelModel):
    learning_rate: float = Field(default=0.001, gt=0.0, le=1.0)
    batch_size: int = Field(default=128, ge=1, le=8192)
    epochs: int = Field(default=5, ge=1, le=200)
    optimizer: Optimizer = Optimizer.ADAM
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    validation_split: float = Field(default=0.1, gt=0.0, lt=0.5)
    # A cosine decay of the learning rate over all steps; off for the design's three runs.
    lr_schedule: str = Field(default="constant", pattern="^(constant|cosine)$")
    # Random shifts of a couple of pixels; off for the design's three runs.
    augment: bool = False


class PromotionPolicySpec(_CamelModel):
    metric: str = Field(default="test_accuracy", pattern="^[A-Za-z0-9_.-]+$")
    minimum: float = 0.0
    must_beat_champion: bool = True
    margin: float = Field(default=0.0, ge=0.0)
    higher_is_better: bool = True
    # The most test accuracy the version's int8 model may lose against its float model (0.002 is 0.2
    # points); unset, the int8 model does not gate promotion.
    max_quantization_loss: float | None = Field(default=None, ge=0.0, le=1.0)


class RolloutStrategy(StrEnum):
    """How a promoted version reaches users (operator/mnist_operator/progressive.py)."""

    # The alias moves and every serving pod rolls to the new version at once.
    DIRECT = "direct"
    # The candidate answers a growing share of live traffic, analysed against stable at each step.
    CANARY = "canary"
    # The candidate answers a copy of live traffic that users never see; promoted on agreement.
    SHADOW = "shadow"


class CanaryStep(_CamelModel):
    # Percent of requests the candidate answers; 100% is the implicit last step (the promotion).
    weight: int = Field(gt=0, lt=100)
    # Seconds at this weight, counted from the moment every serving pod applies it, before the analysis.
    hold_seconds: int = Field(default=120, ge=10, le=86400)


class AnalysisSpec(_CamelModel):
    """The live checks of a canary step (or of the shadow window), candidate against stable."""

    max_error_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    # candidate p99 / stable p99, both raised to p99LatencyFloorMs first so millisecond p99s don't flap:
    # at a 10% share a p99 rests on a few requests, and a candidate identical to stable measured a ratio
    # of 3.95 over ~40 of them with a 5 ms floor. The latency check is judged only once both versions
    # answered minRequests in the window (analysis.py), like every other check.
    max_p99_latency_ratio: float = Field(default=2.0, ge=1.0, le=100.0)
    p99_latency_floor_ms: float = Field(default=25.0, ge=0.0, le=60000.0)
    # Mean top-1 confidence of stable minus the candidate's.
    max_confidence_drop: float = Field(default=0.05, ge=0.0, le=1.0)
    # Jensen-Shannon divergence (base 2, so in [0, 1]) of the predicted-digit distributions.
    max_digit_divergence: float = Field(default=0.1, ge=0.0, le=1.0)
    # Shadow only: the share of images on which both versions predict the same digit.
    min_agreement: float = Field(default=0.97, ge=0.0, le=1.0)
    # Requests each version must have answered in the window; fewer extend the step (up to 3x its hold).
    min_requests: int = Field(default=50, ge=1, le=10_000_000)
    # Seconds for every serving pod to apply a new weight before the rollout is aborted.
    apply_timeout_seconds: int = Field(default=60, ge=5, le=3600)


def _default_steps() -> list[CanaryStep]:
    return [CanaryStep(weight=10, hold_seconds=120), CanaryStep(weight=50, hold_seconds=120)]


MAX_CANARY_STEPS = 10


class RolloutSpec(_CamelModel):
    # Unset: the operator's default strategy (chart value operator.rollout.defaultStrategy).
    strategy: RolloutStrategy | None = None
    steps: list[CanaryStep] = Field(default_factory=_default_steps, min_length=1, max_length=MAX_CANARY_STEPS)
    shadow_seconds: int = Field(default=300, ge=10, le=86400)
    analysis: AnalysisSpec = AnalysisSpec()

    @model_validator(mode="after")
    def _weights_increase(self) -> RolloutSpec:
        weights = [step.weight for step in self.steps]
        if any(later <= earlier for earlier, later in itertools.pairwise(weights)):
            raise ValueError(f"rollout.steps weights must be strictly increasing, got {weights}")
        return self


DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class TrainingRunSpec(_CamelModel):
    architecture: Architecture = Architecture.BASELINE
    hyperparameters: Hyperparameters = Hyperparameters()
    experiment: str = Field(default=DEFAULT_EXPERIMENT, min_length=1, max_length=128)
    registered_model: str = Field(
        default=DEFAULT_REGISTERED_MODEL,
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL,
    )
    promotion: PromotionPolicySpec = PromotionPolicySpec()
    # Fields below only matter in a cluster; the local runner ignores them.
    serving_selector: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None
    image: str | None = None
    backoff_limit: int = Field(default=1, ge=0, le=10)
    active_deadline_seconds: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    # A quick run on the first N training examples (smoke tests, the end-to-end tier).
    max_train_samples: int | None = Field(default=None, ge=100)
    # Data-parallel training across this many pods (MultiWorkerMirroredStrategy). batchSize stays the
    # global batch of one step, split evenly among the workers, so it must divide by `workers`; the
    # learning rate is unchanged (training_job/distributed.py). The local runner trains in one process,
    # which with this rule is the same optimisation.
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    # Kueue's LocalQueue in the TrainingRun's namespace: the Job is created suspended and labelled for
    # it, and starts when Kueue admits it against the queue's quota. Unset: the Job starts at once.
    queue_name: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL)
    # The PriorityClass of the training pods (and, with Kueue, of the workload in its queue).
    priority_class_name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN)
    # How a promoted version reaches users; unset, the operator's default strategy with these defaults.
    rollout: RolloutSpec | None = None
    # Also train on the labelled feedback of the prediction log (the training split only; the test set
    # stays MNIST's): the operator hands the Job MNIST_FEEDBACK_DB_URL. A RetrainingPolicy's runs set it.
    include_feedback: bool = False

    @model_validator(mode="after")
    def _batch_divides_among_workers(self) -> TrainingRunSpec:
        if self.hyperparameters.batch_size % self.workers:
            raise ValueError(
                f"hyperparameters.batchSize {self.hyperparameters.batch_size} is the global batch and "
                f"must divide evenly among workers={self.workers}"
            )
        return self


class TrainingRunManifest(BaseModel):
    """A whole TrainingRun object as read from YAML (what `kubectl apply` takes)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    api_version: str = Field(alias="apiVersion", pattern=f"^{API_GROUP}/{API_VERSION}$")
    kind: str = Field(pattern=f"^{KIND}$")
    metadata: dict[str, Any]
    spec: TrainingRunSpec

    @property
    def name(self) -> str:
        return str(self.metadata["name"])


def load_manifests(text: str) -> list[TrainingRunManifest]:
    """Parses every TrainingRun document in a YAML stream; other kinds are an error, not skipped."""
    import yaml

    manifests: list[TrainingRunManifest] = []
    for document in yaml.safe_load_all(text):
        if document is None:
            continue
        manifests.append(TrainingRunManifest.model_validate(document))
    return manifests
