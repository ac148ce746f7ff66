"""Health and counters of the service itself."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cloud.api.auth import Viewer
from cloud.api.deps import Ctx

__all__ = ["router"]

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz(ctx: Ctx) -> dict[str, Any]:
    return {"status": "ok", "broker_connected": bool(ctx.mqtt and ctx.mqtt.connected.is_set())}


@router.get("/api/v1/stats")
def stats(ctx: Ctx, _who: Viewer) -> dict[str, Any]:
    return {
        "messages": ctx.fleet.messages,
        "invalid_messages": ctx.fleet.invalid_messages,
        "devices": len(ctx.fleet.device_ids()),
    }
