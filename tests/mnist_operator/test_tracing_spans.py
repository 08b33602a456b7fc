"""The operator's promotion traces: `python -m mnist_operator` with OTEL_EXPORTER_OTLP_ENDPOINT set,
against the real kube-apiserver of the other operator tests, exporting to a real OTLP/gRPC receiver
(testing/otlp_receiver.py). One trace per promotion: its id in the TrainingRun's status, its context
in the serving pod template and in the events, and its spans at the receiver."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from contract.registry import alias_version
from contract.spec import CHAMPION_ALIAS
from mnist_operator import tracing
from mnist_operator.tracing import TRACEPARENT_ANNOTATION
from testing.controlplane import ControlPlane
from testing.fake_kubelet import FakeKubelet
from testing.kubectl import get_json, kubectl_ok, unique_name
from testing.operator_harness import OperatorFactory, OperatorProcess, phase_in, wait_for_trainingrun
from testing.otlp_receiver import OtlpReceiver, ReceivedSpan

# The fixtures and helpers of the end-to-end operator tests, shared rather than copied.
from tests.mnist_operator.test_reconcile import (  # noqa: F401 (fixtures, found by pytest by name)
    FINAL,
    deploy_serving,
    events_of,
    mlflow_client,
    quick_spec,
    registered_model,
    replicasets_of,
    seed_champion,
    stand_in_trainer,
    template_hash,
    train_stand_in,
    trainingrun,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# W3C Trace Context: version 00, trace id, parent span id, flags (sampled, and level 2's random bit).
TRACEPARENT = re.compile(r"^00-(?P<trace>[0-9a-f]{32})-(?P<span>[0-9a-f]{16})-[0-9a-f]{2}$")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as found:
        yield found


def start_traced(operators: OperatorFactory, namespace: str, endpoint: str) -> OperatorProcess:
    """The operator with the standard OpenTelemetry variables, as a collector's users set them."""
    identity = unique_name("traced")
    env = operators.env([namespace], identity, rollout_timeout_seconds="15")
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    process = OperatorProcess(env, operators.directory / f"{identity}.log").start()
    operators.started.append(process)
    return process


def pod_template_annotations(plane: ControlPlane, namespace: str, deployment: str) -> dict[str, str]:
    document = get_json(plane, "deployment", deployment, "-n", namespace)
    found: dict[str, str] = document["spec"]["template"]["metadata"].get("annotations") or {}
    return found


def event_messages(plane: ControlPlane, namespace: str, run: str) -> dict[str, str]:
    return {event["reason"]: event["message"] for event in events_of(plane, namespace, run)}


def spans_by_name(receiver: OtlpReceiver, trace_id: str, names: set[str]) -> dict[str, ReceivedSpan]:
    spans = receiver.wait_for(
        lambda spans: names <= {span.name for span in spans if span.trace_id == trace_id},
        30,
        f"spans {sorted(names)} of trace {trace_id}",
    )
    return {span.name: span for span in spans if span.trace_id == trace_id}


def test_a_promotion_is_one_trace_from_the_status_to_the_pod_template_events_and_receiver(
    *,
    control_plane: ControlPlane,
    operators: OperatorFactory,
    watched_namespace: str,
    fake_kubelet: FakeKubelet,
    registered_model: str,  # noqa: F811 (the imported fixture)
    mlflow_client: MlflowClient,  # noqa: F811 (the imported fixture)
    stand_in_trainer: Path,  # noqa: F811 (the imported fixture)
    receiver: OtlpReceiver,
) -> None:
    namespace, model = watched_namespace, registered_model
    seeded = seed_champion(mlflow_client, model, 0.1)
    serving = deploy_serving(control_plane, namespace, model, version=seeded)
    start_traced(operators, namespace, receiver.endpoint).wait_leading()

    first = unique_name("traced")
    train_stand_in(fake_kubelet, stand_in_trainer, first, 0.9)
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(first, namespace, quick_spec(model)))
    promoted = wait_for_trainingrun(
        control_plane, namespace, first, predicate=phase_in(*FINAL), timeout=180, what="to be promoted"
    )
    status: dict[str, Any] = promoted["status"]
    assert status["phase"] == "Promoted", status
    root = TRACEPARENT.match(status["traceparent"])
    assert root is not None and root["trace"] == status["traceId"], status
    trace_id = status["traceId"]

    # The receiver has the promotion's steps, all children of the evaluation that started the trace.
    spans = spans_by_name(
        receiver, trace_id, {"trainingrun.evaluate", "trainingrun.rollout", "trainingrun.rollout.wait"}
    )
    evaluate = spans["trainingrun.evaluate"]
    assert (evaluate.span_id, evaluate.parent_span_id) == (root["span"], "")
    assert evaluate.attributes["mnist.promoted"] is True
    assert evaluate.attributes["mnist.model.version"] == status["modelVersion"]
    assert evaluate.attributes["mnist.trainingrun.name"] == first
    assert evaluate.resource["service.name"] == "mnist-operator"
    rollout, wait = spans["trainingrun.rollout"], spans["trainingrun.rollout.wait"]
    assert rollout.parent_span_id == wait.parent_span_id == evaluate.span_id
    # The wait covers the rollout, from the patch to the tick that saw it available.
    assert wait.start_ns <= rollout.end_ns and wait.end_ns >= rollout.end_ns
    assert wait.status == "UNSET" and wait.attributes["mnist.rollout.deployments"] == serving

    # The serving pods of the rollout name the span that patched their template.
    annotations = pod_template_annotations(control_plane, namespace, serving)
    patched = TRACEPARENT.match(annotations[TRACEPARENT_ANNOTATION])
    assert patched is not None and (patched["trace"], patched["span"]) == (trace_id, rollout.span_id)
    (new_rs,) = [
        rs
        for rs in replicasets_of(control_plane, namespace, serving)
        if TRACEPARENT_ANNOTATION in (rs["spec"]["template"]["metadata"].get("annotations") or {})
    ]
    assert new_rs["spec"]["template"]["metadata"]["annotations"][TRACEPARENT_ANNOTATION] == patched.string
    (entry,) = status["rollout"]["deployments"]
    assert "previousTraceparent" not in entry, "the seeded template had no trace"

    # And so does every event the promotion posted.
    messages = event_messages(control_plane, namespace, first)
    for reason in ("Promoted", "RolloutStarted", "RolledOut"):
        assert f"traceparent 00-{trace_id}-" in messages[reason], (reason, messages[reason])

    # A rollback restores the template as it was, the first trace's annotation included: the
    # Deployment returns to that revision's ReplicaSet, as without tracing.
    version = status["modelVersion"]
    promoted_hash = template_hash(control_plane, namespace, serving, f"models:/{model}/{version}")
    fake_kubelet.never_become_ready(namespace, serving)
    second = unique_name("traced")
    train_stand_in(fake_kubelet, stand_in_trainer, second, 0.95)
    kubectl_ok(control_plane, "apply", "-f", "-", manifest=trainingrun(second, namespace, quick_spec(model)))
    rolled_back = wait_for_trainingrun(
        control_plane, namespace, second, predicate=phase_in(*FINAL), timeout=180, what="to roll back"
    )
    status = rolled_back["status"]
    assert status["phase"] == "RolledBack", status
    assert status["traceId"] != trace_id
    (entry,) = status["rollout"]["deployments"]
    assert entry["previousTraceparent"] == patched.string
    assert (
        pod_template_annotations(control_plane, namespace, serving)[TRACEPARENT_ANNOTATION] == patched.string
    )
    assert alias_version(mlflow_client, model, CHAMPION_ALIAS) == version
    assert len(replicasets_of(control_plane, namespace, serving)) == 3
    assert template_hash(control_plane, namespace, serving, f"models:/{model}/{version}") == promoted_hash
    wait = spans_by_name(receiver, status["traceId"], {"trainingrun.rollout.wait"})[
        "trainingrun.rollout.wait"
    ]
    assert wait.status == "ERROR"
    assert (
        f"traceparent 00-{status['traceId']}-"
        in event_messages(control_plane, namespace, second)["RolledBack"]
    )


def test_without_the_exporter_package_promotions_still_get_trace_ids(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator image's requirements carry the SDK (through mlflow-skinny) but maybe no exporter."""
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    monkeypatch.setattr(tracing, "_current", [])
    with caplog.at_level(logging.WARNING, "mnist_operator.tracing"):
        with tracing.step("http://127.0.0.1:9", "trainingrun.evaluate", None, {}) as root:
            pass
        with tracing.step("http://127.0.0.1:9", "trainingrun.rollout", root.traceparent, {}) as child:
            pass
    first, second = TRACEPARENT.match(root.traceparent or ""), TRACEPARENT.match(child.traceparent or "")
    assert first is not None and second is not None
    assert first["trace"] == second["trace"] and first["span"] != second["span"]
    assert child.message("rolled") == f"rolled (traceparent {child.traceparent})"
    (warning,) = [record.getMessage() for record in caplog.records]
    assert "is not installed" in warning and "127.0.0.1:9" in warning
    with tracing.step(None, "trainingrun.evaluate", None, {}) as off:
        assert off is tracing.NO_TRACE and off.message("rolled") == "rolled"
