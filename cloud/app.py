"""The cloud HTTP service (FastAPI): TUF repository, releases, devices, deployments.

``create_app`` wires the services of one cloud process (repository, release
service, fleet view, broker connection) into a context the routes share, and
mounts the TUF repository at ``/tuf`` for devices to fetch from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from cloud import __version__
from cloud.api import ROUTERS
from cloud.api.deps import CloudContext
from cloud.api.devices import publish_desired
from cloud.api.ratelimit import RateLimitMiddleware
from cloud.config import CloudSettings
from cloud.db import Database
from cloud.device_registry import DeviceRegistry
from cloud.fleet import FleetView
from cloud.ingest.services import Observability
from cloud.metrics import ApiLatencyMiddleware
from cloud.mqtt_bridge import CloudMqtt
from cloud.ratelimit import TokenBucketLimiter
from cloud.releases import ReleaseService
from cloud.rollouts.controller import RolloutController
from cloud.rollouts.service import RolloutService
from cloud.tuf_repo import ReleaseRepository

__all__ = ["CloudContext", "create_app"]

log = logging.getLogger(__name__)


def _refresh_loop(ctx: CloudContext, stop: threading.Event) -> None:
    # Timestamp metadata expires within a day by design (it bounds how long a
    # freeze attack can go unnoticed), so the service re-signs whatever is close
    # to expiry.
    while not stop.wait(ctx.settings.refresh_interval):
        try:
            ctx.repo.refresh()
        except Exception:
            log.exception("TUF metadata refresh failed")


def create_app(settings: CloudSettings, *, connect_mqtt: bool = True) -> FastAPI:
    """Build the app; opening the repository creates keys on first run."""
    repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
    fleet = FleetView()
    db = Database(settings.db_url)
    db.create_all()
    registry = DeviceRegistry(db)
    fleet.listeners.append(registry.observe)
    if settings.unsafe_disable_auth:
        log.warning("unsafe_disable_auth is set: the operator API accepts anyone")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: CloudContext = app.state.ctx
        stop = threading.Event()
        registry.start()
        if connect_mqtt:
            ctx.mqtt = CloudMqtt(
                settings.broker_host,
                settings.broker_port,
                on_message=fleet.apply,
                on_invalid=lambda topic, why: fleet.record_invalid(),
                share_group=settings.ingest_group,
                tls=settings.broker_tls,
            )
            ctx.mqtt.start()
            from cloud.fanout import BlobFanout

            # Release blobs go out once, retained, on a connection of their own.
            ctx.fanout = BlobFanout.from_settings(settings, repo)  # None: EDGEFLEET_FANOUT off
            if ctx.fanout is not None:
                ctx.fanout.start()
        app.state.observability.start(ctx, ingest=connect_mqtt)
        repo_server = None
        if connect_mqtt and settings.mqtt_repo:
            from cloud.mqtt_repo import MqttRepoServer

            repo_server = MqttRepoServer(
                settings.repo_dir,
                settings.broker_host,
                settings.broker_port,
                tls=settings.broker_tls,
            ).start()
        controller = None
        if connect_mqtt and settings.rollout_controller:
            controller = RolloutController(
                ctx.rollouts, settings.rollout_tick, metrics=app.state.observability.metrics
            ).start()
        repo.refresh()
        refresher = threading.Thread(
            target=_refresh_loop, args=(ctx, stop), daemon=True, name="tuf-refresh"
        )
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            if controller is not None:
                controller.stop()
            app.state.observability.stop()
            if repo_server is not None:
                repo_server.stop()
            if ctx.fanout is not None:
                ctx.fanout.stop()
            if ctx.mqtt is not None:
                ctx.mqtt.stop()
            registry.stop()
            db.dispose()

    app = FastAPI(title="edgefleet cloud", version=__version__, lifespan=lifespan)
    releases = ReleaseService(repo, db=db)
    app.state.ctx = ctx = CloudContext(
        settings=settings,
        db=db,
        repo=repo,
        releases=releases,
        fleet=fleet,
        mqtt=None,
        registry=registry,
        rollouts=RolloutService(
            db,
            releases,
            fleet,
            lambda ids, model, release, rid, deadline: publish_desired(
                ctx, ids, model, release, rollout_id=rid, deadline=deadline
            ),
        ),
    )
    if settings.api_rate_limit > 0:
        ctx.rate_limiter = TokenBucketLimiter(settings.api_rate_limit, settings.api_rate_burst)
    # Telemetry ingest, drift monitor, retrain loop, /metrics (cloud.ingest.services).
    app.state.observability = Observability.create(settings, db, fleet, app.state.ctx.releases)
    # The last middleware added runs first: latency metrics see the 429s too.
    app.add_middleware(RateLimitMiddleware, limiter=ctx.rate_limiter)
    app.add_middleware(ApiLatencyMiddleware, metrics=app.state.observability.metrics)
    # Devices fetch TUF metadata and targets here (HTTP Range requests supported).
    app.mount("/tuf", StaticFiles(directory=settings.repo_dir, check_dir=True), name="tuf")
    for router in ROUTERS:
        app.include_router(router)
    return app
