"""The machine-readable outcome of one training run.

A Kubernetes Job hands it back through its termination message, which the kubelet truncates at 4 KiB,
so `to_json` refuses to produce more than that rather than let the operator read a cut-off document.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

TERMINATION_MESSAGE_LIMIT = 4096
DEFAULT_TERMINATION_LOG = Path("/dev/termination-log")
# The Job mirrors its container's terminationMessagePath here, so a process that is not in a pod (the
# tests' fake kubelet) gets its own file instead of writing into the host's /dev.
TERMINATION_LOG_ENV = "TERMINATION_MESSAGE_PATH"


class TrainingResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    registered_model: str
    model_version: str
    architecture: str
    metrics: dict[str, float] = Field(default_factory=dict)
    onnx_model_uri: str
    keras_model_uri: str
    # Set only when the run itself applied the promotion gate (the local runner); in a cluster the
    # operator decides and records the outcome on the TrainingRun.
    promoted: bool | None = None
    promotion_reason: str | None = None

    def to_json(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)
        if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            raise ValueError(
                f"training result is {len(text.encode())} bytes, over the 4 KiB termination limit"
            )
        return text

    @classmethod
    def from_json(cls, text: str) -> TrainingResult:
        return cls.model_validate_json(text)


def termination_log_path() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG)


def write_termination_message(result: TrainingResult, path: Path | None = None) -> bool:
    """Writes the result where the kubelet reads it; outside a pod the file's directory may not exist."""
    try:
        (path if path is not None else termination_log_path()).write_text(result.to_json())
    except OSError:
        return False
    return True
