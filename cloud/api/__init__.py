"""HTTP routes of the cloud service, one module per area.

Each module exposes ``router``; ``cloud.app`` mounts every router listed in
``ROUTERS``. Routes stay thin: validate, call a service, map domain errors to
HTTP status codes.
"""

from __future__ import annotations

from fastapi import APIRouter

from cloud.api import devices, enroll, models, observability, releases, rollouts, system

__all__ = ["ROUTERS"]

ROUTERS: list[APIRouter] = [
    system.router,
    releases.router,
    devices.router,
    rollouts.router,
    enroll.router,
    models.router,
    observability.router,
]
