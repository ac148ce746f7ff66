"""``/metrics`` over real HTTP: token required, valid exposition format, the fleet,
inference, ingest and API families present, and every metric the Grafana dashboard
and docs/SLO.md name is really exposed."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud.ingest.testing import FakeDevice
from shared.messages import encode
from shared.topics import Channel

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _families(cloud) -> dict[str, object]:  # type: ignore[no-untyped-def]
    r = httpx.get(f"{cloud.url}/metrics", headers=cloud.headers("viewer"), timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _samples(fams: dict[str, object], name: str) -> list[object]:
    return list(fams[name].samples)  # type: ignore[attr-defined]


def test_metrics_need_a_token(cloud) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(f"{cloud.url}/metrics").status_code == 401


def test_metrics_show_fleet_inference_ingest_and_api(cloud) -> None:  # type: ignore[no-untyped-def]
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"metrics-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    c.connect("127.0.0.1", cloud.settings.broker_port)
    c.loop_start()
    try:
        dev = FakeDevice("dev-m")
        c.publish(dev.topic(Channel.STATUS), dev.status(), qos=1, retain=True).wait_for_publish(5)
        c.publish(dev.topic(Channel.REPORTED), dev.reported(), qos=1).wait_for_publish(5)
        time.sleep(0.5)
        for _ in range(3):
            c.publish(
                dev.topic(Channel.TELEMETRY), encode(dev.telemetry(errors=5)), qos=1
            ).wait_for_publish(5)
        c.publish(dev.topic(Channel.TELEMETRY), b"not json", qos=1).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()
    deadline = time.monotonic() + 20
    while True:
        fams = _families(cloud)
        stored = sum(
            s.value for s in _samples(fams, "edgefleet_ingest_stored") if s.name.endswith("_total")
        )
        if stored >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert stored == 3
    assert _samples(fams, "edgefleet_devices_online")[0].value == 1
    assert _samples(fams, "edgefleet_broker_connected")[0].value == 1
    dropped = {s.labels["reason"]: s.value for s in _samples(fams, "edgefleet_ingest_dropped")}
    assert dropped == {"invalid": 1}
    assert [s.labels["worker"] for s in _samples(fams, "edgefleet_ingest_connected")] == [
        "edgefleet-ingest-0"
    ]
    httpx.get(f"{cloud.url}/api/v1/telemetry/devices/dev-m", headers=cloud.headers("viewer"))
    fams = _families(cloud)
    routes = {s.labels["route"] for s in _samples(fams, "edgefleet_http_request_duration_seconds")}
    # Earlier requests, labelled by route template (never by raw path).
    assert {"/metrics", "/api/v1/telemetry/devices/{device_id}"} <= routes


def test_dashboard_and_slo_name_only_exposed_metrics(cloud) -> None:  # type: ignore[no-untyped-def]
    exposed = set(_families(cloud))
    board = json.loads((ROOT / "dashboards" / "grafana-edgefleet.json").read_text())
    assert board["title"] and board["panels"] and board["uid"]
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    slo = (ROOT / "docs" / "SLO.md").read_text()
    named = set(re.findall(r"\bedgefleet_[a-z0-9_]+", exprs + " " + slo))
    # Prometheus suffixes a family's samples with _total, _bucket, _sum, _count.
    base = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in named}
    missing = sorted(n for n in base if n not in exposed)
    assert not missing, f"named but not exposed: {missing}"
    for sli in (
        "edgefleet_update_outcomes",
        "edgefleet_fleet_update_seconds",
        "edgefleet_telemetry_age_seconds",
        "edgefleet_http_request_duration_seconds",
        "edgefleet_broker_connected",
        "edgefleet_rollout_progress_ratio",
        "edgefleet_drift_psi",
        "edgefleet_inference_latency_ms",
    ):
        assert sli in exposed
