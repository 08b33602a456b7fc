"""Adaptive server-side batching: concurrent inference requests share one ONNX Runtime call, as in
MLServer's adaptive batching and Triton's dynamic batcher.

Greedy ("continuous") batching: a request that finds the model idle runs at once, so a lone client
waits for nothing. Requests that arrive while the model is busy queue up and run together as the next
batch as soon as it frees up. The batcher never sleeps waiting for a batch to fill; it only takes one
more turn of the event loop as long as new requests keep joining, and stops once the batch is full or
its oldest request has waited `max_latency` (the latency budget).

Each request keeps its own rows of the result; if a combined call fails, its members are run again one
by one, so one member that breaks the model fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving import metrics
from serving.model import Float32Array

ModelCall = Callable[[Float32Array], Float32Array]


@dataclass(slots=True)
class _Pending:
    images: Float32Array
    future: asyncio.Future[Float32Array]
    queued: float  # time.perf_counter()


class Batcher:
    """Coalesces `submit` calls made on one event loop into model calls of up to `max_batch_size` images.

    Calls of more than `inline_max_images` images run on a dedicated thread (ONNX Runtime releases the
    GIL), so the event loop parses the next requests meanwhile; one thread, because batches run one at
    a time anyway. Smaller calls run on the loop itself, where they cost less than the thread hop.
    """

    def __init__(
        self, run: ModelCall, *, max_batch_size: int, max_latency: float, inline_max_images: int
    ) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency
        self.inline_max_images = inline_max_images
        self._executor: ThreadPoolExecutor | None = None
        self._queue: deque[_Pending] = deque()
        self._drainer: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, images: Float32Array) -> Float32Array:
        """The model's output rows for `images` ([N,28,28]), computed in whichever batch they join."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Float32Array] = loop.create_future()
        self._queue.append(_Pending(images, future, time.perf_counter()))
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain(), name="inference-batcher")
        return await future

    async def _drain(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._queue:
                await self._collect(batch)
                await self._run_batch(batch)
                batch.clear()
        except Exception as exc:
            # A fault of the batcher itself: every request it holds gets the error (a logged 500).
            for item in [*batch, *self._queue]:
                _fail(item, exc)
            self._queue.clear()
        finally:
            self._drainer = None
            # Only a cancelled drainer (the loop shutting down) leaves requests behind: their handlers
            # must not wait forever. Cancelling a resolved future does nothing.
            for item in batch:
                item.future.cancel()
            while self._queue:
                self._queue.popleft().future.cancel()

    async def _collect(self, batch: list[_Pending]) -> None:
        size = 0
        deadline = self._queue[0].queued + self.max_latency
        while True:
            while self._queue:
                item = self._queue[0]
                if item.future.done():  # its client went away
                    self._queue.popleft()
                    continue
                count = len(item.images)
                if batch and size + count > self.max_batch_size:
                    return
                batch.append(self._queue.popleft())
                size += count
            if not batch or size >= self.max_batch_size or time.perf_counter() >= deadline:
                return
            # One turn of the loop lets handlers whose bytes have already arrived join this batch; when
            # none did, nothing else is coming soon and waiting longer would only add latency.
            await asyncio.sleep(0)
            if not self._queue:
                return

    async def _run_batch(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
        started = time.perf_counter()
        metrics.observe_batch(len(images), [started - item.queued for item in batch])
        try:
            output = await self._call(images)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            for item in batch:
                try:
                    _resolve(item, await self._call(item.images))
                except Exception as alone:
                    _fail(item, alone)
            return
        offset = 0
        for item in batch:
            count = len(item.images)
            _resolve(item, output[offset : offset + count])
            offset += count

    async def _call(self, images: Float32Array) -> Float32Array:
        if len(images) <= self.inline_max_images:
            return self._run(images)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="onnx-batch")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, images)


def _resolve(item: _Pending, rows: Float32Array) -> None:
    if not item.future.done():
        item.future.set_result(rows)


def _fail(item: _Pending, exc: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(exc)


__all__ = ["Batcher", "ModelCall"]
