"""`make bench-train`: each sample TrainingRun's architecture, full data, its configured epochs.

`--workers-comparison` instead trains the champion (residual-bn) once in one worker process and once
across two local worker processes (MultiWorkerMirroredStrategy over loopback, the same global batch and
learning rate) and compares wall time and test accuracy; results in bench/results/train-workers.json.

Trains through the same model, optimizer and input-pipeline builders as the training Job, without
MLflow in the loop, so the numbers are the model's cost. Time-to-99% uses validation accuracy
(measured at epoch ends), because the test set is for the final evaluation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.report import write_results

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "train.json"
WORKERS_RESULTS = REPO_ROOT / "bench" / "results" / "train-workers.json"
CHAMPION_MANIFEST = REPO_ROOT / "manifests" / "trainingruns" / "04-residual-bn.yaml"
ROW_PREFIX = "BENCH-ROW "


def bench_one(
    name: str, spec: Any, data_path: Path | None, max_train_samples: int | None, worker: Any = None
) -> dict[str, Any]:
    """One training, timed. `worker` (a training_job.distributed.WorkerContext) makes this process one
    of several MultiWorkerMirroredStrategy workers, trained exactly as the training Job does."""
    from training_job.data import load_dataset
    from training_job.train import _compiled_model, _fit, _strategy

    hyper = spec.hyperparameters
    dataset = load_dataset(data_path, hyper.validation_split, hyper.seed, max_train_samples)
    workers = 1 if worker is None else worker.workers
    # Before any other TensorFlow op, as collective ops require.
    strategy = None if worker is None else _strategy(worker, hyper.batch_size, hyper.batch_size // workers)
    import keras

    keras.utils.set_random_seed(hyper.seed)
    model = _compiled_model(spec, len(dataset.train), strategy)
    epoch_ends: list[tuple[float, float]] = []
    started = time.monotonic()

    class Timer(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            epoch_ends.append((time.monotonic() - started, float((logs or {})["val_accuracy"])))
            print(
                f"  {name} epoch {epoch + 1}: val_accuracy={epoch_ends[-1][1]:.4f} t={epoch_ends[-1][0]:.1f}s"
            )

    # `_fit` is the training Job's own fit (a local copy of the weights comes back under a strategy).
    model = _fit(model, spec, dataset, callbacks=[Timer()], strategy=strategy)
    wall = time.monotonic() - started
    _, test_accuracy = model.evaluate(dataset.test.images, dataset.test.labels, batch_size=1000, verbose=0)
    time_to_99 = next((seconds for seconds, accuracy in epoch_ends if accuracy >= 0.99), None)
    keras.backend.clear_session()
    return {
        "run": name,
        "architecture": spec.architecture.value,
        "epochs": hyper.epochs,
        "learning_rate": hyper.learning_rate,
        "batch_size": hyper.batch_size,
        "workers": workers,
        "train_samples": len(dataset.train),
        "parameters": int(model.count_params()),
        "train_seconds": round(wall, 2),
        "test_accuracy": round(float(test_accuracy), 5),
        "val_accuracy_by_epoch": [round(accuracy, 5) for _, accuracy in epoch_ends],
        "seconds_to_99_val": None if time_to_99 is None else round(time_to_99, 2),
    }


def _worker_main(args: argparse.Namespace) -> None:
    """One process of a comparison run: `--worker-index` of `--workers`, peers in the environment."""
    from contract.spec import TrainingRunSpec
    from training_job.distributed import worker_context

    spec = TrainingRunSpec.model_validate_json(args.spec_json)
    worker = worker_context(args.workers, os.environ) if args.workers > 1 else None
    row = bench_one(f"{args.workers}-worker", spec, args.data, args.max_train_samples, worker)
    if worker is None or worker.is_chief:
        print(ROW_PREFIX + json.dumps(row), flush=True)


def run_worker_processes(
    spec: Any, workers: int, data_path: Path | None, max_train_samples: int | None
) -> dict[str, Any]:
    """`workers` local processes, as the pods of the Indexed Job; the chief's row plus the wall time of
    the whole thing (process start, TensorFlow import, cluster set-up, training, evaluation)."""
    from contract.constants import TF_CONFIG_ENV, WORKER_HOSTS_ENV, WORKER_INDEX_ENV
    from local_mode.processes import LOOPBACK, free_ports
    from training_job.distributed import worker_hosts_value

    hosts = worker_hosts_value([f"{LOOPBACK}:{port}" for port in free_ports(workers)])
    command = [
        sys.executable,
        "-m",
        "bench.train",
        f"--workers={workers}",
        "--spec-json",
        spec.model_dump_json(),
    ]
    command += [f"--data={data_path}"] if data_path else []
    command += [f"--max-train-samples={max_train_samples}"] if max_train_samples else []
    started = time.monotonic()
    processes = []
    for index in range(workers):
        env = {key: value for key, value in os.environ.items() if key != TF_CONFIG_ENV}
        env |= {WORKER_INDEX_ENV: str(index), WORKER_HOSTS_ENV: hosts}
        # Every process's progress lines go to the terminal; only the chief's row is read.
        stdout = subprocess.PIPE if index == 0 else subprocess.DEVNULL
        processes.append(subprocess.Popen(command, stdout=stdout, text=True, env=env, cwd=REPO_ROOT))
    output, _ = processes[0].communicate()
    codes = [process.wait() for process in processes]
    wall = time.monotonic() - started
    if any(codes):
        raise SystemExit(f"a {workers}-worker process failed: exit codes {codes}")
    row = next(
        json.loads(line[len(ROW_PREFIX) :]) for line in output.splitlines() if line.startswith(ROW_PREFIX)
    )
    print(output.replace(ROW_PREFIX, "  row: "), end="")
    return {**row, "process_wall_seconds": round(wall, 2)}


def workers_comparison(args: argparse.Namespace) -> None:
    from local_mode.runner import load_manifest_files

    (manifest,) = load_manifest_files([CHAMPION_MANIFEST])
    rows = []
    for workers in (1, 2):
        print(f"training {manifest.name} with {workers} worker(s) ...", flush=True)
        spec = manifest.spec.model_copy(update={"workers": workers})
        rows.append(run_worker_processes(spec, workers, args.data, args.max_train_samples))
    header = f"{'workers':>8}{'samples':>9}{'epochs':>8}{'train s':>10}{'wall s':>9}{'test acc':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        print(
            f"{row['workers']:>8}{row['train_samples']:>9}{row['epochs']:>8}{row['train_seconds']:>10.1f}"
            f"{row['process_wall_seconds']:>9.1f}{row['test_accuracy']:>10.4f}"
        )
    difference = abs(rows[1]["test_accuracy"] - rows[0]["test_accuracy"])
    print(f"\n|test accuracy difference| = {100 * difference:.2f} points")
    write_results(
        args.output or WORKERS_RESULTS,
        {
            "comparison": "workers",
            "manifest": str(CHAMPION_MANIFEST.relative_to(REPO_ROOT)),
            "max_train_samples": args.max_train_samples,
            "runs": rows,
            "test_accuracy_difference_points": round(100 * difference, 3),
        },
    )


def main() -> None:
    from local_mode.runner import load_manifest_files

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifests", nargs="*", type=Path, default=[REPO_ROOT / "manifests" / "trainingruns"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--only", action="append", help="run names to include")
    parser.add_argument("--output", type=Path)
    parser.add_argument(
        "--workers-comparison",
        action="store_true",
        help="the champion with 1, then 2 local workers: wall time and test accuracy",
    )
    # One process of a --workers-comparison run (internal).
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spec-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spec_json:
        _worker_main(args)
        return
    if args.workers_comparison:
        workers_comparison(args)
        return

    rows = []
    for manifest in load_manifest_files(args.manifests):
        if args.only and manifest.name not in args.only:
            continue
        print(f"training {manifest.name} ...", flush=True)
        rows.append(bench_one(manifest.name, manifest.spec, args.data, args.max_train_samples))

    header = (
        f"{'run':<14}{'architecture':<14}{'params':>10}{'epochs':>8}"
        f"{'seconds':>10}{'test acc':>10}{'t→99% val':>11}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        to_99 = "-" if row["seconds_to_99_val"] is None else f"{row['seconds_to_99_val']:.1f}s"
        print(
            f"{row['run']:<14}{row['architecture']:<14}{row['parameters']:>10}{row['epochs']:>8}"
            f"{row['train_seconds']:>10.1f}{row['test_accuracy']:>10.4f}{to_99:>11}"
        )
    write_results(args.output or RESULTS, {"runs": rows})


if __name__ == "__main__":
    main()
