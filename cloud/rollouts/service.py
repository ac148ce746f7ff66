"""Rollouts: start, steer and judge the delivery of a release to a fleet.

``RolloutService`` is the one entry point (the API, the retrain loop and
``RolloutController`` use it). It turns an operator's ``RolloutSpec`` into a
rollout row, one row per selected device (its wave, or why it is skipped) and
an event for every decision; it publishes each wave's desired states, pauses
and resumes, and hands the rest to its parts, under one lock:

* ``steering``: what ``tick`` (run every second by ``RolloutController``) folds
  in and decides: waves passing, health gates, failure thresholds, timeouts;
* ``rollback``: abort, rollback by re-release, and the recall of a release;
* ``views``: status, list, events and devices as JSON;
* ``journal``: the decision events and their counts.

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
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.db import Database
from cloud.device_registry import DeviceRecord, list_devices
from cloud.fleet import FleetView
from cloud.releases import ReleaseService
from cloud.rollouts import views
from cloud.rollouts.errors import (
    RolloutConflictError,
    RolloutNotFoundError,
    SelectionError,
    get_rollout,
    require_state,
)
from cloud.rollouts.journal import DETAIL_DEVICES, Journal, summarize
from cloud.rollouts.rollback import Rollback
from cloud.rollouts.spec import (
    ACTIVE_STATES,
    DeviceStatus,
    RolloutSpec,
    RolloutState,
    Target,
    pick_percentage,
    wave_order,
    wave_sizes,
)
from cloud.rollouts.steering import Steering
from cloud.rollouts.tables import Rollout, RolloutDevice
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
        self._journal = Journal(clock)
        self._steering = Steering(db, fleet, self._journal)
        self._rollback = Rollback(db, releases, fleet, deploy, self._journal, clock)

    @property
    def decisions(self) -> Counter[str]:
        """Decisions made (for ``/metrics``): kind -> count."""
        return self._journal.decisions

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
                    f"{spec.release} of {spec.model}: {summarize(skipped)}; nothing was changed"
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
                self._journal.record(
                    s,
                    rid,
                    "started",
                    f"{created_by} started release {spec.release} of {spec.model} on "
                    f"{len(eligible)} devices in {len(sizes)} waves {sizes}"
                    + (f": {spec.reason}" if spec.reason else ""),
                    detail={"selected": len(selected), "eligible": len(eligible)},
                )
                if skipped:
                    self._journal.record(
                        s,
                        rid,
                        "skipped",
                        f"{len(skipped)} incompatible devices skipped: {summarize(skipped)}",
                        detail={"devices": dict(list(skipped.items())[:DETAIL_DEVICES])},
                    )
            self._offer_wave(rid, 0)
            return self.status(rid)

    # -- the steps ---------------------------------------------------------------
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
                    self._journal.record(s, rid, "paused", r.reason, wave=wave)
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
            self._journal.record(
                s,
                rid,
                "wave_started",
                f"wave {wave + 1}: release {release} offered to {len(ids)} devices",
                wave=wave,
                detail={"devices": ids[:DETAIL_DEVICES]},
            )

    def tick(self) -> None:
        """Fold device reports into every live rollout and take the decisions due."""
        with self._lock:
            now = self.clock()
            for rid in self._steering.due():
                try:
                    step = self._steering.judge(rid, now)
                    if step.abort_reason is not None:
                        self.abort(
                            rid,
                            "controller",
                            step.abort_reason,
                            rollback=step.rollback,
                            automatic=True,
                        )
                    elif step.offer_wave is not None:
                        self._offer_wave(rid, step.offer_wave)
                except Exception:
                    log.exception("rollout %s: tick failed", rid)

    # -- operator actions -----------------------------------------------------------
    def pause(self, rid: str, who: str, reason: str = "") -> dict[str, Any]:
        with self._lock, self.db.session() as s:
            r = get_rollout(s, rid)
            require_state(r, (RolloutState.RUNNING.value,), "pauses")
            r.state = RolloutState.PAUSED.value
            r.reason = f"paused by {who}" + (f": {reason}" if reason else "")
            r.updated_at = self.clock()
            self._journal.record(s, rid, "paused", r.reason, wave=r.wave)
        return self.status(rid)

    def resume(
        self, rid: str, who: str, reason: str = "", *, advance: bool = False
    ) -> dict[str, Any]:
        """Resume a paused rollout; ``advance`` starts the next wave now (the operator
        accepts the current one as it is)."""
        offer: int | None = None
        with self._lock:
            with self.db.session() as s:
                r = get_rollout(s, rid)
                require_state(r, (RolloutState.PAUSED.value,), "resumes")
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
                self._journal.record(s, rid, "resumed", r.reason, wave=r.wave)
            pending = self._pending_in_current_wave(rid)
            if offer is None:
                offer = pending  # wave 0 is a wave: compare with None, not truth
            if offer is not None:
                self._offer_wave(rid, offer)
        return self.status(rid)

    def _pending_in_current_wave(self, rid: str) -> int | None:
        with self.db.session() as s:
            r = get_rollout(s, rid)
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
            self._rollback.abort(rid, who, reason, rollback=rollback, automatic=automatic)
        return self.status(rid)

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
            return self._rollback.recall(
                model,
                release,
                to_release=to_release,
                who=who,
                reason=reason,
                take_down=take_down,
                start=lambda spec: self.start(spec, who, kind="rc"),
            )

    # -- views -----------------------------------------------------------------------
    def status(self, rid: str, *, events: int = 20) -> dict[str, Any]:
        return views.rollout_status(self.db, rid, events=events)

    def events(self, rid: str, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return views.rollout_events(self.db, rid, after, limit)

    def devices(self, rid: str, status: str | None = None) -> list[dict[str, Any]]:
        return views.rollout_devices(self.db, rid, status)

    # Last: the name ``list`` shadows the builtin in the annotations below it.
    def list(self, *, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return views.list_rollouts(self.db, state=state, limit=limit)
