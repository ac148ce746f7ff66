"""Attacks on the operator API: calls without a token, with a viewer's, with a
revoked one, and whether any token secret ends up in the logs.

Against the real cloud service (uvicorn, SQLite, its own broker session) with a
real device agent attached, so "nothing changed" covers the fleet too: the
device gets no new desired state, keeps serving, and its slots stay as they were.
"""

from __future__ import annotations

import inspect
import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from cloud.auth import Role, create_token, revoke_token
from cloud.broker import MosquittoProcess
from cloud.db import Database
from cloud.tuf_repo import ReleaseRepository
from shared.messages import EventKind
from tests.attacks.harness import (
    MODEL,
    DeviceUnderAttack,
    cloud_session,
    publish_release,
    start_device,
)

pytestmark = pytest.mark.integration

VICTIM = "dev-victim"
MUTATING = {"post", "put", "patch", "delete"}
#: Mutating routes authorized by something other than an operator token, and why.
NOT_OPERATOR_ROUTES = {
    ("post", "/api/v1/enroll"): "a one-time bootstrap token, bound to one device id",
}
#: Routes an operator token is not enough for (the viewer is told it needs admin).
ADMIN_ROUTES = {
    ("delete", "/api/v1/releases/{model}/{release}"),
}


@pytest.fixture
def fleet_device(
    cloud: Any, broker: MosquittoProcess, tmp_path: Path
) -> Iterator[DeviceUnderAttack]:
    """A device on the cloud service's broker, running release 1 deployed via the API."""
    repo = ReleaseRepository.open(cloud.settings.repo_dir, cloud.settings.keys_dir)
    publish_release(repo, 1)
    publish_release(repo, 2, model="good-1")
    session = cloud_session(broker.port)
    dev = start_device(
        tmp_path,
        port=broker.port,
        repo=repo,
        repo_url=f"{cloud.url}/tuf/",
        cloud=session,
        secure=None,
        device_id=VICTIM,
    )
    try:
        r = httpx.post(
            f"{cloud.url}/api/v1/deployments",
            headers=cloud.headers("operator"),
            json={"model": MODEL, "release": 1, "devices": [VICTIM]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        dev.wait_event(EventKind.COMMITTED, 1)
        yield dev
    finally:
        dev.agent.stop()
        session.mqtt.stop()


def _mutating_routes(cloud: Any) -> list[tuple[str, str]]:
    spec = httpx.get(f"{cloud.url}/openapi.json").json()
    return sorted((m, p) for p, ops in spec["paths"].items() for m in ops if m in MUTATING)


def _body(method: str, path: str) -> dict[str, Any]:
    """A request the route would accept from an operator: deploy release 2."""
    if path.endswith("/deployments"):
        return {"model": MODEL, "release": 2, "devices": [VICTIM]}
    return {"model": MODEL, "release": 2}


def test_api_call_without_or_with_viewer_token_refused(
    cloud: Any, fleet_device: DeviceUnderAttack
) -> None:
    routes = [r for r in _mutating_routes(cloud) if r not in NOT_OPERATOR_ROUTES]
    assert ("post", "/api/v1/deployments") in routes
    before = fleet_device.snapshot()
    db = Database(cloud.settings.db_url)
    revoked = create_token(db, "leaked", Role.OPERATOR)
    assert revoke_token(db, "leaked") == 1
    db.dispose()
    attempts = {
        "no token": ({}, 401, "missing API token"),
        "not bearer": (
            {"Authorization": f"Basic {cloud.tokens['operator']}"},
            401,
            "missing API token",
        ),
        "unknown token": (
            {"Authorization": f"Bearer efk_{secrets.token_urlsafe(32)}"},
            401,
            "unknown or revoked",
        ),
        "revoked token": ({"Authorization": f"Bearer {revoked}"}, 401, "unknown or revoked"),
        "viewer token": (cloud.headers("viewer"), 403, "needs operator"),
    }
    for method, path in routes:
        url = cloud.url + re.sub(r"\{[^}]+\}", VICTIM, path)
        for what, (headers, status, reason) in attempts.items():
            if what == "viewer token" and (method, path) in ADMIN_ROUTES:
                reason = "needs admin"
            r = httpx.request(method, url, json=_body(method, path), headers=headers, timeout=10)
            assert r.status_code == status, (method, path, what, r.text)
            assert reason in r.json()["detail"], (method, path, what)
    fleet_device.assert_untouched(before, release=1)
    assert not [m for m in fleet_device.messages if getattr(m, "release", None) == 2], (
        "a refused call must not reach the device"
    )
    # The same call with an operator token goes through: the refusals were about the token.
    r = httpx.post(
        f"{cloud.url}/api/v1/deployments",
        headers=cloud.headers("operator"),
        json=_body("post", "/api/v1/deployments"),
        timeout=30,
    )
    assert r.status_code == 200
    fleet_device.wait_event(EventKind.OFFERED, 2)


def _required_roles(route: APIRoute) -> set[Role]:
    roles: set[Role] = set()
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        stack.extend(dep.dependencies)
        if dep.call is not None and callable(dep.call):
            try:
                role = inspect.getclosurevars(dep.call).nonlocals.get("role")
            except TypeError:
                continue
            if isinstance(role, Role):
                roles.add(role)
    return roles


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every ``APIRoute``, through routers included into others (FastAPI wraps them)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _api_routes(list(inner.routes))


def test_every_mutating_route_requires_operator_or_admin(tmp_path: Path) -> None:
    from cloud.app import create_app
    from cloud.config import CloudSettings

    app = create_app(CloudSettings(data_dir=tmp_path / "cloud"), connect_mqtt=False)
    seen = 0
    admin: set[tuple[str, str]] = set()
    for route in _api_routes(app.routes):
        if route.path == "/api/v1/devices" and "GET" in route.methods:
            assert _required_roles(route) == {Role.VIEWER}  # the audit sees roles at all
        for method in {m.lower() for m in route.methods} & MUTATING:
            seen += 1
            if (method, route.path) in NOT_OPERATOR_ROUTES:
                continue
            roles = _required_roles(route)
            assert roles and min(r.rank for r in roles) >= Role.OPERATOR.rank, (
                f"{method.upper()} {route.path} changes state but requires {roles or 'no role'}"
            )
            if roles == {Role.ADMIN}:
                admin.add((method, route.path))
    assert seen >= 2
    assert admin == ADMIN_ROUTES


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(
            f"{record.name} {record.getMessage()} {record.args!r} "
            f"{record.__dict__!r} {record.exc_text or ''}"
        )


def test_token_secrets_never_logged(cloud: Any) -> None:
    handler = _Everything()
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "fastapi", "cloud", "httpx"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    unknown = f"efk_{secrets.token_urlsafe(32)}"
    db = Database(cloud.settings.db_url)
    revoked = create_token(db, "revoked", Role.ADMIN)
    revoke_token(db, "revoked")
    db.dispose()
    try:
        body = {"model": MODEL, "release": 1, "devices": [VICTIM]}
        for headers in (
            {"Authorization": f"Bearer {unknown}"},
            {"Authorization": f"Bearer {revoked}"},
            {"Authorization": f"Bearer {unknown}x" * 3},
            {"Authorization": f"Token {cloud.tokens['admin']}"},
            cloud.headers("viewer"),
        ):
            r = httpx.post(f"{cloud.url}/api/v1/deployments", json=body, headers=headers)
            assert r.status_code in (401, 403)
            assert unknown not in r.text and revoked not in r.text
        assert (
            httpx.get(f"{cloud.url}/api/v1/devices", headers=cloud.headers("admin")).status_code
            == 200
        )
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert handler.lines, "the capture saw nothing: it would prove nothing"
    text = "\n".join(handler.lines)
    for secret in (unknown, revoked, *cloud.tokens.values()):
        assert secret not in text
        assert secret[4:20] not in text  # not even a fragment
