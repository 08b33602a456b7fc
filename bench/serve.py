"""`make bench-serve`: the prediction service under load against the servers users would otherwise
pick, all serving the same registered ONNX model version, in one run on one machine.

The model is the champion architecture (residual-bn), trained briefly by the real training
entrypoint (the architecture, not the accuracy, sets the inference cost) and registered in a
throw-away MLflow server. Then each server runs ALONE (started, measured, stopped before the next),
with ONE worker, on loopback:

- ours: `python -m serving` as deployed (validation, metrics, JSON access logs on): `/predict`,
  `/v2/models/{name}/infer` (Open Inference Protocol REST) and OIP gRPC when the service has it;
  images/s with 256 images per request through `/predict/batch` and OIP; seconds from spawn to
  `/health/ready` with the artifact already in the cache (several runs, median); `/predict` at c=16
  with the prediction log off and on (every prediction written to SQLite), back to back.
- MLServer 1.7 with its MLflow runtime on the same version's ONNX pyfunc (OIP REST and gRPC).
- KServe 0.21's Python ModelServer with a minimal custom model running the same ONNX file
  (bench/kserve_model.py; OIP REST and gRPC).
- `mlflow models serve` on the same ONNX version (pyfunc, `--env-manager local`).
- `mlflow models serve` on the version's Keras flavour: what the seed's design would have served.

Every ONNX server runs the same bytes (graph and weights, checked by sha256) with ONNX Runtime
limited to one intra-op and one inter-op thread, the prediction service's setting (for MLflow's
pyfunc through the flavour's own `onnx_session_options` in a downloaded copy of the version). The
request is one 28x28 image as FP32 in each server's protocol; each server's answer is checked (same
digit) before it is loaded. Peers run in their default configuration apart from ports and one
worker (MLServer: `parallel_workers` 0, inference in the server process like the others;
`--mlserver-parallel-workers 1` for its default).

Load: wrk for HTTP and ghz (or bench.grpc_load) for gRPC at concurrency 1, 16 and 64, with a 60 s
timeout so no slow response is dropped from the percentiles; every row reports req/s, p50, p99, max,
errors and timeouts. Ratios to the best of MLServer and KServe and the issue's targets are computed
from this run's rows and printed as met / MISSED. Table on stdout; JSON (with the load average before
and after) in bench/results/serve.json, or `--output`. `--quick` is a smoke run (short durations):
write it elsewhere, a busy machine's figures are not results.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import loadgen, peers_serve, serve_summary
from bench.peers_serve import Server
from bench.report import write_results
from local_mode.processes import ProcessExitedError

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "serve.json"
CONCURRENCY = (1, 16, 64)
RATIO_CONCURRENCY = serve_summary.RATIO_CONCURRENCY
BATCH_SIZE = serve_summary.BATCH_SIZE
BATCH_CONCURRENCY = 2
ARCHITECTURE = "residual-bn"
ONNX_THREADS = {"intra_op_num_threads": 1, "inter_op_num_threads": 1}
START_TIMEOUT = 600.0
# A row with fewer responses than this per connection is run again, longer (up to --max-duration).
MIN_REQUESTS_PER_CONNECTION = 5


@dataclass(frozen=True)
class Load:
    duration: float
    warmup: float
    wrk_script: Path
    ghz: Path | None
    proto: Path
    max_duration: float

    @property
    def grpc_loadgen(self) -> str:
        return f"ghz {loadgen.GHZ_VERSION}" if self.ghz else "bench.grpc_load (grpc.aio, 2 processes)"

    def one(
        self, server: Server, route: str, target: str, body: Path, *, c: int, seconds: float
    ) -> dict[str, Any]:
        if route == "gRPC":
            if self.ghz is not None:
                return loadgen.run_ghz(
                    self.ghz, target=target, proto=self.proto, request=body, concurrency=c, seconds=seconds
                )
            return loadgen.run_grpc_aio(target, body, c, seconds)
        return loadgen.run_wrk(server.url + target, body, c, seconds, self.wrk_script)

    def drain(self, server: Server, route: str, target: str, body: Path) -> None:
        """wrk closes its connections at the deadline, but the server still works off what they had
        sent: one more request, answered after that backlog, keeps it out of the next row. (ghz and
        bench.grpc_load wait for their calls, so gRPC leaves none.)"""
        if route == "gRPC":
            return
        with contextlib.suppress(httpx.HTTPError):  # the next row reports what is wrong, if anything
            httpx.post(
                server.url + target,
                content=body.read_bytes(),
                headers=loadgen.request_headers(body),
                timeout=loadgen.TIMEOUT_SECONDS * 2,
            )

    def measure(
        self, server: Server, route: str, target: str, body: Path, concurrency: tuple[int, ...]
    ) -> list[dict[str, Any]]:
        rows = []
        for c in concurrency:
            if self.warmup > 0:  # connections, caches, the allocator; not recorded
                self.one(server, route, target, body, c=c, seconds=self.warmup)
                self.drain(server, route, target, body)
            seconds = self.duration
            while True:
                result = self.one(server, route, target, body, c=c, seconds=seconds)
                self.drain(server, route, target, body)
                # A slow server answers few requests per connection in a short row, and the ones left
                # in flight at the deadline (uncounted by wrk) are its slowest: run it longer.
                if result["requests"] >= MIN_REQUESTS_PER_CONNECTION * c or seconds >= self.max_duration:
                    break
                wanted = MIN_REQUESTS_PER_CONNECTION * c * 1.2 / max(1, result["requests"])
                seconds = min(self.max_duration, seconds * max(2.0, wanted))
                print(
                    f"  {server.name} {route} c={c}: {result['requests']} responses; again for {seconds:g}s"
                )
            row = {
                "server": server.name,
                "route": route,
                "target": target,
                **result,
                "load_average_1m": round(os.getloadavg()[0], 2),
            }
            print(
                "  " + serve_summary.format_rows([row])[1] + f"  (load {row['load_average_1m']})", flush=True
            )
            rows.append(row)
        return rows


# --- the model ---------------------------------------------------------------------------------------


def train(tracking_uri: str, max_train_samples: int, workdir: Path) -> dict[str, Any]:
    """The champion architecture, one epoch on a subset, trained and registered (alias champion) by
    the real training entrypoint."""
    command = [
        sys.executable, "-m", "training_job", "train",
        f"--tracking-uri={tracking_uri}",
        f"--architecture={ARCHITECTURE}",
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
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"training failed:\n{completed.stderr[-4000:]}")
    result: dict[str, Any] = json.loads((workdir / "result.json").read_text())
    return result


def download_version(tracking_uri: str, name: str, version: str, destination: Path) -> Path:
    """The registered version's MLflow model directory (ONNX flavour), with the flavour's session
    options set to the prediction service's threads, for the servers that load it through MLflow."""
    import mlflow
    import mlflow.artifacts
    from mlflow.models import Model

    # The registry by its tracking URI explicitly: `models:/` alone would consult the default registry.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = client.get_model_version_download_uri(name, version)
    path = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=tracking_uri
        )
    )
    mlmodel = Model.load(str(path / "MLmodel"))
    mlmodel.flavors["onnx"]["onnx_session_options"] = dict(ONNX_THREADS)
    mlmodel.save(str(path / "MLmodel"))
    return path


def onnx_digest(directory: Path) -> str:
    """sha256 over the ONNX graph and its external weight files (Keras' exporter writes the weights
    beside the graph, `<uuid>.data`), so equal digests mean the same model, weights included."""
    from serving.model_store import ONNX_FILENAME

    digest = hashlib.sha256()
    for path in [directory / ONNX_FILENAME, *sorted(directory.glob("*.data"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


# --- requests ----------------------------------------------------------------------------------------


def bodies(workdir: Path, model_name: str, input_name: str) -> dict[str, Path]:
    """One image (and 256 for the batch rows) from the MNIST test set, scaled to 0..1 FP32, in each
    server's protocol."""
    with np.load(REPO_ROOT / "data" / "mnist.npz") as data:
        images = data["x_test"][:BATCH_SIZE].astype(np.float32) / 255
    one = images[0].tolist()
    flat = [v for row in one for v in row]

    def v2(count: int) -> dict[str, Any]:
        data = flat if count == 1 else images[:count].reshape(-1).tolist()
        return {
            "inputs": [{"name": input_name, "shape": [count, 28, 28, 1], "datatype": "FP32", "data": data}]
        }

    payloads: dict[str, Any] = {
        "predict": {"pixels": one},
        "v2": v2(1),
        "mlflow": {"inputs": [[[[v] for v in row] for row in one]]},
        "batch_predict": {"instances": [{"pixels": images[i].tolist()} for i in range(BATCH_SIZE)]},
        "batch_v2": v2(BATCH_SIZE),
    }
    paths = {}
    for key, payload in payloads.items():
        paths[key] = workdir / f"{key}.json"
        paths[key].write_text(json.dumps(payload))
    # The OIP binary tensor extension, as tritonclient sends by default: a JSON header, then the raw
    # little-endian FP32 tensor; the response's probabilities come back as JSON.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [BATCH_SIZE, 28, 28, 1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ]
        }
    ).encode()
    paths["batch_v2_binary"] = workdir / "batch_v2_binary.bin"
    paths["batch_v2_binary"].write_bytes(header + images.astype("<f4").tobytes())
    paths["batch_v2_binary"].with_suffix(".headers").write_text(
        f"Content-Type: application/octet-stream\nInference-Header-Content-Length: {len(header)}\n"
    )
    request = grpc_request(model_name, input_name, flat)
    if request is not None:
        paths["grpc"] = workdir / "grpc.bin"
        paths["grpc"].write_bytes(request)
    return paths


def grpc_request(model_name: str, input_name: str, flat: list[float]) -> bytes | None:
    try:
        from serving.grpc import inference_pb2
    except ImportError:
        return None
    request = inference_pb2.ModelInferRequest(model_name=model_name)
    tensor = request.inputs.add(name=input_name, datatype="FP32", shape=[1, 28, 28, 1])
    tensor.contents.fp32_contents.extend(flat)
    return bytes(request.SerializeToString())


def probabilities_of(document: Any) -> list[float] | None:
    """The first 10 numbers found in a response: the probabilities, in every protocol here."""
    if isinstance(document, dict):
        for value in document.values():
            if (found := probabilities_of(value)) is not None:
                return found
    elif isinstance(document, list):
        if len(document) == 10 and all(isinstance(v, int | float) for v in document):
            return [float(v) for v in document]
        for value in document:
            if (found := probabilities_of(value)) is not None:
                return found
    return None


def probe(server: Server, path: str, body: Path) -> list[float] | None:
    """One request before the load: it must answer 200; returns the probabilities it answered."""
    response = httpx.post(
        server.url + path, content=body.read_bytes(), headers=loadgen.request_headers(body), timeout=60
    )
    if response.status_code != 200:
        raise RuntimeError(f"{server.name} {path}: HTTP {response.status_code}: {response.text[:500]}")
    return probabilities_of(response.json())


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    load: Load
    workdir: Path
    runs: list[dict[str, Any]]
    batch: list[dict[str, Any]]
    failed: list[dict[str, str]]
    ready: dict[str, Any]
    answers: dict[str, list[float] | None]
    servers: dict[str, Any]

    def serve(self, name: str, start: Callable[[], Server], measure: Callable[[Server], None]) -> None:
        """Start one server, measure it, stop it; a server that cannot start or answer becomes a
        NOT MEASURED entry and the run goes on."""
        server: Server | None = None
        try:
            server = start()
            print(f"{server.name}: starting ...", flush=True)
            seconds = server.wait(START_TIMEOUT)
            self.ready[server.name] = round(seconds, 3)
            self.servers[server.name] = server.settings
            print(f"{server.name}: ready in {seconds:.2f}s", flush=True)
            measure(server)
        except Exception as error:  # the run reports it and measures the others
            print(f"{name}: NOT MEASURED: {error}", file=sys.stderr, flush=True)
            if not isinstance(error, loadgen.LoadError | ProcessExitedError | TimeoutError):
                traceback.print_exc()
            self.failed.append({"server": name, "reason": str(error)[:2000]})
        finally:
            if server is not None:
                server.stop()

    def rest(self, server: Server, route: str, path: str, body: Path, concurrency: tuple[int, ...]) -> None:
        self.answers[f"{server.name} {route}"] = probe(server, path, body)
        self.runs += self.load.measure(server, route, path, body, concurrency)

    def grpc(self, server: Server, paths: dict[str, Path], concurrency: tuple[int, ...]) -> None:
        if server.grpc_target is None or "grpc" not in paths:
            self.failed.append({"server": f"{server.name} gRPC", "reason": "no gRPC server or stubs"})
            return
        self.runs += self.load.measure(server, "gRPC", server.grpc_target, paths["grpc"], concurrency)


@dataclass(frozen=True)
class Model:
    tracking_uri: str
    name: str
    version: str
    cache: Path
    directory: Path  # the downloaded MLflow model (ONNX flavour)
    paths: dict[str, Path]

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.name}@champion"

    @property
    def infer_path(self) -> str:
        return f"/v2/models/{self.name}/infer"


def prepare(state: Run, tracking_uri: str, info: dict[str, Any]) -> Model:
    """Train and register; start ours cold (filling the cache), then from the warm cache several
    times; write the request bodies; download the version for the peers, checking it is the ONNX file
    ours serves."""
    from serving.model_store import ModelStore

    args, workdir = state.args, state.workdir
    print(
        f"training and registering {ARCHITECTURE} (1 epoch, {args.max_train_samples} images) ...", flush=True
    )
    trained = train(tracking_uri, args.max_train_samples, workdir)
    name, version = trained["registered_model"], trained["model_version"]
    info.update(
        name=name,
        version=version,
        architecture=trained["architecture"],
        test_accuracy=trained["metrics"].get("test_accuracy"),
        keras_model_uri=trained["keras_model_uri"],
    )
    cache = workdir / "cache"
    alias_uri = f"models:/{name}@champion"
    cold = peers_serve.ours(tracking_uri, alias_uri, cache, workdir, name="ours (cold cache)")
    try:
        state.ready["ours_cold_cache"] = round(cold.wait(START_TIMEOUT), 3)
        input_name = httpx.get(f"{cold.url}/v2/models/{name}", timeout=10).json()["inputs"][0]["name"]
    finally:
        cold.stop()
    warm_runs = []
    for _ in range(args.ready_runs):
        server = peers_serve.ours(tracking_uri, alias_uri, cache, workdir, name="ours (warm cache)")
        try:
            warm_runs.append(round(server.wait(120), 3))
            health = httpx.get(server.url + "/health", timeout=10).json()
            if not health["model"]["loaded_from_cache"]:
                raise RuntimeError(f"the warm start did not load from the cache: {health}")
        finally:
            server.stop()
    state.ready["ours_warm_cache_runs"] = warm_runs
    state.ready["ours_warm_cache_median"] = round(statistics.median(warm_runs), 3)
    print(f"ours: ready in {state.ready['ours_cold_cache']}s cold, {warm_runs}s warm", flush=True)

    directory = download_version(tracking_uri, name, version, workdir / "model")
    info["onnx_sha256"] = onnx_digest(ModelStore(tracking_uri, cache).version_dir(name, version))
    if onnx_digest(directory) != info["onnx_sha256"]:
        raise RuntimeError("the downloaded version's ONNX model differs from the one ours serves")
    return Model(tracking_uri, name, version, cache, directory, bodies(workdir, name, input_name))


def measure_all(state: Run, model: Model, keras_model_uri: str) -> None:
    """Each server alone: started, measured, stopped before the next."""
    from serving.model_store import ONNX_FILENAME
    from serving.settings import Settings
    from testing.peers import peer_python

    args, workdir, paths, load = state.args, state.workdir, model.paths, state.load

    def ours(extra: dict[str, str] | None = None, name: str = "ours") -> Server:
        return peers_serve.ours(
            model.tracking_uri, model.alias_uri, model.cache, workdir, extra=extra, name=name
        )

    def measure_ours(server: Server) -> None:
        state.rest(server, "/predict", "/predict", paths["predict"], CONCURRENCY)
        state.rest(server, "/v2", model.infer_path, paths["v2"], CONCURRENCY)
        state.grpc(server, paths, CONCURRENCY)
        for route, path, body in (
            ("/predict/batch", "/predict/batch", paths["batch_predict"]),
            ("/v2", model.infer_path, paths["batch_v2"]),
            ("/v2 binary", model.infer_path, paths["batch_v2_binary"]),
        ):
            probe(server, path, body)
            for row in load.measure(server, route, path, body, (BATCH_CONCURRENCY,)):
                row["batch_size"] = BATCH_SIZE
                row["images_per_second"] = round(row["rps"] * BATCH_SIZE, 1)
                state.batch.append(row)

    state.serve("ours", ours, measure_ours)

    # Optional: adaptive batching flipped from its default, where the service has it.
    batching = Settings.model_fields.get("batching_enabled")
    if batching is not None:
        flipped = not bool(batching.default)
        label = f"ours (batching {'on' if flipped else 'off'})"

        def measure_batching(server: Server) -> None:
            state.rest(server, "/predict", "/predict", paths["predict"], RATIO_CONCURRENCY)
            state.rest(server, "/v2", model.infer_path, paths["v2"], RATIO_CONCURRENCY)
            state.grpc(server, paths, RATIO_CONCURRENCY)

        state.serve(
            label, lambda: ours({"SERVING_BATCHING_ENABLED": str(flipped).lower()}, label), measure_batching
        )

    # The prediction log's cost (within 10% of off): /predict at c=16 without the log and with every
    # prediction written to a SQLite file, back to back so both rows see the same machine.
    if "prediction_log_url" in Settings.model_fields:
        log_db = workdir / "prediction-log.db"

        def measure_log(server: Server) -> None:
            state.rest(server, "/predict", "/predict", paths["predict"], (serve_summary.LOG_CONCURRENCY,))

        for label, extra in (
            (serve_summary.LOG_OFF, {}),
            (serve_summary.LOG_ON, {"SERVING_PREDICTION_LOG_URL": f"sqlite:///{log_db}"}),
        ):
            state.serve(label, functools.partial(ours, extra, label), measure_log)

    def measure_oip_peer(server: Server) -> None:
        state.rest(server, "/v2", model.infer_path, paths["v2"], CONCURRENCY)
        state.grpc(server, paths, CONCURRENCY)

    state.serve(
        "mlserver",
        lambda: peers_serve.mlserver(
            peer_python("mlserver"), model.directory, model.name, workdir, args.mlserver_parallel_workers
        ),
        measure_oip_peer,
    )
    state.serve(
        "kserve",
        lambda: peers_serve.kserve(
            peer_python("kserve"), model.directory / ONNX_FILENAME, model.name, workdir
        ),
        measure_oip_peer,
    )

    def measure_mlflow(server: Server) -> None:
        state.rest(server, "/invocations", "/invocations", paths["mlflow"], CONCURRENCY)

    for name, uri in (("mlflow-onnx", str(model.directory)), ("mlflow-keras (seed design)", keras_model_uri)):
        start = functools.partial(peers_serve.mlflow_models_serve, name, uri, model.tracking_uri, workdir)
        state.serve(name, start, measure_mlflow)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from local_mode.mlflow_server import start_mlflow_server

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required: apt-get install wrk (scripts/install-system-deps.sh)")
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    script = workdir / "post.lua"
    script.write_text(loadgen.WRK_SCRIPT)
    ghz = None if args.grpc_aio else loadgen.ghz_binary()
    proto = REPO_ROOT / "serving" / "grpc" / "inference.proto"
    load = Load(args.duration, args.warmup, script, ghz, proto, max(args.duration, args.max_duration))
    state = Run(args, load, workdir, [], [], [], {}, {}, {})
    mlflow = start_mlflow_server(workdir / "mlflow")
    info: dict[str, Any] = {}
    try:
        model = prepare(state, mlflow.url, info)
        measure_all(state, model, info["keras_model_uri"])
    finally:
        mlflow.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    return {
        "mode": "quick" if args.quick else "full",
        "model": info,
        "config": {
            "duration_seconds": args.duration,
            "warmup_seconds": args.warmup,
            "max_duration_seconds": args.max_duration,
            "min_responses_per_connection": MIN_REQUESTS_PER_CONNECTION,
            "concurrency": list(CONCURRENCY),
            "http_loadgen": f"wrk -t1 -cN --timeout {loadgen.TIMEOUT_SECONDS}s, keep-alive",
            "grpc_loadgen": load.grpc_loadgen,
            "onnx_session_options": ONNX_THREADS,
            "mlserver_parallel_workers": args.mlserver_parallel_workers,
            "batch_concurrency": BATCH_CONCURRENCY,
            "servers": state.servers,
        },
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in load_after],
        },
        "answers": serve_summary.agreement(state.answers),
        "runs": state.runs,
        "batch": state.batch,
        "failed": state.failed,
        "ready_seconds": state.ready,
        "ratios": serve_summary.ratios(state.runs),
        "targets": serve_summary.evaluate(state.runs, state.batch, state.ready.get("ours_warm_cache_median")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s per row, 3 ready runs, small model"
    )
    parser.add_argument("--duration", type=float, help="seconds of load per row (default 8, --quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each row (default 1)")
    parser.add_argument(
        "--ready-runs", type=int, help="warm-cache start-ups to take the median of (5, --quick 3)"
    )
    parser.add_argument(
        "--max-duration", type=float, help="longest rerun of a row with too few responses (30, --quick 6)"
    )
    parser.add_argument("--max-train-samples", type=int, help="training subset (default 6000, --quick 2000)")
    parser.add_argument("--mlserver-parallel-workers", type=int, default=0, choices=(0, 1))
    parser.add_argument("--grpc-aio", action="store_true", help="use bench.grpc_load even if ghz builds")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, bodies)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration if args.duration is not None else (2.0 if quick else 8.0)
    args.warmup = args.warmup if args.warmup is not None else 1.0
    args.max_duration = args.max_duration or (6.0 if quick else 30.0)
    args.ready_runs = args.ready_runs or (3 if quick else 5)
    args.max_train_samples = args.max_train_samples or (2000 if quick else 6000)
    if quick and args.output == RESULTS:
        parser.error("--quick figures are a smoke test: pass --output (e.g. /tmp/serve-quick.json)")
    # A plain SIGTERM would skip the `finally`s that stop the servers and MLflow.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    results = run(args)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    print("\n" + serve_summary.format_summary(results))
    write_results(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
