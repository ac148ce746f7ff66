"""Health gates: is the new release as healthy as the one it replaces?

Read from what telemetry ingest stores (``telemetry_windows``, written by
``cloud.ingest``; ``drift_evaluations``, written by the drift monitor):

* error rate: errors per inference of the rollout's updated devices on the new
  release, in telemetry windows that started after the device finished updating;
* latency regression: their inference-weighted p99 on the new release over the
  p99 the rollout's devices showed on their previous release (from
  ``BASELINE_S`` before the start until now) — the same devices, so hardware
  differences cancel out;
* drift: the largest input or prediction PSI the drift monitor found for the new
  release since the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.ingest.tables import DriftEvaluation, TelemetryWindow
from cloud.rollouts.spec import Gates
from cloud.rollouts.tables import RolloutDevice

__all__ = ["BASELINE_S", "Health", "measure_health"]

#: How far before a rollout's start its devices' previous-release telemetry counts.
BASELINE_S = 3600.0
#: Device ids per ``IN (...)`` query (SQLite allows 32k parameters; stay well below).
_CHUNK = 2000


@dataclass
class Health:
    inferences: int = 0
    errors: int = 0
    p99_ms: float | None = None
    baseline_p99_ms: float | None = None
    drift_psi: float | None = None
    failures: list[str] = field(default_factory=list)
    #: True when the error and latency gates had too few inferences to judge.
    insufficient: bool = False

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.inferences if self.inferences else None

    @property
    def latency_ratio(self) -> float | None:
        if self.p99_ms is None or not self.baseline_p99_ms:
            return None
        return self.p99_ms / self.baseline_p99_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "inferences": self.inferences,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p99_ms": self.p99_ms,
            "baseline_p99_ms": self.baseline_p99_ms,
            "latency_ratio": self.latency_ratio,
            "drift_psi": self.drift_psi,
            "insufficient_telemetry": self.insufficient,
            "failures": list(self.failures),
        }


def _sums(row: Any) -> tuple[int, int, float | None]:
    inf, err, weighted, weight = row
    p99 = float(weighted) / int(weight) if weighted is not None and weight else None
    return int(inf), int(err), p99


def _columns() -> tuple[Any, ...]:
    T = TelemetryWindow
    return (
        func.coalesce(func.sum(T.inferences), 0),
        func.coalesce(func.sum(T.errors), 0),
        func.sum(T.p99_ms * T.inferences),
        func.sum(T.inferences).filter(T.p99_ms.is_not(None)),
    )


def _new_release_stats(
    s: Session, rollout_id: str, model: str, release: int
) -> tuple[int, int, float | None]:
    """Windows of the rollout's updated devices on the new release that started
    after the device finished updating: the update's own work (download, checks,
    the swap) is not the new model's latency."""
    T, D = TelemetryWindow, RolloutDevice
    row = s.execute(
        select(*_columns())
        .select_from(T)
        .join(D, D.device_id == T.device_id)
        .where(
            D.rollout_id == rollout_id,
            D.status == "updated",
            T.model == model,
            T.release == release,
            T.window_start >= D.done_at,
        )
    ).one()
    return _sums(row)


def _previous_release_stats(
    s: Session, device_ids: list[str], model: str, release: int, since: float, until: float
) -> float | None:
    """Inference-weighted p99 of ``device_ids`` on any other release of ``model``."""
    T = TelemetryWindow
    weighted = 0.0
    weight = 0
    for i in range(0, len(device_ids), _CHUNK):
        _, _, sum_weighted, sum_weight = s.execute(
            select(*_columns()).where(
                T.device_id.in_(device_ids[i : i + _CHUNK]),
                T.model == model,
                T.release != release,
                T.received_at >= since,
                T.received_at <= until,
            )
        ).one()
        if sum_weighted is not None and sum_weight:
            weighted += float(sum_weighted)
            weight += int(sum_weight)
    return weighted / weight if weight else None


def _drift(s: Session, model: str, release: int, since: float) -> float | None:
    E = DriftEvaluation
    row = s.execute(
        select(func.max(E.psi_mean), func.max(E.pred_psi)).where(
            E.model == model, E.release == release, E.evaluated_at >= since
        )
    ).one()
    values = [float(v) for v in row if v is not None]
    return max(values) if values else None


def measure_health(
    s: Session,
    gates: Gates,
    *,
    rollout_id: str,
    model: str,
    release: int,
    all_devices: list[str],
    started_at: float,
    now: float,
) -> Health:
    """Measure the gates for a rollout and list the ones that fail, with figures."""
    h = Health()
    h.inferences, h.errors, h.p99_ms = _new_release_stats(s, rollout_id, model, release)
    # The previous release's latency on the same devices: before the start, and
    # after it on devices not updated yet.
    h.baseline_p99_ms = _previous_release_stats(
        s, all_devices, model, release, started_at - BASELINE_S, now
    )
    if gates.max_drift_psi is not None:
        h.drift_psi = _drift(s, model, release, started_at)
        if h.drift_psi is not None and h.drift_psi > gates.max_drift_psi:
            h.failures.append(
                f"drift gate: PSI {h.drift_psi:.3f} on release {release} exceeds "
                f"{gates.max_drift_psi:g}"
            )
    if h.inferences < gates.min_inferences:
        h.insufficient = True
        return h
    rate = h.error_rate
    if gates.max_error_rate is not None and rate is not None and rate > gates.max_error_rate:
        h.failures.append(
            f"error-rate gate: {h.errors} errors in {h.inferences} inferences "
            f"({rate:.2%}) on release {release} exceeds {gates.max_error_rate:.2%}"
        )
    ratio = h.latency_ratio
    if (
        gates.max_latency_ratio is not None
        and ratio is not None
        and h.p99_ms is not None
        and h.baseline_p99_ms is not None
        and ratio > gates.max_latency_ratio
        and h.p99_ms - h.baseline_p99_ms > gates.latency_slack_ms
    ):
        h.failures.append(
            f"latency gate: p99 {h.p99_ms:.2f} ms on release {release} is {ratio:.2f}x the "
            f"previous release's {h.baseline_p99_ms:.2f} ms (limit {gates.max_latency_ratio:g}x "
            f"and +{gates.latency_slack_ms:g} ms)"
        )
    return h
