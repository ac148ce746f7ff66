"""The retrain loop: a drift alert runs the job once, its release goes to one canary
first and to the rest of the group only once the canary runs it; a canary that
rolls back stops the rollout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cloud.db import Database
from cloud.drift_monitor import AlertInfo
from cloud.fleet import FleetView
from cloud.ingest import queries
from cloud.ingest.store import SeenUpdate, TelemetryStore
from cloud.metrics import CloudMetrics
from cloud.retrain import RetrainLoop, RetrainRequest, RetrainResult
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
    fleet: FleetView, device: str, release: int, state: str = "idle", error: str | None = None
) -> None:
    fleet.apply(
        Reported(
            device_id=device,
            agent_version="0.1.0",
            model="digits",
            release=release,
            slot="a",
            state=UpdateState(state),
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


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'retrain.db'}")
    db.create_all()
    fleet = FleetView()
    devices = ["dev-1", "dev-2", "dev-3"]
    TelemetryStore(db, worker="t", bucket_seconds=60).write_batch(
        [],
        [SeenUpdate(d, time.time(), "default") for d in devices]
        + [SeenUpdate("dev-other", time.time(), "other")],
    )
    for d in [*devices, "dev-other"]:
        _report(fleet, d, 1)
    yield db, fleet, devices
    db.dispose()


def _wait_state(db: Database, state: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = queries.retrain_runs(db)
        if runs and runs[0]["state"] == state:
            return runs[0]
        time.sleep(0.1)
    raise AssertionError(f"run never reached {state}: {queries.retrain_runs(db)}")


def test_alert_retrains_once_then_canary_then_fleet(setup) -> None:  # type: ignore[no-untyped-def]
    db, fleet, devices = setup
    deployed: list[tuple[str, int, float]] = []

    def deploy(device: str, model: str, release: int, rollout: str) -> None:
        deployed.append((device, release, time.monotonic()))
        # The device installs it a moment later and reports it.
        threading.Timer(0.3, _report, (fleet, device, release)).start()

    metrics = CloudMetrics(fleet, db)
    job = FakeJob()
    loop = RetrainLoop(db, fleet, job, deploy, canary_devices=1, metrics=metrics)
    try:
        loop.on_alert(_alert())
        loop.on_alert(_alert())  # the same drift again: no second run
        run = _wait_state(db, "done")
        assert job.calls == 1 and run["new_release"] == 2 and run["canary"] == ["dev-1"]
        assert [d for d, _, _ in deployed] == devices  # never the other group's device
        canary_at = deployed[0][2]
        assert all(t >= canary_at + 0.3 for _, _, t in deployed[1:])  # after the canary ran it
        progress = metrics.registry.get_sample_value(
            "edgefleet_rollout_progress_ratio",
            {"rollout_id": f"retrain-{run['id']}", "model": "digits", "release": "2"},
        )
        assert progress == 1.0
        assert (
            metrics.registry.get_sample_value("edgefleet_retrain_runs_total", {"outcome": "done"})
            == 1.0
        )
        loop.on_alert(_alert())  # still no second run for release 1 of this group
        assert len(queries.retrain_runs(db)) == 1
    finally:
        loop.stop()


def test_canary_rollback_stops_the_rollout(setup) -> None:  # type: ignore[no-untyped-def]
    db, fleet, _ = setup
    deployed: list[str] = []

    def deploy(device: str, model: str, release: int, rollout: str) -> None:
        deployed.append(device)
        threading.Timer(0.3, _report, (fleet, device, 1, "rolled_back", "outputs off")).start()

    loop = RetrainLoop(db, fleet, FakeJob(), deploy, canary_devices=1)
    try:
        loop.on_alert(_alert())
        run = _wait_state(db, "failed")
        assert "dev-1 refused release 2" in str(run["detail"])
        assert deployed == ["dev-1"]  # the fleet never got it
    finally:
        loop.stop()
