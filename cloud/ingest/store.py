"""Batched, idempotent writes of validated telemetry into the registry database.

One ``write_batch`` call is one transaction: the telemetry rows (``INSERT ...
ON CONFLICT DO NOTHING RETURNING``, so a redelivered window is skipped), the
histograms of exactly the rows that were new (added to this worker's drift
partials) and the ``device_seen`` upserts. Either all of it is committed or
none of it, and the worker acknowledges the MQTT messages only afterwards:
a crash between commit and acknowledgement leads to a redelivery that the
unique key turns into a no-op, so every window counts exactly once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cloud.db import Database
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


def encode_counts(counts: npt.NDArray[np.int64]) -> bytes:
    """Histogram counts as little-endian ``int64`` bytes (shape kept by the caller)."""
    return np.ascontiguousarray(counts, dtype="<i8").tobytes()


def decode_counts(data: bytes, shape: tuple[int, ...]) -> npt.NDArray[np.int64]:
    """Inverse of ``encode_counts``; raises ``ValueError`` if the size does not fit ``shape``."""
    arr = np.frombuffer(data, dtype="<i8").astype(np.int64)
    return arr.reshape(shape)


@dataclass(frozen=True)
class StoredWindow:
    """A validated telemetry window, ready to store."""

    msg: Telemetry
    received_at: float
    group: str


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

    def bucket_of(self, t: float) -> float:
        """Start of the drift bucket that a window received at ``t`` belongs to."""
        return float(np.floor(t / self.bucket_seconds) * self.bucket_seconds)

    def _insert(self, table: Any) -> Any:
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    # -- writes -------------------------------------------------------------
    def write_batch(
        self, windows: Sequence[StoredWindow], seen: Iterable[SeenUpdate] = ()
    ) -> BatchResult:
        """Store ``windows`` and ``seen`` in one transaction; see the module docstring."""
        unique: dict[tuple[str, int, float], StoredWindow] = {}
        for w in windows:
            unique.setdefault((w.msg.device_id, w.msg.seq, w.msg.window_start), w)
        with self.db.session() as s:
            self._upsert_seen(s, list(seen))
            new_keys = self._insert_windows(s, list(unique.values()))
            self._add_partials(s, [unique[k] for k in new_keys if k in unique])
        return BatchResult(stored=len(new_keys), duplicates=len(windows) - len(new_keys))

    def _insert_windows(
        self, s: Session, windows: list[StoredWindow]
    ) -> set[tuple[str, int, float]]:
        if not windows:
            return set()
        rows = [_row(w) for w in windows]
        table = TelemetryWindow.__table__
        # A Core insert on the table: the ORM's bulk path costs more per row and adds nothing.
        stmt = (
            self._insert(table)
            .on_conflict_do_nothing(index_elements=list(_KEY))
            .returning(table.c.device_id, table.c.seq, table.c.window_start)
        )
        result = s.connection().execute(stmt, rows)
        return {(r[0], int(r[1]), float(r[2])) for r in result}

    def _add_partials(self, s: Session, windows: list[StoredWindow]) -> None:
        sums: dict[tuple[str, int, str, float], _Partial] = defaultdict(_Partial)
        for w in windows:
            m = w.msg
            if m.model is None or m.release is None:
                continue
            if m.input_hist is None and m.output_hist is None:
                continue
            sums[(m.model, m.release, w.group, self.bucket_of(w.received_at))].add(m)
        for (model, release, group, bucket), part in sums.items():
            row = s.scalar(
                select(DriftPartial).where(
                    DriftPartial.model == model,
                    DriftPartial.release == release,
                    DriftPartial.group == group,
                    DriftPartial.bucket_start == bucket,
                    DriftPartial.worker == self.worker,
                )
            )
            if row is None:
                row = DriftPartial(
                    model=model,
                    release=release,
                    group=group,
                    bucket_start=bucket,
                    worker=self.worker,
                    windows=0,
                    n_features=0,
                    bins=0,
                    input_counts=b"",
                    output_counts=b"",
                )
                s.add(row)
            part.merge_into(row)

    def _upsert_seen(self, s: Session, seen: list[SeenUpdate]) -> None:
        latest: dict[str, SeenUpdate] = {}
        for u in seen:
            prev = latest.get(u.device_id)
            group = u.group if u.group is not None else (prev.group if prev else None)
            at = max(u.at, prev.at) if prev else u.at
            latest[u.device_id] = SeenUpdate(u.device_id, at, group)
        for with_group in (True, False):
            rows = [
                {
                    "device_id": u.device_id,
                    "group": u.group or "default",
                    "first_seen": u.at,
                    "last_seen": u.at,
                }
                for u in latest.values()
                if (u.group is not None) == with_group
            ]
            if not rows:
                continue
            stmt = self._insert(DeviceSeen)
            update: dict[str, Any] = {"last_seen": stmt.excluded.last_seen}
            if with_group:
                update["device_group"] = stmt.excluded.device_group
            s.execute(stmt.on_conflict_do_update(index_elements=["device_id"], set_=update), rows)


class _Partial:
    """Histogram sums of one (release, group, bucket) within a batch."""

    def __init__(self) -> None:
        self.windows = 0
        self.inputs: npt.NDArray[np.int64] | None = None
        self.outputs: npt.NDArray[np.int64] | None = None

    def add(self, m: Telemetry) -> None:
        self.windows += 1
        if m.input_hist is not None and m.input_hist:
            f, b = len(m.input_hist), len(m.input_hist[0])
            # fromiter over the flattened rows is several times faster than asarray(lists).
            h = np.fromiter(chain.from_iterable(m.input_hist), np.int64, f * b).reshape(f, b)
            if self.inputs is None:
                self.inputs = h
            elif self.inputs.shape == h.shape:
                self.inputs = self.inputs + h
        if m.output_hist is not None and m.output_hist:
            o = np.asarray(m.output_hist, dtype=np.int64)
            if self.outputs is None:
                self.outputs = o
            elif self.outputs.shape == o.shape:
                self.outputs = self.outputs + o

    def merge_into(self, row: DriftPartial) -> None:
        row.windows = (row.windows or 0) + self.windows
        if self.inputs is not None:
            f, b = self.inputs.shape
            if row.input_counts and (row.n_features, row.bins) == (f, b):
                total = decode_counts(row.input_counts, (f, b)) + self.inputs
            else:
                if row.input_counts:
                    log.error(
                        "drift partial %s/%s changed shape; restarting its bucket",
                        row.model,
                        row.release,
                    )
                total = self.inputs
            row.n_features, row.bins, row.input_counts = f, b, encode_counts(total)
        if self.outputs is not None:
            n = len(self.outputs)
            prev = row.output_counts
            if prev and len(prev) == 8 * n:
                total_o = decode_counts(prev, (n,)) + self.outputs
            else:
                total_o = self.outputs
            row.output_counts = encode_counts(total_o)


def _row(w: StoredWindow) -> dict[str, Any]:
    m = w.msg
    lat = m.latency
    samples = int(sum(m.input_hist[0])) if m.input_hist else 0
    return {
        "device_id": m.device_id,
        "seq": m.seq,
        "window_start": m.window_start,
        "window_end": m.window_end,
        "received_at": w.received_at,
        "model": m.model,
        "release": m.release,
        "device_group": w.group,
        "inferences": m.inferences,
        "errors": m.errors,
        "p50_ms": lat.p50_ms if lat else None,
        "p95_ms": lat.p95_ms if lat else None,
        "p99_ms": lat.p99_ms if lat else None,
        "max_ms": lat.max_ms if lat else None,
        "cpu_percent": m.cpu_percent,
        "rss_bytes": m.rss_bytes,
        "drift_samples": samples,
    }
