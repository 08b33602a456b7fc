"""`python -m drift [options]`: the drift job (a loop, with metrics on --port).
`python -m drift once [options] [--images FILE.npz]`: one evaluation, its result as JSON on stdout.

Every option also reads an environment variable (DRIFT_<OPTION>, and MLFLOW_TRACKING_URI), so a pod
can keep the prediction log's URL, which holds a password, in a Secret.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import numpy as np
import numpy.typing as npt

from drift.detect import (
    DEFAULT_ALPHA,
    DEFAULT_COMPONENTS,
    DEFAULT_MIN_SAMPLES,
    DEFAULT_WINDOW_SAMPLES,
    DriftConfigError,
)
from drift.features import FeatureError
from drift.reference import REFERENCE_SAMPLES, ModelResolutionError
from drift.report import ReportLogger
from drift.service import (
    DEFAULT_CACHE_DIR,
    DEFAULT_EXCLUDED_SOURCES,
    Detector,
    DriftService,
    ReportError,
    Settings,
)

log = logging.getLogger("drift")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"DRIFT_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drift",
        description="Input drift of the logged predictions against the training reference.",
    )
    parser.add_argument(
        "mode",
        nargs="?",
        choices=["run", "once"],
        default="run",
        help="run: evaluate every --interval-seconds and serve metrics; once: one evaluation",
    )
    parser.add_argument(
        "--model",
        default=_env("MODEL", "models:/mnist-cnn@champion"),
        help="registry URI (models:/<name>@<alias>, models:/<name>/<version>) or an .onnx file",
    )
    parser.add_argument(
        "--prediction-log-url",
        default=_env("PREDICTION_LOG_URL"),
        help="SQLAlchemy URL of the prediction log (sqlite:///..., postgresql+psycopg2://...)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking server (the registry, and where reports are logged)",
    )
    parser.add_argument("--window-seconds", type=float, default=float(_env("WINDOW_SECONDS", "600") or 600))
    parser.add_argument("--interval-seconds", type=float, default=float(_env("INTERVAL_SECONDS", "60") or 60))
    parser.add_argument(
        "--window-samples",
        type=int,
        default=int(_env("WINDOW_SAMPLES", str(DEFAULT_WINDOW_SAMPLES)) or 0),
        help="the newest inputs of the window that are tested (the size the false-alarm "
        "rate was measured at)",
    )
    parser.add_argument(
        "--min-samples",
        type=int,
        default=int(_env("MIN_SAMPLES", str(DEFAULT_MIN_SAMPLES)) or 0),
        help="fewer inputs in the window: no decision",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=float(_env("ALPHA", str(DEFAULT_ALPHA)) or 0),
        help="family-wise false-alarm rate of one window",
    )
    parser.add_argument(
        "--components",
        type=int,
        default=int(_env("COMPONENTS", str(DEFAULT_COMPONENTS)) or 0),
        help="principal components of the embedding that are tested",
    )
    parser.add_argument("--reference-samples", type=int, default=REFERENCE_SAMPLES)
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="MNIST .npz for the reference (default: MNIST_NPZ or the bundled copy)",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(_env("CACHE_DIR") or DEFAULT_CACHE_DIR))
    parser.add_argument("--experiment", default=_env("EXPERIMENT", "mnist-drift"))
    parser.add_argument("--no-report", action="store_true", help="do not log reports to MLflow")
    parser.add_argument(
        "--report-interval-seconds",
        type=float,
        default=None,
        help="log a window's report at most this often unless the decision changed "
        "(default: --window-seconds)",
    )
    parser.add_argument(
        "--exclude-sources",
        default=_env("EXCLUDE_SOURCES", ",".join(DEFAULT_EXCLUDED_SOURCES)),
        help="comma-separated endpoints whose logged predictions windows leave out (default: the "
        "page's live previews, ws_predict; empty: none)",
    )
    parser.add_argument("--port", type=int, default=int(_env("PORT", "9105") or 0))
    parser.add_argument("--host", default=_env("HOST", "0.0.0.0"))
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="once: evaluate the images of this .npz (array `images`, or `x_test`) "
        "instead of the prediction log",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return parser


def _images(path: Path) -> npt.NDArray[np.generic]:
    with np.load(path, allow_pickle=False) as archive:
        for key in ("images", "x_test"):
            if key in archive.files:
                return np.asarray(archive[key])
        raise ValueError(f"{path} has no array named `images` (or `x_test`): {archive.files}")


def settings_from(args: argparse.Namespace) -> Settings:
    """The job's settings from its parsed command line (raises ValueError on a bad combination)."""
    return Settings(
        model=args.model,
        prediction_log_url=args.prediction_log_url,
        tracking_uri=args.tracking_uri,
        window_seconds=args.window_seconds,
        interval_seconds=args.interval_seconds,
        window_samples=args.window_samples,
        min_samples=args.min_samples,
        alpha=args.alpha,
        components=args.components,
        reference_samples=args.reference_samples,
        data_path=args.data,
        cache_dir=args.cache_dir,
        experiment=args.experiment,
        log_reports=not args.no_report,
        report_interval_seconds=args.report_interval_seconds,
        exclude_sources=tuple(name.strip() for name in args.exclude_sources.split(",") if name.strip()),
        host=args.host,
        port=args.port,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from(args)
        settings.config  # noqa: B018 - validates alpha and min samples before anything starts
    except (ValueError, DriftConfigError) as error:
        print(f"drift: {error}", file=sys.stderr)
        return 2
    if args.mode == "run" and args.images is not None:
        print("drift: --images is for `once`; the loop reads the prediction log", file=sys.stderr)
        return 2
    if not settings.prediction_log_url and args.images is None:
        print("drift: pass --prediction-log-url (or DRIFT_PREDICTION_LOG_URL), or --images with `once`",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.mode == "once":
        return _once(settings, args.images)
    service = DriftService(settings)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current evaluation", signum)
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()
    return 0


def _once(settings: Settings, images: Path | None) -> int:
    detector = Detector(settings, ReportLogger.create(settings))
    try:
        evaluation = (
            detector.evaluate_images(_images(images), force_report=True)
            if images
            else detector.evaluate_window(force_report=True)
        )
    except (ModelResolutionError, FeatureError, DriftConfigError, ReportError, ValueError, OSError) as error:
        print(f"drift: {error}", file=sys.stderr)
        return 1
    finally:
        detector.close()
    print(json.dumps(evaluation.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
