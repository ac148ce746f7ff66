"""The retrain loop: a drift alert runs the job once, its release goes out as a
rollout (``cloud.rollouts``, real controller): one canary first, the rest of the
group only once the canary runs it; a canary that rolls back aborts the rollout
and is pointed back at the release it runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud.db import Database
from cloud.device_registry import DeviceRegistry
from cloud.drift_monitor import AlertInfo
from cloud.fleet import FleetView
from cloud.ingest import queries
from cloud.ingest.store import SeenUpdate, TelemetryStore
from cloud.ingest.testing import publish_synthetic_release
from cloud.metrics import CloudMetrics
from cloud.releases import ReleaseService
from cloud.retrain import RetrainLoop, RetrainRequest, RetrainResult
from cloud.rollouts.controller import RolloutController
from cloud.rollouts.service import RolloutService
from cloud.tuf_repo import ReleaseRepository
from shared.messages import ErrorInfo, HardwareInfo, Reported, UpdateState

pytestmark = pytest.mark.integration

HW = HardwareInfo(machine="x86_64", system="Linux", runtime="sim")


class FakeJob:
    name = "fake"

    def __init__(self, new_release: int = 2) -> None:
        self.new_release, self.calls = new_release, 0

    def run(self, request: RetrainRequest) -> RetrainResult:
        self.calls += 1
        return RetrainResult(self.new_release, "fake")

    def cancel(self) -> None:
        pass


def _report(
    fleet: FleetView,
    device: str,
    release: int,
    state: str = "idle",
    error: str | None = None,
    target: int | None = None,
) -> None:
    fleet.apply(
        Reported(
            device_id=device,
            agent_version="0.1.0",
            model="digits",
            release=release,
            slot="a",
            state=UpdateState(state),
            target_release=target,
            hardware=HW,
            last_error=ErrorInfo(code="selftest_failed", message=error) if error else None,
            ts=time.time(),
        ),
        time.time(),
    )


def _alert(release: int = 1, group: str = "default") -> AlertInfo:
    return AlertInfo(
        id=7,
        kind="input",
        model="digits",
        release=release,
        group=group,
        state="open",
        opened_at=time.time(),
        resolved_at=None,
        statistic=1.2,
        threshold=0.2,
        message="input drift",
    )


class Env:
    """A database, a live fleet view feeding the device registry, two releases, and the
    rollout engine with its controller; what it would publish is recorded."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = Database(f"sqlite:///{tmp_path / 'retrain.db'}")
        self.db.create_all()
        self.fleet = FleetView()
        self.registry = DeviceRegistry(self.db, flush_interval=0.05).start()
        self.fleet.listeners.append(self.registry.observe)
        repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
        for release in (1, 2):
            publish_synthetic_release(repo, model="digits", release=release)
        self.deployed: list[tuple[str, int, float]] = []
        self.on_deploy: Callable[[str, int], None] = lambda device, release: None
        self.rollouts = RolloutService(self.db, ReleaseService(repo), self.fleet, self._deploy)
        self.controller = RolloutController(self.rollouts, interval=0.1)
        self.devices = ["dev-1", "dev-2", "dev-3"]
        TelemetryStore(self.db, worker="t", bucket_seconds=60).write_batch(
            [],
            [SeenUpdate(d, time.time(), "default") for d in self.devices]
            + [SeenUpdate("dev-other", time.time(), "other")],
        )
        for d in [*self.devices, "dev-other"]:
            _report(self.fleet, d, 1)
        self.registry.flush()
        self.controller.start()

    def _deploy(
        self, ids: list[str], model: str, release: int, rid: str, deadline: float | None
    ) -> None:
        for device in ids:
            self.deployed.append((device, release, time.monotonic()))
            self.on_deploy(device, release)

    def close(self) -> None:
        self.controller.stop()
        self.registry.stop()
        self.db.dispose()


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    e = Env(tmp_path)
    yield e
    e.close()


def _wait_state(db: Database, state: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = queries.retrain_runs(db)
        if runs and runs[0]["state"] == state:
            return runs[0]
        time.sleep(0.1)
    raise AssertionError(f"run never reached {state}: {queries.retrain_runs(db)}")


def test_alert_retrains_once_then_canary_then_fleet(env: Env) -> None:
    # Each device installs what it is told a moment later and reports it.
    env.on_deploy = lambda device, release: threading.Timer(
        0.3, _report, (env.fleet, device, release)
    ).start()
    metrics = CloudMetrics(env.fleet, env.db)
    env.controller.metrics = metrics
    job = FakeJob()
    loop = RetrainLoop(env.db, env.fleet, job, env.rollouts, canary_devices=1, metrics=metrics)
    try:
        loop.on_alert(_alert())
        loop.on_alert(_alert())  # the same drift again: no second run
        run = _wait_state(env.db, "done")
        assert job.calls == 1 and run["new_release"] == 2
        canary = run["canary"]
        assert isinstance(canary, list) and len(canary) == 1
        # Never the other group's device; the canary first, the rest after it ran it.
        assert sorted(d for d, _, _ in env.deployed) == env.devices
        assert env.deployed[0][0] == canary[0]
        canary_at = env.deployed[0][2]
        assert all(t >= canary_at + 0.3 for _, _, t in env.deployed[1:])
        rollout = env.rollouts.list()[0]
        assert rollout["state"] == "completed" and rollout["counts"] == {"updated": 3}
        assert (
            f"retrain run {run['id']}" in env.rollouts.status(rollout["id"])["events"][0]["reason"]
        )
        assert (
            metrics.registry.get_sample_value("edgefleet_retrain_runs_total", {"outcome": "done"})
            == 1.0
        )
        loop.on_alert(_alert())  # still no second run for release 1 of this group
        assert len(queries.retrain_runs(env.db)) == 1
    finally:
        loop.stop()


def test_canary_rollback_stops_the_rollout(env: Env) -> None:
    def refuse(device: str, release: int) -> None:
        if release == 2:  # probation fails: the agent goes back to release 1 by itself
            threading.Timer(
                0.3, _report, (env.fleet, device, 1, "rolled_back", "outputs off", 2)
            ).start()

    env.on_deploy = refuse
    loop = RetrainLoop(env.db, env.fleet, FakeJob(), env.rollouts, canary_devices=1)
    try:
        loop.on_alert(_alert())
        run = _wait_state(env.db, "failed")
        assert "failure threshold" in str(run["detail"]), run
        canary = run["canary"]
        assert isinstance(canary, list) and len(canary) == 1
        # The fleet never got release 2; the canary is pointed back at release 1.
        assert [(d, r) for d, r, _ in env.deployed] == [(canary[0], 2), (canary[0], 1)]
    finally:
        loop.stop()
