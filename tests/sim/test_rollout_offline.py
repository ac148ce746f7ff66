"""A device that is off during a rollout catches up when it comes back.

Its desired state is retained on the broker: when it boots again it reads it,
updates, and the (already completed) rollout counts it as updated. Devices are
processes here, so "off" is a SIGKILL and a fresh boot from the same data dir.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from firmware_sim.fleet import FleetOptions, SimFleet
from firmware_sim.releases import publish_variant

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_offline_device_catches_up_after_the_rollout(tmp_path: Path, cloud_template: Path) -> None:
    opts = FleetOptions(
        devices=4,
        mode="process",
        telemetry_interval=1.0,
        inference_interval=0.05,
        cloud_template=cloud_template,
        agent_settings={"probation_s": 0.5, "probation_min_inferences": 5},
    )
    with SimFleet(tmp_path / "fleet", opts) as fleet:
        assert fleet.cloud is not None
        cloud = fleet.cloud
        cloud.deploy("digits", 1, fleet.device_ids)
        cloud.wait_for(
            lambda devs: all(d["release"] == 1 for d in devs) and len(devs) == 4,
            "4 devices on release 1",
            timeout=180,
            check=fleet.check_alive,
        )
        release = publish_variant(cloud.cloud_dir, "digits", 1)
        fleet.power_cut("dev-004")
        cloud.wait_for(
            lambda devs: not next(d for d in devs if d["device_id"] == "dev-004")["online"],
            "dev-004 offline",
            timeout=60,
        )

        def api(method: str, path: str, **kw: object) -> httpx.Response:
            return httpx.request(method, cloud.api + path, headers=cloud.headers, timeout=30, **kw)  # type: ignore[arg-type]

        r = api(
            "POST",
            "/api/v1/rollouts",
            json={
                "model": "digits",
                "release": release,
                "target": {"all": True},
                "waves": [100],
                "success_threshold": 0.75,
                "deadline_s": 3600,
            },
        )
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        deadline = time.monotonic() + 180
        while (st := api("GET", f"/api/v1/rollouts/{rid}").json())["state"] != "completed":
            assert st["state"] == "running" and time.monotonic() < deadline, st
            time.sleep(0.5)
        assert st["counts"] == {"updated": 3, "offered": 1}

        fleet.power_on("dev-004")
        deadline = time.monotonic() + 180
        while (st := api("GET", f"/api/v1/rollouts/{rid}").json())["counts"] != {"updated": 4}:
            assert time.monotonic() < deadline, st
            fleet.check_alive()
            time.sleep(0.5)
        # The registry writes device history in batches (every 0.5 s): the rollout
        # may count the device updated a moment before its history shows why.
        deadline = time.monotonic() + 10
        while True:
            dev = api("GET", "/api/v1/devices/dev-004").json()
            committed = any(
                h["kind"] == "committed" and h["release"] == release and h["rollout_id"] == rid
                for h in dev["history"]
            )
            if committed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert dev["release"] == release and dev["online"]
        assert committed, dev["history"]
