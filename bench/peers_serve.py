"""The servers `make bench-serve` starts, one at a time, each with one worker on loopback ports:
ours (`python -m serving`), MLServer 1.7 with its MLflow runtime, KServe 0.21's Python ModelServer
(bench/kserve_model.py), and `mlflow models serve` (pyfunc, `--env-manager local`).

MLServer and KServe run from their isolated peer virtualenvs (testing.peers), `mlflow models serve`
from the development one (the MLflow the platform uses).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from local_mode.processes import ChildProcess, free_ports, http_ok

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_POLL_SECONDS = 0.01


@dataclass
class Server:
    name: str
    child: ChildProcess
    url: str
    ready_path: str
    grpc_target: str | None = None
    settings: dict[str, object] = field(default_factory=dict)

    def wait(self, timeout: float) -> float:
        """Seconds from spawn until `ready_path` answers 200 (polled every 10 ms, which bounds the
        resolution of a start-up measurement)."""
        self.child.wait_ready(
            lambda: http_ok(self.url + self.ready_path, timeout=1.0),
            timeout,
            f"{self.ready_path} answered 200",
            interval=READY_POLL_SECONDS,
        )
        return time.monotonic() - self.child.started

    def stop(self) -> None:
        self.child.stop(30)


def _peer_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment without the development checkout on the path: a peer runs its own packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def ours(
    tracking_uri: str,
    model_uri: str,
    cache: Path,
    workdir: Path,
    *,
    extra: dict[str, str] | None = None,
    name: str = "ours",
) -> Server:
    from serving.settings import Settings

    http, grpc = free_ports(2)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "SERVING_HOST": "127.0.0.1",
        "SERVING_PORT": str(http),
        "SERVING_WORKERS": "1",
        "SERVING_MODEL_URI": model_uri,
        "SERVING_MODEL_CACHE_DIR": str(cache),
    }
    has_grpc = "grpc_port" in Settings.model_fields
    if has_grpc:
        env["SERVING_GRPC_PORT"] = str(grpc)
    env.update(extra or {})
    slug = name.replace(" ", "-").replace("(", "").replace(")", "")
    child = ChildProcess.spawn(
        slug,
        [sys.executable, "-m", "serving"],
        workdir / f"{slug}.log",
        env=env,
        cwd=REPO_ROOT,
        die_with_parent=True,
    )
    return Server(
        name,
        child,
        f"http://127.0.0.1:{http}",
        "/health/ready",
        grpc_target=f"127.0.0.1:{grpc}" if has_grpc else None,
        settings={"workers": 1, **(extra or {})},
    )


def mlserver(python: Path, model_dir: Path, model_name: str, workdir: Path, parallel_workers: int) -> Server:
    """`mlserver start` on a directory holding settings.json and one model-settings.json that points
    the MLflow runtime at the downloaded model version (MLflow's ONNX pyfunc)."""
    http, grpc, metrics = free_ports(3)
    root = workdir / "mlserver"
    model = root / model_name
    model.mkdir(parents=True, exist_ok=True)
    settings = {
        "host": "127.0.0.1",
        "http_port": http,
        "grpc_port": grpc,
        "metrics_port": metrics,
        # 0: inference in the server process itself, like ours and KServe with one worker; 1 (the
        # default) adds a separate inference process behind a queue.
        "parallel_workers": parallel_workers,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    (model / "model-settings.json").write_text(
        json.dumps(
            {
                "name": model_name,
                "implementation": "mlserver_mlflow.MLflowRuntime",
                "parameters": {"uri": str(model_dir)},
            }
        )
    )
    command = [str(python.with_name("mlserver")), "start", str(root)]
    child = ChildProcess.spawn(
        "mlserver", command, workdir / "mlserver.log", env=_peer_env({}), cwd=root, die_with_parent=True
    )
    return Server(
        "mlserver",
        child,
        f"http://127.0.0.1:{http}",
        f"/v2/models/{model_name}/ready",
        grpc_target=f"127.0.0.1:{grpc}",
        settings=settings,
    )


def kserve(python: Path, onnx_path: Path, model_name: str, workdir: Path) -> Server:
    http, grpc = free_ports(2)
    command = [
        # -P: not the script's directory on the path, where bench/operator.py would shadow the stdlib.
        str(python), "-P", str(REPO_ROOT / "bench" / "kserve_model.py"),
        "--http_port", str(http), "--grpc_port", str(grpc), "--workers", "1",
    ]  # fmt: skip
    env = _peer_env({"BENCH_ONNX_PATH": str(onnx_path), "BENCH_MODEL_NAME": model_name})
    child = ChildProcess.spawn(
        "kserve", command, workdir / "kserve.log", env=env, cwd=workdir, die_with_parent=True
    )
    return Server(
        "kserve",
        child,
        f"http://127.0.0.1:{http}",
        f"/v2/models/{model_name}/ready",
        grpc_target=f"127.0.0.1:{grpc}",
        settings={"workers": 1},
    )


def mlflow_models_serve(name: str, model_uri: str, tracking_uri: str, workdir: Path) -> Server:
    (port,) = free_ports(1)
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    command = [
        mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    env = {
        **os.environ,
        # `mlflow models serve` execs `uvicorn` by name: it must find the virtualenv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    slug = name.split(" ", maxsplit=1)[0]
    child = ChildProcess.spawn(
        slug, command, workdir / f"{slug}.log", env=env, cwd=workdir, die_with_parent=True
    )
    return Server(
        name, child, f"http://127.0.0.1:{port}", "/ping", settings={"workers": 1, "model": model_uri}
    )
