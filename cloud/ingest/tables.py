"""Tables of telemetry and of what the cloud derives from it.

* ``telemetry_windows``: one row per device telemetry window (counts, latency
  percentiles, CPU, RSS). Unique on ``(device_id, seq, window_start)`` so a
  redelivered message (QoS 1 is at-least-once) is stored once; the window start
  is part of the key because a device that lost its journal may reuse a
  sequence number for a *new* window, which must not be mistaken for a copy.
* ``device_seen``: devices that announced themselves (status or reported);
  telemetry from any other device id is dropped. The device registry of the
  rollout work supersedes it later; this table only answers "known?" and
  "which group?".
* ``drift_partials``: per release, device group, time bucket and ingest worker,
  the summed input histograms and predicted-class counts. Each worker owns
  its rows, so workers never contend; readers sum over workers.
* ``drift_evaluations``, ``drift_alerts``: what the drift monitor concluded;
  ``drift_references``: the predicted-class distribution a release showed in
  its first windows (the reference of prediction drift when its baseline has none).
* ``retrain_runs``: the retrain loop's jobs and where they are.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from cloud.db import Base

__all__ = [
    "DeviceSeen",
    "DriftAlert",
    "DriftEvaluation",
    "DriftPartial",
    "DriftReference",
    "RetrainRun",
    "TelemetryWindow",
]

#: Column widths: device ids, model names and groups are bounded by the protocol.
_ID = 64
_NAME = 64


class TelemetryWindow(Base):
    """One telemetry window of one device."""

    __tablename__ = "telemetry_windows"
    __table_args__ = (
        # Time first: windows arrive roughly in time order across the fleet, so new keys
        # land at the end of the index and a batch dirties a few of its pages. Device
        # first, a batch from N devices dirtied N leaf pages, and its commit (WAL
        # writes, checkpoints) cost grew with the table: 2 us per window at 10 000
        # rows, 9 us at 60 000 (SQLite, measured for bench/ingest.py). The key is the
        # same set of columns either way; ON CONFLICT names it in any order.
        UniqueConstraint("window_start", "device_id", "seq", name="uq_telemetry_device_seq"),
        Index("ix_telemetry_received", "received_at"),
        Index("ix_telemetry_release_received", "model", "release", "received_at"),
        Index("ix_telemetry_device_received", "device_id", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(_ID))
    seq: Mapped[int] = mapped_column(BigInteger)
    window_start: Mapped[float] = mapped_column(Float)
    window_end: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(_NAME), nullable=True)
    release: Mapped[int | None] = mapped_column(Integer, nullable=True)
    group: Mapped[str] = mapped_column("device_group", String(_NAME), default="default")
    inferences: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p95_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    cpu_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    rss_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    drift_samples: Mapped[int] = mapped_column(BigInteger, default=0)


class DeviceSeen(Base):
    """A device that announced itself, its group and when it was last heard."""

    __tablename__ = "device_seen"

    device_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    group: Mapped[str] = mapped_column("device_group", String(_NAME), default="default")
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)


class DriftPartial(Base):
    """One worker's share of the histograms of a (release, group, bucket)."""

    __tablename__ = "drift_partials"
    __table_args__ = (
        UniqueConstraint(
            "model", "release", "device_group", "bucket_start", "worker", name="uq_drift_partial"
        ),
        Index("ix_drift_partial_bucket", "bucket_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(_NAME))
    release: Mapped[int] = mapped_column(Integer)
    group: Mapped[str] = mapped_column("device_group", String(_NAME))
    bucket_start: Mapped[float] = mapped_column(Float)
    worker: Mapped[str] = mapped_column(String(128))
    windows: Mapped[int] = mapped_column(Integer, default=0)
    n_features: Mapped[int] = mapped_column(Integer, default=0)
    bins: Mapped[int] = mapped_column(Integer, default=0)
    #: ``int64`` little-endian ``(n_features, bins)``; empty when no window had histograms.
    input_counts: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    #: ``int64`` little-endian ``(n_classes,)``.
    output_counts: Mapped[bytes] = mapped_column(LargeBinary, default=b"")


class DriftEvaluation(Base):
    """The drift monitor's verdict on one closed bucket of a (release, group)."""

    __tablename__ = "drift_evaluations"
    __table_args__ = (
        UniqueConstraint("model", "release", "device_group", "bucket_start", name="uq_drift_eval"),
        Index("ix_drift_eval_bucket", "bucket_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(_NAME))
    release: Mapped[int] = mapped_column(Integer)
    group: Mapped[str] = mapped_column("device_group", String(_NAME))
    bucket_start: Mapped[float] = mapped_column(Float)
    bucket_end: Mapped[float] = mapped_column(Float)
    evaluated_at: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(BigInteger)
    predictions: Mapped[int] = mapped_column(BigInteger)
    psi_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    psi_max: Mapped[float | None] = mapped_column(Float, nullable=True)
    js_mean: Mapped[float | None] = mapped_column(Float, nullable=True)
    pred_psi: Mapped[float | None] = mapped_column(Float, nullable=True)
    pred_js: Mapped[float | None] = mapped_column(Float, nullable=True)
    input_exceeded: Mapped[bool | None] = mapped_column(nullable=True)
    pred_exceeded: Mapped[bool | None] = mapped_column(nullable=True)
    #: JSON ``[[feature, psi], ...]``: the features that moved most.
    top_features: Mapped[str] = mapped_column(Text, default="[]")


class DriftReference(Base):
    """Reference predicted-class counts of a (release, group), learnt in its first windows."""

    __tablename__ = "drift_references"
    __table_args__ = (UniqueConstraint("model", "release", "device_group", name="uq_drift_ref"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(_NAME))
    release: Mapped[int] = mapped_column(Integer)
    group: Mapped[str] = mapped_column("device_group", String(_NAME))
    created_at: Mapped[float] = mapped_column(Float)
    windows: Mapped[int] = mapped_column(Integer)
    output_counts: Mapped[bytes] = mapped_column(LargeBinary)


class DriftAlert(Base):
    """An input- or prediction-drift alert of a (release, group)."""

    __tablename__ = "drift_alerts"
    __table_args__ = (Index("ix_drift_alert_state", "state", "opened_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # "input" | "prediction"
    model: Mapped[str] = mapped_column(String(_NAME))
    release: Mapped[int] = mapped_column(Integer)
    group: Mapped[str] = mapped_column("device_group", String(_NAME))
    state: Mapped[str] = mapped_column(String(16))  # "open" | "resolved"
    opened_at: Mapped[float] = mapped_column(Float)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    statistic: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)


class RetrainRun(Base):
    """A retraining job started by a drift alert, and the rollout of its result."""

    __tablename__ = "retrain_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alert_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model: Mapped[str] = mapped_column(String(_NAME))
    from_release: Mapped[int] = mapped_column(Integer)
    group: Mapped[str] = mapped_column("device_group", String(_NAME))
    job: Mapped[str] = mapped_column(String(64))
    #: training -> published -> canary -> fleet -> done | failed
    state: Mapped[str] = mapped_column(String(16))
    new_release: Mapped[int | None] = mapped_column(Integer, nullable=True)
    canary: Mapped[str] = mapped_column(Text, default="[]")
    started_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text, default="")
