"""The whole product on one machine, as `make demo` runs it, with assertions:
real Mosquitto, the cloud service and three device agents as processes."""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from firmware_sim.demo import DemoFleet, demo_fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EPOCHS = 6


def _publish_raw(fleet: DemoFleet, topic: str, payload: bytes) -> None:
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id="e2e-intruder",
        protocol=mqtt.MQTTv5,
    )
    c.connect("127.0.0.1", fleet.broker.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(timeout=5)
    finally:
        c.disconnect()
        c.loop_stop()


def _by_id(fleet: DemoFleet) -> dict[str, dict[str, object]]:
    return {d["device_id"]: d for d in fleet.devices()}


def _tamper_target(fleet: DemoFleet, model: str, release: int) -> None:
    blobs = list(
        (fleet.cloud_dir / "repository" / "targets" / model / str(release)).glob("*.model.tflite")
    )
    assert blobs, "published model target not found on disk"
    for blob in blobs:
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))


def test_release_travels_from_cloud_to_every_device(tmp_path: Path) -> None:
    with demo_fleet(tmp_path, n_devices=3, telemetry_interval=0.5) as fleet:
        v1 = fleet.release_digits(variant=0, epochs=EPOCHS)
        assert v1["release"] == 1 and v1["quantization"] == "int8"
        fleet.deploy("digits", 1)
        devices = fleet.wait_release(1)
        slot_v1 = {d["device_id"]: d["slot"] for d in devices}

        # Malformed traffic: garbage desired state and a forged telemetry message.
        invalid_before = fleet_stats(fleet)["invalid_messages"]
        _publish_raw(fleet, "edgefleet/v1/devices/dev-001/desired", b"\x00garbage")
        _publish_raw(fleet, "edgefleet/v1/devices/dev-002/telemetry", b'{"schema": 1}')
        fleet.wait_for(
            lambda _: fleet_stats(fleet)["invalid_messages"] > invalid_before,
            "cloud to count the invalid telemetry",
            timeout=20,
        )

        v2 = fleet.release_digits(variant=1, epochs=EPOCHS)
        assert v2["release"] == 2
        fleet.deploy("digits", 2)
        devices = fleet.wait_release(2)
        for d in devices:
            assert d["online"] is True
            assert d["model"] == "digits"
            assert d["slot"] != slot_v1[d["device_id"]], "v2 must go to the other A/B slot"
            assert d["last_error"] is None
        fleet.wait_for(
            lambda devs: all(d["inferences_total"] > 0 for d in devs),
            "telemetry from every device",
            timeout=30,
        )
        kinds = [e["kind"] for e in _by_id(fleet)["dev-001"]["recent_events"]]  # type: ignore[index,union-attr]
        assert kinds[-7:] == [
            "downloading",
            "verified",
            "staged",
            "selftest",
            "swapped",
            "probation_passed",
            "committed",
        ]

        # A release whose bytes were tampered with after signing is never loaded.
        v3 = fleet.release_digits(variant=2, epochs=EPOCHS)
        _tamper_target(fleet, "digits", v3["release"])
        before = {k: v["inferences_total"] for k, v in _by_id(fleet).items()}
        fleet.deploy("digits", v3["release"])
        devices = fleet.wait_for(
            lambda devs: all(d["state"] == "failed" for d in devs), "devices to refuse v3"
        )
        for d in devices:
            assert d["release"] == 2, "the running model must keep serving"
            assert d["last_error"]["code"] == "verification_failed"  # type: ignore[index]
        time.sleep(1.5)
        after = _by_id(fleet)
        assert all(after[k]["inferences_total"] > before[k] for k in before), (
            "inference must continue after a rejected release"
        )
        procs = dict(fleet.procs.procs)
    assert all(p.poll() is not None for p in procs.values()), "every process is stopped"


def fleet_stats(fleet: DemoFleet) -> dict[str, int]:
    import httpx

    r = httpx.get(f"{fleet.api}/api/v1/stats", timeout=5, headers=fleet.headers)
    r.raise_for_status()
    return dict(r.json())
