"""The `predictions` table and the one class that reads and writes it, `PredictionStore`.

A row is one image a model answered for: its request id (the primary key: a single-image request's
`X-Request-ID`, a batch's items `<id>-<i>`), when (UTC), which model version, which endpoint, the
28x28 input as the model saw it (784 bytes, round(x*255)), the ten probabilities (40 bytes of
little-endian float32), the predicted digit and its probability, and, once someone says what the digit
really was, its label and when it was given.

Why bytes rather than a column per pixel or JSON: a window of 10,000 inputs is 7.8 MB read in one
query and turned into one numpy array without parsing anything, and a row stays under 1 KB on disk.
uint8 loses nothing the drift tests or a retraining can see (MNIST itself is uint8).

Times are stored as UTC: `timestamptz` on PostgreSQL, naive UTC on SQLite (which has no time zones;
`UtcDateTime` converts both ways, so callers only ever see aware UTC datetimes and must pass them).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Engine

IMAGE_SIDE = 28
NUM_CLASSES = 10
IMAGE_BYTES = IMAGE_SIDE * IMAGE_SIDE
PROBABILITY_BYTES = NUM_CLASSES * 4
# Request ids are at most 128 characters (serving's X-Request-ID rule); a batch's items add "-<i>",
# up to 4 digits at the largest batch serving accepts.
REQUEST_ID_MAX = 136

UInt8Array = npt.NDArray[np.uint8]
Float32Array = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the database does with time zones."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the prediction log takes aware (UTC) datetimes")
        value = value.astimezone(UTC)
        # SQLite stores text and compares it as text: one zone, no offset suffix, keeps order right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(REQUEST_ID_MAX), primary_key=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("model_name", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("image", sa.LargeBinary(), nullable=False),
    sa.Column("probabilities", sa.LargeBinary(), nullable=False),
    sa.Column("predicted", sa.SmallInteger(), nullable=False),
    sa.Column("confidence", sa.Float(), nullable=False),
    sa.Column("label", sa.SmallInteger(), nullable=True),
    sa.Column("labelled_at", UtcDateTime(), nullable=True),
    # Time windows (drift, retention) scan created_at; the retraining trigger counts by labelled_at.
    sa.Index("ix_predictions_created_at", "created_at"),
    sa.Index("ix_predictions_labelled_at", "labelled_at"),
    sa.CheckConstraint("predicted BETWEEN 0 AND 9", name="ck_predictions_predicted"),
    sa.CheckConstraint("label IS NULL OR label BETWEEN 0 AND 9", name="ck_predictions_label"),
)


_SQLITE_INSERT = (
    "INSERT OR IGNORE INTO predictions (request_id, created_at, model_name, model_version, source, "
    "image, probabilities, predicted, confidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLAlchemy's storage format for DATETIME on SQLite: fixed width, so text order is time order.
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


class FeedbackResult(StrEnum):
    CREATED = "created"  # the label is recorded
    UNCHANGED = "unchanged"  # the same label was already recorded: nothing to do
    CONFLICT = "conflict"  # another label is already recorded; labels are never overwritten
    UNKNOWN = "unknown"  # no such request id in the log


@dataclass(frozen=True, slots=True)
class PredictionRow:
    """One row to insert, already encoded (see `encode_batch`)."""

    request_id: str
    created_at: datetime
    model_name: str
    model_version: str
    source: str
    image: bytes  # IMAGE_BYTES of uint8
    probabilities: bytes  # NUM_CLASSES little-endian float32
    predicted: int
    confidence: float


@dataclass(frozen=True, slots=True)
class LoggedPrediction:
    """One row as read back, decoded."""

    request_id: str
    created_at: datetime
    model_name: str
    model_version: str
    source: str
    image: UInt8Array  # [28,28]
    probabilities: Float32Array  # [10]
    predicted: int
    confidence: float
    label: int | None
    labelled_at: datetime | None


@dataclass(frozen=True)
class LoggedWindow:
    """The inputs logged in a time window, oldest first."""

    images: UInt8Array  # [N,28,28]
    probabilities: Float32Array  # [N,10]
    versions: list[str]
    created_at: list[datetime]
    request_ids: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.versions)


class LabelledSet(NamedTuple):
    """The labelled examples, in request-id order (a stable order, so equal sets digest equally)."""

    images: UInt8Array  # [N,28,28]
    labels: Int64Array  # [N]
    request_ids: list[str]


def encode_images(images: npt.NDArray[np.floating[Any]]) -> UInt8Array:
    """[N,28,28] floats in 0..1 -> uint8 round(x*255), as MNIST stores them."""
    scaled = np.rint(np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255.0)
    encoded: UInt8Array = scaled.astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    return encoded


def encode_rows(
    request_ids: Sequence[str],
    *,
    created_at: Sequence[datetime],
    model_name: str,
    model_versions: Sequence[str],
    sources: Sequence[str],
    images: npt.NDArray[np.floating[Any]],
    probabilities: npt.NDArray[np.floating[Any]],
) -> list[PredictionRow]:
    """Rows for N answered images, encoded in one numpy pass: `images` [N,28,28] in 0..1,
    `probabilities` [N,10], and per image its id, time, version and source."""
    count = len(request_ids)
    if images.shape != (count, IMAGE_SIDE, IMAGE_SIDE) or probabilities.shape != (count, NUM_CLASSES):
        raise ValueError(
            f"{count} request ids need images [{count},28,28] and probabilities [{count},10], "
            f"got {images.shape} and {probabilities.shape}"
        )
    if not len(created_at) == len(model_versions) == len(sources) == count:
        raise ValueError(f"{count} request ids need as many times, versions and sources")
    pixels = encode_images(images).reshape(count, IMAGE_BYTES)
    probs = np.ascontiguousarray(probabilities, dtype="<f4")
    predicted = probs.argmax(axis=1)
    confidence = probs[np.arange(count), predicted].tolist()
    predicted_digits = predicted.tolist()
    return [
        PredictionRow(
            request_id,
            created_at[i],
            model_name,
            model_versions[i],
            sources[i],
            pixels[i].tobytes(),
            probs[i].tobytes(),
            predicted_digits[i],
            confidence[i],
        )
        for i, request_id in enumerate(request_ids)
    ]


def encode_batch(
    request_ids: Sequence[str],
    *,
    created_at: datetime,
    model_name: str,
    model_version: str,
    source: str,
    images: npt.NDArray[np.floating[Any]],
    probabilities: npt.NDArray[np.floating[Any]],
) -> list[PredictionRow]:
    """Rows for one answered batch (one time, version and source for all)."""
    count = len(request_ids)
    return encode_rows(
        request_ids,
        created_at=[created_at] * count,
        model_name=model_name,
        model_versions=[model_version] * count,
        sources=[source] * count,
        images=images,
        probabilities=probabilities,
    )


def is_unavailable(error: BaseException) -> bool:
    """Whether the same query may succeed later: the database is unreachable, restarting or locked,
    not refusing the query for what it is. SQLite reports a missing table as an OperationalError too:
    that file is not a prediction log, and waiting will not make it one."""
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa.exc.OperationalError) and "no such table" in str(error.orig):
        return False
    return isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError | OSError)


def decode_images(blobs: Sequence[bytes]) -> UInt8Array:
    if not blobs:
        return np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), np.uint8)
    return np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), IMAGE_SIDE, IMAGE_SIDE).copy()


def decode_probabilities(blobs: Sequence[bytes]) -> Float32Array:
    if not blobs:
        return np.zeros((0, NUM_CLASSES), np.float32)
    raw = np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), NUM_CLASSES)
    return raw.astype(np.float32)


def _aware(value: datetime, what: str) -> datetime:
    """`value` if it is time-zone aware; a naive one would mean local time on one host and UTC on
    another, so it is refused before it reaches a query."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what}={value!r} is naive: the prediction log takes aware (UTC) datetimes")
    return value


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL: the drift job and the training read while serving writes, without blocking each other.
    # busy_timeout: a writer waits for another's lock instead of failing at once. synchronous=NORMAL
    # is durable across process exits (what a SIGTERM is); only an OS crash could lose the last commits.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


class PredictionStore:
    """The prediction log at a SQLAlchemy URL (`sqlite:///path.db`, `postgresql+psycopg2://...`).

    Thread-safe (SQLAlchemy's pool hands each call its own connection). Every method is blocking:
    serving calls them from worker threads."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.url = sa.make_url(url)
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        backend = self.url.get_backend_name()
        if backend == "postgresql" and self.url.get_driver_name() == "psycopg2":
            # An unreachable server fails a flush in seconds rather than the kernel's minutes.
            kwargs["connect_args"] = {"connect_timeout": max(1, round(connect_timeout))}
        self.engine: Engine = sa.create_engine(self.url, **kwargs)
        if backend == "sqlite":
            sa.event.listen(self.engine, "connect", _configure_sqlite)
        self.backend = backend

    @property
    def display_url(self) -> str:
        """The URL without its password, for logs and error messages."""
        return self.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def create_schema(self) -> None:
        """Creates the table and its indexes if they do not exist (idempotent; safe to race)."""
        database = self.url.database
        if self.backend == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except sa.exc.DatabaseError:
            # Two processes (serving workers, the drift job) starting together: both saw no table, one
            # created it first. Checking again settles it; a real problem fails the second time too.
            metadata.create_all(self.engine, checkfirst=True)

    # --- writes -------------------------------------------------------------------------------------

    def _insert(self) -> Any:
        # A client may reuse an X-Request-ID: the first row stays, the later ones are ignored rather
        # than failing the whole batch they came with.
        if self.backend == "postgresql":
            from sqlalchemy.dialects import postgresql

            return postgresql.insert(predictions).on_conflict_do_nothing(index_elements=["request_id"])
        if self.backend == "sqlite":
            from sqlalchemy.dialects import sqlite

            return sqlite.insert(predictions).on_conflict_do_nothing(index_elements=["request_id"])
        return predictions.insert()

    def insert_many(self, rows: Iterable[PredictionRow]) -> None:
        """Inserts `rows` in one transaction (one executemany); ids already logged are skipped."""
        if self.backend == "sqlite":
            self._insert_sqlite(rows)
            return
        params = [
            {
                "request_id": row.request_id,
                "created_at": row.created_at,
                "model_name": row.model_name,
                "model_version": row.model_version,
                "source": row.source,
                "image": row.image,
                "probabilities": row.probabilities,
                "predicted": row.predicted,
                "confidence": row.confidence,
            }
            for row in rows
        ]
        if not params:
            return
        with self.engine.begin() as conn:
            conn.execute(self._insert(), params)

    def _insert_sqlite(self, rows: Iterable[PredictionRow]) -> None:
        # sqlite3's own executemany on plain tuples: SQLAlchemy's per-row parameter processing would
        # cost twice the insert itself, and serving pays it for every prediction it logs. The time
        # is written as SQLAlchemy's SQLite DATETIME writes it (UtcDateTime reads it back).
        params = [
            (
                row.request_id,
                _aware(row.created_at, "created_at").astimezone(UTC).strftime(_SQLITE_TIME),
                row.model_name,
                row.model_version,
                row.source,
                row.image,
                row.probabilities,
                row.predicted,
                row.confidence,
            )
            for row in rows
        ]
        if params:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(_SQLITE_INSERT, params)

    def add_feedback(self, request_id: str, label: int, at: datetime | None = None) -> FeedbackResult:
        """Records the true digit of a logged prediction. A label is set once: the same label again is
        `unchanged`, a different one a `conflict` (the first answer stays; nothing is overwritten)."""
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"label {label} is not a digit 0-9")
        at = _aware(at, "at") if at is not None else datetime.now(UTC)
        table = predictions
        with self.engine.begin() as conn:
            # One conditional UPDATE: two concurrent labels for one id cannot both win.
            updated = conn.execute(
                table.update()
                .where(table.c.request_id == request_id, table.c.label.is_(None))
                .values(label=label, labelled_at=at)
            )
            if updated.rowcount == 1:
                return FeedbackResult.CREATED
            existing = conn.execute(
                sa.select(table.c.label).where(table.c.request_id == request_id)
            ).one_or_none()
        if existing is None:
            return FeedbackResult.UNKNOWN
        return FeedbackResult.UNCHANGED if existing.label == label else FeedbackResult.CONFLICT

    def purge(self, older_than: datetime) -> int:
        """Deletes the rows logged before `older_than` (labelled or not); how many."""
        older_than = _aware(older_than, "older_than")
        with self.engine.begin() as conn:
            result = conn.execute(predictions.delete().where(predictions.c.created_at < older_than))
        return int(result.rowcount)

    # --- reads --------------------------------------------------------------------------------------

    def get(self, request_id: str) -> LoggedPrediction | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(predictions).where(predictions.c.request_id == request_id)
            ).one_or_none()
        if row is None:
            return None
        return LoggedPrediction(
            request_id=row.request_id,
            created_at=row.created_at,
            model_name=row.model_name,
            model_version=row.model_version,
            source=row.source,
            image=decode_images([row.image])[0],
            probabilities=decode_probabilities([row.probabilities])[0],
            predicted=row.predicted,
            confidence=row.confidence,
            label=row.label,
            labelled_at=row.labelled_at,
        )

    def window(
        self,
        since: datetime,
        until: datetime | None = None,
        limit: int | None = None,
        exclude_sources: Collection[str] = (),
    ) -> LoggedWindow:
        """The inputs logged in [since, until), oldest first; with `limit`, only the newest `limit`;
        without the rows of `exclude_sources` (endpoint names, as in `source`)."""
        since = _aware(since, "since")
        table = predictions
        query = sa.select(
            table.c.request_id,
            table.c.created_at,
            table.c.model_version,
            table.c.source,
            table.c.image,
            table.c.probabilities,
        ).where(table.c.created_at >= since)
        if until is not None:
            query = query.where(table.c.created_at < _aware(until, "until"))
        if exclude_sources:
            query = query.where(table.c.source.not_in(sorted(exclude_sources)))
        query = query.order_by(table.c.created_at.desc(), table.c.request_id.desc())
        if limit is not None:
            query = query.limit(limit)
        try:
            with self.engine.connect() as conn:
                rows = list(reversed(conn.execute(query).all()))
        except sa.exc.DatabaseError:
            if not self._nothing_logged_yet():
                raise
            rows = []
        return LoggedWindow(
            images=decode_images([row.image for row in rows]),
            probabilities=decode_probabilities([row.probabilities for row in rows]),
            versions=[row.model_version for row in rows],
            created_at=[row.created_at for row in rows],
            request_ids=[row.request_id for row in rows],
            sources=[row.source for row in rows],
        )

    def labelled(self, since: datetime | None = None) -> LabelledSet:
        """The labelled examples (labelled at or after `since`, if given)."""
        table = predictions
        query = sa.select(table.c.request_id, table.c.image, table.c.label).where(table.c.label.is_not(None))
        if since is not None:
            query = query.where(table.c.labelled_at >= _aware(since, "since"))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(table.c.request_id)).all()
        return LabelledSet(
            images=decode_images([row.image for row in rows]),
            labels=np.array([row.label for row in rows], dtype=np.int64),
            request_ids=[row.request_id for row in rows],
        )

    def count_labelled(self, since: datetime | None = None) -> int:
        table = predictions
        query = sa.select(sa.func.count()).select_from(table).where(table.c.label.is_not(None))
        if since is not None:
            query = query.where(table.c.labelled_at >= _aware(since, "since"))
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(query).scalar_one())
        except sa.exc.DatabaseError:
            if not self._nothing_logged_yet():
                raise
            return 0

    def _nothing_logged_yet(self) -> bool:
        """Whether a failed read failed because the table does not exist yet. Serving creates it with
        its first write; the readers that watch the log (the drift job, the operator's feedback
        trigger) start beside it, maybe with credentials that may not create it, and must read a new
        log as an empty one rather than fail until the first prediction. Training does not ask: it
        reads the log because a run asked for its feedback (training_job/feedback.py)."""
        try:
            return not sa.inspect(self.engine).has_table(predictions.name)
        except sa.exc.SQLAlchemyError:
            return False  # the database itself is away: the caller's error says so

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(predictions)).scalar_one())
