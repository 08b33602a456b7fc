"""Starts a real MLflow tracking server as a child process: used by `make demo` and by the tests.

SQLite holds the tracking and registry data, and artifacts are served by the tracking server itself
(`--serve-artifacts`), so clients need nothing but the HTTP address, exactly as in the cluster.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from local_mode.processes import ChildProcess, LoopbackServer, free_port, http_ok

START_TIMEOUT_SECONDS = 120.0


@dataclass
class MlflowServer(LoopbackServer):
    state_dir: Path

    def stop(self, timeout: float = 20.0) -> None:
        self.child.stop(timeout)


def mlflow_executable() -> str:
    beside_python = Path(sys.executable).with_name("mlflow")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("mlflow")
    if found is None:
        raise RuntimeError("the mlflow command is not installed in this environment")
    return found


def start_mlflow_server(
    state_dir: Path, port: int | None = None, timeout: float = START_TIMEOUT_SECONDS
) -> MlflowServer:
    """Starts `mlflow server` on loopback and waits until it answers its health check."""
    state_dir = state_dir.resolve()
    (state_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = state_dir / "mlflow-server.log"
    command = [
        mlflow_executable(),
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
        "--artifacts-destination", str(state_dir / "artifacts"),
        "--serve-artifacts",
    ]  # fmt: skip
    # The server's background job runner (huey consumers, for GenAI evaluation jobs) costs several
    # processes and seconds of start-up; tracking and the registry do not use it.
    environment = {**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    child = ChildProcess.spawn("mlflow server", command, log_path, env=environment, append_log=True)
    server = MlflowServer(child, port, state_dir)
    try:
        child.wait_ready(lambda: http_ok(f"{server.url}/health"), timeout, "its /health answered")
    except BaseException:
        server.stop()
        raise
    return server
