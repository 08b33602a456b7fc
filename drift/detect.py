"""The drift decision: is a window of served inputs drawn from the distribution of the training
reference? A pure function of arrays, `evaluate(reference, window)`.

The tests, and why these:

- **Embedding**: the reference embeddings are reduced to their first `components` principal
  components (fitted once, on the reference only), the window is projected on the same basis, and each
  component gets a two-sample Kolmogorov-Smirnov test. Rabanser, Günnemann and Lipton ("Failing
  Loudly", NeurIPS 2019) compared shift detectors on MNIST and CIFAR-10: dimensionality reduction
  followed by univariate KS tests with a Bonferroni correction detected shifts as well as the
  multivariate kernel two-sample test (MMD) with a fraction of its cost. An MMD permutation test on
  2,000 reference rows costs a kernel matrix and hundreds of permutations per window; the KS tests
  cost a sort, and their p-values are exact rather than permutation estimates, which is what lets the
  false-alarm rate be read off the alpha (and measured: bench/drift.py).
- **Predicted digit**: a chi-square test of homogeneity on the 2 x 10 table of predicted-digit counts,
  reference against window. The reference counts are the training prior as this model sees it
  (what it predicts on held-out training images), so a model's own systematic confusions are not
  mistaken for drift, as they would be against the true label frequencies on large windows.
- **Confidence**: a two-sample KS test on the top-class probability: unfamiliar inputs make a model
  less sure before they change what it predicts.

One decision, with a stated family-wise error rate: the m = components + 2 tests are combined with
Bonferroni's correction. The window is flagged when any test's p-value is below alpha / m;
equivalently when the combined p-value, min(1, m * min p), is below alpha. Bonferroni holds for
dependent tests (the components and the confidence are not independent), so if the window were drawn
from exactly the reference's distribution, the chance it is flagged would be at most alpha. Served
traffic never is: bench/drift.py measures the rate on undrifted MNIST test windows, which come from
other writers than the training set, and at alpha 0.01 it is 2-4.5%, not 1%. Hence alpha 0.001, where
it measures 0-0.5% at every window size while every shift the benchmark makes is still caught.

The reference must be images the model did not train on (drift/reference.py takes them from the
training set's validation split): on its own training images a model is more confident than on any
new image, and the confidence test would see that as drift in every window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from drift.features import NUM_CLASSES, Features

# Chosen with bench/drift.py (README "Drift detection"; figures in bench/results/drift.json): at 500
# samples and alpha 0.001, 3 of 1,000 undrifted MNIST test windows flagged (0.3%, 95% upper bound
# 0.9%) and every one of 200 rotated, thickened, inverted, translated and elastically distorted
# windows flagged (a quarter of the traffic rotated: 16%).
DEFAULT_ALPHA = 0.001
DEFAULT_COMPONENTS = 8
DEFAULT_MIN_SAMPLES = 100
DEFAULT_WINDOW_SAMPLES = 500

EMBEDDING = "embedding"
PREDICTED_LABEL = "predicted_label"
CONFIDENCE = "confidence"
COMBINED = "combined"
FAMILIES = (EMBEDDING, PREDICTED_LABEL, CONFIDENCE)

Float64Array = npt.NDArray[np.float64]


class DriftConfigError(ValueError):
    """A setting the decision cannot work with (alpha outside (0, 1), too few samples, ...)."""


@dataclass(frozen=True)
class DriftConfig:
    alpha: float = DEFAULT_ALPHA  # the family-wise false-alarm rate of one window
    min_samples: int = DEFAULT_MIN_SAMPLES  # fewer in a window: no decision

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise DriftConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_samples < 2:
            raise DriftConfigError(f"min_samples must be at least 2, got {self.min_samples}")


def _principal_directions(centred: Float64Array, components: int) -> tuple[Float64Array, Float64Array]:
    """The first `components` principal directions [D, k] of centred rows, and their variances.

    A randomized SVD (Halko, Martinsson and Tropp 2011: a Gaussian sketch of the row space sharpened
    by power iterations), seeded so a reference always gets the same basis: the embedding has
    thousands of dimensions (5,408 for the baseline CNN), where a full decomposition costs tens of
    seconds and this a fraction of one. Any basis fitted on the reference alone keeps the tests exact;
    precision here only decides how much of the variance the tested components carry."""
    rng = np.random.default_rng(0)
    rank = min(components + 20, *centred.shape)
    sketch = centred @ rng.standard_normal((centred.shape[1], rank))
    for _ in range(4):
        sketch, _r = np.linalg.qr(sketch)
        sketch = centred @ (centred.T @ sketch)
    q, _r = np.linalg.qr(sketch)
    _u, singular, vt = np.linalg.svd(q.T @ centred, full_matrices=False)
    basis = vt[:components].T.copy()
    # A deterministic sign per direction, so the same reference gives the same projections.
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(components)])
    basis *= np.where(signs == 0, 1.0, signs)
    variances = singular[:components] ** 2 / max(1, centred.shape[0] - 1)
    return basis, variances


@dataclass(frozen=True)
class Reference:
    """What a window is compared with, fitted once per model version from the reference features."""

    mean: Float64Array  # [D], the embeddings' mean
    basis: Float64Array  # [D, k], the first k principal directions
    projections: Float64Array  # [N, k], the reference on them
    explained_variance: Float64Array  # [k], share of the embedding's variance per component
    predicted_counts: npt.NDArray[np.int64]  # [10]
    confidence: Float64Array  # [N]

    @property
    def samples(self) -> int:
        return int(self.projections.shape[0])

    @property
    def components(self) -> int:
        return int(self.basis.shape[1])

    @classmethod
    def fit(cls, features: Features, components: int = DEFAULT_COMPONENTS) -> Reference:
        count, dim = features.embeddings.shape
        if count < 2 * components or count < 20:
            raise DriftConfigError(f"a reference of {count} samples is too small for {components} components")
        if not 1 <= components <= min(count - 1, dim):
            raise DriftConfigError(f"components must be in 1..{min(count - 1, dim)}, got {components}")
        embeddings = features.embeddings.astype(np.float64)
        mean = embeddings.mean(axis=0)
        centred = embeddings - mean
        basis, variances = _principal_directions(centred, components)
        total = float((centred**2).sum()) / max(1, count - 1) or 1.0
        return cls(
            mean=mean,
            basis=basis,
            projections=centred @ basis,
            explained_variance=variances / total,
            predicted_counts=np.bincount(features.predicted, minlength=NUM_CLASSES).astype(np.int64),
            confidence=features.confidence.astype(np.float64),
        )

    def project(self, embeddings: npt.NDArray[Any]) -> Float64Array:
        if embeddings.shape[1] != self.mean.shape[0]:
            raise DriftConfigError(
                f"window embeddings have {embeddings.shape[1]} dimensions, the reference "
                f"{self.mean.shape[0]}: were they computed by another model?"
            )
        projected: Float64Array = (embeddings.astype(np.float64) - self.mean) @ self.basis
        return projected


@dataclass(frozen=True)
class TestResult:
    name: str  # embedding_pc1 ... embedding_pcK, predicted_label, confidence
    family: str  # one of FAMILIES
    statistic: float  # KS D, or the chi-square statistic
    p_value: float
    # An effect size in 0..1 that does not grow with the window: KS D, or for the digits the total
    # variation distance between the two predicted-digit distributions.
    score: float


@dataclass(frozen=True)
class DriftResult:
    samples: int
    reference_samples: int
    alpha: float
    decided: bool  # False: too few samples, nothing was tested
    detected: bool
    tests: tuple[TestResult, ...] = ()
    reason: str = ""
    window_predicted_counts: tuple[int, ...] = ()

    @property
    def tests_count(self) -> int:
        return len(self.tests)

    @property
    def per_test_alpha(self) -> float:
        return self.alpha / max(1, len(self.tests))

    @property
    def p_value(self) -> float | None:
        """The Bonferroni-combined p-value of the window; None when undecided."""
        if not self.tests:
            return None
        return min(1.0, len(self.tests) * min(t.p_value for t in self.tests))

    def family_p_values(self) -> dict[str, float]:
        """Per family, Bonferroni within it (the embedding's components), and `combined`."""
        result: dict[str, float] = {}
        for family in FAMILIES:
            members = [t for t in self.tests if t.family == family]
            if members:
                result[family] = min(1.0, len(members) * min(t.p_value for t in members))
        if self.p_value is not None:
            result[COMBINED] = self.p_value
        return result

    def family_scores(self) -> dict[str, float]:
        """Per family, the largest effect size of its tests."""
        return {
            family: max(t.score for t in self.tests if t.family == family)
            for family in FAMILIES
            if any(t.family == family for t in self.tests)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "reference_samples": self.reference_samples,
            "alpha": self.alpha,
            "decided": self.decided,
            "detected": self.detected,
            "reason": self.reason,
            "p_value": self.p_value,
            "per_test_alpha": self.per_test_alpha if self.tests else None,
            "p_values": self.family_p_values(),
            "scores": self.family_scores(),
            "tests": [t.__dict__ for t in self.tests],
        }


def _ks(name: str, family: str, reference: Float64Array, window: Float64Array) -> TestResult:
    result = stats.ks_2samp(reference, window, alternative="two-sided", method="auto")
    statistic = float(result.statistic)
    return TestResult(name, family, statistic, float(result.pvalue), statistic)


def _labels(reference_counts: npt.NDArray[np.int64], window_counts: npt.NDArray[np.int64]) -> TestResult:
    table = np.vstack([reference_counts, window_counts])
    table = table[:, table.sum(axis=0) > 0]
    distance = 0.5 * float(
        np.abs(reference_counts / reference_counts.sum() - window_counts / window_counts.sum()).sum()
    )
    if table.shape[1] < 2:
        # Both predict one and the same digit only: identical distributions, nothing to test.
        return TestResult(PREDICTED_LABEL, PREDICTED_LABEL, 0.0, 1.0, distance)
    chi2 = stats.chi2_contingency(table, correction=False)
    return TestResult(PREDICTED_LABEL, PREDICTED_LABEL, float(chi2.statistic), float(chi2.pvalue), distance)


def evaluate(reference: Reference, window: Features, config: DriftConfig | None = None) -> DriftResult:
    """Whether `window` drifted from `reference`. Deterministic: the same arrays give the same result."""
    config = config or DriftConfig()
    samples = len(window)
    if samples < config.min_samples:
        return DriftResult(
            samples=samples,
            reference_samples=reference.samples,
            alpha=config.alpha,
            decided=False,
            detected=False,
            reason=f"{samples} samples in the window, fewer than the {config.min_samples} a decision needs",
        )
    projected = reference.project(window.embeddings)
    tests = [
        _ks(f"{EMBEDDING}_pc{i + 1}", EMBEDDING, reference.projections[:, i], projected[:, i])
        for i in range(reference.components)
    ]
    window_counts = np.bincount(window.predicted, minlength=NUM_CLASSES).astype(np.int64)
    tests.append(_labels(reference.predicted_counts, window_counts))
    tests.append(_ks(CONFIDENCE, CONFIDENCE, reference.confidence, window.confidence.astype(np.float64)))
    threshold = config.alpha / len(tests)
    flagged = [t.name for t in tests if t.p_value < threshold]
    detected = bool(flagged)
    if detected:
        reason = f"p < alpha/m = {threshold:.2g} in {', '.join(flagged)}"
    else:
        smallest = min(tests, key=lambda t: t.p_value)
        reason = (
            f"no test below alpha/m = {threshold:.2g} (smallest p {smallest.p_value:.3g}, {smallest.name})"
        )
    return DriftResult(
        samples=samples,
        reference_samples=reference.samples,
        alpha=config.alpha,
        decided=True,
        detected=detected,
        tests=tuple(tests),
        reason=reason,
        window_predicted_counts=tuple(int(c) for c in window_counts),
    )
