"""The read side of rollouts: a rollout's status, the list, its events and its
devices, shaped as the JSON the API and the CLI show.

Reads take no service lock: each runs in a database session of its own.
Waves count from 1 here (and in every event an operator reads); the rows count
from 0.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select

from cloud.db import Database
from cloud.rollouts.errors import get_rollout
from cloud.rollouts.spec import DeviceStatus
from cloud.rollouts.tables import Rollout, RolloutDevice, RolloutEvent

__all__ = [
    "list_rollouts",
    "rollout_devices",
    "rollout_events",
    "rollout_status",
]


def rollout_status(db: Database, rid: str, *, events: int = 20) -> dict[str, Any]:
    with db.session() as s:
        r = get_rollout(s, rid)
        rows = s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rid)).all()
        evs = s.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.rollout_id == rid)
            .order_by(RolloutEvent.id.desc())
            .limit(events)
        ).all()
        return _status_json(r, rows, list(reversed(evs)))


def list_rollouts(
    db: Database, *, state: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    with db.session() as s:
        q = select(Rollout).order_by(Rollout.created_at.desc()).limit(min(limit, 1000))
        if state is not None:
            q = q.where(Rollout.state == state)
        rollouts = list(s.scalars(q))
        # One grouped count for all of them (the controller lists every tick).
        counts: dict[str, Counter[str]] = defaultdict(Counter)
        for rid, status, n in s.execute(
            select(RolloutDevice.rollout_id, RolloutDevice.status, func.count())
            .where(RolloutDevice.rollout_id.in_([r.id for r in rollouts]))
            .group_by(RolloutDevice.rollout_id, RolloutDevice.status)
        ):
            counts[rid][status] = n
        return [_summary_json(r, counts[r.id]) for r in rollouts]


def rollout_events(
    db: Database, rid: str, after: int = 0, limit: int = 500
) -> list[dict[str, Any]]:
    with db.session() as s:
        get_rollout(s, rid)
        return [
            _event_json(e)
            for e in s.scalars(
                select(RolloutEvent)
                .where(RolloutEvent.rollout_id == rid, RolloutEvent.id > after)
                .order_by(RolloutEvent.id)
                .limit(min(limit, 5000))
            )
        ]


def rollout_devices(db: Database, rid: str, status: str | None = None) -> list[dict[str, Any]]:
    with db.session() as s:
        get_rollout(s, rid)
        q = select(RolloutDevice).where(RolloutDevice.rollout_id == rid)
        if status is not None:
            q = q.where(RolloutDevice.status == status)
        return [
            {
                "device_id": d.device_id,
                "wave": None if d.wave is None else d.wave + 1,
                "status": d.status,
                "from_model": d.from_model,
                "from_release": d.from_release,
                "revert_to": d.revert_to,
                "reason": d.reason,
                "offered_at": d.offered_at,
                "done_at": d.done_at,
            }
            for d in s.scalars(q.order_by(RolloutDevice.device_id))
        ]


def _event_json(e: RolloutEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "ts": e.ts,
        "kind": e.kind,
        "wave": None if e.wave is None else e.wave + 1,
        "reason": e.reason,
        "detail": e.detail,
    }


def _summary_json(r: Rollout, counts: Counter[str]) -> dict[str, Any]:
    eligible = sum(n for st, n in counts.items() if st != DeviceStatus.SKIPPED.value)
    return {
        "id": r.id,
        "model": r.model,
        "release": r.release,
        "state": r.state,
        "reason": r.reason,
        "wave": r.wave + 1,
        "waves": len(r.wave_sizes),
        "created_at": r.created_at,
        "created_by": r.created_by,
        "finished_at": r.finished_at,
        "deadline": r.deadline,
        "devices": eligible,
        "counts": dict(counts),
        "progress": counts[DeviceStatus.UPDATED.value] / eligible if eligible else 0.0,
        "rollback": r.rollback,
    }


def _status_json(
    r: Rollout, rows: Sequence[RolloutDevice], evs: list[RolloutEvent]
) -> dict[str, Any]:
    counts = Counter(row.status for row in rows)
    out = _summary_json(r, counts)
    spec = r.spec
    waves = []
    prev = 0
    for i, size in enumerate(r.wave_sizes):
        in_wave = Counter(row.status for row in rows if row.wave == i)
        waves.append(
            {
                "wave": i + 1,
                "percent": spec["waves"][i] if i < len(spec["waves"]) else 100.0,
                "devices": size - prev,
                "cumulative": size,
                "counts": dict(in_wave),
                "state": "done" if i < r.wave else "current" if i == r.wave else "waiting",
            }
        )
        prev = size
    out.update(
        spec=spec,
        wave_started_at=r.wave_started_at,
        wave_passed_at=r.wave_passed_at,
        wave_detail=waves,
        health=r.health,
        events=[_event_json(e) for e in evs],
    )
    return out
