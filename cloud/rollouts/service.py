"""Rollouts: start, steer and judge the delivery of a release to a fleet.

``RolloutService`` turns an operator's ``RolloutSpec`` into a rollout row, one
row per selected device (its wave, or why it is skipped) and an event for every
decision; ``tick`` (run every second by ``RolloutController``) folds what the
devices report into their statuses and moves the rollout on:

* a wave passes when its success threshold of devices (cumulative, all waves so
  far) runs the release past probation, the soak time has passed and the health
  gates hold; then the next wave's devices get their desired state;
* the rollout aborts itself when more devices fail than the failure threshold
  allows or a health gate fails; with ``auto_rollback`` every device that was
  offered the release is pointed at a re-release of the model it ran before
  (release numbers only go up, so "back" is a new number with old bytes);
* a wave that does not pass within its timeout pauses the rollout (or aborts
  it, if so asked); devices not updated by the deadline are marked missed.

Desired states are retained on the broker, so an offline device catches up
when it returns, as long as the rollout wants it.

One controller steers the rollouts of one database: run one cloud service
process with the controller (``rollout_controller = true``, the default).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, object_session

from cloud.db import Database
from cloud.device_registry import DeviceRecord, list_devices
from cloud.fleet import FleetView
from cloud.releases import ReleaseService
from cloud.rollouts.gates import Health, measure_health
from cloud.rollouts.spec import (
    ACTIVE_STATES,
    DeviceFacts,
    DeviceStatus,
    RolloutSpec,
    RolloutState,
    Target,
    judge_device,
    pick_percentage,
    wave_order,
    wave_sizes,
)
from cloud.rollouts.tables import Rollout, RolloutDevice, RolloutEvent
from shared.errors import EdgefleetError, IncompatibleReleaseError
from shared.manifest import ReleaseManifest, check_compatible

__all__ = [
    "Deployer",
    "RolloutConflictError",
    "RolloutNotFoundError",
    "RolloutService",
    "SelectionError",
]

log = logging.getLogger(__name__)

#: ``deploy(device_ids, model, release, rollout_id, deadline)``: publish the
#: retained desired state of each device (raises ``TransferError``).
Deployer = Callable[[list[str], str, int, str, float | None], None]

#: Statuses of devices that a rollback must move (they were offered the release).
_OFFERED = (
    DeviceStatus.OFFERED.value,
    DeviceStatus.RETRYING.value,
    DeviceStatus.UPDATED.value,
    DeviceStatus.MISSED.value,
)
#: Statuses whose devices still report progress worth folding in.
_MOVING = (DeviceStatus.OFFERED.value, DeviceStatus.RETRYING.value, DeviceStatus.REVERTING.value)
#: Seconds between health measurements of one rollout (they query telemetry).
HEALTH_INTERVAL = 2.0
#: Devices named in one event's detail at most.
_DETAIL_DEVICES = 50


class RolloutNotFoundError(EdgefleetError):
    code = "rollout_not_found"


class RolloutConflictError(EdgefleetError):
    """The request clashes with the state of a rollout (overlap, wrong state)."""

    code = "rollout_conflict"


class SelectionError(EdgefleetError):
    """The selection names no device that could take the release."""

    code = "empty_selection"


def _summary(reasons: dict[str, str], limit: int = 3) -> str:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for device, why in reasons.items():
        by_reason[why].append(device)
    parts = [
        f"{len(ids)} x {why} (e.g. {ids[0]})"
        for why, ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))[:limit]
    ]
    return "; ".join(parts)


class RolloutService:
    """Rollout operations and the controller's tick. Thread-safe (one lock)."""

    def __init__(
        self,
        db: Database,
        releases: ReleaseService,
        fleet: FleetView,
        deploy: Deployer,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.releases = releases
        self.fleet = fleet
        self.deploy = deploy
        self.clock = clock
        self._lock = threading.RLock()
        self._health_at: dict[str, float] = {}
        #: Decisions made (for ``/metrics``): kind -> count.
        self.decisions: Counter[str] = Counter()

    # -- starting ------------------------------------------------------------------
    def _select(self, rid: str, target: Target) -> list[DeviceRecord]:
        if target.devices is not None:
            wanted = list(dict.fromkeys(target.devices))
            known = {r.device_id: r for r in list_devices(self.db)}
            unknown = [d for d in wanted if d not in known]
            if unknown:
                raise SelectionError(
                    f"{len(unknown)} of the listed devices never connected: "
                    f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; "
                    "nothing was changed"
                )
            rows = [known[d] for d in wanted]
        else:
            rows = list_devices(self.db, group=target.group)
            for tag in target.tags:
                rows = [r for r in rows if tag in r.tags]
        chosen = set(pick_percentage(rid, [r.device_id for r in rows], target.percentage))
        return [r for r in rows if r.device_id in chosen]

    @staticmethod
    def _incompatibility(manifest: ReleaseManifest, rec: DeviceRecord) -> str | None:
        if rec.agent_version is None or rec.runtime is None:
            return "has not reported its agent version and runtime yet"
        try:
            check_compatible(
                manifest,
                agent_version=rec.agent_version,
                runtime_ops=None,
                # Hardware facts only: an operator's labels do not give a device an NPU.
                hardware_tags=frozenset(rec.hw_tags or []),
                runtime=rec.runtime,
            )
        except IncompatibleReleaseError as e:
            return str(e)
        return None

    def _active_devices(self, s: Session, device_ids: Iterable[str]) -> dict[str, str]:
        """device id -> id of the active rollout steering it, for ``device_ids``."""
        ids = list(device_ids)
        out: dict[str, str] = {}
        for i in range(0, len(ids), 2000):
            rows = s.execute(
                select(RolloutDevice.device_id, RolloutDevice.rollout_id)
                .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
                .where(
                    Rollout.state.in_(ACTIVE_STATES),
                    RolloutDevice.device_id.in_(ids[i : i + 2000]),
                    RolloutDevice.status != DeviceStatus.SKIPPED.value,
                )
            ).all()
            out.update({d: r for d, r in rows})
        return out

    def start(self, spec: RolloutSpec, created_by: str, *, kind: str = "ro") -> dict[str, Any]:
        """Validate, plan and start a rollout; raises on bad input with nothing changed."""
        with self._lock:
            manifest = self.releases.get(spec.model, spec.release)  # UnknownReleaseError: 404
            now = self.clock()
            rid = f"{kind}-{secrets.token_hex(4)}"
            selected = self._select(rid, spec.target)
            if not selected:
                raise SelectionError(
                    f"the selection {spec.target.model_dump(exclude_defaults=True)} names no "
                    "known device; nothing was changed"
                )
            skipped = {
                rec.device_id: why
                for rec in selected
                if (why := self._incompatibility(manifest, rec)) is not None
            }
            eligible = [r for r in selected if r.device_id not in skipped]
            if not eligible:
                raise SelectionError(
                    f"none of the {len(selected)} selected devices can run release "
                    f"{spec.release} of {spec.model}: {_summary(skipped)}; nothing was changed"
                )
            with self.db.session() as s:
                busy = self._active_devices(s, [r.device_id for r in eligible])
                if busy:
                    rollouts = sorted(set(busy.values()))
                    example = sorted(busy)[:5]
                    raise RolloutConflictError(
                        f"{len(busy)} selected devices ({', '.join(example)}"
                        f"{' ...' if len(busy) > 5 else ''}) are in the running rollout(s) "
                        f"{', '.join(rollouts)}; abort or finish those first. Nothing was changed"
                    )
                live = {d["device_id"]: d for d in self.fleet.devices()}
                order = wave_order(
                    rid,
                    [
                        (r.device_id, bool(live.get(r.device_id, {}).get("online", r.online)))
                        for r in eligible
                    ],
                )
                sizes = wave_sizes(len(order), spec.waves)
                wave_of: dict[str, int] = {}
                start = 0
                for w, end in enumerate(sizes):
                    for d in order[start:end]:
                        wave_of[d] = w
                    start = end
                rollout = Rollout(
                    id=rid,
                    model=spec.model,
                    release=spec.release,
                    state=RolloutState.RUNNING.value,
                    spec=spec.model_dump(mode="json"),
                    wave_sizes=sizes,
                    wave=0,
                    wave_started_at=now,
                    wave_passed_at=None,
                    created_at=now,
                    created_by=created_by[:64],
                    updated_at=now,
                    deadline=now + spec.deadline_s,
                    reason=spec.reason or "started",
                    rollback={},
                    health={},
                )
                s.add(rollout)
                for rec in selected:
                    already = (rec.model, rec.release) == (spec.model, spec.release) and (
                        rec.state in ("idle", "committed")
                    )
                    status = (
                        DeviceStatus.SKIPPED
                        if rec.device_id in skipped
                        else DeviceStatus.UPDATED
                        if already
                        else DeviceStatus.PENDING
                    )
                    s.add(
                        RolloutDevice(
                            rollout_id=rid,
                            device_id=rec.device_id,
                            wave=wave_of.get(rec.device_id),
                            status=status.value,
                            from_model=rec.model,
                            from_release=rec.release,
                            reason=skipped.get(rec.device_id)
                            or ("already ran the release" if already else None),
                            done_at=now if already else None,
                        )
                    )
                self._event(
                    s,
                    rid,
                    "started",
                    f"{created_by} started release {spec.release} of {spec.model} on "
                    f"{len(eligible)} devices in {len(sizes)} waves {sizes}"
                    + (f": {spec.reason}" if spec.reason else ""),
                    detail={"selected": len(selected), "eligible": len(eligible)},
                )
                if skipped:
                    self._event(
                        s,
                        rid,
                        "skipped",
                        f"{len(skipped)} incompatible devices skipped: {_summary(skipped)}",
                        detail={"devices": dict(list(skipped.items())[:_DETAIL_DEVICES])},
                    )
            self._offer_wave(rid, 0)
            return self.status(rid)

    # -- the steps ---------------------------------------------------------------
    def _event(
        self,
        s: Session,
        rid: str,
        kind: str,
        reason: str,
        *,
        wave: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.decisions[kind] += 1
        s.add(
            RolloutEvent(
                rollout_id=rid,
                ts=self.clock(),
                kind=kind,
                wave=wave,
                reason=reason,
                detail=detail or {},
            )
        )
        log.info("rollout %s: %s: %s", rid, kind, reason)

    def _offer_wave(self, rid: str, wave: int) -> None:
        """Publish the desired state to the pending devices of ``wave``."""
        with self.db.session() as s:
            r = s.get(Rollout, rid)
            assert r is not None
            rows = s.scalars(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id == rid,
                    RolloutDevice.wave == wave,
                    RolloutDevice.status == DeviceStatus.PENDING.value,
                )
            ).all()
            ids = [row.device_id for row in rows]
            model, release, deadline = r.model, r.release, r.deadline
        if ids:
            try:
                self.deploy(ids, model, release, rid, deadline)
            except EdgefleetError as e:
                with self.db.session() as s:
                    r = s.get(Rollout, rid)
                    assert r is not None
                    r.state = RolloutState.PAUSED.value
                    r.reason = f"could not publish wave {wave + 1}: {e}; resume to retry"
                    r.updated_at = self.clock()
                    self._event(s, rid, "paused", r.reason, wave=wave)
                raise
        now = self.clock()
        with self.db.session() as s:
            for row in s.scalars(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id == rid, RolloutDevice.device_id.in_(ids)
                )
            ):
                row.status = DeviceStatus.OFFERED.value
                row.offered_at = now
            self._event(
                s,
                rid,
                "wave_started",
                f"wave {wave + 1}: release {release} offered to {len(ids)} devices",
                wave=wave,
                detail={"devices": ids[:_DETAIL_DEVICES]},
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

    def tick(self) -> None:
        """Fold device reports into every live rollout and take the decisions due."""
        with self._lock:
            now = self.clock()
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
                ids = list(
                    s.scalars(select(Rollout.id).where(Rollout.state.in_(ACTIVE_STATES) | moving))
                )
            for rid in ids:
                try:
                    self._tick_one(rid, now)
                except Exception:
                    log.exception("rollout %s: tick failed", rid)

    def _tick_one(self, rid: str, now: float) -> None:
        offer_next: int | None = None
        abort_reason: str | None = None
        with self.db.session() as s:
            r = s.get(Rollout, rid)
            if r is None:
                return
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
                self._event(
                    s,
                    rid,
                    "devices_failed",
                    f"{len(failed_now)} devices failed the update: {_summary(failed_now)}",
                    wave=r.wave,
                    detail={"devices": dict(list(failed_now.items())[:_DETAIL_DEVICES])},
                )
            if missed:
                self._event(
                    s,
                    rid,
                    "missed",
                    f"{len(missed)} devices were not updated by the deadline "
                    f"(offline or stuck): {', '.join(missed[:5])}",
                    detail={"devices": missed[:_DETAIL_DEVICES]},
                )
            if r.state == RolloutState.RUNNING.value:
                offer_next, abort_reason = self._progress(s, r, spec, rows, now)
            r.updated_at = now
        if abort_reason is not None:
            self.abort(rid, "controller", abort_reason, rollback=spec.auto_rollback, automatic=True)
        elif offer_next is not None:
            self._offer_wave(rid, offer_next)

    def _health(
        self, r: Rollout, spec: RolloutSpec, rows: list[RolloutDevice], now: float
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
        self, s: Session, r: Rollout, spec: RolloutSpec, rows: list[RolloutDevice], now: float
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
            self._event(
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
                self._event(
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
                    self._event(
                        s, r.id, "completed", r.reason, wave=r.wave, detail={"counts": dict(counts)}
                    )
                    return None, None
                r.reason = f"wave {r.wave + 1} passed ({gates_note}); wave {r.wave + 2} starts"
                self._event(s, r.id, "wave_done", r.reason, wave=r.wave, detail=health.to_json())
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
            self._event(s, r.id, "timeout", r.reason, wave=r.wave)
        return None, None

    # -- operator actions -----------------------------------------------------------
    def _get(self, s: Session, rid: str) -> Rollout:
        r = s.get(Rollout, rid)
        if r is None:
            raise RolloutNotFoundError(f"no rollout {rid!r}")
        return r

    def pause(self, rid: str, who: str, reason: str = "") -> dict[str, Any]:
        with self._lock, self.db.session() as s:
            r = self._get(s, rid)
            if r.state != RolloutState.RUNNING.value:
                raise RolloutConflictError(f"rollout {rid} is {r.state}; only a running one pauses")
            r.state = RolloutState.PAUSED.value
            r.reason = f"paused by {who}" + (f": {reason}" if reason else "")
            r.updated_at = self.clock()
            self._event(s, rid, "paused", r.reason, wave=r.wave)
        return self.status(rid)

    def resume(
        self, rid: str, who: str, reason: str = "", *, advance: bool = False
    ) -> dict[str, Any]:
        """Resume a paused rollout; ``advance`` starts the next wave now (the operator
        accepts the current one as it is)."""
        offer: int | None = None
        with self._lock:
            with self.db.session() as s:
                r = self._get(s, rid)
                if r.state != RolloutState.PAUSED.value:
                    raise RolloutConflictError(
                        f"rollout {rid} is {r.state}; only a paused one resumes"
                    )
                now = self.clock()
                r.state = RolloutState.RUNNING.value
                r.wave_started_at = now
                r.updated_at = now
                r.reason = f"resumed by {who}" + (f": {reason}" if reason else "")
                if advance and r.wave < len(r.wave_sizes) - 1:
                    r.wave += 1
                    r.wave_passed_at = None
                    r.reason += f"; wave {r.wave + 1} started by hand"
                    offer = r.wave
                self._event(s, rid, "resumed", r.reason, wave=r.wave)
            pending = self._pending_in_current_wave(rid)
            if offer is not None or pending:
                self._offer_wave(rid, offer if offer is not None else pending)
        return self.status(rid)

    def _pending_in_current_wave(self, rid: str) -> int | None:
        with self.db.session() as s:
            r = self._get(s, rid)
            n = s.scalar(
                select(RolloutDevice.device_id).where(
                    RolloutDevice.rollout_id == rid,
                    RolloutDevice.wave == r.wave,
                    RolloutDevice.status == DeviceStatus.PENDING.value,
                )
            )
            return r.wave if n else None

    def abort(
        self,
        rid: str,
        who: str,
        reason: str = "",
        *,
        rollback: bool = True,
        automatic: bool = False,
    ) -> dict[str, Any]:
        """Stop a rollout; with ``rollback`` every device it offered the release to
        goes back to the model it ran before, re-released under a new number."""
        with self._lock:
            with self.db.session() as s:
                r = self._get(s, rid)
                if r.state not in ACTIVE_STATES:
                    raise RolloutConflictError(
                        f"rollout {rid} is {r.state}; only a running or paused one aborts"
                    )
                now = self.clock()
                r.state = RolloutState.ABORTED.value
                r.finished_at = now
                r.updated_at = now
                by = "automatically" if automatic else f"by {who}"
                r.reason = f"aborted {by}" + (f": {reason}" if reason else "")
                rows = s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rid)).all()
                for row in rows:
                    if row.status == DeviceStatus.PENDING.value:
                        row.status = DeviceStatus.UNCHANGED.value
                self._event(s, rid, "aborted", r.reason, wave=r.wave)
                groups: dict[tuple[str, int], list[str]] = defaultdict(list)
                back_in_place: dict[tuple[str, int], list[str]] = defaultdict(list)
                orphans: list[str] = []
                if rollback:
                    for row in rows:
                        if row.from_model is None or row.from_release is None:
                            if row.status in _OFFERED or row.status == DeviceStatus.FAILED.value:
                                orphans.append(row.device_id)
                            continue
                        key = (row.from_model, row.from_release)
                        if row.status in _OFFERED:
                            groups[key].append(row.device_id)
                        elif row.status == DeviceStatus.FAILED.value:
                            # It refused or rolled back the release by itself: it runs
                            # the old release already, and points back at it.
                            back_in_place[key].append(row.device_id)
                deadline = now + RolloutSpec.model_validate(r.spec).deadline_s
            if rollback:
                self._roll_back(rid, who, reason, groups, back_in_place, orphans, deadline)
        return self.status(rid)

    def _roll_back(
        self,
        rid: str,
        who: str,
        reason: str,
        groups: dict[tuple[str, int], list[str]],
        back_in_place: dict[tuple[str, int], list[str]],
        orphans: list[str],
        deadline: float,
    ) -> None:
        mapping: dict[str, int] = {}
        moved: dict[str, tuple[int, list[str]]] = {}
        for (model, from_release), ids in sorted(groups.items()):
            manifest = self.releases.rerelease(
                model,
                from_release,
                reason=f"rollback of rollout {rid}" + (f": {reason}" if reason else ""),
                published_by=who,
            )
            mapping[f"{model}/{from_release}"] = manifest.release
            self.deploy(ids, model, manifest.release, f"{rid}-rollback", deadline)
            moved[f"{model}/{from_release}"] = (manifest.release, ids)
        for (model, from_release), ids in sorted(back_in_place.items()):
            self.deploy(ids, model, from_release, f"{rid}-rollback", deadline)
        with self.db.session() as s:
            r = self._get(s, rid)
            r.rollback = mapping
            targets: dict[str, int] = {}
            for (_model, from_release), ids in back_in_place.items():
                targets.update({d: from_release for d in ids})
            for _key, (release, ids) in moved.items():
                targets.update({d: release for d in ids})
            for row in s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rid)):
                if row.device_id in targets:
                    row.status = DeviceStatus.REVERTING.value
                    row.revert_to = targets[row.device_id]
                    row.done_at = None
            parts = [
                f"{len(ids)} devices to {key.split('/')[0]} release {key.split('/')[1]} "
                f"re-released as {rel}"
                for key, (rel, ids) in moved.items()
            ]
            if back_in_place:
                n = sum(len(v) for v in back_in_place.values())
                parts.append(f"{n} devices that refused it back to the release they run")
            if orphans:
                parts.append(
                    f"{len(orphans)} devices had no earlier model and stay on the release "
                    f"({', '.join(orphans[:5])})"
                )
            self._event(
                s,
                rid,
                "rollback",
                "rolled back " + ("; ".join(parts) if parts else "no device (none was offered it)"),
                detail={"rollback_releases": mapping, "orphans": orphans[:_DETAIL_DEVICES]},
            )

    def recall(
        self,
        model: str,
        release: int,
        who: str,
        reason: str,
        *,
        to_release: int | None = None,
        take_down: bool = False,
    ) -> dict[str, Any]:
        """Stop a bad release fleet-wide: abort its rollouts (rolling back), then move
        every other device that runs or wants it to a re-release of ``to_release``
        (default: the newest earlier release), tracked as a one-wave rollout."""
        with self._lock:
            self.releases.get(model, release)
            earlier = [m.release for m in self.releases.releases(model) if m.release < release]
            if to_release is None:
                if not earlier:
                    raise RolloutConflictError(
                        f"release {release} of {model} has no earlier release to go back to"
                    )
                to_release = max(earlier)
            elif to_release not in earlier:
                raise RolloutConflictError(
                    f"cannot recall to release {to_release}: it is not an earlier published "
                    f"release of {model} (earlier: {earlier or 'none'})"
                )
            with self.db.session() as s:
                active = list(
                    s.scalars(
                        select(Rollout.id).where(
                            Rollout.model == model,
                            Rollout.release == release,
                            Rollout.state.in_(ACTIVE_STATES),
                        )
                    )
                )
            for rid in active:
                self.abort(rid, who, f"recall of release {release}: {reason}", rollback=True)
            registered = {r.device_id for r in list_devices(self.db)}
            affected = [d for d in self.fleet.devices_on(model, release) if d in registered]
            out: dict[str, Any] = {"aborted": active, "recall": None, "taken_down": []}
            if affected:
                manifest = self.releases.rerelease(
                    model,
                    to_release,
                    reason=f"recall of release {release}: {reason}",
                    published_by=who,
                )
                spec = RolloutSpec(
                    model=model,
                    release=manifest.release,
                    target=Target(devices=affected),
                    waves=[100.0],
                    success_threshold=1.0,
                    failure_threshold=0.99,
                    gates={"max_error_rate": None, "max_latency_ratio": None},
                    auto_rollback=False,
                    reason=f"recall of release {release} to release {to_release}: {reason}",
                )
                out["recall"] = self.start(spec, who, kind="rc")
            if take_down:
                out["taken_down"] = self.releases.take_down(model, release)
            return out

    # -- views -----------------------------------------------------------------------
    def status(self, rid: str, *, events: int = 20) -> dict[str, Any]:
        with self.db.session() as s:
            r = self._get(s, rid)
            rows = s.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rid)).all()
            evs = s.scalars(
                select(RolloutEvent)
                .where(RolloutEvent.rollout_id == rid)
                .order_by(RolloutEvent.id.desc())
                .limit(events)
            ).all()
            return _status_json(r, rows, list(reversed(evs)))

    def list(self, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        with self.db.session() as s:
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

    def events(self, rid: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        with self.db.session() as s:
            self._get(s, rid)
            return [
                _event_json(e)
                for e in s.scalars(
                    select(RolloutEvent)
                    .where(RolloutEvent.rollout_id == rid, RolloutEvent.id > after)
                    .order_by(RolloutEvent.id)
                    .limit(min(limit, 5000))
                )
            ]

    def devices(self, rid: str, status: str | None = None) -> list[dict[str, Any]]:
        with self.db.session() as s:
            self._get(s, rid)
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


def _status_json(r: Rollout, rows: list[RolloutDevice], evs: list[RolloutEvent]) -> dict[str, Any]:
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
