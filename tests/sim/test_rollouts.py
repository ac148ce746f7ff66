"""Rollouts against a real fleet: ten agents (threads) on a real broker and cloud.

Waves advance on real device reports; a release every device refuses aborts its
rollout by itself; an operator abort rolls updated devices back to a re-release
of the model they ran; incompatible devices are skipped with the reason; bad
requests are 4xx and change nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from firmware_sim.fleet import FleetOptions, SimFleet
from firmware_sim.releases import publish_variant

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 10
NPU = ["dev-001", "dev-002", "dev-003"]


def _api(fleet: SimFleet, method: str, path: str, **kw: Any) -> httpx.Response:
    assert fleet.cloud is not None
    return httpx.request(
        method, fleet.cloud.api + path, headers=fleet.cloud.headers, timeout=60, **kw
    )


def _wait_rollout(fleet: SimFleet, rid: str, states: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = _api(fleet, "GET", f"/api/v1/rollouts/{rid}")
        assert r.status_code == 200, r.text
        status: dict[str, Any] = r.json()
        if status["state"] in states:
            return status
        assert time.monotonic() < deadline, f"rollout {rid} never reached {states}: {status}"
        fleet.check_alive()
        time.sleep(0.3)


def _wait_devices(fleet: SimFleet, release: int, ids: list[str], timeout: float = 120) -> None:
    assert fleet.cloud is not None
    want = set(ids)
    fleet.cloud.wait_for(
        lambda devs: (
            want
            <= {
                d["device_id"]
                for d in devs
                if d["release"] == release and d["state"] in ("idle", "committed")
            }
        ),
        f"{sorted(want)} on release {release}",
        timeout=timeout,
        check=fleet.check_alive,
    )


def _rollout(fleet: SimFleet, **body: Any) -> httpx.Response:
    body.setdefault("model", "digits")
    body.setdefault("target", {"all": True})
    body.setdefault("wave_timeout_s", 180)
    return _api(fleet, "POST", "/api/v1/rollouts", json=body)


def test_rollouts_on_a_threaded_fleet(tmp_path: Path, cloud_template: Path) -> None:
    tags = {f"dev-{i:03d}": ["group:lab" if i <= 5 else "group:field"] for i in range(1, N + 1)}
    for d in NPU:
        tags[d].append("npu")
    opts = FleetOptions(
        devices=N,
        mode="thread",
        telemetry_interval=0.5,
        inference_interval=0.02,
        cloud_template=cloud_template,
        hardware_tags=tags,
        agent_settings={"probation_s": 0.5, "probation_min_inferences": 5},
    )
    with SimFleet(tmp_path / "fleet", opts) as fleet:
        assert fleet.cloud is not None
        cloud_dir = fleet.cloud.cloud_dir
        fleet.cloud.deploy("digits", 1, fleet.device_ids)
        _wait_devices(fleet, 1, fleet.device_ids)
        good = publish_variant(cloud_dir, "digits", 1)  # 2
        broken = publish_variant(cloud_dir, "digits", 1, break_selftest=True)  # 3
        npu_only = publish_variant(cloud_dir, "digits", 1, hardware_tags=["npu"])  # 4
        assert (good, broken, npu_only) == (2, 3, 4)

        # -- bad requests: 4xx with a reason, nothing changes -------------------------
        r = _rollout(fleet, release=99)
        assert r.status_code == 404 and "release 99" in r.json()["detail"]
        r = _rollout(fleet, release=good, target={"group": "nowhere"})
        assert r.status_code == 422 and "names no known device" in r.json()["detail"]
        r = _rollout(fleet, release=good, target={"devices": ["dev-001", "ghost-7"]})
        assert r.status_code == 422 and "ghost-7" in r.json()["detail"]
        r = _rollout(fleet, release=npu_only, target={"group": "field"})
        assert r.status_code == 422 and "hardware tags ['npu']" in r.json()["detail"]
        r = _rollout(fleet, release=good, waves=[50, 10, 100])
        assert r.status_code == 422
        assert _api(fleet, "GET", "/api/v1/rollouts").json() == []

        # -- a healthy release, wave by wave ----------------------------------------
        r = _rollout(fleet, release=good, waves=[10, 50, 100], reason="monthly model")
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        assert [w["cumulative"] for w in r.json()["wave_detail"]] == [1, 5, 10]
        overlap = _rollout(fleet, release=good, target={"devices": ["dev-004"]})
        assert overlap.status_code == 409 and rid in overlap.json()["detail"]
        done = _wait_rollout(fleet, rid, {"completed", "aborted", "paused"}, 240)
        assert done["state"] == "completed", done
        assert done["counts"] == {"updated": N}
        kinds = [e["kind"] for e in _api(fleet, "GET", f"/api/v1/rollouts/{rid}/events").json()]
        assert kinds[0] == "started" and kinds[-1] == "completed"
        assert kinds.count("wave_started") == 3 and kinds.count("wave_passed") == 3
        _wait_devices(fleet, good, fleet.device_ids)

        # -- a release every device refuses: the rollout aborts itself -------------
        r = _rollout(fleet, release=broken, waves=[10, 100], failure_threshold=0.0)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        aborted = _wait_rollout(fleet, rid, {"aborted", "completed"}, 180)
        assert aborted["state"] == "aborted" and "failure threshold" in aborted["reason"]
        devs = {
            d["device_id"]: d for d in _api(fleet, "GET", f"/api/v1/rollouts/{rid}/devices").json()
        }
        canary = [d for d, v in devs.items() if v["wave"] == 1]
        assert len(canary) == 1
        assert "selftest_failed" in (devs[canary[0]]["reason"] or ""), devs[canary[0]]
        # The canary refused it and goes on with release 2; nobody else was touched.
        assert {v["status"] for d, v in devs.items() if d not in canary} == {"unchanged"}
        assert devs[canary[0]]["revert_to"] == good
        time.sleep(2)
        _wait_devices(fleet, good, fleet.device_ids)
        assert aborted["rollback"] == {}  # nothing to re-release: nobody ran it

        # -- compatibility: only NPU devices take release 4 -------------------------
        r = _rollout(fleet, release=npu_only, waves=[100])
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        devs = {
            d["device_id"]: d for d in _api(fleet, "GET", f"/api/v1/rollouts/{rid}/devices").json()
        }
        skipped = sorted(d for d, v in devs.items() if v["status"] == "skipped")
        assert skipped == sorted(set(fleet.device_ids) - set(NPU))
        assert "hardware tags ['npu']" in devs[skipped[0]]["reason"]
        done = _wait_rollout(fleet, rid, {"completed", "aborted"}, 120)
        assert done["state"] == "completed" and done["counts"]["updated"] == len(NPU)
        _wait_devices(fleet, npu_only, NPU)

        # -- pause, resume, and an operator abort that rolls back --------------------
        fresh = publish_variant(cloud_dir, "digits", 1)  # 5
        r = _rollout(fleet, release=fresh, target={"group": "field"}, waves=[40, 100], soak_s=3600)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        first = [
            d["device_id"]
            for d in _api(fleet, "GET", f"/api/v1/rollouts/{rid}/devices").json()
            if d["wave"] == 1
        ]
        assert len(first) == 2
        _wait_devices(fleet, fresh, first)
        paused = _api(fleet, "POST", f"/api/v1/rollouts/{rid}/pause", json={"reason": "lunch"})
        assert paused.status_code == 200 and paused.json()["state"] == "paused"
        again = _api(fleet, "POST", f"/api/v1/rollouts/{rid}/pause", json={})
        assert again.status_code == 409
        resumed = _api(fleet, "POST", f"/api/v1/rollouts/{rid}/resume", json={})
        assert resumed.json()["state"] == "running"
        r = _api(fleet, "POST", f"/api/v1/rollouts/{rid}/abort", json={"reason": "bad numbers"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["state"] == "aborted" and out["rollback"] == {"digits/2": 6}
        _wait_devices(fleet, 6, first)  # release 2's bytes, re-released as 6
        reverted = _wait_rollout(fleet, rid, {"aborted"}, 5)
        rows = _api(fleet, "GET", f"/api/v1/rollouts/{rid}/devices").json()
        deadline = time.monotonic() + 60
        while {d["status"] for d in rows if d["wave"] == 1} != {"reverted"}:
            assert time.monotonic() < deadline, rows
            time.sleep(0.5)
            rows = _api(fleet, "GET", f"/api/v1/rollouts/{rid}/devices").json()
        assert {d["status"] for d in rows if d["wave"] == 2} == {"unchanged"}
        assert "re-released as 6" in " ".join(e["reason"] for e in reverted["events"])
        manifest = _api(fleet, "GET", "/api/v1/releases/digits/6").json()
        assert manifest["source"]["rerelease_of"] == "2"

        # -- the registry remembers who ran what --------------------------------------
        ran = _api(fleet, "GET", f"/api/v1/releases/digits/{fresh}/devices").json()
        assert sorted(d["device_id"] for d in ran) == sorted(first)
        assert not any(d["running_now"] for d in ran)
        dev = _api(fleet, "GET", f"/api/v1/devices/{first[0]}").json()
        assert dev["group"] == "field" and dev["hardware"]["runtime"].startswith("ai-edge-litert")
        kinds = {h["kind"] for h in dev["history"]}
        assert {"running", "swapped", "committed"} <= kinds
        lab = _api(fleet, "GET", "/api/v1/devices", params={"group": "lab"}).json()
        assert sorted(d["device_id"] for d in lab) == [f"dev-{i:03d}" for i in range(1, 6)]
        r = _api(
            fleet,
            "PATCH",
            "/api/v1/devices/dev-009",
            json={"group": "lab", "add_labels": ["bench"]},
        )
        assert r.status_code == 200 and r.json()["group"] == "lab" and "bench" in r.json()["tags"]
        tagged = _api(fleet, "GET", "/api/v1/devices", params={"tag": "bench"}).json()
        assert [d["device_id"] for d in tagged] == ["dev-009"]

        # -- a recall that also takes the release down needs an admin ---------------
        r = _api(
            fleet,
            "POST",
            f"/api/v1/releases/digits/{fresh}/recall",
            json={"reason": "test", "take_down": True},
        )
        assert r.status_code == 403 and "take_down needs admin" in r.json()["detail"]
        assert _api(fleet, "GET", f"/api/v1/releases/digits/{fresh}").status_code == 200
