"""Batched, idempotent writes of validated telemetry into the registry database.

One ``write_batch`` call is one transaction: the telemetry rows (``INSERT ...
ON CONFLICT DO NOTHING``, so a redelivered window is skipped), the histograms
of exactly the rows that were new (summed in memory per batch, then added to
this worker's drift partials) and the ``device_seen`` upserts. Either all of
it is committed or none of it, and the worker acknowledges the MQTT messages
only afterwards: a crash between commit and acknowledgement leads to a
redelivery that the unique key turns into a no-op, so every window counts
exactly once.

The common batch has no redelivered window, so the rows go in with one
DB-API ``executemany`` (no SQLAlchemy per-row work) and the affected-row count
proves that every row was new. Only when it is short does the batch run again,
in a new transaction, with ``RETURNING`` to learn which rows were copies.

With SQLite every writer of a database file takes one lock; ingest workers of
one host take it in turn through an OS file lock beside the database
(``flock``), which wakes the next worker the moment the lock is free instead
of SQLite's sleeping busy handler (1, 2, 5, 10... ms). All per-row work is done
before the lock is taken.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, cast

import numpy as np
import numpy.typing as npt
from sqlalchemy import Table, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cloud.db import Database
from cloud.ingest.fastpath import FastTelemetry
from cloud.ingest.tables import DeviceSeen, DriftPartial, TelemetryWindow
from shared.errors import ConfigError
from shared.messages import Telemetry

__all__ = [
    "BatchResult",
    "SeenUpdate",
    "StoredWindow",
    "TelemetryStore",
    "decode_counts",
    "encode_counts",
]

log = logging.getLogger(__name__)

_KEY = ("device_id", "seq", "window_start")
#: Columns of a telemetry row, in the order ``_row`` fills them.
_COLUMNS = (
    "device_id",
    "seq",
    "window_start",
    "window_end",
    "received_at",
    "model",
    "release",
    "device_group",
    "inferences",
    "errors",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "cpu_percent",
    "rss_bytes",
    "drift_samples",
)


def encode_counts(counts: npt.NDArray[np.int64]) -> bytes:
    """Histogram counts as little-endian ``int64`` bytes (shape kept by the caller)."""
    return np.ascontiguousarray(counts, dtype="<i8").tobytes()


def decode_counts(data: bytes, shape: tuple[int, ...]) -> npt.NDArray[np.int64]:
    """Inverse of ``encode_counts``; raises ``ValueError`` if the size does not fit ``shape``."""
    arr = np.frombuffer(data, dtype="<i8").astype(np.int64)
    return arr.reshape(shape)


class StoredWindow(NamedTuple):
    """A validated telemetry window, ready to store. ``inputs`` and ``samples`` are
    the window's ``histograms.Histograms`` entries when the caller has them already (the
    message's input histogram may then be ``None``: taken out, see ``histograms``).
    A named tuple: ingest makes one per message, and a dataclass costs twice as much."""

    msg: Telemetry | FastTelemetry
    received_at: float
    group: str
    inputs: npt.NDArray[np.integer[Any]] | None = None
    samples: int | None = None


@dataclass(frozen=True)
class SeenUpdate:
    """A device announced itself; ``group`` is ``None`` when the message did not say."""

    device_id: str
    at: float
    group: str | None


@dataclass(frozen=True)
class BatchResult:
    stored: int
    duplicates: int


class _SomeRowsExisted(Exception):
    """The fast insert found redelivered windows: redo the batch with RETURNING."""


class _FileLock:
    """An exclusive ``flock`` on a file beside a SQLite database, shared by every
    ingest worker (thread or process) of the host; re-entrant for none."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TelemetryStore:
    """Writes one ingest worker's batches; ``worker`` names its drift partial rows."""

    def __init__(self, db: Database, *, worker: str, bucket_seconds: float) -> None:
        if bucket_seconds <= 0:
            raise ValueError("bucket_seconds must be positive")
        self.db = db
        self.worker = worker
        self.bucket_seconds = bucket_seconds
        self._dialect = db.engine.dialect.name
        if self._dialect not in ("postgresql", "sqlite"):
            # Idempotent inserts use each dialect's ON CONFLICT: refuse others at start.
            raise ConfigError(
                f"telemetry ingest supports SQLite and PostgreSQL, not {self._dialect}"
            )
        mark = "?" if db.engine.dialect.paramstyle == "qmark" else "%s"
        # Every name here is a constant of this module: nothing comes from input.
        self._insert_sql = (
            f"INSERT INTO {TelemetryWindow.__tablename__} ({', '.join(_COLUMNS)}) "  # noqa: S608
            f"VALUES ({', '.join([mark] * len(_COLUMNS))}) "
            f"ON CONFLICT ({', '.join(_KEY)}) DO NOTHING"
        )
        db_file = db.engine.url.database if self._dialect == "sqlite" else None
        self._lock = (
            _FileLock(f"{db_file}.ingest-lock")
            if db_file and db_file != ":memory:" and not db_file.startswith("file:")
            else None
        )

    def bucket_of(self, t: float) -> float:
        """Start of the drift bucket that a window received at ``t`` belongs to."""
        return float(math.floor(t / self.bucket_seconds) * self.bucket_seconds)

    def _insert(self, table: Any) -> Any:
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        if self._lock is None:
            yield
        else:
            with self._lock.held():
                yield

    # -- writes -------------------------------------------------------------
    def write_batch(
        self, windows: Sequence[StoredWindow], seen: Iterable[SeenUpdate] = ()
    ) -> BatchResult:
        """Store ``windows`` and ``seen`` in one transaction; see the module docstring."""
        unique: dict[tuple[str, int, float], StoredWindow] = {}
        for w in windows:
            unique.setdefault((w.msg.device_id, w.msg.seq, w.msg.window_start), w)
        fresh = list(unique.values())
        rows = [_row(w) for w in fresh]
        seen_rows = self._seen_rows(list(seen))
        partials = self._partials(fresh)
        for part in partials.values():
            part.totals()  # numpy work done before the lock is taken
        try:
            with self._writing(), self.db.session() as s:
                self._upsert_seen(s, seen_rows)
                if rows and self._insert_all_new(s, rows) != len(rows):
                    raise _SomeRowsExisted
                self._add_partials(s, partials)
            stored = len(rows)
        except _SomeRowsExisted:
            with self._writing(), self.db.session() as s:
                self._upsert_seen(s, seen_rows)
                new_keys = self._insert_returning(s, rows)
                new = [unique[k] for k in new_keys if k in unique]
                self._add_partials(s, self._partials(new))
            stored = len(new_keys)
        return BatchResult(stored=stored, duplicates=len(windows) - stored)

    def _insert_all_new(self, s: Session, rows: list[tuple[Any, ...]]) -> int:
        """Insert ``rows`` skipping existing keys; how many were inserted."""
        raw = s.connection().connection.dbapi_connection
        assert raw is not None
        cur = raw.cursor()
        try:
            cur.executemany(self._insert_sql, rows)
            return int(cur.rowcount)
        finally:
            cur.close()

    def _insert_returning(
        self, s: Session, rows: list[tuple[Any, ...]]
    ) -> set[tuple[str, int, float]]:
        table = TelemetryWindow.__table__
        # A Core insert on the table: the ORM's bulk path costs more per row and adds nothing.
        stmt = (
            self._insert(table)
            .on_conflict_do_nothing(index_elements=list(_KEY))
            .returning(table.c.device_id, table.c.seq, table.c.window_start)
        )
        result = s.connection().execute(stmt, [dict(zip(_COLUMNS, r, strict=True)) for r in rows])
        return {(r[0], int(r[1]), float(r[2])) for r in result}

    def _partials(
        self, windows: Sequence[StoredWindow]
    ) -> dict[tuple[str, int, str, float], _Partial]:
        """Histogram sums of ``windows`` per (model, release, group, bucket)."""
        sums: dict[tuple[str, int, str, float], _Partial] = defaultdict(_Partial)
        buckets: dict[float, float] = {}  # a batch has few distinct receipt times
        for w in windows:
            m = w.msg
            if m.model is None or m.release is None:
                continue
            rows = None if w.inputs is not None else _input_rows(m)
            if rows is None and w.inputs is None and m.output_hist is None:
                continue
            bucket = buckets.get(w.received_at)
            if bucket is None:
                bucket = buckets[w.received_at] = self.bucket_of(w.received_at)
            part = sums[(m.model, m.release, w.group, bucket)]
            part.windows += 1
            h = w.inputs
            if h is None and rows:
                h = np.asarray(rows, dtype=np.int64)
            # The first window's shape wins (the release check makes them all alike).
            if h is not None and (not part.ins or part.ins[0].shape == h.shape):
                part.ins.append(h)
            out = m.output_hist
            if out and (not part.outs or len(part.outs[0]) == len(out)):
                part.outs.append(out)
        return sums

    def _add_partials(self, s: Session, sums: dict[tuple[str, int, str, float], _Partial]) -> None:
        # Core statements: the ORM's unit of work cost more than the rest of the batch.
        t = cast(Table, DriftPartial.__table__)
        conn = s.connection()
        for (model, release, group, bucket), part in sums.items():
            found = conn.execute(
                select(t.c.id, *(t.c[c] for c in _PartialRow.COLUMNS)).where(
                    t.c.model == model,
                    t.c.release == release,
                    t.c.device_group == group,
                    t.c.bucket_start == bucket,
                    t.c.worker == self.worker,
                )
            ).first()
            row = _PartialRow(model, release, *(found[1:] if found else (0, 0, 0, b"", b"")))
            part.merge_into(row)
            values = {c: getattr(row, c) for c in _PartialRow.COLUMNS}
            if found is None:
                keys = {"model": model, "release": release, "device_group": group}
                keys |= {"bucket_start": bucket, "worker": self.worker}
                conn.execute(insert(t).values(**keys, **values))
            else:
                conn.execute(update(t).where(t.c.id == found[0]).values(**values))

    @staticmethod
    def _seen_rows(seen: list[SeenUpdate]) -> list[SeenUpdate]:
        latest: dict[str, SeenUpdate] = {}
        for u in seen:
            prev = latest.get(u.device_id)
            group = u.group if u.group is not None else (prev.group if prev else None)
            at = max(u.at, prev.at) if prev else u.at
            latest[u.device_id] = SeenUpdate(u.device_id, at, group)
        return list(latest.values())

    def _upsert_seen(self, s: Session, latest: list[SeenUpdate]) -> None:
        for with_group in (True, False):
            rows = [
                {
                    "device_id": u.device_id,
                    "group": u.group or "default",
                    "first_seen": u.at,
                    "last_seen": u.at,
                }
                for u in latest
                if (u.group is not None) == with_group
            ]
            if not rows:
                continue
            stmt = self._insert(DeviceSeen)
            update: dict[str, Any] = {"last_seen": stmt.excluded.last_seen}
            if with_group:
                update["device_group"] = stmt.excluded.device_group
            s.execute(stmt.on_conflict_do_update(index_elements=["device_id"], set_=update), rows)


@dataclass
class _PartialRow:
    """The sums of a ``drift_partials`` row, as ``_Partial.merge_into`` updates them."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "windows",
        "n_features",
        "bins",
        "input_counts",
        "output_counts",
    )
    model: str
    release: int
    windows: int
    n_features: int
    bins: int
    input_counts: bytes
    output_counts: bytes


class _Partial:
    """Histogram sums of one (release, group, bucket) within a batch (``_partials``
    fills it)."""

    def __init__(self) -> None:
        self.windows = 0
        self.ins: list[npt.NDArray[np.integer[Any]]] = []
        self.outs: list[list[int]] = []
        self._totals: tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64] | None] | None
        self._totals = None

    def totals(self) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64] | None]:
        """Summed input and output histograms (computed once, before the write lock)."""
        if self._totals is None:
            # Views of a uint8 block (small counts) stack as bytes and add up as int64.
            ins = np.array(self.ins).sum(axis=0, dtype=np.int64) if self.ins else None
            outs = np.asarray(self.outs, dtype=np.int64).sum(axis=0) if self.outs else None
            self._totals = (ins, outs)
        return self._totals

    def merge_into(self, row: _PartialRow) -> None:
        row.windows = (row.windows or 0) + self.windows
        inputs, outputs = self.totals()
        if inputs is not None:
            f, b = inputs.shape
            if row.input_counts and (row.n_features, row.bins) == (f, b):
                total = decode_counts(row.input_counts, (f, b)) + inputs
            else:
                if row.input_counts:
                    log.error(
                        "drift partial %s/%s changed shape; restarting its bucket",
                        row.model,
                        row.release,
                    )
                total = inputs
            row.n_features, row.bins, row.input_counts = f, b, encode_counts(total)
        if outputs is not None:
            n = len(outputs)
            prev = row.output_counts
            if prev and len(prev) == 8 * n:
                total_o = decode_counts(prev, (n,)) + outputs
            else:
                total_o = outputs
            row.output_counts = encode_counts(total_o)


def _input_rows(m: Telemetry | FastTelemetry) -> list[list[int]] | None:
    """The input histogram a message still holds (the fast path takes it out)."""
    return m.input_rows() if isinstance(m, Telemetry) else m.input_hist


def _row(w: StoredWindow) -> tuple[Any, ...]:
    m = w.msg
    lat = m.latency
    if w.samples is not None:
        samples = w.samples
    else:
        rows = _input_rows(m)
        samples = int(sum(rows[0])) if rows else 0
    if lat is None:
        p50 = p95 = p99 = mx = None
    else:
        p50, p95, p99, mx = lat.p50_ms, lat.p95_ms, lat.p99_ms, lat.max_ms
    return (
        m.device_id,
        m.seq,
        m.window_start,
        m.window_end,
        w.received_at,
        m.model,
        m.release,
        w.group,
        m.inferences,
        m.errors,
        p50,
        p95,
        p99,
        mx,
        m.cpu_percent,
        m.rss_bytes,
        samples,
    )
