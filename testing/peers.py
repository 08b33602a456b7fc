"""Isolated virtualenvs for software we compare with or must interoperate with, but do not ship:
KServe's client and model server, MLServer. Each has its own pins in `testing/peers/<name>.txt` and
a virtualenv keyed by that file's content under the shared cache, so a fresh clone reuses it and a
changed pin gets a new one. Kept out of the development virtualenv because their own pins (FastAPI,
uvicorn, protobuf, ...) conflict with ours, and out of `requirements/` because nothing we ship uses
them (the audit covers what ships)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent / "peers"
PYTHON = os.environ.get("PYTHON", "python3.11")
INSTALL_TIMEOUT_SECONDS = 1800.0


class PeerInstallError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops"))


def available() -> list[str]:
    return sorted(path.stem for path in PEERS_DIR.glob("*.txt"))


def requirements_file(name: str) -> Path:
    path = PEERS_DIR / f"{name}.txt"
    if not path.is_file():
        raise PeerInstallError(f"no peer named {name!r}; known: {', '.join(available())}")
    return path


def venv_dir(name: str) -> Path:
    digest = hashlib.sha256(requirements_file(name).read_bytes()).hexdigest()[:12]
    return cache_dir() / f"peer-{name}-{digest}"


def peer_python(name: str) -> Path:
    """The Python of peer `name`'s virtualenv, created on first use (flock: tests and benchmarks may
    ask at once; `.ready` is written last so an interrupted install is redone, not half-used)."""
    venv = venv_dir(name)
    python = venv / "bin" / "python"
    if (venv / ".ready").exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".ready").exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log = venv.parent / f"{venv.name}.install.log"
        with log.open("w") as out:
            for command in (
                [PYTHON, "-m", "venv", str(venv)],
                [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                [str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements_file(name))],
            ):
                completed = subprocess.run(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=INSTALL_TIMEOUT_SECONDS,
                    check=False,
                )
                if completed.returncode != 0:
                    raise PeerInstallError(
                        f"installing peer {name!r} failed at {' '.join(command)}: {log.read_text()[-2000:]}"
                    )
        (venv / ".ready").touch()
    return python
