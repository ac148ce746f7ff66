"""The rollout controller's decisions, on SQLite and PostgreSQL, with a clock in hand.

Devices here are their protocol messages: ``Reported`` states fed to the real
``FleetView`` and ``DeviceRegistry``, telemetry windows written to the real
tables the ingest workers fill. What would go to the broker (desired states)
is recorded. That lets a test move time (timeouts, deadlines) and produce the
rare cases (a fleet-wide error-rate regression) that real agents rarely show.
The same controller on real agents: ``tests/sim/test_rollouts.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloud.db import Database
from cloud.device_registry import DeviceRegistry
from cloud.fleet import FleetView
from cloud.ingest.tables import TelemetryWindow
from cloud.releases import ReleaseService, UnknownReleaseError
from cloud.rollouts.service import RolloutConflictError, RolloutService, SelectionError
from cloud.rollouts.spec import RolloutSpec
from cloud.tuf_repo import ReleaseRepository
from shared.errors import TransferError
from shared.manifest import ReleaseManifest, target_path
from shared.messages import Desired, HardwareInfo, Reported, Status, UpdateState
from tests.pg import open_database

pytestmark = pytest.mark.integration

T0 = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    yield from open_database(request.param, tmp_path)


def _publish(repo: ReleaseRepository, release: int, **runtime: object) -> None:
    m = ReleaseManifest.model_validate(
        {
            "model": "m",
            "release": release,
            "created_at": T0,
            "quantization": "int8",
            "input": {"name": "x", "shape": [1, 4], "dtype": "int8", "scale": 1, "zero_point": 0},
            "output": {"name": "y", "shape": [1, 2], "dtype": "int8", "scale": 1, "zero_point": 0},
            "runtime": runtime,
            "selftest": {
                "target": target_path("m", release, "selftest.npz"),
                "count": 1,
                "atol": 0,
            },
        }
    )
    files = {
        m.model_target: os.urandom(2048),
        m.selftest.target: f"vectors {release}".encode(),
    }
    repo.publish(files, {m.model_target: m.to_custom()}, now=datetime.now(UTC))


class Fleet:
    """Devices as messages; the controller's desired states as a record."""

    def __init__(self, db: Database, tmp_path: Path, n: int) -> None:
        self.clock = Clock()
        self.db = db
        self.view = FleetView()
        self.registry = DeviceRegistry(db)
        self.view.listeners.append(self.registry.observe)
        self.repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
        self.releases = ReleaseService(self.repo)
        for r in (1, 2):
            _publish(self.repo, r)
        _publish(self.repo, 3, hardware_tags=["npu"])
        self.desired: dict[str, tuple[int, str]] = {}
        #: Set to make publishing desired states fail (the broker is down).
        self.broker_down = False
        self.service = RolloutService(db, self.releases, self.view, self._deploy, clock=self.clock)
        self.ids = [f"d{i:02d}" for i in range(n)]
        for i, d in enumerate(self.ids):
            self.report(d, 1, tags=["npu"] if i < 2 else [])
            self.view.apply(Status(device_id=d, online=True), T0)
        self.registry.flush()

    def _deploy(
        self, ids: list[str], model: str, release: int, rid: str, deadline: float | None
    ) -> None:
        if self.broker_down:
            raise TransferError("the broker is not connected")
        for d in ids:
            self.desired[d] = (release, rid)
            # As the real deployer does once the broker has it.
            self.view.record_desired(
                Desired(
                    device_id=d,
                    model=model,
                    release=release,
                    rollout_id=rid,
                    deadline=deadline,
                    issued_at=self.clock.now,
                )
            )

    def report(
        self,
        device_id: str,
        release: int,
        state: UpdateState = UpdateState.IDLE,
        *,
        target: int | None = None,
        error: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        from shared.messages import ErrorInfo

        self.view.apply(
            Reported(
                device_id=device_id,
                agent_version="0.1.0",
                model="m",
                release=release,
                slot="a",
                state=state,
                target_release=target,
                last_error=ErrorInfo(code=error, message="it broke") if error else None,
                hardware=HardwareInfo(
                    machine="x86_64",
                    system="Linux",
                    runtime="ai-edge-litert 2.3.0",
                    tags=tags or [],
                ),
                ts=self.clock.now,
            ),
            self.clock.now,
        )

    def follow(self, *, release: int | None = None) -> None:
        """Every device told to run something runs it (healthy agents)."""
        for d, (rel, _rid) in self.desired.items():
            if release is None or rel == release:
                self.report(d, rel)

    def telemetry(self, device_id: str, release: int, *, errors: int, p99: float) -> None:
        with self.db.session() as s:
            s.add(
                TelemetryWindow(
                    device_id=device_id,
                    seq=int(self.clock.now * 10) % 10**9 + release,
                    window_start=self.clock.now - 1,
                    window_end=self.clock.now,
                    received_at=self.clock.now,
                    model="m",
                    release=release,
                    group="default",
                    inferences=1000,
                    errors=errors,
                    p50_ms=p99 / 2,
                    p95_ms=p99,
                    p99_ms=p99,
                    max_ms=p99,
                    drift_samples=0,
                )
            )

    def tick(self, advance: float = 1.0) -> None:
        self.clock.now += advance
        self.service.tick()


@pytest.fixture
def fleet(db: Database, tmp_path: Path) -> Fleet:
    return Fleet(db, tmp_path, 20)


def _spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {"model": "m", "release": 2, "target": {"all": True}}
    base.update(kw)
    return RolloutSpec.model_validate(base)


def test_waves_advance_on_reports_and_complete(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[10, 50, 100]), "op")
    assert [w["cumulative"] for w in st["wave_detail"]] == [2, 10, 20]
    assert len(fleet.desired) == 2
    fleet.tick()
    assert fleet.service.status(st["id"])["wave"] == 1  # nobody reported yet
    fleet.follow()
    fleet.tick()
    assert len(fleet.desired) == 10  # wave 2 offered
    fleet.follow()
    fleet.tick()
    fleet.follow()
    fleet.tick()
    done = fleet.service.status(st["id"])
    assert done["state"] == "completed" and done["counts"] == {"updated": 20}
    assert "gates not judged: too little telemetry" in done["reason"]


def test_error_rate_gate_aborts_and_rolls_back_by_re_release(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[25, 100], soak_s=30), "op")
    wave1 = sorted(fleet.desired)
    assert len(wave1) == 5
    for d in fleet.ids:
        fleet.telemetry(d, 1, errors=0, p99=2.0)
    fleet.follow()
    fleet.tick()  # updated; soaking
    # Windows that began before a device finished updating do not count:
    for d in wave1:
        fleet.telemetry(d, 2, errors=900, p99=2.0)
    fleet.tick()
    assert fleet.service.status(st["id"])["state"] == "running"
    fleet.clock.now += 5
    for d in fleet.ids:
        fleet.telemetry(d, 1, errors=0, p99=2.0)
    for d in wave1:
        fleet.telemetry(d, 2, errors=100, p99=2.0)  # 10% errors
    fleet.tick()
    out = fleet.service.status(st["id"])
    assert out["state"] == "aborted" and "error-rate gate" in out["reason"]
    assert "10.00%" in out["reason"]
    # Release 1's bytes are published again as release 4; wave 1 goes there.
    assert out["rollback"] == {"m/1": 4}
    rerelease = fleet.releases.get("m", 4)
    assert rerelease.source["rerelease_of"] == "1"
    assert fleet.repo.read_target(rerelease.model_target) == fleet.repo.read_target(
        fleet.releases.get("m", 1).model_target
    )
    assert {d: r for d, (r, _) in fleet.desired.items()} == {d: 4 for d in wave1}
    devices = {d["device_id"]: d for d in fleet.service.devices(st["id"])}
    assert {devices[d]["status"] for d in wave1} == {"reverting"}
    assert {v["status"] for d, v in devices.items() if d not in wave1} == {"unchanged"}
    fleet.follow(release=4)
    fleet.tick()
    devices = {d["device_id"]: d for d in fleet.service.devices(st["id"])}
    assert {devices[d]["status"] for d in wave1} == {"reverted"}
    kinds = [e["kind"] for e in fleet.service.events(st["id"])]
    assert kinds[-3:] == ["gate_failed", "aborted", "rollback"]


def test_latency_gate_compares_with_the_previous_release(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[25, 100], auto_rollback=False, soak_s=30), "op")
    wave1 = sorted(fleet.desired)
    fleet.follow()
    fleet.tick()
    fleet.clock.now += 5
    for d in fleet.ids:
        fleet.telemetry(d, 1, errors=0, p99=2.0)
    for d in wave1:
        fleet.telemetry(d, 2, errors=0, p99=5.0)
    fleet.tick()
    out = fleet.service.status(st["id"])
    assert out["state"] == "aborted" and "latency gate" in out["reason"]
    assert "2.50x" in out["reason"]
    assert out["rollback"] == {}  # auto_rollback off: devices stay
    assert fleet.releases.latest("m").release == 3  # type: ignore[union-attr]


def test_failures_over_threshold_abort(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[25, 100], failure_threshold=0.2), "op")
    wave1 = sorted(fleet.desired)
    fleet.report(wave1[0], 1, UpdateState.ROLLED_BACK, target=2, error="probation_failed")
    fleet.tick()
    assert fleet.service.status(st["id"])["state"] == "running"  # 1 of 5 is 20%: allowed
    fleet.report(wave1[1], 1, UpdateState.FAILED, target=2, error="selftest_failed")
    fleet.tick()
    out = fleet.service.status(st["id"])
    assert out["state"] == "aborted" and "2 of 5 devices" in out["reason"]
    # The two that refused it point back at release 1, which they run; no re-release
    # for them. The three others may have it: they get the re-release.
    assert fleet.desired[wave1[0]][0] == 1 and fleet.desired[wave1[1]][0] == 1
    assert {fleet.desired[d][0] for d in wave1[2:]} == {4}


def test_transient_failures_are_retried_not_counted(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[25, 100], failure_threshold=0.0), "op")
    d = sorted(fleet.desired)[0]
    fleet.report(d, 1, UpdateState.FAILED, target=2, error="transfer_failed")
    fleet.tick()
    assert fleet.service.status(st["id"])["state"] == "running"
    assert {x["device_id"]: x for x in fleet.service.devices(st["id"])}[d]["status"] == "retrying"


def test_timeout_pauses_and_resume_can_advance(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[25, 100], wave_timeout_s=60), "op")
    fleet.tick(61)
    out = fleet.service.status(st["id"])
    assert out["state"] == "paused" and "timed out after 60 s: 0 of 5" in out["reason"]
    assert len(fleet.desired) == 5
    fleet.service.resume(st["id"], "op", "field team says go", advance=True)
    assert len(fleet.desired) == 20
    assert fleet.service.status(st["id"])["wave"] == 2


def test_a_first_wave_that_could_not_be_published_is_retried_on_resume(fleet: Fleet) -> None:
    fleet.broker_down = True
    with pytest.raises(TransferError):
        fleet.service.start(_spec(waves=[25, 100]), "op")
    (paused,) = fleet.service.list()
    assert paused["state"] == "paused" and "could not publish wave 1" in paused["reason"]
    assert fleet.desired == {}
    fleet.broker_down = False
    fleet.service.resume(paused["id"], "op")
    assert len(fleet.desired) == 5, "resume must offer the first wave again"


def test_deadline_marks_devices_missed(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[100], deadline_s=300, success_threshold=0.5), "op")
    ids = sorted(fleet.desired)
    for d in ids[:15]:
        fleet.report(d, 2)
    fleet.tick()
    assert fleet.service.status(st["id"])["state"] == "completed"
    fleet.tick(400)  # the stragglers never came back
    counts = fleet.service.status(st["id"])["counts"]
    assert counts == {"updated": 15, "missed": 5}
    assert any(e["kind"] == "missed" for e in fleet.service.events(st["id"]))


def test_bad_requests_change_nothing(fleet: Fleet) -> None:
    with pytest.raises(UnknownReleaseError):
        fleet.service.start(_spec(release=9), "op")
    with pytest.raises(SelectionError, match="never connected: ghost"):
        fleet.service.start(_spec(target={"devices": ["d01", "ghost"]}), "op")
    with pytest.raises(SelectionError, match="names no known device"):
        fleet.service.start(_spec(target={"group": "mars"}), "op")
    with pytest.raises(SelectionError, match="none of the 18 selected devices"):
        fleet.service.start(_spec(release=3, target={"devices": fleet.ids[2:]}), "op")
    assert fleet.service.list() == [] and fleet.desired == {}
    st = fleet.service.start(_spec(waves=[100], target={"devices": fleet.ids[:5]}), "op")
    with pytest.raises(RolloutConflictError, match=st["id"]):
        fleet.service.start(_spec(target={"devices": fleet.ids[4:6]}), "op")
    assert len(fleet.service.list()) == 1
    with pytest.raises(RolloutConflictError, match="only a paused one resumes"):
        fleet.service.resume(st["id"], "op")


def test_incompatible_devices_are_skipped_with_the_reason(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(release=3, waves=[100]), "op")
    counts = st["counts"]
    assert counts == {"pending": 0, "offered": 2, "skipped": 18} or counts.get("skipped") == 18
    skipped = [d for d in fleet.service.devices(st["id"]) if d["status"] == "skipped"]
    assert "needs one of the hardware tags ['npu']" in skipped[0]["reason"]
    assert sorted(fleet.desired) == ["d00", "d01"]
    assert any(e["kind"] == "skipped" for e in fleet.service.events(st["id"]))


def test_recall_moves_every_device_back(fleet: Fleet) -> None:
    st = fleet.service.start(_spec(waves=[50, 100], soak_s=3600), "op")
    fleet.follow()
    fleet.tick()
    out = fleet.service.recall("m", 2, "op", "customers complain")
    assert out["aborted"] == [st["id"]]
    assert fleet.service.status(st["id"])["state"] == "aborted"
    # The aborted rollout already sent its 10 updated devices to a re-release of 1
    # (release 4); nobody else runs or wants release 2.
    assert {r for r, _ in fleet.desired.values()} == {4}
    assert out["recall"] is None
    fleet.follow()
    # A device that got release 2 by hand (outside rollouts) is recalled too.
    hand = next(d for d in fleet.ids if d not in fleet.desired)
    fleet.report(hand, 2)
    fleet.registry.flush()
    out = fleet.service.recall("m", 2, "op", "one more", take_down=True)
    assert out["recall"]["release"] == 5 and out["recall"]["devices"] == 1
    assert fleet.desired[hand][0] == 5
    assert out["taken_down"] == ["m/2/model.tflite", "m/2/selftest.npz"]
    with pytest.raises(UnknownReleaseError):
        fleet.releases.get("m", 2)


def test_a_taken_down_number_is_never_handed_out_again(fleet: Fleet) -> None:
    assert fleet.releases.take_down("m", 3) == ["m/3/model.tflite", "m/3/selftest.npz"]
    assert fleet.releases.latest("m").release == 2  # type: ignore[union-attr]
    again = fleet.releases.rerelease("m", 1, reason="after the take-down")
    assert again.release == 4
    with pytest.raises(UnknownReleaseError):
        fleet.service.start(_spec(release=3), "op")
