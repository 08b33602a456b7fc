"""The promotion gate: a pure function from metrics to a decision.

Shared by the local runner and the operator so that a TrainingRun is judged the same way on a laptop
and in a cluster. No I/O here: the callers fetch the champion's metrics and move the aliases.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from contract.spec import PromotionPolicySpec

# Run metrics the training logs for its int8 model: its test accuracy, and that minus the float ONNX
# model's (negative when quantisation costs accuracy), which `maxQuantizationLoss` bounds.
INT8_ACCURACY_METRIC = "int8_test_accuracy"
QUANTIZATION_DELTA_METRIC = "int8_accuracy_delta"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    policy: PromotionPolicySpec,
) -> Decision:
    """Promote when the candidate clears the minimum and, if asked, beats the champion by the margin."""
    metric = policy.metric
    value = candidate.get(metric)
    if value is None or not math.isfinite(value):
        return Decision(False, f"candidate has no finite {metric!r} metric")

    clears_minimum = value >= policy.minimum if policy.higher_is_better else value <= policy.minimum
    if not clears_minimum:
        relation = "below" if policy.higher_is_better else "above"
        return Decision(False, f"{metric}={value:.4f} is {relation} the minimum {policy.minimum:.4f}")
    refusal = _quantization_refusal(candidate, policy.max_quantization_loss)
    if refusal is not None:
        return Decision(False, refusal)

    if champion is None:
        return Decision(
            True, f"{metric}={value:.4f} clears the minimum {policy.minimum:.4f}; no champion yet"
        )
    if not policy.must_beat_champion:
        return Decision(True, f"{metric}={value:.4f} clears the minimum; beating the champion not required")

    champion_value = champion.get(metric)
    if champion_value is None or not math.isfinite(champion_value):
        return Decision(True, f"{metric}={value:.4f} clears the minimum; the champion has no {metric!r}")
    target = champion_value + policy.margin if policy.higher_is_better else champion_value - policy.margin
    beats = value > target if policy.higher_is_better else value < target
    if beats:
        return Decision(
            True,
            f"{metric}={value:.4f} beats the champion's {champion_value:.4f} by more than {policy.margin:g}",
        )
    return Decision(
        False,
        f"{metric}={value:.4f} does not beat the champion's {champion_value:.4f}"
        f" by more than {policy.margin:g}",
    )


def _quantization_refusal(candidate: Mapping[str, float], tolerance: float | None) -> str | None:
    """Why the candidate's int8 model loses too much accuracy, or None when it does not (or no
    tolerance is set). A version without an int8 model cannot show it stays within the tolerance."""
    if tolerance is None:
        return None
    delta = candidate.get(QUANTIZATION_DELTA_METRIC)
    if delta is None or not math.isfinite(delta):
        return (
            f"maxQuantizationLoss is {tolerance:g} but the candidate has no finite"
            f" {QUANTIZATION_DELTA_METRIC!r} metric (no int8 model)"
        )
    loss = -delta
    # Accuracies are counts over the test set; their float difference may overshoot by an ulp, and a
    # loss of exactly the tolerance is within it.
    if loss > tolerance + 1e-9:
        return (
            f"the int8 model loses {loss:.4f} accuracy against the float model,"
            f" more than maxQuantizationLoss {tolerance:g}"
        )
    return None
