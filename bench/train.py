"""`make bench-train`: each sample TrainingRun's architecture, full data, its configured epochs.

Trains through the same model, optimizer and input-pipeline builders as the training Job, without
MLflow in the loop, so the numbers are the model's cost. Time-to-99% uses validation accuracy
(measured at epoch ends), because the test set is for the final evaluation only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "train.json"


def bench_one(name: str, spec: Any, data_path: Path | None, max_train_samples: int | None) -> dict[str, Any]:
    import keras

    from training_job.data import load_dataset
    from training_job.models import build_model, build_optimizer
    from training_job.train import make_train_dataset

    hyper = spec.hyperparameters
    dataset = load_dataset(data_path, hyper.validation_split, hyper.seed, max_train_samples)
    keras.utils.set_random_seed(hyper.seed)
    model = build_model(spec.architecture)
    steps = -(-len(dataset.train) // hyper.batch_size)
    model.compile(
        optimizer=build_optimizer(hyper, steps), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    epoch_ends: list[tuple[float, float]] = []
    started = time.monotonic()

    class Timer(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
            epoch_ends.append((time.monotonic() - started, float((logs or {})["val_accuracy"])))
            print(
                f"  {name} epoch {epoch + 1}: val_accuracy={epoch_ends[-1][1]:.4f} t={epoch_ends[-1][0]:.1f}s"
            )

    model.fit(
        make_train_dataset(dataset.train, hyper.batch_size, hyper.seed, hyper.augment),
        validation_data=(dataset.validation.images, dataset.validation.labels),
        epochs=hyper.epochs,
        callbacks=[Timer()],
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=0,
    )
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
        "parameters": int(model.count_params()),
        "train_seconds": round(wall, 2),
        "test_accuracy": round(float(test_accuracy), 5),
        "val_accuracy_by_epoch": [round(accuracy, 5) for _, accuracy in epoch_ends],
        "seconds_to_99_val": None if time_to_99 is None else round(time_to_99, 2),
    }


def main() -> None:
    from training_job.runner import load_manifest_files

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifests", nargs="*", type=Path, default=[REPO_ROOT / "manifests" / "trainingruns"])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--max-train-samples", type=int)
    parser.add_argument("--only", action="append", help="run names to include")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.output.write_text(json.dumps({"machine": machine, "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
