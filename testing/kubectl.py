"""The one kubectl helper of the harness: the kubectl built with the control plane, so the client and
the API server are the same Kubernetes release (the machine's own kubectl may be years older)."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testing.controlplane import ControlPlane

COMMAND_TIMEOUT_SECONDS = 60.0

# A manifest on stdin: text as is, one object, or several objects sent as a v1 List.
Manifest = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]


class KubectlError(RuntimeError):
    """kubectl exited non-zero where the caller needed it to succeed; carries its stderr."""


def _stdin(manifest: Manifest | None) -> str | None:
    if manifest is None or isinstance(manifest, str):
        return manifest
    if isinstance(manifest, Mapping):
        return json.dumps(manifest)
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifest)})


def kubectl(
    plane: ControlPlane,
    *args: str,
    manifest: Manifest | None = None,
    kubeconfig: Path | None = None,
    timeout: float = COMMAND_TIMEOUT_SECONDS,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Runs kubectl against `plane` (as admin, or as whoever `kubeconfig` names).

    With `check`, a non-zero exit raises KubectlError; otherwise the caller reads the exit code, which is
    how tests assert that the API server refused something."""
    completed = subprocess.run(
        [str(plane.bin_dir / "kubectl"), *args],
        input=_stdin(manifest),
        env=plane.env(kubeconfig=kubeconfig),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and completed.returncode != 0:
        raise KubectlError(f"kubectl {' '.join(args)} failed ({completed.returncode}):\n{completed.stderr}")
    return completed


def kubectl_watch(plane: ControlPlane, *args: str) -> subprocess.Popen[str]:
    """A long-running kubectl (`get ... -w`) whose output the caller reads when it terminates it: what a
    person watching the resource would have seen."""
    return subprocess.Popen(
        [str(plane.bin_dir / "kubectl"), *args],
        env=plane.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kubectl_ok(plane: ControlPlane, *args: str, **options: Any) -> str:
    """kubectl that must succeed; returns its stdout."""
    return kubectl(plane, *args, check=True, **options).stdout


def get_json(plane: ControlPlane, *args: str, kubeconfig: Path | None = None) -> Any:
    return json.loads(kubectl_ok(plane, "get", *args, "-o", "json", kubeconfig=kubeconfig))


def unique_name(prefix: str) -> str:
    """A name no earlier test used, so tests sharing one API server never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
