"""A device that only has MQTT: the agent fetches and verifies a release through
TUF over MQTT 5 (``repo_url = mqtt://edgefleet-repo/``) from the cloud's
repository server on the same broker, and swaps it in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.broker import MosquittoProcess
from cloud.mqtt_repo import MqttRepoServer
from cloud.tuf_repo import ReleaseRepository
from device.mqtt_fetcher import MQTT_REPO_URL, MqttFetcher
from shared.messages import EventKind
from tests.faults.harness import Controller, controller, publish_release
from tests.integration.test_agent_updates import DEVICE, make_agent, wait_inferences

pytestmark = pytest.mark.integration


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    publish_release(repo, 1, seed=0)
    publish_release(repo, 2, seed=1)
    return repo


@pytest.fixture
def ctl(broker: MosquittoProcess) -> Iterator[Controller]:
    with controller(broker.port) as c:
        yield c


def test_agent_updates_over_mqtt_only(
    tmp_path: Path, broker: MosquittoProcess, repo: ReleaseRepository, ctl: Controller
) -> None:
    server = MqttRepoServer(repo.repo_dir, "127.0.0.1", broker.port).start()
    agent = make_agent(tmp_path, broker, repo, MQTT_REPO_URL)
    try:
        agent.start()
        ctl.deploy(DEVICE, 1)
        ctl.wait_event(DEVICE, EventKind.COMMITTED, 1)
        ctl.deploy(DEVICE, 2)
        ctl.wait_event(DEVICE, EventKind.COMMITTED, 2)
        assert agent.running_manifest is not None and agent.running_manifest.release == 2
        assert isinstance(agent.updater.fetcher, MqttFetcher), "no HTTP was used"
        assert server.served > 0
        wait_inferences(agent)
    finally:
        agent.stop()
        server.stop()
