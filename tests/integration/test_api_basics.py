"""The operator API over real HTTP: authentication, roles, and clear 4xx errors."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration


def test_health_is_public_and_reports_broker(cloud) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(f"{cloud.url}/healthz")
    assert r.status_code == 200 and r.json()["broker_connected"] is True


def test_api_call_without_token_rejected(cloud) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(f"{cloud.url}/api/v1/devices")
    assert r.status_code == 401 and "missing API token" in r.json()["detail"]
    r = httpx.get(f"{cloud.url}/api/v1/devices", headers={"Authorization": "Bearer efk_nope"})
    assert r.status_code == 401 and "unknown or revoked" in r.json()["detail"]


def test_viewer_cannot_deploy(cloud) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "digits", "release": 1, "all_devices": True}
    r = httpx.post(f"{cloud.url}/api/v1/deployments", json=body, headers=cloud.headers("viewer"))
    assert r.status_code == 403 and "needs operator" in r.json()["detail"]
    assert (
        httpx.get(f"{cloud.url}/api/v1/devices", headers=cloud.headers("viewer")).status_code == 200
    )


def test_deploy_unknown_release_is_404_and_changes_nothing(cloud) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "digits", "release": 9, "devices": ["dev-1"]}
    r = httpx.post(f"{cloud.url}/api/v1/deployments", json=body, headers=cloud.headers("operator"))
    assert r.status_code == 404 and "not in the signed repository" in r.json()["detail"]
    assert httpx.get(f"{cloud.url}/api/v1/devices", headers=cloud.headers("viewer")).json() == []


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "digits", "release": 1, "devices": []}, 400, "names no devices"),
        ({"model": "digits", "release": 1}, 422, "exactly one"),
        ({"model": "digits", "release": 0, "devices": ["d"]}, 422, "release"),
        ({"model": "digits", "release": 1, "devices": ["bad/id"]}, 422, "devices"),
    ],
)
def test_bad_deployments_get_4xx_with_reason(cloud, body, status, needle) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{cloud.url}/api/v1/deployments", json=body, headers=cloud.headers("operator"))
    assert r.status_code == status
    assert needle in str(r.json()["detail"])


def test_tuf_repository_served_but_keys_are_not(cloud) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(f"{cloud.url}/tuf/metadata/root.json").status_code == 200
    assert httpx.get(f"{cloud.url}/tuf/metadata/timestamp.json").status_code == 200
    for path in ("/tuf/../keys/", "/tuf/%2e%2e/keys/online", "/keys/online"):
        assert httpx.get(f"{cloud.url}{path}").status_code == 404
