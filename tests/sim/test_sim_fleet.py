"""Simulated fleets end to end: a scenario with a power cut and a link cut on
process devices, and twenty agents as threads of one process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from firmware_sim.control import write_drift
from firmware_sim.fleet import FleetOptions, SimFleet
from firmware_sim.runner import run_scenario
from firmware_sim.scenario import parse_scenario

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCENARIO = """\
[scenario]
name = "power cut while downloading, link cut"
timeout = 400

[fleet]
devices = 5
mode = "process"
telemetry_interval = 0.5

[[fault]]
kind = "power_cut"
device = 1
on_state = "downloading"
restore_after = 1.0

[[fault]]
kind = "link_cut"
device = 2
at = 0.0
duration = 3.0

[expect]
release = 1
within = 180
"""


def test_rollout_survives_power_cut_and_link_cut(tmp_path: Path, cloud_template: Path) -> None:
    scenario = parse_scenario(SCENARIO, "test")
    result = run_scenario(scenario, tmp_path / "run", cloud_template=cloud_template)
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.passed, result.summary()
    assert result.exit_code == 0
    cut = result.faults[0]
    assert cut.fired_at is not None and "'downloading'" in cut.detail, result.summary()
    link = result.faults[1]
    assert link.fired_at is not None and "undone" in link.detail, result.summary()
    assert {d["device_id"] for d in result.devices} == set(scenario.device_ids)
    # The killed device booted again from the same data dir and finished the update.
    devices = {d["device_id"]: d for d in result.devices}
    assert devices["dev-001"]["release"] == 1 and devices["dev-001"]["online"]


def test_failed_expectation_exits_one(tmp_path: Path, cloud_template: Path) -> None:
    # A device that updates cleanly never ends "rolled_back": the run must say so.
    text = SCENARIO.split("[[fault]]")[0].replace("devices = 5", "devices = 1")
    text += '[expect]\nstate = "rolled_back"\nwithin = 5\n'
    result = run_scenario(
        parse_scenario(text, "t"), tmp_path / "run", cloud_template=cloud_template
    )
    assert not result.passed and result.exit_code == 1, result.summary()
    assert "[FAIL] release 1 (rolled_back)" in result.summary()


def test_twenty_devices_in_threads(tmp_path: Path, cloud_template: Path) -> None:
    opts = FleetOptions(
        devices=20,
        mode="thread",
        telemetry_interval=1.0,
        inference_interval=0.05,
        cloud_template=cloud_template,
    )
    with SimFleet(tmp_path, opts) as fleet:
        assert fleet.cloud is not None
        assert len(fleet.agents) == 20
        data_dirs = {fleet.data_dir(i) for i in fleet.device_ids}
        assert len(data_dirs) == 20 and all((d / "agent.toml").exists() for d in data_dirs)
        fleet.cloud.deploy("digits", 1, fleet.device_ids)
        devices = fleet.cloud.wait_for(
            lambda devs: sum(1 for d in devs if d["release"] == 1 and d["state"] == "idle") == 20,
            "20 threaded devices on release 1",
            timeout=240,
        )
        assert {d["device_id"] for d in devices} == set(fleet.device_ids)
        # Drift switched at run time through the control file reaches one sensor only.
        write_drift(tmp_path, "rotation", 30.0, device="dev-007")
        deadline = time.monotonic() + 10
        sensor = fleet.agents["dev-007"].source
        while sensor.drift.mode != "rotation" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sensor.drift.mode == "rotation" and sensor.drift.amount == 30.0
        assert fleet.agents["dev-008"].source.drift.mode == "none"
        fleet.cloud.wait_for(
            lambda devs: all(d["inferences_total"] > 0 for d in devs),
            "telemetry from every device",
            timeout=60,
        )
