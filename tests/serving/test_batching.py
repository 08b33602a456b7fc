"""Adaptive batching: the batcher on its own (asyncio, a fake model), then a real server with
SERVING_BATCHING_ENABLED under concurrent load, its answers checked against the same requests sent
one at a time."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from serving.batching import Batcher
from serving.model import IMAGE_SIDE, Float32Array
from testing.serving import ServedModel, ServingProcess
from tests.serving.payloads import CHAMPION, Mnist

# --- the batcher alone ---------------------------------------------------------------------------


class FakeModel:
    """Output row i is [sum of image i, n of the call]; records every call's size. `gate` holds calls
    until set, so a test can keep the model busy while requests queue up."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, images: Float32Array) -> Float32Array:
        self.calls.append(len(images))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never released the model"
        if bool(np.isnan(images).any()):
            raise ValueError("NaN in the input")
        sums = images.reshape(len(images), -1).sum(axis=1)
        return np.stack([sums, np.full_like(sums, len(images))], axis=1).astype(np.float32)


async def until_running(model: FakeModel) -> None:
    assert await asyncio.to_thread(model.entered.wait, 10), "the model never started"


def image(value: float, count: int = 1) -> Float32Array:
    return np.full((count, IMAGE_SIDE, IMAGE_SIDE), value, np.float32)


def batcher(model: FakeModel, *, max_batch_size: int = 32, threaded: bool = False) -> Batcher:
    return Batcher(
        model, max_batch_size=max_batch_size, max_latency=0.05, inline_max_images=0 if threaded else 1000
    )


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_a_lone_request_runs_at_once_alone() -> None:
    model = FakeModel()

    async def main() -> Float32Array:
        return await batcher(model).submit(image(1.0))

    calls_before = metric("mnist_inference_batch_size_count")
    ones_before = REGISTRY.get_sample_value("mnist_inference_batch_size_bucket", {"le": "1.0"}) or 0.0
    started = time.perf_counter()
    rows = asyncio.run(main())
    assert time.perf_counter() - started < 0.05, "a lone request waited for a batch that never came"
    assert model.calls == [1]
    assert rows.tolist() == [[784.0, 1.0]]
    assert metric("mnist_inference_batch_size_count") == calls_before + 1
    assert REGISTRY.get_sample_value("mnist_inference_batch_size_bucket", {"le": "1.0"}) == ones_before + 1


def test_requests_that_arrive_together_share_one_call() -> None:
    model = FakeModel()

    async def main() -> list[Float32Array]:
        shared = batcher(model)
        return await asyncio.gather(*(shared.submit(image(float(i))) for i in range(8)))

    results = asyncio.run(main())
    assert model.calls == [8]
    # Each request gets its own row back, in its own order, not its neighbours'.
    assert [r.tolist() for r in results] == [[[784.0 * i, 8.0]] for i in range(8)]


def test_requests_queued_while_the_model_is_busy_run_as_the_next_batch() -> None:
    gate = threading.Event()
    model = FakeModel(gate)

    async def main() -> list[Float32Array]:
        shared = batcher(model, max_batch_size=4, threaded=True)
        first = asyncio.ensure_future(shared.submit(image(1.0)))
        await until_running(model)
        # The model is busy with `first`: these queue, then run four at a time, in arrival order.
        rest = [asyncio.ensure_future(shared.submit(image(float(i)))) for i in range(2, 8)]
        await asyncio.sleep(0.01)
        assert shared.queued == 6
        gate.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(main())
    assert model.calls == [1, 4, 2]
    assert [r[0, 0] for r in results] == [784.0 * i for i in (1, 2, 3, 4, 5, 6, 7)]
    assert [r[0, 1] for r in results] == [1.0, 4.0, 4.0, 4.0, 4.0, 2.0, 2.0]


def test_a_request_larger_than_the_batch_limit_runs_alone() -> None:
    model = FakeModel()

    async def main() -> tuple[Float32Array, Float32Array]:
        shared = batcher(model, max_batch_size=4)
        return await asyncio.gather(shared.submit(image(1.0)), shared.submit(image(2.0, 10)))

    small, large = asyncio.run(main())
    assert model.calls == [1, 10]
    assert small.shape == (1, 2) and large.shape == (10, 2)


def test_a_member_that_breaks_the_model_fails_alone() -> None:
    model = FakeModel()

    async def main() -> list[Float32Array | BaseException]:
        shared = batcher(model)
        inputs = [image(1.0), image(float("nan")), image(3.0)]
        return await asyncio.gather(*(shared.submit(x) for x in inputs), return_exceptions=True)

    good, bad, other = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert isinstance(good, np.ndarray) and isinstance(other, np.ndarray)
    assert good.tolist() == [[784.0, 1.0]] and other.tolist() == [[3 * 784.0, 1.0]]
    # The combined call failed, then each member ran on its own.
    assert model.calls == [3, 1, 1, 1]


def test_a_request_whose_client_left_is_not_run() -> None:
    gate = threading.Event()
    model = FakeModel(gate)

    async def main() -> Float32Array:
        shared = batcher(model, threaded=True)
        first = asyncio.ensure_future(shared.submit(image(1.0)))
        await until_running(model)
        gone = asyncio.ensure_future(shared.submit(image(2.0)))
        kept = asyncio.ensure_future(shared.submit(image(3.0)))
        await asyncio.sleep(0.01)
        gone.cancel()
        gate.set()
        await first
        return await kept

    assert asyncio.run(main()).tolist() == [[3 * 784.0, 1.0]]
    assert model.calls == [1, 1]


def test_a_fault_in_the_batcher_fails_its_requests_instead_of_hanging_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(images: int, waits: list[float]) -> None:
        raise RuntimeError("metrics backend broke")

    monkeypatch.setattr("serving.batching.metrics.observe_batch", broken)

    async def main() -> list[Float32Array | BaseException]:
        shared = batcher(FakeModel())
        calls = (shared.submit(image(1.0)) for _ in range(3))
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)

    results = asyncio.run(main())
    assert [str(r) for r in results] == ["metrics backend broke"] * 3


def test_stopping_the_batcher_releases_every_waiter() -> None:
    gate = threading.Event()
    model = FakeModel(gate)

    async def main() -> tuple[Float32Array | BaseException, Float32Array | BaseException]:
        shared = batcher(model, threaded=True)
        running = asyncio.ensure_future(shared.submit(image(1.0)))
        await until_running(model)
        queued = asyncio.ensure_future(shared.submit(image(2.0)))
        await asyncio.sleep(0.01)
        assert shared._drainer is not None
        shared._drainer.cancel()
        try:
            return await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 5)
        finally:
            gate.set()

    assert [type(r) for r in asyncio.run(main())] == [asyncio.CancelledError] * 2


def test_queue_wait_is_recorded_per_request() -> None:
    gate = threading.Event()
    model = FakeModel(gate)

    async def main() -> None:
        shared = batcher(model, threaded=True)
        first = asyncio.ensure_future(shared.submit(image(1.0)))
        await until_running(model)
        rest = [asyncio.ensure_future(shared.submit(image(2.0))) for _ in range(3)]
        await asyncio.sleep(0.03)
        gate.set()
        await asyncio.gather(first, *rest)

    count, total = metric("mnist_inference_queue_seconds_count"), metric("mnist_inference_queue_seconds_sum")
    asyncio.run(main())
    assert metric("mnist_inference_queue_seconds_count") == count + 4
    # Three requests waited out the ~30 ms the model was held; the first waited for nothing.
    assert metric("mnist_inference_queue_seconds_sum") - total >= 3 * 0.025


# --- a real server with batching on --------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_server(
    served_model: ServedModel, serving_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingProcess]:
    server = ServingProcess.start(
        tmp_path_factory.mktemp("serving-batching"),
        tracking_uri=served_model.tracking_uri,
        model_uri=f"models:/{served_model.name}@{CHAMPION}",
        cache_dir=serving_cache_dir,
        env={
            "SERVING_BATCHING_ENABLED": "true",
            "SERVING_BATCHING_MAX_BATCH_SIZE": "16",
            # The session's main server may hold the default gRPC port.
            "SERVING_GRPC_PORT": "0",
        },
    )
    yield server
    server.stop()
    assert "unhandled error" not in server.log_text(), server.log_tail(200)


@pytest.fixture(scope="module")
def input_name(batching_server: ServingProcess, served_model: ServedModel) -> str:
    metadata = httpx.get(f"{batching_server.url}/v2/models/{served_model.name}", timeout=10).json()
    name: str = metadata["inputs"][0]["name"]
    return name


def batch_sizes(url: str) -> dict[float, float]:
    """Cumulative bucket counts of mnist_inference_batch_size, by upper bound."""
    text = httpx.get(url + "/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "mnist_inference_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets[float(sample.labels["le"])] = sample.value
    assert buckets, "mnist_inference_batch_size is not exported"
    return buckets


def burst(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """All requests at once, each on its own connection, so they reach the server together."""

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))

    return asyncio.run(main())


def predict(pixels: np.ndarray[Any, Any]) -> tuple[str, dict[str, Any]]:
    return "/predict", {"pixels": pixels.tolist()}


def v2(name: str, input_name: str, pixels: np.ndarray[Any, Any]) -> tuple[str, dict[str, Any]]:
    data = (pixels.astype(np.float32) / 255).reshape(-1).tolist()
    body = {"inputs": [{"name": input_name, "shape": [1, 784], "datatype": "FP32", "data": data}]}
    return f"/v2/models/{name}/infer", body


def until_batched(url: str, make: Callable[[], list[tuple[str, dict[str, Any]]]]) -> list[httpx.Response]:
    """Bursts until one produced a batch of more than one image; the scheduler decides whether a
    single burst overlaps, a few in a row always do."""
    for _ in range(10):
        before = batch_sizes(url)
        responses = burst(url, make())
        after = batch_sizes(url)
        inf = float("inf")
        if (after[inf] - after[1.0]) - (before[inf] - before[1.0]) > 0:
            return responses
    raise AssertionError("ten bursts of concurrent requests never produced a batch of more than one image")


def test_concurrent_requests_are_batched_and_answered_as_if_alone(
    batching_server: ServingProcess,
    served_model: ServedModel,
    serving_mnist_test: Mnist,
    input_name: str,
) -> None:
    images = serving_mnist_test[0][:32]
    requests = [predict(x) for x in images[:24]] + [v2(served_model.name, input_name, x) for x in images[24:]]
    responses = until_batched(batching_server.url, lambda: requests)

    assert [r.status_code for r in responses] == [200] * len(requests), [r.text for r in responses]
    # The reference: the same requests one at a time, so each runs alone.
    before = batch_sizes(batching_server.url)
    with httpx.Client(base_url=batching_server.url, timeout=30) as alone:
        reference = [alone.post(path, json=body).json() for path, body in requests]
    after = batch_sizes(batching_server.url)
    assert after[1.0] - before[1.0] == after[float("inf")] - before[float("inf")] == len(requests)
    for response, expected in zip(responses[:24], reference[:24], strict=True):
        got = response.json()
        assert got["digit"] == expected["digit"]
        assert got["inverted"] == expected["inverted"]
        np.testing.assert_allclose(got["probabilities"], expected["probabilities"], rtol=1e-4, atol=1e-6)
    for response, expected in zip(responses[24:], reference[24:], strict=True):
        got_outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
        expected_outputs = {o["name"]: o["data"] for o in expected["outputs"]}
        assert got_outputs.keys() == expected_outputs.keys()
        for name, data in expected_outputs.items():
            np.testing.assert_allclose(got_outputs[name], data, rtol=1e-4, atol=1e-6)
    request_ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(request_ids)) == len(requests)
    assert [r.json()["request_id"] for r in responses[:24]] == request_ids[:24]


def test_a_lone_request_runs_with_batch_size_one(
    batching_server: ServingProcess, serving_mnist_test: Mnist
) -> None:
    before = batch_sizes(batching_server.url)
    response = httpx.post(
        batching_server.url + "/predict", json={"pixels": serving_mnist_test[0][0].tolist()}, timeout=30
    )
    assert response.status_code == 200, response.text
    after = batch_sizes(batching_server.url)
    assert after[float("inf")] == before[float("inf")] + 1
    assert after[1.0] == before[1.0] + 1


def test_a_bad_request_in_a_burst_fails_alone(
    batching_server: ServingProcess, served_model: ServedModel, serving_mnist_test: Mnist, input_name: str
) -> None:
    images = serving_mnist_test[0][:16]
    bad_pixels = images[0].astype(np.float64)
    bad_pixels[3, 3] = 300.0
    wrong_shape = v2(served_model.name, input_name, images[1])
    wrong_shape[1]["inputs"][0]["shape"] = [1, 28, 27]

    def make() -> list[tuple[str, dict[str, Any]]]:
        return [
            *[predict(x) for x in images[2:10]],
            predict(bad_pixels),
            *[v2(served_model.name, input_name, x) for x in images[10:]],
            wrong_shape,
        ]

    responses = until_batched(batching_server.url, make)
    statuses = [r.status_code for r in responses]
    assert statuses[8] == 422 and statuses[-1] == 422, [r.text for r in responses]
    assert statuses[:8] + statuses[9:-1] == [200] * 14
    assert "less than or equal to 255" in responses[8].text
    assert "[1, 28, 27]" in responses[-1].text
