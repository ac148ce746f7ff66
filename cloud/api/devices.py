"""Devices and their desired state: the live fleet view and deployments."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.auth import Operator, Viewer
from cloud.api.deps import CloudContext, Ctx
from cloud.releases import UnknownReleaseError
from shared.errors import TransferError
from shared.messages import MODEL_NAME_PATTERN, Desired
from shared.topics import DEVICE_ID_PATTERN

__all__ = ["DeploymentIn", "DesiredIn", "router"]

router = APIRouter(prefix="/api/v1", tags=["devices"])


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


@router.get("/devices")
def list_devices(ctx: Ctx, _who: Viewer) -> list[dict[str, Any]]:
    return ctx.fleet.devices()


@router.get("/devices/{device_id}")
def get_device(ctx: Ctx, _who: Viewer, device_id: str) -> dict[str, Any]:
    dev = ctx.fleet.device(device_id)
    if dev is None:
        raise HTTPException(404, f"device {device_id!r} has never connected")
    return dev


def _check_release(ctx: CloudContext, model: str, release: int) -> None:
    try:
        ctx.releases.get(model, release)
    except UnknownReleaseError as e:
        raise HTTPException(404, str(e)) from e
    if ctx.mqtt is None:
        raise HTTPException(503, "the cloud has no broker connection")


def set_desired(ctx: CloudContext, device_id: str, body: DesiredIn) -> Desired:
    """Publish a retained desired state; the broker has it when this returns."""
    if ctx.mqtt is None:
        raise HTTPException(503, "the cloud has no broker connection")
    desired = Desired(
        device_id=device_id,
        model=body.model,
        release=body.release,
        rollout_id=body.rollout_id,
        issued_at=time.time(),
    )
    try:
        ctx.mqtt.publish_desired(desired)
    except TransferError as e:
        raise HTTPException(503, str(e)) from e
    ctx.fleet.record_desired(desired)
    return desired


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
    for device_id in targets:
        set_desired(ctx, device_id, body)
    return {"model": body.model, "release": body.release, "devices": targets}
