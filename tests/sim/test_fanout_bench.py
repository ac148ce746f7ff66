"""The fan-out bench (``bench/fanout.py``) end to end on a small fleet, both modes.

Eight devices per mode: a real broker, the cloud and real agents in two worker
processes, the MobileNetV2 int8 release built by the project's pipeline. The
bench's own code path runs (``parse_args`` -> ``run`` -> ``report``); the test
checks what the bench promises to measure: every device updated and serving,
bytes per device close to the release's target size, the HTTP mode served by
the cloud once per device and the broker mode published by the cloud once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from bench.fanout import parse_args, report, run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

DEVICES = 8


@pytest.fixture(scope="session")
def fanout_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the built MobileNetV2 releases are kept: built once per session, shared
    by xdist workers (the first one builds under a lock)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    cache = root / "fanout-bench-cache"
    with open(root / "fanout-bench-cache.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from firmware_sim.fanout_release import build_cloud_template

        build_cloud_template(cache / "cloud-template", cache / "models")
    return cache


def test_fanout_bench_updates_every_device_over_http_and_through_the_broker(
    tmp_path: Path, fanout_cache: Path
) -> None:
    args = parse_args(
        [
            "--devices",
            str(DEVICES),
            "--modes",
            "http,broker",
            "--workdir",
            str(tmp_path / "run"),
            "--cache-dir",
            str(fanout_cache),
            "--timeout",
            "240",
        ]
    )
    lines: list[str] = []
    results, target = run(args, log=lines.append)
    by = {r.mode: r for r in results}
    assert set(by) == {"http", "broker"}
    # The denominator: model, self-test vectors and drift baseline of release 2.
    assert set(target.files) == {"model.tflite", "selftest.npz", "baseline.npz"}
    assert 1_500_000 < target.files["model.tflite"] < 2_500_000

    for r in results:
        assert (r.updated, r.failed, r.no_model) == (DEVICES, 0, 0), (r.mode, r.reasons, lines)
        assert r.cloud_view_updated == DEVICES
        assert r.fleet_s is not None and r.fleet_s > 0
        assert len(r.per_device) == DEVICES
        # Every device received the whole release, plus a little protocol and metadata.
        for d in r.per_device:
            assert target.size <= sum(d.values()) <= 1.05 * target.size, (r.mode, d)
        assert not any(r.unclaimed.values()), r.unclaimed

    http, broker = by["http"], by["broker"]
    # HTTP: each device downloaded the targets from the cloud; nothing from the broker.
    assert all(d.get("http_rx", 0) >= target.size for d in http.per_device)
    assert http.cloud_http >= DEVICES * target.size
    assert http.cloud_broker < 0.05 * target.size
    # Broker: the targets came over MQTT (TUF metadata still over HTTP), and the cloud
    # published them about once, whatever the fleet size.
    assert all(d.get("mqtt_rx", 0) >= target.size for d in broker.per_device)
    assert all(d.get("http_rx", 0) < 0.05 * target.size for d in broker.per_device)
    assert target.size <= broker.cloud_broker <= 1.1 * target.size
    assert broker.broker_sent >= DEVICES * target.size

    text = "\n".join(report(results, target, args))
    assert "TIME TO FLEET UPDATED" in text
    assert "verdict http" in text and "verdict broker" in text
    assert "broker / http: time" in text
    # The bench removed nothing it was told to keep, and left no process (conftest).
    assert (tmp_path / "run" / "http" / "logs").is_dir()
