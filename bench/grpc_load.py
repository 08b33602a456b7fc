"""The fallback gRPC load generator of `make bench-serve`, used where ghz cannot be built: closed-loop
`ModelInfer` calls over grpc.aio from several processes (one Python event loop cannot keep up with a
fast server on its own), each with its share of the concurrency on its own channel.

The request is a serialized `inference.ModelInferRequest`, sent as raw bytes (no protobuf work in the
loop); every call that returns, OK or not, has its latency recorded, and calls in flight when the
duration ends are waited for, not dropped. Prints one JSON row on stdout, in bench.loadgen's shape.

    python -m bench.grpc_load --target 127.0.0.1:8081 --request req.bin --concurrency 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"
PROCESSES = 2


async def _worker(
    target: str, request: bytes, tasks: int, *, start_at: float, seconds: float, call_timeout: float
) -> dict[str, Any]:
    import grpc

    latencies: list[int] = []
    statuses: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out
        await call(request, timeout=call_timeout)  # connected before the clock starts
        # Every process starts at the same wall-clock instant, so their rates add up.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        started = time.monotonic()
        deadline = started + seconds

        async def loop() -> None:
            while time.monotonic() < deadline:
                started = time.perf_counter_ns()
                try:
                    await call(request, timeout=call_timeout)
                    statuses["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    statuses[error.code().name] += 1
                latencies.append(time.perf_counter_ns() - started)

        await asyncio.gather(*(loop() for _ in range(tasks)))
        elapsed = time.monotonic() - started
    return {"latencies_ns": latencies, "statuses": dict(statuses), "seconds": elapsed}


def merge(parts: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    latencies = np.asarray([x for part in parts for x in part["latencies_ns"]], dtype=np.int64)
    statuses: collections.Counter[str] = collections.Counter()
    for part in parts:
        statuses.update(part["statuses"])
    seconds = max((part["seconds"] for part in parts), default=0.0)
    requests = int(latencies.size)
    ok = statuses.get("OK", 0)
    timeouts = statuses.get("DEADLINE_EXCEEDED", 0)

    def ms(value: float) -> float | None:
        return round(float(value) / 1e6, 3) if requests else None

    def percentile(q: float) -> float | None:
        return ms(float(np.percentile(latencies, q))) if requests else None

    return {
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests": requests,
        "ok": ok,
        "rps": round(ok / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": percentile(50),
        "p90_ms": percentile(90),
        "p99_ms": percentile(99),
        "max_ms": ms(latencies.max()) if requests else None,
        "mean_ms": ms(latencies.mean()) if requests else None,
        "errors": requests - ok - timeouts,
        "error_detail": ", ".join(f"{k} {v}" for k, v in statuses.items() if k != "OK"),
        "timeouts": timeouts,
        "loadgen": f"grpc.aio x{min(PROCESSES, concurrency)} processes",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--request", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--worker-tasks", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    request = args.request.read_bytes()
    if args.worker_tasks is not None:
        part = asyncio.run(
            _worker(
                args.target,
                request,
                args.worker_tasks,
                start_at=args.start_at,
                seconds=args.seconds,
                call_timeout=args.timeout,
            )
        )
        print(json.dumps(part))
        return 0
    processes = min(PROCESSES, args.concurrency)
    # Long enough for every process to import grpc and connect on a busy two-core machine.
    start_at = time.time() + 3.0
    shares = [args.concurrency // processes + (i < args.concurrency % processes) for i in range(processes)]
    command = [
        sys.executable, "-m", "bench.grpc_load", "--target", args.target,
        "--request", str(args.request), "--concurrency", str(args.concurrency),
        "--seconds", str(args.seconds), "--timeout", str(args.timeout), "--start-at", repr(start_at),
    ]  # fmt: skip
    children = [
        subprocess.Popen([*command, "--worker-tasks", str(share)], stdout=subprocess.PIPE, text=True)
        for share in shares
    ]
    parts = []
    for child in children:
        out, _ = child.communicate(timeout=args.seconds + args.timeout + 60)
        if child.returncode != 0:
            print(f"a load process failed with {child.returncode}", file=sys.stderr)
            return 1
        parts.append(json.loads(out))
    print(json.dumps(merge(parts, args.concurrency)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
