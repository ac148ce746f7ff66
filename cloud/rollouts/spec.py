"""What an operator asks of a rollout, and the pure rules that plan and judge it.

Nothing here touches the database, the broker or a clock: the controller
passes facts and the time in, so every decision can be tested by itself.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.messages import MODEL_NAME_PATTERN
from shared.topics import DEVICE_ID_PATTERN

__all__ = [
    "DEFAULT_WAVES",
    "ACTIVE_STATES",
    "DeviceStatus",
    "Gates",
    "RolloutSpec",
    "RolloutState",
    "Target",
    "TRANSIENT_ERRORS",
    "judge_device",
    "wave_order",
    "wave_sizes",
]

DEFAULT_WAVES = [1.0, 10.0, 50.0, 100.0]

Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$")]
DeviceIdStr = Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern)]


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


#: Rollouts that still steer their devices (and block overlapping rollouts).
ACTIVE_STATES = (RolloutState.RUNNING.value, RolloutState.PAUSED.value)


class DeviceStatus(enum.StrEnum):
    """Where one device stands in one rollout."""

    PENDING = "pending"  # selected; its wave has not started
    OFFERED = "offered"  # desired state published; not there yet
    RETRYING = "retrying"  # a transient failure (download, disk); the agent retries
    UPDATED = "updated"  # runs the release, probation passed
    FAILED = "failed"  # refused or rolled back the release
    MISSED = "missed"  # not updated by the deadline (offline, never came back)
    SKIPPED = "skipped"  # incompatible with the release: never offered
    REVERTING = "reverting"  # rollout aborted: pointed at the rollback release
    REVERTED = "reverted"  # runs the rollback release
    UNCHANGED = "unchanged"  # rollout aborted before its wave: never touched


#: Error codes after which an agent retries by itself: not a verdict on the release.
TRANSIENT_ERRORS = frozenset({"transfer_failed", "storage_failed", "config_invalid", "error"})


class Target(BaseModel):
    """Which devices: every known one, a group, devices carrying all given tags,
    or a list; optionally only a percentage of that selection."""

    model_config = ConfigDict(extra="forbid")
    all: bool = False
    group: Label | None = None
    tags: Annotated[list[Label], Field(max_length=16)] = []
    devices: Annotated[list[DeviceIdStr], Field(max_length=100_000)] | None = None
    percentage: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 100.0

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        kinds = [self.all, self.group is not None, bool(self.tags), self.devices is not None]
        if sum(kinds) == 0:
            raise ValueError("name the devices: all, group, tags or devices")
        if self.all and sum(kinds) > 1:
            raise ValueError("`all` cannot be combined with group, tags or devices")
        return self


class Gates(BaseModel):
    """Health gates, judged on telemetry of the rollout's updated devices."""

    model_config = ConfigDict(extra="forbid")
    #: Errors per inference on the new release above this abort the rollout.
    max_error_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = 0.02
    #: New release's p99 latency over the previous release's (same devices) above this
    #: aborts, when it is also ``latency_slack_ms`` slower (a 0.02 ms model that takes
    #: 0.04 ms is noise, not a regression).
    max_latency_ratio: Annotated[float, Field(ge=1, allow_inf_nan=False)] | None = 1.5
    latency_slack_ms: Annotated[float, Field(ge=0, le=60_000, allow_inf_nan=False)] = 1.0
    #: Drift (PSI of inputs or of predictions) on the new release above this aborts.
    max_drift_psi: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    #: Inferences needed before the error and latency gates judge.
    min_inferences: Annotated[int, Field(ge=1, le=10**9)] = 200
    #: If true a wave waits (up to its timeout) for enough telemetry to judge; if
    #: false a wave whose devices send too little telemetry passes on the counts alone.
    require_telemetry: bool = False


class RolloutSpec(BaseModel):
    """``POST /api/v1/rollouts``."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    release: Annotated[int, Field(ge=1)]
    target: Target
    #: Cumulative percentages of the selection per wave; the last must be 100.
    waves: Annotated[
        list[Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]],
        Field(min_length=1, max_length=20),
    ] = DEFAULT_WAVES
    #: Fraction of a wave's devices (cumulative) that must be updated for it to pass.
    success_threshold: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.95
    #: Fraction of devices offered so far that may fail before the rollout aborts.
    failure_threshold: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.05
    #: Seconds a wave may take to pass; then ``on_timeout``.
    wave_timeout_s: Annotated[float, Field(gt=0, le=30 * 86400, allow_inf_nan=False)] = 1800.0
    on_timeout: Literal["pause", "abort"] = "pause"
    #: Seconds a wave is watched after reaching its success threshold, before the next.
    soak_s: Annotated[float, Field(ge=0, le=7 * 86400, allow_inf_nan=False)] = 0.0
    gates: Gates = Gates()
    #: Devices not updated this long after the start are marked missed.
    deadline_s: Annotated[float, Field(gt=0, le=365 * 86400, allow_inf_nan=False)] = 7 * 86400.0
    #: On an automatic abort, roll updated devices back (re-release of the previous model).
    auto_rollback: bool = True
    reason: Annotated[str, Field(max_length=500)] = ""

    @model_validator(mode="after")
    def _waves_grow(self) -> RolloutSpec:
        if any(b <= a for a, b in zip(self.waves, self.waves[1:], strict=False)):
            raise ValueError(f"waves must grow strictly: {self.waves}")
        if self.waves[-1] != 100:
            raise ValueError(f"the last wave must be 100 (percent of the selection): {self.waves}")
        return self


def wave_sizes(n: int, waves: list[float]) -> list[int]:
    """Cumulative device counts per wave for ``n`` devices: each at least one more
    than the wave before (while devices remain), the last exactly ``n``."""
    out: list[int] = []
    for pct in waves:
        k = min(n, max(math.ceil(n * pct / 100.0 - 1e-9), (out[-1] + 1) if out else 1))
        out.append(k)
    out[-1] = n
    # Drop waves that add nobody (tiny fleets): they would only add waiting.
    dedup: list[int] = []
    for k in out:
        if not dedup or k > dedup[-1]:
            dedup.append(k)
    return dedup


def wave_order(rollout_id: str, devices: list[tuple[str, bool]]) -> list[str]:
    """Order (device id, online) pairs for the waves: online devices first (a canary
    that is offline proves nothing), then a hash of rollout and device, so each
    rollout picks different, unbiased canaries."""

    def key(d: tuple[str, bool]) -> tuple[bool, str]:
        h = hashlib.sha256(f"{rollout_id}/{d[0]}".encode()).hexdigest()
        return (not d[1], h)

    return [d for d, _ in sorted(devices, key=key)]


def pick_percentage(rollout_id: str, device_ids: list[str], percentage: float) -> list[str]:
    """A stable ``percentage`` of ``device_ids`` (at least one), chosen by hash."""
    if percentage >= 100:
        return list(device_ids)
    k = max(1, math.ceil(len(device_ids) * percentage / 100.0 - 1e-9))
    ranked = sorted(device_ids, key=lambda d: hashlib.sha256(f"{rollout_id}%{d}".encode()).digest())
    return sorted(ranked[:k])


@dataclass(frozen=True)
class DeviceFacts:
    """What the device last reported (``None`` fields: not reported yet)."""

    model: str | None
    release: int | None
    state: str | None
    target_release: int | None
    error_code: str | None
    error: str | None


def judge_device(
    status: DeviceStatus,
    facts: DeviceFacts | None,
    *,
    model: str,
    release: int,
    revert_to: int | None = None,
) -> tuple[DeviceStatus, str | None]:
    """The new status of a device from what it reports, with a reason when it failed.

    ``model``/``release`` is the rollout's release; ``revert_to`` the rollback
    release a reverting device was pointed at.
    """
    if facts is None:
        return status, None
    settled = facts.state in ("idle", "committed")
    if status == DeviceStatus.REVERTING:
        if revert_to is not None and settled and (facts.model, facts.release) == (model, revert_to):
            return DeviceStatus.REVERTED, None
        return status, None
    if status not in (DeviceStatus.OFFERED, DeviceStatus.RETRYING):
        return status, None
    if settled and (facts.model, facts.release) == (model, release):
        return DeviceStatus.UPDATED, None
    if facts.target_release == release and facts.state in ("rolled_back", "failed"):
        why = f"{facts.error_code or facts.state}: {facts.error or 'no reason given'}"
        if facts.state == "failed" and (facts.error_code or "error") in TRANSIENT_ERRORS:
            return DeviceStatus.RETRYING, why
        return DeviceStatus.FAILED, why
    return status, None
