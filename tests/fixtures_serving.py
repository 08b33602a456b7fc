"""Fixtures for the prediction service: the real `python -m serving` process (uvicorn over HTTP on
loopback) serving the registered model from the real MLflow server."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from training_job.mlflow_server import MlflowServer, free_port
from training_job.result import TrainingResult

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAMPION = "champion"
# An origin the main test server allows, to check CORS both ways.
ALLOWED_ORIGIN = "http://digits.example.test"


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    tracking_uri: str
    keras_model_uri: str | None

    @property
    def pinned_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class ServingProcess:
    """`python -m serving` as a child process; the environment is all its configuration."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log_path = workdir / f"serving-{port}.log"
        environment = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "SERVING_HOST": "127.0.0.1",
            "SERVING_PORT": str(port),
            "SERVING_MODEL_URI": model_uri,
            "SERVING_MODEL_CACHE_DIR": str(cache_dir),
            "SERVING_LOG_FORMAT": "json",
            **(env or {}),
        }
        environment.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "serving"],
                cwd=REPO_ROOT,
                env=environment,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = cls(process, port, log_path)
        try:
            server.wait_live(timeout)
            if wait_ready:
                server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serving exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not 200 within {timeout:.0f}s:\n{self.log_tail()}")

    def wait_live(self, timeout: float = 60.0) -> None:
        self._wait("/health/live", timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self._wait("/health/ready", timeout)

    def terminate(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, object]]:
        records = []
        for line in self.log_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"unparsed": line})
        return records


# --- input builders shared by the serving tests -----------------------------------------------------


def png_bytes(array: npt.NDArray[Any], mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A 1-bit grayscale PNG written by hand, so headers can claim sizes PIL would refuse to create."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    if rows is None:
        compressor = zlib.compressobj(9)
        row = b"\x00" * (1 + (width + 7) // 8)
        data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    else:
        data = zlib.compress(rows)
    return b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def on_paper(
    digit: npt.NDArray[np.uint8], scale: int = 10, canvas: int = 400, offset: tuple[int, int] = (60, 20)
) -> npt.NDArray[np.uint8]:
    """An MNIST digit as a person would draw it: big, black on white, off-centre."""
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    page = np.zeros((canvas, canvas), np.uint8)
    page[offset[0] : offset[0] + big.shape[0], offset[1] : offset[1] + big.shape[1]] = big
    return (255 - page).astype(np.uint8)


@pytest.fixture(scope="session")
def served_model(registered_model: TrainingResult, mlflow_server: MlflowServer) -> ServedModel:
    """The registered model our servers serve: the lead's briefly-trained CNN, ONNX flavor."""
    return ServedModel(
        name=registered_model.registered_model,
        version=registered_model.model_version,
        tracking_uri=mlflow_server.url,
        keras_model_uri=registered_model.keras_model_uri,
    )


@pytest.fixture(scope="session")
def serving_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared artifact cache: the first server downloads, later ones start warm."""
    return tmp_path_factory.mktemp("serving-cache")


@pytest.fixture(scope="session")
def serving_server(
    served_model: ServedModel, serving_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingProcess]:
    """The service with its production defaults, resolving the `champion` alias at start-up."""
    server = ServingProcess.start(
        tmp_path_factory.mktemp("serving"),
        tracking_uri=served_model.tracking_uri,
        model_uri=f"models:/{served_model.name}@{CHAMPION}",
        cache_dir=serving_cache_dir,
        env={"SERVING_CORS_ORIGINS": ALLOWED_ORIGIN},
    )
    yield server
    code = server.stop()
    log = server.log_text()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status names the signal.
    assert code in (0, -signal.SIGTERM), f"serving exited with {code}:\n{server.log_tail()}"
    assert "Finished server process" in log
    assert "unhandled error" not in log, f"the server hit an unexpected exception:\n{server.log_tail(200)}"


@pytest.fixture(scope="session")
def served_version(serving_server: ServingProcess) -> str:
    """The version the champion alias resolved to when the server started."""
    version = httpx.get(serving_server.url + "/health", timeout=5).json()["model"]["version"]
    assert isinstance(version, str)
    return version


@pytest.fixture(scope="session")
def serving_mnist_test(mnist_path: Path) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    with np.load(mnist_path) as data:
        return data["x_test"], data["y_test"]
