"""The pure parts of `make bench-serve`: reading wrk's and ghz's output, the ratios to the peers and
the targets' verdicts, on made-up rows (no server, no load generator)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench import grpc_load, loadgen, serve_summary
from bench.serve import probabilities_of


def wrk_line(**overrides: int) -> str:
    raw = {
        "requests": 20_000,
        "duration_us": 10_000_000,
        "p50_us": 700,
        "p90_us": 1_500,
        "p99_us": 9_000,
        "mean_us": 800.5,
        "max_us": 31_000,
        "connect_errors": 0,
        "read_errors": 0,
        "write_errors": 0,
        "status_errors": 0,
        "timeouts": 0,
    }
    raw.update(overrides)
    return "Running 10s test\n  1 threads\nBENCH_JSON " + json.dumps(raw) + "\n"


def row(server: str, route: str, c: int, rps: float, **fields: Any) -> dict[str, Any]:
    base = {
        "server": server,
        "route": route,
        "concurrency": c,
        "rps": rps,
        "ok": int(rps * 10),
        "requests": int(rps * 10),
        "p50_ms": 1.0,
        "p99_ms": 5.0,
        "max_ms": 9.0,
        "errors": 0,
        "timeouts": 0,
    }
    return {**base, **fields}


def test_wrk_row_in_milliseconds_with_the_rate_of_successful_requests() -> None:
    r = loadgen.parse_wrk(wrk_line(status_errors=2_000), 16)
    assert r["concurrency"] == 16
    assert r["requests"] == 20_000 and r["ok"] == 18_000
    assert r["rps"] == 1_800.0
    assert (r["p50_ms"], r["p99_ms"], r["max_ms"]) == (0.7, 9.0, 31.0)
    assert r["errors"] == 2_000 and r["error_detail"] == "status 2000"
    assert r["notes"] == ["2000 errors (status 2000)"]


def test_wrk_timeouts_are_reported_not_dropped() -> None:
    r = loadgen.parse_wrk(wrk_line(timeouts=3, read_errors=1), 64)
    assert r["timeouts"] == 3 and r["errors"] == 1
    assert any("3 timeouts" in note for note in r["notes"])


def test_wrk_run_without_a_completed_request_has_no_latency() -> None:
    r = loadgen.parse_wrk(wrk_line(requests=0, p50_us=0, p99_us=0, max_us=0, mean_us=0, timeouts=1), 1)
    assert r["p50_ms"] is None and r["max_ms"] is None and r["rps"] == 0.0
    assert "no response within the run" in r["notes"]


def test_wrk_output_without_the_summary_line_is_an_error() -> None:
    with pytest.raises(loadgen.LoadError):
        loadgen.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n", 1)


def test_wrk_timeout_is_long_enough_to_censor_nothing() -> None:
    # wrk drops a response slower than its timeout from the histogram: far beyond any row's length.
    assert loadgen.TIMEOUT_SECONDS >= 60


def test_ghz_report_in_milliseconds_with_errors_and_deadlines_apart() -> None:
    report = {
        "count": 1_000,
        "total": 2_000_000_000,
        "average": 1_500_000,
        "slowest": 40_000_000,
        "statusCodeDistribution": {"OK": 990, "Unavailable": 6, "DeadlineExceeded": 4},
        "errorDistribution": {"rpc error: code = Unavailable": 6},
        "latencyDistribution": [
            {"percentage": 50, "latency": 1_200_000},
            {"percentage": 90, "latency": 2_000_000},
            {"percentage": 99, "latency": 8_000_000},
        ],
    }
    r = loadgen.parse_ghz(json.dumps(report), 16)
    assert r["rps"] == 495.0 and r["ok"] == 990
    assert (r["p50_ms"], r["p99_ms"], r["max_ms"]) == (1.2, 8.0, 40.0)
    assert r["errors"] == 6 and r["timeouts"] == 4
    assert "Unavailable 6" in r["error_detail"]


def test_grpc_aio_parts_merge_into_one_row() -> None:
    parts = [
        {"latencies_ns": [1_000_000] * 98, "statuses": {"OK": 98}, "seconds": 1.0},
        {"latencies_ns": [50_000_000, 2_000_000], "statuses": {"OK": 1, "UNAVAILABLE": 1}, "seconds": 1.0},
    ]
    r = grpc_load.merge(parts, 4)
    assert r["requests"] == 100 and r["ok"] == 99 and r["errors"] == 1 and r["timeouts"] == 0
    assert r["p50_ms"] == 1.0 and r["max_ms"] == 50.0 and r["rps"] == 99.0


def test_ratio_is_against_the_best_peer_on_the_matching_route() -> None:
    rows = [
        row("ours", "/predict", 16, 3000),
        row("ours", "/v2", 16, 2000),
        row("ours", "gRPC", 16, 4000),
        row("mlserver", "/v2", 16, 500),
        row("kserve", "/v2", 16, 1000),
        row("mlserver", "gRPC", 16, 800),
        row("kserve", "gRPC", 16, 1600),
    ]
    by = {(r["route"], r["concurrency"]): r for r in serve_summary.ratios(rows)}
    assert by[("/predict", 16)]["ratio"] == 3.0 and by[("/predict", 16)]["best_peer"] == "kserve /v2"
    assert by[("/v2", 16)]["ratio"] == 2.0
    assert by[("gRPC", 16)]["ratio"] == 2.5
    assert by[("/predict", 64)]["ratio"] is None and "no peer measured" in by[("/predict", 64)]["notes"]


def test_targets_met_missed_and_not_measured() -> None:
    rows = [
        row("ours", "/predict", 1, 1500, p50_ms=0.6),
        row("ours", "/predict", 16, 3000, p99_ms=14.0),
        row("ours", "/predict", 64, 3000, p99_ms=61.0),
        row("kserve", "/v2", 16, 1000),
        row("kserve", "/v2", 64, 1000),
    ]
    batch = [row("ours", "/predict/batch", 2, 50, batch_size=256, images_per_second=12_800.0)]
    verdicts = {t["key"]: t["verdict"] for t in serve_summary.evaluate(rows, batch, 1.6)}
    assert verdicts["throughput_predict_c16_vs_best_peer"] == "met"
    assert verdicts["throughput_predict_c64_vs_best_peer"] == "met"
    assert verdicts["p50_predict_c1_ms"] == "met"
    assert verdicts["p99_predict_c16_ms"] == "met"
    assert verdicts["p99_predict_c64_ms"] == "MISSED"
    assert verdicts["batch256_predict_batch_images_per_s"] == "met"
    assert verdicts["batch256_v2_images_per_s"] == "n/a"
    assert verdicts["p99_grpc_c16_ms"] == "n/a"
    assert verdicts["ready_warm_cache_s"] == "MISSED"


def test_the_prediction_log_must_cost_less_than_ten_percent() -> None:
    rows = [
        row(serve_summary.LOG_OFF, "/predict", 16, 3000, p50_ms=5.0, p99_ms=10.0),
        row(serve_summary.LOG_ON, "/predict", 16, 2800, p50_ms=5.4, p99_ms=11.5),
    ]
    targets = {t["key"]: t for t in serve_summary.evaluate(rows, [], None)}
    assert targets["prediction_log_rps_ratio_c16"]["measured"] == 0.933
    assert targets["prediction_log_rps_ratio_c16"]["verdict"] == "met"
    assert targets["prediction_log_p50_ms_ratio_c16"]["verdict"] == "met"
    assert targets["prediction_log_p99_ms_ratio_c16"]["verdict"] == "MISSED"  # 1.15 > 1.10
    assert serve_summary.evaluate([], [], None)[-2]["verdict"] == "n/a"


def test_a_row_with_errors_never_meets_a_target() -> None:
    rows = [row("ours", "/predict", 1, 1500, p50_ms=0.5, errors=3)]
    (verdict,) = [t for t in serve_summary.evaluate(rows, [], 1.0) if t["key"] == "p50_predict_c1_ms"]
    assert verdict["verdict"] == "MISSED" and "3 errors" in verdict["notes"][0]


def test_table_shows_every_row_with_its_errors() -> None:
    results = {
        "runs": [row("mlflow-keras (seed design)", "/invocations", 64, 12.0, errors=5, notes=["5 errors"])],
        "failed": [{"server": "mlserver", "reason": "did not start"}],
        "targets": serve_summary.evaluate([], [], None),
    }
    text = serve_summary.format_summary(results)
    assert "mlflow-keras (seed design)" in text and "5 errors" in text
    assert "NOT MEASURED mlserver: did not start" in text
    assert "n/a" in text


@pytest.mark.parametrize(
    ("document", "first"),
    [
        ({"digit": 7, "probabilities": [0.5] + [0.0] * 9}, 0.5),
        ({"outputs": [{"name": "probabilities", "data": [0.1, 0, 0.9, 0, 0, 0, 0, 0, 0, 0]}]}, 0.1),
        ({"predictions": [[0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8]]}, 0.2),
        ({"outputs": []}, None),
    ],
)
def test_probabilities_of_each_protocol_s_answer(document: Any, first: float | None) -> None:
    found = probabilities_of(document)
    assert (found[0] if found else None) == first


def test_agreement_reports_digits_and_the_spread() -> None:
    same = [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0]
    close = [0.1000001, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8999999, 0.0, 0.0]
    result = serve_summary.agreement({"ours /predict": same, "kserve /v2": close, "broken": None})
    assert result["digits"] == {"ours /predict": 7, "kserve /v2": 7}
    assert result["max_abs_diff"] == pytest.approx(1e-7)
    assert result["unreadable"] == ["broken"]
    text = serve_summary.format_summary({"answers": result})
    assert "every server answered digit 7" in text
