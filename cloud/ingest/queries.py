"""Read side of the telemetry tables, for the API, the dashboard and ``/metrics``.

Every query is bounded: by a time range and a row limit, so a large fleet's
history cannot turn one HTTP request into a table scan of unbounded output.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Float, Integer, cast, func, select

from cloud.db import Database
from cloud.ingest.tables import DriftAlert, DriftEvaluation, RetrainRun, TelemetryWindow

__all__ = [
    "alerts",
    "device_windows",
    "drift_latest",
    "drift_series",
    "release_summary",
    "release_series",
    "retrain_runs",
]

MAX_ROWS = 5000


def device_windows(
    db: Database, device_id: str, since: float, limit: int = 200
) -> list[dict[str, Any]]:
    """The newest telemetry windows of one device, newest first."""
    T = TelemetryWindow
    with db.session() as s:
        rows = s.scalars(
            select(T)
            .where(T.device_id == device_id, T.received_at >= since)
            .order_by(T.received_at.desc())
            .limit(min(limit, MAX_ROWS))
        ).all()
        return [
            {
                "seq": r.seq,
                "window_start": r.window_start,
                "window_end": r.window_end,
                "received_at": r.received_at,
                "model": r.model,
                "release": r.release,
                "group": r.group,
                "inferences": r.inferences,
                "errors": r.errors,
                "p50_ms": r.p50_ms,
                "p95_ms": r.p95_ms,
                "p99_ms": r.p99_ms,
                "max_ms": r.max_ms,
                "cpu_percent": r.cpu_percent,
                "rss_bytes": r.rss_bytes,
                "drift_samples": r.drift_samples,
            }
            for r in rows
        ]


def _weighted(col: Any) -> Any:
    T = TelemetryWindow
    return func.sum(col * T.inferences) / func.nullif(func.sum(T.inferences), 0)


def release_summary(db: Database, since: float) -> list[dict[str, Any]]:
    """Per release over ``[since, now]``: devices, inferences, errors, latency.

    Latency percentiles are the inference-weighted mean of the devices' window
    percentiles (an approximation of the fleet percentile that needs no raw
    latencies); ``p99_max_ms`` is the worst device window.
    """
    T = TelemetryWindow
    with db.session() as s:
        rows = s.execute(
            select(
                T.model,
                T.release,
                func.count(func.distinct(T.device_id)),
                func.sum(T.inferences),
                func.sum(T.errors),
                _weighted(T.p50_ms),
                _weighted(T.p95_ms),
                _weighted(T.p99_ms),
                func.max(T.p99_ms),
                func.min(T.window_start),
                func.max(T.window_end),
                func.max(T.received_at),
                func.count(),
            )
            .where(T.received_at >= since)
            .group_by(T.model, T.release)
            .order_by(T.model, T.release)
        ).all()
    out = []
    for r in rows:
        span = max((r[10] or 0) - (r[9] or 0), 1e-9)
        inf, err = int(r[3] or 0), int(r[4] or 0)
        out.append(
            {
                "model": r[0],
                "release": r[1],
                "devices": int(r[2]),
                "inferences": inf,
                "errors": err,
                "error_ratio": err / (inf + err) if inf + err else 0.0,
                "inference_rate": inf / span,
                "p50_ms": r[5],
                "p95_ms": r[6],
                "p99_ms": r[7],
                "p99_max_ms": r[8],
                "last_received_at": r[11],
                "windows": int(r[12]),
            }
        )
    return out


def release_series(
    db: Database, since: float, step: float, model: str | None = None, release: int | None = None
) -> list[dict[str, Any]]:
    """Per release and time step: inferences, errors, weighted latency percentiles."""
    T = TelemetryWindow
    step = max(float(step), 1.0)
    # A cast to integer truncates in SQLite (= floor for positive times) but rounds in
    # PostgreSQL, which has floor() instead.
    bucket: Any = (
        func.floor(T.received_at / step)
        if db.engine.dialect.name == "postgresql"
        else cast(T.received_at / step, Integer)
    )
    q = select(
        T.model,
        T.release,
        cast(bucket, Float),
        func.sum(T.inferences),
        func.sum(T.errors),
        _weighted(T.p50_ms),
        _weighted(T.p95_ms),
        _weighted(T.p99_ms),
        func.count(func.distinct(T.device_id)),
    ).where(T.received_at >= since, T.model.is_not(None))
    if model is not None:
        q = q.where(T.model == model)
    if release is not None:
        q = q.where(T.release == release)
    q = q.group_by(T.model, T.release, bucket).order_by(bucket).limit(MAX_ROWS)
    with db.session() as s:
        rows = s.execute(q).all()
    return [
        {
            "model": r[0],
            "release": r[1],
            "t": float(r[2]) * step,
            "inferences": int(r[3]),
            "errors": int(r[4]),
            "p50_ms": r[5],
            "p95_ms": r[6],
            "p99_ms": r[7],
            "devices": int(r[8]),
        }
        for r in rows
    ]


def _evaluation(e: DriftEvaluation) -> dict[str, Any]:
    return {
        "model": e.model,
        "release": e.release,
        "group": e.group,
        "bucket_start": e.bucket_start,
        "bucket_end": e.bucket_end,
        "samples": e.samples,
        "predictions": e.predictions,
        "psi_mean": e.psi_mean,
        "psi_max": e.psi_max,
        "js_mean": e.js_mean,
        "pred_psi": e.pred_psi,
        "pred_js": e.pred_js,
        "input_exceeded": e.input_exceeded,
        "pred_exceeded": e.pred_exceeded,
        "top_features": json.loads(e.top_features or "[]"),
    }


def drift_latest(db: Database, since: float) -> list[dict[str, Any]]:
    """The newest evaluation of every (release, group) evaluated since ``since``."""
    E = DriftEvaluation
    newest = (
        select(
            E.model.label("m"),
            E.release.label("r"),
            E.group.label("g"),
            func.max(E.bucket_start).label("b"),
        )
        .where(E.bucket_start >= since)
        .group_by(E.model, E.release, E.group)
        .subquery()
    )
    with db.session() as s:
        rows = s.scalars(
            select(E)
            .join(
                newest,
                (E.model == newest.c.m)
                & (E.release == newest.c.r)
                & (E.group == newest.c.g)
                & (E.bucket_start == newest.c.b),
            )
            .order_by(E.model, E.release, E.group)
        ).all()
        return [_evaluation(e) for e in rows]


def drift_series(
    db: Database,
    since: float,
    model: str | None = None,
    release: int | None = None,
    group: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluations since ``since``, oldest first."""
    E = DriftEvaluation
    q = select(E).where(E.bucket_start >= since)
    if model is not None:
        q = q.where(E.model == model)
    if release is not None:
        q = q.where(E.release == release)
    if group is not None:
        q = q.where(E.group == group)
    with db.session() as s:
        return [_evaluation(e) for e in s.scalars(q.order_by(E.bucket_start).limit(MAX_ROWS)).all()]


def alerts(db: Database, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Drift alerts, newest first; ``state`` ``open`` or ``resolved`` filters."""
    A = DriftAlert
    q = select(A)
    if state is not None:
        q = q.where(A.state == state)
    with db.session() as s:
        return [
            {
                "id": a.id,
                "kind": a.kind,
                "model": a.model,
                "release": a.release,
                "group": a.group,
                "state": a.state,
                "opened_at": a.opened_at,
                "resolved_at": a.resolved_at,
                "statistic": a.statistic,
                "threshold": a.threshold,
                "message": a.message,
            }
            for a in s.scalars(q.order_by(A.opened_at.desc()).limit(min(limit, MAX_ROWS))).all()
        ]


def retrain_runs(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    """Retraining runs, newest first."""
    R = RetrainRun
    with db.session() as s:
        return [
            {
                "id": r.id,
                "alert_id": r.alert_id,
                "model": r.model,
                "from_release": r.from_release,
                "group": r.group,
                "job": r.job,
                "state": r.state,
                "new_release": r.new_release,
                "canary": json.loads(r.canary or "[]"),
                "started_at": r.started_at,
                "updated_at": r.updated_at,
                "detail": r.detail,
            }
            for r in s.scalars(select(R).order_by(R.id.desc()).limit(min(limit, MAX_ROWS))).all()
        ]
