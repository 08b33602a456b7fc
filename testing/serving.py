"""The prediction service as the tests and benchmarks run it: `python -m serving` as a child process
(uvicorn over real HTTP on loopback), configured only through its environment, as in a pod."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from local_mode.processes import ChildProcess, LoopbackServer, free_ports, http_ok

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    tracking_uri: str
    keras_model_uri: str | None

    @property
    def pinned_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class ServingProcess(LoopbackServer):
    """`python -m serving` as a child process; the environment is all its configuration."""

    grpc_port: int = 0  # SERVING_GRPC_PORT; 0 when gRPC is disabled

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        tracking_uri: str,
        model_uri: str,
        cache_dir: Path,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        timeout: float = 90.0,
    ) -> ServingProcess:
        # Never the default gRPC port: servers of concurrent tests would fight over it.
        port, grpc_port = free_ports(2)
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "SERVING_HOST": "127.0.0.1",
            "SERVING_PORT": str(port),
            "SERVING_GRPC_PORT": str(grpc_port),
            "SERVING_MODEL_URI": model_uri,
            "SERVING_MODEL_CACHE_DIR": str(cache_dir),
            "SERVING_LOG_FORMAT": "json",
            **(env or {}),
        }
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        child = ChildProcess.spawn(
            "serving",
            [sys.executable, "-m", "serving"],
            workdir / f"serving-{port}.log",
            env=environment,
            cwd=REPO_ROOT,
        )
        server = cls(child, port)
        server.grpc_port = int(environment["SERVING_GRPC_PORT"])
        try:
            server.wait_live(timeout)
            if wait_ready:
                server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_live(self, timeout: float = 60.0) -> None:
        self.child.wait_ready(lambda: http_ok(self.url + "/health/live"), timeout, "/health/live", 0.1)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.child.wait_ready(lambda: http_ok(self.url + "/health/ready"), timeout, "/health/ready", 0.1)

    def terminate(self) -> None:
        """SIGTERM only, for tests of the graceful shutdown; `stop` also waits and escalates."""
        self.child.signal_group(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        self.child.stop(timeout)
        return self.child.popen.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, object]]:
        records: list[dict[str, object]] = []
        for line in self.log_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"unparsed": line})
        return records
