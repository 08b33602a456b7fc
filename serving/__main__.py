"""`python -m serving`: the production entry point (uvicorn, uvloop, httptools).

Configuration comes only from the environment (`SERVING_*`, `MLFLOW_TRACKING_URI`; see
serving/settings.py). With SERVING_WORKERS=1 (the default, and the recommendation on Kubernetes:
scale with replicas) uvicorn runs the app in this process. With more workers uvicorn's supervisor
forks them and restarts any that die; this launcher first pins the alias to one version so every
worker serves the same one, pre-fetches the artifact once, and points prometheus_client at a shared
directory so `/metrics` adds up all workers.
"""

from __future__ import annotations

import logging
import logging.config
import os
import sys
import tempfile

import uvicorn
from pydantic import ValidationError

from serving.logs import log_config
from serving.model_store import ModelStore, RegistryError
from serving.settings import Settings

log = logging.getLogger("serving")

USAGE = __doc__ or ""


def _prepare_workers(settings: Settings) -> None:
    ref = settings.model_ref
    if ref.alias is not None:
        store = ModelStore(
            settings.mlflow_tracking_uri,
            settings.model_cache_dir,
            settings.registry_timeout_seconds,
            precision=settings.model_precision,
        )
        try:
            cached = store.fetch(ref)
        except RegistryError as exc:
            # Workers retry on their own; they may then see different versions if the alias moves meanwhile.
            log.warning("could not pin %s before starting workers: %s", ref, exc)
        else:
            os.environ["SERVING_MODEL_URI"] = ref.pinned(cached.info.version)
            log.info("pinned %s to version %s for %d workers", ref, cached.info.version, settings.workers)
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mnist-serving-metrics-")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(USAGE, file=sys.stderr)
        return 0 if args[0] in ("-h", "--help") else 2
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid serving configuration:\n{exc}", file=sys.stderr)
        return 2
    config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(config)
    if settings.workers > 1:
        _prepare_workers(settings)
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_config=config,
        log_level=settings.log_level.lower(),
        access_log=False,
        server_header=False,
        timeout_keep_alive=settings.keep_alive_seconds,
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
