"""The load generators of `make bench-serve` and the parsing of what they print.

- HTTP: wrk (Debian's), one thread, N keep-alive connections, one POST body from a file. Its timeout
  is set far beyond any latency a run can see (`TIMEOUT_SECONDS`), because wrk drops a response slower
  than its timeout from the latency histogram and counts it only as a timeout: a 2 s timeout would
  silently cut the tail off a struggling server's percentiles. Timeouts and errors are reported on
  every row regardless.
- gRPC: ghz (built once from the Go module proxy and cached, `ghz_binary`), one connection, N
  concurrent calls, `--duration-stop=wait` so calls in flight at the end complete and count instead
  of being cancelled into errors; or, where Go or the build is unavailable, `bench.grpc_load`
  (grpc.aio in several processes). Each row names the generator that produced it.

Both are closed-loop (each connection sends its next request when the previous one returns), so a
row's latencies are those of N clients waiting on the server, not of an open arrival rate.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

TIMEOUT_SECONDS = 60
# Above this share of requests left in flight when wrk stops, a row says so.
CENSORED_SHARE = 0.01
GHZ_VERSION = "v0.120.0"
GHZ_MODULE = "github.com/bojand/ghz/cmd/ghz"

WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- "Name: value" lines from request_headers(): the OIP binary tensor rows need their own.
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  wrk.headers[name] = value
end
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"max_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class LoadError(RuntimeError):
    """A load generator failed to run or printed nothing we can read."""


def _ms_from(value: float, scale: float, completed: bool) -> float | None:
    # No completed request (a server that stalled for the whole run) has no latency, not a zero one.
    return round(value / scale, 3) if completed else None


def row_notes(row: dict[str, Any]) -> list[str]:
    """What a reader must know before trusting a row's figures."""
    notes = []
    if row["requests"] == 0:
        notes.append("no response within the run")
    elif row["ok"] == 0:
        notes.append("no successful response")
    if row["errors"]:
        notes.append(f"{row['errors']} errors ({row.get('error_detail') or 'see log'})")
    if row["timeouts"]:
        notes.append(f"{row['timeouts']} timeouts (> {TIMEOUT_SECONDS}s; not in the percentiles)")
    # wrk stops at the deadline with one request in flight per connection and never counts those: the
    # slowest are likeliest to be among them, so a large share skews the tail down.
    c, completed = row["concurrency"], row["requests"]
    if row["loadgen"] == "wrk" and completed and c / (completed + c) > CENSORED_SHARE:
        notes.append(f"up to {c} in flight at the end not counted ({100 * c / (completed + c):.0f}%)")
    return notes


def parse_wrk(stdout: str, concurrency: int) -> dict[str, Any]:
    """The BENCH_JSON line that WRK_SCRIPT's `done` prints, as a row. Every response counts as a
    request; non-2xx/3xx ones are errors (wrk's `status` errors) and are not in `ok` or the rate."""
    line = next((x for x in stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise LoadError(f"wrk printed no BENCH_JSON line:\n{stdout[-2000:]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    detail = {
        key: raw[f"{key}_errors"] for key in ("connect", "read", "write", "status") if raw[f"{key}_errors"]
    }
    errors = sum(detail.values())
    ok = max(0, raw["requests"] - raw["status_errors"])
    completed = raw["requests"] > 0
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests": raw["requests"],
        "ok": ok,
        "rps": round(ok / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": _ms_from(raw["p50_us"], 1000, completed),
        "p90_ms": _ms_from(raw["p90_us"], 1000, completed),
        "p99_ms": _ms_from(raw["p99_us"], 1000, completed),
        "max_ms": _ms_from(raw["max_us"], 1000, completed),
        "mean_ms": _ms_from(raw["mean_us"], 1000, completed),
        "errors": errors,
        "error_detail": ", ".join(f"{key} {count}" for key, count in detail.items()),
        "timeouts": raw["timeouts"],
        "loadgen": "wrk",
    }
    row["notes"] = row_notes(row)
    return row


def parse_ghz(report: str, concurrency: int) -> dict[str, Any]:
    """ghz's `--format=json` report as a row (its times are nanoseconds). A call is an error unless
    its status is OK; ghz's percentiles cover every call, so with errors they are not ours alone."""
    raw = json.loads(report)
    statuses: dict[str, int] = raw.get("statusCodeDistribution") or {}
    requests = int(raw.get("count", 0))
    ok = int(statuses.get("OK", 0))
    timeouts = int(statuses.get("DeadlineExceeded", 0))
    errors = requests - ok - timeouts
    seconds = raw.get("total", 0) / 1e9
    percentiles = {int(p["percentage"]): p["latency"] for p in raw.get("latencyDistribution") or []}
    completed = requests > 0
    detail = ", ".join(f"{status} {count}" for status, count in statuses.items() if status != "OK")
    if raw.get("errorDistribution"):
        detail += "; " + "; ".join(
            f"{message}: {count}" for message, count in raw["errorDistribution"].items()
        )
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests": requests,
        "ok": ok,
        "rps": round(ok / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": _ms_from(percentiles.get(50, 0), 1e6, completed),
        "p90_ms": _ms_from(percentiles.get(90, 0), 1e6, completed),
        "p99_ms": _ms_from(percentiles.get(99, 0), 1e6, completed),
        "max_ms": _ms_from(raw.get("slowest", 0), 1e6, completed),
        "mean_ms": _ms_from(raw.get("average", 0), 1e6, completed),
        "errors": errors,
        "error_detail": detail.strip("; "),
        "timeouts": timeouts,
        "loadgen": f"ghz {GHZ_VERSION}",
    }
    row["notes"] = row_notes(row)
    return row


def request_headers(body: Path) -> dict[str, str]:
    """The headers a body is sent with: JSON, unless a `<body>.headers` file beside it says otherwise
    (one "Name: value" per line)."""
    headers = {"Content-Type": "application/json"}
    sidecar = body.with_suffix(".headers")
    if sidecar.is_file():
        for line in sidecar.read_text().splitlines():
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
    return headers


def run_wrk(url: str, body: Path, concurrency: int, seconds: float, script: Path) -> dict[str, Any]:
    # wrk reads whole seconds only ("0.5s" is a usage error).
    command = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", f"{TIMEOUT_SECONDS}s",
        "-s", str(script), url,
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        env={
            **os.environ,
            "BENCH_BODY": str(body),
            "BENCH_HEADERS": "\n".join(f"{name}: {value}" for name, value in request_headers(body).items()),
        },
        capture_output=True,
        text=True,
        timeout=seconds + TIMEOUT_SECONDS + 30,
        check=False,
    )
    try:
        return parse_wrk(completed.stdout, concurrency)
    except LoadError as error:
        raise LoadError(f"{error}\n{completed.stderr[-2000:]}") from error


# --- gRPC -----------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops"))


def ghz_binary(build: bool = True) -> Path | None:
    """ghz at GHZ_VERSION, cached under the shared cache keyed by version; built with `go install`
    from the Go module proxy on first use (flock: parallel runs build once). None where there is no
    Go toolchain or the build fails (the log says why, next to the binary's directory)."""
    directory = _cache_dir() / f"ghz-{GHZ_VERSION}"
    binary = directory / "ghz"
    if binary.is_file():
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None)
    if not build or go is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    log = directory.parent / f"ghz-{GHZ_VERSION}.build.log"
    with open(f"{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        print(f"building ghz {GHZ_VERSION} (once; log {log}) ...", flush=True)
        with log.open("w") as out:
            completed = subprocess.run(
                [go, "install", f"{GHZ_MODULE}@{GHZ_VERSION}"],
                env={**os.environ, "GOBIN": str(directory), "GOFLAGS": "-buildvcs=false"},
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=1800,
                check=False,
            )
    return binary if completed.returncode == 0 and binary.is_file() else None


def run_ghz(
    ghz: Path,
    *,
    target: str,
    proto: Path,
    request: Path,
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    command = [
        str(ghz), "--insecure",
        "--proto", str(proto), "--import-paths", str(proto.parent),
        "--call", "inference.GRPCInferenceService.ModelInfer",
        "--binary-file", str(request),
        "--concurrency", str(concurrency), "--connections", "1",
        "--duration", f"{seconds:g}s", "--duration-stop", "wait",
        "--timeout", f"{TIMEOUT_SECONDS}s",
        "--cpus", "1",
        "--format", "json",
        target,
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + TIMEOUT_SECONDS + 30, check=False
    )
    if not completed.stdout.strip().startswith("{"):
        raise LoadError(
            f"ghz failed ({completed.returncode}):\n{completed.stdout[-1000:]}\n{completed.stderr[-2000:]}"
        )
    return parse_ghz(completed.stdout, concurrency)


def run_grpc_aio(target: str, request: Path, concurrency: int, seconds: float) -> dict[str, Any]:
    """The fallback gRPC generator (bench/grpc_load.py) in a child process of this interpreter."""
    command = [
        sys.executable, "-m", "bench.grpc_load",
        "--target", target, "--request", str(request),
        "--concurrency", str(concurrency), "--seconds", f"{seconds:g}",
        "--timeout", str(TIMEOUT_SECONDS),
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + TIMEOUT_SECONDS + 60, check=False
    )
    if completed.returncode != 0:
        raise LoadError(f"bench.grpc_load failed:\n{completed.stderr[-2000:]}")
    row: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    row["notes"] = row_notes(row)
    return row
