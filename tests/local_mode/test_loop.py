"""`make demo-loop`'s program end to end on a small budget (real MLflow, serving with its SQLite
prediction log, `POST /feedback`, the drift job, Prometheus and Alertmanager when installed, the
training with feedback, the gate), and the alert receiver's own checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from contract.constants import PROMOTION_REASON_TAG
from contract.registry import alias_version
from local_mode.loop import (
    ALERT_NAME,
    LOOP_MODEL,
    WEBHOOK_PATH,
    WebhookReceiver,
    alert_binaries_installed,
    alert_rule,
)
from local_mode.mlflow_server import start_mlflow_server
from testing.helm import NAMESPACE, RELEASE, Rendered
from testing.training import REPO_ROOT

# The demo's training sizes (one version's training costs little more than TensorFlow's start-up
# here), with smaller traffic windows.
TRAIN_SAMPLES = 5000
EPOCHS = 2
TRAFFIC = 200
LABELLED = 300
HELD_OUT = 100


@pytest.mark.slow
def test_loop_goes_from_quiet_to_drift_to_a_retrained_version_the_gate_judged(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    completed = subprocess.run(
        [
            sys.executable, "-m", "local_mode", "--loop",
            f"--state-dir={state_dir}",
            f"--max-train-samples={TRAIN_SAMPLES}",
            f"--epochs={EPOCHS}",
            f"--traffic={TRAFFIC}",
            f"--labelled={LABELLED}",
            f"--held-out={HELD_OUT}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO_ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-4000:]
    output = completed.stdout
    summary = json.loads((state_dir / "loop" / "summary.json").read_text())

    # The timeline, in its order: quiet, then drift, the alert, the retraining, the decision.
    steps = [event["step"] for event in summary["timeline"]]
    order = ["champion", "serving", "drift check", "drift check", "alert", "retraining", "trained", "gate"]
    positions = [steps.index(order[0])]
    for step in order[1:]:
        positions.append(steps.index(step, positions[-1] + 1))
    checks = [event["text"] for event in summary["timeline"] if event["step"] == "drift check"]
    assert checks[0].startswith("quiet:") and checks[1].startswith("DRIFT:"), output
    for event in summary["timeline"]:
        assert event["text"] in output

    quiet, detected = summary["quiet"], summary["detected"]
    assert quiet["decided"] and not quiet["detected"], quiet
    assert quiet["samples"] == TRAFFIC and quiet["p_value"] >= quiet["alpha"]
    assert detected["decided"] and detected["detected"], detected
    assert detected["samples"] == TRAFFIC and detected["p_value"] < detected["alpha"]
    # Each window's report was logged to MLflow, as the drift job does.
    assert quiet["run_id"] and detected["run_id"]

    # The alert went through the real Prometheus and Alertmanager when they are installed.
    alert = summary["alert"]
    assert alert["fired"] is True
    if alert_binaries_installed():
        assert alert["mode"] == "prometheus" and alert["labels"]["alertname"] == ALERT_NAME
        assert summary["quiet_prometheus"] == {"mnist_drift_detected": 0.0, "alert_active": False}
    else:
        assert alert["mode"] == "direct"

    assert summary["feedback"] == {
        "sent": LABELLED,
        "answers": {"created": LABELLED},
        "labelled_in_log": LABELLED,
    }
    champion, retrained = summary["champion"], summary["retrained"]
    assert champion["feedback_samples"] == 0
    assert retrained["trigger"] == f"alert:{ALERT_NAME}"
    assert retrained["trainingrun"].startswith("drift-retrain-")
    assert retrained["mnist_train_samples"] == TRAIN_SAMPLES
    assert retrained["feedback_samples"] == LABELLED
    assert "mnist-train+feedback" in retrained["dataset_inputs"]
    assert retrained["train_digest"] != champion["train_digest"]

    # The gate's decision is recorded in the registry, and serving follows it.
    gate = summary["gate"]
    server = start_mlflow_server(state_dir / "mlflow")
    try:
        client = MlflowClient(server.url)
        version = client.get_model_version(LOOP_MODEL, retrained["version"])
        assert version.tags[PROMOTION_REASON_TAG] == gate["reason"]
        run = client.get_run(retrained["run_id"])
        assert run.data.params["feedback_samples"] == str(LABELLED)
        now = alias_version(client, LOOP_MODEL)
    finally:
        server.stop()
    accuracy = summary["drifted_accuracy"]
    assert accuracy["held_out"] == HELD_OUT and 0.0 <= accuracy["before"] <= 1.0
    if gate["promoted"]:
        assert now == retrained["version"] == summary["serving_version"]
        assert accuracy["after"] is not None
    else:
        assert now == champion["version"] == summary["serving_version"]
        assert accuracy["after"] is None


def _post(url: str, body: bytes, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_the_alert_receiver_takes_only_authenticated_alertmanager_payloads() -> None:
    receiver = WebhookReceiver("s3cret")
    try:
        firing = json.dumps(
            {"alerts": [{"status": "firing", "labels": {"alertname": ALERT_NAME}}, {"status": "resolved"}]}
        ).encode()
        assert _post(receiver.url, firing, None) == 401
        assert _post(receiver.url, firing, "wrong") == 401
        assert _post(receiver.url, b"{not json", "s3cret") == 400
        assert _post(receiver.url, b'{"no": "alerts"}', "s3cret") == 400
        assert _post(receiver.url.replace(WEBHOOK_PATH, "/elsewhere"), firing, "s3cret") == 404
        assert receiver.firing.empty()
        assert _post(receiver.url, firing, "s3cret") == 200
        assert receiver.wait_for(ALERT_NAME, 1)["labels"]["alertname"] == ALERT_NAME
        with pytest.raises(TimeoutError):
            receiver.wait_for(ALERT_NAME, 0.2)
    finally:
        receiver.stop()


def test_the_demo_alerts_with_the_charts_drift_rule(rendered: dict[str, Rendered]) -> None:
    """The demo's Prometheus loads the chart's `MnistInputDrift` rule, but for its own scrape target and
    without the `for`: the same expression once the selector names the release's drift job."""
    groups = rendered["default"].one("PrometheusRule")["spec"]["groups"]
    chart = next(rule for group in groups for rule in group["rules"] if rule.get("alert") == ALERT_NAME)
    demo = alert_rule(NAMESPACE, f"{RELEASE}-drift")
    assert chart["expr"].strip() == demo["expr"]
    assert chart["labels"] == demo["labels"]
    assert chart["annotations"]["summary"] == demo["annotations"]["summary"]
