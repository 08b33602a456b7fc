"""The training Job's real entrypoint as a child process, as the container runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_training(
    mlflow_url: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m training_job train --tracking-uri=... ARGS`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "training_job", "train", f"--tracking-uri={mlflow_url}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        cwd=REPO_ROOT,
    )
