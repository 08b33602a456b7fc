"""A real Alertmanager (Debian's prometheus-alertmanager) on a free loopback port, routing every alert
to webhook receivers: what carries a firing PrometheusRule alert to whoever acts on it (the operator's
`POST /webhooks/alertmanager`, or a test's own receiver).

`Alertmanager(receivers, directory)`: `receivers` are receiver entries of its configuration, as
`webhook_receiver(name, url, token)` makes them; the root route sends every alert to the first one.
Prometheus sends alerts to `address` (its `alerting` configuration, testing/prometheus.py), or a test
posts one itself with `post_alert` (API v2, as Prometheus does).

Clustering is off (`--cluster.listen-address=`): one instance, and no gossip port to collide with
another test's. Grouping waits are a second, so a notification follows an alert within seconds rather
than after the production defaults' 30 s.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from local_mode.processes import ChildProcess, free_port, http_ok

START_TIMEOUT_SECONDS = 60.0
BINARY_NAMES = ("prometheus-alertmanager", "alertmanager")


def alertmanager_binary() -> Path:
    """MNIST_ALERTMANAGER, else Debian's binary (scripts/install-system-deps.sh) or upstream's on PATH."""
    if os.environ.get("MNIST_ALERTMANAGER"):
        return Path(os.environ["MNIST_ALERTMANAGER"])
    for name in BINARY_NAMES:
        found = shutil.which(name)
        if found:
            return Path(found)
    raise RuntimeError(
        "prometheus-alertmanager is missing: apt-get install prometheus-alertmanager "
        "(scripts/install-system-deps.sh)"
    )


def webhook_receiver(
    name: str, url: str, bearer_token: str | None = None, *, send_resolved: bool = True
) -> dict[str, Any]:
    """A receiver entry with one webhook, authenticated with a bearer token when one is given."""
    webhook: dict[str, Any] = {"url": url, "send_resolved": send_resolved}
    if bearer_token:
        webhook["http_config"] = {"authorization": {"type": "Bearer", "credentials": bearer_token}}
    return {"name": name, "webhook_configs": [webhook]}


class Alertmanager:
    def __init__(
        self,
        receivers: list[dict[str, Any]],
        directory: Path,
        *,
        routes: list[dict[str, Any]] | None = None,
        binary: Path | None = None,
        group_wait: str = "1s",
        group_interval: str = "1s",
        repeat_interval: str = "1h",
    ) -> None:
        if not receivers:
            raise ValueError("an Alertmanager needs at least one receiver")
        binary = binary or alertmanager_binary()
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing (apt-get install prometheus-alertmanager)")
        directory.mkdir(parents=True, exist_ok=True)
        route: dict[str, Any] = {
            "receiver": receivers[0]["name"],
            "group_by": ["alertname"],
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        }
        if routes:
            route["routes"] = routes
        self.config_path = directory / "alertmanager.yml"
        self.config_path.write_text(yaml.safe_dump({"route": route, "receivers": receivers}, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.child = ChildProcess.spawn(
            "alertmanager",
            [str(binary), f"--config.file={self.config_path}", f"--storage.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            directory / "alertmanager.log",
            die_with_parent=True,
        )  # fmt: skip
        try:
            self.child.wait_ready(lambda: http_ok(f"{self.url}/-/ready"), START_TIMEOUT_SECONDS, "/-/ready")
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        """host:port, as Prometheus' alerting configuration names it."""
        return f"127.0.0.1:{self.port}"

    def post_alert(
        self, labels: dict[str, str], annotations: dict[str, str] | None = None, *, for_seconds: float = 300
    ) -> None:
        """Posts one firing alert (API v2), as Prometheus does on every evaluation while it fires."""
        self.child.check_running("posting an alert")
        now = datetime.now(UTC)
        alert = {
            "labels": labels,
            "annotations": annotations or {},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(seconds=for_seconds)).isoformat(),
        }
        response = httpx.post(f"{self.url}/api/v2/alerts", json=[alert], timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"Alertmanager refused the alert: {response.status_code} {response.text}")

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds now (API v2)."""
        self.child.check_running("listing alerts")
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=10)
        response.raise_for_status()
        body = response.json()
        assert isinstance(body, list)
        return body

    def log_tail(self) -> str:
        return self.child.log_tail()

    def stop(self) -> None:
        self.child.stop()
