"""Files of upstream Go modules (CRDs above all), fetched through the Go module proxy at test time.

Nothing upstream is committed: `go mod download -json MODULE@VERSION` puts the module, YAML
included, in the Go module cache and says where. The real CRDs then stand where hand-written
imitations would otherwise be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

PROMETHEUS_OPERATOR = ("github.com/prometheus-operator/prometheus-operator", "v0.85.0")
PROMETHEUS_OPERATOR_CRDS = {
    "ServiceMonitor": "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
}
DOWNLOAD_TIMEOUT_SECONDS = 600.0


class UpstreamError(RuntimeError):
    pass


def _go() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if found is None:
        raise UpstreamError("no Go toolchain: it fetches upstream modules through the module proxy")
    return found


def module_dir(module: str, version: str) -> Path:
    """The module's directory in the Go module cache, downloading it on first use."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    proc = subprocess.run(
        [_go(), "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True,
        text=True,
        timeout=DOWNLOAD_TIMEOUT_SECONDS,
        env=env,
        # Outside any module: the download must not depend on (or touch) a go.mod nearby.
        cwd="/",
        check=False,
    )
    try:
        info = json.loads(proc.stdout)
    except json.JSONDecodeError:
        info = {}
    if proc.returncode != 0 or "Dir" not in info:
        raise UpstreamError(f"go mod download {module}@{version} failed:\n{proc.stdout}{proc.stderr}")
    return Path(info["Dir"])


def module_file(module: str, version: str, relative: str) -> Path:
    path = module_dir(module, version) / relative
    if not path.is_file():
        raise UpstreamError(f"{module}@{version} has no {relative}")
    return path


def prometheus_operator_crds() -> list[Path]:
    """The real ServiceMonitor and PrometheusRule CRDs of prometheus-operator."""
    module, version = PROMETHEUS_OPERATOR
    return [module_file(module, version, relative) for relative in PROMETHEUS_OPERATOR_CRDS.values()]


KUEUE = ("sigs.k8s.io/kueue", "v0.17.0")
KUEUE_CRDS = {
    kind: f"config/components/crd/bases/kueue.x-k8s.io_{plural}.yaml"
    for kind, plural in (
        ("ResourceFlavor", "resourceflavors"),
        ("ClusterQueue", "clusterqueues"),
        ("LocalQueue", "localqueues"),
        ("Workload", "workloads"),
    )
}
KEDA = ("github.com/kedacore/keda/v2", "v2.21.0")
KEDA_CRDS = {"ScaledObject": "config/crd/bases/keda.sh_scaledobjects.yaml"}


def kueue_crds() -> list[Path]:
    """Kueue's real queue CRDs: what a `spec.queueName` TrainingRun is admitted against."""
    module, version = KUEUE
    return [module_file(module, version, relative) for relative in KUEUE_CRDS.values()]


def keda_crds() -> list[Path]:
    """KEDA's real ScaledObject CRD, which the chart renders when serving scales on load through KEDA."""
    module, version = KEDA
    return [module_file(module, version, relative) for relative in KEDA_CRDS.values()]
