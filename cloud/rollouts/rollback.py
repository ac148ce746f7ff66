"""Abort, rollback by re-release, and the recall of a bad release fleet-wide.

An abort stops a rollout; with rollback every device that was offered the
release is pointed at a re-release of the model it ran before (release numbers
only go up, so "back" is a new number with old bytes). A device that refused
the release runs its old one already and is pointed back at it as it is.

A recall aborts (rolling back) the release's running rollouts, then moves every
other device that runs or wants it to a re-release of an earlier one, tracked
as a rollout of its own.

The callers (``RolloutService``) hold the service lock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from cloud.db import Database
from cloud.device_registry import list_devices
from cloud.fleet import FleetView
from cloud.releases import ReleaseService
from cloud.rollouts.errors import RolloutConflictError, get_rollout, require_state
from cloud.rollouts.journal import DETAIL_DEVICES, Journal
from cloud.rollouts.spec import ACTIVE_STATES, DeviceStatus, RolloutSpec, RolloutState, Target
from cloud.rollouts.tables import Rollout, RolloutDevice

if TYPE_CHECKING:
    from cloud.rollouts.service import Deployer

__all__ = ["Rollback"]

#: Statuses of devices that a rollback must move (they were offered the release).
_OFFERED = (
    DeviceStatus.OFFERED.value,
    DeviceStatus.RETRYING.value,
    DeviceStatus.UPDATED.value,
    DeviceStatus.MISSED.value,
)


@dataclass(frozen=True)
class Rollback:
    """Aborts rollouts and recalls releases."""

    db: Database
    releases: ReleaseService
    fleet: FleetView
    deploy: Deployer
    journal: Journal
    clock: Callable[[], float]

    def abort(self, rid: str, who: str, reason: str, *, rollback: bool, automatic: bool) -> None:
        """``RolloutService.abort``, which returns the rollout's status after it."""
        with self.db.session() as s:
            r = get_rollout(s, rid)
            require_state(r, ACTIVE_STATES, "aborts")
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
            self.journal.record(s, rid, "aborted", r.reason, wave=r.wave)
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
            r = get_rollout(s, rid)
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
            self.journal.record(
                s,
                rid,
                "rollback",
                "rolled back " + ("; ".join(parts) if parts else "no device (none was offered it)"),
                detail={"rollback_releases": mapping, "orphans": orphans[:DETAIL_DEVICES]},
            )

    def recall(
        self,
        model: str,
        release: int,
        *,
        # Keywords only: ``who`` and ``reason`` are both text, easy to swap unseen.
        to_release: int | None,
        who: str,
        reason: str,
        take_down: bool,
        start: Callable[[RolloutSpec], dict[str, Any]],
    ) -> dict[str, Any]:
        """``RolloutService.recall``; ``start`` starts the one-wave rollout that moves
        and tracks the devices still on the release."""
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
            self.abort(
                rid, who, f"recall of release {release}: {reason}", rollback=True, automatic=False
            )
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
            out["recall"] = start(spec)
        if take_down:
            out["taken_down"] = self.releases.take_down(model, release)
        return out
