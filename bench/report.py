"""What every benchmark writes beside its table: the JSON in bench/results/, stamped with when and on
what machine it ran, the load average included, since a busy machine explains a slow figure."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)},
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    document = {
        **results,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {path}")
