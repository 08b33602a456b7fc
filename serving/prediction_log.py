"""The prediction log's writer in serving: every served prediction (or a sample,
SERVING_PREDICTION_LOG_SAMPLE) goes to the `prediction_log` store, off the request path.

The data plane calls `PredictionLog.record` at the end of each prediction (contract C). It only appends
the event to a bounded in-memory queue (SERVING_PREDICTION_LOG_QUEUE_SIZE records): no encoding, no I/O,
no waiting. When the queue is full the records are dropped and counted, so a slow or unreachable database
never slows a prediction, let alone fails one. A background task (`run`) takes batches of up to
SERVING_PREDICTION_LOG_BATCH_RECORDS (500) records, every SERVING_PREDICTION_LOG_FLUSH_SECONDS (0.5) or
as soon as a batch is full, and writes each in a worker thread in one transaction. A failed write keeps
its records (they still count against the queue's bound) and is retried with capped exponential backoff;
records that arrive meanwhile and do not fit are dropped and counted. Records a database refuses for what
they are (not for being unreachable) are written one by one so that one bad row cannot block the rest;
the rows still refused are counted as failed.

On shutdown (`close`, from the app's lifespan: uvicorn has stopped accepting connections and finished the
requests in flight by then) everything still queued is written, for at most
SERVING_GRACEFUL_SHUTDOWN_SECONDS; whatever the database still refuses then is counted as failed. So a
SIGTERM with a healthy database loses nothing.

Ids: a `/predict` (or WebSocket, or `/explain`) prediction is logged under its request id (the
`X-Request-ID` the client got), the images of a batch-shaped request (`/predict/batch`, `/v2` infer,
gRPC) under `<request id>-<i>`. A client reusing an id keeps its first row.

The hourly purge deletes rows older than SERVING_PREDICTION_LOG_RETENTION_DAYS (0 keeps everything).
This module imports SQLAlchemy: `serving.app` imports it only when SERVING_PREDICTION_LOG_URL is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
import numpy as np
import sqlalchemy as sa

from prediction_log import FeedbackResult, PredictionRow, PredictionStore, encode_rows, is_unavailable
from serving import metrics
from serving.dataplane import PredictionEvent
from serving.model import Float32Array

log = logging.getLogger("serving.prediction_log")

BATCH_RECORDS = 500  # the default of SERVING_PREDICTION_LOG_BATCH_RECORDS
FLUSH_INTERVAL_SECONDS = 0.5  # the default of SERVING_PREDICTION_LOG_FLUSH_SECONDS
RETRY_MAX_SECONDS = 30.0
PURGE_INTERVAL_SECONDS = 3600.0
# Endpoints whose requests carry one image by definition: it is logged under the bare request id. The
# images of batch-shaped requests (/predict/batch, /v2 infer, gRPC) are `<id>-<i>`, even a batch of one,
# so a client can tell an image's id from the endpoint it called.
SINGLE_IMAGE_ENDPOINTS = frozenset({"predict", "ws_predict", "explain"})
# A feedback request for an id this process does not know may be for a prediction another worker or
# replica answered and has not flushed yet: it is looked up again after two flush intervals (at most).
FEEDBACK_RECHECK_MAX_SECONDS = 3.0


class PredictionLogUnavailableError(RuntimeError):
    """The database cannot be reached (or refused the query) right now."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """A prediction event as queued: its first `len(images)` images (a partly admitted batch keeps
    only those), and whether its one image goes under the bare request id."""

    request_id: str
    bare: bool
    source: str
    version: str
    images: Float32Array
    probabilities: Float32Array
    at: float  # time.time() when it was served

    def ids(self) -> list[str]:
        if self.bare:
            return [self.request_id]
        return [f"{self.request_id}-{i}" for i in range(len(self.images))]

    def holds(self, request_id: str) -> bool:
        if self.bare:
            return request_id == self.request_id
        base, _, index = request_id.rpartition("-")
        return base == self.request_id and index.isdigit() and int(index) < len(self.images)


class PredictionLog:
    """The writer (see the module docstring): `record` is the data plane's listener, `run` the
    background task, `close` the final flush, `add_feedback` the `/feedback` route's backend."""

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        sample: float = 1.0,
        queue_size: int = 10_000,
        retention_days: float = 30.0,
        shutdown_seconds: float = 25.0,
        flush_seconds: float = FLUSH_INTERVAL_SECONDS,
        batch_records: int = BATCH_RECORDS,
    ) -> None:
        self.store = PredictionStore(url)
        self.model_name = model_name
        self.sample = sample
        self.capacity = queue_size
        self.retention = timedelta(days=retention_days) if retention_days > 0 else None
        self.shutdown_seconds = shutdown_seconds
        self.flush_seconds = flush_seconds
        self.batch_records = batch_records
        self._lock = threading.Lock()
        self._pending: deque[_Entry] = deque()
        self._pending_records = 0
        self._in_flight: list[_Entry] = []
        self._size = 0  # records queued or being written: what the bound applies to
        self._schema_ready = False
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._wake_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._written = metrics.prediction_log_records.labels(outcome="written")
        self._dropped = metrics.prediction_log_records.labels(outcome="dropped")
        self._failed = metrics.prediction_log_records.labels(outcome="failed")

    @property
    def queued(self) -> int:
        """Records not written yet (queued or being written)."""
        return self._size

    # --- the listener: on the request path ---------------------------------------------------------

    def record(self, event: PredictionEvent) -> None:
        """Queues `event`'s images, or drops and counts what does not fit. Never blocks, never does I/O."""
        if self.sample < 1.0 and random.random() >= self.sample:  # noqa: S311 - sampling, not security
            return
        count = len(event.images)
        with self._lock:
            admitted = min(count, self.capacity - self._size)
            if admitted > 0:
                images, probabilities = event.images, event.probabilities
                if admitted < count:
                    images, probabilities = images[:admitted], probabilities[:admitted]
                bare = count == 1 and event.endpoint in SINGLE_IMAGE_ENDPOINTS
                self._pending.append(
                    _Entry(
                        event.request_id,
                        bare,
                        event.endpoint,
                        event.version,
                        images,
                        probabilities,
                        time.time(),
                    )
                )
                self._size += admitted
                self._pending_records += admitted
            wake = self._pending_records >= self.batch_records and not self._wake_requested
            if wake:
                self._wake_requested = True
        if admitted < count:
            self._dropped.inc(count - max(admitted, 0))
        if wake and self._loop is not None:
            # The listener may run in a worker thread (large batches are predicted there).
            self._loop.call_soon_threadsafe(self._wake.set)

    # --- the background task -------------------------------------------------------------------------

    async def run(self) -> None:
        """Flushes until cancelled: a batch as soon as one is full, else every `flush_seconds`; after a
        failure, again after a backoff. Purges old rows hourly."""
        self._loop = asyncio.get_running_loop()
        delay = self.flush_seconds
        failures = 0
        next_purge = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            self._wake.clear()
            with self._lock:
                self._wake_requested = False
            try:
                error = await self.flush()
            except Exception as exc:
                # Not the database (flush returns those): a bug. The writer must outlive it.
                log.exception("prediction log flush crashed")
                error = exc
            metrics.prediction_log_queue_depth.set(self._size)
            if error is None:
                if failures:
                    log.info("prediction log writes recovered after %d failed attempts", failures)
                failures, delay = 0, self.flush_seconds
            else:
                failures += 1
                delay = min(RETRY_MAX_SECONDS, FLUSH_INTERVAL_SECONDS * 2**failures)
                # Every failure at first, then one in ten: a database down for an hour is one story.
                if failures <= 3 or failures % 10 == 0:
                    log.warning(
                        "prediction log write failed (%d in a row; %d records kept, retrying in %.1fs): %s",
                        failures,
                        self._size,
                        delay,
                        error,
                        extra={"prediction_log": self.store.display_url},
                    )
            if self.retention is not None and time.monotonic() >= next_purge:
                next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
                await self._purge(self.retention)

    async def flush(self) -> BaseException | None:
        """Writes everything queued now, batch by batch; stops at the first failed batch (kept for the
        next attempt) and returns its error."""
        async with self._flushing:
            while True:
                batch = self._take()
                if not batch:
                    return None
                try:
                    written, failed = await anyio.to_thread.run_sync(self._write, batch)
                except BaseException as exc:
                    self._put_back(batch)
                    if isinstance(exc, Exception):
                        return exc
                    raise
                with self._lock:
                    self._in_flight = []
                    self._size -= written + failed
                if written:
                    self._written.inc(written)
                if failed:
                    self._failed.inc(failed)

    def _take(self) -> list[_Entry]:
        with self._lock:
            batch: list[_Entry] = []
            records = 0
            while self._pending and records < self.batch_records:
                entry = self._pending.popleft()
                batch.append(entry)
                records += len(entry.images)
            self._pending_records -= records
            self._in_flight = batch
        return batch

    def _put_back(self, batch: list[_Entry]) -> None:
        with self._lock:
            # Still counted in _size: what waited longest stays first in line.
            self._pending.extendleft(reversed(batch))
            self._pending_records += sum(len(entry.images) for entry in batch)
            self._in_flight = []

    def _rows(self, batch: list[_Entry]) -> list[PredictionRow]:
        ids: list[str] = []
        times: list[datetime] = []
        versions: list[str] = []
        sources: list[str] = []
        for entry in batch:
            n = len(entry.images)
            ids += entry.ids()
            times += [datetime.fromtimestamp(entry.at, UTC)] * n
            versions += [entry.version] * n
            sources += [entry.source] * n
        images = np.concatenate([entry.images for entry in batch])
        probabilities = np.concatenate([entry.probabilities for entry in batch])
        return encode_rows(
            ids,
            created_at=times,
            model_name=self.model_name,
            model_versions=versions,
            sources=sources,
            images=images,
            probabilities=probabilities,
        )

    def _write(self, batch: list[_Entry]) -> tuple[int, int]:
        """Blocking: (records written, records refused for good). Raises when the database is
        unavailable, for the caller to keep the batch."""
        if not self._schema_ready:
            self.store.create_schema()
            self._schema_ready = True
        try:
            self.store.insert_many(self._rows(batch))
            return sum(len(entry.images) for entry in batch), 0
        except Exception as exc:
            if is_unavailable(exc):
                # The table may be what went away (a recreated database): check it again next time.
                self._schema_ready = False
                raise
            log.error("the prediction log refused a batch; writing its records one by one: %s", exc)
        # A table dropped or a database restored under us refuses everything: make sure the table is
        # there before blaming the rows.
        self.store.create_schema()
        written = failed = 0
        for entry in batch:
            n = len(entry.images)
            try:
                self.store.insert_many(self._rows([entry]))
                written += n
            except Exception as exc:
                if is_unavailable(exc):
                    raise
                failed += n
                log.error("the prediction log refused request %s: %s", entry.request_id, exc)
        return written, failed

    async def _purge(self, retention: timedelta) -> None:
        cutoff = datetime.now(UTC) - retention
        try:
            deleted = await anyio.to_thread.run_sync(self.store.purge, cutoff)
        except Exception as exc:
            log.warning("prediction log purge failed: %s", exc)
            return
        if deleted:
            log.info("purged %d prediction log rows older than %s", deleted, cutoff.isoformat())

    def start(self) -> None:
        """Starts the background writer (`run`) on the running event loop."""
        self._task = asyncio.create_task(self.run(), name="prediction-log")

    async def stop(self) -> None:
        """Stops the background writer, then flushes what is left (`close`)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.close()

    async def close(self) -> None:
        """The final flush, bounded by `shutdown_seconds`; what is still unwritten then counts as
        failed."""
        deadline = time.monotonic() + self.shutdown_seconds
        queued = self._size
        delay = 0.1
        error: BaseException | None = None
        while True:
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                error = await self.flush()
            if self._size == 0 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
        lost = self._size
        if lost:
            self._failed.inc(lost)
            log.error(
                "prediction log: %d records could not be written before shutdown: %s",
                lost,
                error or "out of time",
                extra={"prediction_log": self.store.display_url},
            )
        else:
            log.info(
                "prediction log flushed at shutdown",
                extra={"prediction_log": self.store.display_url, "records": queued},
            )
        self.store.close()

    # --- feedback ------------------------------------------------------------------------------------

    def holds(self, request_id: str) -> bool:
        """Whether `request_id` is queued or being written by this process."""
        with self._lock:
            entries = [*self._in_flight, *self._pending]
        return any(entry.holds(request_id) for entry in entries)

    async def add_feedback(self, request_id: str, label: int) -> FeedbackResult:
        """Labels a logged prediction (see `PredictionStore.add_feedback`). A prediction answered
        moments ago may still be queued here (flushed first), or in another worker's or replica's
        queue (looked up again after their next flush)."""
        result = await self._label(request_id, label)
        if result is not FeedbackResult.UNKNOWN:
            return result
        if self.holds(request_id):
            error = await self.flush()
            if error is not None:
                raise PredictionLogUnavailableError(str(error)) from error
        else:
            await asyncio.sleep(min(FEEDBACK_RECHECK_MAX_SECONDS, 2 * self.flush_seconds + 0.2))
        return await self._label(request_id, label)

    async def _label(self, request_id: str, label: int) -> FeedbackResult:
        try:
            if not self._schema_ready:
                await anyio.to_thread.run_sync(self.store.create_schema)
                self._schema_ready = True
            return await anyio.to_thread.run_sync(self.store.add_feedback, request_id, label)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("prediction log feedback failed: %s", exc)
            raise PredictionLogUnavailableError(str(exc).splitlines()[0]) from exc


__all__ = ["PredictionLog", "PredictionLogUnavailableError"]
