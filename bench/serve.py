"""`make bench-serve`: the prediction service under load, against the two designs users would
otherwise pick, in one run on one model version.

- ours: `python -m serving` (ONNX Runtime, all validation, metrics and JSON access logs on);
  single-image `/predict` and `/v2/models/{name}/infer` at concurrency 1, 16 and 64, and images/s
  through `/predict/batch`.
- `mlflow models serve` on the same version's Keras model (`keras_model_uri` tag),
  `--env-manager local`.
- naive: FastAPI calling Keras `model.predict` per request (`naive_app` below).

Every server runs alone with one worker; wrk (Debian's) generates the load from another process on
loopback, with a 784-float JSON body. The model is a small CNN trained briefly by the real training
entrypoint and registered in a throw-away MLflow server. Table on stdout, JSON in
bench/results/serve.json. The machine is shared, so each run records the load average it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from bench.report import write_results
from local_mode.processes import ChildProcess, free_port, http_ok

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "serve.json"
CONCURRENCY = (1, 16, 64)
BATCH_SIZES = (32, 256)
BATCH_CONCURRENCY = 2

WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"max_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


# --- the naive baseline: Keras model.predict per request inside FastAPI ----------------------------


class NaiveBody(BaseModel):
    pixels: list[list[float]]


def naive_app() -> Any:
    """What a first version often looks like: the training framework in the request path."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow.keras
    from fastapi import FastAPI

    model = mlflow.keras.load_model(os.environ["BENCH_KERAS_MODEL_URI"])
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: NaiveBody) -> dict[str, Any]:
        x = np.asarray(body.pixels, dtype=np.float32).reshape(1, 28, 28, 1)
        probabilities = model.predict(x, verbose=0)[0]
        return {"digit": int(probabilities.argmax()), "probabilities": probabilities.tolist()}

    return app


# --- processes ---------------------------------------------------------------------------------------


@dataclass
class Server:
    child: ChildProcess
    url: str

    @property
    def name(self) -> str:
        return self.child.name

    def stop(self) -> None:
        self.child.stop(30)

    def wait(self, path: str, timeout: float) -> float:
        """Seconds from process start until `path` answers 200 (polled every 20 ms: this is a start-up
        time measurement, so the poll interval bounds its resolution)."""
        self.child.wait_ready(lambda: http_ok(self.url + path), timeout, f"{path} answered", interval=0.02)
        return time.monotonic() - self.child.started


def launch(name: str, command: list[str], env: dict[str, str], port: int, workdir: Path) -> Server:
    environment = {
        **os.environ,
        # `mlflow models serve` execs `uvicorn` by name: it must find the virtualenv's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO_ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **env,
    }
    child = ChildProcess.spawn(name, command, workdir / f"{name}.log", env=environment, cwd=REPO_ROOT)
    return Server(child, f"http://127.0.0.1:{port}")


@contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def ours(tracking_uri: str, model_name: str, cache: Path, workdir: Path) -> Server:
    port = free_port()
    env = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "SERVING_HOST": "127.0.0.1",
        "SERVING_PORT": str(port),
        "SERVING_WORKERS": "1",
        "SERVING_MODEL_URI": f"models:/{model_name}@champion",
        "SERVING_MODEL_CACHE_DIR": str(cache),
    }
    return launch("serving", [sys.executable, "-m", "serving"], env, port, workdir)


def mlflow_models_serve(tracking_uri: str, keras_model_uri: str, workdir: Path) -> Server:
    port = free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    command = [
        mlflow_cli, "models", "serve",
        "-m", keras_model_uri,
        "--env-manager", "local",
        "-h", "127.0.0.1",
        "-p", str(port),
        "-w", "1",
    ]  # fmt: skip
    return launch("mlflow-models-serve", command, {"MLFLOW_TRACKING_URI": tracking_uri}, port, workdir)


def naive(tracking_uri: str, keras_model_uri: str, workdir: Path) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "bench.serve:naive_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--no-access-log",
    ]  # fmt: skip
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "BENCH_KERAS_MODEL_URI": keras_model_uri}
    return launch("naive-fastapi-keras", command, env, port, workdir)


# --- load ----------------------------------------------------------------------------------------------


def wrk(url: str, body: Path, concurrency: int, seconds: float, script: Path) -> dict[str, Any]:
    command = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--timeout", "5s", "-s", str(script), url,
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        env={**os.environ, "BENCH_BODY": str(body)},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    line = next((x for x in completed.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed:\n{completed.stdout}\n{completed.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds_run = raw["duration_us"] / 1e6
    errors = raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["status_errors"]
    ok = max(0, raw["requests"] - raw["status_errors"])
    completed_any = raw["requests"] > 0

    def ms(key: str) -> float | None:
        # No completed request (a server stalled for the whole run) has no latency, not a zero one.
        return round(raw[key] / 1000, 3) if completed_any else None

    return {
        "concurrency": concurrency,
        "requests": raw["requests"],
        "rps": round(ok / seconds_run, 1),
        "p50_ms": ms("p50_us"),
        "p95_ms": ms("p95_us"),
        "p99_ms": ms("p99_us"),
        "max_ms": ms("max_us"),
        "errors": errors,
        "timeouts": raw["timeouts"],
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _ms(value: float | None, width: int = 8) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}s}"


@dataclass(frozen=True)
class Load:
    script: Path
    duration: float
    warmup: float

    def measure(
        self, server: Server, path: str, body: Path, label: str, concurrency: tuple[int, ...] = CONCURRENCY
    ) -> list[dict[str, Any]]:
        results = []
        for c in concurrency:
            wrk(server.url + path, body, c, self.warmup, self.script)  # connections, caches, allocator
            result = {
                "server": server.name,
                "endpoint": label,
                **wrk(server.url + path, body, c, self.duration, self.script),
            }
            print(
                f"  {server.name:22s} {label:26s} c={c:<3d} {result['rps']:>9.1f} req/s"
                f"  p50 {_ms(result['p50_ms'])} ms  p95 {_ms(result['p95_ms'])}  p99 {_ms(result['p99_ms'])}"
                f"  errors {result['errors']}  timeouts {result['timeouts']}"
                f"  (load {result['load_average_1m']})",
                flush=True,
            )
            results.append(result)
        return results


# --- the run ---------------------------------------------------------------------------------------------


def train(tracking_uri: str, max_train_samples: int, workdir: Path) -> dict[str, Any]:
    """The small CNN, trained and registered (alias champion) by the real training entrypoint."""
    command = [
        sys.executable, "-m", "training_job", "train",
        f"--tracking-uri={tracking_uri}",
        "--architecture=baseline",
        "--epochs=1",
        f"--max-train-samples={max_train_samples}",
        "--run-name=bench-serve",
        f"--data={REPO_ROOT / 'data' / 'mnist.npz'}",
        f"--result-file={workdir / 'result.json'}",
        "--promote",
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"training failed:\n{completed.stderr[-4000:]}")
    result: dict[str, Any] = json.loads((workdir / "result.json").read_text())
    return result


def bodies(workdir: Path, input_name: str) -> dict[str, Path]:
    with np.load(REPO_ROOT / "data" / "mnist.npz") as data:
        images = data["x_test"][:256].astype(np.float32) / 255
    one = [[float(v) for v in row] for row in images[0]]
    payloads: dict[str, Any] = {
        "pixels": {"pixels": one},
        "v2": {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [1, 784],
                    "datatype": "FP32",
                    "data": [v for row in one for v in row],
                }
            ]
        },
        "mlflow": {"inputs": [[[[v] for v in row] for row in one]]},
    }
    for size in BATCH_SIZES:
        payloads[f"batch{size}"] = {"instances": [{"pixels": images[i].tolist()} for i in range(size)]}
    paths = {}
    for name, payload in payloads.items():
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(payload))
        paths[name] = path
    return paths


def target(description: str, measured: float | None, goal: float, higher_is_better: bool) -> dict[str, Any]:
    met = measured is not None and (measured >= goal if higher_is_better else measured <= goal)
    return {"target": description, "goal": goal, "measured": measured, "met": met}


def bench_serving(tracking_uri: str, name: str, version: str, workdir: Path, load: Load) -> dict[str, Any]:
    cache = workdir / "cache"
    cold = ours(tracking_uri, name, cache, workdir)
    with running(cold):
        cold_ready = cold.wait("/health/ready", 300)
        input_name = httpx.get(f"{cold.url}/v2/models/{name}").json()["inputs"][0]["name"]
    paths = bodies(workdir, input_name)
    warm = ours(tracking_uri, name, cache, workdir)
    with running(warm):
        warm_ready = warm.wait("/health/ready", 120)
        health = httpx.get(warm.url + "/health").json()
        assert health["model"]["version"] == version and health["model"]["loaded_from_cache"]
        print(f"serving: ready in {cold_ready:.2f}s cold, {warm_ready:.2f}s from the warm cache", flush=True)
        runs = load.measure(warm, "/predict", paths["pixels"], "/predict")
        runs += load.measure(warm, f"/v2/models/{name}/infer", paths["v2"], "/v2/models/{name}/infer")
        batch = []
        for size in BATCH_SIZES:
            label = f"/predict/batch x{size}"
            for result in load.measure(
                warm, "/predict/batch", paths[f"batch{size}"], label, (BATCH_CONCURRENCY,)
            ):
                result["batch_size"] = size
                result["images_per_second"] = round(result["rps"] * size, 1)
                batch.append(result)
    return {"cold_ready": cold_ready, "warm_ready": warm_ready, "runs": runs, "batch": batch, "paths": paths}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from local_mode.mlflow_server import start_mlflow_server

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required: apt-get install wrk (scripts/install-system-deps.sh)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    load = Load(script, args.duration, args.warmup)
    mlflow = start_mlflow_server(workdir / "mlflow")
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "duration_seconds": args.duration,
        "wrk": "wrk -t1 -cN --timeout 5s, keep-alive, one POST body per endpoint",
    }
    try:
        print("training and registering the model ...", flush=True)
        model = train(mlflow.url, args.max_train_samples, workdir)
        name, version, keras_uri = model["registered_model"], model["model_version"], model["keras_model_uri"]
        results["model"] = {
            "name": name,
            "version": version,
            "architecture": model["architecture"],
            "test_accuracy": model["metrics"].get("test_accuracy"),
            "keras_model_uri": keras_uri,
        }
        serving = bench_serving(mlflow.url, name, version, workdir, load)
        runs: list[dict[str, Any]] = serving["runs"]
        paths: dict[str, Path] = serving["paths"]
        with running(naive(mlflow.url, keras_uri, workdir)) as naive_server:
            naive_ready = naive_server.wait("/ping", 600)
            runs += load.measure(naive_server, "/predict", paths["pixels"], "/predict (Keras predict)")
        with running(mlflow_models_serve(mlflow.url, keras_uri, workdir)) as baseline:
            mlflow_ready = baseline.wait("/ping", 600)
            runs += load.measure(baseline, "/invocations", paths["mlflow"], "/invocations")
    finally:
        mlflow.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["ready_seconds"] = {
        "serving_cold_cache": round(serving["cold_ready"], 3),
        "serving_warm_cache": round(serving["warm_ready"], 3),
        "naive_fastapi_keras": round(naive_ready, 3),
        "mlflow_models_serve": round(mlflow_ready, 3),
    }
    results["runs"] = runs
    results["batch"] = serving["batch"]
    results["targets"] = targets(runs, serving["warm_ready"])
    return results


def targets(runs: list[dict[str, Any]], warm_ready: float) -> dict[str, Any]:
    def find(server: str, endpoint: str, c: int) -> dict[str, Any] | None:
        return next(
            (
                r
                for r in runs
                if r["server"] == server and r["endpoint"] == endpoint and r["concurrency"] == c
            ),
            None,
        )

    ours_1, ours_16 = find("serving", "/predict", 1), find("serving", "/predict", 16)
    mlflow_16 = find("mlflow-models-serve", "/invocations", 16)
    ratio = None
    if ours_16 and mlflow_16 and mlflow_16["rps"] > 0:
        ratio = round(ours_16["rps"] / mlflow_16["rps"], 1)
    return {
        "throughput_vs_mlflow_c16": target(
            "/predict req/s at c=16 over mlflow models serve's", ratio, 50, True
        ),
        "p50_c1_ms": target("/predict p50 at c=1 (ms)", ours_1["p50_ms"] if ours_1 else None, 1.0, False),
        "p99_c16_ms": target(
            "/predict p99 at c=16 (ms)", ours_16["p99_ms"] if ours_16 else None, 25.0, False
        ),
        "ready_warm_cache_s": target("ready after start, warm cache (s)", round(warm_ready, 3), 2.0, False),
    }


def print_table(results: dict[str, Any]) -> None:
    model = results["model"]
    print(f"\nmodel {model['name']} v{model['version']} ({model['architecture']})")
    head = ("c", "req/s", "p50 ms", "p95 ms", "p99 ms", "err", "t/o")
    widths = (3, 9, 9, 9, 9, 5, 5)
    print(
        f"{'server':22s} {'endpoint':28s} "
        + " ".join(f"{h:>{w}s}" for h, w in zip(head, widths, strict=True))
    )
    for r in results["runs"]:
        print(
            f"{r['server']:22s} {r['endpoint']:28s} {r['concurrency']:>3d} {r['rps']:>9.1f}"
            f" {_ms(r['p50_ms'], 9)} {_ms(r['p95_ms'], 9)} {_ms(r['p99_ms'], 9)}"
            f" {r['errors']:>5d} {r['timeouts']:>5d}"
        )
    for r in results["batch"]:
        print(
            f"{'serving':22s} {r['endpoint']:28s} {r['concurrency']:>3d} {r['images_per_second']:>9.1f}"
            f" images/s (p50 {r['p50_ms']:.1f} ms)"
        )
    print("ready: " + ", ".join(f"{k} {v:.2f}s" for k, v in results["ready_seconds"].items()))
    for key, t in results["targets"].items():
        verdict = "MET" if t["met"] else "NOT MET"
        print(f"target {key}: {t['target']} goal {t['goal']} measured {t['measured']} -> {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    parser.add_argument("--max-train-samples", type=int, default=6000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, bodies)")
    args = parser.parse_args(argv)
    results = run(args)
    print_table(results)
    write_results(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
