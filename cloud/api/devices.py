"""Devices and their desired state: the live fleet view and deployments."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud import device_registry as registry
from cloud.api.auth import Operator, Viewer
from cloud.api.deps import CloudContext, Ctx
from cloud.device_registry import DeviceRecord, device_dict
from cloud.releases import UnknownReleaseError
from shared.errors import TransferError
from shared.messages import MODEL_NAME_PATTERN, Desired
from shared.topics import DEVICE_ID_PATTERN

__all__ = ["DeploymentIn", "DesiredIn", "router"]

router = APIRouter(prefix="/api/v1", tags=["devices"])
log = logging.getLogger(__name__)

Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$")]


class DesiredIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    release: Annotated[int, Field(ge=1)]
    rollout_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")] | None = None


class DeploymentIn(DesiredIn):
    devices: (
        Annotated[
            list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern)]],
            Field(max_length=100_000),
        ]
        | None
    ) = None
    all_devices: bool = False


class LabelsIn(BaseModel):
    """``PATCH /devices/{id}``: the operator's group and labels of a device."""

    model_config = ConfigDict(extra="forbid")
    group: Label | None = None
    #: Back to the group the device announces itself (or ``default``).
    clear_group: bool = False
    add_labels: Annotated[list[Label], Field(max_length=32)] = []
    remove_labels: Annotated[list[Label], Field(max_length=32)] = []


def _merged(rec: DeviceRecord, live: dict[str, Any] | None) -> dict[str, Any]:
    out = device_dict(rec)
    if live is not None:
        # The live view is newer than the registry's last batch.
        for key in ("online", "model", "release", "slot", "state", "last_error", "last_seen"):
            if live.get(key) is not None or key == "online":
                out[key] = live[key]
        for key in (
            "desired_release",
            "inferences_total",
            "errors_total",
            "latency_p99_ms",
            "last_telemetry_at",
            "recent_events",
            "slot",
        ):
            out[key] = live.get(key)
    return out


@router.get("/devices")
def list_devices(
    ctx: Ctx,
    _who: Viewer,
    group: str | None = None,
    tag: str | None = None,
    model: str | None = None,
    release: Annotated[int | None, Query(ge=1)] = None,
    online: bool | None = None,
) -> list[dict[str, Any]]:
    """The device registry, with live state; filtered by every parameter given."""
    live = {d["device_id"]: d for d in ctx.fleet.devices()}
    wanted = {"model": model, "release": release, "online": online}

    def keep(d: dict[str, Any]) -> bool:
        return all(v is None or d[k] == v for k, v in wanted.items())

    records = registry.list_devices(ctx.db, group=group, tag=tag)
    out = [d for rec in records if keep(d := _merged(rec, live.get(rec.device_id)))]
    if group is None and tag is None:
        # Heard live but not yet in the registry's last batch.
        known = {rec.device_id for rec in records}
        out += [d for device_id, d in live.items() if device_id not in known and keep(d)]
        out.sort(key=lambda d: d["device_id"])
    return out


@router.get("/devices/{device_id}")
def get_device(ctx: Ctx, _who: Viewer, device_id: str) -> dict[str, Any]:
    rec = registry.get_device(ctx.db, device_id)
    live = ctx.fleet.device(device_id)
    if rec is None:
        if live is None:
            raise HTTPException(404, f"device {device_id!r} has never connected")
        return live
    out = _merged(rec, live)
    out["history"] = registry.history(ctx.db, device_id, limit=20)
    return out


@router.patch("/devices/{device_id}")
def label_device(ctx: Ctx, _who: Operator, device_id: str, body: LabelsIn) -> dict[str, Any]:
    try:
        rec = registry.set_labels(
            ctx.db,
            device_id,
            group=body.group,
            clear_group=body.clear_group,
            add=body.add_labels,
            remove=body.remove_labels,
        )
    except ValueError as e:
        raise HTTPException(422, str(e)) from e
    if rec is None:
        raise HTTPException(404, f"device {device_id!r} has never connected")
    return device_dict(rec)


@router.get("/devices/{device_id}/history")
def device_history(
    ctx: Ctx, _who: Viewer, device_id: str, limit: Annotated[int, Query(ge=1, le=5000)] = 200
) -> list[dict[str, Any]]:
    return registry.history(ctx.db, device_id, limit=limit)


@router.get("/releases/{model}/{release}/devices")
def release_devices(
    ctx: Ctx, _who: Viewer, model: str, release: Annotated[int, Path(ge=1, le=2**53)]
) -> list[dict[str, Any]]:
    """Every device that ever ran this release (taken down or not), and where it is now."""
    return registry.devices_that_ran(ctx.db, model, release)


def _check_release(ctx: CloudContext, model: str, release: int) -> None:
    try:
        ctx.releases.get(model, release)
    except UnknownReleaseError as e:
        raise HTTPException(404, str(e)) from e
    if ctx.mqtt is None:
        raise HTTPException(503, "the cloud has no broker connection")


def publish_desired(
    ctx: CloudContext,
    device_ids: list[str],
    model: str,
    release: int,
    *,
    rollout_id: str | None = None,
    deadline: float | None = None,
) -> list[Desired]:
    """Publish the retained desired state of each device (``TransferError`` if the
    broker does not take it). With broker fan-out, the release's blobs are on the
    broker before any device is told to fetch them."""
    if ctx.mqtt is None:
        raise TransferError("the cloud has no broker connection")
    fanout = getattr(ctx, "fanout", None)
    if fanout is not None:
        try:
            fanout.ensure_release(model, release)
        except TransferError as e:
            # Fan-out is the fast path, not the only one: devices in `auto` fetch
            # over HTTP what the broker lacks. The desired states still go out.
            log.warning("release %s/%s not fanned out through the broker: %s", model, release, e)
    now = time.time()
    out = [
        Desired(
            device_id=device_id,
            model=model,
            release=release,
            rollout_id=rollout_id,
            deadline=deadline,
            issued_at=now,
        )
        for device_id in device_ids
    ]
    for i in range(0, len(out), 1000):
        batch = out[i : i + 1000]
        ctx.mqtt.publish_desired_many(batch)
        for desired in batch:
            ctx.fleet.record_desired(desired)
    return out


def set_desired(ctx: CloudContext, device_id: str, body: DesiredIn) -> Desired:
    """Publish a retained desired state; the broker has it when this returns."""
    try:
        return publish_desired(
            ctx, [device_id], body.model, body.release, rollout_id=body.rollout_id
        )[0]
    except TransferError as e:
        raise HTTPException(503, str(e)) from e


@router.put("/devices/{device_id}/desired")
def put_desired(ctx: Ctx, _who: Operator, device_id: str, body: DesiredIn) -> dict[str, Any]:
    if not DEVICE_ID_PATTERN.match(device_id):
        raise HTTPException(422, f"invalid device id {device_id!r}")
    _check_release(ctx, body.model, body.release)
    return set_desired(ctx, device_id, body).model_dump(mode="json", by_alias=True)


@router.post("/deployments")
def deploy(ctx: Ctx, _who: Operator, body: DeploymentIn) -> dict[str, Any]:
    if body.all_devices == (body.devices is not None):
        raise HTTPException(422, "give exactly one of `devices` (a list) or `all_devices`")
    targets = (
        ctx.fleet.device_ids() if body.all_devices else list(dict.fromkeys(body.devices or []))
    )
    if not targets:
        raise HTTPException(400, "the selection names no devices; nothing was changed")
    _check_release(ctx, body.model, body.release)
    try:
        publish_desired(ctx, targets, body.model, body.release, rollout_id=body.rollout_id)
    except TransferError as e:
        raise HTTPException(503, str(e)) from e
    return {"model": body.model, "release": body.release, "devices": targets}
