"""The pure half of `make bench-serve`: ratios against the peers, the issue's targets and the table,
all computed from the rows of one run (no I/O, so tests/bench checks them on made-up rows).

A row is a dict from bench.loadgen (`rps`, `p50_ms`, `p99_ms`, `max_ms`, `errors`, `timeouts`, ...)
with `server`, `route` and `concurrency`; batch rows add `batch_size` and `images_per_second`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

OURS = "ours"
PEERS = ("mlserver", "kserve")
# Our routes and the peer route each is compared with: the peers have no /predict, so their one
# single-image REST route (OIP v2) stands in for it.
OUR_ROUTES = ("/predict", "/v2", "gRPC")
PEER_ROUTE = {"/predict": "/v2", "/v2": "/v2", "gRPC": "gRPC"}
RATIO_CONCURRENCY = (16, 64)
BATCH_SIZE = 256

# The targets.
THROUGHPUT_RATIO = 2.0
P50_C1_PREDICT_MS = 0.7
P99_C16_MS = 15.0
P99_C64_MS = 60.0
BATCH_IMAGES_PER_SECOND = 10_000.0
READY_WARM_SECONDS = 1.5
# The prediction log's cost: /predict at c=16 on a server writing every prediction to SQLite against
# the same server without the log, measured back to back; on must stay within 10% of off.
LOG_OFF = "ours (log off)"
LOG_ON = "ours (log on, SQLite)"
LOG_CONCURRENCY = 16
LOG_MAX_OVERHEAD = 0.10


def find(rows: Iterable[dict[str, Any]], server: str, route: str, concurrency: int) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in rows
            if r["server"] == server and r["route"] == route and r["concurrency"] == concurrency
        ),
        None,
    )


def clean(row: dict[str, Any] | None) -> bool:
    return row is not None and row["ok"] > 0 and not row["errors"] and not row["timeouts"]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours over the best of MLServer and KServe, per route and concurrency. A peer row with errors
    still competes on the rate of its successful requests, and the entry says so."""
    out = []
    for route in OUR_ROUTES:
        for c in RATIO_CONCURRENCY:
            ours = find(rows, OURS, route, c)
            peers = [
                r for p in PEERS if (r := find(rows, p, PEER_ROUTE[route], c)) is not None and r["ok"] > 0
            ]
            best = max(peers, key=lambda r: r["rps"], default=None)
            entry: dict[str, Any] = {
                "route": route,
                "concurrency": c,
                "ours_rps": ours["rps"] if ours else None,
                "best_peer": f"{best['server']} {best['route']}" if best else None,
                "best_peer_rps": best["rps"] if best else None,
                "ratio": None,
                "notes": [],
            }
            if ours and best and best["rps"] > 0:
                entry["ratio"] = round(ours["rps"] / best["rps"], 2)
            if best is None:
                entry["notes"].append("no peer measured")
            elif not clean(best):
                entry["notes"].append(f"{best['server']} had errors or timeouts")
            if ours is None:
                entry["notes"].append("ours not measured")
            elif not clean(ours):
                entry["notes"].append("ours had errors or timeouts")
            out.append(entry)
    return out


def target(
    key: str,
    description: str,
    goal: float,
    *,
    higher_is_better: bool,
    measured: float | None,
    rows: Iterable[dict[str, Any] | None] = (),
    why_missing: str = "not measured",
) -> dict[str, Any]:
    """met / MISSED / n/a. A figure from a row with errors or timeouts never meets a target."""
    notes = []
    for row in rows:
        if row is not None and not clean(row):
            notes.append(
                f"{row['server']} {row['route']} c={row['concurrency']}: "
                f"{row['errors']} errors, {row['timeouts']} timeouts"
            )
    if measured is None:
        verdict = "n/a"
        notes.append(why_missing)
    elif notes:
        verdict = "MISSED"
    else:
        verdict = "met" if (measured >= goal if higher_is_better else measured <= goal) else "MISSED"
    return {
        "key": key,
        "target": description,
        "goal": goal,
        "comparison": ">=" if higher_is_better else "<=",
        "measured": measured,
        "verdict": verdict,
        "notes": notes,
    }


def evaluate(
    rows: list[dict[str, Any]], batch: list[dict[str, Any]], ready_warm_median: float | None
) -> list[dict[str, Any]]:
    out = []
    by_ratio = {(r["route"], r["concurrency"]): r for r in ratios(rows)}
    for route in OUR_ROUTES:
        for c in RATIO_CONCURRENCY:
            r = by_ratio[(route, c)]
            out.append(
                target(
                    f"throughput_{_slug(route)}_c{c}_vs_best_peer",
                    f"ours {route} req/s at c={c} over the best of MLServer/KServe",
                    THROUGHPUT_RATIO,
                    higher_is_better=True,
                    measured=r["ratio"],
                    rows=[find(rows, OURS, route, c)],
                    why_missing="; ".join(r["notes"]) or "not measured",
                )
            )
    c1 = find(rows, OURS, "/predict", 1)
    out.append(
        target(
            "p50_predict_c1_ms",
            "ours /predict p50 at c=1 (ms)",
            P50_C1_PREDICT_MS,
            higher_is_better=False,
            measured=c1["p50_ms"] if c1 else None,
            rows=[c1],
        )
    )
    for c, goal in ((16, P99_C16_MS), (64, P99_C64_MS)):
        for route in OUR_ROUTES:
            row = find(rows, OURS, route, c)
            out.append(
                target(
                    f"p99_{_slug(route)}_c{c}_ms",
                    f"ours {route} p99 at c={c} (ms)",
                    goal,
                    higher_is_better=False,
                    measured=row["p99_ms"] if row else None,
                    rows=[row],
                )
            )
    for route in ("/predict/batch", "/v2", "/v2 binary"):
        row = next((r for r in batch if r["route"] == route and r["batch_size"] == BATCH_SIZE), None)
        out.append(
            target(
                f"batch{BATCH_SIZE}_{_slug(route)}_images_per_s",
                f"ours {route} with {BATCH_SIZE} images per request, one worker (images/s)",
                BATCH_IMAGES_PER_SECOND,
                higher_is_better=True,
                measured=row["images_per_second"] if row else None,
                rows=[row],
            )
        )
    off = find(rows, LOG_OFF, "/predict", LOG_CONCURRENCY)
    on = find(rows, LOG_ON, "/predict", LOG_CONCURRENCY)
    for metric, label, higher in (("rps", "req/s", True), ("p50_ms", "p50", False), ("p99_ms", "p99", False)):
        ratio = round(on[metric] / off[metric], 3) if on and off and off[metric] else None
        out.append(
            target(
                f"prediction_log_{metric}_ratio_c{LOG_CONCURRENCY}",
                f"/predict {label} at c={LOG_CONCURRENCY}, prediction log on (SQLite) / off: within "
                f"{LOG_MAX_OVERHEAD:.0%}",
                1 - LOG_MAX_OVERHEAD if higher else 1 + LOG_MAX_OVERHEAD,
                higher_is_better=higher,
                measured=ratio,
                rows=[off, on],
            )
        )
    out.append(
        target(
            "ready_warm_cache_s",
            "ours: spawn to /health/ready 200 with the artifact in the cache (s, median)",
            READY_WARM_SECONDS,
            higher_is_better=False,
            measured=ready_warm_median,
        )
    )
    return out


def _slug(route: str) -> str:
    return route.strip("/").replace("/", "_").replace(" ", "_").lower()


def agreement(answers: dict[str, list[float] | None]) -> dict[str, Any]:
    """Each server's digit for the one request, and how far apart their probabilities are: the same
    model in every server should agree to float rounding, whatever its accuracy."""
    given = {name: p for name, p in answers.items() if p is not None}
    digits = {name: max(range(len(p)), key=p.__getitem__) for name, p in given.items()}
    spread = None
    if given:
        columns = list(zip(*given.values(), strict=True))
        spread = max(max(column) - min(column) for column in columns)
    return {
        "digits": digits,
        "max_abs_diff": spread,
        "unreadable": sorted(name for name, p in answers.items() if p is None),
    }


def _num(value: float | None, width: int, digits: int = 2) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"


def format_rows(rows: list[dict[str, Any]], batch: bool = False) -> list[str]:
    rate = "images/s" if batch else "req/s"
    lines = [
        f"{'server':28s} {'route':15s} {'c':>3s} {rate:>10s} {'p50 ms':>9s} {'p99 ms':>9s} {'max ms':>9s}"
        f" {'err':>5s} {'t/o':>4s}  notes"
    ]
    for r in rows:
        label = r["route"] + (f" x{r['batch_size']}" if batch else "")
        value = r["images_per_second"] if batch else r["rps"]
        lines.append(
            f"{r['server']:28s} {label:15s} {r['concurrency']:>3d} {_num(value, 10, 1)}"
            f" {_num(r['p50_ms'], 9, 3)} {_num(r['p99_ms'], 9, 3)} {_num(r['max_ms'], 9, 1)}"
            f" {r['errors']:>5d} {r['timeouts']:>4d}  {'; '.join(r.get('notes') or [])}"
        )
    return lines


def format_summary(results: dict[str, Any]) -> str:
    lines = []
    model = results.get("model") or {}
    if model:
        lines.append(
            f"model {model.get('name')} v{model.get('version')} ({model.get('architecture')}), "
            f"ONNX sha256 {str(model.get('onnx_sha256'))[:12]}"
        )
    lines += ["", "single image, one worker per server, each server alone:"]
    lines += format_rows(results.get("runs", []))
    if results.get("batch"):
        lines += ["", "batches, ours, one worker:"]
        lines += format_rows(results["batch"], batch=True)
    for failure in results.get("failed", []):
        reason = failure["reason"].strip().splitlines()
        lines.append(f"NOT MEASURED {failure['server']}: {reason[0] if reason else ''}")
        lines += [f"    {line}" for line in reason[1:][-4:]]
    answers = results.get("answers") or {}
    if answers.get("digits"):
        spread = answers["max_abs_diff"]
        distinct = set(answers["digits"].values())
        lines.append(
            (
                f"every server answered digit {distinct.pop()}"
                if len(distinct) == 1
                else "SERVERS DISAGREE on the digit: "
                + ", ".join(f"{k} {v}" for k, v in answers["digits"].items())
            )
            + (f"; probabilities within {spread:.1e} of each other" if spread is not None else "")
        )
    ready = results.get("ready_seconds") or {}
    if ready:
        lines += ["", "ready (spawn to ready, s): " + ", ".join(f"{k} {v}" for k, v in ready.items())]
    if results.get("ratios"):
        lines += ["", "ours / best peer (MLServer, KServe):"]
        for r in results["ratios"]:
            lines.append(
                f"  {r['route']:9s} c={r['concurrency']:<3d} {_num(r['ours_rps'], 9, 1)} vs "
                f"{_num(r['best_peer_rps'], 9, 1)} ({r['best_peer'] or '-'}) = "
                f"{_num(r['ratio'], 5, 2)}x  {'; '.join(r['notes'])}"
            )
    if results.get("targets"):
        lines += ["", "targets:"]
        for t in results["targets"]:
            measured = "-" if t["measured"] is None else f"{t['measured']:g}"
            lines.append(
                f"  {t['verdict']:6s} {t['target']}: {measured} (goal {t['comparison']} {t['goal']:g})"
                + (f"  [{'; '.join(t['notes'])}]" if t["notes"] else "")
            )
    load = results.get("load_average") or {}
    if load:
        lines += ["", "load average (1m, 5m, 15m): " + "; ".join(f"{k} {v}" for k, v in load.items())]
    return "\n".join(lines)
