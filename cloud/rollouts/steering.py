"""The controller's judgement of one rollout per tick: fold what its devices
report into their statuses, then decide what the rollout does next.

* a wave passes when its success threshold of devices (cumulative, all waves so
  far) runs the release past probation, the soak time has passed and the health
  gates hold; then the next wave's devices are due their desired state;
* the rollout is to abort when more devices fail than the failure threshold
  allows or a health gate fails;
* a wave that does not pass within its timeout pauses the rollout (or is to
  abort it, if so asked); devices not updated by the deadline are marked missed.

``Steering`` writes statuses, events and the rollout's state, but publishes
nothing and aborts nothing itself: it returns a ``Step`` that
``RolloutService.tick`` carries out, as an operator's action would be.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from cloud.db import Database
from cloud.fleet import FleetView
from cloud.rollouts.gates import Health, measure_health
from cloud.rollouts.journal import DETAIL_DEVICES, Journal, summarize
from cloud.rollouts.spec import (
    ACTIVE_STATES,
    DeviceFacts,
    DeviceStatus,
    RolloutSpec,
    RolloutState,
    judge_device,
)
from cloud.rollouts.tables import Rollout, RolloutDevice

__all__ = ["HEALTH_INTERVAL", "Step", "Steering"]

#: Statuses whose devices still report progress worth folding in.
_MOVING = (DeviceStatus.OFFERED.value, DeviceStatus.RETRYING.value, DeviceStatus.REVERTING.value)
#: Seconds between health measurements of one rollout (they query telemetry).
HEALTH_INTERVAL = 2.0


@dataclass(frozen=True)
class Step:
    """What one tick decided for one rollout, beyond what it wrote already."""

    #: The wave whose pending devices are now to be offered the release.
    offer_wave: int | None = None
    #: Why the rollout is to abort (``None``: it carries on).
    abort_reason: str | None = None
    #: Whether that abort rolls back (the spec's ``auto_rollback``).
    rollback: bool = False


class Steering:
    """Judges rollouts from the fleet's reports and the health gates."""

    def __init__(self, db: Database, fleet: FleetView, journal: Journal) -> None:
        self.db = db
        self.fleet = fleet
        self.journal = journal
        #: rollout id -> when its health was last measured.
        self._health_at: dict[str, float] = {}

    def due(self) -> list[str]:
        """Ids of the rollouts a tick must look at."""
        with self.db.session() as s:
            # Live rollouts, and finished ones whose devices are still on their way
            # (stragglers of a completed rollout, devices reverting after an abort).
            moving = (
                select(RolloutDevice.rollout_id)
                .where(
                    RolloutDevice.rollout_id == Rollout.id,
                    RolloutDevice.status.in_(_MOVING),
                )
                .exists()
            )
            return list(
                s.scalars(select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES) | moving))
            )

    def _facts(self, device_ids: list[str]) -> dict[str, DeviceFacts]:
        out = {}
        for d in self.fleet.reported_many(device_ids):
            out[d.device_id] = DeviceFacts(
                model=d.model,
                release=d.release,
                state=d.state.value,
                target_release=d.target_release,
                error_code=d.last_error.code if d.last_error else None,
                error=d.last_error.message if d.last_error else None,
            )
        return out

    def judge(self, rid: str, now: float) -> Step:
        """Fold the devices' reports into rollout ``rid`` and decide its next step."""
        with self.db.session() as s:
            r = s.get(Rollout, rid)
            if r is None:
                return Step()
            spec = RolloutSpec.model_validate(r.spec)
            rows = s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rid)).all()
            moving = [row for row in rows if row.status in _MOVING]
            facts = self._facts([row.device_id for row in moving])
            failed_now: dict[str, str] = {}
            missed: list[str] = []
            # Devices pointed back after an abort get the rollout's deadline span again.
            revert_deadline = (r.finished_at or now) + spec.deadline_s
            for row in moving:
                old = row.status
                revert = row.status == DeviceStatus.REVERTING.value
                new, why = judge_device(
                    DeviceStatus(row.status),
                    facts.get(row.device_id),
                    model=(row.from_model or r.model) if revert else r.model,
                    release=r.release,
                    revert_to=row.revert_to,
                )
                late = now > (revert_deadline if revert else r.deadline)
                if (
                    new in (DeviceStatus.OFFERED, DeviceStatus.RETRYING, DeviceStatus.REVERTING)
                    and late
                ):
                    new, why = DeviceStatus.MISSED, f"not updated by the deadline ({why or old})"
                if new.value == old:
                    continue
                row.status, row.reason = new.value, why or row.reason
                if new in (DeviceStatus.UPDATED, DeviceStatus.FAILED, DeviceStatus.REVERTED):
                    row.done_at = now
                elif new == DeviceStatus.MISSED:
                    row.done_at = now
                    missed.append(row.device_id)
                if new == DeviceStatus.FAILED:
                    failed_now[row.device_id] = why or "failed"
            if failed_now:
                self.journal.record(
                    s,
                    rid,
                    "devices_failed",
                    f"{len(failed_now)} devices failed the update: {summarize(failed_now)}",
                    wave=r.wave,
                    detail={"devices": dict(list(failed_now.items())[:DETAIL_DEVICES])},
                )
            if missed:
                self.journal.record(
                    s,
                    rid,
                    "missed",
                    f"{len(missed)} devices were not updated by the deadline "
                    f"(offline or stuck): {', '.join(missed[:5])}",
                    detail={"devices": missed[:DETAIL_DEVICES]},
                )
            step = Step()
            if r.state == RolloutState.RUNNING.value:
                offer_next, abort_reason = self._progress(s, r, spec, rows, now)
                step = Step(offer_next, abort_reason, spec.auto_rollback)
            r.updated_at = now
        return step

    def _health(
        self, r: Rollout, spec: RolloutSpec, rows: Sequence[RolloutDevice], now: float
    ) -> Health:
        everyone = [row.device_id for row in rows if row.status != DeviceStatus.SKIPPED.value]
        s = object_session(r)
        assert s is not None
        h = measure_health(
            s,
            spec.gates,
            rollout_id=r.id,
            model=r.model,
            release=r.release,
            all_devices=everyone,
            started_at=r.created_at,
            now=now,
        )
        r.health = {**h.to_json(), "measured_at": now}
        self._health_at[r.id] = now
        return h

    def _progress(
        self, s: Session, r: Rollout, spec: RolloutSpec, rows: Sequence[RolloutDevice], now: float
    ) -> tuple[int | None, str | None]:
        """Decide on a running rollout: (wave to offer next, reason to abort)."""
        assigned = [row for row in rows if row.wave is not None and row.wave <= r.wave]
        counts = Counter(row.status for row in assigned)
        n = len(assigned)
        failed = counts[DeviceStatus.FAILED.value]
        updated = counts[DeviceStatus.UPDATED.value]
        if failed and failed / n > spec.failure_threshold:
            return None, (
                f"failure threshold: {failed} of {n} devices offered so far failed "
                f"({failed / n:.0%} > {spec.failure_threshold:.0%})"
            )
        passed = updated / n >= spec.success_threshold
        due = passed or now - self._health_at.get(r.id, 0.0) >= HEALTH_INTERVAL
        health = self._health(r, spec, rows, now) if due else None
        if health is not None and health.failures:
            self.journal.record(
                s,
                r.id,
                "gate_failed",
                "; ".join(health.failures),
                wave=r.wave,
                detail=health.to_json(),
            )
            return None, "health gate failed: " + "; ".join(health.failures)
        last = r.wave == len(r.wave_sizes) - 1
        if passed:
            if r.wave_passed_at is None:
                r.wave_passed_at = now
                self.journal.record(
                    s,
                    r.id,
                    "wave_passed",
                    f"wave {r.wave + 1}: {updated} of {n} devices updated "
                    f"(threshold {spec.success_threshold:.0%})"
                    + (f"; soaking {spec.soak_s:g} s" if spec.soak_s else ""),
                    wave=r.wave,
                )
            assert health is not None
            waiting_for_data = health.insufficient and spec.gates.require_telemetry
            if now - r.wave_passed_at >= spec.soak_s and not waiting_for_data:
                gates_note = (
                    "gates not judged: too little telemetry "
                    f"({health.inferences} < {spec.gates.min_inferences} inferences)"
                    if health.insufficient
                    else "gates held"
                )
                if last:
                    r.state = RolloutState.COMPLETED.value
                    r.finished_at = now
                    r.reason = (
                        f"completed: {updated} of {n} devices run release {r.release}; {gates_note}"
                    )
                    self.journal.record(
                        s, r.id, "completed", r.reason, wave=r.wave, detail={"counts": dict(counts)}
                    )
                    return None, None
                r.reason = f"wave {r.wave + 1} passed ({gates_note}); wave {r.wave + 2} starts"
                self.journal.record(
                    s, r.id, "wave_done", r.reason, wave=r.wave, detail=health.to_json()
                )
                r.wave += 1
                r.wave_started_at = now
                r.wave_passed_at = None
                return r.wave, None
        if now - r.wave_started_at > spec.wave_timeout_s:
            why = (
                f"wave {r.wave + 1} timed out after {spec.wave_timeout_s:g} s: {updated} of {n} "
                f"devices updated, {failed} failed, threshold {spec.success_threshold:.0%}"
            )
            if spec.on_timeout == "abort":
                return None, why
            r.state = RolloutState.PAUSED.value
            r.reason = why + "; paused (resume, or abort)"
            self.journal.record(s, r.id, "timeout", r.reason, wave=r.wave)
        return None, None
