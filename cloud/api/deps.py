"""Dependencies shared by the routes: the service context of this process."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from cloud.config import CloudSettings
from cloud.db import Database
from cloud.device_registry import DeviceRegistry
from cloud.fanout import BlobFanout
from cloud.fleet import FleetView
from cloud.mqtt_bridge import CloudMqtt
from cloud.ratelimit import TokenBucketLimiter
from cloud.releases import ReleaseService
from cloud.rollouts.service import RolloutService
from cloud.tuf_repo import ReleaseRepository

__all__ = ["CloudContext", "Ctx"]


@dataclass
class CloudContext:
    """The services one cloud process runs; shared by the routes."""

    settings: CloudSettings
    db: Database
    repo: ReleaseRepository
    releases: ReleaseService
    fleet: FleetView
    mqtt: CloudMqtt | None
    registry: DeviceRegistry
    rollouts: RolloutService
    #: Release blobs fanned out through the broker (``None``: off, or no broker).
    fanout: BlobFanout | None = None
    #: The operator API's rate limit (``cloud.api.ratelimit``; ``None``: off).
    rate_limiter: TokenBucketLimiter | None = None


def _ctx(request: Request) -> CloudContext:
    ctx: CloudContext = request.app.state.ctx
    return ctx


Ctx = Annotated[CloudContext, Depends(_ctx)]
