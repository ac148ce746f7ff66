"""Ingest under crashes of real processes: an ``edgefleet-cloud ingest`` worker and
the broker are killed with SIGKILL while a stream of telemetry is being stored,
then started again. Every window ends up stored exactly once, and its histogram
is in the drift partials exactly once (a redelivered window adds nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import func, select

from cloud.broker import MosquittoProcess
from cloud.config import CloudSettings
from cloud.db import Database
from cloud.ingest import IngestConfig, IngestWorker, cached_release_lookup
from cloud.ingest.mqtt_reader import MqttReader, ReaderConfig
from cloud.ingest.store import SeenUpdate, TelemetryStore, decode_counts
from cloud.ingest.tables import DriftPartial, TelemetryWindow
from cloud.ingest.testing import FakeDevice, SyntheticRelease, publish_synthetic_release
from cloud.ingest.worker import STORE_CHANNELS
from cloud.releases import ReleaseService
from cloud.tuf_repo import ReleaseRepository
from shared.messages import encode
from shared.topics import Channel, subscription

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAMPLES = 40
DEVICES = 8


class Setup:
    """A data dir with a signed release, a database that knows the devices, and
    the stream of windows to send."""

    def __init__(self, tmp_path: Path, n: int) -> None:
        self.settings = CloudSettings(data_dir=tmp_path / "cloud")
        self.settings.data_dir.mkdir(parents=True)
        repo = ReleaseRepository.open_or_init(self.settings.repo_dir, self.settings.keys_dir)
        self.release: SyntheticRelease = publish_synthetic_release(repo, n_features=6, bins=8)
        self.service = ReleaseService(repo)
        self.db = Database(self.settings.db_url)
        self.db.create_all()
        devices = [FakeDevice(f"dev-{i}", release=self.release, seed=i) for i in range(DEVICES)]
        TelemetryStore(self.db, worker="setup", bucket_seconds=3600).write_batch(
            [], [SeenUpdate(d.device_id, time.time(), None) for d in devices]
        )
        self.stream = [
            (
                devices[i % DEVICES].topic(Channel.TELEMETRY),
                encode(devices[i % DEVICES].telemetry(samples=SAMPLES)),
            )
            for i in range(n)
        ]

    def stored(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(TelemetryWindow)) or 0)

    def partial_totals(self) -> tuple[int, int]:
        """(windows, input samples of the first feature) summed over the drift partials."""
        windows = samples = 0
        with self.db.session() as s:
            for p in s.scalars(select(DriftPartial)):
                windows += p.windows
                counts = decode_counts(p.input_counts, (p.n_features, p.bins))
                samples += int(np.asarray(counts)[0].sum())
        return windows, samples


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path, 1500)
    yield s
    s.db.dispose()


def _publisher(port: int) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"pub-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(100)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    client.connect("127.0.0.1", port, clean_start=False, properties=props)
    client.loop_start()
    return client


def _send_all(port: int, stream: list[tuple[str, bytes]], pause: float = 0.0) -> None:
    """Publish ``stream`` (QoS 1, every PUBACK awaited), ``pause`` s between chunks."""
    client = _publisher(port)
    try:
        for i in range(0, len(stream), 25):
            infos = [client.publish(t, p, qos=1) for t, p in stream[i : i + 25]]
            for info in infos:
                info.wait_for_publish(60)
                assert info.is_published()
            time.sleep(pause)
    finally:
        client.disconnect()
        client.loop_stop()


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _register(port: int) -> None:
    """Create the worker's session, so the stream queues for it from the first message."""
    cfg = IngestConfig(port=port, share_group="faults", client_id="faults-0")
    reader = MqttReader(
        ReaderConfig(
            "127.0.0.1",
            port,
            cfg.client_id,
            tuple(subscription(ch, share_group=cfg.share_group) for ch in STORE_CHANNELS),
        )
    )
    reader.connect()
    reader.disconnect()


def _ingest_process(setup: Setup, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EDGEFLEET_INGEST_STORE_GROUP": "faults"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "ingest",
            "--data-dir",
            str(setup.settings.data_dir),
            "--broker-port",
            str(port),
            "--client-prefix",
            "faults",
            "--window",
            "3600",
            "--batch-size",
            "100",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )


def test_worker_killed_mid_stream_stores_every_window_once(setup: Setup, tmp_path: Path) -> None:
    n = len(setup.stream)
    with MosquittoProcess(tmp_path / "broker", persist=True) as broker:
        _register(broker.port)
        worker = _ingest_process(setup, broker.port)
        # A stream spread over some seconds, so that the kills fall in the middle of it.
        sender = threading.Thread(target=_send_all, args=(broker.port, setup.stream, 0.1))
        try:
            sender.start()
            for kills in range(3):
                floor = setup.stored()
                _wait(
                    lambda f=floor: setup.stored() > min(f + 50, n - 1),  # type: ignore[misc]
                    f"progress before kill {kills + 1}",
                    timeout=180,
                )
                worker.send_signal(signal.SIGKILL)  # mid-batch, mid-commit or mid-ack
                worker.wait()
                worker = _ingest_process(setup, broker.port)  # same client id: same session
            sender.join(120)
            _wait(lambda: setup.stored() >= n, f"all {n} windows", timeout=120)
            time.sleep(1.0)  # a late duplicate would show now
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
            if sender.is_alive():
                sender.join(60)
    assert setup.stored() == n
    assert setup.partial_totals() == (n, n * SAMPLES)  # no histogram counted twice


def test_broker_killed_mid_drain_stores_every_window_once(setup: Setup, tmp_path: Path) -> None:
    n = len(setup.stream)
    cfg = IngestConfig(
        share_group="faults", client_id="faults-0", batch_size=100, bucket_seconds=3600
    )
    lookup = cached_release_lookup(setup.service)
    with MosquittoProcess(tmp_path / "broker", persist=True) as broker:
        cfg.port = broker.port
        worker = IngestWorker(setup.db, cfg, releases=lookup)
        worker.start(wait=10)
        worker.stop()  # the session exists; the stream queues for it
        _send_all(broker.port, setup.stream)
        time.sleep(2.5)  # Mosquitto saves its state every second (autosave_interval 1)
        worker = IngestWorker(setup.db, cfg, releases=lookup)
        worker.start(wait=10)
        try:
            _wait(lambda: setup.stored() > n // 4, "a quarter drained")
            broker.kill()  # SIGKILL: nothing flushed, connections reset
            broker.start()  # from the last autosave: acknowledged messages come again
            _wait(lambda: setup.stored() >= n, f"all {n} windows", timeout=120)
            time.sleep(1.0)
        finally:
            worker.stop()
    assert setup.stored() == n
    assert worker.stats.dropped == {}
    assert setup.partial_totals() == (n, n * SAMPLES)
