"""Fixtures of the attack suite: a real device under attack, and an attacker's tools.

Everything is real: the cloud CA and a Mosquitto with mutual TLS and the ACL
(``secure``), the cloud's TUF repository signing real LiteRT models (``repo``),
the cloud's own MQTT session publishing desired states (``CloudMqtt`` with its
service certificate), and the device ``Agent`` provisioned and enrolled the way
``edgefleet-device provision`` / ``enroll`` do it. The device fetches releases
over HTTP from ``served``: a copy of the repository directory behind a small
``ThreadingHTTPServer`` the attacker controls (tamper with files, replace
responses, cut them short) -- the position of a compromised CDN or mirror.

``device`` starts with release 1 installed and serving. A test publishes an
attack, deploys it, and checks the three things every attack must leave true:
the device names the cause (its ``failed`` event), the running model keeps
serving (inferences keep succeeding), and the slots and slot pointer on disk
are byte for byte what they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.tuf_repo import ReleaseRepository
from tests.attacks.harness import (
    PROXY_VARS,
    CloudSession,
    DeviceUnderAttack,
    RepoServer,
    cloud_session,
    publish_release,
    start_device,
)
from tests.attacks.secure_env import SecureBroker, secure_broker

# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:  # loopback must not go through a proxy
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[SecureBroker]:
    """The cloud CA and a Mosquitto with mutual TLS and the edgefleet ACL."""
    with secure_broker(tmp_path / "secure") as sec:
        yield sec


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    """The cloud's TUF repository with release 1 (a good model) published."""
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    publish_release(repo, 1)
    return repo


@pytest.fixture
def served(tmp_path: Path, repo: ReleaseRepository) -> Iterator[RepoServer]:
    server = RepoServer(tmp_path / "served")
    server.sync(repo)
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=10)


@pytest.fixture
def cloud_mqtt(secure: SecureBroker) -> Iterator[CloudSession]:
    """The cloud's broker session, with its own certificate."""
    session = cloud_session(secure.port, tls=secure.cloud.as_tls_dict())
    try:
        yield session
    finally:
        session.mqtt.stop()


@pytest.fixture
def device(
    tmp_path: Path,
    secure: SecureBroker,
    repo: ReleaseRepository,
    served: RepoServer,
    cloud_mqtt: CloudSession,
) -> Iterator[DeviceUnderAttack]:
    """An enrolled device on the secure broker, serving release 1."""
    dev = start_device(
        tmp_path, port=secure.port, repo=repo, repo_url=served.url, cloud=cloud_mqtt, secure=secure
    )
    try:
        dev.install(1)
        dev.assert_still_serving(1)
        yield dev
    finally:
        dev.agent.stop()
