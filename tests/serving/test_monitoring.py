"""Monitoring shipped with the chart, checked with Prometheus' own tools.

- The PrometheusRule's rules pass `promtool check rules`, and `promtool test rules` runs the unit
  tests in charts/mnist-mlops/monitoring-tests/ (every alert fires in one test, stays silent in
  another).
- Every PromQL expression of the Grafana dashboard parses (promtool) and names only metrics that
  serving/metrics.py declares in EXPORTED_METRICS.
- A real Prometheus scrapes a running serving process, with the ServiceMonitor's relabelings
  translated into its scrape config, and every dashboard query returns series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
import yaml

from drift.metrics import EXPORTED_METRICS as DRIFT_METRICS
from local_mode.processes import wait_until
from serving.metrics import EXPORTED_METRICS, ROLLOUT_METRICS
from testing.helm import CHART_DIR, NAMESPACE, RELEASE, Helm, Rendered
from testing.prometheus import Prometheus, label_name, relabel_config
from testing.serving import ServingProcess

MONITORING_TESTS = CHART_DIR / "monitoring-tests" / "alerts.test.yaml"
DASHBOARD = CHART_DIR / "dashboards" / "mnist-serving.json"
SERVING_JOB = f"{RELEASE}-serving"
# The drift job's (drift/): its alert and dashboard panel read these, scraped from its own Service.
DRIFT_JOB = f"{RELEASE}-drift"
DRIFT_ALERTS = {"MnistInputDrift"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# The training alert reads kube-state-metrics, which kube-prometheus-stack ships.
KUBE_STATE_METRICS = {"kube_job_failed", "kube_job_labels"}
PROMTOOL_TIMEOUT_SECONDS = 120.0


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (scripts/install-system-deps.sh)"
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
        cwd=cwd,
        check=False,
    )


# --- PromQL: which metric names does an expression read? --------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>[0-9]+(?:ms|s|m|h|d|w|y)(?:[0-9]+(?:ms|s|m|h|d|w|y))*)
  | (?P<number>0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
    """,
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", *_GROUPING, *_AGGREGATIONS}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match is not None, f"cannot tokenise {expr[position : position + 20]!r} in {expr!r}"
        kind = match.lastgroup or ""
        if kind not in {"space", "comment"}:
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def metric_names(expr: str) -> set[str]:
    """Metric names a (syntactically valid) PromQL expression selects.

    Identifiers are metric names unless they call a function or aggregation (followed by "("),
    are keywords, label names inside {...}, or label lists after by/without/on/ignoring/group_*.
    A {__name__="..."} matcher names a metric too.
    """
    tokens = _tokens(expr)
    names: set[str] = set()
    depth_braces = 0
    skip_parens = 0
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if skip_parens:
            skip_parens += {"(": 1, ")": -1}.get(text, 0)
        elif text == "{":
            depth_braces += 1
        elif text == "}":
            depth_braces -= 1
        elif depth_braces:
            if text == "__name__" and following == "=" and i + 2 < len(tokens):
                names.add(tokens[i + 2][1][1:-1])
        elif kind == "ident" and text in _GROUPING:
            if following == "(":
                skip_parens = 1
                i += 1
        elif kind == "ident" and following != "(" and text not in _KEYWORDS:
            names.add(text)
        i += 1
    return names


def family_allowed(name: str) -> bool:
    """Whether a sample name belongs to a family serving exports (histograms add three suffixes)."""
    if name in EXPORTED_METRICS:
        return True
    return any(
        name.endswith(suffix) and name.removesuffix(suffix) in EXPORTED_METRICS
        for suffix in HISTOGRAM_SUFFIXES
    )


def reads_drift_job(query: str) -> bool:
    """Whether a dashboard query reads the drift job's metrics (not serving's)."""
    return bool(metric_names(query) & set(DRIFT_METRICS))


def test_metric_name_extraction() -> None:
    """The extractor itself, on the shapes the dashboard and alerts use."""
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{job="x", le="0.5"}[5m]))) '
        '/ on (job) group_left (instance) b_total offset 5m > bool 0.5 or absent(c{__name__="d"}) '
        'and label_replace(e, "dst", "$1", "src", "(.*)") unless f @ 1609746000'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d", "e", "f"}
    assert metric_names("sum without (pod) (rate(x[1m:30s]))") == {"x"}


# --- alert rules ----------------------------------------------------------------------------------


def _prometheus_rule(rendered: dict[str, Rendered]) -> dict[str, Any]:
    return rendered["default"].one("PrometheusRule")


@pytest.fixture(scope="module")
def rules_dir(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered PrometheusRule as a Prometheus rule file, beside a copy of the unit tests."""
    directory = tmp_path_factory.mktemp("rules")
    groups = _prometheus_rule(rendered)["spec"]["groups"]
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(MONITORING_TESTS, directory / MONITORING_TESTS.name)
    return directory


def _alerts(rendered: dict[str, Rendered]) -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for group in _prometheus_rule(rendered)["spec"]["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_alert_rules_pass_promtool_check(rules_dir: Path, rendered: dict[str, Rendered]) -> None:
    proc = run_promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts(rendered))} rules found" in proc.stdout


def test_alert_rule_unit_tests_pass(rules_dir: Path) -> None:
    proc = run_promtool("test", "rules", MONITORING_TESTS.name, cwd=rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_unit_tested_both_ways(rendered: dict[str, Rendered]) -> None:
    alerts = set(_alerts(rendered))
    assert alerts == {
        "MnistServingHighErrorRate",
        "MnistServingHighLatencyP99",
        "MnistPredictionConfidenceLow",
        "MnistInputIntensityShift",
        "MnistInputDrift",
        "MnistServingNoPredictions",
        "MnistTrainingJobFailed",
    }
    unit_tests = yaml.safe_load(MONITORING_TESTS.read_text())["tests"]
    cases = [case for test in unit_tests for case in test.get("alert_rule_test", [])]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts <= fires, f"alerts never shown firing: {alerts - fires}"
    assert alerts <= silent, f"alerts never shown staying silent: {alerts - silent}"
    assert {case["alertname"] for case in cases} <= alerts, "a unit test names an alert the chart lacks"


def test_alerts_read_only_exported_metrics(rendered: dict[str, Rendered]) -> None:
    for name, rule in _alerts(rendered).items():
        names = metric_names(rule["expr"])
        assert names, name
        if name == "MnistTrainingJobFailed":
            assert names <= KUBE_STATE_METRICS, names
            continue
        if name in DRIFT_ALERTS:
            assert names <= set(DRIFT_METRICS), names
            assert f'job="{DRIFT_JOB}"' in rule["expr"] and f'namespace="{NAMESPACE}"' in rule["expr"]
            continue
        unknown = {n for n in names if not family_allowed(n)}
        assert not unknown, f"{name} reads metrics serving does not export: {unknown}"
        assert f'job="{SERVING_JOB}"' in rule["expr"] and f'namespace="{NAMESPACE}"' in rule["expr"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_thresholds_come_from_values(helm: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "monitoring": {
                    "prometheusRule": {"thresholds": {"p99LatencySeconds": 2.5}, "labels": {"team": "ml"}}
                }
            }
        )
    )
    proc = helm.template([values])
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PrometheusRule"]
    rule = next(
        r
        for g in docs[0]["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "MnistServingHighLatencyP99"
    )
    assert rule["expr"].rstrip().endswith("> 2.5")
    assert docs[0]["metadata"]["labels"]["team"] == "ml"


# --- the dashboard --------------------------------------------------------------------------------

_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "$namespace": NAMESPACE,
    "$job": SERVING_JOB,
}


def grafana_to_promql(expr: str) -> str:
    for variable, value in sorted(_GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value).replace("${" + variable[1:] + "}", value)
    assert "$" not in re.sub(r'"[^"]*"', "", expr), f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every panel target's expr and every label_values() variable's selector, as plain PromQL."""
    queries: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                queries.append(grafana_to_promql(target["expr"]))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*([a-zA-Z_]+)\)", query)
        assert match, f"unsupported variable query {query!r}"
        queries.append(grafana_to_promql(match.group(1)))
    return queries


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_dashboard_ships_in_a_sidecar_configmap(
    rendered: dict[str, Rendered], dashboard: dict[str, Any]
) -> None:
    configmap = rendered["default"].one("ConfigMap", f"{RELEASE}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["mnist-serving.json"]) == dashboard
    assert dashboard["uid"] == "mnist-serving"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert not rendered["monitoring-off"].of_kind("PrometheusRule")


def test_dashboard_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    proc = run_promtool("check", "rules", str(tmp_path / "dashboard.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_dashboard_reads_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for query in dashboard_queries(dashboard):
        names = metric_names(query)
        assert names, f"no metric in {query!r}"
        used |= names
    unknown = {name for name in used if not family_allowed(name) and name not in DRIFT_METRICS}
    assert not unknown, f"the dashboard reads metrics serving does not export: {sorted(unknown)}"
    missing_drift = set(DRIFT_METRICS) - used
    assert not missing_drift, f"drift metrics without a panel: {missing_drift}"
    families = {
        f for f in EXPORTED_METRICS if f in used or any(f + suffix in used for suffix in HISTOGRAM_SUFFIXES)
    }
    # Every exported family has a panel: a new metric without one is a gap worth noticing.
    assert families == set(EXPORTED_METRICS), f"exported but never shown: {set(EXPORTED_METRICS) - families}"


# --- a real Prometheus scraping a running serving process --------------------------------------


def scrape_config(rendered: Rendered, target: str, model_version: str) -> dict[str, Any]:
    """The scrape job prometheus-operator would generate from the chart's ServiceMonitor.

    Kubernetes service discovery cannot run here (no kubelet, and Endpoints may not point at
    loopback), so a static target carries the __meta_kubernetes_* labels that discovery would
    attach to the serving pod, taken from the rendered Service and pod template. The operator's own
    relabelings (port filter, namespace, pod, job = Service name) come first, then the chart's.
    """
    monitor = rendered.one("ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    service = rendered.one("Service", SERVING_JOB)
    template = rendered.one("Deployment", SERVING_JOB)["spec"]["template"]
    port_name = next(p["name"] for p in service["spec"]["ports"])
    discovered = {
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_service_name": service["metadata"]["name"],
        "__meta_kubernetes_endpoint_port_name": port_name,
        "__meta_kubernetes_pod_name": f"{SERVING_JOB}-5d8f7c9b4-x2x7q",
        "__meta_kubernetes_pod_container_name": template["spec"]["containers"][0]["name"],
        # The operator writes this pod-template annotation when it rolls a new version out.
        "__meta_kubernetes_pod_annotation_mnist_mlops_io_model_version": model_version,
    }
    for label, value in template["metadata"]["labels"].items():
        discovered[f"__meta_kubernetes_pod_label_{label_name(label)}"] = value
    operator_relabelings: list[dict[str, Any]] = [
        {
            "source_labels": ["__meta_kubernetes_endpoint_port_name"],
            "regex": endpoint["port"],
            "action": "keep",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    return {
        "job_name": f"serviceMonitor/{NAMESPACE}/{monitor['metadata']['name']}/0",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "metrics_path": endpoint["path"],
        "static_configs": [{"targets": [target], "labels": discovered}],
        "relabel_configs": operator_relabelings
        + [relabel_config(r) for r in endpoint.get("relabelings", [])],
        "metric_relabel_configs": [relabel_config(r) for r in endpoint.get("metricRelabelings", [])],
    }


@pytest.fixture(scope="module")
def prometheus(
    rendered: dict[str, Rendered],
    serving_server: ServingProcess,
    served_version: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    tmp_path = tmp_path_factory.mktemp("prometheus")
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: apt-get install prometheus (scripts/install-system-deps.sh)"
    target = serving_server.url.removeprefix("http://")
    jobs = [scrape_config(rendered["default"], target, served_version)]
    server = Prometheus(jobs, tmp_path, Path(binary), scrape_interval="1s")
    try:
        check = run_promtool("check", "config", str(server.config_path))
        assert check.returncode == 0, check.stdout + check.stderr
        yield server
    finally:
        server.stop()


def _traffic(url: str, images: npt.NDArray[np.uint8]) -> None:
    """Requests of every kind the dashboard shows: single and batch predictions, a client error,
    and a body over the size limit (a rejected request)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for image in images[:12]:
            assert client.post("/predict", json={"pixels": image.tolist()}).status_code == 200
        batch = {"instances": [{"pixels": image.tolist()} for image in images[12:20]]}
        assert client.post("/predict/batch", json=batch).status_code == 200
        assert client.post("/predict", json={"pixels": [[0] * 27] * 28}).status_code == 422
        too_large = b"{" + b" " * (9 * 1024 * 1024) + b"}"
        response = client.post("/predict", content=too_large, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text


def test_prometheus_scrapes_serving_with_the_charts_relabeling(
    prometheus: Prometheus,
    serving_server: ServingProcess,
    served_version: str,
    serving_mnist_test: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
    dashboard: dict[str, Any],
) -> None:
    raw = httpx.get(serving_server.url + "/metrics", timeout=10).text
    assert "python_gc_objects_collected_total" in raw, "the serving process should export GC series"
    _traffic(serving_server.url, serving_mnist_test[0])
    # A canary's or shadow's own series exist only during a rollout (tests/serving/test_routing.py).
    queries = [q for q in dashboard_queries(dashboard) if not metric_names(q) <= set(ROLLOUT_METRICS)]
    # The drift panels read the drift job, which tests/drift/ scrapes; this Prometheus has serving only.
    queries = [query for query in queries if not reads_drift_job(query)]

    def every_query_has_series() -> bool:
        return all(prometheus.query(query) for query in queries)

    try:
        wait_until(every_query_has_series, 60, "every dashboard query to return series")
    except TimeoutError:
        empty = [query for query in queries if not prometheus.query(query)]
        targets = httpx.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()
        raise AssertionError(f"dashboard queries without data: {empty}\ntargets: {targets}") from None

    up = prometheus.query(f'up{{job="{SERVING_JOB}", namespace="{NAMESPACE}"}}')
    assert [sample["value"][1] for sample in up] == ["1"]
    # Every family serving declares reaches Prometheus, with the labels the relabelings add.
    names = prometheus.query(f'count by (__name__) ({{job="{SERVING_JOB}", __name__=~"mnist_.*"}})')
    scraped = {sample["metric"]["__name__"] for sample in names}
    missing = {
        f
        for f in EXPORTED_METRICS
        if f not in scraped and not any(f + s in scraped for s in HISTOGRAM_SUFFIXES)
    } - set(ROLLOUT_METRICS)
    assert not missing, f"declared in EXPORTED_METRICS but not scraped: {missing}"
    assert {name for name in scraped if not family_allowed(name)} == set(), "scraped but not declared"
    ready = prometheus.query("mnist_model_ready")
    assert ready and all(
        sample["metric"].get("registered_model") == "mnist-cnn"
        and sample["metric"].get("model_version") == served_version
        and sample["metric"].get("pod", "").startswith(SERVING_JOB)
        for sample in ready
    ), ready
    # metricRelabelings dropped the GC series the process does export.
    assert not prometheus.query('{__name__=~"python_gc_.*"}')
    assert prometheus.query('{__name__=~"process_.*"}'), "only the GC series are dropped"
