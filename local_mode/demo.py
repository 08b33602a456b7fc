"""`make demo`: the whole pipeline on one machine, no cluster.

Starts a local MLflow tracking server, trains every sample TrainingRun in order through the same code
the Kubernetes Job runs, applies the promotion gate after each, prints a comparison table, then starts
the prediction service on the champion and sends it a real test image.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from contract.spec import CHAMPION_ALIAS
from local_mode.mlflow_server import MlflowServer, start_mlflow_server
from local_mode.processes import ChildProcess, free_port, http_ok
from local_mode.runner import RunOutcome, load_manifest_files, run_manifests

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MANIFESTS = REPO_ROOT / "manifests" / "trainingruns"
PREFERRED_MLFLOW_PORT = 5000
PREFERRED_SERVING_PORT = 8000


def _port(preferred: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def format_table(outcomes: Sequence[RunOutcome], champion_version: str | None) -> str:
    header = (
        f"{'run':<13}{'architecture':<13}{'lr':>8}{'batch':>7}{'epochs':>7}"
        f"{'test acc':>10}{'train s':>9}{'version':>9}  decision"
    )
    lines = [header, "-" * (len(header) + 40)]
    for outcome in outcomes:
        hyper, result = outcome.spec.hyperparameters, outcome.result
        decision = "promoted" if result.promoted else "rejected"
        marker = " *" if result.model_version == champion_version else ""
        lines.append(
            f"{outcome.name:<13}{outcome.spec.architecture.value:<13}{hyper.learning_rate:>8g}"
            f"{hyper.batch_size:>7}{hyper.epochs:>7}{result.metrics['test_accuracy']:>10.4f}"
            f"{result.metrics['train_seconds']:>9.1f}{result.model_version:>9}{marker:<3}"
            f"{decision}: {result.promotion_reason}"
        )
    lines.append(f"* = version now aliased '{CHAMPION_ALIAS}'")
    return "\n".join(lines)


def start_serving(
    mlflow: MlflowServer, model: str, state_dir: Path, extra_env: Mapping[str, str] | None = None
) -> tuple[ChildProcess, str]:
    port = _port(PREFERRED_SERVING_PORT)
    environment = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow.url,
        "SERVING_MODEL_URI": f"models:/{model}@{CHAMPION_ALIAS}",
        "SERVING_HOST": "127.0.0.1",
        "SERVING_PORT": str(port),
        "SERVING_GRPC_PORT": str(_port(8081)),
        "SERVING_MODEL_CACHE_DIR": str(state_dir / "model-cache"),
        **(extra_env or {}),
    }
    child = ChildProcess.spawn(
        "the prediction service",
        [sys.executable, "-m", "serving"],
        state_dir / "serving.log",
        env=environment,
        append_log=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_ready(lambda: http_ok(f"{url}/health/ready"), 120, "it was ready", interval=0.5)
    except BaseException:
        child.stop()
        raise
    return child, url


def predict_one_test_image(url: str) -> str:
    import json

    import numpy as np

    from training_job.data import load_raw

    arrays, _ = load_raw(None)
    image, label = arrays["x_test"][0], int(arrays["y_test"][0])
    body = json.dumps({"pixels": np.asarray(image).tolist()}).encode()
    request = urllib.request.Request(
        f"{url}/predict", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    return (
        f"test image 0 (label {label}) → digit {answer['digit']} with confidence {answer['confidence']:.4f}"
        f" from {answer.get('model_name')} v{answer.get('model_version')}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="--loop (make demo-loop): the closed loop once instead; python -m local_mode --loop --help",
    )
    parser.add_argument("manifests", nargs="*", type=Path, default=[DEFAULT_MANIFESTS])
    parser.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".state")
    parser.add_argument("--data", type=Path, help="MNIST .npz (default: the bundled copy)")
    parser.add_argument("--max-train-samples", type=int, help="train on fewer examples, for a quick look")
    parser.add_argument("--epochs", type=int, help="override every run's epochs, for a quick look")
    parser.add_argument("--no-serve", action="store_true", help="stop after training and promotion")
    parser.add_argument(
        "--keep-running",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep MLflow and the service up until Ctrl-C (default: only when attached to a terminal)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    manifests = load_manifest_files(args.manifests)
    if not manifests:
        parser.error(f"no TrainingRun manifests found in {[str(path) for path in args.manifests]}")
    state_dir: Path = args.state_dir.resolve()
    mlflow = start_mlflow_server(state_dir / "mlflow", _port(PREFERRED_MLFLOW_PORT))
    serving: ChildProcess | None = None
    try:
        print(f"MLflow tracking server: {mlflow.url}", flush=True)
        outcomes = run_manifests(manifests, mlflow.url, args.data, args.max_train_samples, args.epochs)
        from mlflow import MlflowClient

        from contract.registry import alias_version

        model = outcomes[-1].result.registered_model
        champion = alias_version(MlflowClient(mlflow.url), model)
        print("\n" + format_table(outcomes, champion) + "\n")
        print(f"MLflow UI: {mlflow.url}/#/models/{model}")
        if champion is None:
            print("No version has passed the promotion gate yet, so there is nothing to serve.")
        else:
            print(f"Champion: {model} version {champion}")
        if not args.no_serve and champion is not None:
            serving, url = start_serving(mlflow, model, state_dir)
            print(f"Prediction service: {url}/  (API docs: {url}/docs, metrics: {url}/metrics)")
            print(predict_one_test_image(url), flush=True)
        keep_running = sys.stdin.isatty() if args.keep_running is None else args.keep_running
        if keep_running:
            print("Running; press Ctrl-C to stop.", flush=True)
            stop_signals = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            signal.sigwait(stop_signals)
    finally:
        if serving is not None:
            serving.stop(30)
        mlflow.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
