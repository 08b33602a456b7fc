"""Starts a real MLflow tracking server as a child process: used by `make demo` and by the tests.

SQLite holds the tracking and registry data, and artifacts are served by the tracking server itself
(`--serve-artifacts`), so clients need nothing but the HTTP address, exactly as in the cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

START_TIMEOUT_SECONDS = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    state_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            # The server forks workers; signalling the process group stops them all.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


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
    log_file = log_path.open("ab")
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
    process = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=environment
    )
    server = MlflowServer(state_dir, port, process, log_path, log_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"mlflow server did not become healthy within {timeout:.0f}s:\n{server.log_tail()}")
