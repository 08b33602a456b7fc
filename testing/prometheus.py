"""A real Prometheus that finds its targets through the Kubernetes API.

prometheus-operator does not build here (its go.mod carries replace directives, so `go install`
refuses it), so :func:`scrape_job` writes the scrape job that prometheus-operator generates from a
ServiceMonitor, rule for rule: Kubernetes service discovery with role `endpoints`, the Service label
selector and port kept, the namespace/service/pod/container/job/endpoint target labels, then the
ServiceMonitor's own relabelings and metric relabelings. Discovery, scraping and querying are the
real thing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import yaml

from local_mode.processes import ChildProcess, free_port, http_ok

START_TIMEOUT_SECONDS = 60.0


def label_name(label: str) -> str:
    """Kubernetes service discovery's spelling of a label name inside __meta_ labels."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def relabel_config(rule: dict[str, Any]) -> dict[str, Any]:
    """A ServiceMonitor RelabelConfig (camelCase) as Prometheus' relabel_config (snake_case)."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    converted = {keys.get(key, key): value for key, value in rule.items()}
    converted["action"] = str(converted.get("action", "replace")).lower()
    return converted


def scrape_job(
    monitor: dict[str, Any], kubeconfig: Path, index: int = 0, interval: str | None = None
) -> dict[str, Any]:
    """The scrape job for endpoint `index` of ServiceMonitor `monitor`, as prometheus-operator
    generates it. `interval` overrides the monitor's (tests do not wait 15 s per sample)."""
    namespace = monitor["metadata"]["namespace"]
    endpoint = monitor["spec"]["endpoints"][index]
    port = endpoint["port"]
    match_labels: dict[str, str] = monitor["spec"]["selector"].get("matchLabels", {})
    relabelings: list[dict[str, Any]] = [
        {"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"},
        *(
            {
                "source_labels": [
                    f"__meta_kubernetes_service_label_{label_name(key)}",
                    f"__meta_kubernetes_service_labelpresent_{label_name(key)}",
                ],
                "regex": f"({value});true",
                "action": "keep",
            }
            for key, value in sorted(match_labels.items())
        ),
        {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": port, "action": "keep"},
        {
            "source_labels": [
                "__meta_kubernetes_endpoint_address_target_kind",
                "__meta_kubernetes_endpoint_address_target_name",
            ],
            "separator": ";",
            "regex": "Pod;(.*)",
            "replacement": "${1}",
            "target_label": "pod",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        {"target_label": "endpoint", "replacement": port},
        *(relabel_config(rule) for rule in endpoint.get("relabelings", [])),
    ]
    return {
        "job_name": f"serviceMonitor/{namespace}/{monitor['metadata']['name']}/{index}",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "scrape_interval": interval or endpoint.get("interval", "30s"),
        "scrape_timeout": "1s" if interval else endpoint.get("scrapeTimeout", "10s"),
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http"),
        "kubernetes_sd_configs": [
            {"role": "endpoints", "kubeconfig_file": str(kubeconfig), "namespaces": {"names": [namespace]}}
        ],
        "relabel_configs": relabelings,
        "metric_relabel_configs": [relabel_config(rule) for rule in endpoint.get("metricRelabelings", [])],
    }


class Prometheus:
    """A prometheus on a free loopback port with the given scrape jobs. Kubernetes discovery needs
    upstream's build (scripts/build-k8s-tools.sh): Debian's leaves that discoverer out, but it is
    enough for static targets."""

    def __init__(
        self,
        jobs: list[dict[str, Any]],
        directory: Path,
        binary: Path,
        scrape_interval: str = "2s",
        *,
        rule_files: list[Path] | None = None,
        alertmanagers: list[str] | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        """`rule_files`: alerting/recording rule files it evaluates (every scrape interval);
        `alertmanagers`: host:port of Alertmanagers it sends firing alerts to."""
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing (scripts/build-k8s-tools.sh builds it)")
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": jobs,
        }
        if rule_files:
            config["rule_files"] = [str(path) for path in rule_files]
        if alertmanagers:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]}
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        # `listen_host`: loopback, or the real node's bridge address when pods (the operator's canary
        # analysis) must query it.
        self.url = f"http://{listen_host}:{port}"
        self.child = ChildProcess.spawn(
            "prometheus",
            [str(binary), f"--config.file={self.config_path}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address={listen_host}:{port}", "--storage.tsdb.retention.time=1h"],
            directory / "prometheus.log",
            die_with_parent=True,
        )  # fmt: skip
        try:
            self.child.wait_ready(lambda: http_ok(f"{self.url}/-/ready"), START_TIMEOUT_SECONDS, "/-/ready")
        except BaseException:
            self.stop()
            raise

    def query(self, expr: str) -> list[dict[str, Any]]:
        self.child.check_running(f"answering {expr}")
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise RuntimeError(f"{expr}: {body}")
        result = body["data"]["result"]
        assert isinstance(result, list)
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts of its rules now, pending or firing (API /api/v1/alerts)."""
        self.child.check_running("listing alerts")
        alerts = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        assert isinstance(alerts, list)
        return alerts

    def targets(self) -> list[dict[str, Any]]:
        active = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        assert isinstance(active, list)
        return active

    def log_tail(self) -> str:
        return self.child.log_tail()

    def stop(self) -> None:
        self.child.stop()
