"""The cloud HTTP service (FastAPI): TUF repository, releases, devices, deployments.

Routes are thin: they validate input, call services and map domain errors to
HTTP status codes (unknown release 404, broker unavailable 503, bad input
4xx with a reason) so that no client mistake becomes a 500.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from cloud.config import CloudSettings
from cloud.fleet import FleetView
from cloud.mqtt_bridge import CloudMqtt
from cloud.releases import ReleaseService, UnknownReleaseError
from cloud.tuf_repo import ReleaseRepository
from shared.errors import TransferError
from shared.messages import MODEL_NAME_PATTERN, Desired
from shared.topics import DEVICE_ID_PATTERN

__all__ = ["CloudContext", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class CloudContext:
    """The services one cloud process runs; shared by the routes."""

    settings: CloudSettings
    repo: ReleaseRepository
    releases: ReleaseService
    fleet: FleetView
    mqtt: CloudMqtt | None


class DesiredIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    release: Annotated[int, Field(ge=1)]
    rollout_id: str | None = None


class DeploymentIn(DesiredIn):
    devices: Annotated[list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN.pattern)]],
                       Field(max_length=100_000)] | None = None
    all_devices: bool = False


def _ctx(request: Request) -> CloudContext:
    ctx: CloudContext = request.app.state.ctx
    return ctx


Ctx = Annotated[CloudContext, Depends(_ctx)]


def _refresh_loop(ctx: CloudContext, stop: threading.Event) -> None:
    # Timestamp metadata expires within a day by design (freeze-attack window);
    # the service re-signs whatever is close to expiry.
    while not stop.wait(ctx.settings.refresh_interval):
        try:
            ctx.repo.refresh()
        except Exception:
            log.exception("TUF metadata refresh failed")


def create_app(settings: CloudSettings, *, connect_mqtt: bool = True) -> FastAPI:
    """Build the app; opening the repository creates keys on first run."""
    repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
    fleet = FleetView()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: CloudContext = app.state.ctx
        stop = threading.Event()
        if connect_mqtt:
            ctx.mqtt = CloudMqtt(settings.broker_host, settings.broker_port,
                                 on_message=fleet.apply,
                                 on_invalid=lambda topic, why: fleet.record_invalid(),
                                 share_group=settings.ingest_group)
            ctx.mqtt.start()
        refresher = threading.Thread(target=_refresh_loop, args=(ctx, stop), daemon=True,
                                     name="tuf-refresh")
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            if ctx.mqtt is not None:
                ctx.mqtt.stop()

    app = FastAPI(title="edgefleet cloud", version="0.1.0", lifespan=lifespan)
    app.state.ctx = CloudContext(settings=settings, repo=repo, releases=ReleaseService(repo),
                                 fleet=fleet, mqtt=None)
    # The TUF repository: devices fetch metadata and targets here (HTTP Range supported).
    app.mount("/tuf", StaticFiles(directory=settings.repo_dir, check_dir=True), name="tuf")

    @app.get("/healthz")
    def healthz(ctx: Ctx) -> dict[str, Any]:
        return {"status": "ok",
                "broker_connected": bool(ctx.mqtt and ctx.mqtt.connected.is_set())}

    @app.get("/api/v1/releases")
    def list_releases(ctx: Ctx, model: str | None = None) -> list[dict[str, Any]]:
        return [m.model_dump(mode="json", by_alias=True) for m in ctx.releases.releases(model)]

    @app.get("/api/v1/releases/{model}/{release}")
    def get_release(ctx: Ctx, model: str, release: int) -> dict[str, Any]:
        try:
            return ctx.releases.get(model, release).model_dump(mode="json", by_alias=True)
        except UnknownReleaseError as e:
            raise HTTPException(404, str(e)) from e

    @app.get("/api/v1/devices")
    def list_devices(ctx: Ctx) -> list[dict[str, Any]]:
        return ctx.fleet.devices()

    @app.get("/api/v1/devices/{device_id}")
    def get_device(ctx: Ctx, device_id: str) -> dict[str, Any]:
        dev = ctx.fleet.device(device_id)
        if dev is None:
            raise HTTPException(404, f"device {device_id!r} has never connected")
        return dev

    def _set_desired(ctx: CloudContext, device_id: str, body: DesiredIn) -> Desired:
        try:
            ctx.releases.get(body.model, body.release)
        except UnknownReleaseError as e:
            raise HTTPException(404, str(e)) from e
        if ctx.mqtt is None:
            raise HTTPException(503, "the cloud has no broker connection")
        desired = Desired(device_id=device_id, model=body.model, release=body.release,
                          rollout_id=body.rollout_id, issued_at=time.time())
        try:
            ctx.mqtt.publish_desired(desired)
        except TransferError as e:
            raise HTTPException(503, str(e)) from e
        ctx.fleet.record_desired(desired)
        return desired

    @app.put("/api/v1/devices/{device_id}/desired")
    def put_desired(ctx: Ctx, device_id: str, body: DesiredIn) -> dict[str, Any]:
        if not DEVICE_ID_PATTERN.match(device_id):
            raise HTTPException(422, f"invalid device id {device_id!r}")
        return _set_desired(ctx, device_id, body).model_dump(mode="json", by_alias=True)

    @app.post("/api/v1/deployments")
    def deploy(ctx: Ctx, body: DeploymentIn) -> dict[str, Any]:
        if body.all_devices == (body.devices is not None):
            raise HTTPException(422, "give exactly one of `devices` (a list) or `all_devices`")
        targets = ctx.fleet.device_ids() if body.all_devices else list(body.devices or [])
        if not targets:
            raise HTTPException(400, "the selection names no devices; nothing was changed")
        try:
            ctx.releases.get(body.model, body.release)
        except UnknownReleaseError as e:
            raise HTTPException(404, str(e)) from e
        for device_id in targets:
            _set_desired(ctx, device_id, body)
        return {"model": body.model, "release": body.release, "devices": targets}

    @app.get("/api/v1/stats")
    def stats(ctx: Ctx) -> dict[str, Any]:
        return {"messages": ctx.fleet.messages, "invalid_messages": ctx.fleet.invalid_messages,
                "devices": len(ctx.fleet.device_ids())}

    return app
